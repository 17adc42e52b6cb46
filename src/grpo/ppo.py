"""PPO with a critic: the baseline GRPO replaces (seed section I, DESIGN.md item 7).

PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms") as used for RLHF by
InstructGPT (Ouyang et al. 2022): a value model ``V`` the size of the policy, a per-token
reward that is ``-beta * KL`` on every token plus the sequence's score on its last token,
GAE advantages (``grpo.advantages.gae``, Schulman et al. 2016) and a value loss next to the
policy's clipped surrogate (``grpo.losses.clipped_surrogate``). The seed claims GRPO saves
this critic's memory and pipeline; these pieces exist so that claim is measured.

Also here: ``unclipped_surrogate``, the importance-weighted policy gradient without a clip
that RLOO (eq. VI.I: "no clipping") uses.

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

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoModel, PreTrainedModel

from grpo.logprobs import shared_prefix_outputs
from grpo.losses import Normaliser, aggregate, kl_divergence

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
        # As in completion_logp: positions restart at each row's first real token.
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # [N, P + T]
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # [N, P + T, H]
        state = hidden[:, -completion_length - 1 : -1]  # [N, T, H], positions P-1 .. P+T-2
        return self.head(state.to(self.head.weight.dtype)).squeeze(-1)  # [N, T]


def kl_penalised_token_rewards(
    scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float
) -> Tensor:
    """InstructGPT's per-token reward: ``-beta * (logp - ref_logp)``, plus the score at the end.

    ``r_t = -beta * log(pi(o_t) / pi_ref(o_t))`` on every real token (the k1 KL estimate,
    Ouyang et al. 2022 eq. 2 spread over tokens, as TRL's PPO), and completion i's score
    ``scores[i]`` is added on its last real token. Rewards are data: pass log-probs
    computed without gradient (at sampling time).

    Args:
        scores: ``[N]`` reward of each completion.
        logp: ``[N, T]`` log-probs of the sampled tokens under the sampling policy.
        ref_logp: ``[N, T]`` log-probs of the same tokens under the frozen reference.
        mask: ``[N, T]`` 1 on real completion tokens (right-padded); padding may hold NaN.
        beta: KL coefficient.

    Returns:
        ``[N, T]`` per-token rewards, 0 on padding; a completion with no real token gets
        nothing, its score included.

    >>> kl_penalised_token_rewards(
    ...     torch.tensor([1.0]), torch.tensor([[-1.0, -2.0]]), torch.tensor([[-2.0, -2.0]]),
    ...     torch.tensor([[1, 1]]), beta=0.5)
    tensor([[-0.5000,  1.0000]])
    """
    m = mask.bool()  # [N, T]
    rewards = torch.where(m, -beta * kl_divergence(logp, ref_logp, "k1"), 0.0)  # [N, T]
    lengths = m.sum(dim=1)  # [N]
    last = (lengths - 1).clamp(min=0).unsqueeze(1)  # [N, 1], index of the last real token
    at_end = torch.where(lengths > 0, scores, 0.0).to(rewards.dtype).unsqueeze(1)  # [N, 1]
    return rewards.scatter_add(1, last, at_end)  # [N, T]


@dataclass
class ValueLossOutput:
    """Result of ``value_loss``."""

    loss: Tensor
    """Scalar loss to backpropagate (already halved; multiply by the value coefficient)."""
    clip_frac: Tensor
    """Detached scalar: fraction of real tokens where the clipped term is the larger one
    (and the value gets no gradient); 0 without clipping."""


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float | None = None,
    norm: Normaliser | None = None,
) -> ValueLossOutput:
    """The critic's regression loss, ``0.5 * max((V - R)^2, (clip(V, V_old +- c) - R)^2)``.

    PPO (Schulman et al. 2017, eq. 9's ``L^VF``) regresses ``(V - R)^2``; the clipped
    variant (OpenAI baselines ppo2, as cleanRL and TRL) keeps the new value within
    ``clip_range`` of the value at sampling time, pessimistically. Token mean over the batch.

    Args:
        values: ``[n, T]`` values under the critic being trained.
        old_values: ``[n, T]`` values at sampling time (no gradient).
        returns: ``[n, T]`` regression targets, GAE's ``advantages + old_values``.
        mask: ``[n, T]`` 1 on real completion tokens.
        clip_range: ``c``; ``None`` regresses unclipped.
        norm: the full batch's totals (``num_tokens`` divides); ``None`` uses these n rows',
            which is right when they are the whole batch.

    Returns:
        ``ValueLossOutput(loss, clip_frac)``.
    """
    unclipped = (values - returns).pow(2)  # [n, T]
    if clip_range is None:
        per_token = 0.5 * unclipped  # [n, T]
        is_clipped = torch.zeros_like(mask, dtype=torch.bool)  # [n, T]
    else:
        if clip_range < 0:
            raise ValueError(f"clip_range must be >= 0 or None, got {clip_range}")
        clipped_values = values.clamp(old_values - clip_range, old_values + clip_range)  # [n, T]
        clipped = (clipped_values - returns).pow(2)  # [n, T]
        per_token = 0.5 * torch.maximum(unclipped, clipped)  # [n, T]
        is_clipped = clipped > unclipped  # [n, T]
    norm = Normaliser.from_mask(mask, mask.shape[1]) if norm is None else norm
    m = mask.bool()  # [n, T]
    clip_frac = (is_clipped & m).sum() / m.sum().clamp(min=1)
    loss = aggregate(per_token, mask, "token_mean", norm)
    return ValueLossOutput(loss=loss, clip_frac=clip_frac.detach().float())


def unclipped_surrogate(logp: Tensor, old_logp: Tensor, adv: Tensor) -> Tensor:
    """Importance-weighted policy gradient without a clip, RLOO's loss (eq. VI.I: no clipping).

    ``per_token_loss = -A * exp(logp - old_logp)``. With one optimizer step per rollout
    batch (mu = 1) ``old_logp = logp.detach()``: the ratio is exactly 1, the loss's value is
    ``-A``, and its gradient is ``-A * exp(0) * grad logp = -A * grad logp``, REINFORCE's
    (Williams 1992) with a baseline. With mu > 1 the ratio corrects for the policy having
    moved since sampling, unbounded (that is what PPO's clip bounds).

    Args:
        logp: ``[N, T]`` log-probs of the sampled tokens under the policy being trained.
        old_logp: ``[N, T]`` log-probs under the policy that sampled them (no gradient).
        adv: ``[N, T]`` per-token advantages.

    Returns:
        ``[N, T]`` per-token loss (padding is left to ``aggregate``'s mask).
    """
    ratio = torch.exp(logp - old_logp)  # [N, T]
    return -adv * ratio  # [N, T]
