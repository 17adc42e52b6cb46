"""The algorithm registry: what each estimator needs and how it turns scored rollouts into
advantages. The trainer asks the chosen algorithm; no other module tests its name.

An algorithm declares:

- ``clipped``: whether the policy loss clips the ratio (PPO, GRPO) or not (RLOO);
- ``kl_in_loss``: whether ``beta * KL`` sits in the loss (GRPO, eq. IV.I) or was already
  put into the reward (RLOO, PPO);
- ``kl_estimator``: the KL estimator it optimises, the one logged as ``kl``;
- ``needs_old_logp(sample_logp_exact)``: whether the trainer must run the policy once more
  right after sampling, given whether the engine's ``sample_logp`` is the policy's;
- ``prepare(batch, scored, micro_size)``: set ``batch.advantages [N, T]`` (and extras);
- ``update(mini, micro_size)``: train what the algorithm owns besides the policy (PPO's
  critic), once per policy optimizer step; ``{}`` for the others;
- ``modules()``, ``optimizers()``, ``state_dict()``, ``load_state_dict()``: what it owns,
  for memory metrics and checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from grpo.config import Config
from grpo.runtime import Runtime
from grpo.types import Batch, Scored


class Algorithm(Protocol):
    clipped: bool
    kl_in_loss: bool
    kl_estimator: str

    def needs_old_logp(self, sample_logp_exact: bool) -> bool: ...

    def prepare(self, batch: Batch, scored: Scored, micro_size: int) -> None: ...

    def update(self, mini: Batch, micro_size: int) -> dict[str, float]: ...

    def modules(self) -> list[torch.nn.Module]: ...

    def optimizers(self) -> list[torch.optim.Optimizer]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


AlgorithmFactory = Callable[[Config, Runtime, Any], Algorithm]

ALGORITHMS: dict[str, AlgorithmFactory] = {}
"""Algorithm name (``algorithm.name``) -> factory ``(cfg, runtime, tokenizer)``."""


def register_algorithm(name: str) -> Callable[[AlgorithmFactory], AlgorithmFactory]:
    def decorator(factory: AlgorithmFactory) -> AlgorithmFactory:
        ALGORITHMS[name] = factory
        return factory

    return decorator


def build_algorithm(cfg: Config, runtime: Runtime, tokenizer: Any) -> Algorithm:
    """The algorithm ``cfg.algorithm.name`` names, built for this run."""
    return ALGORITHMS[cfg.algorithm.name](cfg, runtime, tokenizer)


def several_updates(cfg: Config) -> bool:
    """More than one optimizer step per rollout batch: the policy moves between sampling and
    a later update, so the ratio needs the sampling policy's log-probs (``old_logp``)."""
    return cfg.algorithm.num_iterations > 1 or cfg.optim.num_minibatches > 1
