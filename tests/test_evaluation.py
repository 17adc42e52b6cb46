"""pass@k, maj@k and the evaluation loop on a tiny model."""

import json

import pytest

from grpo.cli import main
from grpo.evaluation import evaluate, majority_answer, pass_at_k
from grpo.hf import load_model_and_tokenizer
from grpo.tasks import get_task


def test_pass_at_k_hand_values():
    # n=4 samples, c=1 correct, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # k=1 is the fraction correct: 1 - C(2,1)/C(4,1) = 1 - 2/4 = 0.5 for c=2
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5)
    # fewer than k wrong samples: every k-subset holds a correct one
    assert pass_at_k(5, 4, 2) == 1.0
    assert pass_at_k(8, 0, 8) == 0.0
    with pytest.raises(ValueError, match="k=9"):
        pass_at_k(8, 1, 9)


def test_majority_answer_ignores_none_and_breaks_ties_by_first_seen():
    assert majority_answer(["3", None, "4", "4", None, None]) == "4"
    assert majority_answer(["5", "6", "6", "5"]) == "5"
    assert majority_answer([None, None]) is None


def test_evaluate_reports_all_metrics(tiny_model_dir):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    task = get_task("add2")
    rows = task.problems("test", 3, seed=0)
    gold = [task.demonstration(r) for r in rows]

    def oracle(prompts, completions, answer, **kw):  # ignores the model: always correct
        return [1.0] * len(completions)

    out = evaluate(
        model, tok, rows, oracle, task.extract_answer, k=2, num_samples=4, max_completion_length=4
    )
    assert out["accuracy"] == 1.0 and out["pass_at_k"] == 1.0 and out["sampled_accuracy"] == 1.0
    # a random model writes no "A:" line: no answer to vote for, so maj@k counts it wrong
    assert out["maj_at_k"] == 0.0
    assert (out["k"], out["n"]) == (2, 3)
    assert all(task.extract_answer(g) == r["answer"] for g, r in zip(gold, rows, strict=True))


def test_eval_on_a_data_file_with_reward_specs(tiny_model_dir, tmp_path, capsys):
    rewards = tmp_path / "rewards.py"
    rewards.write_text(
        "def by_answer(prompts, completions, answer, **kw):\n"
        "    return [int(a) % 3 - 1.0 for a in answer]\n"
        "def boxed(prompts, completions, **kw):\n"
        "    return [float('\\\\boxed{' in c) for c in completions]\n"
    )
    data = tmp_path / "held_out.csv"
    data.write_text("prompt,answer\n1+1=,2\n1+2=,3\n2+2=,4\n3+3=,6\n")
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(data)]
    assert main([*args, "--reward", f"{rewards}:by_answer", "--max-completion-length", "4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # answers 2, 3, 4, 6 -> 2%3-1 = 1, -1, 0, -1: one of four above 0, mean -0.25
    assert result["accuracy"] == 0.25 and result["reward"] == -0.25 and result["n"] == 4

    # a tiny random model never writes \boxed{}: every score is 0, and the warning says why
    assert main([*args, "--reward", f"{rewards}:boxed", "--max-completion-length", "4"]) == 0
    err = capsys.readouterr().err
    assert "every one of the 4 greedy completions scored 0 on every reward function (boxed)" in err
    assert "another format than the rewards parse" in err


def test_eval_data_errors_come_before_the_model_loads(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    args = ["eval", "--model", str(tmp_path / "no-model"), "--data", str(missing)]
    assert main([*args, "--reward", "arithmetic_correct"]) == 2
    assert f"--data {str(missing)!r} does not exist" in capsys.readouterr().err
