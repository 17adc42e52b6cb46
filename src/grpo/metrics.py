"""Where a run's numbers and samples go: sinks behind one small protocol.

Every run writes ``metrics.jsonl`` (one object per logged step) and shows a progress bar;
``logging.report_to`` adds TensorBoard and W&B, each imported only when chosen, and
``logging.num_samples`` keeps completions in ``samples.jsonl`` (TRL's ``log_completions``).
Only the main process writes: ``open_sinks(cfg, step, main=False)`` gives a log that
drops everything, so callers never test the rank themselves.

Metric names follow TRL where the quantity is the same (``reward``, ``reward_std``,
``frac_reward_zero_std``, ``kl``, ``entropy``, ``clip_ratio/low_mean``,
``completions/mean_length``), so dashboards and habits carry over.
"""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from grpo.errors import DataError

CONSOLE_KEYS = ("reward", "kl", "completions/mean_length", "tokens_per_s", "eval/accuracy")
SAMPLES_FILE = "samples.jsonl"


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
    """The objects of a JSONL file; a torn last line (a write cut short) is left out."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break
            raise DataError(f"{str(path)!r} line {i + 1} is not JSON: {err}") from None
    return rows


def _restart_log(path: Path, start_step: int) -> None:
    """A resumed run keeps the lines up to its checkpoint's step; a fresh run starts empty."""
    if path.exists():
        old = read_jsonl(path) if start_step > 0 else []
        kept = [r for r in old if r.get("step", 0) <= start_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _clean(v: Any) -> Any:
    v = float(v) if hasattr(v, "item") or isinstance(v, int | float) else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _plain(v: Any) -> Any:
    """A value a reward function logged, as JSON can write it (else its ``str``)."""
    if v is None or isinstance(v, str | bool | int):
        return v
    try:
        v = _clean(v)  # numbers, one-element tensors and arrays
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError, RuntimeError):
        return str(v)
    return v


class Sink(Protocol):
    """Receives each logged step: its metrics and the sampled completions kept for it."""

    def log(self, step: int, metrics: dict[str, Any], samples: list[dict]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """``OUTPUT_DIR/metrics.jsonl``: one ``{"step": ..., metric: value}`` object per step.

    A resumed run appends, after dropping lines from steps past its checkpoint so the log
    matches the weights; a run from step 0 starts a new log."""

    def __init__(self, output_dir: Path, start_step: int):
        self.path = output_dir / "metrics.jsonl"
        _restart_log(self.path, start_step)

    def log(self, step: int, metrics: dict[str, Any], samples: list[dict]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        pass


class SamplesSink:
    """``OUTPUT_DIR/samples.jsonl``: the kept completions of each logged step, one per line
    (step, prompt, completion, combined reward, each function's reward, advantage), and
    every ``print_every`` steps a small table of them on the console."""

    def __init__(self, output_dir: Path, start_step: int, console: Console, print_every: int):
        self.path = output_dir / SAMPLES_FILE
        self.console, self.print_every = console, print_every
        _restart_log(self.path, start_step)

    def log(self, step: int, metrics: dict[str, Any], samples: list[dict]) -> None:
        if not samples:
            return
        with self.path.open("a") as f:
            f.writelines(json.dumps({"step": step, **s}) + "\n" for s in samples)
        if self.print_every and step % self.print_every == 0:
            self.console.print(samples_table(step, samples))

    def close(self) -> None:
        pass


class ConsoleSink:
    """A progress bar with a few headline metrics."""

    def __init__(self, console: Console, total_steps: int, start_step: int, enabled: bool):
        self.progress = Progress(
            TextColumn("[bold]GRPO"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            disable=not enabled,
        )
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=start_step, info=""
        )
        self.progress.start()

    def log(self, step: int, metrics: dict[str, Any], samples: list[dict]) -> None:
        info = "  ".join(
            f"{k.split('/')[-1]} {metrics[k]:.3g}"
            for k in CONSOLE_KEYS
            if metrics.get(k) is not None
        )
        self.progress.update(self.task, completed=step, info=info)

    def close(self) -> None:
        self.progress.stop()


class TensorBoardSink:
    """Scalars (and the samples, as a text table) in ``OUTPUT_DIR/tensorboard``.

    ``purge_step`` makes TensorBoard drop events a crashed run wrote past the checkpoint
    this run resumed from (and, from step 0, everything an earlier run left there)."""

    def __init__(self, output_dir: Path, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "logging.report_to includes 'tensorboard', which is not installed: "
                "pip install 'grpo[tensorboard]'"
            ) from err
        purge = start_step + 1 if start_step else 0
        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: dict[str, Any], samples: list[dict]) -> None:
        for key, value in metrics.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(key, value, step)
        if samples:
            self.writer.add_text("samples", samples_markdown(samples), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Metrics and a samples table in a W&B run; offline unless ``logging.wandb_mode`` or
    ``WANDB_MODE`` says otherwise (``wandb sync OUTPUT_DIR/wandb/offline-run-*`` uploads)."""

    def __init__(self, cfg, output_dir: Path, run_name: str):
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                "logging.report_to includes 'wandb', which is not installed: "
                "pip install 'grpo[wandb]'"
            ) from err
        self.wandb = wandb
        mode = cfg.logging.wandb_mode or os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(
            project=cfg.logging.wandb_project,
            name=run_name,
            dir=str(output_dir),
            config=cfg.model_dump(),
            mode=mode,
        )

    def log(self, step: int, metrics: dict[str, Any], samples: list[dict]) -> None:
        row: dict[str, Any] = {k: v for k, v in metrics.items() if v is not None}
        if samples:
            columns = sample_columns(samples)
            data = [[_cell(s, c) for c in columns] for s in samples]
            row["samples"] = self.wandb.Table(columns=columns, data=data)
        self.run.log(row, step=step)

    def close(self) -> None:
        self.run.finish()


def sample_columns(samples: list[dict]) -> list[str]:
    """Column names of a samples table: prompt, completion, each function, reward, advantage."""
    names = list(samples[0].get("rewards", {}))
    return ["prompt", "completion", *names, "reward", "advantage"]


def _cell(sample: dict, column: str) -> Any:
    if column in sample:
        return prompt_text(sample[column]) if column == "prompt" else sample[column]
    return sample.get("rewards", {}).get(column)


def prompt_text(prompt: Any) -> str:
    """A prompt as one line of text: itself, or its chat messages' contents joined."""
    if isinstance(prompt, list):
        return " | ".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
    return str(prompt)


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else "-" if value is None else str(value)


def samples_table(step: int, samples: list[dict]):
    """The samples of one step as a rich Table."""
    from rich.table import Table

    columns = sample_columns(samples)
    table = Table(title=f"samples at step {step}", show_lines=True)
    for c in columns:
        table.add_column(c, justify="left" if c in ("prompt", "completion") else "right")
    for s in samples:
        table.add_row(*(_fmt(_cell(s, c))[:200] for c in columns))
    return table


def samples_markdown(samples: list[dict]) -> str:
    """The samples of one step as a Markdown table (TensorBoard renders text as Markdown)."""
    columns = sample_columns(samples)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for s in samples:
        cells = (_fmt(_cell(s, c)).replace("|", "\\|").replace("\n", " ") for c in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_samples(scored, batch, prompt_column: str, k: int) -> list[dict]:
    """The first ``k`` completions of a step as plain rows for the samples log.

    ``advantage`` is the completion's advantage: the same on every token for outcome
    rewards, the mean over its tokens where it varies (process supervision, PPO).
    ``extra`` holds the columns the reward functions gave TRL's ``log_extra``.
    """
    n = min(k, len(scored.texts))
    if n == 0:
        return []
    g = scored.rollout.group_size
    mask = batch.completion_mask[:n]  # [n, T]
    adv = (batch.advantages[:n] * mask).sum(1) / mask.sum(1).clamp(min=1)  # [n]
    rewards = scored.rewards.reshape(-1)[:n].tolist()  # [n]
    per_function = scored.per_function
    out = []
    for i in range(n):
        row = {"prompt": scored.rows[i // g][prompt_column], "completion": scored.texts[i]}
        if per_function is not None:
            row["rewards"] = {
                name: _clean(per_function[i, j]) for j, name in enumerate(scored.reward_names)
            }
        if scored.extra_columns:
            row["extra"] = {c: _plain(v[i]) for c, v in scored.extra_columns.items()}
        out.append({**row, "reward": rewards[i], "advantage": adv[i].item(), "group": i // g})
    return out


class RunLog:
    """The sinks of one run: ``log`` hands each one the step's metrics and samples."""

    def __init__(self, sinks: list[Sink], console: Console):
        self.sinks, self.console = sinks, console

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        for sink in self.sinks:
            sink.close()

    def log(self, step: int, metrics: dict[str, Any], samples: list[dict] | None = None) -> None:
        clean = {k: _clean(v) for k, v in metrics.items()}
        for sink in self.sinks:
            sink.log(step, clean, samples or [])


def run_name(cfg) -> str:
    """``logging.run_name``, else the output directory's name."""
    return cfg.logging.run_name or Path(cfg.run.output_dir).resolve().name


def open_sinks(cfg, start_step: int = 0, main: bool = True) -> RunLog:
    """The run's sinks, chosen once from the config; ``main=False`` (every process but the
    first in a multi-process run) gives a log that writes nothing."""
    console = Console(stderr=True, quiet=not main)  # one process speaks
    if not main:
        return RunLog([], console)
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sinks: list[Sink] = [
        JsonlSink(out, start_step),
        SamplesSink(out, start_step, console, cfg.logging.print_samples_every),
    ]
    chosen = dict.fromkeys(cfg.logging.report_to)
    if "tensorboard" in chosen:
        sinks.append(TensorBoardSink(out, start_step))
    if "wandb" in chosen:
        sinks.append(WandbSink(cfg, out, run_name(cfg)))
    sinks.append(ConsoleSink(console, cfg.optim.max_steps, start_step, cfg.run.progress))
    return RunLog(sinks, console)
