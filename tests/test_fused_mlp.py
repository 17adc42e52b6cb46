"""Fused SwiGLU MLPs (``model.fused_mlp``): the same outputs and gradients as transformers'
own forward, for every allowlisted class and with checkpointing, LoRA, bf16 autocast,
DDP and FSDP2; and exactly the activation bytes the recomputation is meant to save."""

import copy

import pytest
import torch
from ranks import run_ranks
from torch.testing import assert_close
from transformers import (
    Cohere2Config,
    Cohere2ForCausalLM,
    CohereConfig,
    CohereForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    HeliumConfig,
    HeliumForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MinistralConfig,
    MinistralForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Olmo3Config,
    Olmo3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from grpo.config import LoraConfig, ModelConfig
from grpo.fused_mlp import SWIGLU_MLPS, fuse_swiglu_mlps, is_fused
from grpo.model_options import apply_model_options

V, H, I, LAYERS = 64, 32, 48, 2  # vocabulary, hidden, intermediate size, decoder layers
N, T = 3, 7  # sequences, tokens each: M = N * T positions run through every MLP

ARCHS = {
    "cohere": (CohereConfig, CohereForCausalLM),
    "cohere2": (Cohere2Config, Cohere2ForCausalLM),
    "granite": (GraniteConfig, GraniteForCausalLM),
    "helium": (HeliumConfig, HeliumForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "ministral": (MinistralConfig, MinistralForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM),
    "olmo3": (Olmo3Config, Olmo3ForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "smollm3": (SmolLM3Config, SmolLM3ForCausalLM),
}
"""One tiny model per allowlisted MLP class (``SWIGLU_MLPS``)."""

LORA_TARGETS = {
    "mlp": ["gate_proj", "up_proj", "down_proj"],  # down_proj is a PEFT layer
    "gate_up": ["gate_proj", "up_proj"],  # down_proj a frozen plain Linear
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],  # the whole MLP frozen
}


def tiny(arch: str = "llama", **overrides) -> torch.nn.Module:
    config_class, model_class = ARCHS[arch]
    kwargs = dict(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=H // 4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return model_class(config_class(**kwargs | overrides)).train()


def options(fused: bool, lora: str | None = None, **fields) -> ModelConfig:
    adapters = LoraConfig(rank=4, target_modules=LORA_TARGETS[lora]) if lora else None
    return ModelConfig(fused_mlp=fused, lora=adapters, **fields)


def randomise_adapters(model: torch.nn.Module) -> None:
    """The same adapters on both sides, B nonzero (PEFT starts B at 0, which would leave
    every A's gradient 0)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)


def run(model: torch.nn.Module, autocast: bool = False) -> dict[str, torch.Tensor]:
    """Logits, the input embeddings' gradient and every trained parameter's gradient of a
    weighted sum of the logits (weights drawn once, so every position matters)."""
    torch.manual_seed(2)
    ids = torch.randint(0, V, (N, T))  # [N, T]
    weights = torch.randn(N, T, V)  # [N, T, V]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()  # [N, T, H]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(inputs_embeds=embeds).logits  # [N, T, V]
    (logits.float() * weights).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"logits": logits, "embeds": embeds.grad, **grads}


def pair(arch="llama", lora=None, fuse_after_lora=False, overrides=None, **fields):
    """(transformers' forward, fused forward) models with equal weights, options applied."""
    base = tiny(arch, **(overrides or {}))
    plain = apply_model_options(copy.deepcopy(base), options(False, lora, **fields))
    fused = apply_model_options(base, options(not fuse_after_lora, lora, **fields))
    if fuse_after_lora:
        assert fuse_swiglu_mlps(fused) == LAYERS
    if lora:
        randomise_adapters(plain)
        randomise_adapters(fused)
    assert sum(map(is_fused, fused.modules())) == LAYERS
    assert not any(map(is_fused, plain.modules()))
    return plain, fused


def test_every_allowlisted_class_has_a_tiny_model():
    built = set()
    for arch in ARCHS:
        mlp = tiny(arch).model.layers[0].mlp
        built.add(f"{type(mlp).__module__}.{type(mlp).__qualname__}")
    assert built == SWIGLU_MLPS


def _variants():
    for arch, (config_class, _) in sorted(ARCHS.items()):
        yield arch, "plain"
        if "mlp_bias" in config_class().to_dict():
            yield arch, "bias"
        yield from ((arch, v) for v in ("checkpointing", "lora-mlp", "lora-attention"))


@pytest.mark.parametrize("arch, variant", list(_variants()))
def test_same_outputs_and_gradients_as_transformers(arch, variant):
    plain, fused = pair(
        arch,
        lora={"lora-mlp": "mlp", "lora-attention": "attention"}.get(variant),
        overrides={"mlp_bias": True} if variant == "bias" else None,
        gradient_checkpointing=variant == "checkpointing",
    )
    want, got = run(plain), run(fused)
    assert got.keys() == want.keys()
    for name in want:
        assert_close(got[name], want[name], msg=name)


@pytest.mark.parametrize("lora", ["mlp", "gate_up"])
def test_lora_added_before_or_after_fusing_gives_the_same_gradients(lora):
    plain, fused = pair(lora=lora, fuse_after_lora=True)
    want, got = run(plain), run(fused)
    for name in want:
        assert_close(got[name], want[name], msg=name)


def test_hooks_on_down_proj_still_run():
    # a hooked down_proj runs as a module (its input kept, SiLU's output still dropped)
    plain, fused = pair()
    calls = []
    for model in (plain, fused):
        for layer in model.model.layers:
            layer.mlp.down_proj.register_forward_hook(lambda *_: calls.append(1))
    want, got = run(plain), run(fused)
    assert len(calls) == 2 * LAYERS
    for name in want:
        assert_close(got[name], want[name], msg=name)
    assert saved_activation_bytes(plain) - saved_activation_bytes(fused) == LAYERS * N * T * I * 4


def test_bf16_autocast_gives_the_same_gradients():
    # The backward re-enters the forward's autocast, so it runs the bf16 matmuls that
    # autograd runs for transformers' forward (on this CPU: bit for bit). Compared at
    # bfloat16's precision (assert_close's bf16 defaults, rtol 1.6e-2, atol 1e-5), where
    # a device may still order a transposed matmul's sums differently.
    plain, fused = pair()
    want, got = run(plain, autocast=True), run(fused, autocast=True)
    assert got["logits"].dtype == want["logits"].dtype == torch.bfloat16
    for name in want:
        assert_close(got[name].bfloat16(), want[name].bfloat16(), msg=name)


def saved_activation_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass in one training
    forward (parameters included: the same ones on both sides)."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(2)
    ids = torch.randint(0, V, (N, T))  # [N, T]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum().backward()
    return sum(storages.values())


@pytest.mark.parametrize(
    "lora, dropped",
    [
        # silu(a) and silu(a) * b, both [M, I], no longer kept
        (None, 2),
        # a PEFT down_proj keeps its input silu(a) * b; silu(a) is still dropped
        ("mlp", 1),
        # a frozen plain down_proj never kept its input (no weight gradient): silu(a) dropped
        ("gate_up", 1),
        ("attention", 1),
    ],
)
def test_saves_exactly_the_recomputed_activations(lora, dropped):
    plain, fused = pair(lora=lora)
    m = N * T  # positions through each MLP
    fp32 = 4  # bytes
    expected = LAYERS * dropped * m * I * fp32  # e.g. 2 * 2 * 21 * 48 * 4 = 16128 bytes
    assert saved_activation_bytes(plain) - saved_activation_bytes(fused) == expected


def test_gelu_mlps_are_left_alone():
    gemma = GemmaForCausalLM(  # GemmaMLP: the same form with GELU, not allowlisted
        GemmaConfig(
            vocab_size=V,
            hidden_size=H,
            intermediate_size=I,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        )
    )
    gelu_llama = tiny(hidden_act="gelu")  # allowlisted class, but not SiLU
    for model in (gemma, gelu_llama):
        apply_model_options(model, options(True))
        assert not any("forward" in vars(m) for m in model.modules())
    assert fuse_swiglu_mlps(gemma) == fuse_swiglu_mlps(gelu_llama) == 0


def test_no_new_state_and_copies_run_their_own_weights(tmp_path):
    plain, fused = pair()
    assert fused.state_dict().keys() == plain.state_dict().keys()
    plain.save_pretrained(tmp_path / "plain")
    fused.save_pretrained(tmp_path / "fused")
    from safetensors import safe_open

    def keys(path):
        with safe_open(path / "model.safetensors", "pt") as f:
            return set(f.keys())

    assert keys(tmp_path / "fused") == keys(tmp_path / "plain")
    # a deep copy (the reference) runs its own weights, not the policy's
    ref = copy.deepcopy(fused)
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(0.5)
    ids = torch.arange(T)[None]  # [1, T]
    with torch.no_grad():
        assert_close(ref(input_ids=ids).logits, plain(input_ids=ids).logits)
    ref_mlp = ref.model.layers[0].mlp
    assert is_fused(ref_mlp) and vars(ref_mlp)["forward"].__self__ is ref_mlp


def test_no_grad_runs_transformers_forward_bit_for_bit():
    plain, fused = pair()
    ids = torch.arange(T)[None]  # [1, T]
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)


def _halves() -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Two ranks' log-prob inputs: ``(input_ids [N, T], attention_mask [N, T], completion
    length)``, prompts of 2 tokens."""
    torch.manual_seed(2)
    ids = torch.randint(0, V, (2 * N, T))  # [2N, T]
    return [(half, torch.ones_like(half), T - 2) for half in ids.chunk(2)]


def _distributed_gradients() -> dict[str, dict[str, torch.Tensor]]:
    """On each of 2 ranks, for DDP and FSDP2: the fused model wrapped as training wraps
    it, this rank's half of the batch, one backward; the averaged full gradients."""
    from grpo.distributed import wrap
    from grpo.logprobs import forward_logp
    from grpo.runtime import Runtime

    runtime = Runtime.from_settings("cpu")
    out = {}
    for strategy in ("ddp", "fsdp"):
        _, fused = pair()
        model = wrap(fused, strategy, runtime)
        logp, _ = forward_logp(model, *_halves()[runtime.rank])  # [N, T - 2]
        logp.square().mean().backward()
        out[strategy] = {
            name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for name, p in fused.named_parameters()
        }
    return out


@pytest.fixture(scope="module")
def distributed_gradients(tmp_path_factory):
    return run_ranks(_distributed_gradients, 2, tmp_path_factory.mktemp("fused"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ddp_and_fsdp2_average_the_same_gradients(distributed_gradients, strategy):
    from grpo.logprobs import forward_logp

    plain, _ = pair()
    for half in _halves():
        logp, _ = forward_logp(plain, *half)  # [N, T - 2]
        (logp.square().mean() / 2).backward()  # each rank's loss, averaged over the 2 ranks
    for rank in distributed_gradients:
        grads = rank[strategy]
        assert grads.keys() == dict(plain.named_parameters()).keys()
        for name, p in plain.named_parameters():
            assert_close(grads[name], p.grad, msg=name)
