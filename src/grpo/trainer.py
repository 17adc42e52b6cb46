"""The GRPO training loop, in the order of DESIGN.md and nowhere else:

    draw B prompts -> generate G completions each -> score -> advantages
    -> for each of mu passes, for each mini-batch: logp, loss, backward, step
    -> log -> checkpoint

The maths lives in ``advantages``, ``losses`` and ``logprobs``; this module only composes.

Departures from the paper: none in the objective. Mini-batches take groups in sampling
order (no reshuffle between the mu passes), so a run is reproducible from its seed alone.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import grpo.tasks  # noqa: F401  (registers the built-in tasks' reward functions)
from grpo import checkpoint as ckpt
from grpo.advantages import expand_to_tokens, group_advantages
from grpo.config import Config, dump_config
from grpo.data import PromptSampler, encode_prompt, training_rows
from grpo.logprobs import completion_logp
from grpo.losses import Normaliser, aggregate, clipped_surrogate, kl_divergence
from grpo.metrics import MetricsLogger, masked_mean
from grpo.rewards import load_reward_function, score
from grpo.rollout import make_engine
from grpo.types import Batch, LossOutput, Rollout, SamplingParams


def policy_loss(model, batch: Batch, cfg: Config, norm: Normaliser) -> LossOutput:
    """Clipped surrogate (section III) plus beta * KL (eq. IV.I), aggregated once.

    ``batch`` is a micro-batch; ``norm`` holds the whole mini-batch's totals, so summing
    this loss over micro-batches gives exactly the mini-batch's loss.
    """
    alg = cfg.algorithm
    mask = batch.completion_mask  # [n, T]
    logp, entropy = completion_logp(
        model,
        batch.input_ids,
        batch.attention_mask,
        batch.completion_length,
        temperature=cfg.rollout.temperature,
        with_entropy=True,
    )  # [n, T]
    old_logp = logp.detach() if batch.old_logp is None else batch.old_logp  # [n, T]
    surrogate = clipped_surrogate(logp, old_logp, batch.advantages, alg.epsilon, alg.clip_high)
    per_token = surrogate.per_token_loss  # [n, T]
    metrics = {
        "entropy": masked_mean(entropy, mask),
        "clip_ratio/low_mean": masked_mean(surrogate.low_clipped.float(), mask),
        "clip_ratio/high_mean": masked_mean(surrogate.high_clipped.float(), mask),
    }
    if alg.beta > 0:
        kl = kl_divergence(logp, batch.ref_logp, alg.kl_estimator)  # [n, T]
        per_token = per_token + alg.beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)
    loss = aggregate(per_token, mask, alg.loss_type, norm)
    return LossOutput(loss=loss, metrics=metrics)


def rollout_to_batch(rollout: Rollout, advantages: torch.Tensor) -> Batch:
    """Prompt (repeated per completion) + completion as one [N, P + T] sequence."""
    g = rollout.group_size
    prompt_ids = rollout.prompt_ids.repeat_interleave(g, dim=0)  # [N, P]
    prompt_mask = rollout.prompt_mask.repeat_interleave(g, dim=0)  # [N, P]
    mask = rollout.completion_mask.float()  # [N, T]
    return Batch(
        input_ids=torch.cat([prompt_ids, rollout.completion_ids], dim=1),  # [N, P + T]
        attention_mask=torch.cat([prompt_mask.long(), mask.long()], dim=1),  # [N, P + T]
        completion_mask=mask,
        advantages=advantages * mask,  # [N, T]
    )


@torch.no_grad()
def batched_logp(model, batch: Batch, micro_size: int, temperature: float) -> torch.Tensor:
    """Log-probs of the batch's completions under ``model``, micro-batch by micro-batch."""
    parts = []
    for start in range(0, batch.num_completions, micro_size):
        mb = batch.rows(slice(start, start + micro_size))
        logp, _ = completion_logp(
            model, mb.input_ids, mb.attention_mask, mb.completion_length, temperature=temperature
        )
        parts.append(logp)
    return torch.cat(parts)  # [N, T]


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Linear warmup from 0, then constant, linear or cosine decay to 0 over all updates."""
    o = cfg.optim
    total = o.max_steps * cfg.algorithm.num_iterations * o.num_minibatches

    def factor(s: int) -> float:
        if s < o.warmup_steps:
            return (s + 1) / o.warmup_steps
        if o.lr_scheduler == "constant":
            return 1.0
        progress = (s - o.warmup_steps) / max(1, total - o.warmup_steps)
        if o.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _weighted_mean(parts: list[dict[str, float]], weights: list[float]) -> dict[str, float]:
    total = sum(weights) or 1.0
    keys = parts[0].keys() if parts else []
    return {k: sum(p[k] * w for p, w in zip(parts, weights, strict=True)) / total for k in keys}


@contextlib.contextmanager
def _deferred_sigint():
    """Turn the first Ctrl-C into a flag the loop checks between steps, so the checkpoint
    it saves holds a whole step (weights, optimizer, sampler and RNG agree)."""
    hit = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if hit:
            raise KeyboardInterrupt
        hit.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)


class GRPOTrainer:
    """Holds the run's state (models, optimizer, sampler, RNG) and runs the loop.

    ``model``/``tokenizer``/``reward_functions`` may be passed in directly (tests, notebooks);
    otherwise they are loaded from the config.
    """

    def __init__(
        self,
        cfg: Config,
        model=None,
        tokenizer=None,
        reward_functions: list[Callable] | None = None,
        eval_fn: Callable[[Any, Any], dict[str, float]] | None = None,
    ):
        self.cfg = cfg
        if cfg.run.num_threads:
            torch.set_num_threads(cfg.run.num_threads)
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        if model is None or tokenizer is None:
            from grpo.modeling import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(cfg.model.name_or_path, cfg.model.dtype)
        self.model, self.tokenizer = model, tokenizer
        self.ref_model = self._load_reference() if cfg.algorithm.beta > 0 else None
        self.rows = training_rows(cfg.data, cfg.run.seed)
        self.prompt_ids = [encode_prompt(tokenizer, r[cfg.data.prompt_column]) for r in self.rows]
        self.sampler = PromptSampler(len(self.rows), cfg.run.seed)
        self.engine = make_engine(cfg.rollout.engine)
        r = cfg.rollout
        self.sampling = SamplingParams(
            num_generations=r.num_generations,
            max_completion_length=r.max_completion_length,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            eos_token_ids=(tokenizer.eos_token_id,),
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
        self.generator = torch.Generator().manual_seed(cfg.run.seed)
        self.reward_functions = reward_functions or [
            load_reward_function(s) for s in cfg.rewards.functions
        ]
        self.eval_fn = eval_fn
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=o.learning_rate,
            betas=(o.adam_beta1, o.adam_beta2),
            weight_decay=o.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step = 0
        self.output_dir = Path(cfg.run.output_dir)

    def _load_reference(self):
        if self.cfg.model.ref_name_or_path:
            from grpo.modeling import load_model_and_tokenizer

            ref, _ = load_model_and_tokenizer(self.cfg.model.ref_name_or_path, self.cfg.model.dtype)
        else:
            ref = copy.deepcopy(self.model)
        ref.eval().requires_grad_(False)
        return ref

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict[str, float]]:
        """Run until ``optim.max_steps``. Ctrl-C finishes the current step, saves a
        checkpoint and returns (a second Ctrl-C aborts at once)."""
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.output_dir / "config.yaml")
        history: list[dict[str, float]] = []
        logger = MetricsLogger(self.output_dir, cfg.optim.max_steps, self.step, cfg.run.progress)
        with logger, _deferred_sigint() as interrupted:
            if self.step == 0 and self._eval_due():  # the curve starts at the reference
                logger.log(0, self._evaluate())
            while self.step < cfg.optim.max_steps and not interrupted():
                metrics = self.train_step()
                self.step += 1
                if self._eval_due():
                    metrics.update(self._evaluate())
                history.append({"step": self.step, **metrics})
                if self.step % cfg.run.log_every == 0:
                    logger.log(self.step, metrics)
                if cfg.run.save_every and self.step % cfg.run.save_every == 0:
                    self.save()
            if interrupted():
                logger.console.print(
                    f"interrupted at step {self.step}; checkpoint saved to {self.save()}"
                )
                return history
        self.save()
        self.model.save_pretrained(self.output_dir / "final")
        self.tokenizer.save_pretrained(self.output_dir / "final")
        return history

    def train_step(self) -> dict[str, float]:
        cfg, g = self.cfg, self.cfg.rollout.num_generations
        t0 = time.perf_counter()

        # 1. draw B prompts
        idx = self.sampler.next(cfg.rollout.prompts_per_step)
        rows = [self.rows[i] for i in idx]

        # 2. generate G completions each
        rollout = self.engine.generate(
            self.model, [self.prompt_ids[i] for i in idx], self.sampling, self.generator
        )
        t_gen = time.perf_counter()

        # 3. score
        ids = [
            row[m.bool()].tolist()
            for row, m in zip(rollout.completion_ids, rollout.completion_mask, strict=True)
        ]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        rewards_out = self._score(rows, texts, ids, g)
        rewards = rewards_out.rewards.view(-1, g)  # [B, G]

        # 4. advantages (eq. II.I)
        adv = group_advantages(
            rewards, cfg.algorithm.scale_rewards, cfg.algorithm.advantage_eps
        )  # [B, G]
        batch = rollout_to_batch(rollout, expand_to_tokens(adv, rollout.completion_mask.float()))
        micro = self._micro_size()
        if cfg.needs_old_logp:
            batch.old_logp = batched_logp(
                self.model, batch, micro, cfg.rollout.temperature
            )  # [N, T]
        if self.ref_model is not None:
            batch.ref_logp = batched_logp(
                self.ref_model, batch, micro, cfg.rollout.temperature
            )  # [N, T]
        t_ref = time.perf_counter()

        # 5. mu passes x mini-batches of whole groups: logp, loss, backward, step
        self.model.train()
        per_mini = batch.num_completions // cfg.optim.num_minibatches
        updates = []
        for _ in range(cfg.algorithm.num_iterations):
            for start in range(0, batch.num_completions, per_mini):
                updates.append(
                    self._optimizer_step(batch.rows(slice(start, start + per_mini)), micro)
                )
        t_end = time.perf_counter()

        # 6. iterative RL: the reference follows the policy every N steps (DeepSeekMath 4.2)
        n_reset = cfg.algorithm.ref_reset_every
        if self.ref_model is not None and n_reset and (self.step + 1) % n_reset == 0:
            self.ref_model.load_state_dict(self.model.state_dict())

        lengths = rollout.completion_lengths.float()  # [N]
        metrics = {
            **self._reward_metrics(rewards, rewards_out),
            **_weighted_mean(updates, [1.0] * len(updates)),
            "completions/mean_length": lengths.mean().item(),
            "completions/max_length": lengths.max().item(),
            "completions/truncated_frac": rollout.truncated.float().mean().item(),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "tokens_per_s": lengths.sum().item() / (t_end - t0),
            "step_time": t_end - t0,
            "time/generation": t_gen - t0,
            "time/scoring_and_reference": t_ref - t_gen,
            "time/update": t_end - t_ref,
        }
        return metrics

    # ------------------------------------------------------------------ pieces
    def _eval_due(self) -> bool:
        every = self.cfg.run.eval_every
        return bool(every and self.eval_fn and self.step % every == 0)

    def _evaluate(self) -> dict[str, float]:
        return {f"eval/{k}": v for k, v in self.eval_fn(self.model, self.tokenizer).items()}

    def _micro_size(self) -> int:
        o = self.cfg.optim
        return self.cfg.completions_per_step // (o.num_minibatches * o.gradient_accumulation_steps)

    def _score(self, rows: list[dict], texts: list[str], ids: list[list[int]], g: int):
        col = self.cfg.data.prompt_column
        prompts = [r[col] for r in rows for _ in range(g)]
        columns = {k: [r[k] for r in rows for _ in range(g)] for k in rows[0] if k != col}
        return score(self.reward_functions, self.cfg.rewards.weights, prompts, texts, columns, ids)

    def _reward_metrics(self, rewards: torch.Tensor, out) -> dict[str, float]:
        group_std = rewards.std(dim=1)  # [B]
        metrics = {
            "reward": rewards.mean().item(),
            "reward_std": group_std.mean().item(),
            "frac_reward_zero_std": (group_std < 1e-8).float().mean().item(),
        }
        for j, name in enumerate(out.names):
            values = out.per_function[:, j]
            metrics[f"rewards/{name}/mean"] = values.nanmean().item()
        return metrics

    def _optimizer_step(self, mini: Batch, micro: int) -> dict[str, float]:
        cfg = self.cfg
        norm = Normaliser.from_mask(mini.completion_mask, cfg.rollout.max_completion_length)
        self.optimizer.zero_grad(set_to_none=True)
        parts, weights, loss = [], [], 0.0
        for start in range(0, mini.num_completions, micro):
            mb = mini.rows(slice(start, start + micro))
            out = policy_loss(self.model, mb, cfg, norm)
            out.loss.backward()
            loss += out.loss.item()
            parts.append(out.metrics)
            weights.append(mb.completion_mask.sum().item())
        max_norm = cfg.optim.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": loss, "grad_norm": grad_norm.item(), **_weighted_mean(parts, weights)}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "generator": self.generator.get_state(),
            "rng": ckpt.rng_state(),
        }

    def save(self) -> Path:
        ref_moved = self.ref_model is not None and self.cfg.algorithm.ref_reset_every > 0
        return ckpt.save_checkpoint(
            self.output_dir,
            self.step,
            self.model,
            self.tokenizer,
            self.state_dict(),
            ref_model=self.ref_model if ref_moved else None,
        )

    def resume(self, checkpoint: str | Path | None = None) -> int:
        """Load weights and state from a checkpoint (default: the newest); return its step."""
        path = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(self.output_dir)
        if path is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {str(self.output_dir)!r}")
        from safetensors.torch import load_model

        load_model(self.model, path / "model.safetensors", strict=False)
        if self.ref_model is not None and (path / ckpt.REF_DIR).is_dir():
            load_model(self.ref_model, path / ckpt.REF_DIR / "model.safetensors", strict=False)
        state = ckpt.load_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])
        ckpt.set_rng_state(state["rng"])
        self.step = state["step"]
        return self.step
