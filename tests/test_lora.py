"""LoRA through PEFT: the adapters-off reference is the base model exactly, merges keep the
policy's outputs, and the saved forms (adapter, base, merged) load back to the same model."""

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from grpo import lora
from grpo.config import ConfigError, LoraConfig, build_config
from grpo.hf import load_model_and_tokenizer
from grpo.logprobs import completion_logp

pytest.importorskip("peft")

SETTINGS = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])


def _batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(7, 100, (3, 9), generator=gen)  # [N, P + T]
    mask = torch.ones_like(ids)  # [N, P + T]
    mask[0, :2] = 0
    return ids, mask, 5


def _logp(model):
    ids, mask, t = _batch()
    with torch.no_grad():
        return completion_logp(model, ids, mask, t)[0]  # [N, T]


def _trained_adapter(model_dir, seed=1):
    """A PEFT model whose adapters are no longer zero (B random), so they change outputs."""
    base, _ = load_model_and_tokenizer(model_dir)
    model = lora.add_adapters(base, SETTINGS)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return model


def test_only_adapters_train_and_adapters_off_is_the_base_exactly(tiny_model_dir):
    base, _ = load_model_and_tokenizer(tiny_model_dir)
    expected = _logp(base)
    model = _trained_adapter(tiny_model_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not torch.equal(_logp(model), expected)  # the adapters do change the policy
    with lora.adapters_off(model):
        assert torch.equal(_logp(model), expected)  # bit for bit, not just close


def test_merge_and_restart_keeps_the_policy_and_moves_the_reference(tiny_model_dir):
    model = _trained_adapter(tiny_model_dir)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    (
        _logp(model).sum() * 0 + sum(p.sum() for p in model.parameters() if p.requires_grad)
    ).backward()
    optimizer.step()
    assert len(optimizer.state) > 0
    before = _logp(model)
    lora.merge_and_restart(model, optimizer)
    assert_close(_logp(model), before)  # W + dW in the base, B = 0 in the adapter
    with lora.adapters_off(model):
        assert_close(_logp(model), before)  # the reference is now the policy
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert torch.count_nonzero(p) == 0
    assert len(optimizer.state) == 0  # a fresh adapter starts with fresh moments


def test_merged_model_loads_without_peft(tiny_model_dir, tmp_path):
    model = _trained_adapter(tiny_model_dir)
    lora.save_merged(model, tmp_path / "merged")
    assert not lora.is_adapter_dir(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert_close(_logp(plain), _logp(model))


def test_base_weights_round_trip(tiny_model_dir, tmp_path):
    model = _trained_adapter(tiny_model_dir)
    lora.merge_and_restart(model, None)  # the base has moved away from tiny_model_dir
    lora.save_base(model, tmp_path / "base")
    with lora.adapters_off(model):
        expected = _logp(model)
    fresh = _trained_adapter(tiny_model_dir, seed=2)
    lora.load_base(fresh, tmp_path / "base")
    with lora.adapters_off(fresh):
        assert torch.equal(_logp(fresh), expected)


def test_adapter_directory_loads_as_base_plus_adapter(tiny_model_dir, tmp_path):
    model = _trained_adapter(tiny_model_dir)
    model.save_pretrained(tmp_path / "adapter")
    assert lora.is_adapter_dir(tmp_path / "adapter")
    merged, base_path = lora.load_merged_adapter(tmp_path / "adapter")
    assert base_path == str(tiny_model_dir)
    assert not lora.is_lora(merged)
    assert_close(_logp(merged), _logp(model))
    fresh = _trained_adapter(tiny_model_dir, seed=3)
    lora.load_adapter_weights(fresh, tmp_path / "adapter")
    assert torch.equal(_logp(fresh), _logp(model))


def test_config_refuses_ppo_and_an_adapted_lm_head():
    with pytest.raises(ConfigError, match="critic"):
        build_config(overrides=["model.lora={}", "algorithm.name=ppo"])
    with pytest.raises(ConfigError, match="lm_head"):
        build_config(overrides=["model.lora.target_modules=[q_proj,lm_head]"])
    assert build_config().model.lora is None  # off by default


def test_generation_with_adapters_runs_the_head_on_the_last_position_only(tiny_model_dir):
    from grpo.rollout.torch_engine import TorchEngine
    from grpo.types import SamplingParams

    model = _trained_adapter(tiny_model_dir)
    widths = []
    head = model.get_base_model().lm_head
    head.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    params = SamplingParams(num_generations=2, max_completion_length=3, eos_token_ids=())
    TorchEngine().generate(model, [[8, 9, 10, 11]], params)
    assert widths == [1, 1, 1]  # the prefill of 4 prompt tokens and 2 decode steps


# ---------------------------------------------------------------- through the trainer

LORA = ("model.lora.rank=4", "model.lora.alpha=8", "model.lora.target_modules=[q_proj,v_proj]")


def _trainer(model_dir, out, *extra):
    from test_trainer import make_cfg, make_trainer

    return make_trainer(make_cfg(model_dir, out, *LORA, *extra))


def _params(module, lora_part):
    return {
        n: p.detach().clone() for n, p in module.named_parameters() if (".lora_" in n) == lora_part
    }


def test_training_moves_only_the_adapters_and_holds_no_reference_copy(tiny_model_dir, tmp_path):
    t = _trainer(tiny_model_dir, tmp_path)
    assert t.reference.module is t.policy.module  # the reference is the policy, adapters off
    base, adapters = _params(t.policy.module, False), _params(t.policy.module, True)
    metrics = t.train_step()
    for name, p in t.policy.module.named_parameters():
        if ".lora_" in name:
            continue
        assert torch.equal(p, base[name]), name
    assert any(
        not torch.equal(p, adapters[n])
        for n, p in t.policy.module.named_parameters()
        if n in adapters
    )
    # bytes: base weights + adapters + AdamW's exp_avg and exp_avg_sq of each adapter
    # (same size) and its step counter (one float32 each); nothing for a reference
    base_bytes = sum(p.numel() * 4 for p in base.values())
    adapter_numel = sum(p.numel() for p in adapters.values())
    expected = base_bytes + adapter_numel * 4 + 2 * adapter_numel * 4 + len(adapters) * 4
    assert metrics["memory/model_and_optimizer_bytes"] == expected
    assert metrics["trained_parameters"] == adapter_numel


def test_reference_logp_equals_the_base_model_exactly(tiny_model_dir, tmp_path):
    from grpo.logprobs import batched_logp
    from grpo.types import Batch

    t = _trainer(tiny_model_dir, tmp_path)
    t.train_step()  # the adapters have moved
    rollout = t.engine.generate(t.policy.module, [[8, 9, 10], [11, 12]], t.sampling)
    batch = Batch.from_rollout(rollout)
    base, _ = load_model_and_tokenizer(tiny_model_dir)
    expected = batched_logp(base, batch, 3, 1.0)
    assert torch.equal(t.reference.logp(batch, 3), expected)
    assert not torch.equal(t.policy.logp_no_grad(batch, 3), expected)


@pytest.mark.parametrize("reset", [0, 1])
def test_resume_is_exact(tiny_model_dir, tmp_path, reset):
    """3 straight steps == 2 steps, save, resume in a new trainer, 1 more; with the
    reference reset every step, the moved base weights travel in the checkpoint."""
    extra = (f"algorithm.ref_reset_every={reset}",)
    straight = _trainer(tiny_model_dir, tmp_path / "a", "optim.max_steps=3", *extra)
    straight.train()
    first = _trainer(tiny_model_dir, tmp_path / "b", "optim.max_steps=2", *extra)
    first.train()
    checkpoint = tmp_path / "b" / "checkpoints" / "step-2"
    assert lora.is_adapter_dir(checkpoint)
    assert not (checkpoint / "model.safetensors").exists()  # the adapter only
    assert (checkpoint / "reference").is_dir() == bool(reset)
    resumed = _trainer(tiny_model_dir, tmp_path / "b", "optim.max_steps=3", *extra)
    assert resumed.resume() == 2
    resumed.train()
    for (n, a), b in zip(
        straight.policy.module.named_parameters(), resumed.policy.module.parameters(), strict=True
    ):
        assert torch.equal(a, b), n


def test_reference_reset_merges_and_starts_a_fresh_adapter(tiny_model_dir, tmp_path):
    from grpo.types import Batch

    t = _trainer(tiny_model_dir, tmp_path, "algorithm.ref_reset_every=2")
    t.train_step()
    t.step = 1
    rollout = t.engine.generate(t.policy.module, [[8, 9, 10]], t.sampling)
    batch = Batch.from_rollout(rollout)
    assert not torch.equal(t.reference.logp(batch, 4), t.policy.logp_no_grad(batch, 4))
    t.train_step()  # the second step ends with a merge
    assert_close(t.reference.logp(batch, 4), t.policy.logp_no_grad(batch, 4))
    for name, p in t.policy.module.named_parameters():
        if "lora_B" in name:
            assert torch.count_nonzero(p) == 0, name
    assert all(p not in t.optimizer.state for p in t.policy.trainable_parameters())


def test_final_holds_a_merged_model_and_the_adapter(tiny_model_dir, tmp_path):
    t = _trainer(tiny_model_dir, tmp_path, "optim.max_steps=1")
    t.train()
    ids, mask, n = _batch()
    with torch.no_grad():
        expected = completion_logp(t.policy.module, ids, mask, n)[0]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # no PEFT involved
    assert not lora.is_adapter_dir(tmp_path / "final")
    assert_close(_logp(merged), expected)
    # an adapter directory as the model path: its base plus the adapter, merged
    model, tokenizer = load_model_and_tokenizer(tmp_path / "final" / "adapter")
    assert not lora.is_lora(model) and len(tokenizer) == 101
    assert_close(_logp(model), expected)


def test_a_peft_model_passed_in_gets_the_adapters_off_reference(tiny_model_dir, tmp_path):
    from test_trainer import make_cfg, make_trainer

    tok = load_model_and_tokenizer(tiny_model_dir)[1]
    model = _trained_adapter(tiny_model_dir)
    t = make_trainer(make_cfg(tiny_model_dir, tmp_path), model=model, tokenizer=tok)
    assert t.reference.module is t.policy.module  # no copy of a user's PEFT model either
    with pytest.raises(ValueError, match="already carries PEFT adapters"):
        make_trainer(make_cfg(tiny_model_dir, tmp_path, *LORA), model=model, tokenizer=tok)
