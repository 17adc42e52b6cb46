"""Tests for the rollout engines: the optimised paths against plain references.

A tiny random Llama (hidden 32, 2 layers, vocab 40) keeps each test well under a second.
Its weights use a large init scale so next-token distributions are peaked and greedy
decoding has no near-ties that float rounding could flip. Llama's rotary embeddings only
see relative positions, so wrong position ids under left padding would go unnoticed
there; the position-sensitive tests also run a tiny GPT-2 (absolute position embeddings).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICES
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from grpo.rollout import ENGINES, TorchEngine, make_engine
from grpo.rollout.torch_engine import filter_logits
from grpo.types import Rollout, SamplingParams

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]
PAD = 0


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()  # eval: the reference forwards below skip dropout


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=40,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(config).eval()  # GPT-2 has dropout 0.1 in train mode


@pytest.fixture(params=["llama", "gpt2"])
def any_model(request):
    """Both architectures, for the tests that position ids can break."""
    return request.getfixturevalue("model" if request.param == "llama" else "gpt2")


def params(**overrides: object) -> SamplingParams:
    base = dict(num_generations=3, max_completion_length=8, pad_token_id=PAD)
    return SamplingParams(**{**base, **overrides})


def generate(model, prompts, p, seed=0, prefix_sharing=True) -> Rollout:
    gen = torch.Generator().manual_seed(seed)
    return TorchEngine(prefix_sharing=prefix_sharing).generate(model, prompts, p, gen)


def first_stop_token(model) -> int:
    """An id that greedy decoding emits early in some rows but not in all, to use as EOS."""
    free = generate(model, PROMPTS, params(temperature=0.0, num_generations=1))
    for token in free.completion_ids[:, 1:4].flatten().tolist():
        rows_with = (free.completion_ids == token).any(dim=1)  # [N]
        if 0 < rows_with.sum() < len(PROMPTS):
            return token
    raise AssertionError("the tiny model's greedy outputs give no usable EOS id")


def assert_same_rollout(a: Rollout, b: Rollout) -> None:
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.truncated, b.truncated)
    torch.testing.assert_close(a.sample_logp, b.sample_logp)


def test_rollout_shapes_and_grouping(model):
    p = params(temperature=1.0, num_generations=3, max_completion_length=5)
    r = generate(model, PROMPTS, p)
    B, G, P = len(PROMPTS), 3, max(len(x) for x in PROMPTS)
    assert r.group_size == G and r.num_prompts == B
    assert r.prompt_ids.shape == r.prompt_mask.shape == (B, P)
    assert r.completion_ids.shape == r.completion_mask.shape == r.sample_logp.shape == (B * G, 5)
    assert r.truncated.shape == (B * G,) and r.truncated.dtype == torch.bool
    # Left padding: prompt 2 ([11]) sits at the right end of its row.
    assert r.prompt_ids[2].tolist() == [PAD] * (P - 1) + [11]
    assert r.prompt_mask[2].tolist() == [0] * (P - 1) + [1]
    assert (r.sample_logp <= 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_batched_greedy_equals_one_prompt_at_a_time(any_model, device):
    model = copy.deepcopy(any_model).to(device)
    eos = first_stop_token(model)
    p = params(temperature=0.0, num_generations=2, eos_token_ids=(eos,))
    batched = generate(model, PROMPTS, p)
    G = p.num_generations
    for b, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], p)
        T = alone.completion_ids.shape[1]
        rows = slice(b * G, (b + 1) * G)
        assert torch.equal(batched.completion_ids[rows, :T], alone.completion_ids)
        assert torch.equal(batched.completion_mask[rows, :T], alone.completion_mask)
        assert torch.equal(batched.truncated[rows], alone.truncated)
        torch.testing.assert_close(batched.sample_logp[rows, :T], alone.sample_logp)
        # Past this prompt's own longest completion the batched rows are padding only.
        assert (batched.completion_mask[rows, T:] == 0).all()
        assert (batched.completion_ids[rows, T:] == PAD).all()


@pytest.mark.parametrize("device", DEVICES)
def test_shared_prefix_equals_repeated_prompt(model, device):
    model = copy.deepcopy(model).to(device)
    eos = first_stop_token(model)
    p = params(
        temperature=1.0,
        top_k=12,
        top_p=0.9,
        num_generations=4,
        max_completion_length=10,
        eos_token_ids=(eos,),
    )
    shared = generate(model, PROMPTS, p, seed=7, prefix_sharing=True)
    plain = generate(model, PROMPTS, p, seed=7, prefix_sharing=False)
    assert_same_rollout(shared, plain)
    assert torch.equal(shared.prompt_ids, plain.prompt_ids)
    # The EOS made some rows leave the decode batch early; both paths agree anyway.
    assert shared.truncated.any() and not shared.truncated.all()


def test_same_seed_same_rollout_different_seed_different_tokens(model):
    p = params(temperature=1.0, top_p=0.95)
    assert_same_rollout(generate(model, PROMPTS, p, seed=3), generate(model, PROMPTS, p, seed=3))
    other = generate(model, PROMPTS, p, seed=4)
    assert not torch.equal(generate(model, PROMPTS, p, seed=3).completion_ids, other.completion_ids)


def test_dropping_finished_rows_keeps_the_random_stream(model):
    # Same seed with and without an EOS: every row agrees with the EOS-free run up to
    # and including its stop, so finished rows leaving the batch shifted no noise.
    eos = first_stop_token(model)
    free = generate(model, PROMPTS, params(temperature=1.0, max_completion_length=10), seed=5)
    stopped = generate(
        model,
        PROMPTS,
        params(temperature=1.0, max_completion_length=10, eos_token_ids=(eos,)),
        seed=5,
    )
    lengths = stopped.completion_lengths  # [N]
    for n, length in enumerate(lengths.tolist()):
        assert torch.equal(stopped.completion_ids[n, :length], free.completion_ids[n, :length])
    assert (lengths < free.completion_lengths).any()


def test_eos_stops_a_row_and_is_kept_truncated_rows_are_flagged(model):
    eos = first_stop_token(model)
    T_max = 8
    free = generate(model, PROMPTS, params(temperature=0.0, max_completion_length=T_max))
    r = generate(
        model, PROMPTS, params(temperature=0.0, max_completion_length=T_max, eos_token_ids=(eos,))
    )
    assert r.truncated.any() and not r.truncated.all()
    for n in range(r.completion_ids.shape[0]):
        hits = (free.completion_ids[n] == eos).nonzero()
        length = int(hits[0]) + 1 if len(hits) else T_max  # EOS counted in the length
        mask = r.completion_mask[n]
        assert mask[:length].eq(1).all() and mask[length:].eq(0).all()
        assert torch.equal(r.completion_ids[n, :length], free.completion_ids[n, :length])
        assert (r.completion_ids[n, length:] == PAD).all()
        assert (r.sample_logp[n, length:] == 0).all()
        assert bool(r.truncated[n]) == (len(hits) == 0)
        if len(hits):
            assert r.completion_ids[n, length - 1] == eos
    # No EOS anywhere: every row runs to max_completion_length and is truncated.
    assert free.truncated.all() and free.completion_mask.eq(1).all()
    assert free.completion_ids.shape[1] == T_max


def test_sample_logp_matches_a_full_forward_without_cache(any_model):
    model = any_model
    temperature = 0.7
    p = params(temperature=temperature, top_k=0, top_p=1.0, max_completion_length=6)
    r = generate(model, PROMPTS, p, seed=11)
    G = p.num_generations
    for n in range(r.completion_ids.shape[0]):
        prompt = torch.tensor(PROMPTS[n // G])  # [P_b]
        length = int(r.completion_lengths[n])
        completion = r.completion_ids[n, :length]  # [L]
        ids = torch.cat([prompt, completion])[None]  # [1, P_b + L]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # [L, V]
        logp = (logits / temperature).log_softmax(-1)  # [L, V]
        expected = logp.gather(-1, completion[:, None]).squeeze(-1)  # [L]
        torch.testing.assert_close(r.sample_logp[n, :length], expected)


def test_greedy_logp_is_raw_log_softmax(model):
    r = generate(model, PROMPTS[:1], params(temperature=0.0, max_completion_length=4))
    ids = torch.cat([torch.tensor(PROMPTS[0]), r.completion_ids[0]])[None]  # [1, P + T]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(PROMPTS[0]) - 1 : -1]  # [T, V]
    assert torch.equal(r.completion_ids[0], logits.argmax(-1))
    expected = logits.log_softmax(-1).gather(-1, r.completion_ids[0, :, None]).squeeze(-1)
    torch.testing.assert_close(r.sample_logp[0], expected)


def test_top_k_one_equals_greedy(model):
    greedy = generate(model, PROMPTS, params(temperature=0.0))
    top1 = generate(model, PROMPTS, params(temperature=1.0, top_k=1), seed=9)
    assert torch.equal(top1.completion_ids, greedy.completion_ids)
    # The filtered distribution has one token, so each sampled token has log-prob 0.
    assert torch.equal(top1.sample_logp, torch.zeros_like(top1.sample_logp))


@pytest.mark.parametrize(("prefix_sharing", "first_batch"), [(True, 4), (False, 12)])
def test_prompt_is_prefilled_once_per_group(model, prefix_sharing, first_batch):
    calls: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generate(model, PROMPTS, params(temperature=1.0), prefix_sharing=prefix_sharing)
    finally:
        handle.remove()
    B, G, P = len(PROMPTS), 3, max(len(x) for x in PROMPTS)
    assert calls[0] == (first_batch, P)  # prefill: [B, P] shared, [B*G, P] plain
    assert all(shape[1] == 1 for shape in calls[1:])  # then one token per step
    assert calls[1][0] == B * G  # decoding runs all N = B*G completions


def test_training_mode_is_restored(model):
    model.train()
    generate(model, PROMPTS[:1], params(max_completion_length=2))
    assert model.training
    model.eval()
    generate(model, PROMPTS[:1], params(max_completion_length=2))
    assert not model.training


def test_zero_length_completions(model):
    r = generate(model, PROMPTS, params(max_completion_length=0))
    assert r.completion_ids.shape == (len(PROMPTS) * 3, 0)
    assert r.truncated.all()


def test_filter_logits_by_hand():
    # probs of log([0.5, 0.3, 0.15, 0.05]): top_p=0.8 keeps 0.5 and 0.3 (mass before the
    # third token is 0.8, which reaches top_p); top_k=3 drops only the last.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()  # [1, 4]
    inf = float("-inf")
    assert filter_logits(logits, top_k=3, top_p=1.0)[0, 3] == inf
    kept = filter_logits(logits, top_k=0, top_p=0.8).isfinite()  # [1, 4]
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, top_k=0, top_p=0.75).isfinite()  # 0.5 < 0.75, 0.8 >= 0.75
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, top_k=0, top_p=0.4).isfinite()  # the top token alone
    assert kept.tolist() == [[True, False, False, False]]


def test_make_engine():
    assert isinstance(make_engine("torch", prefix_sharing=False), TorchEngine)
    assert set(ENGINES) >= {"torch", "vllm"}
    with pytest.raises(ValueError, match="allowed: torch, vllm"):
        make_engine("hf")


def test_vllm_engine_is_optional():
    # Chosen by name only; without vllm installed it says how to get it.
    with pytest.raises((ImportError, NotImplementedError), match=r"vllm|not implemented"):
        make_engine("vllm")


def test_invalid_params_are_named(model):
    with pytest.raises(ValueError, match="top_p"):
        generate(model, PROMPTS, params(top_p=0.0))
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1], []], params())


def test_reserved_cache_layer_equals_dynamic_layer():
    """Writing in place into a reserved buffer, with rows repeated and later dropped, holds
    exactly what transformers' concatenating DynamicLayer holds."""
    from transformers.cache_utils import DynamicLayer

    from grpo.rollout.torch_engine import ReservedLayer

    g = torch.Generator().manual_seed(0)
    prefill = torch.randn(2, 3, 4, 5, generator=g)  # [B, H, P, D]
    plain = DynamicLayer()
    plain.update(prefill, -prefill)
    rows = torch.tensor([0, 0, 1, 1])
    plain.reorder_cache(rows)
    reserved = ReservedLayer(prefill, -prefill, capacity=7, rows=rows)
    for step, keep in enumerate([None, torch.tensor([0, 2, 3]), None]):
        if keep is not None:
            plain.reorder_cache(keep)
            reserved.reorder_cache(keep)
        new = torch.randn(plain.keys.shape[0], 3, 1, 5, generator=g)  # [n, H, 1, D]
        expected = plain.update(new, 2 * new)
        got = reserved.update(new, 2 * new)
        assert reserved.get_seq_length() == 4 + step + 1
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="reserved for 7 positions"):
        reserved.update(torch.zeros(3, 3, 1, 5), torch.zeros(3, 3, 1, 5))
