"""LoRA adapters through PEFT: add, switch off for the reference, merge, save and load.

LoRA (Hu et al. 2021) trains ``W + (alpha / r) B A`` with ``W`` frozen, so the trainable
state is the adapters and their optimizer moments. GRPO's reference (eq. IV.I) is then the
policy with its adapters switched off (``adapters_off``): the frozen base is the starting
policy, so no second copy of the weights is ever made.

Iterative RL (``algorithm.ref_reset_every``, DeepSeekMath 4.2) moves the reference to the
current policy; under LoRA, ``merge_and_restart`` adds ``(alpha / r) B A`` into the base
weights and starts a fresh adapter (``B = 0``, so the policy is unchanged) with fresh
optimizer moments: the adapters-off reference is then the policy of that moment.

On disk: a checkpoint holds the adapter (PEFT's ``adapter_model.safetensors`` and
``adapter_config.json``) and, once the base has moved, the base weights (``BASE_DIR``);
the final model is the merged weights, loadable by ``from_pretrained`` without PEFT.
A model path that is an adapter directory loads its base plus the adapter, merged.

Under torchrun (``grpo.distributed.wrap``) the adapters-off reference pass runs through
the same wrapper without gradient, and rank 0 writes ``final/``, under FSDP2 merged from
the gathered full state dict (``merged_state_dict(model, state)``). A reset's fresh
adapters are rank 0's on every rank (broadcast under DDP, scattered shards under FSDP2).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
BASE_DIR = "base"
"""Sub-directory of a checkpoint holding the base weights once merges have moved them."""


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            "model.lora needs PEFT: pip install 'grpo[peft]' (or pip install peft)"
        ) from err
    return peft


def add_adapters(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """Wrap ``model`` in a ``PeftModel`` with fresh adapters from ``cfg`` (a LoraConfig
    section); only the adapters require gradients afterwards."""
    peft = _peft()
    config = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PEFT model with LoRA adapters."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def adapters_off(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Run ``model`` as its base: the reference of a LoRA policy (exactly the base's
    outputs: a disabled LoRA layer returns its base layer's output)."""
    return model.disable_adapter()


def _lora_layers(model: torch.nn.Module):
    layer_type = _peft().tuners.lora.LoraLayer
    return [m for m in model.modules() if isinstance(m, layer_type)]


@torch.no_grad()
def merge_and_restart(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Add each adapter's ``(alpha / r) B A`` into its base weight, then re-initialise the
    adapter (``A`` random as PEFT does, ``B = 0``) and drop its optimizer moments.

    The policy's outputs are unchanged (up to the rounding of ``W + dW``); the parameters
    stay the same objects, so the optimizer keeps training them. Under FSDP2 (shards) the
    same numbers are computed whole and written back shard by shard.
    """
    for layer in _lora_layers(model):
        for name in layer.active_adapters:
            base = layer.get_base_layer()
            if hasattr(base.weight, "full_tensor"):  # FSDP2: DTensor shards
                _merge_and_restart_sharded(layer, name)
            else:
                base.weight += layer.get_delta_weight(name).to(base.weight.dtype)
                layer.reset_lora_parameters(name, init_lora_weights=True)
            if optimizer is not None:
                for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    optimizer.state.pop(p, None)


def _merge_and_restart_sharded(layer, name: str) -> None:
    """``merge_and_restart`` of one adapter whose weights are FSDP2 shards: ``dW`` from the
    gathered ``A`` and ``B``; the fresh ``A`` drawn whole, as PEFT draws it (the global
    generator, kaiming-uniform), and rank 0's draw scattered, so every rank and one
    process hold the same adapter."""
    from torch.distributed.tensor import distribute_tensor

    weight = layer.get_base_layer().weight  # shards of [out, in]
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight  # shards of [r, in], [out, r]
    delta = _delta(layer, name, a.full_tensor(), b.full_tensor())  # [out, in]
    weight += distribute_tensor(delta.to(weight.dtype), weight.device_mesh, weight.placements)
    fresh = torch.empty(a.shape, dtype=a.dtype, device=a.to_local().device)  # [r, in]
    torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
    a.copy_(distribute_tensor(fresh, a.device_mesh, a.placements))
    b.zero_()


def _plain_name(key: str) -> str:
    """A PEFT-injected model's parameter name as the plain model names it."""
    return key.replace(".base_layer.", ".")


def _injected_state(model: torch.nn.Module, state: dict | None) -> dict[str, torch.Tensor]:
    """The injected transformers model's state dict: its own, or taken from ``state``, a
    state dict of the whole PEFT model."""
    lm = model.get_base_model()
    if state is None:
        return lm.state_dict()
    prefix = next(name for name, m in model.named_modules() if m is lm) + "."
    return {k.removeprefix(prefix): v for k, v in state.items()}


def base_state_dict(model: torch.nn.Module, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The base weights under the plain model's names (adapters left out); ``state`` as in
    ``merged_state_dict``."""
    own = _injected_state(model, state)
    return {_plain_name(k): v for k, v in own.items() if ".lora_" not in k}


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The weights of the plain model equal to base + adapters, under the plain names.

    Merged tensors are new (on the CPU, so a GPU run needs no room for a second copy);
    the others are the model's own. ``state``: the whole PEFT model's state dict to take
    every tensor from, where the model itself holds shards (FSDP2's full state dict).
    """
    weights = base_state_dict(model, state)
    own = _injected_state(model, state) if state is not None else None
    lm = model.get_base_model()
    layer_type = _peft().tuners.lora.LoraLayer
    for module_name, layer in lm.named_modules():
        if isinstance(layer, layer_type):
            key = _plain_name(f"{module_name}.base_layer.weight")
            if state is None:
                delta = sum(layer.get_delta_weight(n) for n in layer.active_adapters)
            else:
                names = layer.active_adapters
                delta = sum(_delta_weight(layer, module_name, n, own) for n in names)
            weights[key] = (weights[key] + delta).cpu()
    return weights


def _delta_weight(layer, module_name: str, name: str, state: dict) -> torch.Tensor:
    """``_delta`` of the full ``A`` and ``B`` in ``state``."""
    a = state[f"{module_name}.lora_A.{name}.weight"]  # [r, in]
    b = state[f"{module_name}.lora_B.{name}.weight"]  # [out, r]
    return _delta(layer, name, a, b)


def _delta(layer, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PEFT's ``layer.get_delta_weight(name)``, ``scaling * B A``, from whole ``A [r, in]``
    and ``B [out, r]`` (the layer itself may hold shards); plain LoRA linear layers only."""
    if type(layer) is not _peft().tuners.lora.Linear or layer.use_dora.get(name):
        raise ValueError(
            f"{type(layer).__name__} adapters cannot be merged from gathered weights "
            "(plain LoRA on linear layers only)"
        )
    delta = (b.float() @ a.float()) * layer.scaling[name]  # [out, in]
    return (delta.T if layer.fan_in_fan_out else delta).to(b.dtype)


def save_merged(model: torch.nn.Module, path: str | Path, state: dict | None = None) -> Path:
    """Write the merged model (``save_pretrained`` form, no PEFT needed to load it);
    ``state`` as in ``merged_state_dict``."""
    lm = model.get_base_model()
    lm.save_pretrained(path, state_dict=merged_state_dict(model, state))
    return Path(path)


def save_base(model: torch.nn.Module, path: str | Path) -> Path:
    """Write the base weights (``save_pretrained`` form) once merges have moved them."""
    model.get_base_model().save_pretrained(path, state_dict=base_state_dict(model))
    return Path(path)


@torch.no_grad()
def load_base(model: torch.nn.Module, path: str | Path) -> None:
    """Copy base weights written by ``save_base`` into ``model``'s base layers."""
    from safetensors.torch import load_file

    saved: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        saved |= load_file(file)
    lm = model.get_base_model()
    missing = []
    for key, value in lm.state_dict(keep_vars=True).items():
        if ".lora_" in key:
            continue
        plain = _plain_name(key)
        if plain in saved:
            value.copy_(saved[plain])
        else:
            missing.append(plain)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied:
        raise ValueError(f"{str(path)!r}: base weights lack {sorted(set(missing) - tied)[:3]}")


def load_adapter_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load the adapter that ``PeftModel.save_pretrained`` wrote to ``path`` into ``model``."""
    from safetensors.torch import load_file

    peft = _peft()
    file = Path(path) / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r} holds no adapter (no adapter_model.safetensors)")
    result = peft.set_peft_model_state_dict(model, load_file(file))
    if result.unexpected_keys:
        raise ValueError(f"{str(file)!r}: unexpected adapter keys {result.unexpected_keys[:3]}")


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a PEFT adapter (``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_merged_adapter(path: str | Path, dtype: torch.dtype = torch.float32):
    """The base model named in ``path``'s adapter config plus that adapter, merged into a
    plain transformers model (the starting policy, and so the reference)."""
    from transformers import AutoModelForCausalLM

    peft = _peft()
    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    base_path = config.get("base_model_name_or_path")
    if not base_path:
        raise ValueError(f"{str(path)!r}: {ADAPTER_CONFIG} names no base_model_name_or_path")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    return peft.PeftModel.from_pretrained(base, str(path)).merge_and_unload(), base_path


class AdaptersOffReference:
    """The reference of a LoRA policy: the policy itself with its adapters switched off
    (``Reference.build`` picks it). Holds no weights of its own; ``module`` is the
    policy's, so memory metrics count it once."""

    equals_policy = False
    """Never taken as equal: its log-probs are always computed (with adapters off)."""

    def __init__(self, policy) -> None:
        self.policy = policy

    @property
    def module(self) -> torch.nn.Module:
        """What the log-prob pass calls: the policy's (under DDP, its wrapping)."""
        return self.policy.module

    @property
    def model(self) -> torch.nn.Module:
        """The policy's PEFT model, whose adapters are switched off."""
        return self.policy.model

    def distribute(self, strategy: str) -> None:
        """Nothing to wrap: the policy's module is the reference's."""

    def policy_stepped(self) -> None:
        """Nothing to track: the reference is always the adapters-off policy."""

    def compare_to(self, policy) -> None:
        """Nothing to compare: see ``equals_policy``."""

    def logp(self, batch, micro_size: int) -> torch.Tensor:
        """Log-probs ``[N, T]`` of a whole batch under the base weights, no gradient, in
        eval mode (so that ``model.lora.dropout`` or any dropout left on stays off). Under
        DDP the pass runs through the wrapper without gradient, so no adapter is expected
        to receive one."""
        was_training = self.model.training
        self.model.eval()
        try:
            with adapters_off(self.model):
                return self.policy.logp_no_grad(batch, micro_size)
        finally:
            self.model.train(was_training)

    def reset_to(self, policy, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Iterative RL under LoRA: merge the adapters into the base and start fresh ones
        (``merge_and_restart``), so the reference becomes the current policy. Every rank
        takes rank 0's fresh adapters (DDP: broadcast here; FSDP2: scattered shards), so
        the processes never disagree."""
        from grpo.distributed import is_sharded

        merge_and_restart(policy.model, optimizer)
        if is_sharded(policy.module):
            return  # every rank took its shards of rank 0's fresh adapters
        with torch.no_grad():
            for p in policy.trainable_parameters():
                policy.runtime.broadcast(p)

    def save(self, directory: str | Path) -> None:
        """Write the base weights (they move at every ``reset_to``)."""
        save_base(self.model, directory)

    save_pretrained = save  # what ``checkpoint.save_checkpoint`` calls

    def load(self, directory: str | Path) -> None:
        load_base(self.model, directory)
