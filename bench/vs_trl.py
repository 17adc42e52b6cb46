"""Our GRPOTrainer against TRL's GRPOTrainer: same model directory, prompts, seed, settings.

    python bench/vs_trl.py --config tiny            # both sides, default steps
    python bench/vs_trl.py --config short --steps 4 --warmup 1
    python bench/vs_trl.py --config tiny --sides ours

The parent builds the model directory (``grpo.modeling.init_model_dir``) and a prompt file
in ``--workdir``, then runs each side in its own child process, one after the other, so
that peak RSS is per side and neither competes for the cores. Both children pin
``torch.set_num_threads(--threads)`` and seed everything with ``--seed``. Each child prints
one ``BENCH_RESULT {...}`` line; the parent prints a table and ends with one JSON line.

Matched settings: G, prompts per step, max completion length, temperature 1 (top-p 1,
top-k off), beta, epsilon 0.2, the per-completion-mean loss (TRL ``loss_type="grpo"``),
group reward scaling, mu = 1 with one optimizer step per rollout batch, AdamW
(lr, betas 0.9/0.999, no weight decay), grad clip 1.0, constant LR, fp32 and no gradient
checkpointing on both sides (TRL's defaults turn bf16 and checkpointing on: both off here).

Phase split. Ours: ``time/generation``, scoring + old-policy + reference + advantages
(``time/scoring``, ``time/old_logp``, ``time/reference``, ``time/advantages``) and
``time/update`` from ``GRPOTrainer.train_step()``. TRL: its own ``profiling_context``
timers (normally only sent to W&B/MLflow/Trackio) are captured by replacing
``ProfilingContext._log_metrics``; generation is ``transformers.generate``,
scoring+reference is the rest of ``_prepare_inputs`` (decode, rewards, reference
log-probs), update is the rest of the step (loss forward/backward, clip, optimizer).
TRL's step time is measured by a ``TrainerCallback`` from ``on_step_begin`` to
``on_step_end``.

TRL must be importable by the interpreter that runs the TRL side (``pip install -e
'.[bench]'``); ``--trl-python`` names another interpreter when this one lacks it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    COMPLETION_TOKENS,
    LORA_TARGETS,
    RESULT_MARKER,
    WORKLOADS,
    Workload,
    bench_reward,
    matmul_peak_gflops,
    peak_rss_mb,
    prepare_workdir,
    summarise,
    useful_flops,
    workload_dict,
)

ADAM_BETAS = (0.9, 0.999)  # HF Trainer's default, set on our side too
MAX_GRAD_NORM = 1.0
EPSILON = 0.2


def _seed_all(seed: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)


# ---------------------------------------------------------------- our side


def run_ours(w: Workload, setup: dict, args: argparse.Namespace) -> dict:
    import torch

    from grpo.config import build_config
    from grpo.trainer import GRPOTrainer

    _seed_all(args.seed, args.threads)
    peak = matmul_peak_gflops(precision=args.precision)
    total = args.warmup + args.steps
    cfg = build_config(
        overrides=args.ours_set,
        data={
            "model": {
                "name_or_path": setup["model_dir"],
                "dtype": "float32",
                "autocast": "bfloat16" if args.precision == "bf16" else "none",
                **({"lora": _lora_settings(w)} if w.lora_rank else {}),
            },
            "data": {"train_file": setup["prompt_file"]},
            "rollout": {
                "prompts_per_step": w.prompts_per_step,
                "num_generations": w.num_generations,
                "max_completion_length": w.max_completion_length,
                "temperature": w.temperature,
            },
            "algorithm": {"beta": w.beta, "epsilon": EPSILON, "loss_type": "grpo"},
            "optim": {
                "learning_rate": w.learning_rate,
                "adam_beta1": ADAM_BETAS[0],
                "adam_beta2": ADAM_BETAS[1],
                "max_grad_norm": MAX_GRAD_NORM,
                "max_steps": total,
            },
            "run": {
                "seed": args.seed,
                "num_threads": args.threads,
                "progress": False,
                "output_dir": str(Path(args.workdir) / "ours"),
            },
        }
    )
    trainer = GRPOTrainer(cfg, reward_functions=[bench_reward])
    matmul_dtypes = _watch_matmul_dtype(trainer.model)
    step_s, phases = [], {"generation": [], "scoring_and_reference": [], "update": []}
    m: dict = {}
    for i in range(total):
        t = time.perf_counter()
        m = trainer.train_step()
        step_s.append(time.perf_counter() - t)
        trainer.step += 1
        phases["generation"].append(m["time/generation"])
        between = ("time/scoring", "time/old_logp", "time/reference", "time/advantages")
        phases["scoring_and_reference"].append(sum(m[k] for k in between))
        phases["update"].append(m["time/update"])
        split = " / ".join(f"{v[-1]:.2f}" for v in phases.values())
        print(
            f"ours step {i}: {step_s[-1]:.3f}s ({split} gen/ref/update), "
            f"{COMPLETION_TOKENS[-1]} tokens",
            file=sys.stderr,
        )
    return {
        **summarise(step_s, COMPLETION_TOKENS, phases, args.warmup),
        "peak_rss_mb": peak_rss_mb(),
        "matmul_peak_gflops": peak,
        "threads": torch.get_num_threads(),
        "matmul_dtypes": sorted(matmul_dtypes),
        "model_and_optimizer_mb": m["memory/model_and_optimizer_bytes"] / 2**20,
        "trained_parameters": m["trained_parameters"],
        "reference_copy": trainer.reference is not None
        and trainer.reference.module is not trainer.policy.module,
    }


def _lora_settings(w: Workload) -> dict:
    return {
        "rank": w.lora_rank,
        "alpha": 2 * w.lora_rank,
        "dropout": 0.0,
        "target_modules": list(LORA_TARGETS),
    }


def _watch_matmul_dtype(model) -> set[str]:
    """The dtypes the first decoder layer's MLP output projection produces, as the run
    goes: shows whether bf16 autocast really reached the matmuls."""
    seen: set[str] = set()
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp.down_proj"))
    layer.register_forward_hook(lambda mod, args, out: seen.add(str(out.dtype)))
    return seen


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------- TRL's side


def run_trl(w: Workload, setup: dict, args: argparse.Namespace) -> dict:
    import datasets
    import torch
    import trl
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    from grpo.hf import load_model_and_tokenizer

    _seed_all(args.seed, args.threads)
    peak = matmul_peak_gflops(precision=args.precision)
    total = args.warmup + args.steps
    b, g = w.prompts_per_step, w.num_generations

    timers: list[tuple[str, int, float]] = []  # (name, global_step, seconds)

    def record(self, duration: float) -> None:
        timers.append((self.name.split(".", 1)[-1], self.step, duration))

    profiling.ProfilingContext._log_metrics = record

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.step_s: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self._t)
            print(
                f"trl step {len(self.step_s) - 1}: {self.step_s[-1]:.3f}s, "
                f"{COMPLETION_TOKENS[-1]} tokens",
                file=sys.stderr,
            )

    peft_config = None
    if w.lora_rank:
        from peft import LoraConfig

        lora = _lora_settings(w)
        peft_config = LoraConfig(
            r=lora["rank"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            task_type="CAUSAL_LM",
        )
    model, tokenizer = load_model_and_tokenizer(setup["model_dir"])
    rows = [json.loads(line) for line in Path(setup["prompt_file"]).read_text().splitlines()]
    config = GRPOConfig(
        output_dir=str(Path(args.workdir) / "trl"),
        seed=args.seed,
        data_seed=args.seed,
        max_steps=total,
        per_device_train_batch_size=b * g,  # completions per optimizer step
        gradient_accumulation_steps=1,
        steps_per_generation=1,  # one rollout batch per optimizer step
        num_iterations=1,  # mu = 1
        num_generations=g,
        max_completion_length=w.max_completion_length,
        temperature=w.temperature,
        top_p=1.0,
        top_k=0,
        beta=w.beta,
        epsilon=EPSILON,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=w.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=ADAM_BETAS[0],
        adam_beta2=ADAM_BETAS[1],
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        bf16=args.precision == "bf16",  # autocast; the weights stay fp32 (checked below)
        fp16=False,
        gradient_checkpointing=False,
        use_vllm=False,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        log_completions=False,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[bench_reward],
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[timer],
        peft_config=peft_config,
    )
    dtypes = {str(p.dtype) for p in trainer.model.parameters()}
    if trainer.ref_model is not None:
        dtypes |= {str(p.dtype) for p in trainer.ref_model.parameters()}
    if dtypes != {"torch.float32"} or trainer.args.gradient_checkpointing:
        raise RuntimeError(f"TRL side not fp32/no-checkpointing: {dtypes}")
    matmul_dtypes = _watch_matmul_dtype(trainer.model)
    trainer.train()

    def per_step(name: str) -> list[float]:
        out = [0.0] * total
        for n, step, seconds in timers:
            if n == name and step < total:
                out[step] += seconds
        return out

    models = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    states = [
        t for st in trainer.optimizer.state.values() for t in st.values() if torch.is_tensor(t)
    ]
    generate = per_step("transformers.generate")
    prepare = per_step("_prepare_inputs")
    phases = {
        "generation": generate,
        "scoring_and_reference": [p - gen for p, gen in zip(prepare, generate, strict=True)],
        "update": [s - p for s, p in zip(timer.step_s, prepare, strict=True)],
    }
    return {
        **summarise(timer.step_s, COMPLETION_TOKENS, phases, args.warmup),
        "peak_rss_mb": peak_rss_mb(),
        "matmul_peak_gflops": peak,
        "threads": torch.get_num_threads(),
        "trl_version": trl.__version__,
        "matmul_dtypes": sorted(matmul_dtypes),
        "model_and_optimizer_mb": (
            _bytes(p for m in models for p in m.parameters()) + _bytes(states)
        )
        / 2**20,
        "trained_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "reference_copy": trainer.ref_model is not None,
    }


# ---------------------------------------------------------------- the parent


def _child(side: str, setup_file: Path, args: argparse.Namespace) -> dict:
    python = args.trl_python if side == "trl" and args.trl_python else sys.executable
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--child",
        side,
        "--setup",
        str(setup_file),
        *(["--config", args.config] if args.config in WORKLOADS else []),
        *("--steps", str(args.steps), "--warmup", str(args.warmup)),
        *("--threads", str(args.threads), "--seed", str(args.seed), "--workdir", args.workdir),
        *("--precision", args.precision),
        *(f"--ours-set={kv}" for kv in args.ours_set),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:])
        raise SystemExit(f"{side} side failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_MARKER) :])


def _add_flops(result: dict, w: Workload, setup: dict, warmup: int) -> None:
    """Useful FLOPs per step from that step's completion tokens; utilisation is the median
    over measured steps of useful FLOP/s divided by the matmul peak."""

    def flops(tokens: int) -> float:
        return useful_flops(
            setup["params_non_embedding"],
            setup["prompt_tokens"],
            tokens,
            w.prompts_per_step,
            w.beta > 0,
        )

    steps = list(zip(result["all_tokens"], result["all_step_s"], strict=True))[warmup:]
    peak = result["matmul_peak_gflops"] * 1e9
    result["useful_gflop_per_step"] = statistics.mean(flops(n) for n, _ in steps) / 1e9
    result["utilisation"] = statistics.median(flops(n) / s / peak for n, s in steps)


def _print_table(w: Workload, setup: dict, results: dict[str, dict]) -> None:
    print(
        f"\n{w.name}: {setup['params_total'] / 1e6:.2f}M params "
        f"(N={setup['params_non_embedding'] / 1e6:.2f}M for FLOPs, vocab {setup['vocab_size']}), "
        f"B={w.prompts_per_step} x G={w.num_generations}, prompt {setup['prompt_tokens']} tok, "
        f"max completion {w.max_completion_length}, beta {w.beta}"
    )
    head = (
        f"{'side':5} {'s/step':>8} {'best':>8} {'tok/s':>8} {'tok/step':>8} {'gen s':>7} "
        f"{'ref+score':>9} {'update':>7} {'RSS MiB':>8} {'util':>6} {'peak GF/s':>9} "
        f"{'model+opt MiB':>13}"
    )
    print(head)
    for side, r in results.items():
        p = r["phases_s"]
        print(
            f"{side:5} {r['s_per_step']:8.3f} {r['best_s_per_step']:8.3f} {r['tokens_per_s']:8.1f} "
            f"{r['completion_tokens_per_step']:8.1f} {p['generation']:7.3f} "
            f"{p['scoring_and_reference']:9.3f} {p['update']:7.3f} {r['peak_rss_mb']:8.0f} "
            f"{r['utilisation']:6.1%} {r['matmul_peak_gflops']:9.1f} "
            f"{r['model_and_optimizer_mb']:13.0f}"
        )


def compare(w: Workload, args: argparse.Namespace) -> dict:
    """Run one workload on the requested sides (each in its own child process), print the
    table and return the summary. ``args`` carries ``steps``, ``warmup``, ``threads``,
    ``seed``, ``workdir`` (None: a new temporary directory), ``sides`` and ``trl_python``;
    a workload that is not one of ``WORKLOADS`` reaches the children through the setup
    file."""
    args.workdir = args.workdir or tempfile.mkdtemp(prefix=f"bench-{w.name}-")
    setup = prepare_workdir(w, Path(args.workdir), args.seed)
    setup_file = Path(args.workdir) / "setup.json"
    setup_file.write_text(json.dumps({**setup, "workload": workload_dict(w)}))
    sides = ["ours", "trl"] if args.sides == "both" else [args.sides]
    results = {}
    for side in sides:
        results[side] = _child(side, setup_file, args)
    # One peak for both sides: the best either child measured (contention only lowers it).
    peak = max(r["matmul_peak_gflops"] for r in results.values())
    for r in results.values():
        r["matmul_peak_gflops"] = peak
        _add_flops(r, w, setup, args.warmup)
    _print_table(w, setup, results)

    summary: dict = {
        "config": w.name,
        "precision": args.precision,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    for side, r in results.items():
        summary |= {
            f"{side}_s_per_step": r["s_per_step"],
            f"{side}_best_s_per_step": r["best_s_per_step"],
            f"{side}_tokens_per_s": r["tokens_per_s"],
            f"{side}_completion_tokens_per_step": r["completion_tokens_per_step"],
            f"{side}_peak_rss_mb": r["peak_rss_mb"],
            f"{side}_phases_s": r["phases_s"],
            f"{side}_utilisation": r["utilisation"],
            f"{side}_matmul_dtypes": r["matmul_dtypes"],
            f"{side}_model_and_optimizer_mb": r["model_and_optimizer_mb"],
            f"{side}_trained_parameters": r["trained_parameters"],
            f"{side}_reference_copy": r["reference_copy"],
        }
    if "ours" in results:
        summary["utilisation"] = results["ours"]["utilisation"]
        summary["matmul_peak_gflops"] = results["ours"]["matmul_peak_gflops"]
    if len(results) == 2:
        summary["ratio"] = results["ours"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
        summary["step_ratio"] = results["trl"]["s_per_step"] / results["ours"]["s_per_step"]
        print(
            f"ratio (ours / TRL tokens per s): {summary['ratio']:.2f}x; "
            f"TRL s/step / ours s/step: {summary['step_ratio']:.2f}x"
        )
    summary |= {
        "params_total": setup["params_total"],
        "params_flops": setup["params_non_embedding"],
        "prompt_tokens": setup["prompt_tokens"],
        "threads": args.threads,
        "workload": workload_dict(w),
    }
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(WORKLOADS), default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the median")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="model, prompts, outputs (default: tmp)")
    parser.add_argument("--sides", choices=["both", "ours", "trl"], default="both")
    parser.add_argument("--trl-python", default=None, help="interpreter for the TRL side")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: bfloat16 autocast on both sides (ours: model.autocast, TRL: bf16=True), "
        "weights and optimizer in fp32",
    )
    parser.add_argument(
        "--ours-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for our side only, e.g. model.fused_mlp=false (repeatable)",
    )
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        setup = json.loads(Path(args.setup).read_text())
        # A workload built from parameters (bench/scaling.py) travels in the setup file.
        w = Workload(**setup["workload"]) if "workload" in setup else WORKLOADS[args.config]
        result = (run_ours if args.child == "ours" else run_trl)(w, setup, args)
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return

    w = WORKLOADS[args.config]
    args.steps = w.steps if args.steps is None else args.steps
    args.warmup = w.warmup if args.warmup is None else args.warmup
    print(json.dumps(compare(w, args)))


if __name__ == "__main__":
    main()
