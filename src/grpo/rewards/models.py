"""Learned reward sources: an outcome reward model and step reward sources (eq. V.I).

- ``OutcomeRewardModel``: a sequence-classification model loaded from a path or hub id,
  called like any TRL reward function, so it drops into ``grpo.rewards.score``.
- ``StepRewardSource``: what process supervision needs, ``score_steps(prompts,
  completions, rows) -> [StepScores(scores, ends)]``: per completion, one score per
  reasoning step and the character offset in the completion text of each step's last
  character. ``grpo.steps`` turns that into the tensors ``process_advantages`` takes.
  Two sources have it: ``verifier_step_source(task)`` (a built-in task's rule-based step
  verifier) and ``ProcessRewardModel`` (a learned PRM), so the trainer treats them alike.

Reward models have their own tokenizer, so they score the *text* of prompt and completion,
never the policy's token ids. Every model runs in eval mode, under ``torch.inference_mode``,
in batches sorted by length (less padding), right-padded with the id the model's config
treats as padding, so batched scores equal one-at-a-time scores.

How a text is built from a sample (one rule for every model here):

- string prompt and completion: ``prompt + completion``, the text the policy saw and wrote;
- conversational prompt (a list of ``{"role", "content"}`` messages): the tokenizer's chat
  template when it has one (the outcome model renders the whole conversation, completion as
  the assistant turn; a PRM renders the prompt with the generation prompt and appends the
  completion text, so step offsets stay offsets into the completion); without a template,
  the message contents joined with newlines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from grpo.rewards.process import char_to_token_ends
from grpo.rewards.text import completion_text
from grpo.tasks.arithmetic import split_steps

PRM_MODES = ("token", "sequence")


class StepScores(NamedTuple):
    """One completion's steps: K scores and K end offsets (last character of each step)."""

    scores: list[float]
    ends: list[int]


@runtime_checkable
class StepRewardSource(Protocol):
    """Scores each reasoning step of N completions (eq. V.I).

    ``rows`` are the N dataset rows (dicts of columns) the completions answer; sources that
    do not need them accept None. ``ends`` index ``completion_text(completion)``.
    """

    def score_steps(
        self, prompts: list, completions: list, rows: Sequence[dict] | None = None
    ) -> list[StepScores]: ...


# ---------------------------------------------------------------- the built-in verifier


@dataclass(frozen=True)
class VerifierStepSource:
    """A ``StepRewardSource`` over a rule-based ``step_rewards(prompt, completion, row)``.

    The verifier decides what a step is (the arithmetic task splits at newlines), so there
    is no separator to configure here.
    """

    step_rewards: Callable[[Any, str, dict], tuple[list[float], list[int]]]

    def score_steps(
        self, prompts: list, completions: list, rows: Sequence[dict] | None = None
    ) -> list[StepScores]:
        if rows is None:
            raise ValueError("the step verifier needs the dataset rows (problems) to check steps")
        if not len(prompts) == len(completions) == len(rows):
            raise ValueError(
                f"got {len(prompts)} prompts, {len(completions)} completions and {len(rows)} "
                "rows; give one of each per completion"
            )
        results = []
        for prompt, completion, row in zip(prompts, completions, rows, strict=True):
            scores, ends = self.step_rewards(prompt, completion_text(completion), row)
            if len(scores) != len(ends):
                raise ValueError(f"step verifier gave {len(scores)} scores for {len(ends)} steps")
            results.append(StepScores([float(s) for s in scores], [int(e) for e in ends]))
        return results


def verifier_step_source(task: Any) -> VerifierStepSource:
    """The step verifier of ``task`` (anything with ``step_rewards(prompt, completion,
    problem)``, e.g. ``grpo.tasks.get_task("add2")``) or such a function itself.

    >>> from grpo.tasks import get_task
    >>> source = verifier_step_source(get_task("add2"))
    >>> problem = {"a": 47, "b": 85, "op": "+", "answer": "132"}
    >>> source.score_steps(["47+85="], ["7+5+0=12\\n4+8+0=12\\nA:122"], [problem])
    [StepScores(scores=[1.0, 0.0, 0.0], ends=[7, 16, 22])]
    """
    step_rewards = getattr(task, "step_rewards", task)
    if not callable(step_rewards):
        raise TypeError(f"{task!r} has no step_rewards(prompt, completion, problem) to call")
    return VerifierStepSource(step_rewards)


# ---------------------------------------------------------------- shared model plumbing


def _load(
    auto_cls: Any, name_or_path: str, dtype: torch.dtype, device: str | torch.device | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, int]:
    """Model in eval mode without gradients, its tokenizer, and the id to pad with.

    The pad id is the one the model's config names, so a sequence classifier (which pools
    the last token that is not ``config.pad_token_id``) never pools padding; when the config
    names none, the tokenizer's pad (else EOS) token is written into the config.
    """
    model = auto_cls.from_pretrained(str(name_or_path), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    config = model.config.get_text_config()
    pad_id = config.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.pad_token_id
        pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
        if pad_id is None:
            raise ValueError(
                f"reward model {name_or_path!r}: neither its config nor its tokenizer names a "
                "pad or EOS token; set pad_token_id in its config.json"
            )
        config.pad_token_id = model.config.pad_token_id = pad_id
    if device is not None:
        model.to(device)
    model.eval().requires_grad_(False)
    return model, tokenizer, int(pad_id)


def _label_scores(logits: Tensor, kind: Literal["logit", "prob"]) -> Tensor:
    """``[..., L]`` logits -> ``[...]`` scores of the "good" label, L in {1, 2}.

    ``"logit"``: the logit itself (L=1) or the log-odds ``logit[1] - logit[0]`` (L=2).
    ``"prob"``: ``sigmoid(logit)`` (L=1) or ``softmax(logits)[1]`` (L=2); the two agree.
    """
    logits = logits.float()
    margin = logits[..., 0] if logits.shape[-1] == 1 else logits[..., 1] - logits[..., 0]
    return margin if kind == "logit" else torch.sigmoid(margin)


def _check_num_labels(model: PreTrainedModel, name_or_path: str) -> None:
    if model.config.num_labels not in (1, 2):
        raise ValueError(
            f"reward model {name_or_path!r} has num_labels={model.config.num_labels}; "
            "expected 1 (a score) or 2 ([bad, good])"
        )


def _messages(completion: Any) -> list[dict]:
    if isinstance(completion, (list, tuple)):
        return [m for m in completion if isinstance(m, dict)]
    return [{"role": "assistant", "content": completion_text(completion)}]


def _join_contents(messages: list[dict]) -> str:
    return "\n".join(completion_text(m) for m in messages)


def _prefix_ids(tokenizer: PreTrainedTokenizerBase, prompt: Any) -> list[int]:
    """Token ids of the prompt, ending where the completion text starts."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            list(prompt), tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(_join_contents(list(prompt)) + "\n")["input_ids"]


def _length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of ``batch_size``, longest first, so rows of a batch are alike."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _right_pad(
    sequences: list[list[int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``[n, S]`` input ids right-padded with ``pad_id`` and the ``[n, S]`` attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # [n, S]
    mask = torch.zeros(len(sequences), width, dtype=torch.long)  # [n, S]
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def _pooled_scores(
    model: PreTrainedModel,
    sequences: list[list[int]],
    pad_id: int,
    batch_size: int,
    kind: Literal["logit", "prob"],
) -> list[float]:
    """One score per sequence from a sequence classifier (pooled at its last real token)."""
    scores = [0.0] * len(sequences)
    for batch in _length_batches([len(s) for s in sequences], batch_size):
        ids, mask = _right_pad([sequences[i] for i in batch], pad_id, model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits  # [n, L]
        for i, value in zip(batch, _label_scores(logits, kind).tolist(), strict=True):
            scores[i] = value
    return scores


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


# ---------------------------------------------------------------- outcome reward model


class OutcomeRewardModel:
    """A learned outcome reward: a sequence-classification model scores prompt + completion.

    TRL's reward-function signature, so it drops into ``grpo.rewards.score`` beside the
    verifiers (metrics call it ``reward_model``). The score is read where the model pools,
    at the last token that is not padding:

    - ``num_labels=1`` (a Bradley-Terry reward model, as TRL's RewardTrainer trains): the
      logit itself;
    - ``num_labels=2`` (``[bad, good]`` classifier): the log-odds ``logit[1] - logit[0]``,
      on the same unbounded scale as a one-label model (a probability would squash it).

    Args:
        name_or_path: directory or hub id of an ``AutoModelForSequenceClassification``.
        batch_size: sequences per forward pass.
        max_length: keep at most this many tokens of each text, the *last* ones (where a
            decoder reward model reads its score; the prompt's start is dropped first).
            None keeps everything.
        dtype: the model's dtype (scores are returned as Python floats).
        device: where the model runs; None leaves it where it loads (CPU).
    """

    def __init__(
        self,
        name_or_path: str,
        batch_size: int = 32,
        max_length: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        _check_batch_size(batch_size)
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {max_length}")
        self.model, self.tokenizer, self.pad_id = _load(
            AutoModelForSequenceClassification, name_or_path, dtype, device
        )
        _check_num_labels(self.model, name_or_path)
        self.batch_size = batch_size
        self.max_length = max_length
        self.__name__ = "reward_model"

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        """One score per (prompt, completion); ``kwargs`` (dataset columns, the policy's
        ``completion_ids``) are ignored: the model reads text with its own tokenizer."""
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions")
        sequences = [self._ids(p, c) for p, c in zip(prompts, completions, strict=True)]
        return _pooled_scores(self.model, sequences, self.pad_id, self.batch_size, "logit")

    def _ids(self, prompt: Any, completion: Any) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt + completion_text(completion))["input_ids"]
        elif self.tokenizer.chat_template:
            messages = [*prompt, *_messages(completion)]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(_join_contents([*prompt, *_messages(completion)]))["input_ids"]
        return ids[-self.max_length :] if self.max_length else ids


# ---------------------------------------------------------------- process reward model


class ProcessRewardModel:
    """A learned step reward source: scores every step of a completion (eq. V.I).

    Steps are ``split_steps(completion_text, separator)``: the pieces between separators,
    stripped, each ending at its last non-space character. Each step's score is the
    model's probability that the step is good, in [0, 1]: ``softmax(logits)[1]`` for
    ``num_labels=2`` (``[bad, good]``) or ``sigmoid(logit)`` for ``num_labels=1``.

    - ``mode="token"``: an ``AutoModelForTokenClassification`` reads prompt + completion
      once and each step is scored at the token holding its last character.
    - ``mode="sequence"``: an ``AutoModelForSequenceClassification`` reads prompt +
      completion up to the end of each step, one sequence per step (K forward rows per
      completion, for classifiers trained on partial solutions).

    The prompt and the completion are tokenized apart, as the policy produced them; the
    completion's step ends are mapped to its tokens by ``grpo.steps.char_to_token_ends``.
    Sequences must fit the model's context: nothing is truncated, as that would move steps.

    Args:
        name_or_path: directory or hub id of the model.
        separator: the string between steps.
        batch_size: sequences per forward pass.
        mode: ``"token"`` or ``"sequence"``, as above.
        dtype: the model's dtype.
        device: where the model runs; None leaves it where it loads (CPU).
    """

    def __init__(
        self,
        name_or_path: str,
        separator: str = "\n",
        batch_size: int = 32,
        mode: Literal["token", "sequence"] = "token",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        if mode not in PRM_MODES:
            raise ValueError(f"mode must be one of {PRM_MODES}, got {mode!r}")
        if not separator:
            raise ValueError("separator must be a non-empty string")
        _check_batch_size(batch_size)
        auto_cls = (
            AutoModelForTokenClassification
            if mode == "token"
            else (AutoModelForSequenceClassification)
        )
        self.model, self.tokenizer, self.pad_id = _load(auto_cls, name_or_path, dtype, device)
        _check_num_labels(self.model, name_or_path)
        self.separator = separator
        self.batch_size = batch_size
        self.mode = mode
        self.__name__ = "process_reward_model"

    def score_steps(
        self, prompts: list, completions: list, rows: Sequence[dict] | None = None
    ) -> list[StepScores]:
        """Per completion, the K step scores in [0, 1] and the K step end offsets into
        ``completion_text(completion)``; K = 0 (and no model call) for a completion with no
        steps. ``rows`` is ignored."""
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions")
        texts = [completion_text(c) for c in completions]
        ends = [[end for _, end in split_steps(t, self.separator)] for t in texts]
        prefixes = [_prefix_ids(self.tokenizer, p) for p in prompts]
        bodies = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if self.mode == "token":
            scores = self._token_scores(prefixes, bodies, texts, ends)
        else:
            scores = self._sequence_scores(prefixes, texts, ends)
        return [StepScores(s, e) for s, e in zip(scores, ends, strict=True)]

    @torch.inference_mode()
    def _token_scores(
        self,
        prefixes: list[list[int]],
        bodies: list[list[int]],
        texts: list[str],
        ends: list[list[int]],
    ) -> list[list[float]]:
        token_ends = char_to_token_ends(self.tokenizer, bodies, texts, ends)
        scored = [i for i, e in enumerate(ends) if e]
        sequences = [prefixes[i] + bodies[i] for i in scored]
        scores: list[list[float]] = [[] for _ in ends]
        for batch in _length_batches([len(s) for s in sequences], self.batch_size):
            ids, mask = _right_pad([sequences[j] for j in batch], self.pad_id, self.model.device)
            probs = _label_scores(self.model(input_ids=ids, attention_mask=mask).logits, "prob")
            for row, j in enumerate(batch):  # probs: [n, S]
                i = scored[j]
                last = len(sequences[j]) - 1
                positions = [min(len(prefixes[i]) + t, last) for t in token_ends[i]]
                scores[i] = probs[row, positions].tolist()
        return scores

    def _sequence_scores(
        self, prefixes: list[list[int]], texts: list[str], ends: list[list[int]]
    ) -> list[list[float]]:
        sequences, owners = [], []
        for i, (prefix, text) in enumerate(zip(prefixes, texts, strict=True)):
            for end in ends[i]:
                partial = self.tokenizer(text[: end + 1], add_special_tokens=False)["input_ids"]
                sequences.append(prefix + partial)
                owners.append(i)
        flat = (
            _pooled_scores(self.model, sequences, self.pad_id, self.batch_size, "prob")
            if sequences
            else []
        )
        scores: list[list[float]] = [[] for _ in ends]
        for i, value in zip(owners, flat, strict=True):
            scores[i].append(value)
        return scores
