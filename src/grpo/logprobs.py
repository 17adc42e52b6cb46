"""From a causal LM to per-token log-probs and entropies of completion tokens.

The log-prob of the sampled token, ``logp``, is the ``pi_theta(o_t | q, o_<t)`` of every
equation of the seed (eq. II.I-VI.I). With vocabularies of 100k+ tokens the logits, not
the model, set the peak memory (32 completions of 256 tokens at V = 151,936 hold 5 GB of
fp32 logits per pass), so the training, old-policy and reference passes never make them:
the transformer returns its final hidden states, and ``head_logp`` runs the LM head over
chunks of positions, keeping only ``logit[target] - logsumexp`` (and the entropy), and
recomputes each chunk in the backward pass. ``token_logp``/``token_entropy`` do the same
arithmetic on logits someone already has. Under torchrun the pass is the forward of a
``LogpModule``, which DDP and FSDP2 wrap (``grpo.distributed.wrap``), so their hooks run
around the chunked head too.

Shape letters (see ``grpo.types``): N completion rows, P prompt tokens (left-padded),
T completion tokens (right-padded), V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from grpo.hf import (
    cache_argument,
    keep_last,
    main_output,
    output_cache,
    pad_to,
    position_ids,
    unwrap,
)
from grpo.runtime import AutocastState
from grpo.types import Batch

CHUNK_ELEMENTS = 1 << 24
"""Logit entries (positions x V) handled at once: 64 MiB of fp32 logits per chunk, about
110 positions at V = 151,936; bounds the temporaries of each chunk."""


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


@dataclass(frozen=True)
class LMHead:
    """A causal LM's output layer, ``scale * cap * tanh((h W^T + b) / cap)``.

    ``cap`` is Gemma's final logit soft-capping (None: no tanh); ``scale`` a constant
    multiplier (Cohere's ``logit_scale``, one over Granite's ``logits_scaling``).
    """

    weight: Tensor  # [V, H]
    bias: Tensor | None = None  # [V]
    cap: float | None = None
    scale: float = 1.0


def split_causal_lm(model: torch.nn.Module) -> tuple[torch.nn.Module, LMHead]:
    """The transformer body of a causal LM (it returns final hidden states, norm applied)
    and its output head, so that log-probs need no ``[N, T, V]`` logits.

    Raises ValueError for a head that cannot run in chunks (anything but a plain
    ``torch.nn.Linear``, e.g. one adapted by LoRA) and for a model without a body.
    """
    lm = unwrap(model)  # PEFT adapters stay injected in its layers
    head = lm.get_output_embeddings()
    name = type(lm).__name__
    if type(head) is not torch.nn.Linear:
        raise ValueError(
            f"model {name}: output head is {type(head).__name__}, expected torch.nn.Linear "
            "(log-probs run the head in chunks; leave lm_head out of model.lora.target_modules)"
        )
    backbone = lm.base_model
    if backbone is lm:
        raise ValueError(f"model {name}: no transformer body under the LM head (base_model)")
    config = lm.config
    cap = getattr(config, "final_logit_softcapping", None)
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scale /= float(getattr(config, "logits_scaling", None) or 1.0)
    return backbone, LMHead(head.weight, head.bias, float(cap) if cap else None, scale)


def head_logp(
    hidden: Tensor,
    head: LMHead,
    targets: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_positions: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``token_logp`` (and ``token_entropy``) of the logits ``head(hidden)``, over chunks of
    positions, never holding more than one chunk's logits.

    The backward pass recomputes each chunk's logits and applies
    ``d logp_t / d z = onehot(target_t) - softmax(z)``, so peak memory is one chunk's
    ``[c, V]``, not ``[N, T, V]``, for one more head matmul per chunk.

    Args:
        hidden: ``[N, T, H]`` final hidden states; position t scores ``targets[:, t]``.
        head: the output layer (``split_causal_lm``).
        targets: ``[N, T]`` long token ids.
        temperature: divides the logits, as at sampling time (0 is treated as 1).
        with_entropy: also return each position's entropy (no gradient).
        chunk_positions: positions per chunk; default ``CHUNK_ELEMENTS // V``.

    Returns:
        ``(logp [N, T] float32, entropy [N, T] float32 or None)``.
    """
    n, t, h = hidden.shape
    chunk = chunk_positions or max(1, CHUNK_ELEMENTS // head.weight.shape[0])
    logp, entropy = _ChunkedHeadLogp.apply(
        hidden.reshape(n * t, h),
        head.weight,
        head.bias,
        targets.reshape(n * t),
        (head.cap, head.scale * _inverse_temperature(temperature)),
        chunk,
        with_entropy,
    )
    return logp.view(n, t), entropy.view(n, t) if with_entropy else None


def _head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, cap, scale) -> Tensor:
    """``[c, H] -> [c, V]`` float32 logits, soft-capped and scaled as the model does."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()  # [c, V]
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap  # [c, V]
    return logits * scale if scale != 1.0 else logits  # [c, V]


class _ChunkedHeadLogp(torch.autograd.Function):
    """``logp [M]`` (and ``entropy [M]``) of ``targets [M]`` under ``head(hidden [M, H])``,
    chunk by chunk; the backward pass recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, chunk, with_entropy):
        cap, scale = transform
        m = hidden.shape[0]
        logp = torch.empty(m, dtype=torch.float32, device=hidden.device)  # [M]
        lse = torch.empty_like(logp)  # [M] logsumexp of each position's logits
        entropy = torch.empty(m if with_entropy else 0, device=hidden.device)  # [M]
        for s in range(0, m, chunk):
            rows = slice(s, s + chunk)
            logits = _head_logits(hidden[rows], weight, bias, cap, scale)  # [c, V]
            lse[rows] = logits.logsumexp(dim=-1)
            logp[rows] = logits.gather(-1, targets[rows, None]).squeeze(-1) - lse[rows]
            if with_entropy:
                log_probs = logits.sub_(lse[rows, None])  # [c, V], in place
                entropy[rows] = -log_probs.exp().mul_(log_probs).sum(dim=-1)
        ctx.autocast = AutocastState.current(hidden.device.type)
        ctx.transform, ctx.chunk = transform, chunk
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        (cap, scale), chunk = ctx.transform, ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None  # [M, H]
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None  # [V, H]
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None  # [V]
        with ctx.autocast.again():
            for s in range(0, hidden.shape[0], chunk):
                rows = slice(s, s + chunk)
                h, g = hidden[rows], grad_logp[rows, None]  # [c, H], [c, 1]
                logits = _head_logits(h, weight, bias, cap, scale)  # [c, V]
                # through scale * cap * tanh(a / cap): d/da = scale * (1 - tanh^2)
                dcap = None if cap is None else 1 - (logits / (scale * cap)).square()
                # d logp / d logits = onehot(target) - softmax(logits), in place
                grad = logits.sub_(lse[rows, None]).exp_().mul_(-g)  # [c, V]
                grad.scatter_add_(-1, targets[rows, None], g)
                if dcap is not None:
                    grad.mul_(dcap)
                if scale != 1.0:
                    grad.mul_(scale)
                grad = grad.to(weight.dtype)  # [c, V] d logp / d (h W^T + b)
                if need_h:
                    grad_h[rows] = (grad @ weight).to(hidden.dtype)  # [c, H]
                if need_w and grad.dtype == grad_w.dtype and not ctx.autocast.enabled:
                    # in place: a [V, H] temporary per chunk would cost V*H*4 bytes each time
                    grad_w.addmm_(grad.T, h.to(grad.dtype))  # [V, H]
                elif need_w:
                    grad_w += grad.T @ h.to(weight.dtype)  # [V, H]
                if need_b:
                    grad_b += grad.sum(dim=0)  # [V]
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None


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
    cannot change it. The transformer returns hidden states; the LM head runs over
    chunks of positions (``head_logp``), so no ``[N, T, V]`` logits tensor exists.

    Args:
        model: a transformers causal LM (or a PEFT model wrapping one).
        input_ids: ``[N, P + T]`` prompt followed by completion.
        attention_mask: ``[N, P + T]`` 1 on real tokens.
        completion_length: T.
        temperature: the sampling temperature (0 is treated as 1).
        with_entropy: also return the entropy of each completion position (no gradient).

    Returns:
        ``(logp [N, T], entropy [N, T] or None)``; padded completion positions hold values
        that the completion mask must remove.
    """
    targets = input_ids[:, -completion_length:]  # [N, T]
    backbone, head = split_causal_lm(model)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),  # [N, P + T]
        use_cache=False,
    ).last_hidden_state  # [N, P + T, H]
    # the hidden state at position t scores completion token t
    hidden = hidden[:, -completion_length - 1 : -1]  # [N, T, H]
    return head_logp(hidden, head, targets, temperature, with_entropy)


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
    targets = input_ids[:, -completion_length:]  # [n, T]
    backbone, head = split_causal_lm(model)
    hidden = shared_prefix_outputs(
        backbone, input_ids, attention_mask, completion_length, group_ids
    )  # [n, T, H]
    return head_logp(hidden, head, targets, temperature, with_entropy)


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
    row_group = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    prompt_mask = attention_mask[first, :p]  # [b, P]
    out = model(
        input_ids=input_ids[first, :p],
        attention_mask=prompt_mask,
        position_ids=position_ids(prompt_mask),  # [b, P]
        use_cache=True,
        **keep_last(model, 1),
    )
    cache = output_cache(out)
    if cache is None:
        raise ValueError(
            f"{type(model).__name__} returned no KV cache for the shared prompt (gradient "
            "checkpointing drops it in training mode): set optim.share_prompt=false"
        )
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


def forward_logp(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_length: int,
    group_ids: Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One log-prob pass: ``shared_prefix_logp`` where ``group_ids`` is given, else
    ``completion_logp``. A ``LogpModule`` (or DDP over one) is called through its own
    forward, so that the hooks of DDP and FSDP2 run around the whole pass."""
    args = (input_ids, attention_mask, completion_length, group_ids, temperature, with_entropy)
    if isinstance(model, LogpModule) or isinstance(getattr(model, "module", None), LogpModule):
        return model(*args)
    if group_ids is not None:
        return shared_prefix_logp(model, *args)
    return completion_logp(model, *args[:3], temperature=temperature, with_entropy=with_entropy)


class LogpModule(torch.nn.Module):
    """The log-prob pass (transformer body, then ``head_logp`` over chunks of positions) as
    the ``forward`` of a module, for the wrappers that work in forward hooks.

    DDP all-reduces gradients, and FSDP2 gathers the weights of its root unit (embeddings,
    final norm, LM head) and reduce-scatters their gradients, only around the wrapped
    module's own forward. Under ``torchrun`` they wrap this module
    (``grpo.distributed.wrap``), so the whole pass runs inside their hooks and, as in one
    process, no ``[N, T, V]`` logits exist. ``module`` is the causal LM (a PEFT model
    too); ``grpo.hf.unwrap`` reaches it, and generation calls it directly.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.module = model

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        completion_length: int,
        group_ids: Tensor | None = None,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``forward_logp`` of the causal LM: ``(logp [N, T], entropy [N, T] or None)``."""
        logp, entropy = forward_logp(
            self.module,
            input_ids,
            attention_mask,
            completion_length,
            group_ids,
            temperature,
            with_entropy,
        )
        # not a view: FSDP2's pre-backward hook on an output would not survive an in-place
        # op on a view of it (and FSDP2 warns about view outputs)
        return logp.clone(), entropy


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
        return forward_logp(
            model,
            batch.input_ids,
            batch.attention_mask,
            batch.completion_length,
            batch.group_ids if share_prompt else None,
            temperature,
            with_entropy,
        )
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
