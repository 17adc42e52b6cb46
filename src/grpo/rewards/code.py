"""Code execution reward: run the completion's program against the sample's tests.

Each sample runs in its own Python subprocess (``python -I``: no user site, no PYTHON*
variables), in a fresh temporary working directory, with an empty environment, stdin
closed, output discarded, in its own session (so a timeout kills every process it started),
under a wall-clock timeout and resource limits: address space, CPU seconds, file size, no
core files. The trainer never waits longer than the timeout and never shares memory with
model code.

This isolates the trainer from accidents, not from an adversary: model code still runs as
the trainer's user and can read or write files outside its directory, and it runs in the
process that counts passed tests, so a policy hunting for the reward could forge the count.
Run untrusted policies inside a container or VM.

Deviation from a plain ``subprocess.run(..., preexec_fn=set_limits)``: the limits are set
by the child on itself before it runs model code, because ``preexec_fn`` is unsafe when the
parent has threads (the Python docs warn it can deadlock), and samples run on a thread pool.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .scoring import register_reward
from .text import completion_text

DEFAULT_TIMEOUT = 5.0
"""Wall-clock seconds one sample may run (its program and all of its tests)."""
DEFAULT_MEMORY_BYTES = 1 << 30
"""Address-space limit of the sandboxed process (RLIMIT_AS): 1 GiB."""
DEFAULT_FILE_BYTES = 16 << 20
"""Largest file the sandboxed process may write (RLIMIT_FSIZE): 16 MiB."""

# Runs inside the child. argv[1] is a JSON payload, read then deleted before model code runs.
# It prints "<nonce> ready" once sandboxed, then "<nonce> <passed>" once every test has run;
# a crash, os._exit or timeout of model code leaves no second line, which scores 0.0. Model
# output goes to /dev/null; ``__name__`` is not "__main__", so a main block reading stdin is
# skipped.
_RUNNER = """
import json, os, resource, sys
with open(sys.argv[1]) as f:
    job = json.load(f)
os.remove(sys.argv[1])
for limit, value in [(resource.RLIMIT_AS, job["memory"]), (resource.RLIMIT_CPU, job["cpu"]),
                     (resource.RLIMIT_FSIZE, job["fsize"]), (resource.RLIMIT_CORE, 0)]:
    hard = resource.getrlimit(limit)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(limit, (value, value))
print(job["nonce"], "ready", flush=True)
report = os.dup(1)
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 1)
os.dup2(devnull, 2)
namespace = {"__name__": "completion"}
passed = 0
try:
    exec(compile(job["code"], "<completion>", "exec"), namespace)
    for kind, source in job["tests"]:
        try:
            exec(compile(source, "<test>", "exec"), namespace)
        except BaseException:
            if kind == "setup":
                break
        else:
            passed += kind == "test"
except BaseException:
    passed = 0
os.write(report, ("\\n%s %d\\n" % (job["nonce"], passed)).encode())
"""


_FENCED_PYTHON = re.compile(r"```(?:python3?|py)[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The last fenced Python block of ``text`` (```python, ```python3 or ```py), else ``text``.

    An unclosed block (truncated at max_completion_length) runs to the end of ``text``.

    >>> extract_code("Here:\\n```python\\nx = 1\\n```\\nand better:\\n```py\\nx = 2\\n```")
    'x = 2\\n'
    >>> extract_code("x = 3")
    'x = 3'
    """
    blocks = _FENCED_PYTHON.findall(text)
    return blocks[-1] if blocks else text


def split_tests(tests: str | list[str] | None) -> list[tuple[str, str]]:
    """The ``("setup" | "test", source)`` steps of one sample's tests.

    A string is split into its top-level statements: each ``assert`` is one test, anything
    else (imports, helpers) is setup run in order; a string without a top-level ``assert``
    (HumanEval's ``def check(candidate): ...; check(f)``) is one test. A list gives one test
    per entry.

    >>> split_tests("import math\\nassert f(1) == 1\\nassert f(2) == 4")
    [('setup', 'import math'), ('test', 'assert f(1) == 1'), ('test', 'assert f(2) == 4')]
    """
    if tests is None:
        return []
    if not isinstance(tests, str):
        return [("test", str(t)) for t in tests]
    statements = ast.parse(tests).body
    if not any(isinstance(s, ast.Assert) for s in statements):
        return [("test", tests)] if statements else []
    return [
        ("test" if isinstance(s, ast.Assert) else "setup", ast.get_source_segment(tests, s) or "")
        for s in statements
    ]


def run_tests(
    code: str,
    tests: str | list[str] | None,
    timeout: float = DEFAULT_TIMEOUT,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> float | None:
    """Fraction of ``tests`` that pass after running ``code``, in a sandboxed subprocess.

    0.0 if the code does not compile, raises, exits, or runs past ``timeout`` seconds;
    None if there are no tests. Each test runs separately: a failing assert fails one test.
    """
    steps = split_tests(tests)
    total = sum(kind == "test" for kind, _ in steps)
    if total == 0:
        return None
    nonce = secrets.token_hex(16)
    job = {
        "code": code,
        "tests": steps,
        "nonce": nonce,
        "memory": int(memory_bytes),
        "cpu": int(timeout) + 1,
        "fsize": DEFAULT_FILE_BYTES,
    }
    # Model code may leave read-only files behind: cleanup errors must not reach the trainer.
    with tempfile.TemporaryDirectory(prefix="grpo-code-", ignore_cleanup_errors=True) as tmp:
        workdir, payload = Path(tmp, "work"), Path(tmp, "job.json")
        workdir.mkdir()
        payload.write_text(json.dumps(job))
        with Path(tmp, "out").open("w+b") as out, Path(tmp, "err").open("w+b") as err:
            returned = _run_sandboxed([str(payload)], workdir, out, err, timeout)
            out.seek(0)
            if returned and out.readline() != f"{nonce} ready\n".encode():
                raise RuntimeError(f"code sandbox failed before running any code:\n{_tail(err)}")
            lines = _tail(out).splitlines()
    counts = [line.split()[1] for line in lines if line.startswith(nonce + " ")]
    counts = [count for count in counts if count.isdigit()]
    return min(int(counts[-1]), total) / total if returned and counts else 0.0


def _tail(file: Any, size: int = 4096) -> str:
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - size))
    return file.read().decode(errors="replace")


def _run_sandboxed(args: list[str], workdir: Path, out: Any, err: Any, timeout: float) -> bool:
    """Run the runner; True if it exited by itself within ``timeout``."""
    process = subprocess.Popen(
        [sys.executable, "-I", "-c", _RUNNER, *args],
        cwd=workdir,
        env={},
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        start_new_session=True,  # its own process group: a timeout kills what it spawned too
    )
    try:
        process.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is already gone
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def make_code_execution(
    timeout: float = DEFAULT_TIMEOUT,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    max_workers: int = 2,
) -> Callable[..., list[float | None]]:
    """A ``code_execution`` reward with its own timeout, memory limit and thread count."""

    def code_execution(
        prompts: list, completions: list, tests: list[str] | list[list[str]], **kwargs: Any
    ) -> list[float | None]:
        """Fraction of the sample's tests that the completion's last Python block passes.

        ``tests`` holds, per sample, test code (each top-level ``assert`` is one test) or a
        list of tests. 0.0 on a syntax error, crash or timeout; None if a sample has no tests.
        Samples run ``max_workers`` at a time, each in its own sandboxed subprocess.

        >>> code_execution(
        ...     prompts=["Write square(x)."] * 3,
        ...     completions=[
        ...         "```python\\ndef square(x):\\n    return x * x\\n```",
        ...         "```python\\ndef square(x):\\n    return x + x\\n```",
        ...         "```python\\ndef square(x) return x\\n```",
        ...     ],
        ...     tests=["assert square(2) == 4\\nassert square(3) == 9"] * 3,
        ... )
        [1.0, 0.5, 0.0]
        """

        def one(sample: tuple[Any, Any]) -> float | None:
            completion, sample_tests = sample
            code = extract_code(completion_text(completion))
            return run_tests(code, sample_tests, timeout=timeout, memory_bytes=memory_bytes)

        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            return list(pool.map(one, zip(completions, tests, strict=True)))

    return code_execution


code_execution = register_reward("code_execution")(make_code_execution())
