"""A catalogue of bad inputs to the command line: config, data, model, reward functions,
checkpoints and arguments. Each is refused with exit code 2 and one line that names the
field or file and the value, and leaves the disk as it was (no run directory made,
nothing overwritten); a few damaged-but-recoverable inputs are tolerated instead.

``OUTCOMES`` counts the catalogue by outcome; ``test_catalogue_size`` pins it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from grpo.cli import main

SMALL = [
    "run.progress=false",
    "run.num_threads=1",
    "data.num_train_prompts=20",
    "rollout.prompts_per_step=2",
    "rollout.num_generations=2",
    "rollout.max_completion_length=6",
    "optim.max_steps=2",
]

REWARDS_PY = """
import time

def boom(prompts, completions, **kw):
    raise ValueError("no answer here")

def short(prompts, completions, **kw):
    return [1.0]

def text(prompts, completions, **kw):
    return ["high"] * len(completions)

def slow(prompts, completions, **kw):
    time.sleep(30)
    return [0.0] * len(completions)

def huge(prompts, completions, **kw):
    return [1e300] * len(completions)

not_callable = 3
"""

# outcome: "refused" (exit 2 before any work, disk untouched), "refused_in_step" (exit 2
# from the first step: nothing saved, no checkpoint), "tolerated" (exit 0, with a message)
Case = Callable[[Path, Path], tuple[list[str], str]]
CASES: dict[str, tuple[str, str, Case]] = {}


def case(kind: str, outcome: str = "refused"):
    def register(build: Case) -> Case:
        CASES[build.__name__] = (kind, outcome, build)
        return build

    return register


def train(tmp: Path, model: Path | str, *extra: str) -> list[str]:
    return ["train", f"model.name_or_path={model}", f"run.output_dir={tmp / 'run'}", *SMALL, *extra]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def jsonl(tmp: Path, *rows, name: str = "p.jsonl") -> str:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    return f"data.train_file={write(tmp / name, ''.join(x + chr(10) for x in lines))}"


def model_copy(tmp: Path, model: Path, drop: tuple[str, ...] = (), edit=None) -> Path:
    out = tmp / "model-copy"
    shutil.copytree(model, out)
    for name in drop:
        (out / name).unlink()
    if edit:
        edit(out)
    return out


# ---------------------------------------------------------------------------- config
@case("config")
def yaml_syntax_error(tmp, model):
    cfg = write(tmp / "run.yaml", "model:\n  name_or_path: x\n  dtype: [float32\nrun: {}\n")
    return ["train", str(cfg)], r"run\.yaml:\d+:\d+: YAML syntax error"


@case("config")
def yaml_top_level_list(tmp, model):
    return ["train", str(write(tmp / "run.yaml", "- a\n- b\n"))], r"run\.yaml.*expected a mapping"


@case("config")
def config_file_missing(tmp, model):
    return ["train", str(tmp / "nope.yaml")], r"nope\.yaml' does not exist"


@case("config")
def config_file_is_a_directory(tmp, model):
    (tmp / "conf.yaml").mkdir()
    return ["train", str(tmp / "conf.yaml")], r"conf\.yaml' is not a file"


@case("config")
def config_file_not_utf8(tmp, model):
    cfg = write(tmp / "run.yaml", b"run:\n  seed: \xff\n")
    return ["train", str(cfg)], r"run\.yaml'.*byte 13 is not UTF-8"


@case("config")
def unknown_key(tmp, model):
    return train(tmp, model, "algorithm.betta=0.1"), r"algorithm\.betta: unknown key"


@case("config")
def beta_infinite(tmp, model):
    return train(tmp, model, "algorithm.beta=.inf"), r"algorithm\.beta = inf: .*finite"


@case("config")
def learning_rate_nan(tmp, model):
    return train(tmp, model, "optim.learning_rate=.nan"), r"optim\.learning_rate = nan: .*finite"


@case("config")
def learning_rate_infinite(tmp, model):
    return train(tmp, model, "optim.learning_rate=.inf"), r"optim\.learning_rate = inf: .*finite"


@case("config")
def reward_weight_nan(tmp, model):
    return train(tmp, model, "rewards.weights=[.nan]"), r"rewards\.weights\.0 = nan: .*finite"


@case("config")
def epsilon_nan(tmp, model):
    return train(tmp, model, "algorithm.epsilon=.nan"), r"algorithm\.epsilon = nan: .*finite"


@case("config")
def temperature_infinite(tmp, model):
    return train(tmp, model, "rollout.temperature=.inf"), r"rollout\.temperature = inf"


@case("config")
def group_of_one(tmp, model):
    return train(tmp, model, "rollout.num_generations=1"), r"rollout\.num_generations = 1: "


@case("config")
def weights_do_not_match_functions(tmp, model):
    return train(tmp, model, "rewards.weights=[1,2]"), r"weights has 2 entries but functions has 1"


@case("config")
def override_without_equals(tmp, model):
    return train(tmp, model, "seed3"), r"override 'seed3': expected key=value"


@case("config")
def override_value_not_yaml(tmp, model):
    return train(tmp, model, "run.seed=[1,"), r"override 'run\.seed=\[1,': '\[1,' is not a YAML"


@case("config")
def integer_field_given_text(tmp, model):
    return train(tmp, model, "rollout.num_generations=abc"), r"rollout\.num_generations = 'abc'"


@case("config")
def unknown_task(tmp, model):
    return train(
        tmp, model, "data.task=nope"
    ), r"data\.task='nope': unknown task; allowed: add1to3, add1to3-direct, add2"


@case("config")
def reward_timeout_zero(tmp, model):
    return train(tmp, model, "rewards.timeout_s=0"), r"rewards\.timeout_s = 0: .*greater than 0"


@case("config")
def keep_last_zero(tmp, model):
    return train(tmp, model, "run.keep_last=0"), r"run\.keep_last = 0: "


@case("config")
def overlong_buffer_past_completion(tmp, model):
    return train(tmp, model, "rewards.overlong_buffer=6"), r"rewards\.overlong_buffer=6 must be"


# ---------------------------------------------------------------------------- data
@case("data")
def data_file_missing(tmp, model):
    return train(tmp, model, f"data.train_file={tmp / 'none.jsonl'}"), r"none\.jsonl' does not"


@case("data")
def data_file_is_a_plain_directory(tmp, model):
    (tmp / "d").mkdir()
    args = train(tmp, model, f"data.train_file={tmp / 'd'}")
    return args, r"data\.train_file '.*d' is a directory but not a save_to_disk one"


@case("data")
def data_file_of_unknown_type(tmp, model):
    f = write(tmp / "p.txt", "1+1=\n")
    return train(tmp, model, f"data.train_file={f}"), r"p\.txt': unsupported file type"


@case("data")
def data_file_empty(tmp, model):
    f = write(tmp / "p.jsonl", "")
    return train(tmp, model, f"data.train_file={f}"), r"p\.jsonl' is empty"


@case("data")
def data_file_blank_lines(tmp, model):
    f = write(tmp / "p.jsonl", "\n \n\n")
    return train(tmp, model, f"data.train_file={f}"), r"p\.jsonl' is empty"


@case("data")
def malformed_jsonl_line(tmp, model):
    arg = jsonl(tmp, {"prompt": "1+1="}, '{"prompt": "2+2=",', {"prompt": "3+3="})
    return train(tmp, model, arg), r"p\.jsonl' line 2: not valid JSON"


@case("data")
def jsonl_line_not_an_object(tmp, model):
    return train(tmp, model, jsonl(tmp, [1, 2])), r"p\.jsonl' line 1: a list; expected a JSON"


@case("data")
def prompt_is_an_int(tmp, model):
    arg = jsonl(tmp, {"prompt": "1+1="}, {"prompt": 5})
    return train(tmp, model, arg), r"p\.jsonl' line 2: prompt is 5 \(int\); expected a non-empty"


@case("data")
def prompt_is_null(tmp, model):
    arg = jsonl(tmp, {"prompt": None})
    return train(tmp, model, arg), r"line 1: prompt is None \(NoneType\)"


@case("data")
def prompt_is_empty(tmp, model):
    arg = jsonl(tmp, {"prompt": "1+1="}, {"prompt": "1+2="}, {"prompt": "  "})
    return train(tmp, model, arg), r"line 3: prompt is an empty string"


@case("data")
def prompt_is_an_empty_list(tmp, model):
    return train(tmp, model, jsonl(tmp, {"prompt": []})), r"line 1: prompt is \[\] \(list\)"


@case("data")
def chat_message_without_content(tmp, model):
    arg = jsonl(tmp, {"prompt": [{"role": "user"}]})
    return train(tmp, model, arg), r"line 1: prompt message 0 is \{'role': 'user'\}"


@case("data")
def chat_message_not_a_dict(tmp, model):
    arg = jsonl(tmp, {"prompt": [{"role": "user", "content": "hi"}, "hello"]})
    return train(tmp, model, arg), r"line 1: prompt message 1 is 'hello'"


@case("data")
def chat_message_unknown_role(tmp, model):
    arg = jsonl(tmp, {"prompt": [{"role": "robot", "content": "hi"}]})
    return train(tmp, model, arg), r"line 1: the prompt does not tokenise \(unknown role robot\)"


@case("data")
def data_not_utf8(tmp, model):
    f = write(tmp / "p.jsonl", b'{"prompt": "1+1="}\n{"prompt": "2+2="}\n{"prompt": "\xff"}\n')
    return train(tmp, model, f"data.train_file={f}"), r"line 3: byte 0xff at column 13 is not UTF-8"


@case("data")
def prompt_column_missing(tmp, model):
    arg = jsonl(tmp, {"question": "1+1="})
    return train(tmp, model, arg), r"line 1: no 'prompt' column \(data\.prompt_column; columns"


@case("data")
def parquet_file_corrupt(tmp, model):
    f = write(tmp / "p.parquet", b"PAR1 not really")
    return train(tmp, model, f"data.train_file={f}"), r"p\.parquet' cannot be read as parquet"


@case("data")
def csv_prompt_is_empty(tmp, model):
    f = write(tmp / "p.csv", 'prompt,answer\n1+1=,2\n" ",3\n')
    return train(tmp, model, f"data.train_file={f}"), r"p\.csv' row 1: prompt is an empty string"


@case("data")
def prompt_longer_than_positions(tmp, model):
    arg = jsonl(tmp, {"prompt": "1+1="}, {"prompt": "9" * 300})
    pattern = r"line 2: a prompt of 300 tokens \+ rollout\.max_completion_length=6 = 306 exceeds"
    return train(tmp, model, arg), pattern + r" max_position_embeddings=256"


@case("data")
def completion_longer_than_positions(tmp, model):
    args = train(tmp, model, "rollout.max_completion_length=256")
    return args, r"rollout\.max_completion_length=256 leaves no room .*max_position_embeddings=256"


@case("data")
def check_prompt_longer_than_positions(tmp, model):
    """``grpo check`` runs train's pre-flight checks: one line before the model loads."""
    arg = jsonl(tmp, {"prompt": "1+1="}, {"prompt": "9" * 300})
    args = ["check", f"model.name_or_path={model}", *SMALL, arg]
    return args, r"line 2: a prompt of 300 tokens \+ rollout\.max_completion_length=6 = 306"


# ---------------------------------------------------------------------------- model
@case("model")
def model_path_missing(tmp, model):
    return train(tmp, tmp / "no-model"), r"model\.name_or_path='.*no-model': no such directory"


@case("model")
def model_relative_path_missing(tmp, model):
    return train(tmp, "./no/such/model"), r"'\./no/such/model': no such directory \(a local path"


@case("model")
def model_path_is_a_file(tmp, model):
    f = write(tmp / "weights.bin", "x")
    return train(tmp, f), r"model\.name_or_path='.*weights\.bin' is a file"


@case("model")
def model_dir_empty(tmp, model):
    (tmp / "empty").mkdir()
    pattern = r"'.*empty' has no config\.json and no weights and no tokenizer"
    return train(tmp, tmp / "empty"), pattern


@case("model")
def model_dir_without_weights(tmp, model):
    m = model_copy(tmp, model, drop=("model.safetensors",))
    return train(tmp, m), r"model-copy' has no weights \(looked for model\.safetensors"


@case("model")
def model_dir_without_tokenizer(tmp, model):
    m = model_copy(tmp, model, drop=("tokenizer.json", "tokenizer_config.json"))
    return train(tmp, m), r"model-copy' has no tokenizer \(looked for tokenizer\.json"


@case("model")
def tokenizer_without_eos(tmp, model):
    def no_eos(path):
        config = json.loads((path / "tokenizer_config.json").read_text())
        del config["eos_token"]
        (path / "tokenizer_config.json").write_text(json.dumps(config))

    return train(tmp, model_copy(tmp, model, edit=no_eos)), r"model-copy': the tokenizer has no EOS"


@case("model")
def chat_prompts_without_chat_template(tmp, model):
    m = model_copy(tmp, model, drop=("chat_template.jinja",))
    arg = jsonl(tmp, {"prompt": "1+1="}, {"prompt": [{"role": "user", "content": "1+1="}]})
    return train(tmp, m, arg), r"line 2: the prompt is chat messages, but .* no chat template"


@case("model")
def model_config_json_broken(tmp, model):
    m = model_copy(tmp, model, edit=lambda p: (p / "config.json").write_text("{broken"))
    return train(tmp, m), r"model-copy/config\.json' is not valid JSON"


@case("model")
def reference_model_missing(tmp, model):
    args = train(tmp, model, f"model.ref_name_or_path={tmp / 'ref'}")
    return args, r"model\.ref_name_or_path='.*ref': no such directory"


# ---------------------------------------------------------------------------- reward functions
def rewards_file(tmp: Path) -> Path:
    return write(tmp / "my_rewards.py", REWARDS_PY)


@case("reward")
def reward_name_unknown(tmp, model):
    args = train(tmp, model, "rewards.functions=[nope]")
    return args, r"unknown reward function 'nope': not a registered name"


@case("reward")
def reward_file_missing(tmp, model):
    args = train(tmp, model, f"rewards.functions=[{tmp / 'r.py'}:f]")
    return args, r"reward function '.*r\.py:f': file '.*r\.py' not found"


@case("reward")
def reward_file_raises_on_import(tmp, model):
    f = write(tmp / "bad.py", "x = 1 / 0\n")
    args = train(tmp, model, f"rewards.functions=[{f}:x]")
    return args, r"reward function '.*bad\.py:x': running '.*bad\.py' raised ZeroDivisionError"


@case("reward")
def reward_function_missing_in_file(tmp, model):
    args = train(tmp, model, f"rewards.functions=[{rewards_file(tmp)}:nothing]")
    return args, r"my_rewards\.py:nothing': '.*my_rewards\.py' has no attribute 'nothing'"


@case("reward")
def reward_not_callable(tmp, model):
    args = train(tmp, model, f"rewards.functions=[{rewards_file(tmp)}:not_callable]")
    return args, r"my_rewards\.py:not_callable': 'not_callable' is a int, not callable"


@case("reward")
def reward_module_not_importable(tmp, model):
    args = train(tmp, model, "rewards.functions=[no_such_module_xyz:f]")
    return args, r"'no_such_module_xyz:f': cannot import 'no_such_module_xyz'"


@case("reward")
def reward_model_path_missing(tmp, model):
    args = train(tmp, model, f"rewards.functions=[model:{tmp / 'rm'}]")
    return args, r"rewards\.functions='.*rm': no such directory"


@case("reward")
def compare_with_reward_model_path_missing(tmp, model):
    """``grpo compare`` checks every arm's inputs before the first arm starts."""
    args = ["compare", f"model.name_or_path={model}", *SMALL]
    args += [f"rewards.functions=[model:{tmp / 'rm'}]", "--algorithms", "grpo,ppo"]
    return [*args, "--output-dir", str(tmp / "cmp")], r"rewards\.functions='.*rm': no such dir"


@case("reward")
def demo_reward_module_not_importable(tmp, model):
    """``grpo demo`` checks its GRPO stage's rewards and data before building a model."""
    args = ["demo", "--fast", "--output-dir", str(tmp / "demo"), "rewards.functions=[nope_xyz:f]"]
    return args, r"'nope_xyz:f': cannot import 'nope_xyz'"


@case("reward", "refused_in_step")
def reward_raises(tmp, model):
    args = train(tmp, model, f"rewards.functions=[{rewards_file(tmp)}:boom]")
    return args, r"reward function 'boom' raised ValueError: no answer here on sample 0"


@case("reward", "refused_in_step")
def reward_returns_too_few(tmp, model):
    args = train(tmp, model, f"rewards.functions=[{rewards_file(tmp)}:short]")
    return args, r"reward function 'short' returned 1 values for 4 completions"


@case("reward", "refused_in_step")
def reward_returns_text(tmp, model):
    args = train(tmp, model, f"rewards.functions=[{rewards_file(tmp)}:text]")
    return args, r"reward function 'text' returned 'high' \(str\) for sample 0"


@case("reward", "refused_in_step")
def reward_too_slow(tmp, model):
    extra = (f"rewards.functions=[{rewards_file(tmp)}:slow]", "rewards.timeout_s=0.5")
    return train(tmp, model, *extra), r"reward function 'slow' did not return within rewards\.tim"


@case("reward", "refused_in_step")
def reward_beyond_float32(tmp, model):
    args = train(tmp, model, f"rewards.functions=[{rewards_file(tmp)}:huge]")
    return args, r"reward function 'huge' returned 1e\+300 for sample 0 .*float32's range"


# ---------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """A 2-step run with a checkpoint after each step."""
    tmp = tmp_path_factory.mktemp("finished")
    assert main(train(tmp, tiny_model_dir, "run.save_every=1", "algorithm.beta=0")) == 0
    return tmp / "run"


def prior_run(tmp: Path) -> Path:
    return tmp / "run"  # filled from the finished_run fixture before the case is built


def resume(tmp, model, *extra):
    return [*train(tmp, model, "run.save_every=1", "algorithm.beta=0", *extra), "--resume"]


@case("checkpoint")
def resume_without_checkpoint(tmp, model):
    shutil.rmtree(prior_run(tmp) / "checkpoints")
    return resume(tmp, model), r"no checkpoint to resume from in '.*run'"


@case("checkpoint")
def resume_from_missing_path(tmp, model):
    args = [*train(tmp, model, "run.save_every=1", "algorithm.beta=0"), "--resume", "/no/ckpt"]
    return args, r"checkpoint '/no/ckpt' does not exist"


@case("checkpoint")
def resume_with_another_learning_rate(tmp, model):
    args = resume(tmp, model, "optim.learning_rate=0.5")
    return args, r"differs from .*step-2' .*\(optim\.learning_rate: 1e-06 -> 0\.5\); only optim"


@case("checkpoint")
def resume_with_another_seed_and_task(tmp, model):
    args = resume(tmp, model, "run.seed=7", "data.task=add3")
    return args, r"\(data\.task: 'add2' -> 'add3'; run\.seed: 0 -> 7\).*--allow-config-change"


@case("checkpoint")
def resume_with_every_checkpoint_truncated(tmp, model):
    for step in (1, 2):
        weights = prior_run(tmp) / "checkpoints" / f"step-{step}" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    return resume(tmp, model), r"no intact checkpoint to resume from in '.*run': all 2 are damaged"


@case("checkpoint")
def resume_from_damaged_path(tmp, model):
    path = prior_run(tmp) / "checkpoints" / "step-1"
    state = path / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:-10])
    args = [*train(tmp, model, "run.save_every=1", "algorithm.beta=0"), "--resume", str(path)]
    return args, r"step-1': trainer_state\.pt has \d+ bytes, the manifest says \d+"


@case("checkpoint")
def resume_from_path_without_manifest(tmp, model):
    path = prior_run(tmp) / "checkpoints" / "step-2"
    (path / "manifest.json").unlink()
    args = [*train(tmp, model, "run.save_every=1", "algorithm.beta=0"), "--resume", str(path)]
    return args, r"step-2' has no manifest\.json: it was not completely written"


@case("checkpoint")
def fresh_run_over_checkpoints(tmp, model):
    args = train(tmp, model, "run.save_every=1", "algorithm.beta=0")
    return args, r"run\.output_dir='.*run' holds checkpoints of an earlier run \(newest: step-2\)"


@case("checkpoint", "tolerated")
def resume_with_newest_checkpoint_truncated(tmp, model):
    weights = prior_run(tmp) / "checkpoints" / "step-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    args = resume(tmp, model, "optim.max_steps=3")
    return args, r"skipping damaged checkpoint: checkpoint '.*step-2': model\.safetensors has 100"


@case("checkpoint", "tolerated")
def resume_with_torn_metrics_line(tmp, model):
    log = prior_run(tmp) / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "rew')
    return resume(tmp, model, "optim.max_steps=3"), r"resumed from step 2"


@case("cli", "tolerated")
def report_with_torn_metrics_line(tmp, model):
    log = prior_run(tmp) / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "rew')
    return ["report", str(prior_run(tmp))], r"report: "


# ---------------------------------------------------------------------------- command line
@case("cli")
def eval_k_zero(tmp, model):
    return [
        "eval",
        "--model",
        str(model),
        "--k",
        "0",
    ], r"argument --k: '0': expected an integer >= 1"


@case("cli")
def eval_samples_below_k(tmp, model):
    args = ["eval", "--model", str(model), "--k", "4", "--samples", "2"]
    return args, r"--samples=2 is smaller than --k=4"


@case("cli")
def eval_n_negative(tmp, model):
    return ["eval", "--model", str(model), "--n", "-3"], r"argument --n: '-3': expected an integer"


@case("cli")
def eval_unknown_task(tmp, model):
    return ["eval", "--model", str(model), "--task", "nope"], r"--task='nope': unknown task"


@case("cli")
def eval_model_missing(tmp, model):
    args = ["eval", "--model", str(tmp / "gone")]
    return args, r"--model='.*gone': no such directory \(a local path, so the hub is not tried\)"


@case("cli")
def sft_steps_zero(tmp, model):
    args = ["sft", "--model", str(model), "--output", str(tmp / "o"), "--steps", "0"]
    return args, r"argument --steps: '0': expected an integer >= 1"


@case("cli")
def sft_learning_rate_nan(tmp, model):
    args = ["sft", "--model", str(model), "--output", str(tmp / "o"), "--lr", "nan"]
    return args, r"argument --lr: 'nan': expected a finite number > 0"


@case("cli")
def sft_output_is_a_file(tmp, model):
    out = write(tmp / "o", "keep me")
    args = ["sft", "--model", str(model), "--output", str(out), "--steps", "1"]
    return args, r"--output='.*o' is not a directory"


@case("cli")
def init_onto_non_empty_directory(tmp, model):
    write(tmp / "m" / "notes.txt", "mine")
    return ["init", str(tmp / "m")], r"grpo init '.*m': a non-empty directory is there already"


@case("cli")
def init_onto_a_file(tmp, model):
    write(tmp / "m", "mine")
    return ["init", str(tmp / "m")], r"grpo init '.*m': a file is there already"


@case("cli")
def init_hidden_size_zero(tmp, model):
    return ["init", str(tmp / "m"), "--hidden-size", "0"], r"argument --hidden-size: '0'"


@case("cli")
def output_dir_is_a_file(tmp, model):
    write(tmp / "run", "not a directory")
    return train(tmp, model), r"run\.output_dir='.*run' is not a directory; expected"


@case("cli")
def output_dir_below_a_file(tmp, model):
    write(tmp / "f", "x")
    args = ["train", f"model.name_or_path={model}", f"run.output_dir={tmp / 'f' / 'run'}", *SMALL]
    return args, r"run\.output_dir='.*f/run' is not a directory \('.*f' is a file\)"


@case("cli")
def report_without_a_log(tmp, model):
    return ["report", str(tmp)], r"grpo report '.*': no metrics\.jsonl there"


# ---------------------------------------------------------------------------- running them
def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse
        return stop.code


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, tmp_path, tiny_model_dir, request, capsys):
    kind, outcome, build = CASES[name]
    if kind == "checkpoint" or name == "report_with_torn_metrics_line":
        shutil.copytree(request.getfixturevalue("finished_run"), tmp_path / "run")
    argv, pattern = build(tmp_path, tiny_model_dir)
    before = snapshot(tmp_path)
    code = run_cli(argv)
    err = capsys.readouterr().err
    if outcome == "tolerated":
        assert code == 0, err
        assert re.search(pattern, err), err
        return
    assert code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    after = snapshot(tmp_path)
    if outcome == "refused":
        assert after == before  # nothing written, nothing lost
    else:  # the first step failed: no checkpoint, no final model; inputs untouched
        assert {k: v for k, v in after.items() if k in before} == before
        assert not any(k.startswith(("run/checkpoints/step", "run/final")) for k in after)


OUTCOMES = Counter(outcome for _, outcome, _ in CASES.values())
KINDS = Counter(kind for kind, _, _ in CASES.values())


def test_catalogue_size():
    assert sum(OUTCOMES.values()) >= 40
    assert set(KINDS) == {"config", "data", "model", "reward", "checkpoint", "cli"}


def test_train_with_no_model_makes_the_tiny_one(tmp_path, monkeypatch, capsys):
    """``grpo train`` with the default model path and nothing there builds the tiny model
    (instead of asking the hub for ``runs/tiny-model``)."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", *SMALL, "optim.max_steps=1"]) == 0
    assert "no model at 'runs/tiny-model', so a tiny random one was made" in capsys.readouterr().err
    assert (tmp_path / "runs" / "tiny-model" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "grpo" / "final" / "model.safetensors").is_file()
