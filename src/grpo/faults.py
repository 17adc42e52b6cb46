"""What a training run does when it is stopped or something goes wrong.

- **Stop signals** (SIGTERM from ``docker stop``, Kubernetes, systemd or Slurm
  preemption; SIGHUP when the terminal goes; SIGINT from Ctrl-C): the current step
  finishes, a checkpoint is saved and the run returns with a message. A second signal
  aborts at once (``KeyboardInterrupt``).
- **An error inside the loop**: the last complete step is saved before the error goes on
  (when the failing step had not yet changed the weights, its prompt draw and RNG are
  rewound first, so the checkpoint is exactly the end of the previous step).
- **The save clock**: besides every ``run.save_every`` steps, a checkpoint after any step
  that ends ``run.save_every_minutes`` after the last one, so ``kill -9`` loses minutes.
- **Non-finite steps**: an optimizer step whose loss or gradient norm is not finite is
  skipped; ``optim.max_nonfinite_steps`` in a row stop the run with a checkpoint of the
  last good weights.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grpo import checkpoint as ckpt
from grpo.errors import NonFiniteError

STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class StopFlag:
    """Set by the first stop signal; ``signum`` says which."""

    signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@contextlib.contextmanager
def stop_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[StopFlag]:
    """Turn the first of ``signals`` into a flag the loop checks between steps (so the
    checkpoint it saves holds a whole step); a second one raises KeyboardInterrupt.
    Off the main thread, where handlers cannot be installed, the flag never rises."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag:
            raise KeyboardInterrupt(f"second stop signal ({signal.Signals(signum).name})")
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class NonFiniteGuard:
    """Decides whether an optimizer step is applied: only when its loss and gradient norm
    are finite. Counts the skipped ones, and how many in a row."""

    def __init__(self, limit: int, what: str = "optimizer step"):
        self.limit = limit
        self.what = what
        self.in_a_row = 0
        self.skipped = 0
        self.last = ""

    def ok(self, loss: float, grad_norm: torch.Tensor | float) -> bool:
        norm = float(grad_norm)
        if math.isfinite(loss) and math.isfinite(norm):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        self.last = f"loss={loss}, grad_norm={norm}"
        _say(f"non-finite {self.what} ({self.last}) skipped; {self.in_a_row} in a row")
        return False

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.limit


@dataclass
class _StepStart:
    """What a step changes before its first optimizer step: the prompt draw and RNGs."""

    sampler: dict[str, int]
    generator: torch.Tensor
    rng: dict[str, Any]
    updates: int  # the scheduler's count of applied optimizer steps


@dataclass
class RunControl:
    """Signals, the save clock, save-on-error and the non-finite stop around a training
    loop. ``trainer`` has ``cfg``, ``step``, ``save()``, ``sampler``, ``generator``,
    ``scheduler`` and ``nonfinite`` (a ``NonFiniteGuard``)."""

    trainer: Any
    stop: StopFlag = field(default_factory=StopFlag)
    saved_step: int | None = None
    _last_save: float = field(default_factory=time.monotonic)
    _start: _StepStart | None = None
    _signals: Any = None

    def __enter__(self) -> RunControl:
        self._signals = stop_signals()
        self.stop = self._signals.__enter__()
        self._last_save = time.monotonic()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and issubclass(exc_type, Exception):
                self._save_after_error(exc)
        finally:
            self._signals.__exit__(None, None, None)

    # -------------------------------------------------------------- steps
    def begin_step(self) -> None:
        t = self.trainer
        self._start = _StepStart(
            t.sampler.state_dict(),
            t.generator.get_state(),
            ckpt.rng_state(getattr(getattr(t, "runtime", None), "device", None)),
            _updates(t),
        )

    def stopping(self) -> bool:
        """Whether a stop signal arrived, on any process of a torchrun run (they stop
        together, after the same step)."""
        runtime = getattr(self.trainer, "runtime", None)
        if runtime is None or not runtime.distributed:
            return bool(self.stop)
        from grpo.distributed import anywhere

        return anywhere(bool(self.stop), runtime)

    def end_step(self) -> None:
        """The step is complete: an error from here on saves it as it is."""
        self._start = None

    def checkpoint(self) -> None:
        """After a logged step: save when due (steps or clock); stop, saved, after
        ``optim.max_nonfinite_steps`` non-finite optimizer steps in a row."""
        guard = self.trainer.nonfinite
        if guard.exhausted:
            path = self.save()
            raise NonFiniteError(
                f"{guard.in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                f"norm (last: {guard.last}; optim.max_nonfinite_steps={guard.limit}); none "
                f"was applied, the last good weights are saved in {path}. Lower "
                "optim.learning_rate or check the rewards"
            )
        if self.save_due():
            self.save()

    def save_due(self) -> bool:
        run, step = self.trainer.cfg.run, self.trainer.step
        by_steps = bool(run.save_every) and step % run.save_every == 0
        minutes = run.save_every_minutes
        by_clock = bool(minutes) and time.monotonic() - self._last_save >= 60 * minutes
        runtime = getattr(self.trainer, "runtime", None)
        if by_steps or runtime is None or not runtime.distributed:
            return by_steps or by_clock
        from grpo.distributed import anywhere

        return anywhere(by_clock, runtime)  # every process saves, or none

    def save(self) -> Path:
        path = self.trainer.save()
        self.saved_step = self.trainer.step
        self._last_save = time.monotonic()
        return path

    def stop_and_save(self) -> int | None:
        """After a stop signal: save, say where, return the signal number."""
        t = self.trainer
        path = self.save() if self.saved_step != t.step else ckpt.latest_checkpoint(t.output_dir)
        _say(
            f"{self.stop.name}: stopped after step {t.step} of {t.cfg.optim.max_steps}; "
            f"checkpoint saved to {path}; continue with --resume"
        )
        return self.stop.signum

    # -------------------------------------------------------------- errors
    def _save_after_error(self, error: BaseException) -> None:
        t, start = self.trainer, self._start
        if isinstance(error, NonFiniteError):
            return  # saved already
        runtime = getattr(t, "runtime", None)
        if runtime is not None and runtime.distributed:
            _say(
                f"error in step {t.step + 1} on rank {runtime.rank}: a torchrun run saves only "
                f"with every process; the newest checkpoint is "
                f"{ckpt.latest_checkpoint(t.output_dir)}"
            )
            return
        if start is not None and _updates(t) != start.updates:
            _say(
                f"error in step {t.step + 1} after its first optimizer step: no checkpoint "
                f"of a whole step can be written; the newest is "
                f"{ckpt.latest_checkpoint(t.output_dir)}"
            )
            return
        if start is not None:  # rewind what the step drew, so the save is the step before
            t.sampler.load_state_dict(start.sampler)
            t.generator.set_state(start.generator)
            ckpt.set_rng_state(start.rng)
        if t.step == 0 or t.step == self.saved_step:
            return
        try:
            path = self.save()
        except Exception as save_error:
            _say(f"error at step {t.step + 1}; saving step {t.step} failed too: {save_error}")
            return
        _say(f"error in step {t.step + 1}: step {t.step} saved to {path} (resume with --resume)")


def _updates(trainer) -> int:
    return trainer.scheduler.last_epoch
