"""Arithmetic answered directly, with no scratchpad: ``47+85=`` -> ``132``.

The same problems and the same train/test split as the scratchpad task of the same
digits and operators (``ArithmeticTask`` draws them), but the completion is the answer
alone, a few tokens, as most models pretrained on arithmetic write it. It is the harder
form for a small model (every carry is worked out inside one forward pass) and the one a
user's own model is likely to have been trained on, so a GRPO recipe is checked on it as
well as on the scratchpad form.

Verifiers: ``direct_correctness_reward`` (outcome), ``direct_step_rewards`` (the answer is
the one step) and ``direct_extract_answer`` for majority voting. All of them accept any
string and never raise.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from grpo.tasks.arithmetic import (
    MAX_ANSWER_DIGITS,
    ArithmeticTask,
    _as_int,
    _completion_text,
    split_steps,
)

_INTEGER_RE = re.compile(r"-?[0-9]+")  # [0-9], never \d (other scripts' digits)


def _direct_answer(completion: Any) -> int | None:
    """The integer a completion consists of (surrounding whitespace ignored), else None."""
    text = _completion_text(completion).strip()
    if not _INTEGER_RE.fullmatch(text) or len(text) > MAX_ANSWER_DIGITS:
        return None
    return int(text)


def direct_extract_answer(completion: Any) -> str | None:
    """The answer of a direct completion as a canonical integer string (for maj@k).

    >>> direct_extract_answer("0132")
    '132'
    >>> direct_extract_answer("132 apples") is None
    True
    """
    given = _direct_answer(completion)
    return None if given is None else str(given)


def direct_correctness_reward(
    prompts: list, completions: list, answer: list, **kwargs: Any
) -> list[float]:
    """Outcome reward: 1.0 when the completion is exactly the right integer, else 0.0.

    Surrounding whitespace is ignored; any other text (a scratchpad, a second number,
    ``A:``) scores 0, so this verifier and the scratchpad task's one never agree on a
    completion.

    >>> direct_correctness_reward(
    ...     prompts=["47+85="] * 4,
    ...     completions=["132", " 132\\n", "A:132", "132 133"],
    ...     answer=["132"] * 4,
    ... )
    [1.0, 1.0, 0.0, 0.0]
    """
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        given = _direct_answer(completion)
        rewards.append(float(given is not None and given == _as_int(expected)))
    return rewards


def direct_step_rewards(
    prompt: str, completion: str, problem: dict
) -> tuple[list[float], list[int]]:
    """Process reward of a direct answer: one step, the answer, scored as the outcome.

    Returns ``(scores, ends)`` of length 1; the step ends at the completion's last visible
    character (0 when it has none), as a missing answer does in the scratchpad task.

    >>> direct_step_rewards("47+85=", "132", {"answer": "132"})
    ([1.0], [2])
    >>> direct_step_rewards("47+85=", "", {"answer": "132"})
    ([0.0], [0])
    """
    text = _completion_text(completion)
    steps = split_steps(text)
    end = steps[-1][1] if steps else 0
    given = _direct_answer(text)
    return [float(given is not None and given == _as_int(problem["answer"]))], [end]


@dataclass(frozen=True)
class DirectArithmeticTask:
    """``problems`` of ``base`` (its split included), answered with the number alone."""

    base: ArithmeticTask
    """The scratchpad task whose problems and split this task shares."""

    @property
    def max_completion_chars(self) -> int:
        """Longest answer in characters (EOS not counted): one more digit than an operand."""
        return self.base.digit_range[1] + 1

    @property
    def max_completion_tokens(self) -> int:
        """``max_completion_chars`` plus EOS (see ``ArithmeticTask.max_completion_tokens``)."""
        return self.max_completion_chars + 1

    @property
    def reward_functions(self) -> dict[str, Callable[..., list[float]]]:
        """The outcome verifier, TRL-style ``f(prompts, completions, **columns)``."""
        return {"correctness": direct_correctness_reward}

    def problems(self, split: Literal["train", "test"], n: int, seed: int) -> list[dict]:
        """The base task's problems: the same for the same arguments, splits disjoint."""
        return self.base.problems(split, n, seed)

    @staticmethod
    def demonstration(problem: dict) -> str:
        """The correct completion: the answer alone.

        >>> DirectArithmeticTask(ArithmeticTask(2, "+")).demonstration({"answer": "132"})
        '132'
        """
        return str(problem["answer"])

    @staticmethod
    def step_rewards(prompt: str, completion: str, problem: dict) -> tuple[list[float], list[int]]:
        """See ``direct_step_rewards``."""
        return direct_step_rewards(prompt, completion, problem)

    @staticmethod
    def extract_answer(completion: Any) -> str | None:
        """See ``direct_extract_answer``."""
        return direct_extract_answer(completion)
