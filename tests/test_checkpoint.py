"""Checkpoints: a manifest that catches damage, fallback to the older intact one, no code
run on load, stale temporaries removed, the config compared on resume."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import DEVICES
from test_trainer import make_cfg, make_trainer

from grpo import checkpoint as ckpt
from grpo.errors import CheckpointError
from grpo.rewards import RewardError, score


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tiny_model_dir):
    """A 2-step run saved after each step, and its trainer."""
    out = tmp_path_factory.mktemp("run")
    trainer = make_trainer(make_cfg(tiny_model_dir, out, "optim.max_steps=2", "run.save_every=1"))
    trainer.train()
    return out


@pytest.fixture
def run(two_checkpoints, tmp_path):
    import shutil

    shutil.copytree(two_checkpoints, tmp_path / "run")
    return tmp_path / "run"


def test_manifest_lists_every_file_with_size_and_sha256(run):
    step = run / "checkpoints" / "step-2"
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["step"] == 2
    assert manifest["parts"] == ["model", "tokenizer", "trainer_state", "config"]
    on_disk = {p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file()} - {
        "manifest.json"
    }
    assert set(manifest["files"]) == on_disk
    for rel, entry in manifest["files"].items():
        data = (step / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    ckpt.verify(step)  # intact


def test_trainer_state_loads_as_weights_only(run):
    state = torch.load(run / "checkpoints" / "step-2" / ckpt.STATE_FILE, weights_only=True)
    assert state["step"] == 2 and set(state) >= {"optimizer", "scheduler", "sampler", "rng"}


@pytest.mark.parametrize("damage", ["truncate weights", "flip a byte of the state"])
def test_damaged_newest_checkpoint_falls_back_to_the_older(run, tiny_model_dir, damage, capsys):
    step2 = run / "checkpoints" / "step-2"
    if damage == "truncate weights":
        weights = step2 / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        reason = "model.safetensors has"
    else:
        state = bytearray((step2 / ckpt.STATE_FILE).read_bytes())
        state[len(state) // 2] ^= 0xFF
        (step2 / ckpt.STATE_FILE).write_bytes(bytes(state))
        reason = "trainer_state.pt does not match its SHA-256"
    trainer = make_trainer(make_cfg(tiny_model_dir, run, "optim.max_steps=2"))
    assert trainer.resume() == 1
    assert f"skipping damaged checkpoint: checkpoint '{step2}': {reason}" in capsys.readouterr().err
    from safetensors.torch import load_file

    older = load_file(run / "checkpoints" / "step-1" / "model.safetensors")
    for name, p in trainer.model.named_parameters():
        if name in older:
            assert torch.equal(older[name], p.detach()), name


class Planted:
    """Unpickling this calls ``os.mkdir(marker)``: what a planted checkpoint would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_planted_pickle_is_not_executed(run, tiny_model_dir, tmp_path, capsys):
    marker = tmp_path / "pwned"
    step2 = run / "checkpoints" / "step-2"
    state = torch.load(step2 / ckpt.STATE_FILE, weights_only=True)
    state["extra"] = Planted(str(marker))
    torch.save(state, step2 / ckpt.STATE_FILE)
    (step2 / ckpt.MANIFEST).unlink()  # the attacker rewrites the manifest too
    ckpt.Checkpointer._write_manifest(step2, 2, ["model", "tokenizer", "trainer_state", "config"])
    ckpt.verify(step2)  # the manifest cannot tell: the load must refuse

    trainer = make_trainer(make_cfg(tiny_model_dir, run, "optim.max_steps=2"))
    with pytest.raises(CheckpointError, match=r"step-2': trainer_state\.pt cannot be loaded as"):
        trainer.resume(step2)
    assert trainer.resume() == 1  # the newest is skipped, the older one used
    assert "cannot be loaded as weights only" in capsys.readouterr().err
    assert not marker.exists()


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path, tiny_model_dir):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    root = tmp_path / "checkpoints"
    stale = root / f".tmp-step-3-{int(dead.stdout)}"  # a writer that died mid-save
    mine = root / f".tmp-step-4-{os.getpid()}"
    live = root / f".tmp-step-5-{os.getppid()}"  # another process still writing
    for d in (stale, mine, live):
        (d / "sub").mkdir(parents=True)
    checkpointer = ckpt.Checkpointer(tmp_path, keep_last=1)
    checkpointer.save(1, [ckpt.text_part("note", "note.txt", "one")])
    checkpointer.save(2, [ckpt.text_part("note", "note.txt", "two")])
    assert sorted(p.name for p in root.iterdir()) == [live.name, "step-2"]  # keep_last=1
    assert (root / "step-2" / "note.txt").read_text() == "two"


def test_resaving_a_step_replaces_it_whole(tmp_path):
    checkpointer = ckpt.Checkpointer(tmp_path)
    checkpointer.save(1, [ckpt.text_part("a", "a.txt", "first")])
    path = checkpointer.save(1, [ckpt.text_part("b", "b.txt", "second")])
    assert sorted(p.name for p in path.iterdir()) == ["b.txt", "manifest.json"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-1"]


def test_config_change_is_refused_unless_allowed(run, tiny_model_dir, capsys):
    changed = make_cfg(tiny_model_dir, run, "optim.max_steps=2", "optim.learning_rate=0.02")
    with pytest.raises(CheckpointError, match=r"\(optim\.learning_rate: 0\.01 -> 0\.02\)"):
        make_trainer(changed).resume()
    assert make_trainer(changed).resume(allow_config_change=True) == 2
    assert "with a changed config: optim.learning_rate: 0.01 -> 0.02" in capsys.readouterr().err
    longer = make_cfg(tiny_model_dir, run, "optim.max_steps=9", "run.progress=true")
    assert make_trainer(longer).resume() == 2  # the step budget and logging may change


def slow(prompts, completions, **kwargs):
    import time

    time.sleep(5)
    return [0.0] * len(completions)


def test_reward_deadline_off_the_main_thread_stops_waiting_and_says_so():
    errors = []

    def in_a_thread():
        try:
            score([slow], None, ["p"], ["c"], {}, timeout_s=0.2)
        except RewardError as err:
            errors.append(str(err))

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join(30)
    assert len(errors) == 1
    assert "reward function 'slow' did not return within rewards.timeout_s=0.2 s" in errors[0]
    assert "only the main thread can stop it" in errors[0]


def times_itself_with_alarm(prompts, completions, **kwargs):
    """Sets and cancels its own SIGALRM (as math-verify does), then hangs."""
    import signal
    import time

    previous = signal.signal(signal.SIGALRM, lambda *a: None)
    signal.alarm(100)
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
    time.sleep(30)
    return [0.0] * len(completions)


def test_reward_deadline_holds_when_the_function_uses_alarm_itself():
    with pytest.raises(RewardError, match=r"'times_itself_with_alarm' did not return within"):
        score([times_itself_with_alarm], None, ["p"], ["c"], {}, timeout_s=0.3)
    assert score([lambda **kw: [1.0]], None, ["p"], ["c"], {}, timeout_s=5).rewards.tolist() == [
        1.0
    ]


def test_final_of_an_earlier_run_is_replaced_whole(tiny_model_dir, tmp_path):
    from grpo.hf import load_model_and_tokenizer

    old = tmp_path / "final"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"an earlier run's weights")
    (old / "only_in_the_old_one.txt").write_text("old")
    trainer = make_trainer(make_cfg(tiny_model_dir, tmp_path, "optim.max_steps=1"))
    trainer.train()
    names = sorted(p.name for p in old.iterdir())
    assert "only_in_the_old_one.txt" not in names and "tokenizer.json" in names
    model, _ = load_model_and_tokenizer(old)
    for a, b in zip(model.parameters(), trainer.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_stop_signal_during_the_final_write_waits_for_it(tmp_path, capsys):
    import signal

    def write(directory):
        (directory / "a.txt").write_text("a")
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, before the write ends
        (directory / "b.txt").write_text("b")

    path = ckpt.save_final(tmp_path / "final", write)
    assert sorted(p.name for p in path.iterdir()) == ["a.txt", "b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert "SIGTERM while writing" in capsys.readouterr().err


def test_a_failed_final_write_leaves_the_old_final_and_no_temporary(tmp_path):
    ckpt.save_final(tmp_path / "final", lambda d: (d / "a.txt").write_text("first"))

    def fails(directory):
        (directory / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.save_final(tmp_path / "final", fails)
    assert (tmp_path / "final" / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    state = ckpt.rng_state("cpu")
    assert set(state) == {"python", "torch"}  # no CUDA entry on the CPU
    torch.save(state, tmp_path / "rng.pt")
    first = (random.random(), torch.rand(3))
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), torch.rand(3))
    assert first[0] == again[0] and torch.equal(first[1], again[1])


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_holds_the_cuda_rng_state_exactly_when_on_cuda(tiny_model_dir, tmp_path, device):
    extra = (f"model.device={device}", "optim.max_steps=1", "run.save_every=1")
    make_trainer(make_cfg(tiny_model_dir, tmp_path, *extra)).train()
    state = ckpt.load_state(tmp_path / "checkpoints" / "step-1")
    if device == "cpu":
        assert set(state["rng"]) == {"python", "torch"}
        return
    saved = state["rng"]["cuda"]
    assert set(saved) == set(range(torch.cuda.device_count()))
    torch.rand(5, device="cuda")  # moves the generator on
    resumed = make_trainer(make_cfg(tiny_model_dir, tmp_path, *extra))
    resumed.resume()
    for index, cuda_state in saved.items():
        assert torch.equal(torch.cuda.get_rng_state(index), cuda_state)
