"""Calling reward functions on a batch, checking what they return, and combining them.

A reward function is a plain callable with TRL's signature, so TRL reward functions work
unchanged::

    f(prompts: list, completions: list, **kwargs) -> list[float | None]

It is called once per batch of N completions, with keyword arguments only:

- ``prompts``: N prompts, already repeated per completion (row ``b*G + g`` is prompt b),
  each a string or, in conversational format, a list of ``{"role", "content"}`` messages;
- ``completions``: N completions, each a string or ``[{"role": "assistant", "content": ...}]``;
- every dataset column (``solution``, ``tests``, ...) as a list of N values;
- ``completion_ids``: N lists of token ids (EOS included, padding not), when the caller
  has them;
- from the trainer, as TRL's GRPOTrainer passes them: ``trainer_state`` (a
  ``transformers.TrainerState``: ``global_step`` optimizer updates done, ``max_steps``,
  ``epoch``), ``log_metric(name, value)`` (a scalar averaged into the step's metrics) and
  ``log_extra(column, values)`` (one value per completion, kept with the batch's rewards).

``score_completions`` builds these from dataset rows and decoded texts exactly as TRL 1.16
does: a prompt that is a list of chat messages is passed as that list, and its completions
as ``[{"role": "assistant", "content": text}]``; a string prompt, and its completions, as
strings.

It returns one value per completion: a float (int and bool count), or ``None`` (NaN counts
as ``None``) where the function does not apply to that sample. Functions that do not use a
column accept ``**kwargs``.

Each call has a deadline (``rewards.timeout_s``). On the main thread a watchdog thread
sends the main thread a real-time signal at the deadline (SIGALRM where there are none),
whose handler raises inside the reward function, so the call really stops (between
Python bytecodes, or out of a blocking system call; a C extension that holds the
interpreter for longer stops when it returns). A signal of its own, not SIGALRM: reward
code that times itself with ``signal.alarm`` (math-verify does) would cancel an alarm.
A worker thread with a join timeout could only stop *waiting*: Python cannot kill a
thread, so the function would run on, holding CPU and perhaps the state it mutates. Off
the main thread (where no signal can be delivered) that is what happens, and the error
says so. Functions that must be killed whatever they do belong in a separate process
(``code_execution`` runs model code that way).

Shapes: N completions in the batch (N = B * G), F reward functions.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import math
import numbers
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grpo.errors import GRPOError

RewardFunction = Callable[..., Sequence[Any]]

REWARDS: dict[str, RewardFunction] = {}
"""Built-in and registered reward functions by name; ``load_reward_function`` reads it."""

_RESERVED = ("prompts", "completions", "completion_ids")


class RewardError(GRPOError, ValueError):
    """A reward function failed, returned something unusable, or could not be loaded."""


class _Expired(BaseException):
    """Raised inside a reward function whose deadline passed. A BaseException, so that the
    function's own ``except Exception`` cannot swallow it."""


@dataclass
class RewardOutput:
    """Rewards of one batch: the weighted sum and each function's own values."""

    rewards: torch.Tensor  # [N] sum over functions of weight * value, None entries skipped
    per_function: torch.Tensor  # [N, F] each function's value, NaN where it returned None
    names: list[str]  # [F] function names, unique, in the order given
    logged_metrics: dict[str, float] = field(default_factory=dict)
    """Scalars the functions reported through ``log_metric``, each averaged over its calls."""
    extra_columns: dict[str, list] = field(default_factory=dict)
    """Per-completion values the functions reported through ``log_extra`` ([N] each)."""
    seconds: list[float] = field(default_factory=list)  # [F] each function's call time


def register_reward(name: str) -> Callable[[RewardFunction], RewardFunction]:
    """Decorator adding a reward function to ``REWARDS`` under ``name``.

    Registering a second, different function under a taken name is an error; registering
    the same function again (a module imported twice) is not.
    """

    def decorator(function: RewardFunction) -> RewardFunction:
        taken = REWARDS.get(name)
        if taken is not None and _qualified_name(taken) != _qualified_name(function):
            raise RewardError(
                f"reward name {name!r} is already registered to {_qualified_name(taken)}; "
                f"cannot register {_qualified_name(function)} under it"
            )
        REWARDS[name] = function
        return function

    return decorator


def score(
    functions: Sequence[RewardFunction],
    weights: Sequence[float] | None,
    prompts: list,
    completions: list,
    columns: dict[str, list],
    completion_ids: list[list[int]] | None = None,
    context: dict[str, Any] | None = None,
    timeout_s: float | None = None,
) -> RewardOutput:
    """Score N completions with F reward functions and combine them (TRL's nansum).

    ``rewards[n] = sum_f weights[f] * value[n, f]`` over the functions that returned a value
    for sample n; a sample for which every function returned None is an error. Each function
    is called once on the whole batch. A function that raises is called again one sample at
    a time to name the sample that makes it raise (only on that error path).

    Args:
        functions: F reward functions.
        weights: F weights, or None for all ones.
        prompts: N prompts, repeated per completion.
        completions: N completions.
        columns: dataset columns, each a list of N values, passed as keyword arguments.
        completion_ids: N token id lists, passed as ``completion_ids`` when given.
        context: keyword arguments passed to every call as they are, not per sample
            (``trainer_state``, ``log_metric``, ``log_extra``).
        timeout_s: seconds each function's call may take (None: no deadline).

    Raises:
        RewardError: naming the function, the sample index and its completion, or the
            function that missed its deadline.
    """
    if not functions:
        raise RewardError("score() needs at least one reward function, got none")
    if weights is None:
        weights = [1.0] * len(functions)
    if len(weights) != len(functions):
        raise RewardError(
            f"got {len(weights)} reward weights for {len(functions)} reward functions; "
            "give one weight per function"
        )
    n = len(completions)
    _check_batch(n, prompts, columns, completion_ids)
    kwargs = dict(columns)
    if completion_ids is not None:
        kwargs["completion_ids"] = completion_ids
    context = dict(context or {})
    clash = sorted(set(context) & (set(kwargs) | set(_RESERVED)))
    if clash:
        raise RewardError(f"context key {clash[0]!r} clashes with a dataset column or argument")

    names = _unique_names(functions)
    per_function = torch.full((n, len(functions)), math.nan)  # [N, F]
    seconds = []
    for f, function in enumerate(functions):
        start = time.perf_counter()
        values = _call(function, names[f], prompts, completions, kwargs, context, timeout_s)
        seconds.append(time.perf_counter() - start)
        per_function[:, f] = torch.tensor(values, dtype=torch.float32)  # [N]
        overflow = per_function[:, f].isinf()  # [N] finite in Python, beyond float32
        if overflow.any():
            i = int(overflow.nonzero()[0])
            raise RewardError(
                f"reward function {names[f]!r} returned {values[i]!r} for sample {i} "
                f"(completion {_preview(completions[i])}); expected a value within float32's "
                "range (about +-3.4e38)"
            )

    missing = per_function.isnan().all(dim=1)  # [N]
    if missing.any():
        i = int(missing.nonzero()[0])
        raise RewardError(
            f"sample {i} (completion {_preview(completions[i])}) got None from every reward "
            f"function ({', '.join(names)}); at least one must score each sample"
        )
    weight = torch.tensor([float(w) for w in weights])  # [F]
    rewards = (per_function * weight).nansum(dim=1)  # [N]
    return RewardOutput(rewards, per_function, names, seconds=seconds)


def _check_batch(
    n: int, prompts: list, columns: dict[str, list], completion_ids: list | None
) -> None:
    if len(prompts) != n:
        raise RewardError(
            f"got {len(prompts)} prompts for {n} completions; repeat each prompt once per "
            "completion"
        )
    for key, column in columns.items():
        if key in _RESERVED:
            raise RewardError(f"dataset column {key!r} clashes with a reward function argument")
        if len(column) != n:
            raise RewardError(f"dataset column {key!r} has {len(column)} values for {n} samples")
    if completion_ids is not None and len(completion_ids) != n:
        raise RewardError(f"got {len(completion_ids)} completion_ids for {n} completions")


_DEADLINE_SIGNAL = getattr(signal, "SIGRTMIN", None)
"""A real-time signal that nothing else uses, so a reward function that times itself with
``signal.alarm`` (math-verify does) neither cancels the deadline nor sees it (Linux)."""


def with_deadline(call: Callable[[], Any], seconds: float | None) -> Any:
    """``call()``, stopped by ``_Expired`` after ``seconds`` (None: no deadline).

    On the main thread a watchdog thread signals the main thread at the deadline and the
    handler raises inside the call (a blocking ``sleep`` or ``read`` is interrupted too),
    so it stops. Elsewhere the call runs in a daemon thread that is abandoned, still
    running, when the deadline passes.
    """
    if seconds is None:
        return call()
    if threading.current_thread() is not threading.main_thread():
        return _abandon_after(call, seconds)
    if _DEADLINE_SIGNAL is None:
        return _alarm_after(call, seconds)
    fired = threading.Event()

    def expire(signum, frame):
        if fired.is_set():
            raise _Expired

    def fire() -> None:
        fired.set()
        signal.pthread_kill(threading.main_thread().ident, _DEADLINE_SIGNAL)

    previous = signal.signal(_DEADLINE_SIGNAL, expire)
    watchdog = threading.Timer(seconds, fire)
    watchdog.daemon = True
    watchdog.start()
    try:
        return call()
    finally:
        try:  # after join the signal, if sent, was handled: restoring cannot kill us
            watchdog.cancel()
            watchdog.join()
        finally:
            signal.signal(_DEADLINE_SIGNAL, previous)


def _alarm_after(call: Callable[[], Any], seconds: float) -> Any:
    """SIGALRM where there are no real-time signals (a nested ``signal.alarm`` in the
    function replaces this deadline)."""

    def expire(signum, frame):
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return call()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _abandon_after(call: Callable[[], Any], seconds: float) -> Any:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as error:  # handed to the waiting thread
            box["error"] = error

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise _Expired("still running in its thread: only the main thread can stop it")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _call(
    function: RewardFunction,
    name: str,
    prompts: list,
    completions: list,
    kwargs: dict,
    context: dict,
    timeout_s: float | None = None,
) -> list[float]:
    """One batched call, checked: N finite floats, NaN where the function returned None."""
    n = len(completions)
    try:
        result = with_deadline(
            lambda: function(prompts=prompts, completions=completions, **kwargs, **context),
            timeout_s,
        )
    except _Expired as expired:
        note = f" ({expired})" if str(expired) else ""
        raise RewardError(
            f"reward function {name!r} did not return within rewards.timeout_s={timeout_s:g} s "
            f"on a batch of {n} completions{note}; make it faster or raise rewards.timeout_s"
        ) from None
    except Exception as error:
        i = _first_failing_sample(function, prompts, completions, kwargs, context, timeout_s)
        where = (
            f"sample {i} (completion {_preview(completions[i])})"
            if i is not None
            else "the batch (no single sample raises alone, so the sample is unknown)"
        )
        raise RewardError(
            f"reward function {name!r} raised {type(error).__name__}: {error} on {where}"
        ) from error

    if isinstance(result, torch.Tensor) or hasattr(result, "tolist"):
        if getattr(result, "ndim", 1) != 1:
            raise RewardError(
                f"reward function {name!r} returned an array of shape "
                f"{tuple(result.shape)}; expected a 1-D list of {n} floats or None"
            )
        result = result.tolist()
    if not isinstance(result, (list, tuple)):
        raise RewardError(
            f"reward function {name!r} returned {type(result).__name__}; expected a list of "
            f"{n} floats or None, one per completion"
        )
    if len(result) != n:
        i = min(len(result), n - 1)
        raise RewardError(
            f"reward function {name!r} returned {len(result)} values for {n} completions; "
            f"expected one float or None per completion (sample {i}, completion "
            f"{_preview(completions[i])}, is the first without its own value)"
        )
    return [_check_value(value, name, i, completions[i]) for i, value in enumerate(result)]


def _check_value(value: Any, name: str, i: int, completion: Any) -> float:
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()  # 0-d tensor or NumPy scalar
    if value is None:
        return math.nan
    if isinstance(value, (bool, numbers.Real)) and not math.isinf(value):
        return float(value)
    raise RewardError(
        f"reward function {name!r} returned {_preview(value)} ({type(value).__name__}) for "
        f"sample {i} (completion {_preview(completion)}); expected a finite float or None"
    )


def _first_failing_sample(
    function: RewardFunction,
    prompts: list,
    completions: list,
    kwargs: dict,
    context: dict,
    timeout_s: float | None = None,
) -> int | None:
    # the probe calls must not log anything: log_metric / log_extra discard what they get
    quiet = {k: (_discard if k in ("log_metric", "log_extra") else v) for k, v in context.items()}
    for i in range(len(completions)):
        single = {key: column[i : i + 1] for key, column in kwargs.items()}
        try:
            with_deadline(
                lambda s=single, i=i: function(
                    prompts=prompts[i : i + 1], completions=completions[i : i + 1], **s, **quiet
                ),
                timeout_s,
            )
        except (Exception, _Expired):
            return i
    return None


def _discard(*args: Any, **kwargs: Any) -> None:
    return None


def is_conversational(prompt: Any) -> bool:
    """Whether a prompt is a list of chat messages (TRL's test: a list whose first item is a
    dict with a ``role``).

    >>> is_conversational([{"role": "user", "content": "2+2?"}]), is_conversational("2+2?")
    (True, False)
    """
    return (
        isinstance(prompt, list)
        and bool(prompt)
        and isinstance(prompt[0], dict)
        and "role" in prompt[0]
    )


def reward_arguments(
    rows: Sequence[dict[str, Any]], prompt_column: str, texts: Sequence[str], group_size: int
) -> tuple[list, list, dict[str, list]]:
    """TRL's ``prompts``, ``completions`` and dataset columns for B rows and N = B * G texts.

    Row b's prompt is repeated G times; a conversational prompt stays a list of messages
    and each of its completions becomes ``[{"role": "assistant", "content": text}]``; a
    string prompt's completions stay strings. Every other column is repeated G times.

    >>> reward_arguments([{"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}],
    ...                  "prompt", ["2", "3"], 2)[1:]
    ([[{'role': 'assistant', 'content': '2'}], [{'role': 'assistant', 'content': '3'}]], \
{'answer': ['2', '2']})
    """
    if len(texts) != len(rows) * group_size:
        raise RewardError(
            f"got {len(texts)} completions for {len(rows)} prompts x {group_size} generations"
        )
    prompts = [row[prompt_column] for row in rows for _ in range(group_size)]
    completions = [
        [{"role": "assistant", "content": text}] if is_conversational(prompt) else text
        for prompt, text in zip(prompts, texts, strict=True)
    ]
    columns = {
        key: [row[key] for row in rows for _ in range(group_size)]
        for key in rows[0]
        if key != prompt_column
    }
    return prompts, completions, columns


def trainer_state(global_step: int, max_steps: int, epoch: float) -> Any:
    """The ``trainer_state`` TRL passes to reward functions: a ``transformers.TrainerState``.

    Args:
        global_step: optimizer updates done before this batch was sampled (TRL's unit).
        max_steps: optimizer updates the whole run makes.
        epoch: passes over the prompts done before this batch (fractional).
    """
    from transformers import TrainerState

    return TrainerState(global_step=global_step, max_steps=max_steps, epoch=epoch)


def score_completions(
    functions: Sequence[RewardFunction],
    weights: Sequence[float] | None,
    rows: Sequence[dict[str, Any]],
    prompt_column: str,
    texts: Sequence[str],
    completion_ids: list[list[int]],
    state: Any,
    timeout_s: float | None = None,
) -> RewardOutput:
    """Score the decoded completions of B dataset rows, calling every function as TRL's
    GRPOTrainer (1.16) does: ``prompts``, ``completions`` (see ``reward_arguments``), the
    dataset columns, ``completion_ids``, ``trainer_state``, ``log_metric`` and ``log_extra``.

    Args:
        functions, weights: as in ``score``.
        rows: the B dataset rows, in group order.
        prompt_column: the column holding the prompt.
        texts: N = B * G decoded completions (special tokens skipped); G = N / B.
        completion_ids: N token id lists, EOS included, padding not.
        state: passed as ``trainer_state`` (see ``trainer_state``).
        timeout_s: seconds each function's call may take (None: no deadline).
    """
    group_size = len(texts) // max(1, len(rows))
    prompts, completions, columns = reward_arguments(rows, prompt_column, texts, group_size)
    logged: dict[str, list[float]] = {}
    extra: dict[str, list] = {}

    def log_metric(name: str, value: float) -> None:
        logged.setdefault(name, []).append(float(value))

    def log_extra(column: str, values: list) -> None:
        extra.setdefault(column, []).extend(values)

    context = {"trainer_state": state, "log_metric": log_metric, "log_extra": log_extra}
    out = score(
        functions, weights, prompts, completions, columns, completion_ids, context, timeout_s
    )
    out.logged_metrics = {name: sum(v) / len(v) for name, v in logged.items()}
    out.extra_columns = extra
    return out


def reward_name(function: RewardFunction) -> str:
    """``__name__``, else the wrapped function's for a ``functools.partial``, else repr."""
    if isinstance(function, functools.partial):
        return reward_name(function.func)
    return getattr(function, "__name__", None) or repr(function)


def _unique_names(functions: Sequence[RewardFunction]) -> list[str]:
    names: list[str] = []
    for function in functions:
        name = base = reward_name(function)
        k = 2
        while name in names:  # the same function twice still needs two metric names
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def _qualified_name(function: Any) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', function)}"


def _preview(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_reward_function(spec: str, device: torch.device | str | None = None) -> RewardFunction:
    """Resolve a reward function from a config string.

    ``spec`` is one of:

    - a registered name: ``"math_accuracy"`` (see ``REWARDS``);
    - a file and a function in it: ``"path/to/rewards.py:my_reward"``;
    - a module and a function in it: ``"my_package.rewards:my_reward"``;
    - a learned outcome reward model: ``"model:path/to/checkpoint"`` (sequence
      classification, see ``grpo.rewards.models.OutcomeRewardModel``), placed on ``device``.

    Raises:
        RewardError: naming the spec and what was wrong with it.
    """
    if spec in REWARDS:
        return REWARDS[spec]
    if spec.startswith("model:"):
        from grpo.rewards.models import OutcomeRewardModel

        return OutcomeRewardModel(spec.removeprefix("model:"), device=device)
    source, sep, attribute = spec.rpartition(":")
    if not sep or not source or not attribute:
        raise RewardError(
            f"unknown reward function {spec!r}: not a registered name "
            f"(registered: {', '.join(sorted(REWARDS)) or 'none'}), and not of the form "
            "'path/to/file.py:function' or 'package.module:function'"
        )
    if source.endswith(".py") or "/" in source or "\\" in source:
        module = _module_from_file(spec, Path(source))
    else:
        try:
            module = importlib.import_module(source)
        except Exception as error:
            message = f"reward function {spec!r}: cannot import {source!r}"
            raise RewardError(f"{message}: {type(error).__name__}: {error}") from error
    function: Any = module
    for part in attribute.split("."):
        if not hasattr(function, part):
            raise RewardError(f"reward function {spec!r}: {source!r} has no attribute {part!r}")
        function = getattr(function, part)
    if not callable(function):
        raise RewardError(
            f"reward function {spec!r}: {attribute!r} is a {type(function).__name__}, not callable"
        )
    return function


def _module_from_file(spec: str, path: Path) -> Any:
    if not path.is_file():
        raise RewardError(f"reward function {spec!r}: file {str(path)!r} not found")
    resolved = path.resolve()
    # One module name per file: it loads once, and files with the same stem do not clash.
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    name = f"grpo_user_rewards_{resolved.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"reward function {spec!r}: cannot load {str(path)!r} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before exec, as importlib does (dataclasses, pickling)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise RewardError(
            f"reward function {spec!r}: running {str(path)!r} raised "
            f"{type(error).__name__}: {error}"
        ) from error
    return module
