"""Scaling curves: seconds per step against G, completion length and prompt length, ours
and TRL's, with ``vs_trl.py``'s child-process runner (same model, prompts, seed, settings).

    /tmp/benchvenv/bin/python bench/scaling.py                 # the full sweep
    /tmp/benchvenv/bin/python bench/scaling.py --axes g --steps 1 --warmup 0   # a quick one

One axis varies at a time; the others stay at the base (4 prompts, G=8, prompt 64 tokens,
max completion 64). The base point is measured once and shared by the three axes. Each
point runs both sides one after the other (``vs_trl.compare``), each side in its own child
process; results are written to ``--out-json`` after every point, so an interrupted sweep
keeps what it measured, and the figure is redrawn from that file at the end
(``--plot-only`` redraws it without measuring).

Model: a random Llama, hidden 256, 6 layers, 4 heads, SwiGLU 688, our 101-token character
vocabulary (about 4.8M parameters), small enough for the sweep to run on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Workload
from vs_trl import compare

HERE = Path(__file__).resolve().parent
MODEL = dict(hidden_size=256, num_layers=6, num_heads=4, intermediate_size=688)
BASE = dict(prompts_per_step=4, num_generations=8, prompt_tokens=64, max_completion_length=64)
AXES: dict[str, tuple[str, str, list[int]]] = {
    # axis key: (Workload field, label, values)
    "g": ("num_generations", "G (completions per prompt)", [4, 8, 16, 32]),
    "completion": ("max_completion_length", "max completion length", [32, 64, 128, 256]),
    "prompt": ("prompt_tokens", "prompt length (tokens)", [16, 64, 256, 512]),
}


def point_name(shape: dict) -> str:
    return (
        f"B{shape['prompts_per_step']}-G{shape['num_generations']}"
        f"-P{shape['prompt_tokens']}-T{shape['max_completion_length']}"
    )


def workload(shape: dict, steps: int, warmup: int) -> Workload:
    return Workload(
        name=point_name(shape),
        **MODEL,
        max_position_embeddings=1024,  # RoPE: no parameters; covers 512 + 256
        **shape,
        num_prompts=64,
        steps=steps,
        warmup=warmup,
    )


def points(axes: list[str]) -> list[dict]:
    """Unique shapes to measure, base first, then each axis in increasing order."""
    shapes = [dict(BASE)]
    for axis in axes:
        field, _, values = AXES[axis]
        for v in values:
            shape = {**BASE, field: v}
            if shape not in shapes:
                shapes.append(shape)
    return shapes


def row(summary: dict) -> dict:
    """What the sweep keeps of one ``compare`` summary."""
    w = summary["workload"]
    b, g, p = w["prompts_per_step"], w["num_generations"], summary["prompt_tokens"]
    out = {
        "prompts_per_step": b,
        "num_generations": g,
        "prompt_tokens": p,
        "max_completion_length": w["max_completion_length"],
        "params_total": summary["params_total"],
    }
    for side in ("ours", "trl"):
        if f"{side}_s_per_step" not in summary:
            continue
        t = summary[f"{side}_completion_tokens_per_step"]
        out[side] = {
            "s_per_step": summary[f"{side}_s_per_step"],
            "best_s_per_step": summary[f"{side}_best_s_per_step"],
            "completion_tokens_per_step": t,
            "phases_s": summary[f"{side}_phases_s"],
            "peak_rss_mb": summary[f"{side}_peak_rss_mb"],
            "utilisation": summary[f"{side}_utilisation"],
        }
        # Tokens per step: unique (each prompt once per group) and as G full sequences.
        out[side]["unique_tokens_per_step"] = b * p + t
        out[side]["repeated_tokens_per_step"] = b * g * p + t
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axs = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (axis, (field, label, values)) in zip(axs, AXES.items(), strict=True):
        rows = [r for r in results["points"] if _on_axis(r, field)]
        rows.sort(key=lambda r: r[field])
        for side, style in (("ours", "o-"), ("trl", "s--")):
            xs = [r[field] for r in rows if side in r]
            ys = [r[side]["s_per_step"] for r in rows if side in r]
            if xs:
                ax.plot(xs, ys, style, label="ours" if side == "ours" else "TRL 1.16")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xticks(values)
        ax.set_xticklabels([str(v) for v in values])
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per step (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        ax.set_title(f"s/step vs {axis}")
    fig.suptitle(
        f"{results['model']}, base B=4, G=8, prompt 64, completion 64; "
        f"{results['threads']} CPU threads per side, {results['warmup']} warm-up + "
        f"{results['steps']} measured steps"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _on_axis(r: dict, field: str) -> bool:
    return all(r[k] == v for k, v in BASE.items() if k != field)


def markdown_table(results: dict) -> str:
    lines = [
        "| axis | B x G | prompt | max compl. | compl. tok/step (ours / TRL) "
        "| unique tok/step (ours) | B x G x prompt + compl. "
        "| ours s/step | TRL s/step | TRL / ours |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for axis, (field, _, values) in AXES.items():
        for v in values:
            match = [r for r in results["points"] if _on_axis(r, field) and r[field] == v]
            if not match:
                continue
            r = match[0]
            ours, trl = r.get("ours"), r.get("trl")
            if not (ours and trl):
                continue
            lines.append(
                f"| {axis} | {r['prompts_per_step']} x {r['num_generations']} "
                f"| {r['prompt_tokens']} | {r['max_completion_length']} "
                f"| {ours['completion_tokens_per_step']:.0f} / "
                f"{trl['completion_tokens_per_step']:.0f} "
                f"| {ours['unique_tokens_per_step']:.0f} | {ours['repeated_tokens_per_step']:.0f} "
                f"| {ours['s_per_step']:.2f} | {trl['s_per_step']:.2f} "
                f"| {trl['s_per_step'] / ours['s_per_step']:.2f}x |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--axes", nargs="+", choices=sorted(AXES), default=list(AXES))
    parser.add_argument("--steps", type=int, default=2, help="measured steps per point/side")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per point/side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-python", default=None)
    parser.add_argument("--workdir", default=None, help="default: a new temporary directory")
    parser.add_argument("--out-json", default=str(HERE / "scaling.json"))
    parser.add_argument("--out-png", default=str(HERE / "scaling.png"))
    parser.add_argument("--max-points", type=int, default=None, help="stop after this many")
    parser.add_argument("--plot-only", action="store_true", help="redraw from --out-json")
    args = parser.parse_args(argv)
    out_json, out_png = Path(args.out_json), Path(args.out_png)

    if not args.plot_only:
        root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scaling-"))
        results: dict = {
            "model": "Llama d=256, 6 layers, 4 heads, SwiGLU 688, char vocab",
            "model_shape": MODEL,
            "base": BASE,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": args.threads,
            "seed": args.seed,
            "points": [],
        }
        shapes = points(args.axes)[: args.max_points]
        t0 = time.perf_counter()
        for i, shape in enumerate(shapes):
            w = workload(shape, args.steps, args.warmup)
            print(f"[{i + 1}/{len(shapes)}] {w.name} ({time.perf_counter() - t0:.0f}s)", flush=True)
            run_args = argparse.Namespace(
                config=w.name,
                steps=args.steps,
                warmup=args.warmup,
                threads=args.threads,
                seed=args.seed,
                workdir=str(root / w.name),
                sides="both",
                trl_python=args.trl_python,
                precision="fp32",
            )
            results["points"].append(row(compare(w, run_args)))
            results["elapsed_s"] = time.perf_counter() - t0
            out_json.write_text(json.dumps(results, indent=1) + "\n")
            sys.stdout.flush()
    results = json.loads(out_json.read_text())
    plot(results, out_png)
    print(markdown_table(results))


if __name__ == "__main__":
    main()
