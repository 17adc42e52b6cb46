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
- ``learners``: the models it trains beside the policy (PPO's critic), each stepped once
  per policy optimizer step and saved with the run; none for GRPO and RLOO.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from grpo.config import Config
from grpo.runtime import Runtime
from grpo.types import Batch, Scored


class Learner(Protocol):
    """A model an algorithm trains beside the policy, with its own optimizer."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def update(self, mini: Batch, micro_size: int) -> dict[str, float]:
        """One optimizer step on ``mini`` (the policy's mini-batch); its metrics."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Algorithm(Protocol):
    clipped: bool
    kl_in_loss: bool
    kl_estimator: str
    learners: Sequence[Learner]

    def needs_old_logp(self, sample_logp_exact: bool) -> bool: ...

    def prepare(self, batch: Batch, scored: Scored, micro_size: int) -> None: ...


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
