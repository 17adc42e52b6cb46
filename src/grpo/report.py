"""Training curves from a run's ``metrics.jsonl``: reward, accuracy, KL and length per step."""

from __future__ import annotations

from pathlib import Path

from grpo.metrics import read_jsonl

PANELS = (
    ("reward", "mean training reward"),
    ("eval/accuracy", "held-out greedy accuracy"),
    ("kl", "KL to reference (k3)"),
    ("completions/mean_length", "completion length (tokens)"),
)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (window clipped at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write a 2x2 PNG of the run's curves; returns its path (default RUN_DIR/curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    out = Path(out) if out else run_dir / "curves.png"
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not pts:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            continue
        steps, values = zip(*pts, strict=True)
        marker = "o-" if key.startswith("eval/") else "-"
        ax.plot(steps, values, marker, alpha=0.35 if marker == "-" else 1.0)
        if marker == "-" and len(values) > 5:
            ax.plot(
                steps,
                smooth(list(values), max(2, len(values) // 10)),
                "-",
                color="C1",
                label="moving average",
            )
            ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
