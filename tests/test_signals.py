"""No movement without signal: while the reference equals the policy the KL and its
gradient are exactly 0, and a batch with no advantage and no KL gradient leaves the
weights and AdamW's state exactly as they were (logged as a skipped step).

Four prompts a step: on these shapes a separate reference pass differs from the policy's
own by float rounding (about 5e-7 in a log-prob, from the LM head's matmul choosing
another kernel when the weights do not require grad), which AdamW turned into
full-size steps."""

import pytest
import torch
from test_trainer import distinct_chars, make_cfg

from grpo.algorithms import build_algorithm
from grpo.config import build_config
from grpo.diagnostics import moves_weights, same_weights
from grpo.hf import load_model_and_tokenizer
from grpo.metrics import read_jsonl
from grpo.modeling import build_char_tokenizer
from grpo.runtime import Runtime
from grpo.trainer import GRPOTrainer
from grpo.types import Batch

FOUR = "rollout.prompts_per_step=4"


def always_one(prompts, completions, **kwargs):
    """Every completion scores 1: every group's rewards are equal, every advantage is 0."""
    return [1.0] * len(completions)


@pytest.mark.parametrize("beta", ["0.04", "0"])
def test_equal_rewards_leave_weights_and_optimizer_bitwise_unchanged(
    tiny_model_dir, tmp_path, beta
):
    cfg = make_cfg(tiny_model_dir, tmp_path, FOUR, f"algorithm.beta={beta}", "optim.max_steps=10")
    t = GRPOTrainer(cfg, reward_functions=[always_one])
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.train()
    after = t.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert t.optimizer.state_dict()["state"] == {}  # AdamW never stepped: no moments, no count
    assert t.scheduler.last_epoch == 0  # the warmup waits for the first real update
    logged = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step_skipped"] for r in logged] == [1.0] * 10
    assert all(r["grad_norm"] == 0.0 for r in logged)
    if beta != "0":
        assert all(r["kl"] == 0.0 for r in logged)


def test_kl_is_exactly_zero_at_step_one_then_positive(tiny_model_dir, tmp_path):
    t = GRPOTrainer(make_cfg(tiny_model_dir, tmp_path, FOUR), reward_functions=[distinct_chars])
    first, second = t.train_step(), t.train_step()
    assert first["step_skipped"] == 0.0 and first["grad_norm"] > 0  # a real update
    assert first["kl"] == 0.0
    assert second["kl"] > 0  # the policy has moved away from the reference


def test_kl_is_zero_again_after_each_reference_reset(tiny_model_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, tmp_path, FOUR, "algorithm.ref_reset_every=1")
    t = GRPOTrainer(cfg, reward_functions=[distinct_chars])
    rows = [t.train_step() for _ in range(3)]
    assert [r["kl"] for r in rows] == [0.0, 0.0, 0.0]
    assert all(r["grad_norm"] > 0 for r in rows)


def test_a_reference_loaded_from_the_policys_path_counts_as_equal(tiny_model_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, tmp_path, FOUR, f"model.ref_name_or_path={tiny_model_dir}")
    t = GRPOTrainer(cfg, reward_functions=[distinct_chars])
    assert t.train_step()["kl"] == 0.0


def test_same_weights_is_bitwise(tiny_model_dir):
    a, _ = load_model_and_tokenizer(tiny_model_dir)
    b, _ = load_model_and_tokenizer(tiny_model_dir)
    assert same_weights(a, b)
    with torch.no_grad():
        p = next(b.parameters())
        p[0, 0] = torch.nextafter(p[0, 0], torch.tensor(float("inf")))  # one ulp
    assert not same_weights(a, b)


def zero_advantage_batch(ref_is_policy: bool) -> Batch:
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # [2, 3]
    return Batch(
        input_ids=torch.zeros(2, 4, dtype=torch.long),
        attention_mask=torch.ones(2, 4, dtype=torch.long),
        completion_mask=mask,
        advantages=torch.tensor([[0.0, 0.0, 5.0], [0.0, 7.0, 0.0]]),  # non-zero on padding only
        ref_is_policy=ref_is_policy,
    )


@pytest.mark.parametrize(
    ("overrides", "ref_is_policy", "moves"),
    [
        (["algorithm.beta=0"], False, False),  # no advantage, no KL term
        (["algorithm.beta=0.04"], True, False),  # k3 is flat where logp == ref_logp
        (["algorithm.beta=0.04", "algorithm.kl_estimator=k2"], True, False),
        (["algorithm.beta=0.04", "algorithm.kl_estimator=k1"], True, True),  # k1's gradient is 1
        (["algorithm.beta=0.04"], False, True),  # the policy has left the reference
        (["algorithm.name=rloo", "algorithm.beta=0.04"], False, False),  # KL in the reward
    ],
)
def test_moves_weights(overrides, ref_is_policy, moves):
    assert moves_weights(zero_advantage_batch(ref_is_policy), algorithm(*overrides)) is moves


def algorithm(*overrides):
    cfg = build_config(overrides=list(overrides))
    return build_algorithm(cfg, Runtime.from_settings("cpu"), build_char_tokenizer())


def test_any_real_advantage_moves_weights():
    batch = zero_advantage_batch(True)
    batch.advantages[1, 0] = -1e-30
    assert moves_weights(batch, algorithm("algorithm.beta=0"))
