"""A run that says when it cannot learn: warnings (console and ``warnings/*`` metrics)
for a constant reward, groups without spread and truncated completions, each naming its
likely causes; and ``grpo check``'s verdict on one batch, with no training."""

import pytest
import torch
from test_trainer import distinct_chars, make_cfg

from grpo.cli import main
from grpo.diagnostics import RunDiagnostics, Thresholds, batch_findings
from grpo.metrics import read_jsonl
from grpo.trainer import GRPOTrainer


def step(reward=0.4, zero_std=0.25, truncated=0.1):
    return {
        "reward": reward,
        "frac_reward_zero_std": zero_std,
        "completions/truncated_frac": truncated,
    }


def run(diagnostics, metrics_per_step):
    """Messages by step (1-based) and the last step's flags."""
    said, flags = {}, {}
    for i, metrics in enumerate(metrics_per_step, start=1):
        flags, messages = diagnostics.observe(metrics)
        if messages:
            said[i] = messages
    return said, flags


def flat(text: str) -> str:
    return " ".join(text.split())  # the console wraps long lines


def test_a_healthy_run_gets_no_warning():
    healthy = [step(reward=0.3 + 0.01 * i, zero_std=0.5, truncated=0.2) for i in range(30)]
    said, flags = run(RunDiagnostics(24, 8), healthy)
    assert said == {}
    assert flags == {
        "warnings/constant_reward": 0.0,
        "warnings/reward_zero_std": 0.0,
        "warnings/truncated": 0.0,
    }


def test_a_constant_reward_is_named_at_step_k_once():
    said, flags = run(RunDiagnostics(24, 8), [step(reward=0.0, zero_std=1.0)] * 12)
    assert list(said) == [10]  # K = 10 by default; the zero-std warning would only repeat it
    (message,) = said[10]
    assert message.startswith("every completion of the first 10 steps scored the same reward (0)")
    for cause in ("rewards.functions", "data.add_special_tokens", "max_completion_length=24"):
        assert cause in message
    assert flags["warnings/constant_reward"] == 1.0


def test_a_reward_that_changes_between_steps_is_not_constant():
    # every group flat at every step, but not the same reward: no constant warning, and the
    # zero-std warning comes once all 10 steps of its window are above 90%
    steps = [step(reward=float(i % 2), zero_std=1.0) for i in range(10)]
    said, flags = run(RunDiagnostics(24, 8), steps)
    assert flags["warnings/constant_reward"] == 0.0
    assert list(said) == [10] and "rollout.num_generations=8" in said[10][0]


def test_zero_std_must_stay_above_the_threshold():
    steps = [step(zero_std=0.95)] * 9 + [step(zero_std=0.85)] + [step(zero_std=0.95)] * 9
    said, flags = run(RunDiagnostics(24, 8), steps)
    assert said == {} and flags["warnings/reward_zero_std"] == 0.0
    said, _ = run(RunDiagnostics(24, 8), [*steps, step(zero_std=0.95)])
    assert list(said) == [20]  # steps 11-20: ten in a row above 0.9
    assert said[20][0].startswith("95% of groups had all-equal rewards at each of the last 10")


def test_truncation_is_averaged_over_three_steps():
    # 0.9, 0.3, 0.3 averages to exactly 0.5, which is not "most"; 0.3, 0.3, 0.95 is 0.517
    said, _ = run(RunDiagnostics(24, 8), [step(truncated=t) for t in (0.9, 0.3, 0.3)])
    assert said == {}
    said, flags = run(RunDiagnostics(24, 8), [step(truncated=t) for t in (0.9, 0.3, 0.3, 0.95)])
    assert list(said) == [4] and flags["warnings/truncated"] == 1.0
    assert said[4][0].startswith(
        "52% of completions over the last 3 steps stopped at rollout.max_completion_length=24"
    )


def test_batch_findings():
    healthy = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])  # [B=2, G=3]: one group differs
    ends = torch.tensor([False, True, False, False, False, False])  # [6]: 1 of 6 truncated
    assert batch_findings(healthy, ends, 24) == []
    (msg,) = batch_findings(torch.zeros(2, 3), ends, 24)
    assert msg.startswith("every completion of this batch scored the same reward (0)")
    # half the groups flat: below the 90% threshold; 11 of 12 flat: above it
    assert batch_findings(healthy, ends, 24, Thresholds(zero_std_frac=0.6)) == []
    (msg,) = batch_findings(healthy, ends, 24, Thresholds(zero_std_frac=0.4))
    assert msg.startswith("50% of groups had all-equal rewards in this batch (mean reward 0.833)")
    (msg,) = batch_findings(healthy, torch.ones(6, dtype=torch.bool), 24)
    assert msg.startswith("100% of completions in this batch stopped at")


def always_zero(prompts, completions, **kwargs):
    """A reward that never matches what the model writes."""
    return [0.0] * len(completions)


def test_a_constant_reward_run_warns_on_the_console_and_in_the_log(
    tiny_model_dir, tmp_path, capsys
):
    cfg = make_cfg(tiny_model_dir, tmp_path, "optim.max_steps=10")
    GRPOTrainer(cfg, reward_functions=[always_zero]).train()
    err = flat(capsys.readouterr().err)
    assert "warning: every completion of the first 10 steps scored the same reward (0)" in err
    assert "the reward function does not match what the model writes" in err
    logged = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["warnings/constant_reward"] for r in logged] == [0.0] * 9 + [1.0]


def test_a_truncated_run_names_max_completion_length(tiny_model_dir, tmp_path, capsys):
    # a random model almost never writes its EOS within 8 tokens
    cfg = make_cfg(tiny_model_dir, tmp_path, "optim.max_steps=3")
    history = GRPOTrainer(cfg, reward_functions=[distinct_chars]).train()
    assert sum(r["completions/truncated_frac"] for r in history) / 3 > 0.5
    err = flat(capsys.readouterr().err)
    assert "stopped at rollout.max_completion_length=8 without an end-of-sequence token" in err
    assert "every completion" not in err  # distinct characters give each group a spread
    assert [r["warnings/truncated"] for r in history] == [0.0, 0.0, 1.0]


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "def distinct(prompts, completions, **kwargs):\n"
        "    return [len(set(c)) / 8 for c in completions]\n\n"
        "def zero(prompts, completions, **kwargs):\n"
        "    return [0.0] * len(completions)\n"
    )
    return path


def check(model_dir, tmp_path, capsys, *overrides):
    args = [
        "check",
        f"model.name_or_path={model_dir}",
        f"run.output_dir={tmp_path / 'run'}",
        "data.num_train_prompts=20",
        "rollout.prompts_per_step=2",
        "rollout.num_generations=4",
        "rollout.max_completion_length=8",
        *overrides,
    ]
    rc = main(args)
    assert not (tmp_path / "run").exists()  # nothing written
    return rc, capsys.readouterr().out


def test_check_on_a_correct_setup(tiny_model_dir, tmp_path, reward_file, capsys):
    rc, out = check(tiny_model_dir, tmp_path, capsys, f"rewards.functions=[{reward_file}:distinct]")
    assert rc == 0
    assert "0 of 2 prompts start with BOS" in out  # the char tokenizer adds none
    assert out.count("  tokens: ['") == 2 and out.count("\nprompt ") == 2
    assert "verdict: LEARNING SIGNAL: 2 of 2 groups have differing rewards" in out
    assert "same reward" not in out


def test_check_on_a_broken_setup(tiny_model_dir, tmp_path, reward_file, capsys):
    rc, out = check(
        tiny_model_dir,
        tmp_path,
        capsys,
        f"rewards.functions=[{reward_file}:zero]",
        "data.add_special_tokens=true",
        "--show=1",
    )
    assert rc == 1
    assert "2 of 2 prompts start with BOS" in out
    assert "  tokens: ['<s>', " in out and out.count("\nprompt ") == 1
    assert "warning: every completion of this batch scored the same reward (0)" in out
    assert "the reward function does not match what the model writes" in out
    assert "verdict: NO LEARNING SIGNAL: every group's rewards are equal" in out
