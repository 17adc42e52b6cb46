"""The policy objective every algorithm shares, from log-probs to one scalar loss.

``policy_loss`` turns a micro-batch's log-probs into a loss for GRPO, RLOO and PPO alike;
the algorithm's declarations decide the two things that differ: whether the ratio is
clipped (not for RLOO) and whether beta * KL sits in the loss (GRPO) or was already put in
the reward (RLOO, PPO). GSPO's sequence-level ratio is an option of the same path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from grpo.algorithms.registry import Algorithm
from grpo.config import AlgorithmConfig
from grpo.losses import (
    Normaliser,
    aggregate,
    clipped_surrogate,
    importance_weighted_kl,
    kl_divergence,
    masked_mean,
    sequence_log_ratio,
    unclipped_surrogate,
)
from grpo.types import Batch, LossOutput


def policy_loss(
    logp: Tensor,
    entropy: Tensor | None,
    batch: Batch,
    algorithm: Algorithm,
    alg: AlgorithmConfig,
    norm: Normaliser,
) -> LossOutput:
    """Clipped surrogate (section III) plus beta * KL (eq. IV.I), aggregated once.

    Args:
        logp: ``[n, T]`` log-probs of the micro-batch's completion tokens under the policy
            being trained (with gradient).
        entropy: ``[n, T]`` entropies for the metric, or None.
        batch: the micro-batch (advantages, completion mask, ``old_logp``, ``ref_logp``;
            with ``ref_is_policy`` the reference is ``logp`` itself, detached: the KL and
            its gradient are exactly 0).
        algorithm: declares ``clipped``, ``kl_in_loss`` and the ``kl_estimator`` logged.
        alg: the ``algorithm`` config section (epsilons, beta, loss type, ratio level).
        norm: the whole mini-batch's totals, so summing this loss over micro-batches gives
            exactly the mini-batch's loss.

    With ``importance_sampling_level: sequence`` (GSPO) every token of a completion shares
    one ratio, exp of the completion's mean token log-ratio.
    """
    mask = batch.completion_mask  # [n, T]
    old_logp = logp.detach() if batch.old_logp is None else batch.old_logp  # [n, T]
    log_ratio = logp - old_logp  # [n, T]
    if alg.importance_sampling_level == "sequence":
        log_ratio = sequence_log_ratio(logp, old_logp, mask).expand_as(logp)  # [n, T] one per row
    zeros = torch.zeros_like(log_ratio)  # [n, T]: ratio = exp(log_ratio - 0)
    metrics = {} if entropy is None else {"entropy": masked_mean(entropy, mask)}
    if algorithm.clipped:
        surrogate = clipped_surrogate(
            log_ratio, zeros, batch.advantages, alg.epsilon, alg.clip_high
        )
        per_token = surrogate.per_token_loss  # [n, T]
        metrics["clip_ratio/low_mean"] = masked_mean(surrogate.low_clipped.float(), mask)
        metrics["clip_ratio/high_mean"] = masked_mean(surrogate.high_clipped.float(), mask)
    else:
        per_token = unclipped_surrogate(log_ratio, zeros, batch.advantages)  # [n, T]
    ref_logp = logp.detach() if batch.ref_is_policy else batch.ref_logp  # [n, T]
    if ref_logp is not None:
        estimator = algorithm.kl_estimator
        kl = kl_divergence(logp, ref_logp, estimator)  # [n, T]
        if alg.use_bias_correction_kl:
            kl = importance_weighted_kl(kl, log_ratio)  # [n, T], TRL's default
        metrics["kl"] = metrics[f"kl/{estimator}"] = masked_mean(kl.detach(), mask)
        if algorithm.kl_in_loss:
            per_token = per_token + alg.beta * kl
    loss = aggregate(per_token, mask, alg.loss_type, norm)
    return LossOutput(loss=loss, metrics=metrics)
