"""The LM head run over chunks of positions (no [N, T, V] logits) against the full-logits
path: the model's own logits, then a log-softmax over the whole vocabulary."""

import pytest
import torch
from torch.testing import assert_close
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from grpo import logprobs
from grpo.logprobs import (
    LMHead,
    batch_logp,
    completion_logp,
    head_logp,
    token_entropy,
    token_logp,
)
from grpo.rollout.torch_engine import TorchEngine
from grpo.types import Batch, SamplingParams

V = 50
SMALL = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
)


def _naive(logits, targets, temperature):
    """Full-vocabulary log-softmax of ``logits [N, T, V]``: log-probs and entropies."""
    logp = torch.log_softmax(logits / temperature, dim=-1)  # [N, T, V]
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N, T]
    return picked, -(logp.exp() * logp).sum(-1).detach()  # [N, T], [N, T]


@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
@pytest.mark.parametrize("cap, scale", [(None, 1.0), (2.0, 1.0), (None, 0.25), (3.0, 2.0)])
def test_head_logp_equals_log_softmax_of_the_head(chunk, cap, scale):
    # 3 x 5 = 15 positions: chunks of 4 and 7 end inside a row; a bias, soft-capping and
    # scaling each change the logits and must change the gradients accordingly.
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 8, generator=gen, requires_grad=True)  # [N, T, H]
    weight = torch.randn(V, 8, generator=gen, requires_grad=True)  # [V, H]
    bias = torch.randn(V, generator=gen, requires_grad=True)  # [V]
    targets = torch.randint(0, V, (3, 5), generator=gen)  # [N, T]
    head = LMHead(weight, bias, cap, scale)
    logp, entropy = head_logp(hidden, head, targets, 0.7, True, chunk_positions=chunk)

    logits = hidden @ weight.T + bias  # [N, T, V]
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    expected, expected_entropy = _naive(logits * scale, targets, 0.7)
    assert_close(logp, expected)
    assert_close(entropy, expected_entropy)
    assert not entropy.requires_grad
    w = torch.randn(3, 5, generator=gen)  # [N, T] any downstream use of logp
    grads = torch.autograd.grad((logp * w).sum(), (hidden, weight, bias))
    expected_grads = torch.autograd.grad((expected * w).sum(), (hidden, weight, bias))
    for got, want in zip(grads, expected_grads, strict=True):
        assert_close(got, want)


def _padded_batch():
    """Three rows, prompts left-padded to P = 4, completions right-padded to T = 6."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (3, 10), generator=gen)  # [N, P + T]
    mask = torch.ones(3, 10, dtype=torch.long)  # [N, P + T]
    mask[1, :2] = 0  # a shorter prompt
    mask[2, -3:] = 0  # a shorter completion
    return ids, mask, 6


def _full_logits_path(model, ids, mask, t, temperature):
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # [N, P + T]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    return _naive(out.logits[:, -t - 1 : -1], ids[:, -t:], temperature)  # [N, T] each


def _grads(model, logp, weights):
    model.zero_grad()
    (logp * weights).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def _llama(tied):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=tied))


def _gemma2():  # soft-capped at 1.5 so that the tanh really bends these logits
    torch.manual_seed(0)
    config = Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=1.5)
    return Gemma2ForCausalLM(config)


def _cohere():  # logits multiplied by 0.5
    torch.manual_seed(0)
    return CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.5))


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize(
    "build",
    [lambda: _llama(True), lambda: _llama(False), _gemma2, _cohere],
    ids=["tied", "untied", "gemma2_softcap", "cohere_scale"],
)
def test_completion_logp_equals_the_full_logits_path(build, chunk, monkeypatch):
    # 18 completion positions; chunks of 5 end inside completions. Every parameter's
    # gradient, the LM head's (tied to the embedding or not) included, must agree.
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", chunk * V)
    model = build().train()
    ids, mask, t = _padded_batch()
    weights = torch.linspace(-1, 1, 18).view(3, 6) * mask[:, -t:]  # [N, T]
    logp, entropy = completion_logp(model, ids, mask, t, 0.7, with_entropy=True)
    got = _grads(model, logp, weights)
    expected, expected_entropy = _full_logits_path(model, ids, mask, t, 0.7)
    want = _grads(model, expected, weights)
    assert_close(logp, expected)
    assert_close(entropy, expected_entropy)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_shared_prompts_and_length_buckets_equal_the_full_logits_path(share_prompt, monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 3 * V)
    monkeypatch.setattr(logprobs, "CALL_POSITIONS", 0)  # calls are free: several buckets
    calls = []
    monkeypatch.setattr(
        logprobs, "shared_prefix_logp", _counted(calls, logprobs.shared_prefix_logp)
    )
    monkeypatch.setattr(logprobs, "completion_logp", _counted(calls, logprobs.completion_logp))
    model = _llama(False).train()
    gen = torch.Generator().manual_seed(2)
    b, g, p, t = 2, 3, 4, 7
    ids = torch.randint(3, V, (b * g, p + t), generator=gen)  # [N, P + T]
    ids[:g, :p], ids[g:, :p] = ids[0, :p], ids[g, :p]  # one prompt per group
    mask = torch.ones(b * g, p + t, dtype=torch.long)  # [N, P + T]
    mask[g:, :1] = 0  # group 1's prompt is one token shorter
    for row, length in enumerate([2, 7, 1, 7, 3, 7]):  # buckets split these lengths
        mask[row, p + length :] = 0
    batch = Batch(
        ids, mask, mask[:, p:].float(), torch.zeros(b * g, t), torch.arange(b).repeat_interleave(g)
    )
    weights = torch.linspace(-1, 1, b * g)[:, None] * batch.completion_mask  # [N, T]
    logp, entropy = batch_logp(model, batch, 0.7, True, share_prompt, bucket=True)
    got = _grads(model, logp, weights)
    expected, expected_entropy = _full_logits_path(model, ids, mask, t, 0.7)
    want = _grads(model, expected, weights)
    assert len(calls) > 1
    real = batch.completion_mask.bool()
    assert_close(logp[real], expected[real])
    assert_close(entropy[real], expected_entropy[real])
    for a, w in zip(got, want, strict=True):
        assert_close(a, w)


def _counted(calls, fn):
    return lambda *a, **k: calls.append(1) or fn(*a, **k)


def test_token_logp_and_entropy_are_the_same_arithmetic():
    """On logits one already has, ``token_logp`` agrees with the chunked head."""
    gen = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(2, 3, 8, generator=gen), torch.randn(V, 8, generator=gen)
    targets = torch.randint(0, V, (2, 3), generator=gen)
    logp, entropy = head_logp(hidden, LMHead(weight), targets, 1.3, True, chunk_positions=2)
    assert_close(logp, token_logp(hidden @ weight.T, targets, 1.3))
    assert_close(entropy, token_entropy(hidden @ weight.T, 1.3))


def test_generation_runs_the_head_on_the_last_position_only():
    model = _llama(False)
    widths = []
    model.lm_head.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    params = SamplingParams(num_generations=3, max_completion_length=5, eos_token_ids=())
    rollout = TorchEngine().generate(model, [[5, 6, 7, 8], [9, 10]], params)
    assert rollout.completion_ids.shape == (6, 5)
    assert widths == [1] * 5  # the prefill and 4 decode steps: one position each


def test_a_head_that_is_not_a_linear_layer_is_refused():
    model = _llama(False)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    ids, mask, t = _padded_batch()
    with pytest.raises(ValueError, match="output head is Sequential"):
        completion_logp(model, ids, mask, t)
