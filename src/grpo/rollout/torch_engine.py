"""Default rollout engine: a transformers causal LM with a KV cache, one prefill per prompt.

GRPO samples G completions of the same prompt (DeepSeekMath, section 4.1), so the prompt's
keys and values are identical across a group. With ``prefix_sharing=True`` the engine runs
the prompt forward once per prompt (a ``[B, P]`` prefill, not ``[B*G, P]``) and then copies
each prompt's cache rows G times before decoding; ``prefix_sharing=False`` repeats the
prompt G times and prefills ``[N, P]``, the plain path kept as a fallback and as the
reference the shared path is tested against. The copy is a real ``index_select`` of the
cache tensors: sharing saves the prefill FLOPs (G times fewer), not KV-cache memory.

Choices worth knowing:

* **Sampling by exponential race, not ``torch.multinomial``.** Each step draws Exp(1) noise
  ``E`` of shape ``[N, V]`` for *all* N rows (finished ones included) and picks
  ``argmax_v p_v / E_v``, i.e. ``argmax(log p - log E)``, which is an exact sample from
  ``p`` (the Gumbel-max trick, since ``-log E`` is Gumbel(0, 1)). ``multinomial`` consumes
  the random stream in amounts that depend on how many rows are in the batch, so dropping
  finished rows, or prefilling ``[B, P]`` instead of ``[N, P]``, would shift every later
  sample. With the fixed ``[N, V]`` draw, row ``n`` at step ``t`` always sees the same noise
  for a given seed, whatever the batch looks like. The cost is one ``[N, V]`` uniform draw
  per step: negligible on a GPU; on one CPU thread about 55 ms for N=64 and a 152k
  vocabulary, still cheaper than ``torch.multinomial`` there (about 300 ms).
* **Finished rows leave the decode batch.** After a row emits an id of
  ``params.eos_token_ids`` its cache rows are selected away, so late tokens cost only the
  unfinished rows. The only per-step host sync is the "did any row finish" check.
* **The KV cache is reserved once.** After the prefill, each layer's keys and values move
  into a buffer sized for the prompt plus ``max_completion_length`` (``ReservedLayer``);
  a decode step writes its one new position in place instead of concatenating the whole
  cache again (transformers' ``DynamicLayer`` copies the cache every step). Dropping
  finished rows copies only the filled part, once per step that has a finished row. On a
  CPU the reserved pages become resident only as they are written, so memory still grows
  with the tokens produced; on a GPU the buffer is allocated whole, as large as the cache
  of N rows that all run to ``max_completion_length``.
* **``sample_logp``** is the log-prob under the distribution actually sampled from
  (temperature-scaled, top-k then top-p filtered, renormalised), as TRL and vLLM report
  it; greedy decoding (``temperature == 0``) reports the raw ``log_softmax`` of the logits.
* **``torch.no_grad``, not ``inference_mode``**: inference tensors cannot later take part
  in autograd (e.g. ``sample_logp`` used as ``old_logp``), and the saving is negligible.

Shape letters (``grpo.types``): B prompts, G completions per prompt, N = B*G, P prompt
tokens (left-padded), T completion tokens (right-padded), V vocabulary.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import DynamicLayer

from grpo import host_memory
from grpo.hf import cache_argument, keep_last, left_pad, output_cache, position_ids
from grpo.types import Rollout, SamplingParams


class TorchEngine:
    """Generate G completions per prompt with a transformers causal LM and its KV cache.

    Args:
        prefix_sharing: prefill each prompt once (``[B, P]``) and copy its cache rows G
            times; False prefills the prompt repeated G times (``[N, P]``). Both give the
            same tokens for the same seed.
    """

    exact_logp = True
    """``sample_logp`` comes from the policy's own weights and kernels: where sampling is not
    truncated (no top-k / top-p) it is the policy's log-prob of each token."""

    def __init__(self, prefix_sharing: bool = True) -> None:
        self.prefix_sharing = prefix_sharing

    def sync(self, model: torch.nn.Module) -> None:
        """Nothing to do: this engine samples with the trained module itself."""

    def close(self) -> None:
        """Nothing to release: the engine holds no memory between rollouts."""

    def generate(
        self,
        model: torch.nn.Module,
        prompts: list[list[int]],
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Sample ``params.num_generations`` completions for each prompt.

        Args:
            model: a transformers causal LM (``model(input_ids, attention_mask,
                position_ids, cache, use_cache) -> .logits, .cache``). Put in eval mode for
                the call; its training mode is restored afterwards.
            prompts: B lists of token ids, lengths may differ, none empty.
            params: sampling settings; ``temperature == 0`` is greedy.
            generator: source of randomness; the same seed gives the same rollout. A
                generator on the model's device avoids a host-to-device copy per step.

        Returns:
            A ``Rollout`` with ``prompt_ids``/``prompt_mask`` ``[B, P]`` and
            ``completion_ids``/``completion_mask``/``sample_logp`` ``[N, T]``, rows
            ``b*G .. b*G + G - 1`` belonging to prompt b, T the longest completion produced.
        """
        _check(prompts, params)
        was_training = model.training
        attention = _decode_attention(model)
        model.eval()
        try:
            with torch.no_grad(), attention, host_memory.decoding():
                return self._generate(model, prompts, params, generator)
        finally:
            model.train(was_training)

    def _generate(
        self,
        model: torch.nn.Module,
        prompts: list[list[int]],
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> Rollout:
        device = next(model.parameters()).device
        B, G = len(prompts), params.num_generations
        N, T_max = B * G, params.max_completion_length
        forward = _Forward(model)
        prompt_ids, prompt_mask = left_pad(prompts, params.pad_token_id, device)  # [B, P]

        completion_ids = torch.full((N, T_max), params.pad_token_id, device=device)  # [N, T_max]
        completion_mask = torch.zeros((N, T_max), dtype=torch.long, device=device)  # [N, T_max]
        sample_logp = torch.zeros((N, T_max), device=device)  # [N, T_max]
        eos = torch.tensor(params.eos_token_ids, dtype=torch.long, device=device)  # [E]
        steps = 0

        if T_max > 0:
            # Prefill: [B, P] once per group, or [N, P] on the plain path.
            ids, mask = prompt_ids, prompt_mask  # [B, P]
            if not self.prefix_sharing:
                ids, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)  # [N, P]
            positions = position_ids(mask)  # [B or N, P] left padding
            logits, cache = forward(ids, mask, positions, cache=None)  # [B or N, V]
            if self.prefix_sharing and G > 1:
                rows = torch.arange(B, device=device).repeat_interleave(G)  # [N]
                logits, mask = logits[rows], mask[rows]  # [N, V], [N, P]
            else:
                rows = None
            P = mask.shape[1]
            reserve_cache(cache, P + T_max, rows)
            active = torch.arange(N, device=device)  # [n] rows still decoding
            next_pos = mask.sum(-1, keepdim=True)  # [n, 1] position of the next token
            mask = torch.cat([mask, mask.new_ones((N, T_max))], dim=1)  # [n, P + T_max]
            for t in range(T_max):
                noise = _draw_noise(generator, (N, logits.shape[-1]), params, device)  # [N, V]
                if noise is not None and len(active) < N:
                    noise = noise[active]  # [n, V] the same draws whatever rows remain
                tokens, logp = sample_tokens(logits, params, noise)  # [n], [n]
                completion_ids[active, t] = tokens
                sample_logp[active, t] = logp
                completion_mask[active, t] = 1
                steps = t + 1
                if steps == T_max:
                    break
                if eos.numel() > 0:
                    done = torch.isin(tokens, eos)  # [n]
                    if done.any():  # the one host sync per step
                        keep = (~done).nonzero().squeeze(1)  # [n']
                        if keep.numel() == 0:
                            break
                        cache.reorder_cache(keep)
                        active, tokens = active[keep], tokens[keep]  # [n'], [n']
                        mask, next_pos = mask[keep], next_pos[keep]  # [n', P+T_max], [n', 1]
                step_mask = mask[:, : P + t + 1]  # [n, P+t+1] a view: new positions are real
                logits, cache = forward(tokens[:, None], step_mask, next_pos, cache)  # [n, V]
                next_pos = next_pos + 1  # [n, 1]

        completion_ids = completion_ids[:, :steps]  # [N, T]
        completion_mask = completion_mask[:, :steps]  # [N, T]
        hit_eos = (torch.isin(completion_ids, eos) & completion_mask.bool()).any(dim=1)  # [N]
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            sample_logp=sample_logp[:, :steps],
            truncated=~hit_eos,
            group_size=G,
        )


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf the logits outside the top-k, then outside the top-p nucleus.

    Args:
        logits: ``[n, V]``, already divided by the temperature.
        top_k: keep the k largest logits (ties at the k-th value are kept); 0 disables.
        top_p: keep the smallest set of most likely tokens whose probability reaches
            top_p (the most likely token is always kept); 1.0 disables.

    Returns:
        ``[n, V]`` logits, -inf where filtered; ``log_softmax`` of it renormalises.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [n, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # [n, V]
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [n, V], [n, V]
        probs = sorted_logits.softmax(dim=-1)  # [n, V]
        mass_before = probs.cumsum(dim=-1) - probs  # [n, V] mass of strictly likelier tokens
        drop_sorted = mass_before >= top_p  # [n, V]; never drops the first, as top_p > 0
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [n, V]
        logits = logits.masked_fill(drop, float("-inf"))  # [n, V]
    return logits


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and its log-prob under the distribution sampled from.

    Args:
        logits: ``[n, V]`` raw next-token logits (float32).
        params: temperature (0 = greedy argmax), top_k, top_p.
        noise: ``[n, V]`` Exp(1) draws; ignored (may be None) when greedy.

    Returns:
        ``tokens [n]`` and ``logp [n]``: ``argmax(log p - log noise)``, an exact sample of
        p (exponential race / Gumbel-max), with p the tempered, filtered, renormalised
        softmax; for greedy, the argmax and the raw ``log_softmax`` at it.
    """
    if params.temperature == 0:
        logp_all = logits.log_softmax(dim=-1)  # [n, V]
        tokens = logits.argmax(dim=-1)  # [n]
    else:
        scaled = filter_logits(logits / params.temperature, params.top_k, params.top_p)
        logp_all = scaled.log_softmax(dim=-1)  # [n, V], -inf where filtered
        tokens = (logp_all - noise.log()).argmax(dim=-1)  # [n]
    return tokens, logp_all.gather(-1, tokens[:, None]).squeeze(-1)  # [n], [n]


def _draw_noise(
    generator: torch.Generator | None,
    shape: tuple[int, int],
    params: SamplingParams,
    device: torch.device,
) -> torch.Tensor | None:
    """Exp(1) noise ``[N, V]`` for every row, drawn the same way whatever rows are active."""
    if params.temperature == 0:
        return None
    noise_device = generator.device if generator is not None else device
    uniform = torch.rand(shape, generator=generator, device=noise_device)  # [N, V] in [0, 1)
    # -log U is Exp(1), never 0 as U < 1 (U = 0 gives +inf: that token just loses the race).
    # Inversion is 4x cheaper on CPU than Tensor.exponential_, and multinomial is slower still.
    return uniform.log_().neg_().to(device)  # [N, V]


class ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in a buffer reserved up front.

    ``keys``/``values`` are views ``[n, H, L, D]`` of buffers ``[n, H, capacity, D]``;
    ``update`` writes the new positions in place, and ``reorder_cache`` copies only the
    filled ``L`` positions of the selected rows into a fresh buffer.
    """

    def __init__(self, keys, values, capacity: int, rows: torch.Tensor | None = None) -> None:
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self.length = keys.shape[-2]
        self._keys = self._reserve(keys, capacity, rows)  # [n, H, capacity, D]
        self._values = self._reserve(values, capacity, rows)  # [n, H, capacity, D]
        self._expose()

    @staticmethod
    def _reserve(states: torch.Tensor, capacity: int, rows: torch.Tensor | None = None):
        n = states.shape[0] if rows is None else len(rows)
        buffer = states.new_empty((n, states.shape[1], capacity, states.shape[3]))
        filled = buffer[:, :, : states.shape[2]]  # [n, H, L, D] view
        if rows is None:
            filled.copy_(states)
        else:
            torch.index_select(states, 0, rows, out=filled)
        return buffer

    def _expose(self) -> None:
        self.keys = self._keys[:, :, : self.length]  # [n, H, L, D] view
        self.values = self._values[:, :, : self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[2]:
            raise RuntimeError(f"KV cache reserved for {self._keys.shape[2]} positions, got {end}")
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        capacity = self._keys.shape[2]
        self._keys = self._reserve(self.keys, capacity, beam_idx.to(self.device))
        self._values = self._reserve(self.values, capacity, beam_idx.to(self.device))
        self._expose()


def reserve_cache(cache: object, capacity: int, rows: torch.Tensor | None = None) -> None:
    """Move each plain ``DynamicLayer`` of ``cache`` into a ``ReservedLayer`` of
    ``capacity`` positions, taking batch rows ``rows`` (all when None). Other layer kinds
    (sliding windows, linear attention) and caches without ``layers`` are reordered the
    usual way and keep growing by concatenation."""
    layers = getattr(cache, "layers", [])
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized:
            layers[i] = ReservedLayer(layer.keys, layer.values, capacity, rows)
        elif rows is not None:
            layer.reorder_cache(rows)
    if not layers and rows is not None:
        cache.reorder_cache(rows)


@contextlib.contextmanager
def _decode_attention(model: torch.nn.Module):
    """Under bfloat16 autocast on a CPU, decode with transformers' eager attention.

    PyTorch's fused CPU attention kernel is about 6x slower in bfloat16 than in float32 for
    one query token against a short cache (measured: 1.5 ms vs 0.25 ms for 64 rows x 8
    heads x 40 keys x 64 dims on 2 cores), while the plain matmul-softmax-matmul path takes
    about 0.26 ms; on the 25M benchmark model this takes a rollout from 1.8 to 1.4 s.
    Anywhere else the model's own attention is kept.
    """
    config = getattr(model, "config", None)
    switch = (
        torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and next(model.parameters()).device.type == "cpu"
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and hasattr(model, "set_attn_implementation")
    )
    if not switch:
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


class _Forward:
    """One forward step of a causal LM returning last-position logits and the cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.cache_arg = cache_argument(model)
        self.keep_last = keep_last(model, 1)

    def __call__(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: object | None,
    ) -> tuple[torch.Tensor, object]:
        """ids, positions ``[n, S]``; mask ``[n, L]`` (cache + new tokens) -> logits ``[n, V]``."""
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_arg: cache},
            **self.keep_last,
        )
        return out.logits[:, -1, :].float(), output_cache(out)  # [n, V]


def _check(prompts: list[list[int]], params: SamplingParams) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: need at least one prompt, and no prompt may be empty")
    if params.num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {params.num_generations}")
    if params.max_completion_length < 0:
        raise ValueError(f"max_completion_length must be >= 0, got {params.max_completion_length}")
    if params.temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {params.temperature}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {params.top_k}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {params.top_p}")
