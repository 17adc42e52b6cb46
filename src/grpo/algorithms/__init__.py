"""Registered algorithms (GRPO, RLOO, PPO): see ``registry`` for what each declares."""

from grpo.algorithms import grpo, ppo, rloo  # noqa: F401  (importing registers them)
from grpo.algorithms.registry import (
    ALGORITHMS,
    Algorithm,
    build_algorithm,
    register_algorithm,
    several_updates,
)

__all__ = ["ALGORITHMS", "Algorithm", "build_algorithm", "register_algorithm", "several_updates"]
