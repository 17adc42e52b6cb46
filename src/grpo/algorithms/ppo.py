"""PPO with a critic: the baseline GRPO replaces (seed section I, DESIGN.md item 7).

PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms") as used for RLHF by
InstructGPT (Ouyang et al. 2022): a value model ``V`` the size of the policy, a per-token
reward that is ``-beta * KL`` on every token plus the sequence's score on its last token,
GAE advantages (``grpo.advantages.gae``, Schulman et al. 2016) and a value loss
(``grpo.losses.value_loss``) next to the policy's clipped surrogate. The seed claims GRPO
saves this critic's memory and pipeline; these pieces exist so that claim is measured.

Shape letters (see ``grpo.types``): N completion rows, P prompt tokens (left-padded),
T completion tokens (right-padded), H the model's hidden size.

Where this module departs from the papers:

- The value head starts at zero (weight and bias), so every value is 0 at step 0 and the
  backbone gets no gradient until the head has moved (one optimizer step). InstructGPT
  initialises the value model from the reward model; here it is any causal LM checkpoint
  (typically the SFT/reference model) without its LM head, as there may be no reward model.
- The head is kept in float32 whatever the backbone's dtype; hidden states are cast up.
- The per-token KL is k1 (``logp - ref_logp``, as InstructGPT and TRL's PPO), not the k3
  that GRPO puts in its loss (eq. IV.I).
- Value clipping (``clip_range``) comes from OpenAI baselines' ppo2, not the PPO paper,
  which regresses ``(V - V_targ)^2`` unclipped; it is optional.
- The value loss is a token mean whose divisor is the *full* batch's token count
  (``Normaliser.num_tokens``), so gradient accumulation is exact.
- Every completion ends an episode: a truncated one is not bootstrapped (``gae`` takes the
  value after the last real token as 0), as in TRL and OpenRLHF.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoModel, PreTrainedModel

from grpo.advantages import gae, kl_penalised_token_rewards, whiten
from grpo.algorithms.registry import register_algorithm, several_updates
from grpo.algorithms.rloo import sampling_logp
from grpo.config import Config
from grpo.faults import NonFiniteGuard
from grpo.hf import position_ids
from grpo.logprobs import shared_prefix_outputs
from grpo.losses import Normaliser, value_loss
from grpo.optim import build_optimizer
from grpo.runtime import Runtime
from grpo.types import Batch, Scored

VALUE_HEAD_FILE = "value_head.safetensors"
"""File beside the backbone's weights that holds the value head (``weight``, ``bias``)."""


class ValueModel(torch.nn.Module):
    """The critic: a transformer backbone (no LM head) and a scalar head, ``V(state)``.

    The state before completion token t is the prompt and tokens ``< t``, so its value is
    read from the hidden state at the position whose logits score token t in
    ``grpo.logprobs.completion_logp``: positions ``P - 1 .. P + T - 2``.
    """

    def __init__(self, backbone: PreTrainedModel):
        super().__init__()
        self.backbone = backbone
        hidden_size = backbone.config.hidden_size
        self.head = torch.nn.Linear(hidden_size, 1, dtype=torch.float32, device=backbone.device)
        # Zero values at the start: the first GAE advantages are plain discounted rewards,
        # not noise from a random head.
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, dtype: torch.dtype = torch.float32
    ) -> ValueModel:
        """Load the backbone with ``AutoModel`` (a causal LM's checkpoint loses its LM head).

        If ``name_or_path`` is a directory written by ``save_pretrained``, its value head is
        loaded too; otherwise the head starts at zero.
        """
        backbone = AutoModel.from_pretrained(str(name_or_path), dtype=dtype)
        model = cls(backbone)
        head_file = Path(name_or_path) / VALUE_HEAD_FILE
        if head_file.is_file():
            model.head.load_state_dict(load_file(head_file))
        return model

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the backbone (``save_pretrained``) and the head (safetensors) to ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path)
        head = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(head, path / VALUE_HEAD_FILE)
        return path

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters of backbone and head (only those with ``requires_grad`` if asked)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        completion_length: int,
        group_ids: Tensor | None = None,
    ) -> Tensor:
        """Value of the state before each completion token.

        Args:
            input_ids: ``[N, P + T]`` left-padded prompt followed by right-padded completion.
            attention_mask: ``[N, P + T]`` 1 on real tokens.
            completion_length: T.
            group_ids: ``[N]`` which prompt each row answers, rows of a group contiguous:
                each group's prompt then runs once (``shared_prefix_outputs``), same values.

        Returns:
            ``[N, T]`` float32 values; padded completion positions hold values that the
            completion mask must remove.
        """
        if not 0 < completion_length < input_ids.shape[1]:
            raise ValueError(
                f"completion_length must be in [1, P + T - 1] = [1, {input_ids.shape[1] - 1}] "
                f"(at least one prompt token), got {completion_length}"
            )
        if group_ids is not None:
            state = shared_prefix_outputs(
                self.backbone, input_ids, attention_mask, completion_length, group_ids
            )  # [N, T, H]
            return self.head(state.to(self.head.weight.dtype)).squeeze(-1)  # [N, T]
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),  # [N, P + T]
            use_cache=False,
        ).last_hidden_state  # [N, P + T, H]
        state = hidden[:, -completion_length - 1 : -1]  # [N, T, H], positions P-1 .. P+T-2
        return self.head(state.to(self.head.weight.dtype)).squeeze(-1)  # [N, T]


class Critic:
    """PPO's value model with its own AdamW and schedule (``optim.*``, learning rate
    ``algorithm.critic_learning_rate`` or ``optim.learning_rate``), updated on the same
    mini-batches as the policy."""

    def __init__(self, cfg: Config, runtime: Runtime):
        self.model = ValueModel.from_pretrained(cfg.model.name_or_path).to(runtime.device)
        lr = cfg.algorithm.critic_learning_rate or cfg.optim.learning_rate
        self.optimizer, self.scheduler = build_optimizer(self.model.parameters(), cfg, lr)
        self.max_grad_norm = cfg.optim.max_grad_norm or float("inf")
        self.share_prompt = cfg.optim.share_prompt
        self.value_clip = cfg.algorithm.value_clip
        self.runtime = runtime
        self.nonfinite = NonFiniteGuard(cfg.optim.max_nonfinite_steps, "critic optimizer step")

    def _values(self, mb: Batch) -> Tensor:
        groups = mb.group_ids if self.share_prompt else None
        with self.runtime.autocast():
            return self.model(mb.input_ids, mb.attention_mask, mb.completion_length, groups)

    @torch.no_grad()
    def values(self, batch: Batch, micro_size: int) -> Tensor:
        self.model.eval()
        return torch.cat([self._values(mb) for mb in batch.micro_batches(micro_size)])  # [N, T]

    def update(self, mini: Batch, micro_size: int) -> dict[str, float]:
        """One optimizer step on the value loss of ``mini``, accumulated over micro-batches
        (clipped around the old values by ``algorithm.value_clip``); not applied (and
        counted) when the loss or gradient norm is not finite."""
        clip = self.value_clip
        self.model.train()
        norm = Normaliser.from_mask(mini.completion_mask, mini.completion_length)
        self.optimizer.zero_grad(set_to_none=True)
        loss, clipped = 0.0, 0.0
        for mb in mini.micro_batches(micro_size):
            values = self._values(mb)  # [n, T]
            extras, mask = mb.extras, mb.completion_mask
            out = value_loss(values, extras["old_values"], extras["returns"], mask, clip, norm)
            out.loss.backward()
            loss += out.loss.item()
            clipped += out.clip_frac.item() * mask.sum().item() / max(norm.num_tokens, 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        applied = self.nonfinite.ok(loss, grad_norm)
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        skipped = {"value_nonfinite_skipped": float(not applied)}
        return {"value_loss": loss, "value_clip_frac": clipped, **skipped}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


@register_algorithm("ppo")
class PPO:
    """PPO with a learned critic and GAE; the KL (k1, per token) in the reward."""

    clipped = True
    kl_in_loss = False
    kl_estimator = "k1"

    def __init__(self, cfg: Config, runtime: Runtime, tokenizer: Any):
        self.cfg = cfg
        self.critic = Critic(cfg, runtime)
        self.learners = (self.critic,)

    def needs_old_logp(self, sample_logp_exact: bool) -> bool:
        kl_in_reward = self.cfg.algorithm.beta > 0
        return several_updates(self.cfg) or (kl_in_reward and not sample_logp_exact)

    def prepare(self, batch: Batch, scored: Scored, micro_size: int) -> None:
        alg, mask = self.cfg.algorithm, batch.completion_mask  # [N, T]
        scores = scored.rewards.flatten()  # [N]
        kl_in_reward = batch.ref_logp is not None
        logp = sampling_logp(batch, scored) if kl_in_reward else torch.zeros_like(mask)
        ref_logp = batch.ref_logp if kl_in_reward else torch.zeros_like(mask)
        token_rewards = kl_penalised_token_rewards(scores, logp, ref_logp, mask, alg.beta)
        values = self.critic.values(batch, micro_size)  # [N, T]
        adv, returns = gae(token_rewards, values, mask, alg.gamma, alg.lam)  # [N, T] each
        batch.advantages = whiten(adv, mask)  # [N, T]
        batch.extras = {"old_values": values, "returns": returns}
