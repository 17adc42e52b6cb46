"""Chunked log-probs and entropies against torch.log_softmax, and one model forward
against scoring each row alone without padding."""

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

from grpo import logprobs
from grpo.logprobs import completion_logp, token_entropy, token_logp


def _naive_logp(logits, targets, temperature):
    logp = torch.log_softmax(logits / temperature, dim=-1)  # [N, T, V]
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N, T]


def _naive_entropy(logits, temperature):
    logp = torch.log_softmax(logits / temperature, dim=-1)  # [N, T, V]
    return -(logp.exp() * logp).sum(-1)  # [N, T]


@pytest.fixture(params=[False, True], ids=["one_chunk", "row_chunks"])
def chunked(request, monkeypatch):
    if request.param:  # one row per chunk, so the chunk loop really runs several times
        monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logp_equals_log_softmax(chunked, temperature):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 4, 11, generator=gen)).requires_grad_(True)  # [N, T, V]
    targets = torch.randint(0, 11, (3, 4), generator=gen)  # [N, T]
    logp = token_logp(logits, targets, temperature)
    expected = _naive_logp(logits, targets, temperature)
    assert_close(logp, expected)
    weights = torch.randn(3, 4, generator=gen)  # any downstream use of logp
    (grad,) = torch.autograd.grad((logp * weights).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    assert_close(grad, expected_grad)


def test_temperature_zero_is_treated_as_one():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1))  # [N, T, V]
    targets = torch.tensor([[0, 1, 2], [3, 4, 0]])  # [N, T]
    assert torch.equal(token_logp(logits, targets, 0.0), token_logp(logits, targets, 1.0))
    assert torch.equal(token_entropy(logits, 0.0), token_entropy(logits, 1.0))
    with pytest.raises(ValueError, match="temperature"):
        token_logp(logits, targets, -1.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_entropy_equals_log_softmax(chunked, temperature):
    logits = 3 * torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        entropy = token_entropy(logits, temperature)  # [N, T]
    assert_close(entropy, _naive_entropy(logits, temperature))
    # Uniform over V = 11 has the maximal entropy ln 11 = 2.397895.
    assert_close(token_entropy(torch.zeros(1, 1, 11)), torch.log(torch.tensor([[11.0]])))


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
COMPLETIONS = [[20, 21, 22, 23], [24, 25], [26, 27, 28]]


def _left_right_padded(pad_id=0):
    """Prompts left-padded to P = 5, completions right-padded to T = 4."""
    P, T = 5, 4
    input_ids = torch.full((3, P + T), pad_id)  # [N, P + T]
    attention_mask = torch.zeros(3, P + T, dtype=torch.long)  # [N, P + T]
    for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
        input_ids[i, P - len(prompt) : P + len(completion)] = torch.tensor(prompt + completion)
        attention_mask[i, P - len(prompt) : P + len(completion)] = 1
    return input_ids, attention_mask, P, T


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logp_equals_each_row_alone(tiny_llama, temperature):
    input_ids, attention_mask, _, T = _left_right_padded()
    logp, entropy = completion_logp(
        tiny_llama, input_ids, attention_mask, T, temperature, with_entropy=True
    )
    assert logp.shape == entropy.shape == (3, T)
    assert logp.requires_grad and not entropy.requires_grad

    for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
        ids = torch.tensor([prompt + completion])  # [1, P_i + T_i], no padding at all
        logits = tiny_llama(ids, use_cache=False).logits[:, len(prompt) - 1 : -1]  # [1, T_i, V]
        targets = torch.tensor([completion])  # [1, T_i]
        n = len(completion)
        assert_close(logp[i : i + 1, :n], _naive_logp(logits, targets, temperature))
        assert_close(entropy[i : i + 1, :n], _naive_entropy(logits, temperature).detach())


def test_completion_logp_equals_full_logits_path(tiny_llama):
    # The same padded batch scored the naive way: all P + T positions' logits, one full
    # log_softmax, then the completion slice. Every position matches, padding included.
    input_ids, attention_mask, P, T = _left_right_padded()
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # [N, P + T]
    with torch.no_grad():
        full = tiny_llama(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        expected = _naive_logp(full.logits[:, P - 1 : -1], input_ids[:, P:], 1.0)  # [N, T]
        logp, entropy = completion_logp(tiny_llama, input_ids, attention_mask, T)
    assert entropy is None
    assert_close(logp, expected)
