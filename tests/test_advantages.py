"""Advantage estimators against hand-worked numbers and plain-loop re-implementations."""

import math

import pytest
import torch
from torch.testing import assert_close

from grpo.advantages import (
    expand_to_tokens,
    gae,
    group_advantages,
    kl_penalised_scores,
    process_advantages,
    rloo_advantages,
    whiten,
)

EPS = 1e-4
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])  # [B=2, G=4]


def test_group_advantages_per_group_std():
    # group 0, [1, 0, 0, 1]: mean 0.5, deviations +-0.5, Bessel var (4 * 0.25) / 3 = 1/3,
    #   std sqrt(1/3) = 0.577350, so A = +-0.5 / 0.577450 = +-0.865875
    # group 1, [1, 1, 1, 0]: mean 0.75, deviations 0.25 x3 and -0.75,
    #   var (3 * 0.0625 + 0.5625) / 3 = 0.25, std 0.5, so A = 0.25 / 0.5001 = 0.499900
    #   and -0.75 / 0.5001 = -1.499700
    a, b = 0.5 / (math.sqrt(1 / 3) + EPS), 0.25 / (0.5 + EPS)
    expected = torch.tensor([[a, -a, -a, a], [b, b, b, -3 * b]])
    assert_close(group_advantages(REWARDS), expected)
    assert_close(group_advantages(REWARDS, scale="group"), expected)


def test_group_advantages_batch_std():
    # All 8 rewards, five 1s and three 0s: mean 5/8 = 0.625, squared deviations
    # 5 * 0.375^2 + 3 * 0.625^2 = 0.703125 + 1.171875 = 1.875, var 1.875 / 7, std 0.517549.
    # The group mean is still subtracted: centred rewards as above, divided by 0.517649.
    s = math.sqrt(1.875 / 7) + EPS
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]]) / s
    # e.g. 0.5 / 0.517649 = 0.965905, -0.75 / 0.517649 = -1.448858
    assert_close(group_advantages(REWARDS, scale="batch"), expected)
    assert expected[0, 0].item() == pytest.approx(0.965905, abs=1e-6)


def test_group_advantages_no_scaling():
    # Dr. GRPO: only the group mean (0.5, then 0.75) is subtracted.
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]])
    assert_close(group_advantages(REWARDS, scale="none"), expected)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_rewards_give_exact_zero(scale):
    # All correct, all wrong, and all 0.7: in float32 the mean of eight 0.7s is off by
    # 6e-8 and the std is 6e-8, so a naive (r - mean) / (std + eps) gives 6e-4, not 0.
    rewards = torch.tensor([[1.0] * 8, [0.0] * 8, [0.7] * 8, [1.0, 0, 0, 0, 0, 0, 0, 0]])
    adv = group_advantages(rewards, scale=scale)
    assert torch.equal(adv[:3], torch.zeros(3, 8))
    assert not adv.isnan().any()
    assert adv[3].abs().sum() > 0  # the one group with a signal keeps it


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"scale.*'group', 'batch', 'none'.*'std'"):
        group_advantages(REWARDS, scale="std")


def test_rloo_hand_example():
    # [1, 0, 0, 1]: completion 0 gets 1 - mean(0, 0, 1) = 1 - 1/3 = 2/3, completion 1
    # gets 0 - mean(1, 0, 1) = -2/3. [2, 4, 9]: 2 - 6.5 = -4.5, 4 - 5.5 = -1.5, 9 - 3 = 6.
    assert_close(
        rloo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]])),
        torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]]),
    )
    assert_close(
        rloo_advantages(torch.tensor([[2.0, 4.0, 9.0]])), torch.tensor([[-4.5, -1.5, 6.0]])
    )


def test_rloo_equals_leave_one_out_loop():
    rewards = torch.rand(3, 5, generator=torch.Generator().manual_seed(0))  # [B, G]
    expected = torch.zeros_like(rewards)
    for b in range(3):
        for i in range(5):
            others = [rewards[b, j].item() for j in range(5) if j != i]
            expected[b, i] = rewards[b, i].item() - sum(others) / len(others)
    assert_close(rloo_advantages(rewards), expected)


def test_process_advantages_two_completions_uneven_steps():
    # One group (G = 2), T = 6, K = 3 step slots.
    # completion 0: 2 steps, rewards [1, 0], ending at tokens 1 and 3 (slot 2 is padding,
    #   filled with junk that must be ignored).
    # completion 1: 3 steps, rewards [0, 1, 1], ending at tokens 0, 2 and 5.
    # Real step rewards R = {1, 0, 0, 1, 1}: mean 0.6, deviations +0.4 (x3) and -0.6 (x2),
    # Bessel var (3 * 0.16 + 2 * 0.36) / 4 = 0.3, std sqrt(0.3) = 0.547723, so a reward of
    # 1 becomes p = 0.4 / 0.547823 = 0.730163 and a 0 becomes n = -0.6 / 0.547823 = -1.095245.
    step_rewards = torch.tensor([[1.0, 0.0, 9.0], [0.0, 1.0, 1.0]])  # [N, K]
    step_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # [N, K]
    step_end = torch.tensor([[1, 3, 0], [0, 2, 5]])  # [N, K]
    p, n = 0.4 / (math.sqrt(0.3) + EPS), -0.6 / (math.sqrt(0.3) + EPS)
    # Token t sums the steps ending at or after t:
    # completion 0: t=0,1 -> both steps (p + n = -0.365082); t=2,3 -> n; t=4,5 -> none (0)
    # completion 1: t=0 -> all (n + 2p = 0.365082); t=1,2 -> 2p = 1.460327; t=3..5 -> p
    expected = torch.tensor([[p + n, p + n, n, n, 0.0, 0.0], [n + 2 * p, 2 * p, 2 * p, p, p, p]])
    adv = process_advantages(step_rewards, step_mask, step_end, group_size=2, completion_length=6)
    assert_close(adv, expected)


def test_process_advantages_degenerate_groups_are_zero():
    # group 0: one real step in the whole group (std undefined); group 1: all step
    # rewards equal (0.7 three times); group 2: a real signal, [1] vs [0], normalised
    # to +-0.5 / (sqrt(0.5) + eps) = +-0.707007 on every token up to the step's end.
    step_rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.7, 0.7], [0.7, 0.0], [1, 0], [0, 0]])
    step_mask = torch.tensor([[1, 0], [0, 0], [1, 1], [1, 0], [1, 0], [1, 0]])
    step_end = torch.tensor([[2, 0], [0, 0], [0, 2], [1, 0], [1, 0], [2, 0]])
    adv = process_advantages(step_rewards, step_mask, step_end, group_size=2, completion_length=3)
    assert torch.equal(adv[:4], torch.zeros(4, 3))
    a = 0.5 / (math.sqrt(0.5) + EPS)
    assert_close(adv[4:], torch.tensor([[a, a, 0.0], [-a, -a, -a]]))


def test_process_advantages_equal_loop():
    gen = torch.Generator().manual_seed(1)
    group_size, num_steps, length = 3, 4, 7
    step_rewards = torch.rand(2 * group_size, num_steps, generator=gen)  # [N, K]
    counts = [4, 1, 2, 3, 0, 2]  # real steps per completion
    step_mask = torch.tensor([[int(k < c) for k in range(num_steps)] for c in counts])
    step_end = torch.sort(torch.randint(0, length, (6, num_steps), generator=gen), 1).values
    expected = torch.zeros(6, length)
    for g in range(2):
        rows = range(g * group_size, (g + 1) * group_size)
        real = [step_rewards[i, k] for i in rows for k in range(counts[i])]
        mean, std = torch.stack(real).mean(), torch.stack(real).std()
        for i in rows:
            for t in range(length):
                for k in range(counts[i]):
                    if step_end[i, k] >= t:
                        expected[i, t] += (step_rewards[i, k] - mean) / (std + EPS)
    adv = process_advantages(step_rewards, step_mask, step_end, group_size, length)
    assert_close(adv, expected)


def test_expand_to_tokens():
    adv = torch.tensor([[1.5, -0.5]])  # [B=1, G=2]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # [N=2, T=3]
    assert_close(expand_to_tokens(adv, mask), torch.tensor([[1.5, 1.5, 0.0], [-0.5, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="N=3"):
        expand_to_tokens(adv, torch.ones(3, 2))


def test_gae_hand_trajectory():
    # gamma 0.9, lam 0.8, so gamma * lam = 0.72.
    # row 0, three real tokens: r = [0, 0, 1], V = [0.5, 0.6, 0.7], V after the end = 0
    #   delta_2 = 1 + 0.9 * 0 - 0.7 = 0.3          A_2 = 0.3
    #   delta_1 = 0 + 0.9 * 0.7 - 0.6 = 0.03       A_1 = 0.03 + 0.72 * 0.3 = 0.246
    #   delta_0 = 0 + 0.9 * 0.6 - 0.5 = 0.04       A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    #   returns A + V = [0.71712, 0.846, 1.0]
    # row 1, two real tokens then junk padding: r = [0, 1], V = [0.5, 0.6]
    #   delta_1 = 1 - 0.6 = 0.4                   A_1 = 0.4
    #   delta_0 = 0.9 * 0.6 - 0.5 = 0.04          A_0 = 0.04 + 0.72 * 0.4 = 0.328
    #   returns [0.828, 1.0], padding 0
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])  # [N, T]
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]])  # [N, T]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # [N, T]
    adv, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3], [0.328, 0.4, 0.0]]))
    assert_close(returns, torch.tensor([[0.71712, 0.846, 1.0], [0.828, 1.0, 0.0]]))


def test_whiten():
    # Real values 1, 2, 3, 4: mean 2.5, Bessel var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3,
    # std 1.290994: whitened -1.161895, -0.387298, 0.387298, 1.161895; padding 0.
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])  # [N, T]
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])  # [N, T]
    s = math.sqrt(5 / 3 + 1e-8)
    expected = torch.tensor([[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]])
    assert_close(whiten(x, mask), expected)
    # shift_mean=False adds the mean 2.5 back to the real entries.
    assert_close(whiten(x, mask, shift_mean=False), expected + 2.5 * mask)


def test_kl_penalised_scores_then_rloo():
    # beta 0.1. row 0, two real tokens: logp - ref = [-1 + 1.5, -2 + 1] = [0.5, -1.0], sum -0.5,
    #   1 - 0.1 * -0.5 = 1.05 (the NaN on padding does not count)
    # row 1, three: [-0.5 + 1, -0.5 + 1, -0.5 + 0.7] = [0.5, 0.5, 0.2], sum 1.2, 0 - 0.12 = -0.12
    scores = torch.tensor([1.0, 0.0])  # [N]
    logp = torch.tensor([[-1.0, -2.0, math.nan], [-0.5, -0.5, -0.5]])  # [N, T]
    ref_logp = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, -1.0, -0.7]])  # [N, T]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # [N, T]
    penalised = kl_penalised_scores(scores, logp, ref_logp, mask, beta=0.1)
    assert_close(penalised, torch.tensor([1.05, -0.12]))
    # As one group of G = 2 for RLOO: A = [1.05 - -0.12, -0.12 - 1.05] = [1.17, -1.17]
    assert_close(rloo_advantages(penalised.reshape(1, 2)), torch.tensor([[1.17, -1.17]]))
