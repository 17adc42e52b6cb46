"""Held-out evaluation: greedy accuracy, pass@k and maj@k.

pass@k uses the unbiased estimator of Chen et al. 2021 (Codex), ``1 - C(n-c, k) / C(n, k)``
from n >= k samples of which c are correct; maj@k is DeepSeekMath's majority vote: the
most frequent final answer among k samples is checked (ties go to the answer seen first).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from math import comb

import torch

from grpo.conventions import stop_token_ids
from grpo.data import AddSpecialTokens, encode_prompt
from grpo.rollout import make_engine
from grpo.types import SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """Most frequent non-None answer; ties go to the one that appears first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def _generate_texts(
    model,
    tokenizer,
    prompts: list,
    params: SamplingParams,
    seed: int,
    batch: int,
    add_special_tokens: AddSpecialTokens = "auto",
) -> list[str]:
    engine = make_engine("torch")
    generator = torch.Generator().manual_seed(seed)
    texts: list[str] = []
    for start in range(0, len(prompts), batch):
        ids = [
            encode_prompt(tokenizer, p, add_special_tokens) for p in prompts[start : start + batch]
        ]
        out = engine.generate(model, ids, params, generator)
        rows = [
            r[m.bool()].tolist()
            for r, m in zip(out.completion_ids, out.completion_mask, strict=True)
        ]
        texts += tokenizer.batch_decode(rows, skip_special_tokens=True)
    return texts


def greedy_accuracy(
    model,
    tokenizer,
    rows: Sequence[dict],
    correct_fn: Callable[..., list[float | None]],
    max_completion_length: int,
    prompt_column: str = "prompt",
    batch_prompts: int = 64,
    add_special_tokens: AddSpecialTokens = "auto",
) -> float:
    """Share of ``rows`` whose greedy completion ``correct_fn`` scores as correct
    (prompts encoded as ``encode_prompt`` does with ``add_special_tokens``)."""
    prompts = [r[prompt_column] for r in rows]
    columns = {key: [r[key] for r in rows] for key in rows[0] if key != prompt_column}
    params = _params(model, tokenizer, 1, 0.0, max_completion_length)
    texts = _generate_texts(model, tokenizer, prompts, params, 0, batch_prompts, add_special_tokens)
    return sum(bool(v) for v in correct_fn(prompts, texts, **columns)) / len(rows)


def _params(
    model, tokenizer, n: int, temperature: float, max_completion_length: int
) -> SamplingParams:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return SamplingParams(
        num_generations=n,
        temperature=temperature,
        max_completion_length=max_completion_length,
        eos_token_ids=stop_token_ids(model, tokenizer),
        pad_token_id=pad,
    )


def evaluate(
    model,
    tokenizer,
    rows: Sequence[dict],
    correct_fn: Callable[..., list[float | None]],
    answer_fn: Callable[[str], str | None],
    k: int = 8,
    num_samples: int | None = None,
    temperature: float = 1.0,
    max_completion_length: int = 64,
    seed: int = 0,
    batch_prompts: int = 64,
    prompt_column: str = "prompt",
) -> dict[str, float]:
    """Greedy accuracy, pass@k and maj@k on ``rows``.

    ``num_samples`` (n >= k, default k) completions are drawn per prompt at ``temperature``;
    pass@k is estimated from all n, maj@k votes over the first k. ``correct_fn`` is a
    reward function returning 1.0 for a correct completion; ``answer_fn`` extracts the
    final answer used for the vote.
    """
    n_s = num_samples or k
    prompts = [r[prompt_column] for r in rows]
    columns = {key: [r[key] for r in rows] for key in rows[0] if key != prompt_column}
    accuracy = greedy_accuracy(
        model, tokenizer, rows, correct_fn, max_completion_length, prompt_column, batch_prompts
    )

    sampled_params = _params(model, tokenizer, n_s, temperature, max_completion_length)
    sampled = _generate_texts(
        model, tokenizer, prompts, sampled_params, seed, max(1, batch_prompts // n_s)
    )
    rep = {key: [v for v in vals for _ in range(n_s)] for key, vals in columns.items()}
    sampled_ok = [
        bool(v) for v in correct_fn([p for p in prompts for _ in range(n_s)], sampled, **rep)
    ]

    pass_k, maj_k, mean_ok = [], [], []
    for i in range(len(rows)):
        ok = sampled_ok[i * n_s : (i + 1) * n_s]
        answers = [answer_fn(t) for t in sampled[i * n_s : i * n_s + k]]
        vote = majority_answer(answers)
        pass_k.append(pass_at_k(n_s, sum(ok), k))
        mean_ok.append(sum(ok) / n_s)
        voted_ok = vote is not None and any(
            a == vote and o for a, o in zip(answers, ok[:k], strict=True)
        )
        maj_k.append(float(voted_ok))
    n = len(rows)
    return {
        "accuracy": accuracy,
        "sampled_accuracy": sum(mean_ok) / n,
        "pass_at_k": sum(pass_k) / n,
        "maj_at_k": sum(maj_k) / n,
        "k": k,
        "n": n,
    }


def evaluate_task(
    model,
    tokenizer,
    task_name: str,
    n: int,
    k: int,
    temperature: float,
    seed: int = 0,
    num_samples: int | None = None,
) -> dict:
    """``evaluate`` on ``n`` held-out problems of a built-in task."""
    from grpo.tasks import get_task

    task = get_task(task_name)
    return evaluate(
        model,
        tokenizer,
        task.problems("test", n, seed),
        task.reward_functions["correctness"],
        task.extract_answer,
        k=k,
        num_samples=num_samples,
        temperature=temperature,
        max_completion_length=task.max_completion_tokens,
        seed=seed,
    )


def reward_eval(
    model,
    tokenizer,
    rows: Sequence[dict],
    functions: Sequence[Callable],
    weights: Sequence[float] | None,
    max_completion_length: int,
    prompt_column: str = "prompt",
    batch_prompts: int = 64,
    add_special_tokens: AddSpecialTokens = "auto",
) -> tuple[dict[str, float], str | None]:
    """Greedy completions of ``rows`` scored with reward functions (held-out data of your own).

    Returns the metrics and a warning, or None. ``accuracy`` is the share of prompts whose
    combined reward is above 0; ``reward`` the mean combined reward; ``rewards/NAME/mean``
    each function's mean. The warning says when every function scored every completion 0,
    which usually means the model answers in another format than the rewards parse.
    """
    from grpo.rewards import reward_arguments, score

    prompts = [r[prompt_column] for r in rows]
    params = _params(model, tokenizer, 1, 0.0, max_completion_length)
    texts = _generate_texts(model, tokenizer, prompts, params, 0, batch_prompts, add_special_tokens)
    # TRL's shapes: a conversational prompt's completion is [{"role": "assistant", ...}]
    prompts, completions, columns = reward_arguments(rows, prompt_column, texts, 1)
    out = score(functions, weights, prompts, completions, columns)
    metrics = {
        "accuracy": (out.rewards > 0).float().mean().item(),
        "reward": out.rewards.mean().item(),
        **{
            f"rewards/{name}/mean": out.per_function[:, j].nanmean().item()
            for j, name in enumerate(out.names)
        },
    }
    values = out.per_function[~out.per_function.isnan()]  # [scored entries]
    warning = None
    if bool((values == 0).all()):
        warning = (
            f"every one of the {len(rows)} greedy completions scored 0 on every reward function "
            f"({', '.join(out.names)}): most likely the model answers in another format than "
            f"the rewards parse (first completion: {texts[0][:80]!r})"
        )
    return metrics, warning


def periodic_task_eval(cfg, reward_functions: Sequence[Callable] | None = None) -> Callable | None:
    """The held-out evaluation ``run.eval_every`` runs, or None when it is 0.

    With ``data.eval_file`` / ``data.eval_split``: greedy completions of those prompts scored
    with the run's reward functions (``reward_eval``; loaded from ``rewards.functions`` when
    not given). Otherwise a built-in task's test problems and its correctness check (cheap:
    no sampling). Held-out data is read here, so an unreadable file fails before any model
    loads.
    """
    if not cfg.run.eval_every:
        return None
    from grpo.data import eval_rows

    rows = eval_rows(cfg.data, cfg.run.eval_prompts)
    if rows is not None:
        return _reward_eval_fn(cfg, rows, reward_functions)
    if cfg.data.train_file or cfg.data.dataset:
        return None
    from grpo.tasks import get_task

    task = get_task(cfg.data.task)
    rows = task.problems("test", cfg.run.eval_prompts, cfg.run.seed)
    correct = task.reward_functions["correctness"]

    def eval_fn(model, tokenizer) -> dict[str, float]:
        return {
            "accuracy": greedy_accuracy(
                model,
                tokenizer,
                rows,
                correct,
                task.max_completion_tokens,
                add_special_tokens=cfg.data.add_special_tokens,
            )
        }

    return eval_fn


def print_table(results: dict[str, dict]) -> None:
    """Held-out results of one or more models as a table on the console (stderr)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="held-out evaluation")
    table.add_column("model")
    for col in ("greedy accuracy", "sampled accuracy", "pass@k", "maj@k"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        table.add_row(
            name,
            *(f"{r[key]:.1%}" for key in ("accuracy", "sampled_accuracy", "pass_at_k", "maj_at_k")),
        )
    Console(stderr=True).print(table)


def _reward_eval_fn(cfg, rows: list[dict], functions: Sequence[Callable] | None) -> Callable:
    from rich.console import Console

    from grpo.rewards import load_reward_function

    if functions is None:
        functions = [load_reward_function(s) for s in cfg.rewards.functions]
    warned: list[str] = []

    def eval_fn(model, tokenizer) -> dict[str, float]:
        metrics, warning = reward_eval(
            model,
            tokenizer,
            rows,
            functions,
            cfg.rewards.weights,
            cfg.rollout.max_completion_length,
            cfg.data.prompt_column,
            add_special_tokens=cfg.data.add_special_tokens,
        )
        if warning and not warned:  # once per run: a starting model often scores 0 at first
            warned.append(warning)
            message = f"[yellow]warning:[/yellow] held-out evaluation: {warning}"
            Console(stderr=True).print(message, soft_wrap=True)
        return metrics

    return eval_fn
