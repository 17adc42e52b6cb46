"""Training under torchrun: 2 processes (gloo) run the trainer like one process.

- With an engine whose completions depend only on the prompt, a 2-step run on 2 processes
  (DDP, FSDP2) ends with one process's weights and logs one process's metrics: each rank
  draws its own whole groups of the same global batch, and every batch statistic is global.
- The same under LoRA (DDP, FSDP2): the adapter, the merged ``final/`` and the metrics
  equal one process's, also with the reference reset after every step (adapters merged
  into the base, fresh ones started); a run cut after step 1 and resumed ends where the
  straight run does, though the reset dropped the fresh adapter's optimizer moments.
- A 3-step run under ``torchrun -m grpo train`` killed in step 3 and resumed from its
  step-2 checkpoint ends with the weights of 3 uninterrupted steps, and ``metrics.jsonl``
  holds each step once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from ranks import run_ranks
from test_trainer import distinct_chars

from grpo.config import build_config
from grpo.metrics import read_jsonl
from grpo.trainer import GRPOTrainer
from grpo.types import Rollout

KEYED = {
    "data": {"num_train_prompts": 40},
    "rollout": {"prompts_per_step": 4, "num_generations": 4, "max_completion_length": 12},
    "algorithm": {"scale_rewards": "batch", "beta": 0.04, "loss_type": "token_mean"},
    "optim": {"learning_rate": 0.001, "max_steps": 2, "gradient_accumulation_steps": 2},
    "run": {"progress": False},
}
"""A run of the prompt-keyed engine: batch std, a reference, two micro-batches per rank."""

LORA = {"lora": {"rank": 4, "alpha": 8}}
"""Adapters on every linear layer but the LM head; the reference is the adapters-off policy."""
LORA_RESET = {"model": LORA, "algorithm": {"ref_reset_every": 1}}
"""LoRA with the reference reset after every step: the adapters are merged into the base
and fresh ones start, without optimizer moments."""

REAL = {
    "data": {"num_train_prompts": 40},
    "rollout": {"prompts_per_step": 4, "num_generations": 4, "max_completion_length": 8},
    "optim": {"learning_rate": 0.01, "max_steps": 3},
    "run": {"progress": False, "save_every": 2},
    "distributed": {"strategy": "fsdp"},
}
"""A run of the torch engine, checkpointed after step 2."""


class PromptKeyedEngine:
    """G completions per prompt drawn from a generator seeded by the prompt's tokens alone,
    so a prompt gets the same completions whichever process, batch or step draws it."""

    exact_logp = True

    def generate(self, model, prompts, params, generator=None):
        g, t = params.num_generations, params.max_completion_length
        width = max(len(p) for p in prompts)
        pad = params.pad_token_id
        ids, lengths = [], []
        for p in prompts:
            gen = torch.Generator().manual_seed(sum(i * 131**k for k, i in enumerate(p)) % 2**31)
            lengths.append(torch.randint(1, t + 1, (g,), generator=gen))  # [G]
            ids.append(torch.randint(7, 60, (g, t), generator=gen))  # [G, T]
        lengths = torch.cat(lengths)  # [N]
        completion_mask = (torch.arange(t) < lengths[:, None]).long()  # [N, T]
        return Rollout(
            prompt_ids=torch.tensor([[pad] * (width - len(p)) + p for p in prompts]),
            prompt_mask=torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
            completion_ids=torch.cat(ids) * completion_mask + pad * (1 - completion_mask),
            completion_mask=completion_mask,
            sample_logp=torch.zeros(len(lengths), t),
            truncated=lengths == t,
            group_size=g,
        )

    def sync(self, model):
        pass

    def close(self):
        pass


def config(model_dir, out, base: dict, **sections) -> object:
    # gloo on CPU: the ranks must not each claim a GPU of a one-GPU machine
    tree = {**base, "model": {"name_or_path": str(model_dir), "device": "cpu"}}
    tree["run"] = {**base["run"], "output_dir": str(out)}
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    return build_config(tree)


def keyed_run(model_dir, out, strategy: str, **sections) -> None:
    cfg = config(model_dir, out, KEYED, distributed={"strategy": strategy}, **sections)
    GRPOTrainer(cfg, reward_functions=[distinct_chars], engine=PromptKeyedEngine()).train()


def resumed_run(model_dir, out: Path, strategy: str, **sections) -> None:
    """``keyed_run``'s 2 steps as 1 step, a checkpoint, a resume from it in a new trainer,
    and 1 more step."""

    def trainer(steps: int) -> GRPOTrainer:
        optim, run = {"max_steps": steps}, {"save_every": 1}
        cfg = config(
            model_dir, out, KEYED, distributed={"strategy": strategy}, optim=optim, run=run,
            **sections,
        )  # fmt: skip
        return GRPOTrainer(cfg, reward_functions=[distinct_chars], engine=PromptKeyedEngine())

    trainer(1).train()
    resumed = trainer(2)
    assert resumed.resume() == 1
    resumed.train()


def two_process_runs(model_dir, root: Path) -> None:
    for strategy in ("ddp", "fsdp"):
        keyed_run(model_dir, root / strategy, strategy)
    for strategy in ("ddp", "fsdp"):
        keyed_run(model_dir, root / f"lora-{strategy}", strategy, model=LORA)
        keyed_run(model_dir, root / f"lora-reset-{strategy}", strategy, **LORA_RESET)
        resumed_run(model_dir, root / f"lora-reset-{strategy}-resumed", strategy, **LORA_RESET)
    GRPOTrainer(
        config(model_dir, root / "straight", REAL), reward_functions=[distinct_chars]
    ).train()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run_ranks(two_process_runs, 2, root, tiny_model_dir, root)
    keyed_run(tiny_model_dir, root / "one", "ddp")  # one process: no wrapping at all
    keyed_run(tiny_model_dir, root / "lora-one", "ddp", model=LORA)
    keyed_run(tiny_model_dir, root / "lora-reset-one", "ddp", **LORA_RESET)
    return root


def weights(directory: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).state_dict()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6)


def assert_same_metrics(one_run: Path, two_run: Path) -> None:
    one, two = read_jsonl(one_run / "metrics.jsonl"), read_jsonl(two_run / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2]  # one writer: each step once
    assert [r["world_size"] for r in one + two] == [1, 1, 2, 2]
    for a, b in zip(one, two, strict=True):
        for key in ("reward", "reward_std", "loss", "kl", "entropy", "grad_norm",
                    "completions/mean_length", "completions/max_length"):  # fmt: skip
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_like_one(runs, strategy):
    assert_same_weights(runs / strategy / "final", runs / "one" / "final")
    assert_same_metrics(runs / "one", runs / strategy)
    saved = yaml.safe_load((runs / strategy / "config.yaml").read_text())
    assert saved["distributed"] == {"strategy": strategy, "world_size": 2}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_trains_like_one_process(runs, strategy):
    """Adapters (all B moved away from 0), merged ``final/`` and metrics after 2 steps."""
    from safetensors.torch import load_file

    one, two = (
        load_file(runs / run / "final" / "adapter" / "adapter_model.safetensors")
        for run in ("lora-one", f"lora-{strategy}")
    )
    assert one.keys() == two.keys()
    assert all(torch.count_nonzero(w) for k, w in one.items() if "lora_B" in k)  # B left 0
    for name, w in one.items():
        torch.testing.assert_close(two[name], w, rtol=0, atol=1e-6)
    # final/ is the merged model, loaded by from_pretrained without PEFT
    assert_same_weights(runs / f"lora-{strategy}" / "final", runs / "lora-one" / "final")
    assert_same_metrics(runs / "lora-one", runs / f"lora-{strategy}")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_reference_reset_and_resume_like_one_process(runs, strategy):
    """A merge into the (sharded, under FSDP2) base and a fresh adapter after each step give
    one process's weights; the step-1 checkpoint holds no moments for the fresh adapter,
    and they stay absent when a run resumes from it."""
    run = runs / f"lora-reset-{strategy}"
    assert_same_weights(run / "final", runs / "lora-reset-one" / "final")
    assert_same_metrics(runs / "lora-reset-one", run)
    assert_same_weights(runs / f"lora-reset-{strategy}-resumed" / "final", run / "final")


KILLER = '''
import os, signal

CALLS = []


def reward(prompts, completions, **kwargs):
    """distinct_chars, and a SIGKILL to this process in step 3's scoring when asked."""
    CALLS.append(1)
    if len(CALLS) == 3 and os.environ.get("KILL_IN_STEP_3"):
        os.kill(os.getpid(), signal.SIGKILL)
    return [len(set(c)) / 8 for c in completions]
'''


def torchrun(config_file: Path, *args: str, kill: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"KILL_IN_STEP_3": "1"} if kill else {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "grpo", "train", str(config_file), *args]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_killed_and_resumed_under_torchrun_equals_uninterrupted(runs, tiny_model_dir, tmp_path):
    (tmp_path / "killer.py").write_text(KILLER)
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, out, REAL, rewards={"functions": [f"{tmp_path}/killer.py:reward"]})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump()))

    killed = torchrun(config_file, kill=True)
    assert killed.returncode != 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]
    resumed = torchrun(config_file, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(out / "final", runs / "straight" / "final")
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
