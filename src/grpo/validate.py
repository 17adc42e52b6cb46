"""Pre-flight checks: every bad input a named error before any model loads.

``preflight(cfg)`` runs before ``GRPOTrainer`` is built and reads no weights: the output
location, the model directory (its ``config.json`` and tokenizer), the reward function
specs, every row of the training data (a JSONL file line by line first, for line
numbers), and the tokenised length of every prompt against the model's positions. Each
failure is a ``GRPOError`` whose one-line message names the field or file (with line
number), the value and what was expected.

A model given as a path that looks local (absolute, ``./``, ``~``, more than one ``/``,
or whose first component exists here) and does not exist is reported as such; only a
name shaped like a hub id (``org/name``) is left to ``from_pretrained`` and the hub.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from grpo.errors import DataError, ModelError, UsageError

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# ---------------------------------------------------------------------------- locations
def check_output_dir(path: str | Path, field: str = "run.output_dir") -> None:
    """A directory, or a path that can become one (no file in the way)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == path else f" ({str(p)!r} is a file)"
                raise UsageError(
                    f"{field}={str(path)!r} is not a directory{where}; expected a directory "
                    "or a path that does not exist yet"
                )
            return


def check_fresh_output(path: str | Path, resume: bool) -> None:
    """A new run must not overwrite the checkpoints of an earlier one."""
    from grpo.checkpoint import latest_checkpoint

    newest = None if resume else latest_checkpoint(path)
    if newest is not None:
        raise UsageError(
            f"run.output_dir={str(path)!r} holds checkpoints of an earlier run (newest: "
            f"{newest.name}); pass --resume to continue it, or choose another run.output_dir "
            "(a new run would replace them)"
        )


def looks_local(name: str) -> bool:
    """Whether a model name is meant as a path on this machine, not a hub id."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", ".."):
        return True
    if not _HUB_ID.match(name) or ".." in name or "--" in name:
        return True
    first = name.split("/")[0]
    return "/" in name and Path(first).is_dir()


def check_model_path(name: str, field: str = "model.name_or_path") -> Path | None:
    """The model directory when ``name`` is local (checked), None for a hub id.

    Raises:
        ModelError: a local-looking path that does not exist, is a file, or lacks
            ``config.json``, weights or tokenizer files.
    """
    path = Path(name).expanduser()
    if not path.exists():
        if looks_local(name):
            raise ModelError(
                f"{field}={name!r}: no such directory (a local path, so the hub is not "
                "tried); create one with `grpo init DIR` or give a hub id like org/name"
            )
        return None
    if not path.is_dir():
        raise ModelError(f"{field}={name!r} is a file; expected a model directory")
    missing = [
        what
        for what, files in (
            ("config.json", ("config.json",)),
            ("weights", WEIGHT_FILES),
            ("tokenizer", TOKENIZER_FILES),
        )
        if not any((path / f).is_file() for f in files)
    ]
    if missing:
        raise ModelError(
            f"{field}={name!r} has no {' and no '.join(missing)} (looked for "
            f"{_expected(missing)}); expected a save_pretrained directory"
        )
    return path


def _expected(missing: list[str]) -> str:
    names = {"config.json": ("config.json",), "weights": WEIGHT_FILES, "tokenizer": TOKENIZER_FILES}
    return ", ".join(f for m in missing for f in names[m])


def max_positions(model_dir: Path) -> int | None:
    """The model's position limit from its ``config.json`` (no weights loaded)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{str(model_dir / 'config.json')!r} is not valid JSON ({err})") from None
    for section in (config, config.get("text_config") or {}):
        for key in POSITION_KEYS:
            if isinstance(section.get(key), int):
                return section[key]
    return None


def load_tokenizer(model_dir: Path, field: str = "model.name_or_path"):
    """The model directory's tokenizer, checked for an EOS token (and a pad fallback)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelError(
            f"{field}={str(model_dir)!r}: the tokenizer does not load ({first})"
        ) from None
    if tokenizer.eos_token_id is None:
        raise ModelError(
            f"{field}={str(model_dir)!r}: the tokenizer has no EOS token (eos_token is "
            "None), so no completion could end; set eos_token in tokenizer_config.json"
        )
    return tokenizer


# ---------------------------------------------------------------------------- data
def _check_prompt(prompt: Any, where: str, column: str) -> None:
    expected = "a non-empty string or a non-empty list of {role, content} messages"
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: {column} is an empty string; expected {expected}")
        return
    if isinstance(prompt, list) and prompt:
        for j, message in enumerate(prompt):
            ok = (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            )
            if not ok:
                raise DataError(
                    f"{where}: {column} message {j} is {_preview(message)}; expected "
                    '{"role": str, "content": str}'
                )
        return
    raise DataError(
        f"{where}: {column} is {_preview(prompt)} ({type(prompt).__name__}); expected {expected}"
    )


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonl_rows(path: Path, field: str) -> list[tuple[str, Any]]:
    rows = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"{field}={str(path)!r} line {n}: byte {raw[err.start]:#04x} at column "
                f"{err.start + 1} is not UTF-8; expected UTF-8 text"
            ) from None
        if not line.strip():
            continue
        try:
            rows.append((f"{field}={str(path)!r} line {n}", json.loads(line)))
        except ValueError as err:
            raise DataError(
                f"{field}={str(path)!r} line {n}: not valid JSON ({err}); expected one JSON "
                "object per line"
            ) from None
    return rows


def check_jsonl_file(path: str | Path, column: str = "prompt", field: str = "data.train_file"):
    """Every line of a JSONL prompt file, checked; returns ``(where, row)`` pairs.

    ``datasets`` reads the file for training; this pass exists for the line numbers its
    errors lack.

    Raises:
        DataError: naming the file and line of the first problem: empty, not UTF-8, not
            JSON, not an object, no prompt column, or a prompt that is not a non-empty
            string or a list of chat messages.
    """
    path = Path(path)
    if not path.read_bytes().strip():
        raise DataError(f"{field}={str(path)!r} is empty; expected one JSON object per line")
    located = _jsonl_rows(path, field)
    check_rows(located, column)
    return located


def check_rows(located: list[tuple[str, Any]], column: str) -> None:
    """Each row an object with a usable prompt in ``column``."""
    for where, row in located:
        if not isinstance(row, dict):
            raise DataError(f"{where}: a {type(row).__name__}; expected a JSON object")
        if column not in row:
            raise DataError(
                f"{where}: no {column!r} column (data.prompt_column; columns: {sorted(row)})"
            )
        _check_prompt(row[column], where, column)


# ---------------------------------------------------------------------------- lengths
def check_lengths(
    tokenizer, located: list[tuple[str, Any]], column: str, completion: int, limit: int, model
) -> None:
    """prompt tokens + ``rollout.max_completion_length`` within the model's positions."""
    from grpo.data import encode_prompt

    if completion >= limit:
        raise ModelError(
            f"rollout.max_completion_length={completion} leaves no room for a prompt in "
            f"{model!r}, which has max_position_embeddings={limit}"
        )
    longest, where_longest = 0, ""
    for where, row in located:
        try:
            n = len(encode_prompt(tokenizer, row[column]))
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DataError(f"{where}: the prompt does not tokenise ({first})") from None
        if n > longest:
            longest, where_longest = n, where
    if longest + completion > limit:
        raise ModelError(
            f"{where_longest}: a prompt of {longest} tokens + rollout.max_completion_length="
            f"{completion} = {longest + completion} exceeds max_position_embeddings={limit} "
            f"of {model!r}; shorten the prompts or lower rollout.max_completion_length"
        )


def check_chat_template(tokenizer, located: list[tuple[str, Any]], column: str, model) -> None:
    chat = next((where for where, row in located if isinstance(row[column], list)), None)
    if chat is not None and not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"{chat}: the prompt is chat messages, but the tokenizer of {model!r} has no "
            "chat template; give plain-string prompts or a tokenizer with a chat_template"
        )


# ---------------------------------------------------------------------------- the run
def training_prompts(cfg) -> list[tuple[str, Any]]:
    """The training rows with where each comes from (file line or row), checked."""
    from grpo.config import ConfigError
    from grpo.data import training_rows
    from grpo.tasks import TASKS

    data, column = cfg.data, cfg.data.prompt_column
    lines: list[tuple[str, Any]] = []
    if data.train_file:
        path = Path(data.train_file)
        if not path.exists():
            raise DataError(f"data.train_file={str(path)!r} does not exist; expected a prompt file")
        if path.is_file() and path.name.lower().endswith(".jsonl"):
            lines = check_jsonl_file(path, column)
        source = f"data.train_file={str(path)!r}"
    elif data.dataset:
        source = f"data.dataset={data.dataset!r}"
    else:
        if data.task not in TASKS:
            raise ConfigError(
                f"data.task={data.task!r}: unknown task; allowed: {', '.join(sorted(TASKS))}, "
                "or set data.train_file"
            )
        source = f"data.task={data.task!r}"
    rows = training_rows(data, cfg.run.seed)  # the loader the trainer uses: its own errors
    if len(lines) == len(rows):  # a JSONL file: name lines, not rows
        located = [(where, row) for (where, _), row in zip(lines, rows, strict=True)]
    else:
        located = [(f"{source} row {i}", row) for i, row in enumerate(rows)]
    check_rows(located, column)
    return located


def check_rewards(cfg) -> None:
    import grpo.tasks  # noqa: F401  (registers the built-in tasks' reward functions)
    from grpo.rewards import load_reward_function

    for spec in cfg.rewards.functions:
        if spec.startswith("model:"):
            check_model_path(spec.removeprefix("model:"), "rewards.functions")
        else:
            load_reward_function(spec)  # a RewardError names what is wrong with the spec


def preflight(
    cfg, resume: bool = False, checkpoint: str | None = None, allow_config_change: bool = False
) -> None:
    """Check a training config's inputs before any model loads (see the module doc); with
    ``resume``, also that there is a checkpoint whose saved config matches."""
    from grpo.checkpoint import check_resumable

    check_output_dir(cfg.run.output_dir)
    check_fresh_output(cfg.run.output_dir, resume)
    if resume:
        check_resumable(cfg.run.output_dir, checkpoint, cfg, allow_config_change)
    check_inputs(cfg)


def check_inputs(cfg) -> None:
    """What ``preflight`` checks besides the output location (``grpo check`` writes
    nothing): the models, reward functions, training prompts and their lengths."""
    model_dir = check_model_path(cfg.model.name_or_path)
    if cfg.model.ref_name_or_path:
        check_model_path(cfg.model.ref_name_or_path, "model.ref_name_or_path")
    check_rewards(cfg)
    located = training_prompts(cfg)
    if model_dir is None:
        return  # a hub id: its tokenizer and config come with the download
    limit = max_positions(model_dir)
    tokenizer = load_tokenizer(model_dir)
    column, name = cfg.data.prompt_column, cfg.model.name_or_path
    check_chat_template(tokenizer, located, column, name)
    if limit is not None:
        completion = cfg.rollout.max_completion_length
        check_lengths(tokenizer, located, column, completion, limit, name)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def _number(text: str, kind, ok, expected: str):
    import argparse

    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
    return value
