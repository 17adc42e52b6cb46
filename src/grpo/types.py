"""Typed containers passed between the parts of a GRPO step.

Shape letters, used in every docstring and on tensor lines across the package:

    B  prompts in a batch
    G  completions per prompt (``num_generations``)
    N  = B * G, completions in a batch; row ``b * G + g`` is completion g of prompt b
    P  prompt tokens (left-padded to the longest prompt of the batch)
    T  completion tokens (right-padded to the longest completion of the batch)
    K  reasoning steps in one completion (process supervision)

Masks are 0/1 tensors of the same shape as what they mask; padding is always masked,
never filled with a sentinel value that later code must remember to skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from grpo.hf import pad_to


@dataclass(frozen=True)
class SamplingParams:
    """How completions are drawn. Names follow TRL's GRPOConfig."""

    num_generations: int = 8
    """G: completions sampled per prompt."""
    max_completion_length: int = 64
    """T_max: new tokens per completion at most; a completion that reaches it is truncated."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set whose probability reaches top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables it."""
    eos_token_ids: tuple[int, ...] = ()
    """Generation of a completion stops after it emits any of these ids (kept in the mask)."""
    pad_token_id: int = 0
    """Id written into padded positions of ``completion_ids`` (always masked out)."""


@dataclass
class Rollout:
    """G sampled completions for each of B prompts, as the engine returns them.

    The prompt tensors hold each prompt once; the completion tensors hold N = B * G rows,
    grouped: rows ``b*G .. b*G + G - 1`` belong to prompt b. Groups are never split.
    """

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, T] right-padded with pad_token_id
    completion_mask: torch.Tensor  # [N, T] 1 on generated tokens, EOS included
    sample_logp: torch.Tensor  # [N, T] log-prob of each token under the sampling distribution
    truncated: torch.Tensor  # [N] bool: stopped by max_completion_length, not by EOS
    group_size: int  # G

    @property
    def num_prompts(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)  # [N]

    def select(self, keep: torch.Tensor) -> Rollout:
        """The groups where ``keep [B]`` is True, whole (all G completions of each)."""
        rows = keep.repeat_interleave(self.group_size)  # [N]
        return Rollout(
            prompt_ids=self.prompt_ids[keep],
            prompt_mask=self.prompt_mask[keep],
            completion_ids=self.completion_ids[rows],
            completion_mask=self.completion_mask[rows],
            sample_logp=self.sample_logp[rows],
            truncated=self.truncated[rows],
            group_size=self.group_size,
        )

    @staticmethod
    def concat(parts: list[Rollout], pad_token_id: int) -> Rollout:
        """Rollouts of the same G joined group after group: prompts re-left-padded to the
        longest P, completions re-right-padded to the longest T (padding stays masked)."""
        p = max(r.prompt_ids.shape[1] for r in parts)
        t = max(r.completion_ids.shape[1] for r in parts)

        def join(name: str, width: int, value: float, left: bool = False) -> torch.Tensor:
            return torch.cat([pad_to(getattr(r, name), width, value, left) for r in parts])

        return Rollout(
            prompt_ids=join("prompt_ids", p, pad_token_id, left=True),
            prompt_mask=join("prompt_mask", p, 0, left=True),
            completion_ids=join("completion_ids", t, pad_token_id),
            completion_mask=join("completion_mask", t, 0),
            sample_logp=join("sample_logp", t, 0.0),
            truncated=torch.cat([r.truncated for r in parts]),
            group_size=parts[0].group_size,
        )


@dataclass
class Batch:
    """One scored rollout batch, ready for the policy update.

    ``input_ids`` is the prompt repeated per completion followed by the completion, so one
    forward pass of a causal LM yields the log-probs of every completion token.
    """

    input_ids: torch.Tensor  # [N, P + T]
    attention_mask: torch.Tensor  # [N, P + T]
    completion_mask: torch.Tensor  # [N, T] float 0/1
    advantages: torch.Tensor  # [N, T] per-token advantage
    old_logp: torch.Tensor | None = None  # [N, T] policy log-probs at sampling time (mu > 1)
    ref_logp: torch.Tensor | None = None  # [N, T] reference-model log-probs (beta > 0)
    group_ids: torch.Tensor | None = None  # [N] which prompt each row answers (contiguous)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-algorithm [N, T] terms
    ref_is_policy: bool = False
    """The reference's weights equal the policy's: the loss takes its own log-probs,
    detached, as ``ref_logp``, so the KL and its gradient are exactly 0."""

    @classmethod
    def from_rollout(cls, rollout: Rollout) -> Batch:
        """Prompt (repeated per completion) + completion as one ``[N, P + T]`` sequence;
        the advantages are filled in by the algorithm."""
        g = rollout.group_size
        prompt_ids = rollout.prompt_ids.repeat_interleave(g, dim=0)  # [N, P]
        prompt_mask = rollout.prompt_mask.repeat_interleave(g, dim=0)  # [N, P]
        mask = rollout.completion_mask.float()  # [N, T]
        device = rollout.prompt_ids.device
        return cls(
            input_ids=torch.cat([prompt_ids, rollout.completion_ids], dim=1),  # [N, P + T]
            attention_mask=torch.cat([prompt_mask.long(), mask.long()], dim=1),  # [N, P + T]
            completion_mask=mask,
            advantages=torch.zeros_like(mask),  # [N, T]
            group_ids=torch.arange(rollout.num_prompts, device=device).repeat_interleave(g),
        )

    @property
    def num_completions(self) -> int:
        return self.input_ids.shape[0]

    @property
    def completion_length(self) -> int:
        return self.completion_mask.shape[1]

    def micro_batches(self, size: int) -> Iterator[Batch]:
        """Consecutive sub-batches of ``size`` completion rows (the last may be smaller)."""
        for start in range(0, self.num_completions, size):
            yield self.rows(slice(start, start + size))

    def rows(self, index: torch.Tensor | slice) -> Batch:
        """The sub-batch of the given completion rows (a mini- or micro-batch)."""

        def take(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[index]

        return Batch(
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            completion_mask=self.completion_mask[index],
            advantages=self.advantages[index],
            old_logp=take(self.old_logp),
            ref_logp=take(self.ref_logp),
            group_ids=take(self.group_ids),
            extras={k: v[index] for k, v in self.extras.items()},
            ref_is_policy=self.ref_is_policy,
        )


@dataclass
class Scored:
    """B groups of sampled completions with their decoded text and combined rewards."""

    rows: list[dict]  # B dataset rows
    rollout: Rollout  # N = B * G completions
    ids: list[list[int]]  # N completion token ids, padding removed
    texts: list[str]  # N decoded completions
    rewards: torch.Tensor  # [B, G] combined reward, after shaping
    per_function: torch.Tensor | None = None  # [N, F] each reward function's value, NaN: None
    reward_names: list[str] = field(default_factory=list)  # [F]
    extra_columns: dict[str, list] = field(default_factory=dict)
    """Per-completion values ([N] each) the reward functions gave TRL's ``log_extra``."""

    def select(self, keep: torch.Tensor) -> Scored:
        """The groups where ``keep [B]`` is True."""
        rows = keep.repeat_interleave(self.rollout.group_size).tolist()  # [N]
        return Scored(
            rows=[r for r, k in zip(self.rows, keep.tolist(), strict=True) if k],
            rollout=self.rollout.select(keep),
            ids=[x for x, k in zip(self.ids, rows, strict=True) if k],
            texts=[x for x, k in zip(self.texts, rows, strict=True) if k],
            rewards=self.rewards[keep],
            per_function=None
            if self.per_function is None
            else self.per_function[keep.cpu().repeat_interleave(self.rollout.group_size)],
            reward_names=self.reward_names,
            extra_columns={
                c: [x for x, k in zip(v, rows, strict=True) if k]
                for c, v in self.extra_columns.items()
            },
        )

    @staticmethod
    def concat(parts: list[Scored], pad_token_id: int) -> Scored:
        return Scored(
            rows=[r for p in parts for r in p.rows],
            rollout=Rollout.concat([p.rollout for p in parts], pad_token_id),
            ids=[x for p in parts for x in p.ids],
            texts=[x for p in parts for x in p.texts],
            rewards=torch.cat([p.rewards for p in parts]),
            per_function=None
            if any(p.per_function is None for p in parts)
            else torch.cat([p.per_function for p in parts]),
            reward_names=parts[0].reward_names,
            extra_columns={  # the columns every part has
                c: [x for p in parts for x in p.extra_columns[c]]
                for c in parts[0].extra_columns
                if all(c in p.extra_columns for p in parts)
            },
        )

    @property
    def num_groups(self) -> int:
        return self.rewards.shape[0]


@dataclass
class LossOutput:
    """A scalar loss to backpropagate and the detached metrics (0-dim tensors) that
    explain it."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
