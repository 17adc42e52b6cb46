"""Which GRPO settings lift a small model on both arithmetic forms: every seed, rerunnable.

    python bench/recipe.py --out runs/recipe                     # the shipped table
    python bench/recipe.py --out runs/screen --recipes demo,small --seeds 0 --steps 100

Stages, each a ``grpo`` command in a child process (one torch thread, as on a shared CPU):

1. **Warm starts, once per task**: ``grpo init`` (the demo's ~1M Llama, seed 0) then
   ``grpo sft --target-accuracy``: SFT on the task's demonstrations, stopped when greedy
   accuracy on 200 held-in train problems reaches the target (``WARM_STARTS``), so the
   reference model is right part of the time, as a pretrained model a user brings is.
2. **GRPO**: for each recipe x task x seed, ``grpo train RECIPE.yaml`` from that warm start
   (``RECIPES``: a config file plus overrides; ``run.seed`` is the seed).
3. **Held-out evaluation** (``grpo.evaluation.evaluate_task``) of each warm start and each
   final model on the same test problems: greedy accuracy and sampled accuracy (the mean
   over ``--samples`` completions at temperature 1).

Results go to ``OUT/recipe.json`` and ``OUT/recipe.md`` (one row per run, every seed, of
this and earlier sweeps into the same directory). A finished stage is not rerun (its
output directory holds the result), so an interrupted sweep resumes; delete a directory
to redo it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

CONFIGS = resources.files("grpo") / "configs"

WARM_STARTS: dict[str, list[str]] = {
    "add2": ["--steps", "400", "--lr", "3e-3", "--target-accuracy", "0.35"],
    "add2-direct": [
        *("--steps", "2000", "--batch-size", "64", "--lr", "3e-3", "--examples", "7300"),
        *("--check-every", "50", "--target-accuracy", "0.5"),
    ],
}
"""Task -> ``grpo sft`` arguments. add2: the demo's warm start (``DemoPlan``). The direct
form is learnt far more slowly (held-in accuracy ~10% after 800 steps of 64, then a climb
as the learning rate decays), so it takes the whole train split and a longer budget."""

TASK_OVERRIDES: dict[str, list[str]] = {
    "add2": ["data.task=add2", "rewards.functions=[arithmetic_correct]"],
    "add2-direct": ["data.task=add2-direct", "rewards.functions=[arithmetic_direct_correct]"],
}
"""Task -> the overrides that point a config at it (the task and its own verifier)."""

B32 = ["rollout.prompts_per_step=32", "optim.warmup_steps=20"]

RECIPES: dict[str, tuple[str, list[str]]] = {
    "small": ("small-model.yaml", []),
    "demo": ("demo.yaml", []),
    # screened on add2-direct: the demo's config with one group of settings changed
    "lr3e-5": ("demo.yaml", ["optim.learning_rate=3e-5", "optim.warmup_steps=20"]),
    "b32-lr3e-5": ("demo.yaml", [*B32, "optim.learning_rate=3e-5"]),
    "b32-lr1e-4": ("demo.yaml", [*B32, "optim.learning_rate=1e-4"]),
    "b32-lr2e-4": ("demo.yaml", [*B32, "optim.learning_rate=2e-4"]),
    "b32-lr1e-4-beta0": ("demo.yaml", [*B32, "optim.learning_rate=1e-4", "algorithm.beta=0"]),
    "dapo-lr3e-5": (
        "demo.yaml",
        [
            "optim.learning_rate=3e-5",
            "optim.warmup_steps=20",
            "algorithm.beta=0",
            "algorithm.loss_type=token_mean",
            "algorithm.epsilon_high=0.28",
            "algorithm.dynamic_sampling=true",
        ],
    ),
}
"""Recipe -> (config in grpo/configs, extra overrides). ``small``: the shipped recipe
for small models (``b32-lr1e-4`` plus a second pass over each batch, clip-higher 0.28);
``demo``: the demo's settings."""


def grpo(args: list[str], log: Path) -> None:
    """Run ``python -m grpo.cli ARGS`` with one torch thread; raise with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "grpo.cli", *args], stdout=out, stderr=out, env=env
        )
    if done.returncode:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"grpo {' '.join(args)} failed (log {log}):\n{tail}")


def evaluate(model_dir: Path, task: str, n: int, samples: int) -> dict:
    """Held-out greedy and sampled accuracy of ``model_dir``, cached in its eval.json."""
    cache = model_dir / "eval.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    import torch

    from grpo.evaluation import evaluate_task
    from grpo.hf import load_model_and_tokenizer

    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer(model_dir)
    result = evaluate_task(model, tokenizer, task, n, k=samples, temperature=1.0)
    cache.write_text(json.dumps(result, indent=2))
    return result


def warm_start(out: Path, task: str) -> Path:
    """``grpo init`` + ``grpo sft`` for ``task`` under ``out/warm``; returns the SFT model."""
    init, sft = out / "warm" / "init", out / "warm" / task
    if not (init / "config.json").is_file():
        grpo(["init", str(init), "--hidden-size", "128", "--seed", "0"], out / "warm/init.log")
    if not (sft / "config.json").is_file():
        args = ["sft", "--model", str(init), "--output", str(sft), "--task", task]
        grpo([*args, *WARM_STARTS[task], "--threads", "1"], out / f"warm/{task}.log")
    return sft


def train(out: Path, recipe: str, task: str, seed: int, steps: int, model: Path) -> Path:
    """One ``grpo train`` run; returns its final model directory."""
    run_dir = out / "runs" / recipe / task / f"{steps}steps-seed{seed}"
    final = run_dir / "final"
    if (final / "config.json").is_file():
        return final
    config, extra = RECIPES[recipe]
    run_dir.mkdir(parents=True, exist_ok=True)
    args = ["train", str(CONFIGS / config), *TASK_OVERRIDES[task], *extra]
    args += [
        f"model.name_or_path={model}",
        f"run.output_dir={run_dir}",
        f"run.seed={seed}",
        f"optim.max_steps={steps}",
        "run.num_threads=1",
        "run.progress=false",
        "run.save_every=0",
        f"run.eval_every={max(1, steps // 4)}",
    ]
    grpo(args, run_dir / "train.log")
    return final


def _key(row: dict) -> tuple:
    return row["recipe"], row["task"], row["seed"], row["steps"]


def _earlier_rows(path: Path) -> list[dict]:
    """Rows an earlier sweep into the same directory wrote, so the table covers them too."""
    return json.loads(path.read_text()) if path.is_file() else []


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f}"


def _children_cpu_seconds() -> float:
    """CPU time (user + system) of the finished child processes: a run's cost on a shared
    machine, where wall time also counts the other users' processes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def table(rows: list[dict]) -> str:
    """Markdown: one line per run, then each recipe x task's mean change and its range."""
    lines = [
        "| recipe | task | seed | greedy before -> after | sampled before -> after "
        "| minutes (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, a = r["before"], r["after"]
        lines.append(
            f"| {r['recipe']} | {r['task']} | {r['seed']} "
            f"| {b['accuracy']:.1%} -> {a['accuracy']:.1%} "
            f"| {b['sampled_accuracy']:.1%} -> {a['sampled_accuracy']:.1%} "
            f"| {r['seconds'] / 60:.1f} ({_minutes(r.get('cpu_seconds'))}) |"
        )
    lines += ["", "| recipe | task | seeds | greedy gain, mean (min, max) | sampled gain, mean |"]
    lines.append("|---|---|---|---|---|")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["recipe"], r["task"]), []).append(r)
    for (recipe, task), runs in groups.items():
        gains = [100 * (r["after"]["accuracy"] - r["before"]["accuracy"]) for r in runs]
        sampled = [
            100 * (r["after"]["sampled_accuracy"] - r["before"]["sampled_accuracy"]) for r in runs
        ]
        lines.append(
            f"| {recipe} | {task} | {len(runs)} | {statistics.fmean(gains):+.1f} "
            f"({min(gains):+.1f}, {max(gains):+.1f}) | {statistics.fmean(sampled):+.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/recipe", help="directory for every stage's output")
    p.add_argument("--recipes", default="small", help=f"comma-separated, of {sorted(RECIPES)}")
    p.add_argument("--tasks", default="add2,add2-direct", help=f"of {sorted(WARM_STARTS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=200, help="GRPO steps per run")
    p.add_argument("--eval-prompts", type=int, default=700, help="held-out problems")
    p.add_argument("--samples", type=int, default=8, help="samples per problem (sampled acc.)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipes, tasks = args.recipes.split(","), args.tasks.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    for name in recipes:
        if name not in RECIPES:
            raise SystemExit(f"--recipes: unknown recipe {name!r}; allowed: {sorted(RECIPES)}")

    rows = _earlier_rows(out / "recipe.json")
    for task in tasks:
        model = warm_start(out, task)
        before = evaluate(model, task, args.eval_prompts, args.samples)
        print(f"warm start {task}: {before['accuracy']:.1%} greedy", flush=True)
        for recipe in recipes:
            for seed in seeds:
                start, cpu = time.perf_counter(), _children_cpu_seconds()
                final = train(out, recipe, task, seed, args.steps, model)
                seconds_file, cpu_file = final.parent / "seconds.txt", final.parent / "cpu.txt"
                if not seconds_file.is_file():
                    seconds_file.write_text(f"{time.perf_counter() - start:.1f}")
                    cpu_file.write_text(f"{_children_cpu_seconds() - cpu:.1f}")
                after = evaluate(final, task, args.eval_prompts, args.samples)
                row = {"recipe": recipe, "task": task, "seed": seed, "steps": args.steps}
                row |= {"before": before, "after": after}
                row["seconds"] = float(seconds_file.read_text())
                row["cpu_seconds"] = float(cpu_file.read_text()) if cpu_file.is_file() else None
                rows = [r for r in rows if _key(r) != _key(row)] + [row]
                print(
                    f"{recipe} {task} seed {seed}: greedy {before['accuracy']:.1%} -> "
                    f"{after['accuracy']:.1%}, sampled {before['sampled_accuracy']:.1%} -> "
                    f"{after['sampled_accuracy']:.1%} ({row['seconds'] / 60:.1f} min)",
                    flush=True,
                )
                (out / "recipe.json").write_text(json.dumps(rows, indent=2))
                (out / "recipe.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
