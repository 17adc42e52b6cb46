"""RLOO, PPO, process supervision and the variants, through the real training step."""

import math

import pytest
import torch
from test_trainer import distinct_chars, make_cfg

from grpo.advantages import informative_groups
from grpo.algorithms import ALGORITHMS, build_algorithm
from grpo.algorithms.objective import policy_loss
from grpo.config import build_config
from grpo.losses import Normaliser
from grpo.rewards.shaping import overlong_penalty
from grpo.runtime import Runtime
from grpo.trainer import GRPOTrainer
from grpo.types import Batch, Rollout, Scored


def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def test_overlong_penalty_by_hand():
    # L_max 20, buffer 4: free up to 16 tokens, then -1/4 per token, -1 at 20
    got = overlong_penalty(torch.tensor([3, 16, 17, 19, 20]), max_length=20, buffer=4)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.25, -0.75, -1.0]))
    assert overlong_penalty(torch.tensor([20]), 20, buffer=0).item() == 0.0


def test_informative_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5]])
    assert informative_groups(rewards).tolist() == [False, True, False]


def _one_group_batch(mask):
    n, t = mask.shape
    rollout = Rollout(
        prompt_ids=torch.ones(1, 2, dtype=torch.long),
        prompt_mask=torch.ones(1, 2, dtype=torch.long),
        completion_ids=torch.ones(n, t, dtype=torch.long),
        completion_mask=mask.long(),
        sample_logp=torch.zeros(n, t),
        truncated=torch.zeros(n, dtype=torch.bool),
        group_size=n,
    )
    return rollout, Batch.from_rollout(rollout)


def test_rloo_puts_kl_in_the_reward_by_hand():
    cfg = build_config(
        overrides=["algorithm.name=rloo", "algorithm.beta=0.5", "rollout.num_generations=3"]
    )
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    rollout, batch = _one_group_batch(mask)
    batch.old_logp = torch.tensor([[-1.0, -1.0], [-2.0, 9.0], [-1.0, -3.0]])
    batch.ref_logp = torch.tensor([[-2.0, -1.0], [-2.0, 0.0], [-1.0, -1.0]])
    scored = Scored([{}], rollout, [[]] * 3, [""] * 3, torch.tensor([[1.0, 0.0, 1.0]]))
    build_algorithm(cfg, Runtime(torch.device("cpu")), None).prepare(batch, scored, 3)
    # KL_i = sum (old - ref): 1, 0 (padding ignored), -2; shaped r = r - 0.5 KL = 0.5, 0, 2
    # leave-one-out: 0.5 - (0+2)/2 = -0.5; 0 - (0.5+2)/2 = -1.25; 2 - (0.5+0)/2 = 1.75
    want = torch.tensor([[-0.5, -0.5], [-1.25, 0.0], [1.75, 1.75]])
    torch.testing.assert_close(batch.advantages, want)


def test_gspo_gives_every_token_of_a_completion_one_ratio(tiny_model_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, tmp_path, "algorithm.importance_sampling_level=sequence",
                   "algorithm.beta=0")  # fmt: skip
    t = GRPOTrainer(cfg, reward_functions=[distinct_chars])
    rollout = t.engine.generate(t.model, [t.prompt_ids[0]], t.sampling, t.generator)
    batch = Batch.from_rollout(rollout)
    mask = batch.completion_mask  # [N, T]
    batch.advantages = mask.clone()  # A = 1 on every real token
    logp, _ = t.policy.logp(batch)  # [N, T]
    batch.old_logp = logp.detach() + torch.linspace(-0.6, 0.6, logp.shape[1])  # ratios differ
    norm = Normaliser.from_mask(mask, 8)
    out = policy_loss(logp, None, batch, t.algorithm, cfg.algorithm, norm)
    # GSPO: r_i = exp(mean over i's tokens of (logp - old_logp)); with A = 1 each token's
    # objective is min(r_i, clip(r_i, 0.8, 1.2)), so the per-completion mean is that value too
    # and the paper's aggregation gives -mean_i min(r_i, clip(r_i))
    seq = ((logp - batch.old_logp) * mask).sum(1) / mask.sum(1)  # [N]
    r = seq.exp()
    want = -torch.minimum(r, r.clamp(0.8, 1.2)).mean()
    torch.testing.assert_close(out.loss, want)


def run_steps(tiny_model_dir, tmp_path, *extra, rewards=(distinct_chars,)):
    t = GRPOTrainer(make_cfg(tiny_model_dir, tmp_path, *extra), reward_functions=list(rewards))
    return t, [t.train_step() for _ in range(2)]


def test_rloo_trains_without_clipping(tiny_model_dir, tmp_path):
    _, history = run_steps(tiny_model_dir, tmp_path, "algorithm.name=rloo")
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert "clip_ratio/low_mean" not in history[0] and "kl" in history[0]


def test_ppo_trains_a_critic_and_costs_more_memory(tiny_model_dir, tmp_path):
    grpo, grpo_hist = run_steps(tiny_model_dir, tmp_path / "g")
    ppo, ppo_hist = run_steps(tiny_model_dir, tmp_path / "p", "algorithm.name=ppo")
    assert all(torch.isfinite(torch.tensor(h["value_loss"])) for h in ppo_hist)
    assert ppo.algorithm.critic.model.head.weight.abs().sum() > 0  # the head left zero
    # GRPO: policy + reference weights + AdamW's two moments of the policy = 4 copies;
    # PPO adds a critic of the same backbone with its own two moments: 7 copies (roughly)
    g, p = (
        grpo_hist[-1]["memory/model_and_optimizer_bytes"],
        ppo_hist[-1]["memory/model_and_optimizer_bytes"],
    )
    params = list(grpo.model.parameters())
    n_bytes = sum(x.numel() * 4 for x in params)
    assert g == 4 * n_bytes + 4 * len(params)  # + AdamW's float32 step counter per tensor
    assert p > 1.5 * g


def test_process_supervision_with_the_step_verifier(tiny_model_dir, tmp_path):
    _, history = run_steps(tiny_model_dir, tmp_path, "algorithm.advantage=process",
                           "rollout.max_completion_length=12")  # fmt: skip
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def first_group_only(prompts, completions, **kwargs):
    """Spread in the first group of each scoring call (G = 4), all-equal rewards elsewhere."""
    return [len(set(c)) / 8 if i < 4 else 1.0 for i, c in enumerate(completions)]


@pytest.mark.parametrize(("refills", "kept", "drawn"), [(0, 1, 2), (3, 2, 4)])
def test_dynamic_sampling_keeps_only_informative_groups(
    tiny_model_dir, tmp_path, refills, kept, drawn
):
    """B = 2, one informative group per round: one round keeps 1 group; with refills the
    second round fills the batch (2 groups) and no third round is drawn."""
    cfg = make_cfg(
        tiny_model_dir, tmp_path, "algorithm.dynamic_sampling=true",
        f"algorithm.max_refills={refills}",
    )  # fmt: skip
    t = GRPOTrainer(cfg, reward_functions=[first_group_only])
    metrics = t.train_step()
    assert metrics["dynamic_sampling/groups_kept"] == kept
    assert t.sampler.state_dict()["position"] == drawn
    assert metrics["frac_reward_zero_std"] == 0.5  # the first round's: one flat group of two


def test_dynamic_sampling_stops_with_a_clear_message(tiny_model_dir, tmp_path):
    t = GRPOTrainer(
        make_cfg(
            tiny_model_dir, tmp_path, "algorithm.dynamic_sampling=true", "algorithm.max_refills=2"
        ),
        reward_functions=[constant],
    )
    drawn = t.sampler.state_dict()
    with pytest.raises(RuntimeError, match="no group with differing rewards in 3 rounds"):
        t.train_step()
    assert t.sampler.state_dict()["position"] == drawn["position"] + 3 * 2  # bounded: 3 rounds of 2


def test_batch_rows_keep_extras():
    b = Batch(
        input_ids=torch.zeros(4, 3, dtype=torch.long),
        attention_mask=torch.ones(4, 3, dtype=torch.long),
        completion_mask=torch.ones(4, 2),
        advantages=torch.zeros(4, 2),
        extras={"returns": torch.arange(8.0).view(4, 2)},
    )
    assert b.rows(slice(2, 4)).extras["returns"].tolist() == [[4.0, 5.0], [6.0, 7.0]]


def test_dynamic_sampling_with_few_groups_still_splits_into_whole_groups(tiny_model_dir, tmp_path):
    """With one informative group of two, two mini-batches of two micro-batches each."""
    extra = ("algorithm.dynamic_sampling=true", "algorithm.max_refills=0")
    extra += ("optim.num_minibatches=2", "optim.gradient_accumulation_steps=2")
    t = GRPOTrainer(make_cfg(tiny_model_dir, tmp_path, *extra), reward_functions=[first_group_only])
    metrics = t.train_step()
    assert metrics["dynamic_sampling/groups_kept"] == 1
    assert torch.isfinite(torch.tensor(metrics["loss"]))


def test_every_algorithm_is_registered_and_nothing_else_tests_its_name():
    import pathlib

    import grpo

    assert set(ALGORITHMS) == {"grpo", "rloo", "ppo"}
    root = pathlib.Path(grpo.__file__).parent
    for path in root.rglob("*.py"):
        if path.parent.name == "algorithms" or path.name == "config.py":
            continue
        text = path.read_text()
        assert "algorithm.name" not in text and "alg.name" not in text, path


class FixedEngine:
    """An engine that returns one fixed group: G = 4 completions of lengths 1, 2, 3, 4 (the
    last ends with EOS), so a step's numbers can be worked out by hand."""

    exact_logp = True

    def generate(self, model, prompts, params, generator=None):
        lengths = torch.tensor([1, 2, 3, 4])
        mask = (torch.arange(4)[None, :] < lengths[:, None]).long()  # [4, 4]
        return Rollout(
            prompt_ids=torch.tensor([prompts[0]]),
            prompt_mask=torch.ones(1, len(prompts[0]), dtype=torch.long),
            completion_ids=torch.full((4, 4), 9) * mask,  # token 9 on real positions
            completion_mask=mask,
            sample_logp=torch.zeros(4, 4),
            truncated=torch.tensor([True, True, True, False]),
            group_size=4,
        )

    def sync(self, model):
        pass

    def close(self):
        pass


def one_then_zeros(prompts, completions, **kwargs):
    return [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("algorithm", "loss_type", "loss"),
    [
        # GRPO: rewards 1, 0, 0, 0: mean 0.25, Bessel std sqrt(0.75 / 3) = 0.5, so
        # A = 0.75 / 0.5001 on the first completion and -0.25 / 0.5001 on the others. The
        # ratio is exactly 1 (mu = 1), so the token-mean loss is -sum_i A_i |o_i| / sum |o_i|
        # = -(0.75 * 1 - 0.25 * (2 + 3 + 4)) / 0.5001 / 10 = 1.5 / 5.001
        ("grpo", "token_mean", 1.5 / 5.001),
        # RLOO: A_1 = 1 - mean(0, 0, 0) = 1; A_i = 0 - mean(1, 0, 0) = -1/3 for the others:
        # -(1 * 1 - 1/3 * 9) / 10 = 0.2
        ("rloo", "token_mean", 0.2),
        # PPO: the critic's head starts at zero, so every value is 0 and with gamma 1 GAE's
        # advantage is lam^(steps to the end) * score: 1 on the one token of completion 1,
        # 0 elsewhere. Whitened over the 10 real tokens (mean 0.1, Bessel variance
        # (0.81 + 9 * 0.01) / 9 = 0.1): 0.9 / sqrt(0.1) there, -0.1 / sqrt(0.1) elsewhere.
        # The per-completion mean loss: -(0.9 - 3 * 0.1) / sqrt(0.1) / 4
        ("ppo", "grpo", -0.6 / math.sqrt(0.1) / 4),
    ],
)
def test_one_step_through_the_trainer_by_hand(tiny_model_dir, tmp_path, algorithm, loss_type, loss):
    cfg = make_cfg(
        tiny_model_dir, tmp_path, f"algorithm.name={algorithm}", f"algorithm.loss_type={loss_type}",
        "algorithm.beta=0", "rollout.prompts_per_step=1", "rollout.max_completion_length=4",
    )  # fmt: skip
    t = GRPOTrainer(cfg, reward_functions=[one_then_zeros], engine=FixedEngine())
    metrics = t.train_step()
    assert metrics["reward"] == 0.25
    torch.testing.assert_close(metrics["loss"], loss)
    if algorithm == "ppo":
        # returns = GAE advantage + value = 1 on one token of ten, values 0: 0.5 * 1 / 10
        torch.testing.assert_close(metrics["value_loss"], 0.05)


def test_log_extra_columns_follow_the_groups_dynamic_sampling_keeps():
    def two_groups(texts, column):
        rollout = Rollout(
            prompt_ids=torch.ones(2, 1, dtype=torch.long),
            prompt_mask=torch.ones(2, 1, dtype=torch.long),
            completion_ids=torch.ones(4, 1, dtype=torch.long),
            completion_mask=torch.ones(4, 1, dtype=torch.long),
            sample_logp=torch.zeros(4, 1),
            truncated=torch.zeros(4, dtype=torch.bool),
            group_size=2,
        )
        rewards = torch.zeros(2, 2)
        return Scored([{}, {}], rollout, [[1]] * 4, texts, rewards, extra_columns=column)

    a = two_groups(["a0", "a1", "a2", "a3"], {"n": [0, 1, 2, 3], "only_a": [9] * 4})
    b = two_groups(["b0", "b1", "b2", "b3"], {"n": [4, 5, 6, 7]})
    kept = a.select(torch.tensor([False, True]))
    assert kept.extra_columns == {"n": [2, 3], "only_a": [9, 9]}
    both = Scored.concat([kept, b.select(torch.tensor([True, False]))], pad_token_id=0)
    assert both.texts == ["a2", "a3", "b0", "b1"]
    assert both.extra_columns == {"n": [2, 3, 4, 5]}  # a column one part lacks is dropped
