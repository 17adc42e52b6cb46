"""RLOO (Ahmadian et al. 2024, "Back to Basics", eq. VI.I): leave-one-out baseline, no std
scaling, no ratio clipping, and the KL (k1, summed over the completion) in the reward."""

from __future__ import annotations

from typing import Any

from grpo.advantages import expand_to_tokens, kl_penalised_scores, rloo_advantages
from grpo.algorithms.registry import register_algorithm, several_updates
from grpo.config import Config
from grpo.runtime import Runtime
from grpo.types import Batch, Scored


def sampling_logp(batch: Batch, scored: Scored):
    """The sampling policy's log-probs ``[N, T]``: the trainer's own pass when it ran one,
    else the engine's (equal when ``needs_old_logp`` said no pass was needed)."""
    return scored.rollout.sample_logp if batch.old_logp is None else batch.old_logp


@register_algorithm("rloo")
class RLOO:
    clipped = False
    kl_in_loss = False
    kl_estimator = "k1"
    learners = ()

    def __init__(self, cfg: Config, runtime: Runtime, tokenizer: Any):
        self.cfg = cfg

    def needs_old_logp(self, sample_logp_exact: bool) -> bool:
        kl_in_reward = self.cfg.algorithm.beta > 0
        return several_updates(self.cfg) or (kl_in_reward and not sample_logp_exact)

    def prepare(self, batch: Batch, scored: Scored, micro_size: int) -> None:
        scores, mask = scored.rewards.flatten(), batch.completion_mask  # [N], [N, T]
        if batch.ref_logp is not None:
            logp = sampling_logp(batch, scored)  # [N, T]
            scores = kl_penalised_scores(
                scores, logp, batch.ref_logp, mask, self.cfg.algorithm.beta
            )  # [N]
        adv = rloo_advantages(scores.view(-1, scored.rollout.group_size))  # [B, G]
        batch.advantages = expand_to_tokens(adv, mask)  # [N, T]
