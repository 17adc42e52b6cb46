"""The prompt run once per group (Prefix Grouper) gives the plain path's numbers."""

import pytest
import torch
from conftest import DEVICES

from grpo.logprobs import completion_logp, shared_prefix_logp
from grpo.modeling import build_char_tokenizer, build_tiny_model


@pytest.fixture(scope="module", params=DEVICES)
def model(request):
    tok = build_char_tokenizer()
    m = build_tiny_model(tok, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    return m.to(request.param).train()  # gradients as in training (no dropout here)


def grouped_batch(b=3, g=4, p=7, t=5, device="cpu"):
    """b groups of g rows: a shared, differently left-padded prompt; uneven completions."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 90, (b * g, p + t), generator=gen)  # [N, P + T]
    mask = torch.ones(b * g, p + t, dtype=torch.long)  # [N, P + T]
    for k in range(b):
        rows = slice(k * g, (k + 1) * g)
        ids[rows, :p] = ids[k * g, :p]  # one prompt per group
        mask[rows, :k] = 0  # group k's prompt has k pad tokens on the left
    mask[1, -2:] = 0  # two completions shorter than T (right padding)
    mask[5, -1:] = 0
    return ids.to(device), mask.to(device), torch.arange(b, device=device).repeat_interleave(g), t


def run(fn, model, *args):
    model.zero_grad()
    logp, entropy = fn(model, *args)
    ids, mask = args[0], args[1]
    t = args[2]
    weights = torch.linspace(-1, 1, ids.shape[0], device=ids.device)[:, None] * mask[:, -t:]
    (logp * weights).sum().backward()
    return logp, entropy, [p.grad.clone() for p in model.parameters()]


def test_same_logp_entropy_and_gradients(model):
    ids, mask, groups, t = grouped_batch(device=model.device)
    plain = run(completion_logp, model, ids, mask, t, 0.7, True)
    shared = run(
        lambda m, *a: shared_prefix_logp(m, a[0], a[1], a[2], groups, 0.7, True),
        model,
        ids,
        mask,
        t,
    )
    real = mask[:, -t:].bool()  # padded completion positions hold values the mask removes
    torch.testing.assert_close(shared[0][real], plain[0][real])
    torch.testing.assert_close(shared[1][real], plain[1][real])
    for a, b in zip(shared[2], plain[2], strict=True):
        torch.testing.assert_close(a, b)


def test_groups_of_one_and_a_partial_group(model):
    """A micro-batch may hold a group's tail: each run of equal ids is one prompt."""
    ids, mask, groups, t = grouped_batch(device=model.device)
    rows = slice(2, 9)  # the last 2 rows of group 0, all of group 1, 1 row of group 2
    plain, _ = completion_logp(model, ids[rows], mask[rows], t)
    shared, _ = shared_prefix_logp(model, ids[rows], mask[rows], t, groups[rows])
    real = mask[rows, -t:].bool()
    torch.testing.assert_close(shared[real], plain[real])


@pytest.mark.parametrize("share_prompt", [True, False])
def test_length_buckets_give_the_same_numbers(model, share_prompt, monkeypatch):
    from grpo import logprobs
    from grpo.logprobs import batch_logp, length_buckets
    from grpo.types import Batch

    monkeypatch.setattr(logprobs, "CALL_POSITIONS", 0)  # calls are free: only prompts cost
    seen = []
    monkeypatch.setattr(
        logprobs, "length_buckets", lambda *a: seen.append(length_buckets(*a)) or seen[-1]
    )
    ids, mask, groups, t = grouped_batch(b=2, g=4, p=5, t=8, device=model.device)
    mask[0, -6:] = 0  # lengths 2, 4, 8, 8 | 8, 3, 8, 1: padding worth trimming
    mask[1, -4:] = 0
    mask[5, -5:] = 0
    mask[7, -7:] = 0
    completion_mask = mask[:, -t:].float()
    batch = Batch(ids, mask, completion_mask, torch.zeros_like(completion_mask), group_ids=groups)
    out = {}
    for bucket in (False, True):
        model.zero_grad()
        logp, entropy = batch_logp(model, batch, 0.7, True, share_prompt, bucket=bucket)
        weights = torch.linspace(-1, 1, 8, device=model.device)[:, None] * batch.completion_mask
        (logp * weights).sum().backward()
        out[bucket] = (logp, entropy, [p.grad.clone() for p in model.parameters()])
    # lengths by row 2 4 8 8 | 8 3 8 1, sorted 1 2 3 4 8 8 8 8 (rows 7 0 5 1, then 2 3 4 6).
    # Shared prompts: each extra call reruns both 5-token prompts, 10 positions. One call
    # 8*8 = 64; cut after length 4: 4*4 + 4*8 + 10 = 58; after 2 and 4: 2*2 + 2*4 + 32 + 20
    # = 64; after 1 and 4: 1 + 3*4 + 32 + 20 = 65; more cuts cost more: two calls win.
    # Unshared: extra calls are free here, so each distinct length gets its own call.
    expected = [[0, 1, 5, 7], [2, 3, 4, 6]] if share_prompt else [[7], [0], [5], [1], [2, 3, 4, 6]]
    assert [[c.tolist() for c in chunks] for chunks in seen] == [expected]
    real = batch.completion_mask.bool()
    torch.testing.assert_close(out[True][0][real], out[False][0][real])
    torch.testing.assert_close(out[True][1][real], out[False][1][real])
    for a, b in zip(out[True][2], out[False][2], strict=True):
        torch.testing.assert_close(a, b)


def test_length_buckets_cost_equals_brute_force_minimum():
    """The dynamic programme finds the cheapest split: checked against every way of cutting
    the sorted rows into runs (cuts only between different lengths can help)."""
    import itertools

    from grpo.logprobs import length_buckets

    def cost(chunks, lengths, extra):
        return sum(len(c) * int(lengths[c].max()) for c in chunks) + extra * (len(chunks) - 1)

    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        lengths = torch.randint(1, 12, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g)
        extra = float(trial % 4) * 3.5
        values = sorted(set(lengths.tolist()))
        brute = min(
            sum(
                int((lengths > lo).logical_and(lengths <= hi).sum()) * hi
                for lo, hi in itertools.pairwise([0, *cuts, values[-1]])
            )
            + extra * len(cuts)
            for r in range(len(values))
            for cuts in itertools.combinations(values[:-1], r)
        )
        chunks = length_buckets(lengths, extra)
        assert sorted(torch.cat(chunks).tolist()) == list(range(len(lengths)))
        assert cost(chunks, lengths, extra) == brute


def test_critic_values_and_gradients_with_the_prompt_run_once():
    """PPO's value model on the shared prompt gives the full forward's values and gradients."""
    from grpo.algorithms.ppo import ValueModel

    tok = build_char_tokenizer()
    lm = build_tiny_model(tok, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    critic = ValueModel(lm.model).train()
    # a non-zero head (it starts at zero), small as a trained one: gradients of order 1
    torch.nn.init.normal_(critic.head.weight, std=0.02, generator=torch.Generator().manual_seed(1))
    ids, mask, groups, t = grouped_batch()
    out = {}
    for shared in (False, True):
        critic.zero_grad()
        values = critic(ids, mask, t, groups if shared else None)  # [N, T]
        weights = torch.linspace(-1, 1, ids.shape[0], device=ids.device)[:, None] * mask[:, -t:]
        (values * weights).sum().backward()
        out[shared] = (values, [p.grad.clone() for p in critic.parameters()])
    real = mask[:, -t:].bool()
    torch.testing.assert_close(out[True][0][real], out[False][0][real])
    for a, b in zip(out[True][1], out[False][1], strict=True):
        torch.testing.assert_close(a, b)
