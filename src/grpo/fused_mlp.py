"""SwiGLU MLPs that keep two ``[M, I]`` activations for the backward pass instead of four.

A SwiGLU MLP (Shazeer 2020, "GLU Variants Improve Transformer"; Llama, Qwen, Mistral)
computes ``y = down(silu(a) * b)`` with ``a = gate(x)`` and ``b = up(x)``, ``I`` the
intermediate size (about 5x the hidden size). Run op by op, autograd keeps four ``[M, I]``
tensors per layer: ``a`` (for SiLU's backward), ``s = silu(a)`` and ``b`` (for the
product's) and ``m = s * b`` (for ``down``'s weight gradient). ``s`` and ``m`` are
elementwise in ``a`` and ``b``, so ``_SwiGLUDown`` keeps only ``a`` and ``b`` and
recomputes ``m`` in the backward pass: the same maths and the same ops (the forward is
transformers' own; the backward calls the same kernels autograd would), for two SiLUs
and one product per layer more, elementwise and cheap next to the MLP's three matmuls.
Passes without a graph (generation, the old-policy and reference passes) run
transformers' forward unchanged. This is the recomputation of Liger-Kernel's fused SwiGLU,
written with PyTorch ops so that it runs on any device.

When ``down`` is not a plain ``torch.nn.Linear`` (a PEFT LoRA layer) or carries hooks,
it runs as a module and keeps its own input ``m``; ``_SwiGLU`` then drops ``s`` only.

``fuse_swiglu_mlps`` replaces the forward of MLP modules, one instance at a time, whose
transformers class is in ``SWIGLU_MLPS`` (each checked to compute exactly
``down_proj(act_fn(gate_proj(x)) * up_proj(x))``) and whose ``act_fn`` is SiLU; every
other module is left as it is. Parameters are read from the modules at each call (FSDP2
swaps in unsharded ones during its forward), and no parameter or buffer is added, so
``state_dict`` and ``save_pretrained`` are unchanged.

Shape letters: M token positions (any leading dims), H hidden size, I intermediate size.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor
from torch.nn import functional as F

from grpo.runtime import AutocastState

SWIGLU_MLPS = frozenset(
    f"transformers.models.{family}.modeling_{family}.{name}"
    for family, name in [
        ("cohere", "CohereMLP"),
        ("cohere2", "Cohere2MLP"),
        ("granite", "GraniteMLP"),
        ("helium", "HeliumMLP"),
        ("llama", "LlamaMLP"),
        ("ministral", "MinistralMLP"),
        ("mistral", "MistralMLP"),
        ("olmo2", "Olmo2MLP"),
        ("olmo3", "Olmo3MLP"),
        ("qwen2", "Qwen2MLP"),
        ("qwen3", "Qwen3MLP"),
        ("smollm3", "SmolLM3MLP"),
    ]
)
"""transformers MLP classes whose forward is exactly
``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` over ``nn.Linear`` layers (read in
transformers 5's source; ``tests/test_fused_mlp.py`` checks each one against the unfused
model). Gemma's MLPs have the same form with GELU: the SiLU check leaves them alone."""


def _silu_classes() -> tuple[type, ...]:
    from transformers.activations import SiLUActivation

    return (SiLUActivation, torch.nn.SiLU)


class _SwiGLUDown(torch.autograd.Function):
    """``y [M, H] = (silu(a) * b) @ weight^T + bias`` saving ``a``, ``b`` (``[M, I]``) and
    ``weight``; ``m = silu(a) * b`` is recomputed in the backward pass."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        m = F.silu(a) * b  # [M, I]
        ctx.autocast = AutocastState.current(a.device.type)
        ctx.save_for_backward(a, b, weight)
        return F.linear(m, weight, bias)  # [M, H]

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        a, b, weight = ctx.saved_tensors
        need_a, need_b, need_w, need_bias = ctx.needs_input_grad
        grad_a = grad_b = grad_w = grad_bias = None
        with ctx.autocast.again():  # the matmuls and casts autograd would run
            if need_w:
                m = F.silu(a) * b  # [M, I], recomputed
                grad_w = (grad_y.flatten(0, -2).T @ m.flatten(0, -2)).to(weight.dtype)  # [H, I]
                del m
            if need_bias:
                grad_bias = grad_y.flatten(0, -2).sum(dim=0).to(weight.dtype)  # [H]
            if need_a or need_b:
                grad_m = grad_y @ weight  # [M, I] d loss / d m, overwritten below
                grad_a, grad_b = _silu_mul_backward(grad_m, a, b, need_a, need_b, True)
        return grad_a, grad_b, grad_w, grad_bias


class _SwiGLU(torch.autograd.Function):
    """``silu(a) * b`` (``[M, I]``) saving ``a`` and ``b`` only; SiLU is recomputed in
    the backward pass."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.autocast = AutocastState.current(a.device.type)
        ctx.save_for_backward(a, b)
        return F.silu(a) * b  # [M, I]

    @staticmethod
    def backward(ctx, grad_m: Tensor):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad
        with ctx.autocast.again():
            return _silu_mul_backward(grad_m, a, b, need_a, need_b, False)


def _silu_mul_backward(
    grad_m: Tensor, a: Tensor, b: Tensor, need_a: bool, need_b: bool, overwrite: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``m = silu(a) * b`` w.r.t. ``a`` and ``b`` (``[M, I]``) from
    ``grad_m`` (overwritten when ``overwrite``: a temporary of the caller's), with the
    kernels autograd's ``MulBackward`` and ``SiluBackward`` use; ``silu(a)`` is
    recomputed, and at most three ``[M, I]`` tensors are alive at once."""
    grad_b = grad_m * F.silu(a) if need_b else None  # [M, I]
    if not need_a:
        return None, grad_b
    grad_s = grad_m.mul_(b) if overwrite else grad_m * b  # [M, I] d loss / d silu(a)
    return torch.ops.aten.silu_backward(grad_s, a), grad_b  # [M, I], [M, I]


def _fused_forward(self: torch.nn.Module, x: Tensor) -> Tensor:
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` keeping ``gate_proj(x)`` and
    ``up_proj(x)`` only; transformers' own forward where no graph is recorded."""
    if not torch.is_grad_enabled():
        return type(self).forward(self, x)
    a = self.gate_proj(x)  # [M, I]
    b = self.up_proj(x)  # [M, I]
    down = self.down_proj
    if _runs_as_weights(down):
        return _SwiGLUDown.apply(a, b, down.weight, down.bias)  # [M, H]
    return down(_SwiGLU.apply(a, b))  # [M, H], down keeps its own input


def _runs_as_weights(down: torch.nn.Module) -> bool:
    """Whether ``down`` is a plain ``torch.nn.Linear`` that nothing hooks, so that its
    matmul can run inside ``_SwiGLUDown`` without calling the module."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return type(down) is torch.nn.Linear and not any(getattr(down, h, None) for h in hooks)


def is_fusable(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an allowlisted SwiGLU MLP with SiLU whose forward nobody has
    replaced yet (``SWIGLU_MLPS``)."""
    cls = type(module)
    return (
        f"{cls.__module__}.{cls.__qualname__}" in SWIGLU_MLPS
        and isinstance(getattr(module, "act_fn", None), _silu_classes())
        and "forward" not in vars(module)
    )


def fuse_swiglu_mlps(model: torch.nn.Module) -> int:
    """Give every allowlisted SwiGLU MLP of ``model`` the forward that keeps two ``[M, I]``
    activations instead of four, in place, instance by instance (the transformers classes
    are not touched). Works before or after PEFT adds adapters; returns how many MLPs."""
    fused = 0
    for module in model.modules():
        if is_fusable(module):
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
    return fused


def is_fused(module: torch.nn.Module) -> bool:
    """Whether ``fuse_swiglu_mlps`` gave ``module`` its forward."""
    forward = vars(module).get("forward")
    return getattr(forward, "__func__", None) is _fused_forward
