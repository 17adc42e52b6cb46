"""Per-token loss terms and the one function that sums them: pure tensor functions.

Section III (PPO's clipped surrogate), eq. IV.I (KL to the reference model, in the loss)
and the aggregation ``1/G sum_i 1/|o_i| sum_t`` of the seed (DeepSeekMath 2024, as
summarised in DESIGN.md). A loss is built in two separate steps: a ``[N, T]`` per-token
term (``clipped_surrogate(...).per_token_loss + beta * kl_divergence(...)``), then
``aggregate`` — the only place the aggregation mode is chosen.

Shape letters (see ``grpo.types``): N completion rows (a whole batch, or n rows of a
micro-batch), T completion tokens.

Where this module departs from the paper:

- ``eps_high`` may differ from ``eps_low`` (DAPO's clip-higher); by default they are equal.
- ``aggregate`` also offers DAPO's token mean and Dr. GRPO's constant normaliser, and
  always divides by the *full* batch's totals (``Normaliser``) so that gradient
  accumulation and several processes give the same gradient as one big batch.
- A completion with no real token contributes 0 under ``"grpo"`` (the paper's
  ``1/|o_i|`` would be 1/0).
- ``importance_weighted_kl`` (TRL's ``use_bias_correction_kl``) may weight the KL term by
  the importance ratio; off by default, so the KL is the paper's plain k3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "token_mean", "dr_grpo")
KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_divergence(
    logp: Tensor, ref_logp: Tensor, estimator: Literal["k1", "k2", "k3"] = "k3"
) -> Tensor:
    """Per-token estimate of KL(policy || reference), eq. IV.I.

    With ``d = ref_logp - logp`` on tokens sampled from the policy (Schulman, "Approximating
    KL divergence", 2020): ``k1 = -d`` (unbiased, can be negative), ``k2 = d^2 / 2``
    (biased, >= 0), ``k3 = exp(d) - d - 1`` (the paper's: unbiased, >= 0, exactly 0 where
    the policies agree).

    Args:
        logp: ``[N, T]`` log-probs of the sampled tokens under the policy being trained.
        ref_logp: ``[N, T]`` log-probs of the same tokens under the frozen reference.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``[N, T]`` per-token KL estimate (padding is left to ``aggregate``'s mask).
    """
    d = ref_logp - logp  # [N, T]
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.pow(2)
    if estimator == "k3":
        return torch.expm1(d) - d  # exp(d) - 1 - d, accurate near d = 0
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def importance_weighted_kl(kl: Tensor, log_ratio: Tensor) -> Tensor:
    """The per-token KL estimate times the importance ratio ``exp(log_ratio)``, as TRL 1.16's
    ``use_bias_correction_kl`` (DeepSeek-V3.2, arXiv 2512.02556): the ratio is neither
    detached nor clipped, so it changes the gradient even where its value is exactly 1.

    With ``d = ref_logp - logp`` and ``ratio = exp(logp - old_logp)``, the k3 term's
    gradient becomes ``ratio * (k3 + 1 - exp(d)) * grad logp``; on-policy (ratio 1) that
    is ``-d * grad logp``, the gradient of k2 and the unbiased gradient of the reverse KL
    ``KL(policy || reference)``, where plain k3's ``(1 - exp(d)) * grad logp`` follows the
    forward KL. The value is unchanged on-policy.

    Args:
        kl: ``[N, T]`` per-token KL estimate (``kl_divergence``).
        log_ratio: ``[N, T]`` ``logp - old_logp``, with its gradient (token level, or each
            completion's mean broadcast to its tokens for GSPO's sequence level).

    Returns:
        ``[N, T]`` the weighted KL term.
    """
    return kl * torch.exp(log_ratio)  # [N, T]


@dataclass
class SurrogateOutput:
    """Result of ``clipped_surrogate``; every field is ``[N, T]``."""

    per_token_loss: Tensor
    """The negated clipped objective, to minimise."""
    ratio: Tensor
    """``exp(logp - old_logp)``, the importance ratio."""
    low_clipped: Tensor
    """bool: ratio < 1 - eps_low with A < 0, where the clip removes the gradient."""
    high_clipped: Tensor
    """bool: ratio > 1 + eps_high with A > 0, where the clip removes the gradient."""


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    eps_low: float,
    eps_high: float | None = None,
) -> SurrogateOutput:
    """PPO's clipped surrogate, section III, as a per-token loss.

    ``ratio = exp(logp - old_logp)``,
    ``objective = min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)``,
    ``per_token_loss = -objective``. With ``old_logp = logp.detach()`` (mu = 1) the ratio is
    exactly 1 and the gradient is the seed's single-step policy gradient ``A * grad logp``.

    Args:
        logp: ``[N, T]`` log-probs of the sampled tokens under the policy being trained.
        old_logp: ``[N, T]`` log-probs under the policy that sampled them (no gradient).
        adv: ``[N, T]`` per-token advantages.
        eps_low: lower clip range, ``epsilon`` in TRL.
        eps_high: upper clip range (``epsilon_high``, DAPO's clip-higher); ``None`` means
            ``eps_low``.

    Returns:
        ``SurrogateOutput`` with ``[N, T]`` fields (padding is left to ``aggregate``'s mask).
    """
    eps_high = eps_low if eps_high is None else eps_high
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    ratio = torch.exp(logp - old_logp)  # [N, T]
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)  # [N, T]
    objective = torch.minimum(ratio * adv, clipped_ratio * adv)  # [N, T]
    return SurrogateOutput(
        per_token_loss=-objective,
        ratio=ratio,
        low_clipped=(ratio < 1 - eps_low) & (adv < 0),
        high_clipped=(ratio > 1 + eps_high) & (adv > 0),
    )


def sequence_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO's sequence-level ratio ``exp(mean_t (logp - old_logp))`` over each completion.

    Args:
        logp: ``[N, T]`` log-probs under the policy being trained.
        old_logp: ``[N, T]`` log-probs under the sampling policy.
        mask: ``[N, T]`` 1 on real completion tokens.

    Returns:
        ``[N, 1]`` ratios (1 for a completion with no real token).
    """
    return torch.exp(sequence_log_ratio(logp, old_logp, mask))  # [N, 1]


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """``[N, 1]`` log of ``sequence_ratio``: the mean token log-ratio of each completion
    (0 for a completion with no real token; padding never enters, even if it is NaN)."""
    m = mask.bool()  # [N, T]
    total = torch.where(m, logp - old_logp, 0.0).sum(dim=1, keepdim=True)  # [N, 1]
    return total / m.sum(dim=1, keepdim=True).clamp(min=1)  # [N, 1]


@dataclass(frozen=True)
class Normaliser:
    """Totals of the FULL batch (all micro-batches, all processes) that ``aggregate``
    divides by, so per-micro-batch losses sum to the whole batch's loss."""

    num_completions: float
    """Completion rows in the batch (``G`` per prompt, empty completions included)."""
    num_tokens: float
    """Real completion tokens in the batch."""
    max_completion_length: int
    """Dr. GRPO's constant per-completion budget, ``max_completion_length``."""

    @classmethod
    def from_mask(cls, mask: Tensor, max_completion_length: int) -> Normaliser:
        """Totals of one process's whole batch; ``mask`` is ``[N, T]``.

        Across processes, sum ``num_completions`` and ``num_tokens`` before use.
        """
        return cls(float(mask.shape[0]), float(mask.sum()), int(max_completion_length))


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    mode: Literal["grpo", "token_mean", "dr_grpo"],
    norm: Normaliser,
) -> Tensor:
    """Sum a per-token loss into a scalar; the one place the aggregation mode is chosen.

    - ``"grpo"`` (the seed's ``1/G sum_i 1/|o_i| sum_t``): each completion's own token mean,
      summed over the rows given and divided by ``norm.num_completions``.
    - ``"token_mean"`` (DAPO): ``sum(x * m) / norm.num_tokens``; long completions weigh more.
    - ``"dr_grpo"`` (Dr. GRPO): ``sum(x * m) / (norm.num_completions *
      norm.max_completion_length)``, a constant divisor, free of the length bias.

    The normaliser is the full batch's, so summing ``aggregate`` over micro-batches equals
    ``aggregate`` of the whole batch (exact gradient accumulation).

    Args:
        per_token: ``[n, T]`` loss per token of the n rows of this micro-batch.
        mask: ``[n, T]`` 1 on real completion tokens; masked entries never reach the sum.
        mode: one of ``LOSS_TYPES``.
        norm: the full batch's ``Normaliser``.

    Returns:
        Scalar tensor.
    """
    m = mask.bool()  # [n, T]
    masked = torch.where(m, per_token, 0.0)  # [n, T], padding may hold inf or NaN
    if mode == "grpo":
        lengths = m.sum(dim=1).clamp(min=1)  # [n], an empty completion adds 0
        return (masked.sum(dim=1) / lengths).sum() / norm.num_completions
    if mode == "token_mean":
        return masked.sum() / max(norm.num_tokens, 1.0)
    if mode == "dr_grpo":
        return masked.sum() / (norm.num_completions * norm.max_completion_length)
    raise ValueError(f"mode (loss_type) must be one of {LOSS_TYPES}, got {mode!r}")


@dataclass
class ValueLossOutput:
    """Result of ``value_loss``."""

    loss: Tensor
    """Scalar loss to backpropagate (already halved; multiply by the value coefficient)."""
    clip_frac: Tensor
    """Detached scalar: fraction of real tokens where the clipped term is the larger one
    (and the value gets no gradient); 0 without clipping."""


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float | None = None,
    norm: Normaliser | None = None,
) -> ValueLossOutput:
    """The critic's regression loss, ``0.5 * max((V - R)^2, (clip(V, V_old +- c) - R)^2)``.

    PPO (Schulman et al. 2017, eq. 9's ``L^VF``) regresses ``(V - R)^2``; the clipped
    variant (OpenAI baselines ppo2, as cleanRL and TRL) keeps the new value within
    ``clip_range`` of the value at sampling time, pessimistically. Token mean over the batch.

    Args:
        values: ``[n, T]`` values under the critic being trained.
        old_values: ``[n, T]`` values at sampling time (no gradient).
        returns: ``[n, T]`` regression targets, GAE's ``advantages + old_values``.
        mask: ``[n, T]`` 1 on real completion tokens.
        clip_range: ``c``; ``None`` regresses unclipped.
        norm: the full batch's totals (``num_tokens`` divides); ``None`` uses these n rows',
            which is right when they are the whole batch.

    Returns:
        ``ValueLossOutput(loss, clip_frac)``.
    """
    unclipped = (values - returns).pow(2)  # [n, T]
    if clip_range is None:
        per_token = 0.5 * unclipped  # [n, T]
        is_clipped = torch.zeros_like(mask, dtype=torch.bool)  # [n, T]
    else:
        if clip_range < 0:
            raise ValueError(f"clip_range must be >= 0 or None, got {clip_range}")
        clipped_values = values.clamp(old_values - clip_range, old_values + clip_range)  # [n, T]
        clipped = (clipped_values - returns).pow(2)  # [n, T]
        per_token = 0.5 * torch.maximum(unclipped, clipped)  # [n, T]
        is_clipped = clipped > unclipped  # [n, T]
    norm = Normaliser.from_mask(mask, mask.shape[1]) if norm is None else norm
    m = mask.bool()  # [n, T]
    clip_frac = (is_clipped & m).sum() / m.sum().clamp(min=1)
    loss = aggregate(per_token, mask, "token_mean", norm)
    return ValueLossOutput(loss=loss, clip_frac=clip_frac.detach().float())


def unclipped_surrogate(logp: Tensor, old_logp: Tensor, adv: Tensor) -> Tensor:
    """Importance-weighted policy gradient without a clip, RLOO's loss (eq. VI.I: no clipping).

    ``per_token_loss = -A * exp(logp - old_logp)``. With one optimizer step per rollout
    batch (mu = 1) ``old_logp = logp.detach()``: the ratio is exactly 1, the loss's value is
    ``-A``, and its gradient is ``-A * exp(0) * grad logp = -A * grad logp``, REINFORCE's
    (Williams 1992) with a baseline. With mu > 1 the ratio corrects for the policy having
    moved since sampling, unbounded (that is what PPO's clip bounds).

    Args:
        logp: ``[N, T]`` log-probs of the sampled tokens under the policy being trained.
        old_logp: ``[N, T]`` log-probs under the policy that sampled them (no gradient).
        adv: ``[N, T]`` per-token advantages.

    Returns:
        ``[N, T]`` per-token loss (padding is left to ``aggregate``'s mask).
    """
    ratio = torch.exp(logp - old_logp)  # [N, T]
    return -adv * ratio  # [N, T]


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 if empty), a detached 0-dim
    tensor on ``x``'s device: a metric, read on the host once per optimizer step, so the
    micro-batches' passes are not made to wait for it."""
    return ((x * mask).sum() / mask.sum().clamp(min=1)).detach()
