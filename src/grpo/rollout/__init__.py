"""Generation engines behind one small protocol.

An engine turns B prompts into a ``Rollout`` of G completions each (shape letters in
``grpo.types``). ``make_engine("torch")`` is the default; optional backends are imported
only when chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from grpo.rollout.torch_engine import TorchEngine
from grpo.types import Rollout, SamplingParams


class Engine(Protocol):
    """Samples ``params.num_generations`` completions for each prompt."""

    def generate(
        self,
        model: torch.nn.Module,
        prompts: list[list[int]],
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """B token-id prompts -> Rollout with N = B*G completion rows, grouped by prompt."""
        ...


def _vllm_engine(**kwargs: object) -> Engine:
    """The vLLM engine (GPU generation); imports vllm only when chosen."""
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "rollout engine 'vllm' needs the vllm package (GPU only): pip install 'grpo[vllm]'"
        ) from err
    raise NotImplementedError("rollout engine 'vllm' is not implemented yet; use 'torch'")


ENGINES: dict[str, Callable[..., Engine]] = {"torch": TorchEngine, "vllm": _vllm_engine}
"""Engine name -> factory taking the engine's keyword options."""


def make_engine(name: str, **kwargs: object) -> Engine:
    """Build the engine called ``name`` (a key of ``ENGINES``) with its options."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; allowed: {', '.join(sorted(ENGINES))}")
    return ENGINES[name](**kwargs)


def select_groups(rollout: Rollout, keep: torch.Tensor) -> Rollout:
    """The groups where ``keep [B]`` is True, whole (all G completions of each)."""
    g = rollout.group_size
    rows = keep.repeat_interleave(g)  # [N]
    return Rollout(
        prompt_ids=rollout.prompt_ids[keep],
        prompt_mask=rollout.prompt_mask[keep],
        completion_ids=rollout.completion_ids[rows],
        completion_mask=rollout.completion_mask[rows],
        sample_logp=rollout.sample_logp[rows],
        truncated=rollout.truncated[rows],
        group_size=g,
    )


def _pad_to(x: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    pad = (width - x.shape[1], 0) if left else (0, width - x.shape[1])
    return torch.nn.functional.pad(x, pad, value=value)


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """Rollouts of the same G joined group after group: prompts re-left-padded to the
    longest P, completions re-right-padded to the longest T (padding stays masked)."""
    p = max(r.prompt_ids.shape[1] for r in parts)
    t = max(r.completion_ids.shape[1] for r in parts)
    return Rollout(
        prompt_ids=torch.cat([_pad_to(r.prompt_ids, p, pad_token_id, True) for r in parts]),
        prompt_mask=torch.cat([_pad_to(r.prompt_mask, p, 0, True) for r in parts]),
        completion_ids=torch.cat(
            [_pad_to(r.completion_ids, t, pad_token_id, False) for r in parts]
        ),
        completion_mask=torch.cat([_pad_to(r.completion_mask, t, 0, False) for r in parts]),
        sample_logp=torch.cat([_pad_to(r.sample_logp, t, 0.0, False) for r in parts]),
        truncated=torch.cat([r.truncated for r in parts]),
        group_size=parts[0].group_size,
    )


__all__ = ["ENGINES", "Engine", "TorchEngine", "concat_rollouts", "make_engine", "select_groups"]
