"""The GRPO training loop, in the order of DESIGN.md and nowhere else:

    draw B prompts -> generate G completions each -> score -> advantages
    -> for each of mu passes, for each mini-batch: logp, loss, backward, step
    -> sync the engine -> log -> checkpoint

Every decision is made once, by a named part built in ``__init__``: the ``Runtime``
(device, autocast, processes), the ``Policy`` and its ``Reference``, the engine, the
``RolloutScorer`` and the registered ``Algorithm``. This module only composes them.

Departures from the paper: none in the objective. Mini-batches take groups in sampling
order (no reshuffle between the mu passes), so a run is reproducible from its seed alone.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from grpo import checkpoint as ckpt
from grpo import distributed, host_memory
from grpo.advantages import informative_groups
from grpo.algorithms import build_algorithm
from grpo.algorithms.objective import policy_loss
from grpo.config import Config, dump_config
from grpo.conventions import check_chat_prompts, stop_token_ids
from grpo.data import PromptSampler, encode_prompt, training_rows
from grpo.diagnostics import RunDiagnostics, moves_weights
from grpo.errors import CheckpointError
from grpo.evaluation import periodic_task_eval
from grpo.faults import NonFiniteGuard, RunControl
from grpo.hf import load_model_and_tokenizer
from grpo.metrics import current_rss_mb, memory_metrics, open_sinks, step_samples
from grpo.model_options import apply_model_options
from grpo.optim import build_optimizer
from grpo.policy import DTYPES, LogpSettings, Policy, Reference
from grpo.rewards import load_reward_function, trainer_state
from grpo.rewards.rollouts import RolloutScorer
from grpo.rollout import Engine, make_engine
from grpo.runtime import Runtime
from grpo.tasks import get_task  # noqa: F401  (importing it registers the tasks' rewards)
from grpo.types import Batch, SamplingParams, Scored


def sampling_params(cfg: Config, tokenizer: Any, model: Any = None) -> SamplingParams:
    """The rollout section as the engine takes it, with the pad id and every end token
    (the tokenizer's EOS and those the model's generation config lists)."""
    r = cfg.rollout
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return SamplingParams(
        num_generations=r.num_generations,
        max_completion_length=r.max_completion_length,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        eos_token_ids=stop_token_ids(model, tokenizer),
        pad_token_id=pad,
    )


def setup_policy(cfg: Config, runtime: Runtime, model=None, tokenizer=None):
    """The policy (loaded from ``model.name_or_path`` unless given) and its tokenizer."""
    if model is None or tokenizer is None:
        model, tokenizer = load_model_and_tokenizer(
            cfg.model.name_or_path, DTYPES[cfg.model.dtype]
        )
    model = apply_model_options(model, cfg.model)  # dropout off, checkpointing, LoRA
    return Policy(model, runtime, LogpSettings.from_config(cfg)), tokenizer


class PhaseClock:
    """Seconds spent in each named phase of a step (``time/NAME``), lap after lap."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = defaultdict(float)

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self.last
        self.last = now

    @property
    def total(self) -> float:
        return self.last - self.start


def _weighted_mean(parts: list[dict[str, float]], weights: list[float]) -> dict[str, float]:
    """Each key's weighted mean over the parts that have it (a skipped update has fewer)."""
    out = {}
    for k in dict.fromkeys(k for p in parts for k in p):
        pairs = [(p[k], w) for p, w in zip(parts, weights, strict=True) if k in p]
        out[k] = sum(v * w for v, w in pairs) / (sum(w for _, w in pairs) or 1.0)
    return out


class GRPOTrainer:
    """Holds the run's state (models, optimizer, sampler, RNG) and runs the loop.

    ``model``/``tokenizer``/``reward_functions``/``engine`` may be passed in directly
    (tests, notebooks); otherwise they are built from the config.
    """

    def __init__(
        self,
        cfg: Config,
        model=None,
        tokenizer=None,
        reward_functions: list[Callable] | None = None,
        eval_fn: Callable[[Any, Any], dict[str, float]] | None = None,
        engine: Engine | None = None,
    ):
        self.cfg = cfg
        self.rss_at_start_mb = current_rss_mb()  # before any model is loaded
        self.runtime = Runtime.from_settings(cfg.model.device, cfg.model.autocast)
        if cfg.run.release_freed_memory:
            host_memory.release_freed_memory(self.runtime.device)
        cfg.distributed.check(self.runtime.world_size, cfg)
        cfg.distributed.world_size = self.runtime.world_size  # recorded in config.yaml
        if cfg.run.num_threads:
            torch.set_num_threads(cfg.run.num_threads)
        self.runtime.seed_everything(cfg.run.seed)
        # data and rewards first: an unreadable input fails before the policy loads
        self.rows = training_rows(cfg.data, cfg.run.seed)
        col = cfg.data.prompt_column
        check_chat_prompts(self.rows, col, tokenizer, cfg.model.name_or_path)
        functions = reward_functions or [
            load_reward_function(s, self.runtime.device) for s in cfg.rewards.functions
        ]
        self.eval_fn = eval_fn or periodic_task_eval(cfg, functions)
        self.policy, self.tokenizer = setup_policy(cfg, self.runtime, model, tokenizer)
        self.reference = Reference.build(cfg, self.policy)
        for model in (self.policy, self.reference) if self.reference else (self.policy,):
            model.distribute(cfg.distributed.strategy)  # before the optimizer sees parameters
        self.prompt_ids = [
            encode_prompt(self.tokenizer, r[col], cfg.data.add_special_tokens) for r in self.rows
        ]
        self.sampler = PromptSampler(len(self.rows), cfg.run.seed)
        self.engine = engine or make_engine(cfg.rollout.engine)
        self.sampling = sampling_params(cfg, self.tokenizer, self.policy.base)
        self.generator = self.runtime.generator(self.runtime.rank_seed(cfg.run.seed))
        r = cfg.rollout
        self.diagnostics = RunDiagnostics(r.max_completion_length, r.num_generations)
        self.scorer = RolloutScorer(cfg, self.tokenizer, functions)
        self.algorithm = build_algorithm(cfg, self.runtime, self.tokenizer)
        self.optimizer, self.scheduler = build_optimizer(self.policy.trainable_parameters(), cfg)
        untruncated = cfg.rollout.top_k == 0 and cfg.rollout.top_p >= 1
        self.old_logp_pass = self.algorithm.needs_old_logp(self.engine.exact_logp and untruncated)
        self.step = 0
        self.output_dir = Path(cfg.run.output_dir)
        self.nonfinite = NonFiniteGuard(cfg.optim.max_nonfinite_steps)
        self.stop_signal: int | None = None

    @property
    def model(self) -> torch.nn.Module:
        """The trained transformers model."""
        return self.policy.base

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict[str, float]]:
        """Run until ``optim.max_steps``. SIGTERM, SIGHUP or Ctrl-C finish the current
        step, save a checkpoint and return (a second one aborts at once); an error saves
        the last complete step before it propagates (see ``grpo.faults``)."""
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        main = self.runtime.is_main  # the one writer of logs, config and final/
        if main:
            dump_config(cfg, self.output_dir / "config.yaml")
        history: list[dict[str, float]] = []
        logger = open_sinks(cfg, self.step, main)
        with logger, RunControl(self) as run:
            if self.step == 0 and self._eval_due():  # the curve starts at the reference
                logger.log(0, self._evaluate())
            # a stop signal on any process stops them all after the same step
            while self.step < cfg.optim.max_steps and not run.stopping():
                run.begin_step()
                metrics = self.train_step()
                self.step += 1
                run.end_step()
                flags, warnings = self.diagnostics.observe(metrics)
                metrics.update(flags)
                for text in warnings:
                    logger.console.print(f"warning: {text}", style="yellow", markup=False)
                if self._eval_due():
                    metrics.update(self._evaluate())
                history.append({"step": self.step, **metrics})
                if self.step % cfg.run.log_every == 0:
                    logger.log(self.step, metrics, self.samples)
                run.checkpoint()
            if run.stopping():
                self.stop_signal = run.stop_and_save()
                return history
        self.save()
        self.engine.close()

        def write_final(directory: Path) -> None:  # every process: the weights are gathered
            self.policy.save(directory)
            if main:
                self.tokenizer.save_pretrained(directory)

        ckpt.save_final(self.output_dir / "final", write_final, self.runtime)
        return history

    def train_step(self) -> dict[str, float]:
        alg, clock = self.cfg.algorithm, PhaseClock()

        # 1-3. draw B prompts, generate G completions each, score (DAPO: refill flat groups)
        scored, reward_metrics = self._sample_and_score(clock)
        batch = Batch.from_rollout(scored.rollout)
        mini_size, micro = self._batch_sizes(scored)

        # 4. the log-probs the algorithm needs, then its advantages
        if self.old_logp_pass:
            batch.old_logp = self.policy.logp_no_grad(batch, micro)  # [N, T]
        clock.lap("old_logp")
        if self.reference is not None and not self.reference.equals_policy:
            batch.ref_logp = self.reference.logp(batch, micro)  # [N, T]
        elif self.reference is not None:  # equal weights: the policy's own log-probs
            batch.ref_logp = batch.old_logp  # [N, T] or None
        clock.lap("reference")
        self.algorithm.prepare(batch, scored, micro)
        self.samples = step_samples(
            scored, batch, self.cfg.data.prompt_column, self.cfg.logging.num_samples
        )
        clock.lap("advantages")

        # 5. mu passes x mini-batches of whole groups: logp, loss, backward, step; then the
        # engine takes the new weights
        self.policy.module.train()
        updates = []
        for _ in range(alg.num_iterations):
            for mini in batch.micro_batches(mini_size):
                update = self._optimizer_step(mini, micro)
                for learner in self.algorithm.learners:
                    update.update(learner.update(mini, micro))
                updates.append(update)
        self.engine.sync(self.policy.module)
        clock.lap("update")

        # 6. iterative RL: the reference follows the policy every N steps (DeepSeekMath 4.2)
        n_reset = alg.ref_reset_every
        if self.reference is not None and n_reset and (self.step + 1) % n_reset == 0:
            self.reference.reset_to(self.policy, self.optimizer)

        # over all processes: update metrics weighted by each one's tokens
        tokens = batch.completion_mask.sum().item()
        update_metrics = _weighted_mean(updates, [1.0] * len(updates))
        step_metrics = self._step_metrics(scored, reward_metrics, clock)
        return {
            **distributed.global_metrics(step_metrics, self.runtime),
            **distributed.global_metrics(update_metrics, self.runtime, weight=tokens),
            "world_size": self.runtime.world_size,
        }

    def _step_metrics(self, scored: Scored, reward_metrics: dict, clock: PhaseClock) -> dict:
        lengths = scored.rollout.completion_lengths.float()  # [N]
        return {
            **reward_metrics,
            "completions/mean_length": lengths.mean().item(),
            "completions/max_length": lengths.max().item(),
            "completions/truncated_frac": scored.rollout.truncated.float().mean().item(),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "tokens_per_s": lengths.sum().item() / clock.total,
            "step_time": clock.total,
            **{f"time/{k}": v for k, v in clock.seconds.items()},
            **self._memory_metrics(),
        }

    # ------------------------------------------------------------------ pieces
    def _batch_sizes(self, scored: Scored) -> tuple[int, int]:
        """Rows per mini-batch (whole groups; dynamic sampling may keep fewer than B) and
        per micro-batch, which also bounds memory in the no-grad passes."""
        o = self.cfg.optim
        groups = -(-scored.num_groups // o.num_minibatches)
        mini = groups * scored.rollout.group_size
        return mini, -(-mini // o.gradient_accumulation_steps)

    def _eval_due(self) -> bool:
        every = self.cfg.run.eval_every
        return bool(every and self.eval_fn and self.step % every == 0)

    def _evaluate(self) -> dict[str, float]:
        with self.policy.gathered():  # rank 0 evaluates; the weights are whole on every rank
            out = self.eval_fn(self.model, self.tokenizer) if self.runtime.is_main else {}
        return {f"eval/{k}": v for k, v in out.items()}

    def _sample_and_score(self, clock: PhaseClock) -> tuple[Scored, dict[str, float]]:
        """One generation round of B prompts; with dynamic sampling, more rounds (at most
        ``max_refills``) until B groups with differing rewards are found."""
        alg, b = self.cfg.algorithm, self.cfg.rollout.prompts_per_step
        scored, metrics = self.sample_round(b, clock)
        if not alg.dynamic_sampling:
            return scored, metrics
        b //= self.runtime.world_size  # this process's groups
        kept = [scored.select(informative_groups(scored.rewards))]
        for _ in range(alg.max_refills):  # until every process holds its b groups
            if distributed.fewest(sum(p.num_groups for p in kept), self.runtime) >= b:
                break
            more, _ = self.sample_round(self.cfg.rollout.prompts_per_step, clock)
            kept.append(more.select(informative_groups(more.rewards)))
        have = distributed.fewest(sum(p.num_groups for p in kept), self.runtime)
        if have == 0:
            raise RuntimeError(
                f"dynamic sampling found no group with differing rewards in "
                f"{alg.max_refills + 1} rounds of {self.cfg.rollout.prompts_per_step} prompts: "
                "every completion of every group scored the same. Check the reward "
                "functions, or make the task easier (or harder) for this model, or raise "
                "algorithm.max_refills."
            )
        merged = Scored.concat(kept, self.sampling.pad_token_id)
        if merged.num_groups > min(have, b):  # every process trains on as many groups
            order = torch.arange(merged.num_groups, device=merged.rewards.device)  # [B']
            merged = merged.select(order < min(have, b))
        metrics["dynamic_sampling/groups_kept"] = min(have, b)
        return merged, metrics

    def sample_round(
        self, num_prompts: int, clock: PhaseClock | None = None
    ) -> tuple[Scored, dict[str, float]]:
        """Draw ``num_prompts`` prompts, generate G completions each and score them, exactly
        as a training step does (``grpo check`` shows one such round). Under torchrun
        ``num_prompts`` is the global count: every process draws them all and keeps its own
        whole groups."""
        clock = clock or PhaseClock()
        state = self._trainer_state()  # before the draw, as TRL's
        idx = self.runtime.shard(self.sampler.next(num_prompts))
        with self.runtime.autocast(), self.policy.gathered() as module:
            rollout = self.engine.generate(
                module, [self.prompt_ids[i] for i in idx], self.sampling, self.generator
            )
        clock.lap("generation")
        out = self.scorer([self.rows[i] for i in idx], rollout, state)
        clock.lap("scoring")
        return out

    def _trainer_state(self):
        """TRL's ``trainer_state`` for reward functions, counted in optimizer updates."""
        updates = self.cfg.algorithm.num_iterations * self.cfg.optim.num_minibatches
        s = self.sampler
        epoch = s.epoch + s.position / s.num_rows
        return trainer_state(self.step * updates, self.cfg.optim.max_steps * updates, epoch)

    def _memory_metrics(self) -> dict[str, float]:
        """Peak resident memory, and bytes held by weights and optimizer states (policy,
        reference, critic): what the seed says GRPO saves over PPO."""
        ref = [self.reference.module] if self.reference is not None else []
        learners = self.algorithm.learners
        models = [self.policy.module, *ref, *(learner.model for learner in learners)]
        optimizers = [self.optimizer, *(learner.optimizer for learner in learners)]
        return memory_metrics(models, optimizers, self.rss_at_start_mb)

    def _optimizer_step(self, mini: Batch, micro: int) -> dict[str, float]:
        cfg = self.cfg
        mini.ref_is_policy = self.reference is not None and self.reference.equals_policy
        moves = moves_weights(mini, self.algorithm)
        if not distributed.anywhere(moves, self.runtime):  # no signal: nothing steps
            kl = {"kl": 0.0, f"kl/{self.algorithm.kl_estimator}": 0.0}
            return {"loss": 0.0, "grad_norm": 0.0, "step_skipped": 1.0} | (
                kl if mini.ref_is_policy else {}
            )
        # the global batch's normaliser, and the world size undoing DDP/FSDP2's gradient mean
        rt, length = self.runtime, cfg.rollout.max_completion_length
        norm = distributed.global_normaliser(mini.completion_mask, length, rt)
        self.optimizer.zero_grad(set_to_none=True)
        losses, parts, tokens = [], [], []
        micro_batches = list(mini.micro_batches(micro))
        syncs = distributed.synced_micro_batches(self.policy.module, len(micro_batches))
        for mb, sync in zip(micro_batches, syncs, strict=True):
            with sync:
                logp, entropy = self.policy.logp(mb, with_entropy=True)  # [n, T] each
                out = policy_loss(logp, entropy, mb, self.algorithm, cfg.algorithm, norm)
                (out.loss * distributed.loss_scale(rt)).backward()
            losses.append(out.loss.detach())
            parts.append(out.metrics)
            tokens.append(mb.completion_mask.sum())
        # to the host once every pass is queued, not between micro-batches
        loss = sum(x.item() for x in losses)
        parts = [{k: v.item() for k, v in p.items()} for p in parts]
        weights = [float(n) for n in tokens]
        grad_norm = distributed.clip_grad_norm(self.policy.module, cfg.optim.max_grad_norm)
        # a non-finite step is never applied; every process decides on the global loss
        applied = self.nonfinite.ok(distributed.global_sum(loss, rt), grad_norm)
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        if applied and self.reference is not None:
            self.reference.policy_stepped()
        skipped = {"step_skipped": 0.0, "nonfinite_skipped": float(not applied)}
        metrics = {"loss": loss, "grad_norm": grad_norm, **skipped}
        return metrics | _weighted_mean(parts, weights)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "generator": self.generator.get_state(),
            "rng": ckpt.rng_state(self.runtime.device),
            "learners": [learner.state_dict() for learner in self.algorithm.learners],
        }

    def save(self) -> Path:
        ref_moved = self.reference is not None and self.cfg.algorithm.ref_reset_every > 0
        if self.runtime.distributed:
            return self._save_sharded(ref_moved)
        return ckpt.save_checkpoint(
            self.output_dir,
            self.step,
            self.policy,
            self.tokenizer,
            self.state_dict(),
            ref_model=self.reference if ref_moved else None,
            keep=self.cfg.run.keep_last,
            config=self.cfg,
        )

    def resume(
        self, checkpoint: str | Path | None = None, allow_config_change: bool = False
    ) -> int:
        """Load weights and state from a checkpoint (default: the newest intact one), after
        checking it (see ``grpo.checkpoint.load_for_resume``); return its step."""
        path, state = ckpt.load_for_resume(
            self.output_dir, checkpoint, self.cfg, allow_config_change
        )
        saved = state.get("world_size", 1)
        if saved != self.runtime.world_size:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was written by {saved} process(es); this run has "
                f"{self.runtime.world_size}: resume it with torchrun --nproc_per_node={saved}"
                if saved > 1
                else f"checkpoint {str(path)!r} was written by 1 process: resume it without "
                "torchrun"
            )
        if self.runtime.distributed:
            return self._resume_sharded(path, state)
        self.policy.load(path)
        if self.reference is not None and (path / ckpt.REF_DIR).is_dir():
            self.reference.load(path / ckpt.REF_DIR)
        if self.reference is not None:
            self.reference.compare_to(self.policy)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])
        ckpt.set_rng_state(state["rng"])
        self._load_learners(state["learners"])
        self.step = state["step"]
        return self.step

    def _load_learners(self, states: list[dict[str, Any]]) -> None:
        for learner, state in zip(self.algorithm.learners, states, strict=True):
            learner.load_state_dict(state)

    def _save_sharded(self, ref_moved: bool) -> Path:
        """Under torchrun: weights and optimizer through torch.distributed.checkpoint, each
        process's sampler, generator and RNG in its own file."""
        state = self.state_dict()
        del state["optimizer"]  # sharded, with the weights
        own = {k: state.pop(k) for k in ("sampler", "generator", "rng")}
        state |= {"reference_saved": ref_moved, "world_size": self.runtime.world_size}
        ref = self.reference.module if ref_moved else None

        def shards(directory: Path) -> None:
            module, rt = self.policy.module, self.runtime
            distributed.save_sharded(directory, module, self.optimizer, own, rt, ref)

        return ckpt.save_checkpoint_sharded(
            self.output_dir, self.step, self.tokenizer, state, shards, self.runtime,
            self.cfg.run.keep_last, self.cfg,
        )  # fmt: skip

    def _resume_sharded(self, path: Path, state: dict[str, Any]) -> int:
        ref = self.reference.module if state.get("reference_saved") else None
        own = distributed.load_sharded(path, self.policy.module, self.optimizer, self.runtime, ref)
        if self.reference is not None:
            self.reference.equals_policy = distributed.same_weights(
                self.reference.module, self.policy.base, self.runtime
            )
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(own["sampler"])
        self.generator.set_state(own["generator"])
        ckpt.set_rng_state(own["rng"])
        self._load_learners(state["learners"])
        self.step = state["step"]
        return self.step
