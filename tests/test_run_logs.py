"""What a run leaves behind, read back with independent tools: metrics.jsonl, samples.jsonl
(the step's own rewards and advantages), TensorBoard events, held-out evaluation on a file
through ``run.eval_every``, and the HTML report as headless Chromium renders it."""

import importlib.util
import json
import re
import shutil
import subprocess

import pytest
import torch

from grpo.cli import main
from grpo.config import build_config
from grpo.hf import load_model_and_tokenizer
from grpo.metrics import open_sinks, read_jsonl
from grpo.report import metric_groups, numeric_keys
from grpo.trainer import GRPOTrainer

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
STEPS, B, G = 4, 2, 4


def distinct(prompts, completions, **kwargs):
    """Distinct characters minus 2: a greedy tiny model repeats one character and gets -1."""
    return [len(set(c)) - 2.0 for c in completions]


def by_answer(prompts, completions, answer, **kwargs):
    """The row's ``answer`` column mod 3, plus 1 if the completion holds one of its digits:
    held-out totals above, at and below 0, so accuracy (reward > 0) is a real share."""
    return [
        int(a) % 3 + float(any(ch in c for ch in a))
        for c, a in zip(completions, answer, strict=True)
    ]


def prompt_rows(n, offset):
    return [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(offset, offset + n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """One short run with a training file, a held-out file, two reward functions, every
    completion kept as a sample, and TensorBoard when it is installed."""
    d = tmp_path_factory.mktemp("run")
    cfg = build_config(
        overrides=[
            f"model.name_or_path={tiny_model_dir}",
            f"run.output_dir={d / 'out'}",
            "run.progress=false",
            f"data.train_file={write_jsonl(d / 'train.jsonl', prompt_rows(8, 10))}",
            f"data.eval_file={write_jsonl(d / 'held_out.jsonl', prompt_rows(6, 50))}",
            "run.eval_every=2",
            f"rollout.prompts_per_step={B}",
            f"rollout.num_generations={G}",
            "rollout.max_completion_length=8",
            "optim.learning_rate=0.01",
            f"optim.max_steps={STEPS}",
            f"logging.num_samples={B * G}",
            f"logging.report_to={['tensorboard'] if HAS_TENSORBOARD else []}",
        ]
    )
    GRPOTrainer(cfg, reward_functions=[distinct, by_answer]).train()
    return d / "out"


def greedy_texts(model_dir, prompts, max_new_tokens=8):
    """Greedy completions from transformers' own ``generate``, one prompt at a time."""
    model, tok = load_model_and_tokenizer(model_dir)
    texts = []
    for p in prompts:
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])  # [1, P]
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        texts.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


def test_eval_every_scores_the_held_out_file_with_the_run_rewards(run, tiny_model_dir):
    rows = read_jsonl(run / "metrics.jsonl")
    evals = {r["step"]: r for r in rows if "eval/accuracy" in r}
    assert sorted(evals) == [0, 2, 4]  # step 0 is the starting model
    held_out = prompt_rows(6, 50)
    prompts = [r["prompt"] for r in held_out]
    answers = [r["answer"] for r in held_out]
    for step, model_dir in ((0, tiny_model_dir), (STEPS, run / "final")):
        texts = greedy_texts(model_dir, prompts)
        d = distinct(prompts, texts)
        e = by_answer(prompts, texts, answers)
        total = [a + b for a, b in zip(d, e, strict=True)]
        assert evals[step]["eval/reward"] == pytest.approx(sum(total) / 6)
        assert evals[step]["eval/accuracy"] == pytest.approx(sum(t > 0 for t in total) / 6)
        assert evals[step]["eval/rewards/distinct/mean"] == pytest.approx(sum(d) / 6)
        assert evals[step]["eval/rewards/by_answer/mean"] == pytest.approx(sum(e) / 6)


def test_samples_hold_the_step_rewards_and_advantages(run):
    samples = read_jsonl(run / "samples.jsonl")
    metrics = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl")}
    assert [s["step"] for s in samples] == [t for t in range(1, STEPS + 1) for _ in range(B * G)]
    train = {r["prompt"]: r for r in prompt_rows(8, 10)}
    for s in samples:  # each function's score, recomputed from the logged text
        c, answer = s["completion"], train[s["prompt"]]["answer"]
        expected = {
            "distinct": distinct([s["prompt"]], [c])[0],
            "by_answer": by_answer([s["prompt"]], [c], [answer])[0],
        }
        assert s["rewards"] == expected
        assert s["reward"] == sum(expected.values())
    for step in range(1, STEPS + 1):
        rows = [s for s in samples if s["step"] == step]
        rewards = torch.tensor([s["reward"] for s in rows]).view(B, G)
        assert metrics[step]["reward"] == pytest.approx(rewards.mean().item())
        # eq. II.I by hand: (r - group mean) / (Bessel std + 1e-4)
        mean = rewards.sum(1, keepdim=True) / G
        std = (((rewards - mean) ** 2).sum(1, keepdim=True) / (G - 1)).sqrt()
        expected = ((rewards - mean) / (std + 1e-4)).flatten()
        torch.testing.assert_close(torch.tensor([s["advantage"] for s in rows]), expected)
        assert len({s["prompt"] for s in rows[:G]}) == 1  # a whole group per prompt


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_events_read_back(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    rows = read_jsonl(run / "metrics.jsonl")
    for key in (
        "reward",
        "kl",
        "rewards/distinct/mean",
        "eval/accuracy",
        "completions/mean_length",
    ):
        logged = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        read = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in read] == [s for s, _ in logged], key
        # TensorBoard keeps float32
        torch.testing.assert_close(
            torch.tensor([v for _, v in read]), torch.tensor([v for _, v in logged])
        )
    assert [e.step for e in events.Scalars("eval/accuracy")] == [0, 2, 4]
    assert "samples/text_summary" in events.Tags()["tensors"]  # the samples table


def test_resumed_logs_drop_steps_past_the_checkpoint_and_a_torn_line(tmp_path):
    cfg = build_config(overrides=[f"run.output_dir={tmp_path}", "run.progress=false"])
    for name in ("metrics.jsonl", "samples.jsonl"):
        lines = [json.dumps({"step": s, "reward": s / 10}) for s in (1, 2, 3)]
        (tmp_path / name).write_text("\n".join(lines) + '\n{"step": 4, "rew')  # killed mid-write
    with open_sinks(cfg, start_step=2) as log:
        log.log(3, {"reward": 0.5}, [{"prompt": "p", "completion": "c", "reward": 0.5}])
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "reward": 0.1},
        {"step": 2, "reward": 0.2},
        {"step": 3, "reward": 0.5},
    ]
    assert [r["step"] for r in read_jsonl(tmp_path / "samples.jsonl")] == [1, 2, 3]


def test_samples_table_printed_every_n_steps(tmp_path, capsys):
    cfg = build_config(
        overrides=[
            f"run.output_dir={tmp_path}",
            "run.progress=false",
            "logging.print_samples_every=2",
        ]
    )
    sample = {"prompt": "7+7=", "completion": "14", "rewards": {"exact": 1.0}, "reward": 1.0}
    with open_sinks(cfg) as log:
        for step in (1, 2, 3):
            log.log(step, {"reward": 1.0}, [{**sample, "advantage": step / 4}])
    err = capsys.readouterr().err
    assert "samples at step 2" in err and "0.5" in err  # step 2's advantage
    assert "samples at step 1" not in err and "samples at step 3" not in err
    assert [r["advantage"] for r in read_jsonl(tmp_path / "samples.jsonl")] == [0.25, 0.5, 0.75]


def test_only_the_main_process_writes(tmp_path):
    cfg = build_config(overrides=[f"run.output_dir={tmp_path / 'r'}", "run.progress=false"])
    with open_sinks(cfg, main=False) as log:
        log.log(1, {"reward": 1.0}, [{"prompt": "p", "completion": "c", "reward": 1.0}])
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_runs_offline_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = build_config(
        overrides=[f"run.output_dir={tmp_path}", "run.progress=false", "logging.report_to=[wandb]"]
    )
    with open_sinks(cfg) as log:
        log.log(1, {"reward": 1.0}, [{"prompt": "p", "completion": "c", "reward": 1.0}])
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const out = document.createElement("div");
  out.id = "check";
  out.textContent = JSON.stringify({
    images: imgs.length,
    drawn: imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length,
    alts: imgs.map(i => i.alt),
    tables: document.querySelectorAll("table").length,
    best: document.querySelectorAll("tr.best").length,
    worst: document.querySelectorAll("tr.worst").length,
  });
  document.body.appendChild(out);
});
</script></body>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(run, tmp_path):
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    # the page is checked as rendered, with a probe script the report itself does not carry
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHECK))
    dom = subprocess.run(
        [
            "chromium", "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000", "--dump-dom", probe.as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    found = re.search(r'<div id="check">(.*?)</div>', dom)
    assert found, dom[-2000:]
    seen = json.loads(found.group(1).replace("&quot;", '"'))
    groups = metric_groups(numeric_keys(read_jsonl(run / "metrics.jsonl")))
    assert seen["images"] == seen["drawn"] == len(groups) >= 14
    for title in (
        "Training reward, combined and per function", "Held-out evaluation",
        "KL to the reference", "Entropy of the policy", "Clip ratios", "Completion lengths",
        "Time per phase", "Memory",
    ):  # fmt: skip
        assert title in seen["alts"]
    # four steps of samples (best 2, worst 2 of 8 each), the summary table
    assert seen["tables"] == 5 and seen["best"] == seen["worst"] == 8
    assert (run / "curves.png").is_file()
