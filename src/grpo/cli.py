"""``grpo init | sft | eval | train | check | demo | report``.

Every command takes a local model directory or a hub id wherever it takes a model, so the
commands that run the embedded default also run a real model on a machine that has one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from grpo.errors import GRPOError, UsageError
from grpo.validate import non_negative_int, positive_float, positive_int

console = Console(stderr=True)


def _threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _model_dir(name: str, field: str = "--model") -> None:
    from grpo.validate import check_model_path

    check_model_path(name, field)


def _output_dir(path: str, field: str) -> None:
    from grpo.validate import check_output_dir

    check_output_dir(path, field)


def cmd_init(args: argparse.Namespace) -> None:
    from grpo.modeling import init_model_dir

    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else "a non-empty directory"
        raise UsageError(f"grpo init {str(out)!r}: {what} is there already; give a new path")

    sizes = {
        k: v for k, v in vars(args).items() if k in ("hidden_size", "num_layers", "num_heads") and v
    }
    path = init_model_dir(args.output, arch=args.arch, seed=args.seed, **sizes)
    console.print(f"tiny {args.arch} model and tokenizer saved to {path}")


def cmd_sft(args: argparse.Namespace) -> None:
    from grpo.hf import load_model_and_tokenizer
    from grpo.sft import warm_start
    from grpo.tasks import get_task

    _threads(args.threads)
    _task(args.task)
    _model_dir(args.model)
    _output_dir(args.output, "--output")
    task = get_task(args.task)
    model, tokenizer = load_model_and_tokenizer(args.model)
    losses = warm_start(
        model,
        tokenizer,
        task,
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        target_accuracy=args.target_accuracy,
        check_every=args.check_every,
        num_examples=args.examples,
        held_in=args.held_in,
        seed=args.seed,
        log=console.print,
    )
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    console.print(f"SFT: {len(losses)} steps, final loss {losses[-1]:.4f}; saved to {args.output}")


def cmd_eval(args: argparse.Namespace) -> None:
    from grpo.evaluation import evaluate_task, print_table
    from grpo.hf import load_model_and_tokenizer

    _threads(args.threads)
    if args.samples is not None and args.samples < args.k:
        raise UsageError(f"--samples={args.samples} is smaller than --k={args.k}; expected >= k")
    if args.data:
        return eval_data(args)
    _task(args.task)
    _model_dir(args.model)
    model, tokenizer = load_model_and_tokenizer(args.model)
    result = evaluate_task(
        model, tokenizer, args.task, args.n, args.k, args.temperature, num_samples=args.samples
    )
    print_table({Path(args.model).name: result})
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


def eval_data(args: argparse.Namespace) -> None:
    """``grpo eval --data FILE --reward SPEC``: greedy completions of your own prompts, scored
    with reward functions; accuracy is the share whose combined reward is above 0."""
    from rich.table import Table

    from grpo.config import ConfigError
    from grpo.data import load_rows
    from grpo.evaluation import reward_eval
    from grpo.hf import load_model_and_tokenizer
    from grpo.rewards import load_reward_function

    if not args.reward:
        raise ConfigError("grpo eval --data needs --reward SPEC (as in rewards.functions)")
    rows = load_rows(args.data, "--data", args.split)[: args.n]  # before the model loads
    if not rows or any(r.get(args.prompt_column) is None for r in rows):
        raise ConfigError(f"--data {args.data!r}: every row needs a {args.prompt_column!r} column")
    functions = [load_reward_function(spec) for spec in args.reward]
    _model_dir(args.model)
    model, tokenizer = load_model_and_tokenizer(args.model)
    result, warning = reward_eval(
        model, tokenizer, rows, functions, None, args.max_completion_length, args.prompt_column
    )
    result["n"] = len(rows)
    per_function = {k: v for k, v in result.items() if k.startswith("rewards/")}
    table = Table(title=f"held-out evaluation on {args.data} ({len(rows)} prompts, greedy)")
    for col in ("model", "accuracy (reward > 0)", "mean reward", *per_function):
        table.add_column(col, justify="left" if col == "model" else "right")
    table.add_row(
        Path(args.model).name,
        f"{result['accuracy']:.1%}",
        f"{result['reward']:.4g}",
        *(f"{v:.4g}" for v in per_function.values()),
    )
    console.print(table)
    if warning:
        console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


def _task(name: str) -> None:
    from grpo.tasks import TASKS

    if name not in TASKS:
        raise UsageError(f"--task={name!r}: unknown task; allowed: {', '.join(sorted(TASKS))}")


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The optional YAML file and the key=value overrides (a first word with '=' is one)."""
    if args.config and "=" in args.config:  # no file given, only overrides
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def _default_model(cfg) -> None:
    """``grpo train`` with the default model path and no model there: make the tiny one."""
    from grpo.config import ModelConfig

    default = ModelConfig.model_fields["name_or_path"].default
    if cfg.model.name_or_path == default and not Path(default).exists():
        from grpo.modeling import init_model_dir

        init_model_dir(default)
        console.print(
            f"model.name_or_path: no model at {default!r}, so a tiny random one was made there "
            "(grpo init); give model.name_or_path=PATH_OR_HUB_ID to train your own"
        )


def cmd_train(args: argparse.Namespace) -> int:
    from grpo.config import load_config
    from grpo.validate import preflight

    cfg = load_config(*_config_and_overrides(args))
    preflight_resume = args.resume is not None
    if not preflight_resume:
        _default_model(cfg)
    preflight(cfg, preflight_resume, args.resume, args.allow_config_change)
    from grpo.trainer import GRPOTrainer

    trainer = GRPOTrainer(cfg)
    main = trainer.runtime.is_main  # under torchrun, rank 0 alone speaks
    if args.resume is not None:
        step = trainer.resume(args.resume or None, args.allow_config_change)
        if main:
            console.print(f"resumed from step {step}")
    trainer.train()
    trainer.runtime.close()
    if main:
        from grpo.report import plot_run

        console.print(
            f"log: {trainer.output_dir / 'metrics.jsonl'}   "
            f"curves: {plot_run(trainer.output_dir)}   report: grpo report {trainer.output_dir}"
        )
    return 128 + trainer.stop_signal if trainer.stop_signal else 0


def cmd_check(args: argparse.Namespace) -> int:
    """Exit status 0 when the sampled batch carries a learning signal, 1 when it does not."""
    from grpo.check import check
    from grpo.config import load_config

    cfg = load_config(*_config_and_overrides(args))
    return 0 if check(cfg, show=args.show) else 1


def cmd_demo(args: argparse.Namespace) -> None:
    from grpo.demo import run_demo

    run_demo(
        Path(args.output_dir), fast=args.fast, threads=args.threads, overrides=tuple(args.overrides)
    )


def cmd_compare(args: argparse.Namespace) -> None:
    from grpo.compare import compare
    from grpo.config import load_config

    config, overrides = _config_and_overrides(args)
    arms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    out = Path(args.output_dir)
    _default_model(load_config(config, overrides))  # as each arm's grpo train would
    results = compare(config, overrides, arms, out)  # every arm's inputs checked first
    for arm, r in results.items():
        console.print(
            f"{arm:>13}: accuracy {r['accuracy_before']} -> {r['accuracy_after']}, "
            f"{r['s_per_step']:.2f} s/step, peak RSS {r['peak_rss_mb']:.0f} MB, "
            f"weights+optimizer {r['model_and_optimizer_bytes'] / 2**20:.1f} MB"
        )
    console.print(f"report: {out / 'compare.md'}  data: {out / 'compare.json'}")


def cmd_report(args: argparse.Namespace) -> None:
    from grpo.report import plot_run, write_run_report

    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        raise UsageError(
            f"grpo report {args.run_dir!r}: no metrics.jsonl there; expected a run directory"
        )
    console.print(f"report: {write_run_report(args.run_dir)}   curves: {plot_run(args.run_dir)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grpo", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="create a tiny random model with a character tokenizer")
    s.add_argument("output")
    s.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    s.add_argument("--hidden-size", type=positive_int)
    s.add_argument("--num-layers", type=positive_int)
    s.add_argument("--num-heads", type=positive_int)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("sft", help="supervised warm start on a built-in task's demonstrations")
    s.add_argument("--model", required=True)
    s.add_argument("--output", required=True)
    s.add_argument("--task", default="add2")
    s.add_argument("--steps", type=positive_int, default=300)
    s.add_argument("--batch-size", type=positive_int, default=32)
    s.add_argument("--lr", type=positive_float, default=3e-3)
    s.add_argument("--examples", type=positive_int, default=5000)
    s.add_argument(
        "--target-accuracy",
        type=float,
        help="stop once greedy accuracy on held-in train problems reaches this (e.g. 0.5)",
    )
    s.add_argument(
        "--check-every", type=positive_int, default=10, help="steps between accuracy checks"
    )
    s.add_argument(
        "--held-in",
        type=positive_int,
        default=200,
        help="train problems kept out of SFT for the checks",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=non_negative_int, default=0)
    s.set_defaults(func=cmd_sft)

    s = sub.add_parser(
        "eval", help="held-out accuracy: a built-in task (pass@k, maj@k) or --data with --reward"
    )
    s.add_argument("--model", required=True)
    s.add_argument("--task", default="add2")
    s.add_argument("--data", help="your own prompts: a file or save_to_disk directory")
    s.add_argument(
        "--reward",
        action="append",
        help="reward function for --data (repeatable), as in "
        "rewards.functions: a registered name, path/file.py:function or module:function",
    )
    s.add_argument("--split", default="test", help="split of a DatasetDict directory in --data")
    s.add_argument("--prompt-column", default="prompt")
    s.add_argument("--max-completion-length", type=positive_int, default=64)
    s.add_argument("--n", type=positive_int, default=200, help="held-out prompts")
    s.add_argument("--k", type=positive_int, default=8, help="k of pass@k and maj@k")
    s.add_argument(
        "--samples", type=positive_int, help="samples per prompt for the pass@k estimate (>= k)"
    )
    s.add_argument("--temperature", type=positive_float, default=1.0)
    s.add_argument("--json", help="also write the result to this file")
    s.add_argument("--threads", type=non_negative_int, default=0)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("train", help="GRPO from a YAML config plus key=value overrides")
    s.add_argument("config", nargs="?", help="YAML config (omit for all defaults)")
    s.add_argument("overrides", nargs="*", help="e.g. algorithm.beta=0 rollout.num_generations=16")
    s.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        help="resume (from PATH or the newest intact checkpoint)",
    )
    s.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even where the config differs from the checkpoint's (beyond max_steps)",
    )
    s.set_defaults(func=cmd_train)

    s = sub.add_parser(
        "check", help="sample and score one batch, show it and say if it can teach (no training)"
    )
    s.add_argument("config", nargs="?", help="YAML config (omit for all defaults)")
    s.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    s.add_argument("--show", type=int, default=3, help="prompts printed with their completions")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser(
        "demo", help="init -> sft -> eval -> GRPO -> eval on the built-in task, on CPU"
    )
    s.add_argument("--output-dir", default="runs/demo")
    s.add_argument("overrides", nargs="*", help="GRPO config overrides, e.g. model.device=cuda")
    s.add_argument(
        "--fast", action="store_true", help="a seconds-long smoke run (no learning expected)"
    )
    s.add_argument("--threads", type=non_negative_int, default=0)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("compare", help="train several algorithms on the same budget and report")
    s.add_argument("config", nargs="?", help="YAML config shared by every arm")
    s.add_argument("overrides", nargs="*", help="key=value overrides shared by every arm")
    s.add_argument(
        "--algorithms", default="grpo,ppo,rloo", help="arms: grpo, ppo, rloo, grpo-process"
    )
    s.add_argument("--output-dir", default="runs/compare")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser(
        "report", help="RUN_DIR/report.html (plots, config, samples) and curves.png of a run"
    )
    s.add_argument("run_dir")
    s.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; an input error (``GRPOError``) is one line on stderr and exit
    code 2 (``grpo --debug ...`` shows its traceback); a second stop signal exits 130."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # accepted anywhere on the line
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars say more
    try:
        return args.func(args) or 0
    except (GRPOError, FileNotFoundError) as err:
        if debug:
            raise
        # one line, as written (plain print: no console markup, no wrapping)
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("aborted by a second stop signal: the current step was not saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
