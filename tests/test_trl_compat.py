"""TRL users' reward functions run unchanged through the trainer, on conversational and on
plain data: each function gets TRL's argument shapes, ``completion_ids`` and
``trainer_state``, and the rewards the trainer logs are the functions' own outputs on the
decoded completions."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from test_trainer import distinct_chars, make_cfg

from grpo.algorithms import build_algorithm
from grpo.algorithms.objective import policy_loss
from grpo.config import ConfigError, build_config
from grpo.hf import load_model_and_tokenizer
from grpo.losses import Normaliser
from grpo.metrics import read_jsonl
from grpo.modeling import build_char_tokenizer, build_tiny_model
from grpo.rewards import load_reward_function
from grpo.trainer import GRPOTrainer
from grpo.types import Batch

FIXTURE = Path(__file__).with_name("trl_style_rewards.py")
CONVERSATIONAL = [
    "accuracy_reward",
    "format_reward",
    "tag_count_reward",
    "len_reward",
    "think_format_reward",
    "soft_overlong_punishment",
]
PLAIN = ["length_target_reward", "standard_format_reward", "soft_overlong_punishment"]


TAGS = ["<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>", "\\boxed{3}"]


@pytest.fixture(scope="module")
def tag_model_dir(tmp_path_factory):
    """A tiny random model over a few characters plus the format tags and ``\\boxed{3}`` as
    whole tokens, so that its random completions often hold tags and sometimes the answer:
    the format and accuracy rewards then vary, not only the length ones."""
    path = tmp_path_factory.mktemp("tags")
    tokenizer = build_char_tokenizer("123+= ")
    tokenizer.add_tokens(TAGS)
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def fixture_module():
    """The fixture file as the trainer loaded it (one module per file)."""
    return sys.modules[load_reward_function(f"{FIXTURE}:record_call").__module__]


def run(model_dir, out, rows, names):
    data = out / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = ", ".join(f"{FIXTURE}:{n}" for n in [*names, "record_call"])
    cfg = build_config(
        overrides=[
            f"model.name_or_path={model_dir}",
            f"run.output_dir={out}",
            f"data.train_file={data}",
            f"rewards.functions=[{specs}]",
            "run.progress=false",
            "rollout.prompts_per_step=2",
            "rollout.num_generations=4",
            "rollout.max_completion_length=12",
            "optim.max_steps=2",
        ]
    )
    calls = fixture_module().CALLS
    calls.clear()
    GRPOTrainer(cfg).train()
    return calls, read_jsonl(out / "metrics.jsonl")


def nanmean(values):
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept)


def check_logged_rewards(model_dir, calls, logged, rows, names, wrap):
    """Each logged per-function mean, and the reward, recomputed from the decoded ids."""
    _, tokenizer = load_model_and_tokenizer(model_dir)
    module = fixture_module()
    by_prompt = {json.dumps(r["prompt"]): r for r in rows}
    assert [c["global_step"] for c in calls] == [0, 1]  # optimizer updates before sampling
    assert [c["max_steps"] for c in calls] == [2, 2]
    assert [c["epoch"] for c in calls] == [0.0, 1.0]  # 2 prompts a step, 2 in the data
    assert all(c["log_extra"] for c in calls)
    for call, metrics in zip(calls, logged, strict=True):
        texts = tokenizer.batch_decode(call["completion_ids"], skip_special_tokens=True)
        completions = [wrap(t) for t in texts]
        assert call["completions"] == completions
        matched = [by_prompt[json.dumps(p)] for p in call["prompts"]]
        assert [r["prompt"] for r in matched] == call["prompts"]
        kwargs = {"solution": [r["solution"] for r in matched]}
        assert call["columns"] == kwargs
        total = [0.0] * len(texts)
        for name in names:
            values = getattr(module, name)(
                prompts=call["prompts"],
                completions=completions,
                completion_ids=call["completion_ids"],
                **kwargs,
            )
            assert metrics[f"rewards/{name}/mean"] == pytest.approx(nanmean(values))
            total = [t + (v if v is not None else 0.0) for t, v in zip(total, values, strict=True)]
        assert metrics["reward"] == pytest.approx(sum(total) / len(total))
        assert metrics["recorded_completions"] == 8.0  # log_metric reached the step's metrics


def test_conversational_rewards_run_unchanged(tag_model_dir, tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "1+2="}], "solution": "3"},
        # math-verify cannot parse this solution: accuracy_reward says None for its group
        {"prompt": [{"role": "user", "content": "2+2="}], "solution": "four"},
    ]
    calls, logged = run(tag_model_dir, tmp_path, rows, CONVERSATIONAL)
    check_logged_rewards(
        tag_model_dir,
        calls,
        logged,
        rows,
        CONVERSATIONAL,
        lambda text: [{"role": "assistant", "content": text}],
    )
    # the comparison has teeth: the random completions hold tags and sometimes \boxed{3}
    for name in ("accuracy_reward", "tag_count_reward", "len_reward"):
        assert any(row[f"rewards/{name}/mean"] != 0.0 for row in logged), name


def test_plain_rewards_get_strings(tag_model_dir, tmp_path):
    rows = [{"prompt": "1+2=", "solution": "3"}, {"prompt": "2+2=", "solution": "4"}]
    calls, logged = run(tag_model_dir, tmp_path, rows, PLAIN)
    assert all(isinstance(c, str) for call in calls for c in call["completions"])
    check_logged_rewards(tag_model_dir, calls, logged, rows, PLAIN, lambda text: text)


def kl_cfg(model_dir, out, *extra):
    return make_cfg(model_dir, out, "algorithm.beta=1", *extra)


def test_bias_corrected_kl_through_the_trainer(tiny_model_dir, tmp_path):
    """TRL's use_bias_correction_kl: on-policy the KL loss keeps k3's value and takes k2's
    gradient; off-policy the value is k3's times the ratio."""
    on = kl_cfg(tiny_model_dir, tmp_path, "algorithm.use_bias_correction_kl=true")
    t = GRPOTrainer(on, reward_functions=[distinct_chars])
    t.train_step()  # a step with the option on; the policy leaves the reference
    idx = t.sampler.next(2)
    rollout = t.engine.generate(t.model, [t.prompt_ids[i] for i in idx], t.sampling, t.generator)
    batch = Batch.from_rollout(rollout)  # advantages 0: the loss is beta * KL alone
    batch.ref_logp = t.reference.logp(batch, 8)
    norm = Normaliser.from_mask(batch.completion_mask, 8)

    def loss_and_grads(cfg):
        t.model.zero_grad()
        algorithm = build_algorithm(cfg, t.runtime, t.tokenizer)
        logp, _ = t.policy.logp(batch)  # [N, T]
        loss = policy_loss(logp, None, batch, algorithm, cfg.algorithm, norm).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in t.model.parameters()]

    k3_on = loss_and_grads(on)
    k3_off = loss_and_grads(kl_cfg(tiny_model_dir, tmp_path))
    k2_off = loss_and_grads(kl_cfg(tiny_model_dir, tmp_path, "algorithm.kl_estimator=k2"))
    assert k3_on[0] > 0
    assert k3_on[0] == pytest.approx(k3_off[0])  # ratio 1: the same value
    for a, b in zip(k3_on[1], k2_off[1], strict=True):
        torch.testing.assert_close(a, b)  # ... and k2's gradient
    assert any(not torch.allclose(a, b) for a, b in zip(k3_on[1], k3_off[1], strict=True))

    # off-policy: old_logp = logp + 0.1, so every token's ratio is e^-0.1
    batch.old_logp = t.policy.logp_no_grad(batch, 8) + 0.1  # [N, T]
    weighted, plain = loss_and_grads(on)[0], loss_and_grads(kl_cfg(tiny_model_dir, tmp_path))[0]
    assert weighted == pytest.approx(math.exp(-0.1) * plain)


def test_bias_correction_needs_the_kl_in_the_loss():
    with pytest.raises(ConfigError, match=r"use_bias_correction_kl=true needs .*'rloo'"):
        build_config(overrides=["algorithm.name=rloo", "algorithm.use_bias_correction_kl=true"])


def length_and_parity(completions, log_extra, **kwargs):
    """A reward that logs two per-completion columns through TRL's ``log_extra``."""
    log_extra("chars", [len(c) for c in completions])
    log_extra("parity", ["even" if len(c) % 2 == 0 else "odd" for c in completions])
    return [len(set(c)) / 8 for c in completions]


def test_log_extra_columns_are_written_beside_each_sample(tiny_model_dir, tmp_path):
    from test_trainer import make_cfg

    cfg = make_cfg(tiny_model_dir, tmp_path, "optim.max_steps=2", "logging.num_samples=8")
    GRPOTrainer(cfg, reward_functions=[length_and_parity]).train()
    samples = read_jsonl(tmp_path / "samples.jsonl")
    assert [s["step"] for s in samples] == [1] * 8 + [2] * 8
    for s in samples:  # each column recomputed from the logged completion
        text = s["completion"]
        parity = "even" if len(text) % 2 == 0 else "odd"
        assert s["extra"] == {"chars": len(text), "parity": parity}
        assert s["rewards"] == {"length_and_parity": len(set(text)) / 8}
    assert len({s["extra"]["chars"] for s in samples}) > 1  # not one value for all
