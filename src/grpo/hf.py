"""All the transformers glue in one place: loading, the forward call's keyword arguments,
position ids, cache objects and padding.

A model may reach the trainer wrapped (PEFT's ``PeftModel``, DDP, ``torch.compile``), and a
wrapper's ``forward`` signature is ``*args, **kwargs``: inspecting it would silently turn off
``logits_to_keep`` or pick the wrong cache argument. So every question about what a model's
forward accepts is asked of the unwrapped base model (``unwrap``), once, here.

Shape letters (``grpo.types``): B prompts, N rows, P prompt tokens (left-padded), T
completion tokens (right-padded), S new positions in one forward call, L all positions.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def load_model_and_tokenizer(path_or_id: str | Path, dtype: torch.dtype = torch.float32):
    """Load any causal LM and its tokenizer: a directory from ``init_model_dir`` or a hub id,
    or a PEFT adapter directory (its base model plus the adapter, merged: ``grpo.lora``).

    The tokenizer is made ready for batched generation: ``padding_side="left"`` and, when it
    has no pad token (many base models), ``pad_token = eos_token``. The model's generation
    config gets the same pad id.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo import lora

    if lora.is_adapter_dir(path_or_id):
        # a PEFT adapter directory: its base plus the adapter, merged, is the model
        model, base_path = lora.load_merged_adapter(path_or_id, dtype)
        has_tokenizer = (Path(path_or_id) / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(str(path_or_id if has_tokenizer else base_path))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path_or_id), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path_or_id))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP and ``grpo.logprobs.LogpModule`` (``.module``), ``torch.compile``
    (``._orig_mod``) and PEFT (``get_base_model()``) wrappers: the transformers model whose
    forward is documented."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


@functools.lru_cache(maxsize=64)
def _forward_parameters(forward_type: type) -> frozenset[str]:
    return frozenset(inspect.signature(forward_type.forward).parameters)


def accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether the base model's ``forward`` takes the keyword ``name``."""
    return name in _forward_parameters(type(unwrap(model)))


def cache_argument(model: torch.nn.Module) -> str:
    """The forward keyword that takes a KV cache: transformers 5 calls it ``cache``
    (``past_key_values`` is deprecated); older or remote-code models use the old name."""
    return "cache" if accepts(model, "cache") else "past_key_values"


def keep_last(model: torch.nn.Module, n: int) -> dict[str, int]:
    """``{"logits_to_keep": n}`` where the model takes it (only the last n positions'
    logits are computed), else nothing."""
    return {"logits_to_keep": n} if accepts(model, "logits_to_keep") else {}


def output_cache(out: Any) -> Any:
    """The KV cache of a forward's output, whichever name the model gives it."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def main_output(out: Any) -> Tensor:
    """Logits of a causal LM's output, else the last hidden state of a backbone's."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def position_ids(mask: Tensor) -> Tensor:
    """``[n, L]`` 0/1 attention mask -> ``[n, L]`` positions that restart at each row's first
    real token, so a left-padded prompt is numbered as if it were alone (0 on padding)."""
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def left_pad(
    sequences: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Left-pad B token-id lists to ``ids [B, P]`` and ``mask [B, P]`` (1 on real tokens)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # [B, P]
    mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [B, P]
    for b, seq in enumerate(sequences):
        if seq:
            ids[b, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[b, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def pad_to(x: Tensor, width: int, value: float = 0, left: bool = False) -> Tensor:
    """``[n, w]`` -> ``[n, width]``, padded with ``value`` on the right (or the left)."""
    pad = (width - x.shape[1], 0) if left else (0, width - x.shape[1])
    return torch.nn.functional.pad(x, pad, value=value)
