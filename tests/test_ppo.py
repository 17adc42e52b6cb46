"""PPO-with-a-critic pieces against hand-worked numbers, and the value model against a
plain per-row computation."""

import math

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModel

from grpo.advantages import gae, kl_penalised_token_rewards
from grpo.algorithms.ppo import VALUE_HEAD_FILE, ValueModel
from grpo.losses import Normaliser, unclipped_surrogate, value_loss
from grpo.modeling import build_char_tokenizer

NAN = math.nan


def test_gae_on_kl_penalised_rewards_hand_trajectory():
    # One completion of 3 tokens, score 1, beta 0.1, gamma 1, lambda 0.95.
    # logp - ref_logp = [-1.0 + 1.2, -0.5 + 0.5, -2.0 + 1.5] = [0.2, 0.0, -0.5]
    # rewards -0.1 * that = [-0.02, 0.0, 0.05], + score 1 on the last token: [-0.02, 0.0, 1.05]
    # V = [0.2, 0.3, 0.4], V after the end = 0; gamma * lambda = 0.95
    #   delta_2 = 1.05 + 0 - 0.4 = 0.65           A_2 = 0.65
    #   delta_1 = 0.0 + 0.4 - 0.3 = 0.1           A_1 = 0.1 + 0.95 * 0.65 = 0.7175
    #   delta_0 = -0.02 + 0.3 - 0.2 = 0.08        A_0 = 0.08 + 0.95 * 0.7175 = 0.761625
    #   returns A + V = [0.961625, 1.0175, 1.05]
    logp = torch.tensor([[-1.0, -0.5, -2.0]])  # [N=1, T=3]
    ref_logp = torch.tensor([[-1.2, -0.5, -1.5]])  # [N, T]
    mask = torch.ones(1, 3)  # [N, T]
    rewards = kl_penalised_token_rewards(torch.tensor([1.0]), logp, ref_logp, mask, beta=0.1)
    assert_close(rewards, torch.tensor([[-0.02, 0.0, 1.05]]))
    values = torch.tensor([[0.2, 0.3, 0.4]])  # [N, T]
    adv, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert_close(adv, torch.tensor([[0.761625, 0.7175, 0.65]]))
    assert_close(returns, torch.tensor([[0.961625, 1.0175, 1.05]]))


def test_kl_penalised_token_rewards_score_on_last_real_token():
    # beta 0.2. row 0, 3 real tokens: logp - ref = [0.5, -1.0, 0.0], rewards
    #   -0.2 * that = [-0.1, 0.2, 0.0], score 2 on token 2: [-0.1, 0.2, 2.0]
    # row 1, 1 real token: logp - ref = 1.0, reward -0.2, score -1 on token 0: -1.2;
    #   NaN padding contributes 0
    # row 2, no real token: nothing, not even its score 5
    scores = torch.tensor([2.0, -1.0, 5.0])  # [N]
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, NAN, NAN], [NAN, NAN, NAN]])  # [N, T]
    ref_logp = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # [N, T]
    rewards = kl_penalised_token_rewards(scores, logp, ref_logp, mask, beta=0.2)
    expected = torch.tensor([[-0.1, 0.2, 2.0], [-1.2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert_close(rewards, expected)


# Five real tokens, clip range 0.2, and one padded entry that must not count:
#   a) V 1.5, old 1.0, R 2.0: clip(V) = 1.2, (1.5-2)^2 = 0.25 < (1.2-2)^2 = 0.64 -> 0.64, clipped
#   b) V 1.5, old 1.0, R 0.0: clip(V) = 1.2, (1.5)^2 = 2.25 > (1.2)^2 = 1.44      -> 2.25
#   c) V 0.5, old 0.4, R 1.0: inside [0.2, 0.6], both 0.25                         -> 0.25
#   d) V -1.0, old 0.0, R 0.0: clip(V) = -0.2, 1.0 > 0.04                          -> 1.0
#   e) V 0.0, old 1.0, R 0.0: clip(V) = 0.8, 0.0 < 0.64                            -> 0.64, clipped
VALUES = torch.tensor([[1.5, 1.5, 0.5], [-1.0, 0.0, 100.0]])  # [N, T]
OLD_VALUES = torch.tensor([[1.0, 1.0, 0.4], [0.0, 1.0, 0.0]])  # [N, T]
RETURNS = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # [N, T]
VALUE_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])  # [N, T]


def test_value_loss_clipped_by_hand():
    # 0.5 * (0.64 + 2.25 + 0.25 + 1.0 + 0.64) / 5 = 0.5 * 4.78 / 5 = 0.478; clipped 2 of 5
    values = VALUES.clone().requires_grad_()
    out = value_loss(values, OLD_VALUES, RETURNS, VALUE_MASK, clip_range=0.2)
    assert_close(out.loss, torch.tensor(0.478))
    assert_close(out.clip_frac, torch.tensor(0.4))
    # Gradient 0.5 * 2 * (V - R) / 5 where the unclipped term wins, 0 where the clip wins:
    # b) 1.5 / 5 = 0.3, c) -0.5 / 5 = -0.1, d) -1.0 / 5 = -0.2; a), e) and padding 0
    out.loss.backward()
    assert_close(values.grad, torch.tensor([[0.0, 0.3, -0.1], [-0.2, 0.0, 0.0]]))


def test_value_loss_unclipped_by_hand():
    # 0.5 * (0.25 + 2.25 + 0.25 + 1.0 + 0.0) / 5 = 0.5 * 3.75 / 5 = 0.375; nothing clipped
    out = value_loss(VALUES, OLD_VALUES, RETURNS, VALUE_MASK, clip_range=None)
    assert_close(out.loss, torch.tensor(0.375))
    assert_close(out.clip_frac, torch.tensor(0.0))
    with pytest.raises(ValueError, match="clip_range"):
        value_loss(VALUES, OLD_VALUES, RETURNS, VALUE_MASK, clip_range=-0.1)


def test_value_loss_micro_batches_sum_to_the_batch():
    norm = Normaliser.from_mask(VALUE_MASK, 3)  # 5 real tokens
    whole = value_loss(VALUES, OLD_VALUES, RETURNS, VALUE_MASK, 0.2).loss
    parts = [value_loss(VALUES[i : i + 1], OLD_VALUES[i : i + 1], RETURNS[i : i + 1],
                        VALUE_MASK[i : i + 1], 0.2, norm).loss for i in range(2)]  # fmt: skip
    # row 0: 0.5 * (0.64 + 2.25 + 0.25) / 5 = 0.314, row 1: 0.5 * (1.0 + 0.64) / 5 = 0.164
    assert_close(torch.stack(parts), torch.tensor([0.314, 0.164]))
    assert_close(sum(parts), whole)


def test_unclipped_surrogate_is_reinforce_at_mu_1():
    # logp from logits theta so the gradient goes through a real log-softmax.
    theta = torch.tensor([[0.1, -0.3, 0.7], [1.0, 0.0, -1.0]], requires_grad=True)  # [N, V]
    tokens = torch.tensor([[2, 0], [1, 1]])  # [N, T]
    adv = torch.tensor([[1.5, 1.5], [-0.5, 0.0]])  # [N, T]
    logp = torch.log_softmax(theta, dim=-1).gather(1, tokens)  # [N, T]
    per_token = unclipped_surrogate(logp, logp.detach(), adv)  # [N, T]
    assert_close(per_token, -adv)  # ratio exactly 1
    (grad,) = torch.autograd.grad(per_token.sum(), theta, retain_graph=True)
    (reinforce_grad,) = torch.autograd.grad((-adv * logp).sum(), theta)
    assert_close(grad, reinforce_grad)


def test_unclipped_surrogate_does_not_clip():
    # logp 0, old_logp -1: ratio e = 2.718282; A = 2 -> loss -2e = -5.436564, where PPO's
    # clip at 1.2 would give -2.4.
    loss = unclipped_surrogate(torch.tensor([[0.0]]), torch.tensor([[-1.0]]), torch.tensor([[2.0]]))
    assert_close(loss, torch.tensor([[-2 * math.e]]))


# ---- ValueModel on the tiny Llama (conftest.tiny_model_dir) ----


def _rows(tokenizer, pairs):
    """Left-padded prompts + right-padded completions as [N, P + T] ids and mask."""
    encoded = [
        (tokenizer(p)["input_ids"], tokenizer(c)["input_ids"] + [tokenizer.eos_token_id])
        for p, c in pairs
    ]
    p_max = max(len(p) for p, _ in encoded)
    t_max = max(len(c) for _, c in encoded)
    pad = tokenizer.pad_token_id
    ids, mask = [], []
    for p, c in encoded:
        left, right = p_max - len(p), t_max - len(c)
        ids.append([pad] * left + p + c + [pad] * right)
        mask.append([0] * left + [1] * (len(p) + len(c)) + [0] * right)
    return torch.tensor(ids), torch.tensor(mask), t_max, encoded


PAIRS = [("12+30=", "42"), ("7=", "7"), ("1+1=", "2+0")]


@pytest.fixture
def value_model(tiny_model_dir):
    model = ValueModel.from_pretrained(tiny_model_dir)
    model.eval()
    return model


def _randomise_head(model):
    torch.manual_seed(0)
    with torch.no_grad():
        model.head.weight.normal_()
        model.head.bias.fill_(0.3)


def test_value_model_starts_at_zero(value_model):
    ids, mask, t, _ = _rows(build_char_tokenizer(), PAIRS)
    values = value_model(ids, mask, t)  # [N, T]
    assert values.shape == (3, t) and values.dtype == torch.float32
    assert torch.equal(values, torch.zeros(3, t))
    hidden = value_model.backbone.config.hidden_size
    assert value_model.num_parameters() == value_model.backbone.num_parameters() + hidden + 1


def test_value_model_matches_per_row_backbone(value_model, tiny_model_dir):
    tok = build_char_tokenizer()
    _randomise_head(value_model)
    ids, mask, t, encoded = _rows(tok, PAIRS)
    values = value_model(ids, mask, t)  # [N, T]
    backbone = AutoModel.from_pretrained(str(tiny_model_dir)).eval()
    w, b = value_model.head.weight[0], value_model.head.bias[0]  # [H], []
    for i, (p, c) in enumerate(encoded):
        # No padding at all: the state before completion token j is prompt + c[:j],
        # whose last hidden state sits at position len(p) - 1 + j.
        hidden = backbone(torch.tensor([p + c])).last_hidden_state[0]  # [len(p + c), H]
        expected = torch.stack([hidden[len(p) - 1 + j] @ w + b for j in range(len(c))])
        assert_close(values[i, : len(c)], expected)


def test_value_model_row_independent_of_batch_padding(value_model):
    tok = build_char_tokenizer()
    _randomise_head(value_model)
    ids, mask, t, _ = _rows(tok, PAIRS)
    batched = value_model(ids, mask, t)  # [N, T]
    for i, pair in enumerate(PAIRS):
        alone_ids, alone_mask, alone_t, _ = _rows(tok, [pair])
        alone = value_model(alone_ids, alone_mask, alone_t)  # [1, T_i]
        assert_close(batched[i, :alone_t], alone[0])


def test_value_model_save_load_round_trip(value_model, tmp_path):
    ids, mask, t, _ = _rows(build_char_tokenizer(), PAIRS)
    _randomise_head(value_model)
    expected = value_model(ids, mask, t)  # [N, T]
    value_model.save_pretrained(tmp_path / "critic")
    assert (tmp_path / "critic" / VALUE_HEAD_FILE).is_file()
    loaded = ValueModel.from_pretrained(tmp_path / "critic").eval()
    assert_close(loaded(ids, mask, t), expected)
    assert loaded.head.weight.abs().sum() > 0


def test_value_model_gradients(value_model):
    ids, mask, t, _ = _rows(build_char_tokenizer(), PAIRS)
    completion_mask = mask[:, -t:]  # [N, T]
    # At zero init only the head learns: d V / d hidden is the head's weight, 0.
    (value_model(ids, mask, t) * completion_mask).sum().backward()
    assert value_model.head.weight.grad.abs().sum() > 0
    assert value_model.head.bias.grad == completion_mask.sum()  # d V / d bias = 1 per token
    assert all(p.grad is None or not p.grad.any() for p in value_model.backbone.parameters())
    # Once the head has moved, every backbone parameter gets a gradient.
    _randomise_head(value_model)
    value_model.zero_grad()
    (value_model(ids, mask, t) * completion_mask).sum().backward()
    for name, p in value_model.backbone.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_non_finite_critic_step_is_not_applied_and_is_counted(tiny_model_dir, tmp_path):
    from test_trainer import make_cfg, make_trainer

    from grpo.types import Batch

    t = make_trainer(make_cfg(tiny_model_dir, tmp_path, "algorithm.name=ppo", "algorithm.beta=0"))
    scored, _ = t.sample_round(2)
    batch = Batch.from_rollout(scored.rollout)
    t.algorithm.prepare(batch, scored, micro_size=8)
    critic = t.algorithm.critic
    before = {k: v.clone() for k, v in critic.model.state_dict().items()}
    finite = batch.extras["returns"].clone()  # [N, T]
    batch.extras["returns"][0, 0] = NAN
    out = critic.update(batch, 8)
    assert math.isnan(out["value_loss"]) and out["value_nonfinite_skipped"] == 1.0
    for k, v in critic.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert critic.optimizer.state == {} and critic.scheduler.last_epoch == 0
    assert (critic.nonfinite.skipped, critic.nonfinite.in_a_row) == (1, 1)
    batch.extras["returns"] = finite
    out = critic.update(batch, 8)  # a finite one is applied and ends the run of skips
    assert out["value_nonfinite_skipped"] == 0.0 and critic.scheduler.last_epoch == 1
    assert not torch.equal(critic.model.head.weight, before["head.weight"])
    assert (critic.nonfinite.skipped, critic.nonfinite.in_a_row) == (1, 0)
