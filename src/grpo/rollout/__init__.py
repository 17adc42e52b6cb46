"""Generation engines behind one small protocol.

An engine turns B prompts into a ``Rollout`` of G completions each (shape letters in
``grpo.types``). ``make_engine("torch")`` is the default; optional backends are imported
only when chosen.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Protocol

import torch

from grpo.rollout.torch_engine import TorchEngine
from grpo.types import Rollout, SamplingParams


class Engine(Protocol):
    """Samples ``params.num_generations`` completions for each prompt, and has a lifecycle:
    ``sync`` after each optimizer step (an engine with its own copy of the weights reloads
    them), ``close`` at the end of a run."""

    exact_logp: bool
    """Whether ``Rollout.sample_logp`` equals the policy's log-probs when sampling is not
    truncated (top-k / top-p): then no extra forward pass is needed for them."""

    def generate(
        self,
        model: torch.nn.Module,
        prompts: list[list[int]],
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """B token-id prompts -> Rollout with N = B*G completion rows, grouped by prompt."""
        ...

    def sync(self, model: torch.nn.Module) -> None:
        """Take the policy's new weights (called after every optimizer step)."""
        ...

    def close(self) -> None:
        """Release what the engine holds (called once, when the run ends)."""
        ...


def _vllm_unavailable() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "needs the vllm package (GPU only): pip install 'grpo[vllm]'"
    return "is not implemented yet"


def _vllm_engine(**kwargs: object) -> Engine:
    """The vLLM engine (GPU generation); imports vllm only when chosen."""
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise ImportError(f"rollout engine 'vllm' {_vllm_unavailable()}") from err
    raise NotImplementedError("rollout engine 'vllm' is not implemented yet; use 'torch'")


ENGINES: dict[str, Callable[..., Engine]] = {"torch": TorchEngine, "vllm": _vllm_engine}
"""Engine name -> factory taking the engine's keyword options."""

UNAVAILABLE: dict[str, Callable[[], str | None]] = {"vllm": _vllm_unavailable}
"""Engine name -> why it cannot run in this environment (None: it can); checked when the
config is validated, so a run that cannot generate stops before any model loads."""


def engine_unavailable(name: str) -> str | None:
    """Why engine ``name`` cannot run here, as the end of a sentence, or None if it can."""
    check = UNAVAILABLE.get(name)
    return check() if check else None


def make_engine(name: str, **kwargs: object) -> Engine:
    """Build the engine called ``name`` (a key of ``ENGINES``) with its options."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; allowed: {', '.join(sorted(ENGINES))}")
    return ENGINES[name](**kwargs)


__all__ = ["ENGINES", "UNAVAILABLE", "Engine", "TorchEngine", "engine_unavailable", "make_engine"]
