"""Run reports from the logs: ``curves.png`` and a self-contained ``report.html``.

The HTML page needs no network: every plot is a PNG inlined as base64, the style sheet
is inline, and there is no script. It shows every metric group of ``metrics.jsonl``
(reward per function, held-out evaluation, KL, entropy, clip ratios, lengths, time per
phase, memory, ...), the best and worst sampled completions at a few steps from
``samples.jsonl``, and the run's config. ``grpo compare`` builds its page from the same
parts, one line per arm.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpo.metrics import SAMPLES_FILE, prompt_text, read_jsonl, sample_columns

PANELS = (
    ("reward", "mean training reward", "reward"),
    ("eval/accuracy", "held-out greedy accuracy", "accuracy"),
    ("kl", "KL to reference (k3)", "KL per token"),
    ("completions/mean_length", "completion length", "tokens"),
)
"""curves.png: (metric, title, y-axis label) of its four panels."""


@dataclass
class Group:
    """Metrics plotted together: one panel with a title and a y-axis label."""

    title: str
    ylabel: str
    match: Callable[[str], bool]
    scale: Callable[[str, float], float] = lambda key, v: v
    keys: list[str] = field(default_factory=list)

    def label(self, key: str) -> str:
        """The legend entry of ``key``, naming a conversion ``scale`` made."""
        return key if self.scale(key, 2.0**20) == 2.0**20 else f"{key} (in MB)"


def _prefix(*prefixes: str) -> Callable[[str], bool]:
    return lambda k: k.startswith(prefixes)


def _exact(*names: str) -> Callable[[str], bool]:
    return lambda k: k in names


def _memory_mb(key: str, value: float) -> float:
    return value / 2**20 if key.endswith("_bytes") else value


def metric_groups(keys: Sequence[str]) -> list[Group]:
    """Each numeric metric in exactly one group, in reading order; metrics no rule names
    are grouped by the part of their name before the first ``/``."""
    groups = [
        Group("Training reward, combined and per function", "mean reward",
              lambda k: k == "reward" or re.fullmatch(r"rewards/.+/mean", k) is not None),
        Group("Reward spread within groups", "std / fraction",
              _exact("reward_std", "frac_reward_zero_std")),
        Group("Held-out evaluation", "accuracy / reward", _prefix("eval/")),
        Group("KL to the reference", "KL per token", lambda k: k == "kl" or k.startswith("kl/")),
        Group("Entropy of the policy", "nats per token", _exact("entropy")),
        Group("Clip ratios", "fraction of tokens clipped", _prefix("clip_ratio/")),
        Group("Loss", "loss", _exact("loss")),
        Group("Gradient norm", "global L2 norm (before clipping)", _exact("grad_norm")),
        Group("Completion lengths", "tokens",
              _exact("completions/mean_length", "completions/max_length")),
        Group("Truncated completions", "fraction of completions",
              _exact("completions/truncated_frac")),
        Group("Time per phase", "seconds per step", _prefix("time/", "step_time")),
        Group("Throughput", "completion tokens per second", _exact("tokens_per_s")),
        Group("Memory", "MB", _prefix("memory/"), _memory_mb),
        Group("Learning rate", "learning rate", _exact("learning_rate")),
    ]  # fmt: skip
    rest: dict[str, Group] = {}
    for key in keys:
        group = next((g for g in groups if g.match(key)), None)
        if group is None:
            head = key.split("/")[0]
            group = rest.setdefault(head, Group(head, head, _exact()))
        group.keys.append(key)
    return [g for g in [*groups, *rest.values()] if g.keys]


def numeric_keys(rows: list[dict]) -> list[str]:
    """Metric names with at least one number, in first-seen order (``step`` left out)."""
    seen: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                seen.setdefault(k)
    return list(seen)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return [p[0] for p in pts], [p[1] for p in pts]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (window clipped at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_group(runs: dict[str, list[dict]], group: Group, subtitle: str) -> bytes:
    """One group's panel as PNG bytes: a line per (run, metric), labelled axes and legend."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for run, rows in runs.items():
        for key in group.keys:
            steps, values = series(rows, key)
            if not steps:
                continue
            label = group.label(key) if len(runs) == 1 else f"{run}: {group.label(key)}"
            values = [group.scale(key, v) for v in values]
            ax.plot(steps, values, "o-" if len(steps) <= 30 else "-", ms=3, label=label)
    ax.set_title(f"{group.title}\n{subtitle}", fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel(group.ylabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def run_name(run_dir: Path) -> str:
    """``logging.run_name`` from the run's saved config, else the directory's name."""
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        name = ((yaml.safe_load(config.read_text()) or {}).get("logging") or {}).get("run_name")
        if name:
            return str(name)
    return run_dir.resolve().name


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write a 2x2 PNG of the run's headline curves; returns its path (default
    RUN_DIR/curves.png)."""
    plt = pyplot()
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    out = Path(out) if out else run_dir / "curves.png"
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title, ylabel) in zip(axes.flat, PANELS, strict=True):
        steps, values = series(rows, key)
        ax.set(title=title, xlabel="training step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if not steps:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            continue
        marker = "o-" if key.startswith("eval/") else "-"
        ax.plot(steps, values, marker, alpha=0.35 if marker == "-" else 1.0, label=key)
        if marker == "-" and len(values) > 5:
            window = max(2, len(values) // 10)
            ax.plot(steps, smooth(values, window), "-", color="C1", label="moving average")
        ax.legend(loc="best")
    fig.suptitle(f"{run_name(run_dir)}: {run_dir}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1400px;
       color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #666; margin-top: 0; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; border: 1px solid #ddd; padding: 4px; background: #fff; width: 576px; }
figcaption { font-size: 0.8em; color: #555; text-align: center; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: pre-wrap; font-family: ui-monospace, monospace; max-width: 40em; }
tr.best td:first-child { color: #1a7f37; } tr.worst td:first-child { color: #c0392b; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 0.85em; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return _esc(value)


def html_table(head: Sequence[str], rows: Sequence[Sequence[Any]], classes=None) -> str:
    """An HTML table; numbers right-aligned, long text kept as written."""
    out = ["<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>"]
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes else ""
        cells = []
        for v in row:
            if isinstance(v, int | float) or v is None:
                cells.append(f'<td class="num">{_num(v)}</td>')
            else:
                cells.append(f'<td class="text">{_esc(v)}</td>')
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def plots_html(runs: dict[str, list[dict]], subtitle: str) -> str:
    """Every metric group of ``runs`` as an inline PNG with a caption."""
    keys = list(dict.fromkeys(k for rows in runs.values() for k in numeric_keys(rows)))
    figures = []
    for group in metric_groups(keys):
        png = base64.b64encode(plot_group(runs, group, subtitle)).decode()
        figures.append(
            f'<figure><img alt="{_esc(group.title)}" src="data:image/png;base64,{png}">'
            f"<figcaption>{_esc(', '.join(group.keys))}</figcaption></figure>"
        )
    return '<div class="plots">' + "\n".join(figures) + "</div>"


def summary_html(rows: list[dict]) -> str:
    """First and last logged value of each metric."""
    table = []
    for key in numeric_keys(rows):
        steps, values = series(rows, key)
        table.append([key, steps[0], values[0], steps[-1], values[-1]])
    return html_table(["metric", "first step", "first value", "last step", "last value"], table)


def samples_html(samples: list[dict], steps_shown: int = 4, per_side: int = 2) -> str:
    """The best and worst completions (by combined reward) at a few evenly spaced steps."""
    if not samples:
        return "<p>No samples logged (logging.num_samples is 0, or no step was logged).</p>"
    by_step: dict[int, list[dict]] = {}
    for s in samples:
        by_step.setdefault(s["step"], []).append(s)
    steps = sorted(by_step)
    if len(steps) > steps_shown:
        last = len(steps) - 1
        steps = [steps[round(i * last / (steps_shown - 1))] for i in range(steps_shown)]
    parts = []
    for step in dict.fromkeys(steps):
        ranked = sorted(by_step[step], key=lambda s: s.get("reward", 0.0), reverse=True)
        if len(ranked) > 2 * per_side:
            picked = [("best", s) for s in ranked[:per_side]]
            picked += [("worst", s) for s in ranked[-per_side:]]
        else:
            picked = [("best" if i < (len(ranked) + 1) // 2 else "worst", s)
                      for i, s in enumerate(ranked)]  # fmt: skip
        columns = sample_columns(ranked)
        rows = []
        for rank, s in picked:
            cells = [prompt_text(s["prompt"]), s["completion"]]
            cells += [s.get("rewards", {}).get(c) for c in columns[2:-2]]
            rows.append([rank, *cells, s.get("reward"), s.get("advantage")])
        parts.append(
            f"<h3>step {step}</h3>" + html_table(["", *columns], rows, [rank for rank, _ in picked])
        )
    return "\n".join(parts)


def html_page(title: str, subtitle: str, sections: Sequence[tuple[str, str]]) -> str:
    body = "\n".join(f"<h2>{_esc(head)}</h2>\n{content}" for head, content in sections)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{STYLE}</style></head><body>"
        f'<h1>{_esc(title)}</h1><p class="meta">{_esc(subtitle)}</p>\n{body}\n</body></html>\n'
    )


def write_run_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN_DIR/report.html (or ``out``): plots, summary, samples and config."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    samples_path = run_dir / SAMPLES_FILE
    samples = read_jsonl(samples_path) if samples_path.is_file() else []
    config = run_dir / "config.yaml"
    name = run_name(run_dir)
    steps = [r["step"] for r in rows]
    subtitle = f"{run_dir}: steps {min(steps, default=0)} to {max(steps, default=0)}"
    page = html_page(
        f"{name}: GRPO run report",
        subtitle,
        [
            ("Metrics", plots_html({name: rows}, name)),
            ("Sampled completions, best and worst", samples_html(samples)),
            ("Summary", summary_html(rows)),
            ("Config", f"<pre>{_esc(config.read_text()) if config.is_file() else '-'}</pre>"),
        ],
    )
    out = Path(out) if out else run_dir / "report.html"
    out.write_text(page)
    return out
