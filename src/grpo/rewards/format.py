"""Format rewards: does the completion have the shape the prompt asked for?"""

from __future__ import annotations

from typing import Any

from .math import last_boxed
from .scoring import register_reward
from .text import completion_text

_OPEN, _CLOSE = "<think>", "</think>"


@register_reward("think_format")
def think_format(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """1.0 for the R1 format, ``<think>reasoning</think>`` then an answer, else 0.0.

    Exactly one think block, at the start, with non-empty reasoning, followed by non-empty
    text. Chat templates that end the prompt with ``<think>`` (DeepSeek-R1, Qwen3) prefill
    the opening tag, so a string prompt ending in ``<think>`` counts as the completion's own.

    >>> think_format(
    ...     prompts=["2+2?"] * 4,
    ...     completions=[
    ...         "<think>2 and 2 make 4</think> 4",
    ...         "<think>2 and 2 make 4</think>",
    ...         "4",
    ...         "<think>hmm</think><think>again</think> 4",
    ...     ],
    ... )
    [1.0, 0.0, 0.0, 0.0]
    >>> think_format(prompts=["2+2? <think>\\n"], completions=["2 and 2 make 4\\n</think>\\n4"])
    [1.0]
    """
    return [
        float(_is_think_format(completion_text(c), p))
        for p, c in zip(prompts, completions, strict=True)
    ]


def _is_think_format(text: str, prompt: Any) -> bool:
    if isinstance(prompt, str) and prompt.rstrip().endswith(_OPEN):
        text = _OPEN + text
    text = text.strip()
    if not text.startswith(_OPEN) or text.count(_OPEN) != 1 or text.count(_CLOSE) != 1:
        return False
    reasoning, answer = text[len(_OPEN) :].split(_CLOSE)
    return bool(reasoning.strip()) and bool(answer.strip())


@register_reward("boxed_format")
def boxed_format(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """1.0 if the completion has exactly one closed ``\\boxed{...}``, else 0.0.

    >>> boxed_format(
    ...     prompts=["2+2?"] * 4,
    ...     completions=[r"so \\boxed{4}", r"\\boxed{4} or \\boxed{5}", "4", r"\\boxed{4"],
    ... )
    [1.0, 0.0, 0.0, 0.0]
    """
    texts = [completion_text(c) for c in completions]
    return [float(t.count("\\boxed") == 1 and last_boxed(t) is not None) for t in texts]
