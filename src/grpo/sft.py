"""Supervised warm start: teacher forcing on (prompt, completion) demonstrations.

The loss covers completion tokens (and the EOS that ends them) only, never the prompt,
so the model learns what to write after a prompt, in the exact token layout GRPO samples.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from rich.progress import Progress

from grpo.data import encode_prompt
from grpo.evaluation import greedy_accuracy


def encode_example(tokenizer, prompt, completion: str) -> tuple[list[int], list[int]]:
    """(input ids, loss mask) of prompt + completion + EOS; the mask is 1 on completion tokens."""
    p = encode_prompt(tokenizer, prompt)
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + c, [0] * len(p) + [1] * len(c)


def collate(
    examples: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, ...]:
    """Right-pad a list of (ids, loss mask) into input_ids, attention_mask, labels mask [n, L]."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [n, L]
    attn = torch.zeros((len(examples), width), dtype=torch.long)  # [n, L]
    loss_mask = torch.zeros((len(examples), width))  # [n, L]
    for i, (x, m) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        attn[i, : len(x)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.float)
    return ids, attn, loss_mask


def sft_loss(model, ids: torch.Tensor, attn: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the masked (completion) tokens."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]  # [n, L-1, V]
    target = ids[:, 1:]  # [n, L-1]
    mask = loss_mask[:, 1:]  # [n, L-1]
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), target, reduction="none"
    )  # [n, L-1]
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def supervised_finetune(
    model,
    tokenizer,
    examples: Sequence[tuple[object, str]],
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    warmup_steps: int = 20,
    seed: int = 0,
    progress: bool = True,
    stop: Callable[[int], bool] | None = None,
) -> list[float]:
    """Train ``model`` on (prompt, completion) pairs for up to ``steps`` AdamW steps.

    ``stop(step)`` is asked after every step (1-based) and ends training early when it
    says so; the demo uses it to stop once held-in accuracy reaches a target. Returns the
    per-step losses.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    encoded = [encode_example(tokenizer, p, c) for p, c in examples]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)) * max(0.0, 1 - s / steps)
    )
    model.train()
    losses = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("SFT", total=steps)
        for step in range(steps):
            batch = collate(
                rng.sample(encoded, min(batch_size, len(encoded))), tokenizer.pad_token_id
            )
            loss = sft_loss(model, *(x.to(model.device) for x in batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update(task, advance=1, description=f"SFT loss {loss.item():.3f}")
            if stop is not None and stop(step + 1):
                break
    model.eval()
    return losses


def warm_start(
    model,
    tokenizer,
    task,
    max_steps: int,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    target_accuracy: float | None = None,
    check_every: int = 10,
    num_examples: int = 5000,
    held_in: int = 200,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[float]:
    """SFT on a built-in task's demonstrations, stopped once held-in accuracy reaches a target.

    ``num_examples`` train-split problems are drawn with ``seed``; with a
    ``target_accuracy`` the first ``held_in`` of them are kept out of SFT and greedy
    accuracy on them is checked every ``check_every`` steps: training stops at the first
    check that reaches the target, so the warm-started model (GRPO's reference) is right
    only part of the time, as RL needs. A step count alone would land anywhere: accuracy
    climbs from 10% to 90% within ~50 steps on ``add2``. Returns the per-step losses.
    """
    if target_accuracy is None:
        held_in = 0
    if held_in >= num_examples:
        raise ValueError(
            f"held_in={held_in} leaves no SFT examples of num_examples={num_examples}; "
            "expected held_in < num_examples"
        )
    rows = task.problems("train", num_examples, seed)
    checked, trained = rows[:held_in], rows[held_in:]
    examples = [(r["prompt"], task.demonstration(r)) for r in trained]
    correct = task.reward_functions["correctness"]

    def reached_target(step: int) -> bool:
        if target_accuracy is None or step % check_every:
            return False
        acc = greedy_accuracy(model, tokenizer, checked, correct, task.max_completion_tokens)
        log(f"SFT step {step}: held-in greedy accuracy {acc:.1%}")
        return acc >= target_accuracy

    return supervised_finetune(
        model,
        tokenizer,
        examples,
        max_steps,
        batch_size,
        learning_rate,
        seed=seed,
        progress=progress,
        stop=reached_target,
    )
