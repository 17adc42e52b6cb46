"""grpo compare: every number in the report is read back from the arms' own logs."""

import json
import statistics

from grpo.cli import main
from grpo.metrics import read_jsonl
from grpo.report import metric_groups, numeric_keys


def test_compare_reports_numbers_from_the_runs(tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    overrides = [
        f"model.name_or_path={tiny_model_dir}",
        "data.num_train_prompts=20",
        "rollout.prompts_per_step=2",
        "rollout.num_generations=2",
        "rollout.max_completion_length=6",
        "optim.max_steps=2",
        "run.eval_every=1",
        "run.eval_prompts=4",
    ]
    assert main(["compare", *overrides, "--algorithms", "grpo,ppo", "--output-dir", str(out)]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert set(report) == {"grpo", "ppo"}
    for arm, r in report.items():
        rows = read_jsonl(out / arm / "metrics.jsonl")
        steps = [x for x in rows if "step_time" in x]
        assert r["s_per_step"] == statistics.median(x["step_time"] for x in steps)
        assert r["peak_rss_mb"] == max(x["memory/peak_rss_mb"] for x in steps)
        assert r["accuracy_before"] == rows[0]["eval/accuracy"]  # step 0: the starting model
        assert r["accuracy_after"] == steps[-1]["eval/accuracy"]
    # the critic (a second backbone) and its AdamW moments are what PPO adds
    assert (
        report["ppo"]["model_and_optimizer_bytes"]
        > 1.5 * report["grpo"]["model_and_optimizer_bytes"]
    )
    assert report["ppo"]["trained_parameters"] > report["grpo"]["trained_parameters"]
    assert "| ppo |" in (out / "compare.md").read_text() and (out / "compare.png").is_file()
    # compare.html: the run report's panels, one line per arm, every group of both logs
    keys = [k for arm in report for k in numeric_keys(read_jsonl(out / arm / "metrics.jsonl"))]
    page = (out / "compare.html").read_text()
    assert page.count("<img") == len(metric_groups(list(dict.fromkeys(keys))))
    assert "<td class=\"text\">ppo</td>" in page
