"""``grpo demo``: the embedded default, end to end on a CPU.

init (a tiny Llama with a character tokenizer) -> SFT warm start (the reference model)
-> held-out evaluation -> GRPO -> held-out evaluation, then a before/after table,
``summary.json`` and the training curves. The GRPO stage is ``configs/demo.yaml``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import yaml
from rich.console import Console

DEMO_CONFIG = resources.files("grpo") / "configs" / "demo.yaml"


@dataclass(frozen=True)
class DemoPlan:
    """The stages around the GRPO config; ``fast`` shrinks every one to a smoke test."""

    task: str = "add2"
    """Built-in task the demo trains and evaluates on."""
    hidden_size: int = 128
    """Width of the tiny Llama (4 layers, about 1M parameters)."""
    sft_max_steps: int = 400
    """Upper bound on supervised steps."""
    sft_target_accuracy: float = 0.35
    """SFT stops once greedy accuracy on 200 held-in train problems reaches this: the
    reference model is right only part of the time on purpose. Accuracy climbs from 10%
    to 90% within ~50 steps here, so a step count alone would land anywhere in between."""
    sft_check_every: int = 10
    """Steps between those accuracy checks."""
    sft_batch_size: int = 32
    sft_learning_rate: float = 3e-3
    eval_prompts: int = 200
    """Held-out prompts in the before/after evaluation."""
    eval_k: int = 8
    """Samples per prompt for pass@k and maj@k."""
    grpo_overrides: tuple[str, ...] = ()
    """``key=value`` overrides applied on top of configs/demo.yaml."""


FAST = DemoPlan(
    hidden_size=32,
    sft_max_steps=5,
    sft_check_every=5,
    eval_prompts=8,
    eval_k=2,
    grpo_overrides=(
        "optim.max_steps=2",
        "rollout.prompts_per_step=2",
        "rollout.num_generations=2",
        "run.eval_every=1",
        "run.eval_prompts=4",
    ),
)


def run_demo(
    output_dir: Path,
    fast: bool = False,
    threads: int = 0,
    plan: DemoPlan | None = None,
    overrides: tuple[str, ...] = (),
) -> dict:
    """Run every stage into ``output_dir`` and return the summary written to summary.json.

    ``overrides`` (``key=value``) apply to the GRPO config after the plan's own; the model
    is placed on ``model.device`` from the start, so the SFT stage runs there too."""
    from grpo.config import build_config
    from grpo.evaluation import evaluate_task, periodic_task_eval, print_table
    from grpo.hf import load_model_and_tokenizer
    from grpo.modeling import init_model_dir
    from grpo.report import plot_run
    from grpo.runtime import resolve_device
    from grpo.sft import warm_start
    from grpo.tasks import get_task
    from grpo.trainer import GRPOTrainer
    from grpo.validate import check_output_dir, check_rewards, training_prompts

    plan = plan or (FAST if fast else DemoPlan())
    console = Console(stderr=True)
    sft_dir, grpo_dir = output_dir / "sft", output_dir / "grpo"
    cfg = build_config(  # validated before any work: a bad override stops here
        yaml.safe_load(DEMO_CONFIG.read_text()),
        [
            f"model.name_or_path={sft_dir}",
            f"run.output_dir={grpo_dir}",
            f"data.task={plan.task}",
            *plan.grpo_overrides,
            *overrides,
        ],
    )
    # grpo train's pre-flight checks that apply before the model exists
    check_output_dir(output_dir, "--output-dir")
    check_rewards(cfg)
    training_prompts(cfg)
    device = resolve_device(cfg.model.device)
    torch.set_num_threads(threads or 1)  # a ~1M model runs fastest on one thread
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    seconds: dict[str, float] = {}

    console.rule("1/5 tiny model")
    init_dir = init_model_dir(output_dir / "init", hidden_size=plan.hidden_size)
    model, tokenizer = load_model_and_tokenizer(init_dir)
    model.to(device)
    console.print(
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters in {init_dir}"
    )

    console.rule("2/5 supervised warm start")
    t = time.perf_counter()
    losses = warm_start(
        model,
        tokenizer,
        get_task(plan.task),
        plan.sft_max_steps,
        plan.sft_batch_size,
        plan.sft_learning_rate,
        target_accuracy=plan.sft_target_accuracy,
        check_every=plan.sft_check_every,
        log=console.print,
    )
    console.print(f"SFT stopped after {len(losses)} steps")
    model.save_pretrained(sft_dir)
    tokenizer.save_pretrained(sft_dir)
    seconds["sft"] = time.perf_counter() - t

    console.rule("3/5 evaluation of the SFT model")
    t = time.perf_counter()
    before = evaluate_task(model, tokenizer, plan.task, plan.eval_prompts, plan.eval_k, 1.0)
    print_table({"SFT (reference)": before})
    seconds["eval"] = time.perf_counter() - t

    console.rule("4/5 GRPO")
    t = time.perf_counter()
    trainer = GRPOTrainer(cfg, model=model, tokenizer=tokenizer, eval_fn=periodic_task_eval(cfg))
    history = trainer.train()
    seconds["grpo"] = time.perf_counter() - t

    console.rule("5/5 evaluation after GRPO")
    t = time.perf_counter()
    after = evaluate_task(trainer.model, tokenizer, plan.task, plan.eval_prompts, plan.eval_k, 1.0)
    seconds["eval"] += time.perf_counter() - t
    print_table({"SFT (reference)": before, "after GRPO": after})

    curves = plot_run(grpo_dir)
    rewards = [h["reward"] for h in history]
    tenth = max(1, len(rewards) // 10)
    summary = {
        "before": before,
        "after": after,
        "reward_first_10pct": sum(rewards[:tenth]) / tenth,
        "reward_last_10pct": sum(rewards[-tenth:]) / tenth,
        "seconds": time.perf_counter() - start,
        "stage_seconds": seconds,
        "plan": asdict(plan),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(
        f"greedy accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%} "
        f"in {summary['seconds'] / 60:.1f} min\n"
        f"log: {grpo_dir / 'metrics.jsonl'}\ncheckpoints: {grpo_dir / 'checkpoints'}\n"
        f"final model: {grpo_dir / 'final'}\ncurves: {curves}\n"
        f"summary: {output_dir / 'summary.json'}"
    )
    return summary
