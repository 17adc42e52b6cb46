"""Advantage estimators: pure tensor functions, one per baseline.

Equation numbers follow the seed (DeepSeekMath 2024 as summarised in DESIGN.md):
eq. II.I group-relative advantage, eq. V.I process supervision, eq. VI.I RLOO; ``gae``
and ``whiten`` are the PPO-with-critic baseline that GRPO replaces.

Shape letters (see ``grpo.types``): B prompts, G completions per prompt, N = B * G
completion rows (row ``b * G + g`` is completion g of prompt b), T completion tokens,
K reasoning steps.

Where this module departs from the paper:

- eq. II.I and eq. V.I divide by ``std + eps`` (eps = 1e-4, as TRL) instead of ``std``,
  and a group whose rewards are all equal (or that has fewer than two process-reward
  steps) gets advantage exactly 0 instead of 0/0.
- ``group_advantages`` can also divide by the whole batch's std (``scale="batch"``,
  REINFORCE++) or not at all (``scale="none"``, Dr. GRPO, which argues the per-group std
  over-weights groups that are nearly all right or all wrong).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from grpo.losses import kl_divergence

SCALES = ("group", "batch", "none")


def _check_group_size(group_size: int) -> None:
    if group_size < 2:
        raise ValueError(
            f"group advantages need G >= 2 completions per prompt (num_generations), "
            f"got G={group_size}: with one completion there is no group to compare against"
        )


def group_advantages(
    rewards: Tensor,
    scale: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
) -> Tensor:
    """Group-relative advantage, eq. II.I: ``A_i = (r_i - mean(r)) / (std(r) + eps)``.

    Args:
        rewards: ``[B, G]`` scalar reward of each completion, one row per prompt.
        scale: what divides the centred rewards: ``"group"`` each group's std (the paper),
            ``"batch"`` the std of all B * G rewards (REINFORCE++), ``"none"`` nothing
            (Dr. GRPO). The group mean is subtracted in every mode. Stds are
            Bessel-corrected, as ``torch.std``.
        eps: added to the std so a near-constant group does not explode.

    Returns:
        ``[B, G]`` advantages; exactly 0 for a group whose rewards are all equal.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got shape {tuple(rewards.shape)}")
    _check_group_size(rewards.shape[1])
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # [B, G]
    if scale == "group":
        centred = centred / (rewards.std(dim=1, keepdim=True) + eps)  # [B, G]
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)  # [B, G]
    # The mean of equal floats need not round back to them; force the documented 0.
    constant = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # [B, 1]
    return centred.masked_fill(constant, 0.0)  # [B, G]


def rloo_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE leave-one-out, eq. VI.I: ``A_i = r_i - mean_{j != i} r_j``, no std.

    Args:
        rewards: ``[B, G]`` scalar reward of each completion, one row per prompt.

    Returns:
        ``[B, G]`` advantages.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got shape {tuple(rewards.shape)}")
    group_size = rewards.shape[1]
    _check_group_size(group_size)
    others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (group_size - 1)  # [B, G]
    return rewards - others_mean  # [B, G]


def process_advantages(
    step_rewards: Tensor,
    step_mask: Tensor,
    step_end: Tensor,
    group_size: int,
    completion_length: int,
    eps: float = 1e-4,
) -> Tensor:
    """Process-supervised advantage, eq. V.I.

    All real step rewards of a group's G completions are normalised together,
    ``r~ = (r - mean(R)) / (std(R) + eps)`` (Bessel std), and token t gets the sum of the
    normalised rewards of the steps that end at or after t:
    ``A_t = sum_{k : end_k >= t} r~_k``.

    Args:
        step_rewards: ``[N, K]`` reward of each step; padded steps may hold anything.
        step_mask: ``[N, K]`` 1 on real steps; completions may have different step counts.
        step_end: ``[N, K]`` long, index in ``[0, T)`` of the completion token that ends
            each real step (ignored on padded steps).
        group_size: G; rows ``b * G .. b * G + G - 1`` form one group.
        completion_length: T, the padded completion length of the output.
        eps: added to the std.

    Returns:
        ``[N, T]`` per-token advantages; 0 after a completion's last step, and 0 for a
        whole group with fewer than two real steps or with all step rewards equal.
    """
    num_rows, num_steps = step_rewards.shape
    _check_group_size(group_size)
    if num_rows % group_size:
        raise ValueError(f"N={num_rows} rows do not split into groups of G={group_size}")
    real = step_mask.bool()  # [N, K]
    if ((step_end < 0) | (step_end >= completion_length))[real].any():
        raise ValueError(f"step_end of a real step lies outside [0, T={completion_length})")

    # Normalise over each group's real steps: view the group's G*K slots as one row.
    r = step_rewards.reshape(-1, group_size * num_steps)  # [B, G*K]
    m = real.reshape(-1, group_size * num_steps)  # [B, G*K]
    count = m.sum(dim=1, keepdim=True)  # [B, 1]
    r = torch.where(m, r, 0.0)  # [B, G*K]
    mean = r.sum(dim=1, keepdim=True) / count.clamp(min=1)  # [B, 1]
    var = torch.where(m, r - mean, 0.0).pow(2).sum(dim=1, keepdim=True)  # [B, 1]
    std = (var / (count - 1).clamp(min=1)).sqrt()  # [B, 1]
    lo = torch.where(m, r, torch.inf).amin(dim=1, keepdim=True)  # [B, 1]
    hi = torch.where(m, r, -torch.inf).amax(dim=1, keepdim=True)  # [B, 1]
    degenerate = (count < 2) | (lo == hi)  # [B, 1]
    norm = torch.where(m & ~degenerate, (r - mean) / (std + eps), 0.0)  # [B, G*K]
    norm = norm.reshape(num_rows, num_steps)  # [N, K]

    # Put each step's reward on its end token, then sum from the right: token t collects
    # every step ending at or after t.
    at_end = torch.zeros(num_rows, completion_length, dtype=norm.dtype, device=norm.device)
    at_end.scatter_add_(1, step_end.clamp(0, completion_length - 1).long(), norm)  # [N, T]
    return at_end.flip(1).cumsum(1).flip(1)  # [N, T]


def expand_to_tokens(adv: Tensor, completion_mask: Tensor) -> Tensor:
    """Give every token of completion i its sequence advantage ``A_i`` (eq. II.I).

    Args:
        adv: ``[B, G]`` one advantage per completion.
        completion_mask: ``[N, T]`` 1 on real completion tokens, N = B * G.

    Returns:
        ``[N, T]`` with ``A_i`` on completion i's real tokens and 0 on padding.
    """
    if adv.numel() != completion_mask.shape[0]:
        raise ValueError(
            f"adv has {adv.numel()} completions (shape {tuple(adv.shape)}) but "
            f"completion_mask has N={completion_mask.shape[0]} rows"
        )
    return torch.where(completion_mask.bool(), adv.reshape(-1, 1), 0.0)  # [N, T]


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) for the PPO-with-critic baseline.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``, over
    each completion's real tokens; the value after the last real token is 0 (the episode
    ends there). Completions are right-padded.

    Args:
        rewards: ``[N, T]`` per-token reward (e.g. the score on the last token).
        values: ``[N, T]`` critic's value of each token's state.
        mask: ``[N, T]`` 1 on real completion tokens.
        gamma: discount factor.
        lam: GAE's bias-variance trade-off lambda.

    Returns:
        ``(advantages, returns)``, both ``[N, T]``, ``returns = advantages + values``;
        both are 0 on padding.
    """
    m = mask.to(values.dtype)  # [N, T]
    rewards, values = rewards * m, values * m  # [N, T]
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # [N, T]
    deltas = rewards + gamma * next_values - values  # [N, T], V after the end is 0
    advantages = torch.zeros_like(values)  # [N, T]
    running = torch.zeros_like(values[:, 0])  # [N]
    for t in reversed(range(values.shape[1])):  # the recursion runs backwards in time
        running = deltas[:, t] + gamma * lam * running  # [N], 0 through the padding
        advantages[:, t] = running
    advantages = advantages * m  # [N, T]
    return advantages, (advantages + values) * m


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Masked whitening: ``(x - mean) / sqrt(var + eps)`` over the unmasked entries.

    Args:
        x: ``[N, T]`` values, e.g. GAE advantages.
        mask: ``[N, T]`` 1 where ``x`` is real.
        shift_mean: if False the mean is added back (only the scale changes).
        eps: added to the (Bessel-corrected) variance.

    Returns:
        ``[N, T]`` whitened values, 0 on masked entries.
    """
    m = mask.bool()  # [N, T]
    count = m.sum()
    if count < 2:
        raise ValueError(f"whiten needs at least 2 unmasked values, got {int(count)}")
    mean = torch.where(m, x, 0.0).sum() / count
    var = torch.where(m, x - mean, 0.0).pow(2).sum() / (count - 1)
    whitened = (x - mean) * torch.rsqrt(var + eps)  # [N, T]
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, 0.0)  # [N, T]


def kl_penalised_scores(
    scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float
) -> Tensor:
    """RLOO's KL in the reward (eq. VI.I table, "KL in the reward"), one number per completion.

    ``r_i = score_i - beta * sum_t (logp_t - ref_logp_t)`` over completion i's real tokens:
    the sampled sequence's log-ratio, the k1 estimate of KL(policy || reference) summed over
    the sequence (Ahmadian et al. 2024, "Back to Basics", as in TRL's RLOOTrainer). Feed the
    result to ``rloo_advantages``; the loss then has no KL term.

    Args:
        scores: ``[N]`` reward of each completion.
        logp: ``[N, T]`` log-probs of the sampled tokens under the sampling policy.
        ref_logp: ``[N, T]`` log-probs of the same tokens under the frozen reference.
        mask: ``[N, T]`` 1 on real completion tokens; padding may hold anything, even NaN.
        beta: KL coefficient.

    Returns:
        ``[N]`` KL-penalised scores (reshape to ``[B, G]`` for ``rloo_advantages``).
    """
    log_ratio = torch.where(mask.bool(), logp - ref_logp, 0.0)  # [N, T], k1 per token
    return scores - beta * log_ratio.sum(dim=1)  # [N]


def kl_penalised_token_rewards(
    scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float
) -> Tensor:
    """InstructGPT's per-token reward: ``-beta * (logp - ref_logp)``, plus the score at the end.

    ``r_t = -beta * log(pi(o_t) / pi_ref(o_t))`` on every real token (the k1 KL estimate,
    Ouyang et al. 2022 eq. 2 spread over tokens, as TRL's PPO), and completion i's score
    ``scores[i]`` is added on its last real token. Rewards are data: pass log-probs
    computed without gradient (at sampling time).

    Args:
        scores: ``[N]`` reward of each completion.
        logp: ``[N, T]`` log-probs of the sampled tokens under the sampling policy.
        ref_logp: ``[N, T]`` log-probs of the same tokens under the frozen reference.
        mask: ``[N, T]`` 1 on real completion tokens (right-padded); padding may hold NaN.
        beta: KL coefficient.

    Returns:
        ``[N, T]`` per-token rewards, 0 on padding; a completion with no real token gets
        nothing, its score included.

    >>> kl_penalised_token_rewards(
    ...     torch.tensor([1.0]), torch.tensor([[-1.0, -2.0]]), torch.tensor([[-2.0, -2.0]]),
    ...     torch.tensor([[1, 1]]), beta=0.5)
    tensor([[-0.5000,  1.0000]])
    """
    m = mask.bool()  # [N, T]
    rewards = torch.where(m, -beta * kl_divergence(logp, ref_logp, "k1"), 0.0)  # [N, T]
    lengths = m.sum(dim=1)  # [N]
    last = (lengths - 1).clamp(min=0).unsqueeze(1)  # [N, 1], index of the last real token
    at_end = torch.where(lengths > 0, scores, 0.0).to(rewards.dtype).unsqueeze(1)  # [N, 1]
    return rewards.scatter_add(1, last, at_end)  # [N, T]


def informative_groups(rewards: Tensor) -> Tensor:
    """[B, G] rewards -> [B] bool: groups whose rewards differ (DAPO's dynamic sampling
    keeps only these; an all-equal group has zero advantage and teaches nothing)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > 0
