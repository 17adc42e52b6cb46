"""Math answer checking with math-verify (TRL's ``accuracy_reward``, answer taken as below).

The completion's final answer is its last ``\\boxed{...}`` when it has one; otherwise
math-verify's own extraction of the whole text (a phrase such as "the answer is 12", else
the last number or LaTeX expression). Equivalent forms match: ``\\frac{1}{2}``, ``1/2`` and
``0.5`` are the same answer.
"""

from __future__ import annotations

import threading
from typing import Any

from math_verify import parse, verify

from .scoring import register_reward
from .text import completion_text


@register_reward("math_accuracy")
def math_accuracy(
    prompts: list, completions: list, solution: list[str], **kwargs: Any
) -> list[float | None]:
    """1.0 where the completion's final answer equals the ``solution`` column, else 0.0.

    Returns None for a sample whose gold solution math-verify cannot parse (as TRL does), so
    that it neither rewards nor punishes. Never raises on malformed completions.

    >>> math_accuracy(
    ...     prompts=["Halve 1."] * 4,
    ...     completions=[r"So \\boxed{1/2}", r"\\boxed{\\frac{1}{3}}", "no idea", "0.5"],
    ...     solution=["0.5"] * 4,
    ... )
    [1.0, 0.0, 0.0, 1.0]
    >>> math_accuracy(prompts=["?"], completions=["4"], solution=["not maths"])
    [None]
    """
    return [_accuracy(completion_text(c), s) for c, s in zip(completions, solution, strict=True)]


def _accuracy(text: str, solution: Any) -> float | None:
    # math-verify times out through signal.alarm, which only the main thread may use.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(str(solution), parsing_timeout=timeout) if solution is not None else []
    except Exception:
        gold = []
    if not gold:
        return None
    try:
        # Only the last box when there is one: an earlier box or any later text is ignored.
        # An unclosed box (truncated at max_completion_length?) is no answer: "12" may be 123.
        boxed = last_boxed(text) if "\\boxed{" in text else text
        answer = parse(boxed or "", parsing_timeout=timeout)
        return float(verify(gold, answer, timeout_seconds=timeout))
    except Exception:
        return 0.0


def last_boxed(text: str) -> str | None:
    """The last ``\\boxed{...}`` in ``text``, braces balanced; None if none or unclosed.

    >>> last_boxed(r"\\boxed{1} then \\boxed{\\frac{1}{2}} so")
    '\\\\boxed{\\\\frac{1}{2}}'
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for end in range(start + len("\\boxed"), len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return text[start : end + 1]
    return None
