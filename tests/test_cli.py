"""The command line end to end on a very small configuration (seconds, not minutes)."""

import json
import subprocess
import sys

import pytest

from grpo.cli import main
from grpo.metrics import read_jsonl

SMALL = [
    "run.progress=false",
    "data.num_train_prompts=20",
    "rollout.prompts_per_step=2",
    "rollout.num_generations=2",
    "rollout.max_completion_length=6",
]


def test_init_sft_eval_train_resume(tmp_path):
    model, sft, run = tmp_path / "model", tmp_path / "sft", tmp_path / "run"
    assert main(["init", str(model), "--hidden-size", "32", "--num-layers", "1"]) == 0
    assert (
        main(
            [
                "sft",
                "--model",
                str(model),
                "--output",
                str(sft),
                "--steps",
                "3",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    result = tmp_path / "eval.json"
    assert main(["eval", "--model", str(sft), "--n", "4", "--k", "2", "--json", str(result)]) == 0
    assert set(json.loads(result.read_text())) >= {"accuracy", "pass_at_k", "maj_at_k"}

    config = tmp_path / "run.yaml"
    config.write_text(
        f"model:\n  name_or_path: {sft}\nrun:\n  output_dir: {run}\n  save_every: 1\n"
    )
    assert main(["train", str(config), *SMALL, "optim.max_steps=2"]) == 0
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert (run / "curves.png").is_file() and (run / "final" / "config.json").is_file()
    assert main(["train", str(config), *SMALL, "optim.max_steps=3", "--resume"]) == 0
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "rollout.num_generations=1", f"run.output_dir={tmp_path}"]) == 2
    assert "rollout.num_generations = 1" in capsys.readouterr().err


def test_user_reward_function_from_a_file(tmp_path, tiny_model_dir):
    reward = tmp_path / "my_reward.py"
    reward.write_text(
        "def short(prompts, completions, **kw):\n    return [-len(c) for c in completions]\n"
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"{i}+{i}=", "id": i}) + "\n" for i in range(4))
    )
    args = [f"model.name_or_path={tiny_model_dir}", f"run.output_dir={tmp_path / 'run'}"]
    args += [
        f"data.train_file={prompts}",
        f"rewards.functions=[{reward}:short]",
        "optim.max_steps=1",
    ]
    assert main(["train", *args, *SMALL]) == 0
    assert "rewards/short/mean" in read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]


def test_demo_fast_writes_summary(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "grpo.cli", "demo", "--fast", "--output-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    for side in ("before", "after"):
        assert set(summary[side]) >= {"accuracy", "pass_at_k", "maj_at_k"}
    assert summary["seconds"] > 0
    assert (out / "grpo" / "curves.png").is_file()


def test_sft_stops_at_the_first_check_that_reaches_the_target(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "sft"
    args = ["sft", "--model", str(tiny_model_dir), "--output", str(out), "--task", "add2-direct"]
    args += ["--steps", "50", "--batch-size", "4", "--examples", "40", "--held-in", "8"]
    # accuracy is always >= 0, so the first check (step 3) ends it; a target of 1.01 never does
    assert main([*args, "--check-every", "3", "--target-accuracy", "0"]) == 0
    err = capsys.readouterr().err
    assert "SFT step 3: held-in greedy accuracy" in err and "SFT: 3 steps" in err
    assert main([*args, "--steps", "4", "--check-every", "2", "--target-accuracy", "1.01"]) == 0
    err = capsys.readouterr().err
    assert "SFT step 4:" in err and "SFT: 4 steps" in err
    assert (out / "config.json").is_file()


def test_warm_start_refuses_to_hold_in_every_example():
    from grpo.sft import warm_start
    from grpo.tasks import get_task

    with pytest.raises(ValueError, match="held_in=10"):
        warm_start(
            None, None, get_task("add2"), 5, target_accuracy=0.5, num_examples=10, held_in=10
        )
