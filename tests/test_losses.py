"""Loss terms and aggregation against hand-worked numbers and the seed's plain objective."""

import math

import pytest
import torch
from torch.testing import assert_close

from grpo.advantages import expand_to_tokens, group_advantages
from grpo.logprobs import token_logp
from grpo.losses import (
    LOSS_TYPES,
    Normaliser,
    aggregate,
    clipped_surrogate,
    importance_weighted_kl,
    kl_divergence,
    sequence_ratio,
)

LN2 = math.log(2)


def test_kl_estimators_hand_values():
    # token 0: policy p = 0.5, reference 0.25, so d = ref_logp - logp = -ln 2
    #   k1 = -d = ln 2 = 0.693147; k2 = d^2 / 2 = 0.240227; k3 = e^d - d - 1 = 0.5 + ln 2 - 1
    #   = 0.193147
    # token 1: policy 0.25, reference 0.5, so d = +ln 2
    #   k1 = -0.693147; k2 = 0.240227; k3 = 2 - ln 2 - 1 = 0.306853
    logp = torch.log(torch.tensor([[0.5, 0.25]]))  # [N=1, T=2]
    ref_logp = torch.log(torch.tensor([[0.25, 0.5]]))  # [N=1, T=2]
    assert_close(kl_divergence(logp, ref_logp, "k1"), torch.tensor([[LN2, -LN2]]))
    assert_close(kl_divergence(logp, ref_logp, "k2"), torch.tensor([[LN2**2 / 2, LN2**2 / 2]]))
    assert_close(kl_divergence(logp, ref_logp, "k3"), torch.tensor([[LN2 - 0.5, 1 - LN2]]))
    assert_close(kl_divergence(logp, ref_logp), torch.tensor([[0.193147, 0.306853]]))


def test_importance_weighted_kl_hand_values_and_gradient():
    # token 0: policy 0.25, reference 0.5, so d = ref_logp - logp = ln 2 and
    #   k3 = e^d - d - 1 = 1 - ln 2 = 0.306853; old policy 0.25 / 1.5, so ratio = 1.5
    #   value: 1.5 * (1 - ln 2) = 0.460279
    #   gradient in logp: ratio * k3 + ratio * (1 - e^d) = 1.5 * (1 - ln 2) + 1.5 * (1 - 2)
    #   = -1.5 ln 2 = -1.039721 (plain k3's would be 1 - e^d = -1)
    # token 1: policy = reference = old policy: k3 = 0, ratio 1, value 0, gradient
    #   1 * 0 + 1 * (1 - e^0) = 0
    logp = torch.log(torch.tensor([[0.25, 0.5]])).requires_grad_()  # [N=1, T=2]
    ref_logp = torch.log(torch.tensor([[0.5, 0.5]]))  # [N=1, T=2]
    old_logp = torch.log(torch.tensor([[0.25 / 1.5, 0.5]]))  # [N=1, T=2]
    kl = importance_weighted_kl(kl_divergence(logp, ref_logp), logp - old_logp)  # [1, 2]
    assert_close(kl.detach(), torch.tensor([[1.5 * (1 - LN2), 0.0]]))
    kl.sum().backward()
    assert_close(logp.grad, torch.tensor([[-1.5 * LN2, 0.0]]))


def test_importance_weighted_k3_on_policy_is_k3_in_value_and_k2_in_gradient():
    # ratio = exp(logp - logp.detach()) is 1 with gradient 1: the value stays k3, and the
    # gradient is k3 + 1 - e^d = -d, which is k2's: d/dlogp (d^2 / 2) = -d
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 5, generator=gen).requires_grad_()  # [N=3, T=5]
    ref_logp = torch.randn(3, 5, generator=gen)  # [N=3, T=5]
    weighted = importance_weighted_kl(kl_divergence(logp, ref_logp), logp - logp.detach())
    assert_close(weighted.detach(), kl_divergence(logp, ref_logp).detach())
    (grad,) = torch.autograd.grad(weighted.sum(), logp)
    (k2_grad,) = torch.autograd.grad(kl_divergence(logp, ref_logp, "k2").sum(), logp)
    assert_close(grad, k2_grad)
    assert_close(grad, (logp - ref_logp).detach())  # -d


def test_k3_nonnegative_and_exactly_zero_at_equality():
    gen = torch.Generator().manual_seed(0)
    logp, ref_logp = 3 * torch.randn(2, 64, 8, generator=gen)  # [N=64, T=8] each
    assert (kl_divergence(logp, ref_logp) >= 0).all()
    for estimator in ("k1", "k2", "k3"):
        assert torch.equal(kl_divergence(logp, logp, estimator), torch.zeros(64, 8))
    with pytest.raises(ValueError, match=r"estimator.*'k1', 'k2', 'k3'.*'k4'"):
        kl_divergence(logp, ref_logp, "k4")


# ratio, A, and by hand with eps_low = 0.2, eps_high = 0.28 (clip range [0.8, 1.28]):
CASES = [
    (1.1, 1.0),  # inside: min(1.1, 1.1) = 1.1 -> loss -1.1
    (1.5, 1.0),  # clip to 1.28: min(1.5, 1.28) = 1.28 -> loss -1.28, high-clipped
    (1.5, -1.0),  # min(-1.5, -1.28) = -1.5 -> loss 1.5, unclipped: the gradient stays
    (0.5, -1.0),  # clip to 0.8: min(-0.5, -0.8) = -0.8 -> loss 0.8, low-clipped
    (0.5, 1.0),  # min(0.5, 0.8) = 0.5 -> loss -0.5, unclipped
    (1.25, 2.0),  # inside [0.8, 1.28]: 2.5 -> loss -2.5 (clipped if eps_high were 0.2)
    (0.75, -2.0),  # clip to 0.8: min(-1.5, -1.6) = -1.6 -> loss 1.6, low-clipped
]


def _surrogate_inputs():
    ratio = torch.tensor([[r for r, _ in CASES]])  # [N=1, T=7]
    adv = torch.tensor([[a for _, a in CASES]])  # [N=1, T=7]
    logp = torch.log(ratio).requires_grad_(True)  # old_logp = 0, so exp(logp) is the ratio
    return logp, torch.zeros_like(ratio), adv


def test_clipped_surrogate_clip_higher():
    logp, old_logp, adv = _surrogate_inputs()
    out = clipped_surrogate(logp, old_logp, adv, eps_low=0.2, eps_high=0.28)
    assert_close(out.ratio, torch.tensor([[1.1, 1.5, 1.5, 0.5, 0.5, 1.25, 0.75]]))
    assert_close(out.per_token_loss, torch.tensor([[-1.1, -1.28, 1.5, 0.8, -0.5, -2.5, 1.6]]))
    assert out.low_clipped.tolist() == [[False, False, False, True, False, False, True]]
    assert out.high_clipped.tolist() == [[False, True, False, False, False, False, False]]
    # d loss / d logp = -ratio * A where the unclipped term is the min, 0 where clipped:
    # [-1.1, 0, 1.5, 0, -0.5, -2.5, 0]
    (grad,) = torch.autograd.grad(out.per_token_loss.sum(), logp)
    assert_close(grad, torch.tensor([[-1.1, 0.0, 1.5, 0.0, -0.5, -2.5, 0.0]]))


def test_clipped_surrogate_symmetric_by_default():
    # eps_high = eps_low = 0.2, clip range [0.8, 1.2]: case 1 gives -1.2 instead of -1.28,
    # case 5 (ratio 1.25, A 2) is now clipped: min(2.5, 1.2 * 2 = 2.4) -> loss -2.4.
    logp, old_logp, adv = _surrogate_inputs()
    out = clipped_surrogate(logp, old_logp, adv, eps_low=0.2)
    assert_close(out.per_token_loss, torch.tensor([[-1.1, -1.2, 1.5, 0.8, -0.5, -2.4, 1.6]]))
    assert out.low_clipped.tolist() == [[False, False, False, True, False, False, True]]
    assert out.high_clipped.tolist() == [[False, True, False, False, False, True, False]]


@pytest.mark.parametrize("mode", LOSS_TYPES)
def test_padding_does_not_affect_loss(mode):
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # [N=2, T=3]
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.5, -0.5]], requires_grad=True)
    old_logp = torch.tensor([[-1.1, -1.9, -0.5], [-0.2, -0.5, -0.5]])
    adv = torch.tensor([[0.5, 0.5, 0.0], [-1.0, 0.0, 0.0]])
    norm = Normaliser.from_mask(mask, max_completion_length=3)

    def loss_and_grad(logp, old_logp, adv):
        per_token = clipped_surrogate(logp, old_logp, adv, eps_low=0.2).per_token_loss
        loss = aggregate(per_token, mask, mode, norm)
        return loss, torch.autograd.grad(loss, logp)[0]

    loss, grad = loss_and_grad(logp, old_logp, adv)
    pad = mask == 0
    junk = (
        logp.detach().masked_fill(pad, 3.0).requires_grad_(True),  # ratio e^5 = 148 there
        old_logp.masked_fill(pad, -2.0),
        adv.masked_fill(pad, 7.0),
    )
    junk_loss, junk_grad = loss_and_grad(*junk)
    assert_close(junk_loss, loss)
    assert_close(junk_grad, grad)
    assert torch.equal(junk_grad[pad], torch.zeros(3))


def test_sequence_ratio():
    # row 0: logp - old_logp = [0.2, 0.4] on real tokens, mean 0.3, ratio e^0.3 = 1.349859;
    # row 1 has no real token: ratio 1.
    logp = torch.tensor([[0.2, 0.4, 9.0], [5.0, 5.0, 5.0]])  # [N=2, T=3]
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])  # [N=2, T=3]
    ratio = sequence_ratio(logp, torch.zeros_like(logp), mask)
    assert_close(ratio, torch.tensor([[math.exp(0.3)], [1.0]]))
    assert ratio[0].item() == pytest.approx(1.349859)


# Three completions of lengths 3, 2 and 0 (T = 4); padding holds junk, inf and NaN.
PER_TOKEN = torch.tensor(
    [[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, math.inf, 100.0], [math.nan, 100.0, 100.0, 100.0]]
)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])


def test_normaliser_from_mask():
    assert Normaliser.from_mask(MASK, max_completion_length=4) == Normaliser(3.0, 5.0, 4)


def test_aggregate_hand_values():
    norm = Normaliser.from_mask(MASK, max_completion_length=4)
    # grpo: row means (1+2+3)/3 = 2 and (4+5)/2 = 4.5, the empty row adds 0;
    #   (2 + 4.5 + 0) / 3 completions = 2.166667
    assert_close(aggregate(PER_TOKEN, MASK, "grpo", norm), torch.tensor(6.5 / 3))
    # token_mean: (6 + 9) / 5 tokens = 3.0
    assert_close(aggregate(PER_TOKEN, MASK, "token_mean", norm), torch.tensor(3.0))
    # dr_grpo: 15 / (3 completions * 4 max tokens) = 1.25
    assert_close(aggregate(PER_TOKEN, MASK, "dr_grpo", norm), torch.tensor(1.25))


def test_aggregate_rejects_unknown_mode():
    norm = Normaliser.from_mask(MASK, max_completion_length=4)
    with pytest.raises(ValueError, match=r"mode.*'grpo', 'token_mean', 'dr_grpo'.*'bnpo'"):
        aggregate(PER_TOKEN, MASK, "bnpo", norm)


def test_mu1_gradient_equals_single_step_objective():
    # With old_logp = logp.detach() the ratio is exactly 1 and the clipped loss plus
    # beta * k3, aggregated the paper's way, must have the gradient of the seed's objective
    # J = (1/G) sum_i 1/|o_i| sum_t [A_i * logp_it - beta * k3_it], written here as a loop.
    # (Only gradients match: the surrogate's value holds ratio * A = A, not A * logp.)
    gen = torch.Generator().manual_seed(0)
    G, T, V, beta = 3, 4, 7, 0.04
    logits = torch.randn(G, T, V, generator=gen).requires_grad_(True)  # [N=G, T, V]
    targets = torch.randint(0, V, (G, T), generator=gen)  # [N, T]
    ref_logits = torch.randn(G, T, V, generator=gen)  # [N, T, V]
    ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, targets[..., None])[..., 0]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])  # [N, T]
    adv = group_advantages(torch.tensor([[1.0, 0.0, 1.0]]))  # [B=1, G]

    logp = token_logp(logits, targets)  # [N, T]
    out = clipped_surrogate(logp, logp.detach(), expand_to_tokens(adv, mask), eps_low=0.2)
    assert torch.equal(out.ratio, torch.ones(G, T))
    per_token = out.per_token_loss + beta * kl_divergence(logp, ref_logp, "k3")
    loss = aggregate(per_token, mask, "grpo", Normaliser.from_mask(mask, T))
    (grad,) = torch.autograd.grad(loss, logits)

    seed_logits = logits.detach().clone().requires_grad_(True)
    objective = 0.0
    for i in range(G):
        length = int(mask[i].sum())
        total = 0.0
        for t in range(length):
            lp = torch.log_softmax(seed_logits[i, t], dim=-1)[targets[i, t]]
            d = ref_logp[i, t] - lp
            total = total + adv[0, i] * lp - beta * (torch.exp(d) - d - 1)
        objective = objective + total / length
    seed_loss = -objective / G
    (seed_grad,) = torch.autograd.grad(seed_loss, seed_logits)

    assert_close(grad, seed_grad)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("mode", LOSS_TYPES)
def test_gradient_accumulation_is_exact(mode):
    gen = torch.Generator().manual_seed(2)
    N, T, V, beta = 4, 5, 6, 0.1
    logits = torch.randn(N, T, V, generator=gen).requires_grad_(True)  # [N, T, V]
    targets = torch.randint(0, V, (N, T), generator=gen)  # [N, T]
    old_logp = token_logp(logits.detach() + 0.3 * torch.randn(N, T, V, generator=gen), targets)
    ref_logp = token_logp(torch.randn(N, T, V, generator=gen), targets)  # [N, T]
    adv = torch.randn(N, T, generator=gen)  # [N, T]
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [0] * 5, [1, 1, 0, 0, 0]])  # [N, T]
    norm = Normaliser.from_mask(mask, max_completion_length=T)

    def loss_of(rows, norm):
        logp = token_logp(logits[rows], targets[rows])  # [n, T]
        out = clipped_surrogate(logp, old_logp[rows], adv[rows], eps_low=0.2, eps_high=0.28)
        per_token = out.per_token_loss + beta * kl_divergence(logp, ref_logp[rows])
        return aggregate(per_token, mask[rows], mode, norm)

    full = loss_of(slice(0, N), norm)
    (full_grad,) = torch.autograd.grad(full, logits)

    micro_batches = [slice(0, 1), slice(1, 4)]  # uneven on purpose
    accumulated = sum(loss_of(rows, norm) for rows in micro_batches)
    (accumulated_grad,) = torch.autograd.grad(accumulated, logits)
    assert_close(accumulated, full)
    assert_close(accumulated_grad, full_grad)

    # Micro-batch-local normalisers would not be exact: the full batch's are needed.
    local = sum(loss_of(r, Normaliser.from_mask(mask[r], T)) for r in micro_batches)
    assert not torch.allclose(local, full)
