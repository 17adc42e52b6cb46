"""The optimizer and learning-rate schedule every trained module gets (policy, critic)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from grpo.config import Config


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Linear warmup from 0, then constant, linear or cosine decay to 0 over all updates."""
    o = cfg.optim
    total = o.max_steps * cfg.algorithm.num_iterations * o.num_minibatches

    def factor(s: int) -> float:
        if s < o.warmup_steps:
            return (s + 1) / o.warmup_steps
        if o.lr_scheduler == "constant":
            return 1.0
        progress = (s - o.warmup_steps) / max(1, total - o.warmup_steps)
        if o.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: Config, learning_rate: float | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with ``optim.*`` (betas, weight decay; ``learning_rate`` overrides the peak
    rate) and the run's warmup-then-decay schedule, stepped once per optimizer step."""
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=learning_rate or o.learning_rate,
        betas=(o.adam_beta1, o.adam_beta2),
        weight_decay=o.weight_decay,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
