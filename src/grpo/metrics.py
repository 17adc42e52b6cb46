"""Metric sinks: a JSONL log (one object per logged step) and a console progress bar.

Metric names follow TRL where the quantity is the same (``reward``, ``reward_std``,
``frac_reward_zero_std``, ``kl``, ``entropy``, ``clip_ratio/low_mean``,
``completions/mean_length``), so dashboards and habits carry over.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

CONSOLE_KEYS = ("reward", "kl", "completions/mean_length", "tokens_per_s", "eval/accuracy")


def current_rss_mb() -> float:
    """Resident memory of this process now (Linux /proc; 0 where it is unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * resource.getpagesize() / 2**20


def memory_metrics(
    models: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer], rss_at_start_mb: float
) -> dict[str, float]:
    """Peak resident memory, and the bytes held by the given models' weights and the
    optimizers' states (shared parameters counted once)."""
    params = {id(p): p for m in models for p in m.parameters()}.values()
    states = (
        t for o in optimizers for st in o.state.values() for t in st.values() if torch.is_tensor(t)
    )
    return {
        "memory/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "memory/rss_at_start_mb": rss_at_start_mb,
        "memory/model_and_optimizer_bytes": sum(p.numel() * p.element_size() for p in params)
        + sum(t.numel() * t.element_size() for t in states),
        "trained_parameters": sum(p.numel() for p in params if p.requires_grad),
    }


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


class MetricsLogger:
    """Appends each step's metrics to ``OUTPUT_DIR/metrics.jsonl`` and shows progress.

    A resumed run appends to the log, after dropping lines from steps past its checkpoint
    so the log matches the weights; a run from step 0 starts a new log.
    """

    def __init__(
        self, output_dir: str | Path, total_steps: int, start_step: int = 0, progress: bool = True
    ):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            old = read_jsonl(self.path) if start_step > 0 else []  # a fresh run starts a fresh log
            kept = [r for r in old if r.get("step", 0) <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]GRPO"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            disable=not progress,
        )
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=start_step, info=""
        )

    def __enter__(self) -> MetricsLogger:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        info = "  ".join(
            f"{k.split('/')[-1]} {row[k]:.3g}"
            for k in CONSOLE_KEYS
            if k in row and row[k] is not None
        )
        self.progress.update(self.task, completed=step, info=info)

    def advance(self, step: int) -> None:
        self.progress.update(self.task, completed=step)


def _clean(v: Any) -> Any:
    v = float(v) if hasattr(v, "item") or isinstance(v, int | float) else v
    return None if isinstance(v, float) and not math.isfinite(v) else v
