"""``grpo compare``: the seed's comparisons, measured on one task, model, seed and budget.

Each arm (an algorithm, or GRPO with process supervision) runs ``grpo train`` in its own
process, so its peak resident memory is its own. The numbers in the report are read
back from each arm's ``metrics.jsonl``; nothing is typed in by hand.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from grpo.errors import UsageError
from grpo.metrics import read_jsonl

ARMS: dict[str, dict[str, str]] = {
    "grpo": {"name": "grpo"},
    "ppo": {"name": "ppo"},
    "rloo": {"name": "rloo"},
    "grpo-process": {"name": "grpo", "advantage": "process"},
}
"""Arm name -> the ``algorithm`` settings that select it (``grpo-process``: eq. V.I)."""

PHASES = {
    "generation": ("time/generation",),
    "scoring_and_reference": ("time/scoring", "time/old_logp", "time/reference", "time/advantages"),
    "update": ("time/update",),
}
"""The comparison's three phases of a step, from the trainer's ``time/*`` metrics."""


def arm_overrides(overrides: list[str], arm: str, output_dir: Path) -> list[str]:
    """``grpo train``'s overrides for one arm, written into ``output_dir/ARM``."""
    if arm not in ARMS:
        raise UsageError(f"--algorithms: unknown arm {arm!r}; allowed: {', '.join(ARMS)}")
    selects = [f"algorithm.{k}={v}" for k, v in ARMS[arm].items()]
    return [*overrides, *selects, f"run.output_dir={output_dir / arm}", "run.progress=false"]


def preflight_arms(config: str | None, overrides: list[str], arms: list[str], output_dir: Path):
    """``grpo train``'s pre-flight checks of every arm, before the first one starts."""
    from grpo.config import load_config
    from grpo.validate import check_output_dir, preflight

    check_output_dir(output_dir, "--output-dir")
    for arm in arms:
        preflight(load_config(config, arm_overrides(overrides, arm, output_dir)))


def run_arm(config: str | None, overrides: list[str], arm: str, output_dir: Path) -> Path:
    """Train one arm in a child process; returns its run directory."""
    cmd = [sys.executable, "-m", "grpo.cli", "train", *([config] if config else [])]
    cmd += arm_overrides(overrides, arm, output_dir)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"arm {arm!r} failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    return output_dir / arm


def summarise(run_dir: Path) -> dict:
    """The comparison's numbers for one run, from its metrics log."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in rows if "step_time" in r]
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if r.get("eval/accuracy") is not None]
    peak = max(r["memory/peak_rss_mb"] for r in steps)
    start = steps[0]["memory/rss_at_start_mb"]
    tenth = max(1, len(steps) // 10)
    return {
        "peak_rss_mb": peak,
        "training_rss_mb": peak - start,
        "model_and_optimizer_bytes": steps[-1]["memory/model_and_optimizer_bytes"],
        "trained_parameters": steps[-1]["trained_parameters"],
        "s_per_step": statistics.median(r["step_time"] for r in steps),
        **{
            f"s_{phase}": statistics.median(sum(r[k] for k in keys) for r in steps)
            for phase, keys in PHASES.items()
        },
        "accuracy_before": evals[0][1] if evals else None,
        "accuracy_after": evals[-1][1] if evals else None,
        "reward_first_10pct": statistics.fmean(r["reward"] for r in steps[:tenth]),
        "reward_last_10pct": statistics.fmean(r["reward"] for r in steps[-tenth:]),
        "accuracy_curve": evals,
        "reward_curve": [(r["step"], r["reward"]) for r in steps],
    }


HEAD = (
    "arm",
    "accuracy before -> after",
    "reward first -> last 10%",
    "s/step (gen / score+ref / update)",
    "peak RSS MB (training)",
    "weights + optimizer MB",
    "trained params",
)


def table_rows(results: dict[str, dict]) -> list[list[str]]:
    """One row of HEAD's columns per arm, formatted."""
    rows = []
    for arm, r in results.items():
        acc = (
            f"{r['accuracy_before']:.1%} -> {r['accuracy_after']:.1%}"
            if r["accuracy_before"] is not None
            else "n/a"
        )
        rows.append([
            arm,
            acc,
            f"{r['reward_first_10pct']:.3f} -> {r['reward_last_10pct']:.3f}",
            f"{r['s_per_step']:.3f} ({r['s_generation']:.3f} / "
            f"{r['s_scoring_and_reference']:.3f} / {r['s_update']:.3f})",
            f"{r['peak_rss_mb']:.0f} ({r['training_rss_mb']:.0f})",
            f"{r['model_and_optimizer_bytes'] / 2**20:.1f}",
            f"{int(r['trained_parameters']):,}",
        ])  # fmt: skip
    return rows


def write_report(results: dict[str, dict], output_dir: Path) -> Path:
    """compare.json, compare.md, compare.png and compare.html (every metric group, one line
    per arm, from the arms' own logs) in ``output_dir``; returns the Markdown path."""
    from grpo.report import html_page, html_table, plots_html, pyplot, smooth

    plt = pyplot()
    (output_dir / "compare.json").write_text(json.dumps(results, indent=2))
    fig, (acc_ax, rew_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, r in results.items():
        if r["accuracy_curve"]:
            acc_ax.plot(*zip(*r["accuracy_curve"], strict=True), "o-", label=arm)
        steps, rewards = zip(*r["reward_curve"], strict=True)
        rew_ax.plot(steps, smooth(list(rewards), max(2, len(rewards) // 10)), label=arm)
    acc_ax.set(title="held-out greedy accuracy", xlabel="training step", ylabel="accuracy")
    rew_ax.set(
        title="mean training reward (moving average)", xlabel="training step", ylabel="reward"
    )
    for ax in (acc_ax, rew_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(f"grpo compare: {output_dir}")
    fig.tight_layout()
    fig.savefig(output_dir / "compare.png", dpi=100)
    plt.close(fig)

    rows = table_rows(results)
    md = output_dir / "compare.md"
    md.write_text(
        "# grpo compare\n\n| " + " | ".join(HEAD) + " |\n" + "|---" * len(HEAD) + "|\n"
        + "\n".join("| " + " | ".join(row) + " |" for row in rows)
        + "\n\n![curves](compare.png)\n"
    )  # fmt: skip
    runs = {arm: read_jsonl(output_dir / arm / "metrics.jsonl") for arm in results}
    page = html_page(
        "grpo compare",
        f"{output_dir}: {', '.join(results)}",
        [("Summary", html_table(HEAD, rows)), ("Metrics", plots_html(runs, "grpo compare"))],
    )
    (output_dir / "compare.html").write_text(page)
    return md


def compare(config: str | None, overrides: list[str], arms: list[str], output_dir: Path) -> dict:
    """Check every arm's inputs, run every arm, then write and return the comparison."""
    preflight_arms(config, overrides, arms, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for arm in arms:
        results[arm] = summarise(run_arm(config, overrides, arm, output_dir))
    write_report(results, output_dir)
    return results
