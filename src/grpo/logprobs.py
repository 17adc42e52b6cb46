"""From a causal LM's logits to per-token log-probs and entropies of completion tokens.

The log-prob of the sampled token, ``logp``, is the ``pi_theta(o_t | q, o_<t)`` of every
equation of the seed (eq. II.I-VI.I). It is computed as ``logit[target] - logsumexp``
in chunks of rows, never as a full ``[N, T, V]`` log-softmax copy: with vocabularies of
100k+ tokens that copy, not the model, sets the peak memory.

Shape letters (see ``grpo.types``): N completion rows, P prompt tokens (left-padded),
T completion tokens (right-padded), V vocabulary.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

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
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # [N, P + T]
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=completion_length + 1,
        use_cache=False,
    ).logits  # [N, T + 1, V]
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


def cache_argument(model: torch.nn.Module) -> str:
    """The forward argument that takes a KV cache: transformers 5 calls it ``cache``
    (``past_key_values`` is deprecated); older or remote-code models use the old name."""
    names = inspect.signature(model.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


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
    names = inspect.signature(model.forward).parameters
    out = model(
        input_ids=input_ids[first, :p],
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.long().cumsum(dim=1) - 1).clamp(min=0),
        use_cache=True,
        **({"logits_to_keep": 1} if "logits_to_keep" in names else {}),
    )
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    cache.reorder_cache(row_group)  # [b, ...] -> [n, ...], differentiable
    positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # [n, P + T]
    rest = model(
        input_ids=input_ids[:, p:],
        attention_mask=attention_mask,
        position_ids=positions[:, p:],
        use_cache=True,
        **{cache_argument(model): cache},
    )  # [n, T, ...]
    last, rest = _main_output(out), _main_output(rest)
    # the prompt's last position scores completion token 0; completion position t, token t+1
    return torch.cat([last[row_group, -1:], rest[:, :-1]], dim=1)  # [n, T, ...]


def _main_output(out) -> Tensor:
    """Logits of a causal LM's output, else the last hidden state of a backbone's."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state
