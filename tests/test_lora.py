"""LoRA through PEFT: the adapters-off reference is the base model exactly, merges keep the
policy's outputs, and the saved forms (adapter, base, merged) load back to the same model."""

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from grpo import lora
from grpo.config import ConfigError, LoraConfig, build_config
from grpo.logprobs import completion_logp
from grpo.modeling import load_model_and_tokenizer

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
