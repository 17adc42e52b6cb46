"""Whether a run can learn: the signal a batch carries, and warnings when there is none.

GRPO learns only from groups whose rewards differ: an all-equal group gets advantage 0
(eq. II.I), and a batch of such groups gives the clipped surrogate (section III) a zero
gradient. Two things follow, both decided here:

- ``moves_weights``: a mini-batch with no advantage and no KL gradient (eq. IV.I's k3 and
  k2 are flat where the policy equals the reference) is not applied at all, so AdamW's
  momentum cannot turn float noise or a previous step's moments into a full-size step;
- ``RunDiagnostics``: the trainer hands it each step's metrics and it warns, on the
  console and as ``warnings/*`` metrics, when the reward was constant for the first steps,
  when most groups keep all-equal rewards, or when most completions are truncated, naming
  the likely causes. ``grpo check`` runs the same checks on one batch without training.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from grpo.types import Batch

if TYPE_CHECKING:
    from grpo.algorithms.registry import Algorithm

KL_FLAT_AT_EQUALITY = ("k2", "k3")
"""KL estimators whose gradient is 0 where ``logp == ref_logp``: k3 = e^x - x - 1 and
k2 = x^2 / 2 (x = ref_logp - logp). k1 = -x has gradient 1 everywhere."""


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models hold bitwise-equal tensors under the same names (one pass over
    the weights: checked when a reference is loaded or restored, not every step); the
    models may sit on different devices."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        x.shape == sb[k].shape and x.dtype == sb[k].dtype and torch.equal(x, sb[k].to(x.device))
        for k, x in sa.items()
    )


def moves_weights(batch: Batch, algorithm: Algorithm) -> bool:
    """Whether the policy loss of ``batch`` can have a non-zero gradient.

    The surrogate's gradient is a multiple of the advantage, token by token, so it is
    exactly 0 where every advantage is 0; the KL term adds a gradient only when it sits in
    the loss and the policy differs from the reference (or the estimator is k1).
    """
    if torch.count_nonzero(batch.advantages * batch.completion_mask) > 0:
        return True
    flat_kl = batch.ref_is_policy and algorithm.kl_estimator in KL_FLAT_AT_EQUALITY
    return algorithm.kl_in_loss and not flat_kl


@dataclass(frozen=True)
class Thresholds:
    """When ``RunDiagnostics`` warns."""

    constant_reward_steps: int = 10
    """K: warn when every completion of the first K steps had the same reward."""
    zero_std_frac: float = 0.9
    """Warn when more than this share of groups had all-equal rewards ..."""
    zero_std_steps: int = 10
    """... at every one of this many consecutive steps."""
    truncated_frac: float = 0.5
    """Warn when more than this share of completions hit ``max_completion_length`` ..."""
    truncated_steps: int = 3
    """... on average over this many consecutive steps."""


def constant_reward_message(value: float, steps: int, max_completion_length: int) -> str:
    where = f"the first {steps} steps" if steps > 1 else "this batch"
    return (
        f"every completion of {where} scored the same reward ({value:g}): no group has an "
        "advantage, so nothing is learned and the weights do not move. Likely causes: the "
        "reward function does not match what the model writes (check rewards.functions "
        "against a few completions, e.g. arithmetic_correct wants 'A:<answer>'); the prompt "
        "is not in the format the model was trained on (its text, chat template or BOS: see "
        "data.add_special_tokens); answers cut off by rollout.max_completion_length="
        f"{max_completion_length}; or a task the model never (or always) solves."
    )


def zero_std_message(frac: float, steps: int, reward: float, num_generations: int) -> str:
    where = f"at each of the last {steps} steps" if steps > 1 else "in this batch"
    return (
        f"{frac:.0%} of groups had all-equal rewards {where} (mean reward {reward:.3g}): "
        "little signal to learn from. Likely causes: a task too hard or too easy for the "
        "model (the reward sits at its minimum or maximum); a reward with too few levels to "
        f"differ within a group of rollout.num_generations={num_generations} (a larger "
        "group, or partial credit); a reward function or prompt format that does not match "
        "what the model writes (rewards.functions, data.add_special_tokens)."
    )


def truncation_message(frac: float, steps: int, max_completion_length: int) -> str:
    where = f"over the last {steps} steps" if steps > 1 else "in this batch"
    return (
        f"{frac:.0%} of completions {where} stopped at rollout.max_completion_length="
        f"{max_completion_length} without an end-of-sequence token: a cut-off answer "
        "usually scores as wrong. Likely causes: max_completion_length is too small for the "
        "task's answers; the model does not emit its EOS after this prompt format (chat "
        "template, BOS: see data.add_special_tokens); a reward that favours length."
    )


class RunDiagnostics:
    """Watches each step's metrics for a run that cannot learn.

    ``observe`` takes the step's metrics (``reward``, ``frac_reward_zero_std``,
    ``completions/truncated_frac``) and returns ``warnings/constant_reward``,
    ``warnings/reward_zero_std`` and ``warnings/truncated`` (1 while the condition holds,
    else 0) plus the messages to print, each once per run.
    """

    def __init__(
        self, max_completion_length: int, num_generations: int, thresholds: Thresholds | None = None
    ):
        self.max_completion_length = max_completion_length
        self.num_generations = num_generations
        self.t = thresholds or Thresholds()
        self.steps = 0
        self.constant: float | None = None  # the reward every completion had so far, if one
        self.zero_std = deque(maxlen=self.t.zero_std_steps)
        self.truncated = deque(maxlen=self.t.truncated_steps)
        self.said: set[str] = set()

    def observe(self, metrics: dict[str, float]) -> tuple[dict[str, float], list[str]]:
        t = self.t
        self.steps += 1
        reward, zero_std = metrics["reward"], metrics["frac_reward_zero_std"]
        flat = zero_std == 1.0 and (self.steps == 1 or reward == self.constant)
        self.constant = reward if flat else None
        self.zero_std.append(zero_std)
        self.truncated.append(metrics["completions/truncated_frac"])
        truncated = sum(self.truncated) / len(self.truncated)
        flags = {
            "constant_reward": self.constant is not None and self.steps >= t.constant_reward_steps,
            "reward_zero_std": len(self.zero_std) == self.zero_std.maxlen
            and min(self.zero_std) > t.zero_std_frac,
            "truncated": len(self.truncated) == self.truncated.maxlen
            and truncated > t.truncated_frac,
        }
        messages = {
            "constant_reward": lambda: constant_reward_message(
                reward, self.steps, self.max_completion_length
            ),
            "reward_zero_std": lambda: zero_std_message(
                min(self.zero_std), len(self.zero_std), reward, self.num_generations
            ),
            "truncated": lambda: truncation_message(
                truncated, len(self.truncated), self.max_completion_length
            ),
        }
        if flags["constant_reward"]:  # the more specific warning says it all
            self.said.add("reward_zero_std")
        new = [k for k, on in flags.items() if on and k not in self.said]
        self.said.update(new)
        return {f"warnings/{k}": float(on) for k, on in flags.items()}, [messages[k]() for k in new]


def batch_findings(
    rewards: torch.Tensor,
    truncated: torch.Tensor,
    max_completion_length: int,
    thresholds: Thresholds | None = None,
) -> list[str]:
    """The warnings ``RunDiagnostics`` would give for one batch on its own.

    Args:
        rewards: ``[B, G]`` combined rewards.
        truncated: ``[N]`` bool, completions stopped by ``max_completion_length``.
    """
    t = thresholds or Thresholds()
    found = []
    flat = rewards.max(dim=1).values == rewards.min(dim=1).values  # [B]
    if rewards.max() == rewards.min():
        found.append(constant_reward_message(rewards[0, 0].item(), 1, max_completion_length))
    elif flat.float().mean() > t.zero_std_frac:
        frac, mean = flat.float().mean().item(), rewards.mean().item()
        found.append(zero_std_message(frac, 1, mean, rewards.shape[1]))
    if truncated.float().mean() > t.truncated_frac:
        frac = truncated.float().mean().item()
        found.append(truncation_message(frac, 1, max_completion_length))
    return found
