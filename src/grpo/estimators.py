"""From scored completions to per-token advantages: GRPO, RLOO, process supervision, PPO.

``fill_advantages`` is the one place the estimator is chosen. The maths it composes lives
in ``grpo.advantages`` and ``grpo.ppo``; this module only routes data to it.

- GRPO, outcome (eq. II.I): group-normalised reward, the same on every token.
- GRPO, process (eq. V.I): step rewards normalised over the group, summed over the steps
  that end at or after each token.
- RLOO (eq. VI.I): reward minus beta * the completion's KL (k1), minus the mean of the
  other completions' (no std); the loss is unclipped (``AlgorithmConfig.clipped``).
- PPO (seed section I): per-token rewards (-beta * KL, score at the end), a learned
  critic's values, GAE, whitened advantages; the critic is trained beside the policy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from grpo.advantages import (
    expand_to_tokens,
    gae,
    group_advantages,
    kl_penalised_scores,
    process_advantages,
    rloo_advantages,
    whiten,
)
from grpo.config import Config
from grpo.losses import Normaliser
from grpo.ppo import ValueModel, kl_penalised_token_rewards, value_loss
from grpo.rollout import concat_rollouts, select_groups
from grpo.steps import char_to_token_ends, step_tensors
from grpo.types import Batch, Rollout


@dataclass
class Scored:
    """B groups of sampled completions with their decoded text and combined rewards."""

    rows: list[dict]  # B dataset rows
    rollout: Rollout  # N = B * G completions
    ids: list[list[int]]  # N completion token ids, padding removed
    texts: list[str]  # N decoded completions
    rewards: torch.Tensor  # [B, G] combined reward, after shaping

    def select(self, keep: torch.Tensor) -> Scored:
        """The groups where ``keep [B]`` is True."""
        g = self.rollout.group_size
        rows = keep.repeat_interleave(g).tolist()  # [N]
        return Scored(
            rows=[r for r, k in zip(self.rows, keep.tolist(), strict=True) if k],
            rollout=select_groups(self.rollout, keep),
            ids=[x for x, k in zip(self.ids, rows, strict=True) if k],
            texts=[x for x, k in zip(self.texts, rows, strict=True) if k],
            rewards=self.rewards[keep],
        )

    @staticmethod
    def concat(parts: list[Scored], pad_token_id: int) -> Scored:
        return Scored(
            rows=[r for p in parts for r in p.rows],
            rollout=concat_rollouts([p.rollout for p in parts], pad_token_id),
            ids=[x for p in parts for x in p.ids],
            texts=[x for p in parts for x in p.texts],
            rewards=torch.cat([p.rewards for p in parts]),
        )

    @property
    def num_groups(self) -> int:
        return self.rewards.shape[0]


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[B, G] rewards -> [B] bool: groups whose rewards differ (DAPO's dynamic sampling
    keeps only these; an all-equal group has zero advantage and teaches nothing)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > 0


class Critic:
    """PPO's value model with its own AdamW, updated on the same mini-batches as the policy."""

    def __init__(
        self,
        name_or_path: str,
        learning_rate: float,
        max_grad_norm: float,
        share_prompt: bool = True,
        autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    ):
        self.model = ValueModel.from_pretrained(name_or_path)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=learning_rate)
        self.max_grad_norm = max_grad_norm or float("inf")
        self.share_prompt = share_prompt
        self.autocast = autocast  # the forward's context (``model.autocast``), not the backward's

    def _values(self, mb: Batch) -> torch.Tensor:
        groups = mb.group_ids if self.share_prompt else None
        with self.autocast():
            return self.model(mb.input_ids, mb.attention_mask, mb.completion_length, groups)

    @torch.no_grad()
    def values(self, batch: Batch, micro_size: int) -> torch.Tensor:
        self.model.eval()
        parts = [self._values(mb) for mb in batch.micro_batches(micro_size)]
        return torch.cat(parts)  # [N, T]

    def update(self, mini: Batch, micro_size: int, clip: float | None) -> dict[str, float]:
        """One optimizer step on the value loss of ``mini``, accumulated over micro-batches."""
        self.model.train()
        norm = Normaliser.from_mask(mini.completion_mask, mini.completion_length)
        self.optimizer.zero_grad(set_to_none=True)
        loss, clipped = 0.0, 0.0
        for mb in mini.micro_batches(micro_size):
            values = self._values(mb)  # [n, T]
            out = value_loss(
                values,
                mb.extras["old_values"],
                mb.extras["returns"],
                mb.completion_mask,
                clip,
                norm,
            )
            out.loss.backward()
            loss += out.loss.item()
            clipped += (
                out.clip_frac.item() * mb.completion_mask.sum().item() / max(norm.num_tokens, 1)
            )
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return {"value_loss": loss, "value_clip_frac": clipped}


def fill_advantages(
    batch: Batch,
    scored: Scored,
    cfg: Config,
    tokenizer=None,
    step_source=None,
    critic: Critic | None = None,
    micro_size: int = 0,
) -> None:
    """Set ``batch.advantages [N, T]`` (and PPO's ``returns`` / ``old_values`` extras).

    Where the estimator puts the KL in the reward (RLOO, PPO, beta > 0) it needs the
    sampling policy's log-probs: ``batch.old_logp`` when the trainer computed them, else
    the engine's ``sample_logp`` (the same distribution when sampling was not truncated by
    top-k / top-p; ``Config.needs_old_logp`` decides); and ``batch.ref_logp``.
    """
    alg = cfg.algorithm
    mask = batch.completion_mask  # [N, T]
    g = scored.rollout.group_size
    scores = scored.rewards.flatten()  # [N]
    kl_in_reward = not alg.kl_in_loss and batch.ref_logp is not None
    sampling_logp = scored.rollout.sample_logp if batch.old_logp is None else batch.old_logp
    if alg.name == "ppo":
        logp = sampling_logp if kl_in_reward else torch.zeros_like(mask)
        ref_logp = batch.ref_logp if kl_in_reward else torch.zeros_like(mask)
        token_rewards = kl_penalised_token_rewards(scores, logp, ref_logp, mask, alg.beta)  # [N, T]
        values = critic.values(batch, micro_size)  # [N, T]
        adv, returns = gae(token_rewards, values, mask, alg.gamma, alg.lam)  # [N, T] each
        batch.advantages = whiten(adv, mask)
        batch.extras = {"old_values": values, "returns": returns}
    elif alg.name == "rloo":
        if kl_in_reward:
            scores = kl_penalised_scores(
                scores, sampling_logp, batch.ref_logp, mask, alg.beta
            )  # [N]
        batch.advantages = expand_to_tokens(rloo_advantages(scores.view(-1, g)), mask)
    elif alg.advantage == "process":
        col = cfg.data.prompt_column
        rows = [r for r in scored.rows for _ in range(g)]
        steps = step_source.score_steps([r[col] for r in rows], scored.texts, rows)
        ends = char_to_token_ends(tokenizer, scored.ids, scored.texts, [s.ends for s in steps])
        step_rewards, step_mask, step_end = step_tensors([s.scores for s in steps], ends)
        adv = process_advantages(
            step_rewards, step_mask, step_end, g, batch.completion_length, alg.advantage_eps
        )
        batch.advantages = adv * mask  # [N, T]
    else:
        adv = group_advantages(scored.rewards, alg.scale_rewards, alg.advantage_eps)  # [B, G]
        batch.advantages = expand_to_tokens(adv, mask)
