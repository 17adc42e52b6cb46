# Two entry points, each installing what it needs into a project-local venv:
#   make demo   the embedded default end to end (init -> sft -> eval -> GRPO -> eval)
#   make test   lint + the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/grpo demo --output-dir runs/demo

# TRL lives in its own venv so it can never move the project's packages
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed-stamp: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/python -m pip install -q -e ".[bench]"
	touch $@

bench: $(BENCH_VENV)/.installed-stamp
	$(BENCH_VENV)/bin/python bench/vs_trl.py --config tiny

clean:
	rm -rf $(VENV) $(BENCH_VENV) runs build *.egg-info src/*.egg-info
