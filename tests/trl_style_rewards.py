"""Reward functions written the way TRL's ``trl/rewards`` and open-r1's ``rewards.py`` write
them: the same signatures and argument shapes, read with ``completion[0]["content"]`` on
conversational data and as plain strings on plain data. The trainer must run them
unchanged; tests load them by path (``tests/trl_style_rewards.py:accuracy_reward``).

``record_call`` scores nothing (it returns None for every sample): it keeps each call's
arguments so that a test can recompute every other function's rewards on its own.
"""

import math
import re

from math_verify import LatexExtractionConfig, parse, verify

# ---- conversational: each completion is [{"role": "assistant", "content": text}] ------


def _is_right(content, solution):
    """math-verify's verdict on one answer, or None where the gold answer does not parse."""
    gold = parse(solution)
    if not gold:
        return None
    answer = parse(
        content,
        extraction_config=[
            LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)
        ],
        extraction_mode="first_match",
    )
    return bool(verify(gold, answer))


def accuracy_reward(completions, solution, log_extra=None, **kwargs):
    """1.0 if the answer matches the solution under math-verify, 0.0 if not, None where the
    solution itself does not parse (TRL's ``accuracy_reward``)."""
    contents = [completion[0]["content"] for completion in completions]
    verdicts = [_is_right(c, s) for c, s in zip(contents, solution, strict=True)]
    if log_extra is not None:
        log_extra("solution", list(solution))
    return [None if v is None else float(v) for v in verdicts]


def format_reward(completions, **kwargs):
    """1.0 for ``<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>``, else 0.0 (open-r1)."""
    pattern = r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$"
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if re.match(pattern, c, re.DOTALL | re.MULTILINE) else 0.0 for c in contents]


def tag_count_reward(completions, **kwargs):
    """0.25 for each of the four format tags present exactly once (open-r1)."""

    def count(text):
        tags = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")
        return sum(0.25 for tag in tags if text.count(tag) == 1)

    return [count(completion[0]["content"]) for completion in completions]


def len_reward(completions, solution, **kwargs):
    """Kimi 1.5's length reward (open-r1): ``lam = 0.5 - (len - min) / (max - min)`` over the
    batch's character lengths; a right answer gets ``lam``, a wrong one ``min(0, lam)``;
    all 0 when every completion has the same length. An unparseable solution counts as
    right."""
    contents = [completion[0]["content"] for completion in completions]
    right = [_is_right(c, s) is not False for c, s in zip(contents, solution, strict=True)]
    lengths = [len(c) for c in contents]
    shortest, longest = min(lengths), max(lengths)
    if shortest == longest:
        return [0.0] * len(contents)
    rewards = []
    for length, ok in zip(lengths, right, strict=True):
        lam = 0.5 - (length - shortest) / (longest - shortest)
        rewards.append(float(lam if ok else min(0.0, lam)))
    return rewards


def think_format_reward(completions, **kwargs):
    """1.0 when the completion opens with one ``<think>...</think>`` block (TRL's)."""
    pattern = r"^<think>(?!.*<think>)(.*?)</think>.*$"
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if re.match(pattern, c, re.DOTALL | re.MULTILINE) else 0.0 for c in contents]


# ---- any format -----------------------------------------------------------------------


def soft_overlong_punishment(completion_ids, **kwargs):
    """DAPO's soft overlong punishment on token counts (TRL's, with max length 12 and a
    cache of 8): 0 up to 4 tokens, then down linearly to -1 at 12 and beyond."""
    max_len, cache = 12, 8
    rewards = []
    for ids in completion_ids:
        n = len(ids)
        if n <= max_len - cache:
            rewards.append(0.0)
        elif n <= max_len:
            rewards.append((max_len - cache - n) / cache)
        else:
            rewards.append(-1.0)
    return rewards


# ---- plain data: each completion is a string (TRL's documentation examples) -----------


def length_target_reward(completions, **kwargs):
    """Closer to 6 characters is better (TRL's ``reward_len`` example, with target 6)."""
    return [-abs(6 - len(completion)) for completion in completions]


def standard_format_reward(completions, **kwargs):
    """1.0 for ``<think>...</think><answer>...</answer>`` on a string completion, else 0.0."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    return [1.0 if re.match(pattern, c) else 0.0 for c in completions]


# ---- the recorder -----------------------------------------------------------------------

CALLS = []
"""One entry per call of ``record_call``: the arguments it was given."""


def record_call(
    prompts, completions, completion_ids, trainer_state, log_metric, log_extra, **kwargs
):
    """Keep the call's arguments; log how many completions it saw; score nothing."""
    CALLS.append(
        {
            "prompts": prompts,
            "completions": completions,
            "completion_ids": completion_ids,
            "columns": kwargs,
            "global_step": trainer_state.global_step,
            "max_steps": trainer_state.max_steps,
            "epoch": trainer_state.epoch,
            "log_extra": callable(log_extra),
        }
    )
    log_metric("recorded_completions", float(len(completions)))
    return [math.nan] * len(completions)
