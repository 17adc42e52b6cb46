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
        bucket=cfg.optim.bucket_by_length,
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


CALL_POSITIONS = 96
"""The price of one more forward/backward call, in token positions: measured on 2 CPU
cores, a call costs about 57 positions' worth of compute on a 25M Llama and 90-150 on a
1M one (Python and per-kernel overhead that does not shrink with the call's size)."""


def length_buckets(lengths: torch.Tensor, extra_call: float = CALL_POSITIONS) -> list:
    """Split rows into sets of similar length, so a forward pass trims each set's padding.

    Rows sorted by length are cut into contiguous runs, each padded to its longest row;
    the cuts minimise the positions computed, ``sum(rows * longest)``, plus ``extra_call``
    positions for every run after the first (an exact dynamic programme over the distinct
    lengths). Within a run rows keep their batch order, so a group's rows stay contiguous
    for prompt sharing.

    Args:
        lengths: ``[n]`` real tokens of each completion.
        extra_call: the price of one more forward call, in positions (include any prompt
            positions that call recomputes).

    Returns:
        ``[n_c]`` row-index tensors, one per run, shortest first.

    >>> [c.tolist() for c in length_buckets(torch.tensor([64, 10, 12, 64, 11, 64, 9, 64]))]
    [[1, 2, 4, 6], [0, 3, 5, 7]]
    """
    order = torch.argsort(lengths, stable=True)  # [n]
    values, counts = torch.unique_consecutive(lengths[order], return_counts=True)  # [m]
    values, rows_upto = values.tolist(), [0, *torch.cumsum(counts, 0).tolist()]
    # best[k]: cheapest split of the rows of the k shortest lengths; cut[k]: where its last
    # run starts (an index into rows_upto)
    best, cut = [0.0], [0]
    for k in range(1, len(values) + 1):
        costs = [
            best[j] + (rows_upto[k] - rows_upto[j]) * values[k - 1] + (extra_call if j else 0)
            for j in range(k)
        ]
        j = min(range(k), key=costs.__getitem__)
        best.append(costs[j])
        cut.append(j)
    bounds, k = [], len(values)
    while k > 0:
        bounds.append((rows_upto[cut[k]], rows_upto[k]))
        k = cut[k]
    return [order[a:b].sort().values for a, b in reversed(bounds)]


def batch_logp(
    model,
    batch: Batch,
    temperature: float,
    with_entropy: bool = False,
    share_prompt: bool = True,
    bucket: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) ``[n, T]`` of ``batch``'s completions.

    ``share_prompt``: each group's prompt runs once (same numbers, fewer FLOPs).
    ``bucket``: rows of similar length run together, each set trimmed to its longest
    completion, so little padding is computed (same numbers; positions past a row's end
    hold 0).
    """
    lengths = batch.completion_mask.sum(dim=1).long()  # [n]
    chunks = []
    if bucket and batch.num_completions > 1:
        shared = share_prompt and batch.group_ids is not None
        # a shared prompt runs once per call that holds one of its rows: up to once more
        groups = len(torch.unique_consecutive(batch.group_ids)) if shared else 0
        prompt = batch.input_ids.shape[1] - batch.completion_length
        chunks = length_buckets(lengths, CALL_POSITIONS + groups * prompt)
    if len(chunks) <= 1:
        args = (model, batch.input_ids, batch.attention_mask, batch.completion_length)
        if share_prompt and batch.group_ids is not None:
            return shared_prefix_logp(*args, batch.group_ids, temperature, with_entropy)
        return completion_logp(*args, temperature=temperature, with_entropy=with_entropy)
    t, p = batch.completion_length, batch.input_ids.shape[1] - batch.completion_length
    logp_parts, entropy_parts = [], []
    for rows in chunks:
        width = max(1, int(lengths[rows].max()))
        sub = batch.rows(rows)
        sub.input_ids, sub.attention_mask = (
            sub.input_ids[:, : p + width],
            sub.attention_mask[:, : p + width],
        )
        sub.completion_mask = sub.completion_mask[:, :width]
        logp, entropy = batch_logp(
            model, sub, temperature, with_entropy, share_prompt, bucket=False
        )
        logp_parts.append(torch.nn.functional.pad(logp, (0, t - width)))  # [n_c, T]
        if entropy is not None:
            entropy_parts.append(torch.nn.functional.pad(entropy, (0, t - width)))
    inverse = torch.argsort(torch.cat(chunks))  # [n]: back to batch order
    entropy = torch.cat(entropy_parts)[inverse] if with_entropy else None
    return torch.cat(logp_parts)[inverse], entropy


@torch.no_grad()
def batched_logp(
    model,
    batch: Batch,
    micro_size: int,
    temperature: float,
    share_prompt: bool = True,
    bucket: bool = True,
) -> torch.Tensor:
    """Log-probs of the batch's completions under ``model``, micro-batch by micro-batch."""
    parts = [
        batch_logp(model, mb, temperature, share_prompt=share_prompt, bucket=bucket)[0]
        for mb in batch.micro_batches(micro_size)
    ]
    return torch.cat(parts)  # [N, T]
