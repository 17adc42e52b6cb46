"""Scoring a rollout: decode the completions, call the reward functions as TRL's
GRPOTrainer does (``score_completions``), add the length shaping, and keep everything the
algorithms and metrics need."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from grpo.advantages import informative_groups
from grpo.config import Config
from grpo.rewards.scoring import RewardOutput, score_completions
from grpo.rewards.shaping import overlong_penalty
from grpo.types import Rollout, Scored


class RolloutScorer:
    """``(rows, rollout) -> (Scored, metrics)`` for one generation round of B prompts."""

    def __init__(self, cfg: Config, tokenizer: Any, functions: list[Callable]):
        self.cfg, self.tokenizer, self.functions = cfg, tokenizer, functions

    def __call__(
        self, rows: list[dict], rollout: Rollout, state: Any = None
    ) -> tuple[Scored, dict[str, float]]:
        """Score B rows' rollout; ``state`` reaches the functions as ``trainer_state``."""
        cfg, g = self.cfg, rollout.group_size
        ids = [
            row[m.bool()].tolist()
            for row, m in zip(rollout.completion_ids, rollout.completion_mask, strict=True)
        ]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        col, weights = cfg.data.prompt_column, cfg.rewards.weights
        out = score_completions(
            self.functions, weights, rows, col, texts, ids, state, cfg.rewards.timeout_s
        )
        lengths = rollout.completion_lengths.cpu()  # [N]
        r = cfg.rewards
        shaping = overlong_penalty(
            lengths, cfg.rollout.max_completion_length, r.overlong_buffer, r.overlong_penalty
        )  # [N]
        rewards = (out.rewards + shaping).view(-1, g)  # [B, G], moved to the device once
        device = rollout.completion_ids.device
        scored = Scored(rows, rollout, ids, texts, rewards.to(device), out.per_function, out.names)
        # log_extra columns with one value per completion (as TRL logs them)
        scored.extra_columns = {k: v for k, v in out.extra_columns.items() if len(v) == len(ids)}
        return scored, reward_metrics(rewards, out)


def reward_metrics(rewards: torch.Tensor, out: RewardOutput) -> dict[str, float]:
    """TRL's reward metrics of one batch of ``[B, G]`` rewards."""
    metrics = {
        "reward": rewards.mean().item(),
        "reward_std": rewards.std(dim=1).mean().item(),
        "frac_reward_zero_std": (~informative_groups(rewards)).float().mean().item(),
    }
    for j, name in enumerate(out.names):
        metrics[f"rewards/{name}/mean"] = out.per_function[:, j].nanmean().item()
        metrics[f"time/rewards/{name}"] = out.seconds[j]
    return {**metrics, **out.logged_metrics}
