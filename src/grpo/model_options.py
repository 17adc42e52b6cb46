"""Per-model training options applied once after loading: dropout off, fused SwiGLU MLPs,
checkpointing, LoRA adapters (``grpo.lora``).

* **Dropout off** (``model.disable_dropout``, TRL's name). GRPO's ratio and KL compare the
  policy's log-probs with the sampler's, the old policy's and the reference's; dropout
  makes the training pass a different function from those (the reference runs in eval
  mode), so the KL is not 0 at step one (measured: 0.0016 on a GPT-2 with its default
  dropout 0.1) and the ratio is not 1 before any update.
* **Gradient checkpointing** (``model.gradient_checkpointing``): transformers' own, each
  decoder layer's activations recomputed in the backward pass (``use_reentrant=False``),
  same gradients for about a third more compute. Checkpointed layers drop KV caches, so
  the training pass then runs each completion with its prompt (``policy_loss``).
* **Fused SwiGLU MLPs** (``model.fused_mlp``, ``grpo.fused_mlp``): the MLPs of Llama,
  Qwen, Mistral, ... keep two ``[M, I]`` activations for the backward pass instead of
  four, recomputing the cheap elementwise ones; the same gradients.
"""

from __future__ import annotations

import torch

from grpo.fused_mlp import fuse_swiglu_mlps


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout probability of ``model`` to 0, in place.

    Covers ``torch.nn.Dropout`` modules (GPT-2's residual and attention dropout) and the
    float attributes transformers' attention layers pass to a functional dropout
    (``attention_dropout`` in Llama, Qwen2, Mistral, ...). Call it before adding LoRA
    adapters, so that ``model.lora.dropout`` still applies to the adapters.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' gradient checkpointing with non-reentrant ``torch.utils.checkpoint``.

    Raises ValueError naming the model class when it does not support checkpointing.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"model.gradient_checkpointing: {type(model).__name__} does not support "
            "gradient checkpointing; set model.gradient_checkpointing=false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' newer name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def apply_model_options(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """``cfg.disable_dropout``, ``cfg.fused_mlp``, ``cfg.gradient_checkpointing``, then
    ``cfg.lora`` (a ``ModelConfig``): returns the model to train, a ``PeftModel`` under
    LoRA."""
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.fused_mlp:
        fuse_swiglu_mlps(model)  # before or after adapters: it reads the layers per call
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora is not None:
        from grpo.lora import add_adapters, is_lora

        if is_lora(model):
            raise ValueError(
                f"model.lora={cfg.lora.model_dump()}: the model given already carries PEFT "
                "adapters; remove model.lora to train them, or pass the plain model"
            )
        model = add_adapters(model, cfg.lora)
    return model
