"""Code execution reward: run the completion's program against the sample's tests.

Model code is treated as an adversary. Each sample runs as two processes, each in its own
bubblewrap sandbox (``sandbox.py``: own PID, network, mount and IPC namespaces, a
read-only minimal root, a private /tmp, an empty environment, no capabilities, an
unprivileged user): the
*candidate* runs the model's program; the *judge* runs the tests and counts the passes,
asking the candidate for the program's functions and values over a pipe
(``_sandboxed.py``). Values cross as plain literals the judge rebuilds itself, so the
program cannot forge a pass: it never sees the tests' expected values, cannot reach the
judge's memory or its result pipe, and an object whose ``__eq__`` always returns True
arrives as a handle that equals only itself.

The candidate's processes together are bounded in memory and count (a cgroup, else
per-process rlimits), each in CPU seconds and file size, and all of them by the timeout;
when a sample ends, its PID namespace ends, so nothing it started keeps running. Without
bubblewrap the reward fails closed with ``SandboxUnavailable``; ``isolation="none"`` runs
the same two processes unisolated, which is UNSAFE with a policy that may write hostile code.

What a test can do with the program's values: call, index, iterate, take ``len``, ``str``,
``repr``, truth and attributes; compare only literals (None, bool, numbers, str, bytes and
tuples, lists, sets, dicts of them; subclasses such as namedtuples arrive as their base
type). A test that compares the program's own objects (a numpy array, an instance of a
class it defines) fails, and so does one that passes a function of its own to the program.
Names a test uses resolve in the test's own globals, then builtins, then the program's
globals; a module the program imported is imported again in the judge, so the program
cannot rewrite ``abs`` or ``math.isclose`` for the tests. Top-level imports of a sample's
tests also run in the program, as before.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .sandbox import ISOLATIONS, Limits, Sandbox, sandbox
from .scoring import register_reward
from .text import completion_text

DEFAULT_TIMEOUT = 5.0
"""Wall-clock seconds one sample may run (its program and all of its tests)."""
DEFAULT_MEMORY_BYTES = 1 << 30
"""Memory of the program's processes together (and address space of each): 1 GiB."""
DEFAULT_FILE_BYTES = 16 << 20
"""Largest file the program may write (RLIMIT_FSIZE): 16 MiB."""
DEFAULT_PROCESSES = 32
"""Processes and threads the program may run at once."""
DEFAULT_TMP_BYTES = 64 << 20
"""Size of the program's private /tmp, its working directory: 64 MiB."""


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
    isolation: str = "bwrap",
) -> float | None:
    """Fraction of ``tests`` that pass after running ``code``, in a sandbox (see module).

    0.0 if the code does not compile, raises, exits, or runs past ``timeout`` seconds;
    None if there are no tests. Each test runs separately: a failing assert fails one test.
    Raises ``SandboxUnavailable`` if ``isolation="bwrap"`` cannot isolate code here.
    """
    steps = split_tests(tests)
    total = sum(kind == "test" for kind, _ in steps)
    if total == 0:
        return None
    box = sandbox(isolation)
    limits = Limits(
        memory_bytes=int(memory_bytes),
        cpu_seconds=int(timeout) + 1,
        file_bytes=DEFAULT_FILE_BYTES,
        processes=DEFAULT_PROCESSES,
        tmp_bytes=DEFAULT_TMP_BYTES,
    )
    return min(_count_passes(box, {"code": code, "steps": steps}, limits, timeout), total) / total


def _count_passes(box: Sandbox, job: dict, limits: Limits, timeout: float) -> int:
    """Start the candidate and the judge, wait up to ``timeout``, read the judge's count."""
    requests, replies = os.pipe(), os.pipe()  # (read, write): judge -> candidate, and back
    open_fds = [*requests, *replies]
    rlimits = json.dumps(limits.rlimits(count_processes=box.cgroups is None))
    # Model code may leave read-only files behind: cleanup errors must not reach the trainer.
    with tempfile.TemporaryDirectory(prefix="grpo-code-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        (root / "work").mkdir()
        (root / "job.json").write_text(json.dumps(job))
        try:
            with (
                (root / "job.json").open("rb") as job_file,
                (root / "candidate.out").open("w+b") as candidate_out,
                (root / "judge.out").open("w+b") as judge_out,
                (root / "judge.err").open("w+b") as judge_err,
            ):
                with (
                    box.run(
                        [*box.python(), "candidate", str(replies[1]), rlimits],
                        limits,
                        confine=True,
                        cwd=root / "work",
                        stdin=requests[0],
                        stdout=candidate_out,
                        stderr=candidate_out,
                        pass_fds=(replies[1],),
                    ),
                    box.run(
                        [*box.python(), "judge", str(requests[1]), str(replies[0]), rlimits],
                        limits,
                        confine=False,
                        cwd=root,
                        stdin=job_file,
                        stdout=judge_out,
                        stderr=judge_err,
                        pass_fds=(requests[1], replies[0]),
                    ) as judge,
                ):
                    while open_fds:  # only the two sandboxes hold the pipes now
                        os.close(open_fds.pop())
                    finished = _wait(judge, timeout)
                # Both sandboxes have ended, with every process they started.
                verdict = _read(judge_out).splitlines()
                if finished and verdict[:1] != ["ready"]:
                    raise RuntimeError(f"code sandbox (tests) failed: {_read(judge_err)[-2000:]}")
                started = _read(candidate_out)
                if finished and not started.startswith("ready\n"):
                    raise RuntimeError(f"code sandbox (program) failed: {started[-2000:]}")
        finally:
            for fd in open_fds:
                os.close(fd)
    return int(verdict[1]) if finished and len(verdict) > 1 and verdict[1].isdigit() else 0


def _wait(process: subprocess.Popen, timeout: float) -> bool:
    """True if ``process`` exited by itself within ``timeout`` seconds."""
    try:
        process.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _read(file: Any, size: int = 1 << 16) -> str:
    file.seek(0)
    return file.read(size).decode(errors="replace")


def make_code_execution(
    timeout: float = DEFAULT_TIMEOUT,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    max_workers: int = 2,
    isolation: str = "bwrap",
) -> Callable[..., list[float | None]]:
    """A ``code_execution`` reward with its own timeout, memory limit and thread count.

    ``isolation="bwrap"`` (default) sandboxes model code and raises ``SandboxUnavailable``
    where it cannot; ``isolation="none"`` runs it without isolation: UNSAFE, for machines
    where isolation is impossible and policies that are trusted not to attack the host.
    """
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation={isolation!r}; expected one of {ISOLATIONS}")

    def code_execution(
        prompts: list, completions: list, tests: list[str] | list[list[str]], **kwargs: Any
    ) -> list[float | None]:
        """Fraction of the sample's tests that the completion's last Python block passes.

        ``tests`` holds, per sample, test code (each top-level ``assert`` is one test) or a
        list of tests. 0.0 on a syntax error, crash or timeout; None if a sample has no tests.
        Samples run ``max_workers`` at a time, each in its own sandbox.

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
            return run_tests(code, sample_tests, timeout, memory_bytes, isolation)

        sandbox(isolation)  # fail closed once, before any sample, if code cannot be isolated
        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            return list(pool.map(one, zip(completions, tests, strict=True)))

    return code_execution


code_execution = register_reward("code_execution")(make_code_execution())
