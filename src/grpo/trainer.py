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
import resource
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from grpo import checkpoint as ckpt
from grpo.config import Config, dump_config
from grpo.data import PromptSampler, encode_prompt, training_rows
from grpo.estimators import Critic, Scored, fill_advantages, informative_groups
from grpo.losses import Normaliser
from grpo.metrics import MetricsLogger
from grpo.objective import batched_logp, policy_loss, rollout_to_batch
from grpo.rewards import load_reward_function, score
from grpo.rewards.models import ProcessRewardModel, verifier_step_source
from grpo.rewards.shaping import overlong_penalty
from grpo.rollout import make_engine
from grpo.tasks import get_task  # importing it registers the built-in tasks' rewards
from grpo.types import Batch, SamplingParams


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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matmuls natively (oneDNN's check on a CPU)."""
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast_factory(setting: str, device: torch.device) -> Callable[[], Any]:
    """A no-argument factory of the forward passes' autocast context (``model.autocast``).

    Raises ValueError when bfloat16 is asked for on a device without native bfloat16
    matmuls: there autocast would emulate them, slower than float32.
    """
    if setting == "none":
        return contextlib.nullcontext
    if not native_bf16(device):
        raise ValueError(
            f"model.autocast: {setting!r} needs native bfloat16 matmuls (a CPU with "
            f"avx512_bf16 or AMX, or a GPU with bf16 support); this {device.type} has "
            "none, so it would run slower than float32. Set model.autocast=none."
        )
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _weighted_mean(parts: list[dict[str, float]], weights: list[float]) -> dict[str, float]:
    total = sum(weights) or 1.0
    keys = parts[0].keys() if parts else []
    return {k: sum(p[k] * w for p, w in zip(parts, weights, strict=True)) / total for k in keys}


def _current_rss_mb() -> float:
    """Resident memory of this process now (Linux /proc; 0 where it is unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * resource.getpagesize() / 2**20


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
        self.rss_at_start_mb = _current_rss_mb()  # before any model is loaded
        if cfg.run.num_threads:
            torch.set_num_threads(cfg.run.num_threads)
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        if model is None or tokenizer is None:
            from grpo.modeling import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(cfg.model.name_or_path, cfg.model.dtype)
        self.model, self.tokenizer = model, tokenizer
        self.autocast = autocast_factory(cfg.model.autocast, next(model.parameters()).device)
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
        self.step_source = self._step_source() if cfg.algorithm.advantage == "process" else None
        alg, o = cfg.algorithm, cfg.optim
        self.critic = (
            Critic(
                cfg.model.name_or_path,
                alg.critic_learning_rate or o.learning_rate,
                o.max_grad_norm,
                o.share_prompt,
                self.autocast,
            )
            if alg.name == "ppo"
            else None
        )
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=o.learning_rate,
            betas=(o.adam_beta1, o.adam_beta2),
            weight_decay=o.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step = 0
        self.output_dir = Path(cfg.run.output_dir)

    def _step_source(self):
        """Step rewards for process supervision: the task's verifier or a PRM (eq. V.I)."""
        r = self.cfg.rewards
        if r.step_source != "verifier":
            return ProcessRewardModel(r.step_source, separator=r.step_separator)
        if self.cfg.data.train_file:
            raise ValueError(
                "rewards.step_source='verifier' needs a built-in task (data.task); with "
                "data.train_file, give the path of a process reward model instead"
            )
        return verifier_step_source(get_task(self.cfg.data.task))

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
        cfg, alg = self.cfg, self.cfg.algorithm
        t0 = time.perf_counter()

        # 1-3. draw B prompts, generate G completions each, score (DAPO: refill flat groups)
        scored, reward_metrics = self._sample_and_score()
        rollout = scored.rollout
        t_gen = time.perf_counter()

        # 4. advantages, after the log-probs the estimator needs
        batch = rollout_to_batch(rollout)
        # whole groups per mini-batch (dynamic sampling may leave fewer than B groups); the
        # same micro-batch size bounds memory in the no-grad passes and in the update
        groups = -(-scored.num_groups // cfg.optim.num_minibatches)
        per_mini = groups * rollout.group_size
        micro = -(-per_mini // cfg.optim.gradient_accumulation_steps)
        fast = (cfg.rollout.temperature, cfg.optim.share_prompt, cfg.optim.bucket_by_length)
        with self.autocast():
            if cfg.needs_old_logp:
                batch.old_logp = batched_logp(self.model, batch, micro, *fast)
            if self.ref_model is not None:
                batch.ref_logp = batched_logp(self.ref_model, batch, micro, *fast)
        fill_advantages(batch, scored, cfg, self.tokenizer, self.step_source, self.critic, micro)
        t_ref = time.perf_counter()

        # 5. mu passes x mini-batches of whole groups: logp, loss, backward, step
        self.model.train()
        updates = []
        for _ in range(alg.num_iterations):
            for mini in batch.micro_batches(per_mini):
                update = self._optimizer_step(mini, micro)
                if self.critic is not None:
                    update.update(self.critic.update(mini, micro, alg.value_clip))
                updates.append(update)
        t_end = time.perf_counter()

        # 6. iterative RL: the reference follows the policy every N steps (DeepSeekMath 4.2)
        n_reset = alg.ref_reset_every
        if self.ref_model is not None and n_reset and (self.step + 1) % n_reset == 0:
            self.ref_model.load_state_dict(self.model.state_dict())

        lengths = rollout.completion_lengths.float()  # [N]
        return {
            **reward_metrics,
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
            **self._memory_metrics(),
        }

    # ------------------------------------------------------------------ pieces
    def _eval_due(self) -> bool:
        every = self.cfg.run.eval_every
        return bool(every and self.eval_fn and self.step % every == 0)

    def _evaluate(self) -> dict[str, float]:
        return {f"eval/{k}": v for k, v in self.eval_fn(self.model, self.tokenizer).items()}

    def _sample_and_score(self) -> tuple[Scored, dict[str, float]]:
        """One generation round of B prompts; with dynamic sampling, more rounds (at most
        ``max_refills``) until B groups with differing rewards are found."""
        alg, b = self.cfg.algorithm, self.cfg.rollout.prompts_per_step
        scored, metrics = self._generation_round(b)
        if not alg.dynamic_sampling:
            return scored, metrics
        kept = [scored.select(informative_groups(scored.rewards))]
        for _ in range(alg.max_refills):
            if sum(p.num_groups for p in kept) >= b:
                break
            more, _ = self._generation_round(b)
            kept.append(more.select(informative_groups(more.rewards)))
        have = sum(p.num_groups for p in kept)
        if have == 0:
            raise RuntimeError(
                f"dynamic sampling found no group with differing rewards in "
                f"{alg.max_refills + 1} rounds of {b} prompts: every completion of every "
                "group scored the same. Check the reward functions, or make the task easier "
                "(or harder) for this model, or raise algorithm.max_refills."
            )
        merged = Scored.concat(kept, self.sampling.pad_token_id)
        if have > b:
            merged = merged.select(torch.arange(have) < b)
        metrics["dynamic_sampling/groups_kept"] = min(have, b)
        return merged, metrics

    def _generation_round(self, num_prompts: int) -> tuple[Scored, dict[str, float]]:
        cfg, g = self.cfg, self.cfg.rollout.num_generations
        idx = self.sampler.next(num_prompts)
        rows = [self.rows[i] for i in idx]
        prompts = [self.prompt_ids[i] for i in idx]
        with self.autocast():
            rollout = self.engine.generate(self.model, prompts, self.sampling, self.generator)
        ids = [
            row[m.bool()].tolist()
            for row, m in zip(rollout.completion_ids, rollout.completion_mask, strict=True)
        ]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        col = cfg.data.prompt_column
        out = score(
            self.reward_functions,
            cfg.rewards.weights,
            [r[col] for r in rows for _ in range(g)],
            texts,
            {k: [r[k] for r in rows for _ in range(g)] for k in rows[0] if k != col},
            ids,
        )
        rewards = out.rewards + overlong_penalty(
            rollout.completion_lengths,
            cfg.rollout.max_completion_length,
            cfg.rewards.overlong_buffer,
            cfg.rewards.overlong_penalty,
        )  # [N]
        scored = Scored(rows, rollout, ids, texts, rewards.view(-1, g))
        return scored, self._reward_metrics(scored.rewards, out)

    def _reward_metrics(self, rewards: torch.Tensor, out) -> dict[str, float]:
        group_std = rewards.std(dim=1)  # [B]
        metrics = {
            "reward": rewards.mean().item(),
            "reward_std": group_std.mean().item(),
            "frac_reward_zero_std": (~informative_groups(rewards)).float().mean().item(),
        }
        for j, name in enumerate(out.names):
            values = out.per_function[:, j]
            metrics[f"rewards/{name}/mean"] = values.nanmean().item()
        return metrics

    def _memory_metrics(self) -> dict[str, float]:
        """Peak resident memory of the process, and bytes held by weights and optimizer
        states (policy, reference, critic): what the seed says GRPO saves over PPO."""
        models = [m for m in (self.model, self.ref_model, self.critic and self.critic.model) if m]
        optimizers = [self.optimizer] + ([self.critic.optimizer] if self.critic else [])
        weights = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
        states = sum(
            t.numel() * t.element_size()
            for o in optimizers
            for st in o.state.values()
            for t in st.values()
            if torch.is_tensor(t)
        )
        return {
            "memory/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "memory/rss_at_start_mb": self.rss_at_start_mb,
            "memory/model_and_optimizer_bytes": weights + states,
            "trained_parameters": sum(
                p.numel() for m in models for p in m.parameters() if p.requires_grad
            ),
        }

    def _optimizer_step(self, mini: Batch, micro: int) -> dict[str, float]:
        cfg = self.cfg
        norm = Normaliser.from_mask(mini.completion_mask, cfg.rollout.max_completion_length)
        self.optimizer.zero_grad(set_to_none=True)
        parts, weights, loss = [], [], 0.0
        for mb in mini.micro_batches(micro):
            with self.autocast():
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
            **(
                {
                    "critic": self.critic.model.state_dict(),
                    "critic_optimizer": self.critic.optimizer.state_dict(),
                }
                if self.critic
                else {}
            ),
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
        if self.critic is not None:
            self.critic.model.load_state_dict(state["critic"])
            self.critic.optimizer.load_state_dict(state["critic_optimizer"])
        self.step = state["step"]
        return self.step
