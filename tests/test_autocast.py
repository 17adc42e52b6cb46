"""``model.autocast: bfloat16``: the forward passes of a training step run their matmuls in
bfloat16 while weights, gradients, optimizer states and log-probs stay float32, and the
numbers agree with float32 at bfloat16's precision (torch.testing's own bfloat16 defaults,
rtol 1.6e-2 and atol 1e-5)."""

import pytest
import torch
from test_trainer import distinct_chars, make_cfg

from grpo import runtime as runtime_mod
from grpo.config import ConfigError
from grpo.hf import load_model_and_tokenizer
from grpo.logprobs import batch_logp
from grpo.rollout.torch_engine import TorchEngine
from grpo.runtime import Runtime
from grpo.trainer import GRPOTrainer
from grpo.types import Batch, SamplingParams

BF16_TOL = {"rtol": 1.6e-2, "atol": 1e-5}  # torch.testing's defaults for bfloat16
needs_bf16 = pytest.mark.skipif(
    not runtime_mod.native_bf16(torch.device("cpu")), reason="this CPU has no native bfloat16"
)


def test_autocast_none_is_a_null_context():
    with Runtime.from_settings("cpu", "none").autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_autocast_refused_without_native_bf16(monkeypatch):
    monkeypatch.setattr(runtime_mod, "native_bf16", lambda device: False)
    with pytest.raises(ConfigError, match=r"model.autocast = 'bfloat16' needs native bfloat16"):
        Runtime.from_settings("cpu", "bfloat16")


def test_config_rejects_unknown_autocast(tmp_path):
    with pytest.raises(ValueError, match=r"model\.autocast"):
        make_cfg(tmp_path, tmp_path, "model.autocast=float16")


@needs_bf16
def test_every_forward_pass_runs_in_bf16_and_state_stays_fp32(tiny_model_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, tmp_path, "model.autocast=bfloat16", "algorithm.beta=0.04")
    t = GRPOTrainer(cfg, reward_functions=[distinct_chars])
    seen = []  # (model, grad enabled, output dtype) of one MLP per forward call
    for name, m in (("policy", t.model), ("reference", t.reference.module)):
        m.model.layers[0].mlp.register_forward_hook(
            lambda mod, args, out, name=name: seen.append(
                (name, torch.is_grad_enabled(), out.dtype)
            )
        )
    row = t.train_step()  # the reference still equals the policy: no reference pass yet
    assert {s[0] for s in seen} == {"policy"}
    row = t.train_step()
    assert torch.isfinite(torch.tensor(row["loss"]))
    # generation (no grad), the reference pass, then the policy forward with grad: all bf16
    assert {s[0] for s in seen} == {"policy", "reference"}
    assert any(s[:2] == ("policy", False) for s in seen)
    assert ("policy", True, torch.bfloat16) in seen
    assert {s[2] for s in seen} == {torch.bfloat16}
    assert {p.dtype for p in t.model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in t.model.parameters() if p.grad is not None} == {torch.float32}
    for state in t.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32
    # held-out evaluation and everything after the step run in float32 again
    assert not torch.is_autocast_enabled("cpu")


@needs_bf16
def test_bf16_log_probs_and_rollout_agree_with_fp32(tiny_model_dir):
    model, _ = load_model_and_tokenizer(tiny_model_dir)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    p = SamplingParams(num_generations=3, max_completion_length=6, pad_token_id=0)
    calls = []
    original = model.set_attn_implementation
    model.set_attn_implementation = lambda impl: (calls.append(impl), original(impl))[1]
    with Runtime.from_settings("cpu", "bfloat16").autocast():
        rollout = TorchEngine().generate(model, prompts, p, torch.Generator().manual_seed(0))
        batch = Batch.from_rollout(rollout)
        logp_bf16, _ = batch_logp(model, batch, temperature=1.0)
    # bf16 decoding on a CPU swaps in eager attention and puts the model's own back
    assert calls == ["eager", "sdpa"] and model.config._attn_implementation == "sdpa"
    assert logp_bf16.dtype == torch.float32
    mask = batch.completion_mask.bool()
    with torch.no_grad():
        logp_fp32, _ = batch_logp(model, batch, temperature=1.0)
    torch.testing.assert_close(logp_bf16[mask], logp_fp32[mask], **BF16_TOL)
    torch.testing.assert_close(rollout.sample_logp[mask], logp_fp32[mask], **BF16_TOL)


@needs_bf16
def test_ppo_critic_forward_runs_in_bf16_and_its_state_stays_fp32(tiny_model_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, tmp_path, "model.autocast=bfloat16", "algorithm.name=ppo")
    t = GRPOTrainer(cfg, reward_functions=[distinct_chars])
    seen = []  # (grad enabled, autocast on, output dtype) per critic forward
    t.algorithm.critic.model.backbone.layers[0].mlp.down_proj.register_forward_hook(
        lambda mod, args, out: seen.append((torch.is_grad_enabled(), out.dtype))
    )
    row = t.train_step()
    assert torch.isfinite(torch.tensor(row["value_loss"]))
    # the values for GAE (no grad), then the value update's forward (grad): both bf16
    assert set(seen) == {(False, torch.bfloat16), (True, torch.bfloat16)}
    critic = t.algorithm.critic.model
    assert {p.dtype for p in critic.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in critic.parameters() if p.grad is not None} == {torch.float32}
