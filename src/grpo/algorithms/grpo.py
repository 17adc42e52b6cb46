"""GRPO (DeepSeekMath 2024): group-relative advantages, clipped surrogate, k3 KL in the loss.

- Outcome supervision (eq. II.I): each completion's reward normalised within its group
  (``algorithm.scale_rewards``: group std, batch std or none), the same on every token.
- Process supervision (eq. V.I, ``algorithm.advantage: process``): step rewards normalised
  over the group, summed over the steps that end at or after each token. Step rewards come
  from the built-in task's step verifier or a process reward model (``rewards.step_source``).
"""

from __future__ import annotations

from typing import Any

from grpo.advantages import expand_to_tokens, process_advantages
from grpo.algorithms.registry import register_algorithm, several_updates
from grpo.config import Config, ConfigError
from grpo.distributed import global_group_advantages
from grpo.rewards.models import ProcessRewardModel, StepRewardSource, verifier_step_source
from grpo.rewards.process import char_to_token_ends, step_tensors
from grpo.runtime import Runtime
from grpo.types import Batch, Scored


def build_step_source(cfg: Config, runtime: Runtime) -> StepRewardSource:
    """Step rewards for process supervision: the task's verifier or a PRM (eq. V.I)."""
    r = cfg.rewards
    if r.step_source != "verifier":
        return ProcessRewardModel(r.step_source, separator=r.step_separator, device=runtime.device)
    if cfg.data.train_file:
        raise ConfigError(
            "rewards.step_source='verifier' needs a built-in task (data.task); with "
            "data.train_file, give the path of a process reward model instead"
        )
    from grpo.tasks import get_task

    return verifier_step_source(get_task(cfg.data.task))


@register_algorithm("grpo")
class GRPO:
    clipped = True
    learners = ()

    def __init__(self, cfg: Config, runtime: Runtime, tokenizer: Any):
        self.cfg, self.tokenizer, self.runtime = cfg, tokenizer, runtime
        self.kl_in_loss = cfg.algorithm.beta > 0
        self.kl_estimator = cfg.algorithm.kl_estimator
        process = cfg.algorithm.advantage == "process"
        self.step_source = build_step_source(cfg, runtime) if process else None

    def needs_old_logp(self, sample_logp_exact: bool) -> bool:
        return several_updates(self.cfg)

    def prepare(self, batch: Batch, scored: Scored, micro_size: int) -> None:
        alg, mask = self.cfg.algorithm, batch.completion_mask  # [N, T]
        if self.step_source is None:
            adv = global_group_advantages(
                scored.rewards, alg.scale_rewards, alg.advantage_eps, self.runtime
            )  # [B, G]; the batch std is the global batch's
            batch.advantages = expand_to_tokens(adv, mask)  # [N, T]
            return
        g, col = scored.rollout.group_size, self.cfg.data.prompt_column
        rows = [r for r in scored.rows for _ in range(g)]
        steps = self.step_source.score_steps([r[col] for r in rows], scored.texts, rows)
        ends = char_to_token_ends(self.tokenizer, scored.ids, scored.texts, [s.ends for s in steps])
        step_rewards, step_mask, step_end = step_tensors([s.scores for s in steps], ends)
        device = mask.device
        adv = process_advantages(
            step_rewards.to(device),
            step_mask.to(device),
            step_end.to(device),
            g,
            batch.completion_length,
            alg.advantage_eps,
        )  # [N, T]
        batch.advantages = adv * mask  # [N, T]
