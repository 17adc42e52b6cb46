"""The two processes of one ``code_execution`` sample; stdlib only, each in its own sandbox.

``candidate`` runs the model's program, then answers the judge's requests about it.
``judge`` runs the sample's tests and counts the passes: a name a test does not define is
looked up in the candidate, and every value crosses as a plain Python literal (None, bool,
int, float, complex, str, bytes, and tuples, lists, sets, frozensets, dicts of those), which
the judge rebuilds itself, or as a handle the judge can call, index, iterate, measure, print
or read attributes of. So no object of the model's runs inside the judge (an object whose
``__eq__`` is always True arrives as a handle, and a handle equals only itself), the
expected values of the tests never reach the candidate, and the pass count lives in the
judge's memory, in another process (another PID namespace when sandboxed) that model code
cannot see, signal or write to.

Requests are JSON lines on the candidate's stdin; replies are JSON lines on its fd argv[2]:
``["run", code]`` (the global names after running it), ``["exec", source]`` (the tests'
imports), ``["global", name]``, ``["getattr", h, name]``, ``["call", h, args, kwargs]``,
``["getitem", h, key]``, ``["iter", h]``, ``["next", h]``, ``["len" | "str" | "repr" |
"bool", h]`` and ``["contains", h, value]``. A reply is ``["ok", value]`` or
``["raise", exception type name, message]``.

Run as ``python -I _sandboxed.py candidate REPLY_FD LIMITS`` or
``python -I _sandboxed.py judge REQUEST_FD REPLY_FD LIMITS`` (LIMITS is JSON); the judge
reads ``{"code": ..., "steps": [[kind, source], ...]}`` on stdin and writes ``ready`` and
then the number of passed tests, one per line, on stdout.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import importlib
import json
import os
import resource
import sys
import types
from collections.abc import Callable
from typing import Any

MAX_DEPTH = 200
"""Deepest nesting of containers sent as a literal; anything deeper fails the test."""
MAX_REPLY_CHARS = 64 << 20
"""Longest reply line the judge reads; a longer one fails the test."""


# ---- values on the wire -----------------------------------------------------------------


def encode(value: Any, other: Callable[[Any], Any], depth: int = 0) -> Any:
    """``value`` as JSON: literals tagged by type, anything else as ``other(value)``.

    >>> encode((1, 0.5, {"a": [None, b"x"]}), repr)
    {'t': [{'i': '0x1'}, {'f': '0x1.0000000000000p-1'}, {'d': [['a', [None, {'b': '78'}]]]}]}
    """
    if depth > MAX_DEPTH:
        raise ValueError(f"value nested deeper than {MAX_DEPTH}")
    if value is None or value is True or value is False:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return {"i": hex(int.__index__(value))}
    if isinstance(value, float):
        return {"f": float.hex(value)}
    if isinstance(value, complex):
        return {"c": [float.hex(complex.__complex__(value).real), float.hex(value.imag)]}
    if isinstance(value, bytes):
        return {"b": bytes.hex(value)}
    items = None
    for kind, tag in ((list, None), (tuple, "t"), (set, "s"), (frozenset, "fs")):
        if isinstance(value, kind):
            items = [encode(item, other, depth + 1) for item in kind.__iter__(value)]
            return items if tag is None else {tag: items}
    if isinstance(value, dict):
        pairs = dict.items(value)
        return {"d": [[encode(k, other, depth + 1), encode(v, other, depth + 1)] for k, v in pairs]}
    return other(value)


_TAGS: dict[str, Callable[[Any, Callable[[Any], Any]], Any]] = {
    "i": lambda v, d: int(_str(v), 16),
    "f": lambda v, d: float.fromhex(_str(v)),
    "c": lambda v, d: complex(float.fromhex(_str(v[0])), float.fromhex(_str(v[1]))),
    "b": lambda v, d: bytes.fromhex(_str(v)),
    "t": lambda v, d: tuple(d(item) for item in _list(v)),
    "s": lambda v, d: {d(item) for item in _list(v)},
    "fs": lambda v, d: frozenset(d(item) for item in _list(v)),
    "d": lambda v, d: {d(_list(pair)[0]): d(_list(pair)[1]) for pair in _list(v)},
}


def decode(data: Any, handle: Callable[[int], Any], depth: int = 0) -> Any:
    """The value ``encode`` wrote, built from plain types only; ``handle(id)`` for a handle.

    >>> decode({"t": [{"i": "-0x2"}, {"f": "nan"}, ["s"]]}, None)
    (-2, nan, ['s'])
    """
    if depth > MAX_DEPTH:
        raise ValueError(f"value nested deeper than {MAX_DEPTH}")
    if data is None or type(data) in (bool, str):
        return data
    if type(data) is list:
        return [decode(item, handle, depth + 1) for item in data]
    if type(data) is dict and len(data) == 1:
        ((tag, payload),) = data.items()
        if tag == "h" and type(payload) is int:
            return handle(payload)
        if tag in _TAGS:
            return _TAGS[tag](payload, lambda item: decode(item, handle, depth + 1))
    raise ValueError(f"not an encoded value: {str(data)[:80]}")


def _str(value: Any) -> str:
    if type(value) is not str:
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def _list(value: Any) -> list:
    if type(value) is not list:
        raise ValueError(f"expected a list, got {type(value).__name__}")
    return value


def set_limits(limits: dict[str, int]) -> None:
    """Lower this process's resource limits (inherited by everything it starts)."""
    for name, value in [
        ("RLIMIT_AS", limits["memory"]),
        ("RLIMIT_CPU", limits["cpu"]),
        ("RLIMIT_FSIZE", limits["fsize"]),
        ("RLIMIT_NPROC", limits["nproc"]),
        ("RLIMIT_CORE", 0),
    ]:
        if value < 0:
            continue
        limit = getattr(resource, name)
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))


def _silence_output() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)


# ---- the candidate: the model's program ---------------------------------------------------


def candidate(reply_fd: int, limits: dict[str, int]) -> None:
    """Run the model's program on the judge's requests until stdin closes."""
    set_limits(limits)
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    replies = os.fdopen(reply_fd, "w", encoding="utf-8")
    print("ready", flush=True)
    _silence_output()
    namespace: dict[str, Any] = {"__name__": "completion"}
    handles: list[Any] = []

    def keep(value: Any) -> dict[str, int]:
        handles.append(value)
        return {"h": len(handles) - 1}

    for line in requests:
        try:
            value = _answer(json.loads(line), namespace, handles)
            try:
                reply = ["ok", encode(value, keep)]
            except (ValueError, RecursionError):
                reply = ["ok", keep(value)]
        except BaseException as error:  # the model's exceptions, SystemExit included
            reply = ["raise", type(error).__name__, _message(error)]
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def _message(error: BaseException) -> str:
    try:
        return str(error)[:500]
    except BaseException:
        return ""


def _answer(request: list, namespace: dict[str, Any], handles: list[Any]) -> Any:
    op, *args = request
    if op == "run":
        exec(compile(args[0], "<completion>", "exec"), namespace)
        return [
            [name, value.__name__ if isinstance(value, types.ModuleType) else None]
            for name, value in namespace.items()
            if not name.startswith("__")
        ]
    if op == "exec":
        exec(compile(args[0], "<setup>", "exec"), namespace)
        return None
    if op == "global":
        if args[0] not in namespace:
            raise NameError(f"name {args[0]!r} is not defined")
        return namespace[args[0]]

    def value(data: Any) -> Any:
        return decode(data, handles.__getitem__)

    target = handles[args[0]]
    if op == "getattr":
        return getattr(target, args[1])
    if op == "call":
        return target(*value(args[1]), **{k: value(v) for k, v in args[2]})
    if op == "getitem":
        return target[value(args[1])]
    if op == "contains":
        return value(args[1]) in target
    unary = {"iter": iter, "next": next, "len": len, "str": str, "repr": repr, "bool": bool}
    return unary[op](target)


# ---- the judge: the sample's tests ---------------------------------------------------------


class CandidateError(Exception):
    """The program raised something the judge does not re-raise as is, or stopped answering."""


class Remote:
    """The judge's end of the pipes to the candidate."""

    def __init__(self, request_fd: int, reply_fd: int) -> None:
        self.requests = os.fdopen(request_fd, "w", encoding="utf-8")
        self.replies = os.fdopen(reply_fd, "r", encoding="utf-8", errors="replace")

    def ask(self, *request: Any) -> Any:
        try:
            self.requests.write(json.dumps(request) + "\n")
            self.requests.flush()
        except OSError as error:
            raise CandidateError("the program stopped answering") from error
        line = self.replies.readline(MAX_REPLY_CHARS)
        if not line.endswith("\n"):
            raise CandidateError("the program stopped answering")
        reply = json.loads(line)
        if type(reply) is list and len(reply) == 2 and reply[0] == "ok":
            return decode(reply[1], lambda handle: Handle(self, handle))
        if type(reply) is list and len(reply) == 3 and reply[0] == "raise":
            raise _exception(str(reply[1]), str(reply[2]))
        raise CandidateError("the program sent a malformed reply")

    def send(self, value: Any) -> Any:
        def other(item: Any) -> dict[str, int]:
            if isinstance(item, Handle):
                return {"h": item._handle}
            raise TypeError(f"cannot pass a {type(item).__name__} to the program")

        return encode(value, other)


def _exception(name: str, message: str) -> Exception:
    """A builtin exception of the same type, so a test's ``except ValueError`` works."""
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:
            pass
    return CandidateError(f"{name}: {message}")


class Handle:
    """An object that stays in the candidate; equal only to itself."""

    __slots__ = ("_handle", "_remote")

    def __init__(self, remote: Remote, handle: int) -> None:
        self._remote = remote
        self._handle = handle

    def _ask(self, op: str, *args: Any) -> Any:
        return self._remote.ask(op, self._handle, *args)

    def __getattr__(self, name: str) -> Any:
        return self._ask("getattr", name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        send = self._remote.send
        return self._ask("call", [send(a) for a in args], [[k, send(v)] for k, v in kwargs.items()])

    def __getitem__(self, key: Any) -> Any:
        return self._ask("getitem", self._remote.send(key))

    def __contains__(self, item: Any) -> bool:
        return self._ask("contains", self._remote.send(item))

    def __iter__(self) -> Handle:
        return self._ask("iter")

    def __next__(self) -> Any:
        return self._ask("next")

    def __len__(self) -> int:
        return self._ask("len")

    def __bool__(self) -> bool:
        return self._ask("bool")

    def __str__(self) -> str:
        return self._ask("str")

    def __repr__(self) -> str:
        return self._ask("repr")


class TestGlobals(dict):
    """The tests' globals: their own names, then builtins, then the program's names.

    The program cannot shadow a builtin a test uses (``abs``, ``len``, ``isinstance``), and
    a module it imported is imported again here, so a test's ``math.isclose`` is never the
    program's.
    """

    def __init__(self, remote: Remote, names: dict[str, str | None]) -> None:
        super().__init__(__name__="tests")
        self.remote = remote
        self.names = names

    def __missing__(self, name: str) -> Any:
        if name not in self.names or hasattr(builtins, name):
            raise KeyError(name)  # then Python looks in builtins
        if self.names[name] is not None:
            with contextlib.suppress(Exception):
                self[name] = importlib.import_module(self.names[name])
                return self[name]
        return self.remote.ask("global", name)


def judge(request_fd: int, reply_fd: int, limits: dict[str, int]) -> None:
    """Run the tests of the job on stdin against the candidate; print the pass count."""
    set_limits(limits)
    job = json.load(sys.stdin)
    result = os.dup(1)
    os.write(result, b"ready\n")
    _silence_output()
    os.write(result, b"%d\n" % count_passes(Remote(request_fd, reply_fd), job))


def count_passes(remote: Remote, job: dict) -> int:
    """Tests that run without an exception; none if the program raises or a setup step fails."""
    try:
        names = remote.ask("run", job["code"])
    except BaseException:
        return 0
    try:
        tests = TestGlobals(remote, {_str(name): module for name, module in _list(names)})
    except (TypeError, ValueError):
        return 0
    passed = 0
    for kind, source in job["steps"]:
        try:
            code = compile(source, "<test>", "exec")
            if kind == "setup" and _is_import(source):
                remote.ask("exec", source)  # the program may use what the tests import
            exec(code, tests)
        except BaseException:
            if kind == "setup":
                break
        else:
            passed += kind == "test"
    return passed


def _is_import(source: str) -> bool:
    return all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in ast.parse(source).body)


if __name__ == "__main__":
    if sys.argv[1] == "candidate":
        candidate(int(sys.argv[2]), json.loads(sys.argv[3]))
    else:
        judge(int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]))
