"""Real checkpoints' conventions and the errors that come before any work: every end token
the generation config lists stops a completion; message prompts need a chat template; an
engine that cannot run is a config error; every config key the README names exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from grpo.config import Config, ConfigError, build_config
from grpo.data import encode_prompt
from grpo.hf import load_model_and_tokenizer
from grpo.modeling import build_char_tokenizer
from grpo.trainer import GRPOTrainer

README = Path(__file__).resolve().parents[1] / "README.md"
MAX_LEN = 8


def distinct_chars(prompts, completions, **kwargs):
    return [len(set(c)) / 8 for c in completions]


def one_prompt_cfg(model_dir, out, prompt, *extra):
    data = out / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": prompt}) + "\n")
    return build_config(
        overrides=[
            f"model.name_or_path={model_dir}",
            f"run.output_dir={out}",
            f"data.train_file={data}",
            "run.progress=false",
            "rollout.prompts_per_step=1",
            "rollout.num_generations=2",
            f"rollout.max_completion_length={MAX_LEN}",
            "rollout.temperature=0.001",  # greedy in effect
            "algorithm.beta=0",
            *extra,
        ]
    )


def greedy_path(model, prompt_ids, n):
    """The model's n most likely next tokens, one forward pass each (no cache, no engine)."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


def test_generation_stops_at_every_end_token_the_model_lists(tiny_model_dir, tmp_path):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    path = greedy_path(model, encode_prompt(tokenizer, "1+2="), MAX_LEN)
    assert tokenizer.eos_token_id not in path  # alone, the tokenizer's EOS never stops it
    # a second end token: the first greedy token not seen before it (the first token if none)
    k = next((i for i in range(1, MAX_LEN) if path[i] not in path[:i]), 0)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, path[k]]
    two_eos = tmp_path / "two-eos"
    model.save_pretrained(two_eos)
    tokenizer.save_pretrained(two_eos)

    out = tmp_path / "run"
    out.mkdir()
    t = GRPOTrainer(one_prompt_cfg(two_eos, out, "1+2="), reward_functions=[distinct_chars])
    assert set(t.sampling.eos_token_ids) == {tokenizer.eos_token_id, path[k]}
    metrics = t.train_step()
    assert metrics["completions/mean_length"] == k + 1  # the end token is kept, then it stops
    assert metrics["completions/truncated_frac"] == 0.0

    out = tmp_path / "control"
    out.mkdir()
    cfg = one_prompt_cfg(tiny_model_dir, out, "1+2=")  # the config lists the tokenizer's only
    metrics = GRPOTrainer(cfg, reward_functions=[distinct_chars]).train_step()
    assert metrics["completions/mean_length"] == MAX_LEN
    assert metrics["completions/truncated_frac"] == 1.0


def test_message_prompts_without_chat_template_stop_before_the_model_loads(tmp_path):
    # the directory holds a tokenizer without a chat template and no model at all: the
    # error must come from the check, not from loading weights that are not there
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "no-template")
    out = tmp_path / "run"
    out.mkdir()
    cfg = one_prompt_cfg(tmp_path / "no-template", out, [{"role": "user", "content": "1+2="}])
    message = (
        r"data.prompt_column='prompt': row 0 is a list of chat messages, but the tokenizer "
        r"of model.name_or_path='.*no-template' has no chat template"
    )
    with pytest.raises(ConfigError, match=message):
        GRPOTrainer(cfg, reward_functions=[distinct_chars])


def test_engine_that_cannot_run_is_a_config_error():
    # vllm is not installed here (and the engine is not built yet): either way the config
    # names the field, the value, why, and the engines that can run
    reason = r"(needs the vllm package \(GPU only\)|is not implemented yet)"
    message = rf"rollout\.engine = 'vllm': .*{reason}.*usable here: torch"
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=["rollout.engine=vllm"])


def readme_keys(text: str) -> set[str]:
    """``section.key`` names in README code spans and blocks (``rollout.*`` excluded), minus
    module paths such as ``rollout.torch_engine`` and file names such as ``data.py``."""
    sections = "|".join(Config.model_fields)
    found = set(re.findall(rf"(?<![\w./-])((?:{sections})\.[a-z_]+)\b(?![/(])", text))
    src = README.parent / "src" / "grpo"
    return {
        key
        for key in found
        if not (src / key.replace(".", "/")).with_suffix(".py").exists()
        and not (src / key.replace(".", "/")).is_dir()
        and not key.endswith(".py")
    }


def test_every_config_key_the_readme_names_exists():
    keys = readme_keys(README.read_text())
    assert len(keys) > 20  # the parser finds the README's keys at all
    missing = []
    for key in sorted(keys):
        section, leaf = key.split(".")
        if leaf not in type(getattr(Config(), section)).model_fields:
            missing.append(key)
    assert missing == []


def test_readme_key_parser_sees_keys_and_skips_modules():
    text = "`algorithm.beta=0`, `optim.*`, `rollout.torch_engine`, `data.py`, `run.nope`"
    assert readme_keys(text) == {"algorithm.beta", "run.nope"}


def test_cli_prints_the_engine_error_in_one_piece(capsys):
    from grpo.cli import main

    assert main(["train", "rollout.engine=vllm"]) == 2
    out = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "rollout.engine = 'vllm'" in out
    assert "usable here: torch" in out
    if "needs the vllm package" in out:
        assert "pip install 'grpo[vllm]'" in out  # brackets survive the console's markup
