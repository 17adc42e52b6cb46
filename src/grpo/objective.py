"""The policy objective of every estimator, and the batch it is computed on.

One function, ``policy_loss``, turns a micro-batch into a loss for GRPO, RLOO and PPO
alike; the config's derived flags decide the two things that differ: whether the ratio
is clipped (not for RLOO) and whether beta * KL sits in the loss (GRPO) or was already
put in the reward (RLOO, PPO). GSPO's sequence-level ratio is an option of the same path.
"""

from __future__ import annotations

import torch

from grpo.config import Config
from grpo.logprobs import completion_logp, shared_prefix_logp
from grpo.losses import (
    Normaliser,
    aggregate,
    clipped_surrogate,
    kl_divergence,
    sequence_log_ratio,
)
from grpo.metrics import masked_mean
from grpo.ppo import unclipped_surrogate
from grpo.types import Batch, LossOutput, Rollout


def policy_loss(model, batch: Batch, cfg: Config, norm: Normaliser) -> LossOutput:
    """Clipped surrogate (section III) plus beta * KL (eq. IV.I), aggregated once.

    ``batch`` is a micro-batch; ``norm`` holds the whole mini-batch's totals, so summing
    this loss over micro-batches gives exactly the mini-batch's loss. With
    ``importance_sampling_level: sequence`` (GSPO) every token of a completion shares one
    ratio, exp of the completion's mean token log-ratio.
    """
    alg = cfg.algorithm
    mask = batch.completion_mask  # [n, T]
    logp, entropy = batch_logp(
        model,
        batch,
        cfg.rollout.temperature,
        with_entropy=True,
        share_prompt=cfg.optim.share_prompt,
    )  # [n, T]
    old_logp = logp.detach() if batch.old_logp is None else batch.old_logp  # [n, T]
    log_ratio = logp - old_logp  # [n, T]
    if alg.importance_sampling_level == "sequence":
        log_ratio = sequence_log_ratio(logp, old_logp, mask).expand_as(logp)  # [n, T] one per row
    zeros = torch.zeros_like(log_ratio)  # [n, T]: ratio = exp(log_ratio - 0)
    metrics = {"entropy": masked_mean(entropy, mask)}
    if alg.clipped:
        surrogate = clipped_surrogate(
            log_ratio, zeros, batch.advantages, alg.epsilon, alg.clip_high
        )
        per_token = surrogate.per_token_loss  # [n, T]
        metrics["clip_ratio/low_mean"] = masked_mean(surrogate.low_clipped.float(), mask)
        metrics["clip_ratio/high_mean"] = masked_mean(surrogate.high_clipped.float(), mask)
    else:
        per_token = unclipped_surrogate(log_ratio, zeros, batch.advantages)  # [n, T]
    if batch.ref_logp is not None:
        kl = kl_divergence(logp, batch.ref_logp, alg.kl_estimator)  # [n, T]
        metrics["kl"] = masked_mean(kl.detach(), mask)
        if alg.kl_in_loss:
            per_token = per_token + alg.beta * kl
    loss = aggregate(per_token, mask, alg.loss_type, norm)
    return LossOutput(loss=loss, metrics=metrics)


def rollout_to_batch(rollout: Rollout) -> Batch:
    """Prompt (repeated per completion) + completion as one [N, P + T] sequence; the
    advantages are filled in by the estimator."""
    g = rollout.group_size
    prompt_ids = rollout.prompt_ids.repeat_interleave(g, dim=0)  # [N, P]
    prompt_mask = rollout.prompt_mask.repeat_interleave(g, dim=0)  # [N, P]
    mask = rollout.completion_mask.float()  # [N, T]
    return Batch(
        input_ids=torch.cat([prompt_ids, rollout.completion_ids], dim=1),  # [N, P + T]
        attention_mask=torch.cat([prompt_mask.long(), mask.long()], dim=1),  # [N, P + T]
        completion_mask=mask,
        advantages=torch.zeros_like(mask),  # [N, T]
        group_ids=torch.arange(rollout.num_prompts).repeat_interleave(g),  # [N]
    )


def batch_logp(
    model, batch: Batch, temperature: float, with_entropy: bool = False, share_prompt: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of ``batch``'s completions: each group's prompt run once
    when ``share_prompt`` (same numbers, fewer FLOPs), else prompt + completion per row."""
    args = (model, batch.input_ids, batch.attention_mask, batch.completion_length)
    if share_prompt and batch.group_ids is not None:
        return shared_prefix_logp(*args, batch.group_ids, temperature, with_entropy)
    return completion_logp(*args, temperature=temperature, with_entropy=with_entropy)


@torch.no_grad()
def batched_logp(
    model, batch: Batch, micro_size: int, temperature: float, share_prompt: bool = True
) -> torch.Tensor:
    """Log-probs of the batch's completions under ``model``, micro-batch by micro-batch."""
    parts = [
        batch_logp(model, mb, temperature, share_prompt=share_prompt)[0]
        for mb in batch.micro_batches(micro_size)
    ]
    return torch.cat(parts)  # [N, T]
