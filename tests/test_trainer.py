"""The training loop on a tiny real transformers model: it learns something, logs, saves
exactly what resume needs, and loads no reference model when beta is 0."""

import os
import signal

import pytest
import torch
from conftest import DEVICES

from grpo.config import build_config
from grpo.errors import CheckpointError
from grpo.hf import load_model_and_tokenizer
from grpo.metrics import read_jsonl
from grpo.trainer import GRPOTrainer


def distinct_chars(prompts, completions, **kwargs):
    """A reward with spread inside nearly every group of a random model: distinct characters."""
    return [len(set(c)) / 8 for c in completions]


def make_cfg(model_dir, out, *extra):
    return build_config(
        overrides=[
            f"model.name_or_path={model_dir}",
            f"run.output_dir={out}",
            "run.progress=false",
            "data.num_train_prompts=40",
            "rollout.prompts_per_step=2",
            "rollout.num_generations=4",
            "rollout.max_completion_length=8",
            "optim.learning_rate=0.01",
            "optim.max_steps=3",
            *extra,
        ]
    )


def make_trainer(cfg, **kw):
    return GRPOTrainer(cfg, reward_functions=[distinct_chars], **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_trains_logs_and_saves(tiny_model_dir, tmp_path, device):
    cfg = make_cfg(tiny_model_dir, tmp_path, f"model.device={device}")
    t = make_trainer(cfg)
    before = [p.detach().clone() for p in t.model.parameters()]
    history = t.train()
    assert len(history) == 3
    for row in history:
        assert torch.isfinite(torch.tensor(row["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters(), strict=True))
    # mu = 1 and one mini-batch: the ratio is exactly 1, so nothing is ever clipped
    assert all(r["clip_ratio/low_mean"] == 0 and r["clip_ratio/high_mean"] == 0 for r in history)
    logged = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3]
    for key in (
        "reward", "reward_std", "frac_reward_zero_std", "rewards/distinct_chars/mean", "kl",
        "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "completions/mean_length",
        "completions/max_length", "completions/truncated_frac", "tokens_per_s", "step_time",
    ):  # fmt: skip
        assert key in logged[-1], key
    model, _ = load_model_and_tokenizer(tmp_path / "final")
    for a, b in zip(model.parameters(), t.model.parameters(), strict=True):
        torch.testing.assert_close(a, b.cpu())


def test_beta_zero_loads_no_reference(tiny_model_dir, tmp_path):
    t = make_trainer(make_cfg(tiny_model_dir, tmp_path, "algorithm.beta=0"))
    assert t.reference is None
    assert "kl" not in t.train_step()


def count_passes(t):
    """Record which no-grad log-prob passes a step runs: the old policy's, the reference's."""
    calls = []

    def counting(name, method):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return method(*args, **kwargs)

        return wrapped

    t.policy.logp_no_grad = counting("old", t.policy.logp_no_grad)
    if t.reference is not None:
        t.reference.logp = counting("ref", t.reference.logp)
    return calls


@pytest.mark.parametrize(
    ("extra", "passes"),
    [
        (["algorithm.beta=0"], []),  # mu = 1, beta = 0: no extra forward pass at all
        (["algorithm.num_iterations=2"], ["old", "ref"]),  # old policy once, reference once
        # RLOO's KL in the reward takes the sampling log-probs the engine already returned...
        (["algorithm.name=rloo"], ["ref"]),
        # ...unless top-k sampled from a truncated distribution, which is not the policy's
        (["algorithm.name=rloo", "rollout.top_k=5"], ["old", "ref"]),
        (["algorithm.name=ppo", "rollout.top_p=0.9"], ["old", "ref"]),
    ],
)
def test_old_logp_only_computed_when_needed(tiny_model_dir, tmp_path, extra, passes):
    t = make_trainer(make_cfg(tiny_model_dir, tmp_path, *extra))
    calls = count_passes(t)
    t.train_step()  # step 1: the reference still equals the policy, so no reference pass runs
    assert calls == [p for p in passes if p != "ref"]
    calls.clear()
    t.train_step()
    assert calls == passes


def test_mu_and_minibatches_clip(tiny_model_dir, tmp_path):
    extra = ("algorithm.num_iterations=3", "optim.num_minibatches=2", "algorithm.epsilon=0.001")
    metrics = make_trainer(make_cfg(tiny_model_dir, tmp_path, *extra)).train_step()
    # after the first update the policy has moved: later passes see ratios outside 1 +- 0.001
    assert metrics["clip_ratio/low_mean"] + metrics["clip_ratio/high_mean"] > 0


def test_reference_reset_follows_policy(tiny_model_dir, tmp_path):
    t = make_trainer(make_cfg(tiny_model_dir, tmp_path, "algorithm.ref_reset_every=2"))
    t.train_step()
    t.step = 1
    ref = t.reference.module
    pairs = list(zip(ref.parameters(), t.model.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in pairs)
    t.train_step()  # the second step ends with a reset
    for a, b in zip(ref.parameters(), t.model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_interrupt_and_resume_equal_uninterrupted(tiny_model_dir, tmp_path, algorithm):
    """4 straight steps == 2 steps, Ctrl-C, resume, 2 more (cosine schedule, warmup); PPO's
    critic (weights, optimizer, schedule) resumes too."""
    extra = ("optim.max_steps=4", "optim.lr_scheduler=cosine", "optim.warmup_steps=1")
    extra += (f"algorithm.name={algorithm}",)
    straight = make_trainer(make_cfg(tiny_model_dir, tmp_path / "a", *extra))
    straight.train()

    def ctrl_c_at_step_2(model, tokenizer):
        if first.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return {}

    cfg = make_cfg(tiny_model_dir, tmp_path / "b", *extra, "run.eval_every=1")
    first = make_trainer(cfg, eval_fn=ctrl_c_at_step_2)
    first.train()
    assert first.step == 2  # stopped cleanly after the step that saw Ctrl-C

    resumed = make_trainer(make_cfg(tiny_model_dir, tmp_path / "b", *extra))
    assert resumed.resume() == 2
    resumed.train()
    models = [(straight.model, resumed.model)]
    pairs = zip(straight.algorithm.learners, resumed.algorithm.learners, strict=True)
    models += [(a.model, b.model) for a, b in pairs]
    for x, y in models:
        for a, b in zip(x.parameters(), y.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    steps = [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 4]  # step 0: the evaluation of the starting model


def test_resume_without_checkpoint_says_where(tiny_model_dir, tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        make_trainer(make_cfg(tiny_model_dir, tmp_path)).resume()


@pytest.mark.parametrize("loss_type", ["grpo", "token_mean", "dr_grpo"])
def test_micro_batches_give_the_one_pass_gradient(tiny_model_dir, tmp_path, loss_type):
    """Gradient accumulation through the real model: 4 micro-batches == 1 pass."""
    from grpo.algorithms.objective import policy_loss
    from grpo.losses import Normaliser
    from grpo.types import Batch

    cfg = make_cfg(tiny_model_dir, tmp_path, f"algorithm.loss_type={loss_type}")
    t = make_trainer(cfg)
    idx = t.sampler.next(2)
    rollout = t.engine.generate(t.model, [t.prompt_ids[i] for i in idx], t.sampling, t.generator)
    adv = torch.linspace(-1, 1, rollout.completion_ids.shape[0])[:, None]  # [N, 1]
    mb = Batch.from_rollout(rollout)
    mb.advantages = adv.expand_as(mb.completion_mask) * mb.completion_mask  # [N, T]
    mb.ref_logp = t.reference.logp(mb, 8)
    norm = Normaliser.from_mask(mb.completion_mask, cfg.rollout.max_completion_length)

    def grads(parts):
        t.model.zero_grad()
        for rows in parts:
            part = mb.rows(rows)
            logp, _ = t.policy.logp(part)
            policy_loss(logp, None, part, t.algorithm, cfg.algorithm, norm).loss.backward()
        return [p.grad.clone() for p in t.model.parameters()]

    whole = grads([slice(0, 8)])
    split = grads([slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)])
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b)


def test_fresh_run_in_a_used_directory_starts_a_new_log(tiny_model_dir, tmp_path):
    for _ in range(2):
        make_trainer(make_cfg(tiny_model_dir, tmp_path, "optim.max_steps=1")).train()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


def test_weights_load_strictly(tiny_model_dir, tmp_path):
    """A checkpoint of another architecture is refused, naming the keys that do not fit;
    the tied output head that save_pretrained leaves out is not reported missing."""
    from grpo.modeling import init_model_dir
    from grpo.policy import load_weights

    model, _ = load_model_and_tokenizer(tiny_model_dir)
    load_weights(model, tiny_model_dir)  # its own weights: tied lm_head, no complaint
    deeper = init_model_dir(tmp_path / "deeper", hidden_size=32, num_layers=3, num_heads=4,
                            intermediate_size=64)  # fmt: skip
    with pytest.raises(ValueError, match=r"unexpected keys \['model.layers.2"):
        load_weights(model, deeper)
