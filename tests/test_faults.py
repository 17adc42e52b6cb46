"""Stop signals sent to a real ``grpo train`` process, errors inside the loop, non-finite
steps and the save clock: each ends with a checkpoint that resumes to the weights an
uninterrupted run reaches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import distinct_chars, make_cfg, make_trainer

from grpo.checkpoint import list_checkpoints
from grpo.cli import main
from grpo.errors import NonFiniteError
from grpo.metrics import read_jsonl
from grpo.rewards import RewardError
from grpo.trainer import GRPOTrainer

PACED_REWARD = """
import os, pathlib, time

calls = 0

def paced(prompts, completions, **kwargs):
    '''Distinct characters; with GRPO_TEST_PAUSE set, the second call (step 2) says so in
    a file and waits for a file from the test, so the signal lands mid-step.'''
    global calls
    calls += 1
    pause = os.environ.get("GRPO_TEST_PAUSE")
    if pause and calls == 2:
        pathlib.Path(pause, "ready").touch()
        deadline = time.monotonic() + 120
        while not pathlib.Path(pause, "go").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return [len(set(c)) / 8 for c in completions]
"""


def train_args(model: Path, out: Path, reward: Path, *extra: str) -> list[str]:
    return [
        "train",
        f"model.name_or_path={model}",
        f"run.output_dir={out}",
        f"rewards.functions=[{reward}:paced]",
        "run.progress=false",
        "run.num_threads=1",
        "data.num_train_prompts=20",
        "rollout.prompts_per_step=2",
        "rollout.num_generations=4",
        "rollout.max_completion_length=6",
        "optim.learning_rate=0.01",
        "optim.lr_scheduler=cosine",
        "optim.max_steps=4",
        *extra,
    ]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir):
    """4 uninterrupted steps (in this process), and the reward file the runs share."""
    tmp = tmp_path_factory.mktemp("straight")
    reward = tmp / "paced.py"
    reward.write_text(PACED_REWARD)
    assert main(train_args(tiny_model_dir, tmp / "run", reward)) == 0
    return reward, final_weights(tmp / "run")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_stop_signal_mid_step_saves_and_resume_equals_uninterrupted(
    signum, straight, tiny_model_dir, tmp_path
):
    reward, expected = straight
    run = tmp_path / "run"
    env = {**os.environ, "GRPO_TEST_PAUSE": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "grpo.cli", *train_args(tiny_model_dir, run, reward)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "ready").exists():  # step 2 is scoring its completions
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signum)
        (tmp_path / "go").touch()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    assert f"{name}: stopped after step 2 of 4; checkpoint saved to {run}" in err
    assert [p.name for p in list_checkpoints(run)] == ["step-2"]

    assert main([*train_args(tiny_model_dir, run, reward), "--resume"]) == 0
    resumed = final_weights(run)
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_second_signal_aborts_without_saving_the_step(tiny_model_dir, tmp_path, capsys):
    def twice_at_step_2(model, tokenizer):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    cfg = make_cfg(tiny_model_dir, tmp_path, "run.eval_every=1", "run.save_every=1")
    trainer = make_trainer(cfg, eval_fn=twice_at_step_2)
    with pytest.raises(KeyboardInterrupt, match="second stop signal"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1"]


def test_error_mid_step_saves_the_last_whole_step(tiny_model_dir, tmp_path, capsys):
    """A reward function that raises in step 3 (after generation drew prompts and random
    numbers) leaves step 2 saved, rewound so that resuming it gives the straight run."""
    extra = ("optim.max_steps=4", "optim.lr_scheduler=cosine", "algorithm.beta=0")
    straight = make_trainer(make_cfg(tiny_model_dir, tmp_path / "a", *extra))
    straight.train()

    calls = []

    def fails_in_step_3(prompts, completions, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("reward server went away")
        return distinct_chars(prompts, completions)

    cfg = make_cfg(tiny_model_dir, tmp_path / "b", *extra)
    first = GRPOTrainer(cfg, reward_functions=[fails_in_step_3])
    with pytest.raises(RewardError, match="reward server went away"):
        first.train()
    assert "error in step 3: step 2 saved to" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-2"]

    resumed = make_trainer(make_cfg(tiny_model_dir, tmp_path / "b", *extra))
    assert resumed.resume() == 2
    resumed.train()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_model_dir, tmp_path, capsys):
    """lr 1e6 without clipping: step 1 moves the weights far, after which every gradient is
    NaN; those steps are not applied, and the third in a row stops the run."""
    extra = ("optim.learning_rate=1e6", "optim.max_grad_norm=0", "optim.max_steps=8")
    t = make_trainer(make_cfg(tiny_model_dir, tmp_path, *extra))
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row had a non-finite"):
        t.train()
    assert t.step == 4  # step 1 applied, steps 2-4 skipped
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-4"]
    saved = load_file(tmp_path / "checkpoints" / "step-4" / "model.safetensors")
    for name, p in t.model.named_parameters():  # the saved weights are the last good ones
        assert torch.equal(saved.get(name, p), p.detach())
    logged = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["nonfinite_skipped"] for r in logged] == [0.0, 1.0, 1.0, 1.0]
    assert t.scheduler.last_epoch == 1  # the schedule advanced for the applied step only
    assert "skipped; 3 in a row" in capsys.readouterr().err


def test_save_clock_and_keep_last(tiny_model_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, tmp_path, "run.save_every_minutes=1e-9", "run.keep_last=2")
    make_trainer(cfg).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-3"]
    logged = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(r["time/rewards/distinct_chars"] >= 0 for r in logged)

    cfg = make_cfg(tiny_model_dir, tmp_path / "b", "run.save_every_minutes=0")
    make_trainer(cfg).train()
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-3"]  # the end only
