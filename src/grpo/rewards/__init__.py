"""Reward functions: plain callables with TRL's signature, a registry, and batch scoring.

``REWARDS`` maps a name to a reward function; the built-ins below register themselves, and
built-in tasks (``grpo.tasks``) register theirs when imported. ``load_reward_function``
resolves a config string: a registered name, ``"path/to/file.py:function"`` or
``"package.module:function"``. ``score`` calls the functions on a batch, checks what they
return and combines them with weights.
"""

# Importing the built-ins registers them in REWARDS.
from .code import code_execution, make_code_execution
from .format import boxed_format, think_format
from .math import math_accuracy
from .scoring import (
    REWARDS,
    RewardError,
    RewardFunction,
    RewardOutput,
    is_conversational,
    load_reward_function,
    register_reward,
    reward_arguments,
    reward_name,
    score,
    score_completions,
    trainer_state,
)
from .text import completion_text

__all__ = [
    "REWARDS",
    "RewardError",
    "RewardFunction",
    "RewardOutput",
    "boxed_format",
    "code_execution",
    "completion_text",
    "is_conversational",
    "load_reward_function",
    "make_code_execution",
    "math_accuracy",
    "register_reward",
    "reward_arguments",
    "reward_name",
    "score",
    "score_completions",
    "think_format",
    "trainer_state",
]
