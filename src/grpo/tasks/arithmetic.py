"""Multi-digit addition and subtraction with a column scratchpad, and its verifiers.

The prompt is the bare problem, ``47+85=``. The completion works the columns from the
right, one line each, then gives the answer::

    7+5+0=12        units: 7 + 5 + carry 0 = 12, write 2, carry 1
    4+8+1=13        tens:  4 + 8 + carry 1 = 13, write 3, carry 1
    A:132           the last carry, then the written digits from the bottom line up

Subtraction always has ``a >= b`` (operands are swapped when drawn the other way round),
so answers are never negative. A column that must borrow writes the borrowed ten on its
first operand, and the next column subtracts the borrow::

    85-47=   ->   15-7-0=8 / 8-4-1=3 / A:38

Why this shape: every line is true arithmetic on single digits, its first three digits
are copied from the prompt (column k from the right) and the previous line (the carry),
so each token depends on a few others at nearly fixed distances, which a model of a
million parameters learns in a few hundred supervised steps. A completion is short:
9 characters per column plus the answer line (add2: 23 characters, add3: 33).

Verifiers: ``correctness_reward`` (outcome), ``format_reward`` (structure) and
``step_rewards`` (one 0/1 score per line, for process supervision); ``extract_answer`` for
majority voting. All of them accept any string and never raise.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

ANSWER_PREFIX = "A:"
MAX_ANSWER_DIGITS = 64  # longer "answers" are wrong anyway; int() of them can be slow or raise

# [0-9], never \d: \d matches other scripts' digits, which int() would happily accept.
_STEP_LINE = r"[0-9]{1,2}[+-][0-9][+-][0-9]=[0-9]{1,2}"
_FORMAT_RE = re.compile(rf"(?:{_STEP_LINE}\n)+{ANSWER_PREFIX}-?[0-9]+")
_ANSWER_RE = re.compile(r"-?[0-9]+")


# ---------------------------------------------------------------- steps (any task)


def split_steps(completion: str, separator: str = "\n") -> list[tuple[str, int]]:
    """Split a completion into reasoning steps at ``separator``.

    A step is a piece between separators with its surrounding whitespace stripped; pieces
    that are empty or only whitespace are not steps. Each step comes with the offset in
    ``completion`` of its last character, which is where its reward is placed (eq. V.I).

    >>> split_steps("7+5+0=12\\n4+8+1=13\\nA:132\\n")
    [('7+5+0=12', 7), ('4+8+1=13', 16), ('A:132', 22)]
    >>> split_steps("")
    []
    """
    if not separator:
        raise ValueError("separator must be a non-empty string")
    steps = []
    start = 0
    for piece in completion.split(separator):
        text = piece.strip()
        if text:
            end = start + len(piece.rstrip()) - 1
            steps.append((text, end))
        start += len(piece) + len(separator)
    return steps


# ---------------------------------------------------------------- the scratchpad


def _digit(n: int, k: int) -> int:
    """Digit k of n counting from the right (k=0 is the units); 0 beyond its length."""
    return (n // 10**k) % 10


def _column(a_k: int, b_k: int, carry_in: int, op: str) -> tuple[str, int]:
    """One scratchpad line for a column and the carry (or borrow) it passes left."""
    if op == "+":
        total = a_k + b_k + carry_in
        return f"{a_k}+{b_k}+{carry_in}={total:02d}", total // 10
    borrow = int(a_k - b_k - carry_in < 0)
    top = a_k + 10 * borrow
    return f"{top}-{b_k}-{carry_in}={top - b_k - carry_in}", borrow


def _num_columns(problem: dict) -> int:
    return max(len(str(problem["a"])), len(str(problem["b"])))


def _parse_carry_out(line: str, op: str) -> int | None:
    """The carry a written line passes left, or None if the line is not a step line."""
    if not re.fullmatch(_STEP_LINE, line):
        return None
    if op == "+":
        result = line.split("=")[1]
        return int(result) // 10
    top = line.split("-")[0]
    return int(int(top) >= 10)


def _parse_answer(line: str) -> int | None:
    """The integer after ``A:`` on an answer line, or None when it is not one."""
    if not line.startswith(ANSWER_PREFIX):
        return None
    value = line[len(ANSWER_PREFIX) :].strip()
    if not _ANSWER_RE.fullmatch(value) or len(value) > MAX_ANSWER_DIGITS:
        return None
    return int(value)


def _completion_text(completion: Any) -> str:
    """TRL passes strings, or for conversational data ``[{"role": ..., "content": ...}]``."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return ""


def _first_answer(completion: str) -> int | None:
    """The answer of the first line that starts with ``A:`` (later ones cannot hedge)."""
    for line in completion.split("\n"):
        line = line.strip()
        if line.startswith(ANSWER_PREFIX):
            return _parse_answer(line)
    return None


def _as_int(answer: Any) -> int | None:
    text = str(answer).strip()
    return int(text) if _ANSWER_RE.fullmatch(text) else None


def extract_answer(completion: Any) -> str | None:
    """The answer a completion gives (its first ``A:`` line) as a canonical integer string.

    For majority voting (maj@k): answers are equal exactly when they are the same integer.

    >>> extract_answer("7+5+0=12\\n4+8+1=13\\nA:0132")
    '132'
    >>> extract_answer("no answer") is None
    True
    """
    given = _first_answer(_completion_text(completion))
    return None if given is None else str(given)


# ---------------------------------------------------------------- reward functions


def correctness_reward(
    prompts: list, completions: list, answer: list, **kwargs: Any
) -> list[float]:
    """Outcome reward: 1.0 when the first ``A:`` line holds exactly the right integer, else 0.0.

    Text after the answer line does not change this reward (``format_reward`` sees it).
    A second ``A:`` line is ignored, so hedging earns nothing.

    >>> correctness_reward(
    ...     prompts=["47+85=", "47+85=", "47+85="],
    ...     completions=["7+5+0=12\\n4+8+1=13\\nA:132", "A:132", "7+5+0=12\\nA:131"],
    ...     answer=["132", "132", "132"],
    ... )
    [1.0, 1.0, 0.0]
    """
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        given = _first_answer(_completion_text(completion))
        rewards.append(float(given is not None and given == _as_int(expected)))
    return rewards


def format_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """Structure reward: 1.0 for one or more column lines then an answer line and nothing
    else (no trailing text, not even whitespace), else 0.0. The arithmetic is not checked.

    >>> format_reward(
    ...     prompts=["47+85="] * 4,
    ...     completions=[
    ...         "7+5+0=12\\n4+8+1=13\\nA:132", "7+5+0=99\\nA:0", "A:132", "7+5+0=12\\nA:132\\nok"
    ...     ],
    ... )
    [1.0, 1.0, 0.0, 0.0]
    """
    return [float(bool(_FORMAT_RE.fullmatch(_completion_text(c)))) for c in completions]


def step_rewards(prompt: str, completion: str, problem: dict) -> tuple[list[float], list[int]]:
    """Process reward: a 0/1 score per line of ``completion`` and where each line ends.

    Steps are ``split_steps(completion)``. Scratchpad line k (k-th column from the right)
    scores 1 when it is exactly the right line for that column *given the carry the
    previous line wrote* (the true carry if that line was unreadable), so a single
    mistake scores 0 at that line only. The first ``A:`` line scores 1 when its answer is
    right. Extra lines (beyond the columns, or anything after the answer) score 0. A
    completion without an ``A:`` line gets one more step, its missing answer, scored 0
    and ending at the completion's last visible character (0 when it has none):
    otherwise stopping before the answer would dodge every penalty the answer could
    earn, and process-supervised RL learns exactly that (measured: held-out accuracy
    fell from 57% to 24% in 250 steps before this rule).

    Args:
        prompt: unused; present so every step verifier has the same signature.
        completion: the decoded completion text.
        problem: a dict from ``ArithmeticTask.problems`` (needs ``a``, ``b``, ``op``,
            ``answer``).

    Returns:
        ``(scores, ends)``, each of length K (the number of steps, 0 for an empty
        completion); ``ends[k]`` is the offset in ``completion`` of step k's last character.

    >>> problem = {"a": 47, "b": 85, "op": "+", "answer": "132"}
    >>> step_rewards("47+85=", "7+5+0=12\\n4+8+0=12\\nA:122", problem)
    ([1.0, 0.0, 0.0], [7, 16, 22])
    >>> step_rewards("47+85=", "7+5+0=12", problem)  # stops before the answer
    ([1.0, 0.0], [7, 7])
    """
    a, b, op = problem["a"], problem["b"], problem["op"]
    expected_answer = _as_int(problem["answer"])
    columns = _num_columns(problem)
    steps = split_steps(_completion_text(completion))
    scores: list[float] = []
    true_carry = carry = 0
    answered = False
    for k, (text, _) in enumerate(steps):
        if answered:
            scores.append(0.0)
        elif text.startswith(ANSWER_PREFIX):
            answered = True
            given = _parse_answer(text)
            scores.append(float(given is not None and given == expected_answer))
        elif k < columns:
            line, _ = _column(_digit(a, k), _digit(b, k), carry, op)
            scores.append(float(text == line))
            _, true_carry = _column(_digit(a, k), _digit(b, k), true_carry, op)
            written = _parse_carry_out(text, op)
            carry = true_carry if written is None else written
        else:
            scores.append(0.0)
    ends = [end for _, end in steps]
    if not answered:
        scores.append(0.0)
        ends.append(max(len(_completion_text(completion).rstrip()) - 1, 0))
    return scores, ends


# ---------------------------------------------------------------- the task


def _in_test_split(a: int, op: str, b: int, test_fraction: float) -> bool:
    """A stable hash of the problem decides its split, the same in every task and process.

    Addition is hashed with its operands sorted, so ``12+34`` and ``34+12`` share a split.
    """
    if op == "+":
        a, b = min(a, b), max(a, b)
    digest = hashlib.blake2b(f"{a}{op}{b}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10_000 < round(test_fraction * 10_000)


@dataclass(frozen=True)
class ArithmeticTask:
    """Addition and/or subtraction of non-negative integers, with a column scratchpad.

    ``problems(split, n, seed)`` draws prompts; ``demonstration(problem)`` writes the
    correct completion for supervised warm-up; ``reward_functions`` and ``step_rewards``
    verify completions.
    """

    digits: int | tuple[int, int] = 2
    """Digits per operand: ``2`` means exactly two (10-99); ``(1, 3)`` draws each operand's
    digit count uniformly from 1 to 3 (one digit includes 0)."""
    ops: str = "+-"
    """Operators to draw from, uniformly: ``"+"``, ``"-"`` or ``"+-"``."""
    test_fraction: float = 0.1
    """Share of all problems that belong to the test split (decided by a stable hash)."""

    def __post_init__(self) -> None:
        low, high = self.digit_range
        if not 1 <= low <= high <= 18:
            raise ValueError(f"digits must be in 1..18 with low <= high, got {self.digits!r}")
        if not self.ops or set(self.ops) - {"+", "-"}:
            raise ValueError(f"ops must be a non-empty string of '+' and '-', got {self.ops!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")

    @property
    def digit_range(self) -> tuple[int, int]:
        return (self.digits, self.digits) if isinstance(self.digits, int) else tuple(self.digits)

    @property
    def max_completion_chars(self) -> int:
        """Longest demonstration in characters (EOS not counted): a bound for max_new_tokens."""
        columns = self.digit_range[1]
        return columns * 9 + len(ANSWER_PREFIX) + columns + 1  # 9 = "7+5+0=12\n" or "15-7-0=8\n"

    @property
    def max_completion_tokens(self) -> int:
        """``max_completion_chars`` plus EOS: max_new_tokens for the character tokenizer
        (subword tokenizers need no more, as they never use more tokens than characters)."""
        return self.max_completion_chars + 1

    @property
    def reward_functions(self) -> dict[str, Callable[..., list[float]]]:
        """The outcome verifiers, TRL-style ``f(prompts, completions, **columns)``."""
        return {"correctness": correctness_reward, "format": format_reward}

    def step_rewards(
        self, prompt: str, completion: str, problem: dict
    ) -> tuple[list[float], list[int]]:
        """See the module-level ``step_rewards``."""
        return step_rewards(prompt, completion, problem)

    @staticmethod
    def extract_answer(completion: Any) -> str | None:
        """See the module-level ``extract_answer``."""
        return extract_answer(completion)

    def problems(self, split: Literal["train", "test"], n: int, seed: int) -> list[dict]:
        """n problems of ``split``, the same for the same arguments.

        Train and test never share a problem. Problems are drawn as ``_draw`` does
        (operator uniform, each operand's digit count uniform) and kept only if they
        belong to ``split`` and were not drawn before; once the split looks exhausted
        (add2 has about 7,300 train and 800 test problems) a new pass over it begins, so a
        problem repeats only after (nearly) all others have appeared.

        Returns:
            dicts with ``prompt`` (``"47+85="``), ``answer`` (``"132"``, a string as
            datasets store it), ``a``, ``b`` (ints) and ``op`` (``"+"`` or ``"-"``).
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        rng = random.Random(seed)
        want_test = split == "test"
        # Consecutive rejections after which the split counts as exhausted: a draw lands in
        # the wanted split with probability ~p, so 50/p misses in a row never happen by chance.
        p = min(self.test_fraction, 1 - self.test_fraction)
        max_misses = 2_000 + int(50 / p)
        seen: set[tuple[int, str, int]] = set()
        chosen: list[tuple[int, str, int]] = []
        misses = 0
        while len(chosen) < n:
            problem = self._draw(rng)
            if problem in seen or _in_test_split(*problem, self.test_fraction) != want_test:
                misses += 1
                if misses > max_misses:
                    if not chosen:
                        raise ValueError(f"{self} has no {split} problems; use more digits")
                    seen.clear()  # split exhausted: start a new pass
                    misses = 0
                continue
            misses = 0
            seen.add(problem)
            chosen.append(problem)
        return [self._problem(a, op, b) for a, op, b in chosen]

    def _operand(self, rng: random.Random) -> int:
        num_digits = rng.randint(*self.digit_range)
        low = 0 if num_digits == 1 else 10 ** (num_digits - 1)
        return rng.randint(low, 10**num_digits - 1)

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        op = rng.choice(self.ops)
        a, b = self._operand(rng), self._operand(rng)
        if op == "-" and a < b:
            a, b = b, a
        return a, op, b

    @staticmethod
    def _problem(a: int, op: str, b: int) -> dict:
        answer = a + b if op == "+" else a - b
        return {"prompt": f"{a}{op}{b}=", "answer": str(answer), "a": a, "b": b, "op": op}

    def demonstration(self, problem: dict) -> str:
        """The correct completion: one line per column from the right, then ``A:<answer>``.

        >>> ArithmeticTask(2, "+").demonstration({"a": 47, "b": 85, "op": "+"})
        '7+5+0=12\\n4+8+1=13\\nA:132'
        >>> ArithmeticTask(2, "-").demonstration({"a": 85, "b": 47, "op": "-"})
        '15-7-0=8\\n8-4-1=3\\nA:38'
        """
        a, b, op = problem["a"], problem["b"], problem["op"]
        lines, carry = [], 0
        for k in range(_num_columns(problem)):
            line, carry = _column(_digit(a, k), _digit(b, k), carry, op)
            lines.append(line)
        answer = a + b if op == "+" else a - b
        return "\n".join([*lines, f"{ANSWER_PREFIX}{answer}"])
