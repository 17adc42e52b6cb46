"""From a causal LM's logits to per-token log-probs and entropies of completion tokens.

The log-prob of the sampled token, ``logp``, is the ``pi_theta(o_t | q, o_<t)`` of every
equation of the seed (eq. II.I-VI.I). It is computed as ``logit[target] - logsumexp``
in chunks of rows, never as a full ``[N, T, V]`` log-softmax copy: with vocabularies of
100k+ tokens that copy, not the model, sets the peak memory.

Shape letters (see ``grpo.types``): N completion rows, P prompt tokens (left-padded),
T completion tokens (right-padded), V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from grpo.hf import cache_argument, keep_last, main_output, output_cache, pad_to, position_ids
from grpo.types import Batch

CHUNK_ELEMENTS = 1 << 24
"""Logit entries (rows x T x V) handled at once; bounds the temporaries of each chunk."""


def _inverse_temperature(temperature: float) -> float:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    # Temperature 0 means greedy sampling; its tokens are scored under the plain softmax.
    return 1.0 if temperature == 0 else 1.0 / temperature


def _row_chunks(logits: Tensor, *others: Tensor):
    """Split ``logits [N, T, V]`` (and aligned ``others``) along N into bounded chunks."""
    rows = max(1, CHUNK_ELEMENTS // max(1, logits.shape[1] * logits.shape[2]))
    return zip(logits.split(rows), *(x.split(rows) for x in others), strict=True)


def token_logp(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-prob of each target token, ``log softmax(logits / temperature)[target]``.

    Args:
        logits: ``[N, T, V]`` logits; position t scores ``targets[:, t]``.
        targets: ``[N, T]`` long token ids.
        temperature: divides the logits, as at sampling time (0 is treated as 1).

    Returns:
        ``[N, T]`` float32 log-probs, differentiable w.r.t. ``logits``.
    """
    scale = _inverse_temperature(temperature)
    out = []
    for chunk, chunk_targets in _row_chunks(logits, targets):
        chunk = chunk.float() * scale if scale != 1.0 else chunk.float()  # [n, T, V]
        picked = chunk.gather(-1, chunk_targets.unsqueeze(-1)).squeeze(-1)  # [n, T]
        out.append(picked - chunk.logsumexp(dim=-1))  # [n, T]
    return torch.cat(out)  # [N, T]


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of each position's next-token distribution, ``-sum_v p_v log p_v``.

    Args:
        logits: ``[N, T, V]`` logits.
        temperature: divides the logits (0 is treated as 1).

    Returns:
        ``[N, T]`` float32 entropies (a metric: call under ``torch.no_grad()`` to save memory).
    """
    scale = _inverse_temperature(temperature)
    out = []
    for (chunk,) in _row_chunks(logits):
        probs = torch.softmax(chunk.float() * scale, dim=-1)  # [n, T, V]
        out.append(torch.special.entr(probs).sum(dim=-1))  # [n, T], -p log p, 0 where p = 0
    return torch.cat(out)  # [N, T]


def completion_logp(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_length: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs (and optionally entropies) of the completion tokens, one forward.

    Prompts are left-padded, so position ids restart at each row's first real token;
    completions are right-padded, so their padding comes after every real token and
    cannot change it. Only the last T + 1 positions' logits are materialised.

    Args:
        model: a transformers causal LM (accepts ``position_ids`` and ``logits_to_keep``).
        input_ids: ``[N, P + T]`` prompt followed by completion.
        attention_mask: ``[N, P + T]`` 1 on real tokens.
        completion_length: T.
        temperature: the sampling temperature (0 is treated as 1).
        with_entropy: also return the entropy of each completion position (no gradient).

    Returns:
        ``(logp [N, T], entropy [N, T] or None)``; padded completion positions hold values
        that the completion mask must remove.
    """
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),  # [N, P + T]
        use_cache=False,
        **keep_last(model, completion_length + 1),
    ).logits[:, -completion_length - 1 :]  # [N, T + 1, V]
    logits = logits[:, :-1]  # [N, T, V]: the logit at position t scores completion token t
    return _score_completion(logits, input_ids[:, -completion_length:], temperature, with_entropy)


def _score_completion(
    logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor | None]:
    logp = token_logp(logits, targets, temperature)  # [N, T]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = token_entropy(logits, temperature)  # [N, T]
    return logp, entropy


def shared_prefix_logp(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_length: int,
    group_ids: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``completion_logp`` with each group's prompt run once, not once per completion.

    Args:
        input_ids, attention_mask, completion_length, temperature, with_entropy: as in
            ``completion_logp``; rows of one group must be contiguous.
        group_ids: ``[n]`` which prompt each row answers (equal ids share a prompt).
    """
    logits = shared_prefix_outputs(model, input_ids, attention_mask, completion_length, group_ids)
    t = completion_length
    return _score_completion(logits, input_ids[:, -t:], temperature, with_entropy)


def shared_prefix_outputs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_length: int,
    group_ids: Tensor,
) -> Tensor:
    """The model's outputs at the T positions that score completion tokens 0 .. T-1 (the
    last prompt position, then completion positions 0 .. T-2), each group's prompt run once.

    The G completions of a group share their prompt, and under a causal mask the prompt's
    keys and values do not depend on what follows, so the prompt is run once per group
    (``[b, P]``), its KV cache is repeated to the group's rows, and only the completions
    (``[n, T]``) are run on top (Prefix Grouper, arXiv 2506.05433). Gradients flow back
    through the repeated cache into the one prompt pass, so the outputs and gradients equal
    a full ``[n, P + T]`` forward's up to float rounding, at the cost of ``b * P + n * T``
    tokens instead of ``n * (P + T)``.

    Args:
        model: a causal LM (outputs are logits ``[n, T, V]``) or a bare transformer backbone
            (outputs are last hidden states ``[n, T, H]``), taking ``position_ids`` and a cache.
        input_ids: ``[n, P + T]`` left-padded prompt then right-padded completion; the rows
            of one group are contiguous.
        attention_mask: ``[n, P + T]`` 1 on real tokens.
        completion_length: T.
        group_ids: ``[n]`` which prompt each row answers (equal ids share a prompt).
    """
    t = completion_length
    p = input_ids.shape[1] - t
    _, counts = torch.unique_consecutive(group_ids, return_counts=True)  # [b]
    first = torch.cumsum(counts, 0) - counts  # [b] first row of each group
    row_group = torch.repeat_interleave(torch.arange(len(counts)), counts)  # [n]
    prompt_mask = attention_mask[first, :p]  # [b, P]
    out = model(
        input_ids=input_ids[first, :p],
        attention_mask=prompt_mask,
        position_ids=position_ids(prompt_mask),  # [b, P]
        use_cache=True,
        **keep_last(model, 1),
    )
    cache = output_cache(out)
    cache.reorder_cache(row_group)  # [b, ...] -> [n, ...], differentiable
    positions = position_ids(attention_mask)  # [n, P + T]
    rest = model(
        input_ids=input_ids[:, p:],
        attention_mask=attention_mask,
        position_ids=positions[:, p:],
        use_cache=True,
        **{cache_argument(model): cache},
    )  # [n, T, ...]
    last, rest = main_output(out), main_output(rest)
    # the prompt's last position scores completion token 0; completion position t, token t+1
    return torch.cat([last[row_group, -1:], rest[:, :-1]], dim=1)  # [n, T, ...]


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
    agree: Callable[[int], int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) ``[n, T]`` of ``batch``'s completions.

    ``share_prompt``: each group's prompt runs once (same numbers, fewer FLOPs).
    ``bucket``: rows of similar length run together, each set trimmed to its longest
    completion, so little padding is computed (same numbers; positions past a row's end
    hold 0).
    ``agree``: given the number of forward calls this process would make, the number it
    must make (FSDP2, where every process calls the model equally often; see
    ``grpo.distributed.agreed_calls``); the largest sets are halved until they match.
    """
    lengths = batch.completion_mask.sum(dim=1).long()  # [n]
    chunks = []
    if bucket and batch.num_completions > 1:
        shared = share_prompt and batch.group_ids is not None
        # a shared prompt runs once per call that holds one of its rows: up to once more
        groups = len(torch.unique_consecutive(batch.group_ids)) if shared else 0
        prompt = batch.input_ids.shape[1] - batch.completion_length
        chunks = length_buckets(lengths, CALL_POSITIONS + groups * prompt)
    if agree is not None:
        whole = [torch.arange(batch.num_completions)]
        chunks = split_to(chunks or whole, agree(len(chunks) or 1))
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
        logp_parts.append(pad_to(logp, t))  # [n_c, T]
        if entropy is not None:
            entropy_parts.append(pad_to(entropy, t))
    inverse = torch.argsort(torch.cat(chunks))  # [n]: back to batch order
    entropy = torch.cat(entropy_parts)[inverse] if with_entropy else None
    return torch.cat(logp_parts)[inverse], entropy


def split_to(chunks: list, calls: int) -> list:
    """``chunks`` (row-index tensors) with the largest halved until there are ``calls``.

    >>> [c.tolist() for c in split_to([torch.tensor([0, 2]), torch.tensor([1, 3, 4])], 3)]
    [[0, 2], [1], [3, 4]]
    """
    chunks = list(chunks)
    while len(chunks) < calls:
        i = max(range(len(chunks)), key=lambda j: len(chunks[j]))
        if len(chunks[i]) < 2:
            raise ValueError(f"cannot split {len(chunks)} sets of single rows into {calls} calls")
        half = len(chunks[i]) // 2
        chunks[i : i + 1] = [chunks[i][:half], chunks[i][half:]]
    return chunks


@torch.no_grad()
def batched_logp(
    model,
    batch: Batch,
    micro_size: int,
    temperature: float,
    share_prompt: bool = True,
    bucket: bool = True,
    agree: Callable[[int], int] | None = None,
) -> torch.Tensor:
    """Log-probs of the batch's completions under ``model``, micro-batch by micro-batch."""
    parts = [
        batch_logp(model, mb, temperature, share_prompt=share_prompt, bucket=bucket, agree=agree)[0]
        for mb in batch.micro_batches(micro_size)
    ]
    return torch.cat(parts)  # [N, T]
