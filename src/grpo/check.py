"""``grpo check CONFIG.yaml [overrides]``: one batch through the whole pipeline, no training.

It loads what ``grpo train`` loads (model, reference, tokenizer, data, reward functions),
samples one batch of B prompts x G completions and scores it, then prints a few prompts as
text and as the tokens the model sees, their completions, rewards and advantages, the
batch's statistics, and a verdict: whether the batch carries a learning signal (a group
whose rewards differ, so that its advantages are non-zero, eq. II.I). No optimizer step is
taken and nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from grpo.advantages import group_advantages, informative_groups
from grpo.config import Config
from grpo.diagnostics import batch_findings


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("1")["input_ids"][:1] == [bos]


def check(cfg: Config, show: int = 3, out: Callable[[str], None] = print) -> bool:
    """Sample and score one batch as a training step would; print what it holds.

    Args:
        cfg: the run's configuration.
        show: prompts printed in full (each with its G completions).
        out: where lines go.

    Returns:
        Whether the batch carries a learning signal.
    """
    from grpo.trainer import GRPOTrainer
    from grpo.validate import check_inputs

    check_inputs(cfg)  # a bad input is one line, before any model loads
    trainer = GRPOTrainer(cfg)
    tok, alg, r = trainer.tokenizer, cfg.algorithm, cfg.rollout
    scored, metrics = trainer.sample_round(r.prompts_per_step)
    rollout, g = scored.rollout, r.num_generations

    params = sum(p.numel() for p in trainer.model.parameters())
    out(f"model: {cfg.model.name_or_path} ({type(trainer.model).__name__}, {params:,} parameters)")
    out(
        f"tokenizer: BOS {tok.bos_token!r} (added to text by default: "
        f"{'yes' if _adds_bos(tok) else 'no'}), EOS {tok.eos_token!r}; "
        f"data.add_special_tokens={cfg.data.add_special_tokens}"
    )
    starts = [
        ids[m.bool()][:1].tolist() == [tok.bos_token_id]
        for ids, m in zip(rollout.prompt_ids, rollout.prompt_mask, strict=True)
    ]
    out(
        f"batch: {scored.num_groups} prompts x {g} completions (max {r.max_completion_length} "
        f"tokens, temperature {r.temperature}); {sum(starts)} of {len(starts)} prompts start "
        f"with BOS; rewards: {', '.join(cfg.rewards.functions)}"
    )

    adv = group_advantages(scored.rewards, alg.scale_rewards, alg.advantage_eps)  # [B, G]
    for b in range(min(show, scored.num_groups)):
        ids = rollout.prompt_ids[b][rollout.prompt_mask[b].bool()].tolist()
        out("")
        out(f"prompt {b + 1}: {scored.rows[b][cfg.data.prompt_column]!r}")
        out(f"  model sees ({len(ids)} tokens): {tok.decode(ids)!r}")
        out(f"  tokens: {tok.convert_ids_to_tokens(ids)}")
        out("  reward  advantage  tokens  end   completion")
        for i in range(b * g, (b + 1) * g):
            end = "cut" if rollout.truncated[i] else "eos"
            n = int(rollout.completion_lengths[i])
            reward, a = scored.rewards[b, i - b * g].item(), adv[b, i - b * g].item()
            out(f"  {reward:6.3g}  {a:9.3g}  {n:6d}  {end:4}  {scored.texts[i]!r}")
        rewards = scored.rewards[b]  # [G]
        out(f"  group: reward mean {rewards.mean():.3g}, std {rewards.std():.3g}")

    flat = ~informative_groups(scored.rewards)  # [B]
    per_function = ", ".join(
        f"{k.split('/')[1]} {v:.3g}" for k, v in metrics.items() if k.startswith("rewards/")
    )
    out("")
    out(
        f"batch statistics: reward {metrics['reward']:.3g} ({per_function}), reward_std "
        f"{metrics['reward_std']:.3g}, frac_reward_zero_std {metrics['frac_reward_zero_std']:.3g}"
        f", truncated {rollout.truncated.float().mean():.0%}, mean length "
        f"{rollout.completion_lengths.float().mean():.1f} tokens"
    )
    for text in batch_findings(scored.rewards, rollout.truncated, r.max_completion_length):
        out(f"warning: {text}")
    signal = bool(torch.any(~flat))
    if signal:
        out(
            f"verdict: LEARNING SIGNAL: {int((~flat).sum())} of {len(flat)} groups have "
            "differing rewards, so their advantages are non-zero"
        )
    else:
        out(
            "verdict: NO LEARNING SIGNAL: every group's rewards are equal, so every advantage "
            "is 0 and a training step would leave the weights where they are"
        )
    return signal
