"""Reward layer: batch scoring and its errors, loading, and the built-in reward functions."""

from __future__ import annotations

import doctest
import math
import os
import re
import time

import pytest
import torch

import grpo.rewards
import grpo.rewards._sandboxed
from grpo.rewards import (
    REWARDS,
    RewardError,
    boxed_format,
    load_reward_function,
    make_code_execution,
    math_accuracy,
    register_reward,
    score,
    score_completions,
    think_format,
    trainer_state,
)

NAN = float("nan")


def constant(values):
    """A reward function returning ``values`` whatever the batch."""

    def reward(prompts, completions, **kwargs):
        return values

    return reward


def first_fn(prompts, completions, **kwargs):
    return [1, None]


def second_fn(prompts, completions, **kwargs):
    return [0, 1]


# ---- score: combining -------------------------------------------------------------------


def test_weighted_sum_skips_none():
    out = score([first_fn, second_fn], [1, 0.5], ["p", "p"], ["a", "b"], {})
    # sample 0: 1 * 1 + 0.5 * 0 = 1.0; sample 1: first is None, skipped, 0.5 * 1 = 0.5
    torch.testing.assert_close(out.rewards, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(
        out.per_function, torch.tensor([[1.0, 0.0], [NAN, 1.0]]), equal_nan=True
    )
    assert out.names == ["first_fn", "second_fn"]


def test_no_weights_means_all_ones_and_nan_counts_as_none():
    out = score([constant([2, NAN]), constant([True, 3.5])], None, ["p"] * 2, ["a", "b"], {})
    # sample 0: 2 + True (1) = 3.0; sample 1: NaN is None, so 3.5 alone
    torch.testing.assert_close(out.rewards, torch.tensor([3.0, 3.5]))


def test_tensor_results_are_accepted():
    out = score([constant(torch.tensor([0.25, 0.75]))], [2.0], ["p"] * 2, ["a", "b"], {})
    torch.testing.assert_close(out.rewards, torch.tensor([0.5, 1.5]))  # 2 * 0.25, 2 * 0.75


def test_same_function_twice_gets_two_names():
    out = score([second_fn, second_fn], None, ["p"] * 2, ["a", "b"], {})
    assert out.names == ["second_fn", "second_fn_2"]


def test_columns_and_completion_ids_reach_the_function():
    def uses_columns(prompts, completions, answer, completion_ids, **kwargs):
        return [
            float(c == a) + len(ids)
            for c, a, ids in zip(completions, answer, completion_ids, strict=True)
        ]

    out = score([uses_columns], None, ["p"] * 2, ["4", "5"], {"answer": ["4", "4"]}, [[1, 2], [3]])
    torch.testing.assert_close(out.rewards, torch.tensor([3.0, 1.0]))  # 1 + 2 tokens, 0 + 1


# ---- score: errors ----------------------------------------------------------------------


def test_weights_length_must_match():
    with pytest.raises(RewardError, match=r"3 reward weights for 2 reward functions"):
        score([first_fn, second_fn], [1, 1, 1], ["p"] * 2, ["a", "b"], {})


def test_sample_with_no_reward_at_all_is_an_error():
    also_none = _named(constant([0, None]), "also_none")
    with pytest.raises(RewardError, match=r"sample 1 \(completion 'b'\).*first_fn, also_none"):
        score([first_fn, also_none], None, ["p"] * 2, ["a", "b"], {})


def test_raising_function_names_itself_and_the_sample():
    def boom(prompts, completions, **kwargs):
        return [1 / 0 if "bad" in c else 1.0 for c in completions]

    with pytest.raises(RewardError, match=r"'boom' raised ZeroDivisionError.*sample 2.*'very bad'"):
        score([boom], None, ["p"] * 3, ["ok", "fine", "very bad"], {})


def test_wrong_length_names_function_and_sample():
    with pytest.raises(RewardError, match=r"'short' returned 2 values for 3.*sample 2"):
        score([_named(constant([1.0, 1.0]), "short")], None, ["p"] * 3, ["a", "b", "c"], {})


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ("1.0", r"'bad' returned str; expected a list of 2"),  # a string, not a list
        ([1.0, "1.0"], r"'bad' returned '1.0' \(str\) for sample 1 \(completion 'b'\)"),
        ([[1.0], [0.0]], r"'bad' returned \[1.0\] \(list\) for sample 0 \(completion 'a'\)"),
        ([1.0, math.inf], r"'bad' returned inf \(float\) for sample 1"),
        (torch.ones(2, 1), r"'bad' returned an array of shape \(2, 1\)"),
    ],
)
def test_wrong_type_names_function_and_sample(result, expected):
    with pytest.raises(RewardError, match=expected):
        score([_named(constant(result), "bad")], None, ["p"] * 2, ["a", "b"], {})


def test_column_of_wrong_length_is_an_error():
    with pytest.raises(RewardError, match=r"column 'solution' has 1 values for 2 samples"):
        score([first_fn], None, ["p"] * 2, ["a", "b"], {"solution": ["1"]})


def _named(function, name):
    function.__name__ = name
    return function


# ---- TRL compatibility ------------------------------------------------------------------


def test_trl_reward_functions_work_unchanged():
    # Exactly as in TRL's GRPOTrainer docs.
    def reward_len(completions, **kwargs):
        return [-abs(20 - len(completion)) for completion in completions]

    def format_reward_func(completions, **kwargs):
        """Reward function that checks if the completion has a specific format."""
        pattern = r"^<think>.*?</think><answer>.*?</answer>$"
        completion_contents = [completion[0]["content"] for completion in completions]
        matches = [re.match(pattern, content) for content in completion_contents]
        return [1.0 if match else 0.0 for match in matches]

    out = score([reward_len], None, ["p"] * 2, ["x" * 20, "x" * 25], {})
    torch.testing.assert_close(out.rewards, torch.tensor([0.0, -5.0]))  # -|20-20|, -|20-25|

    prompts = [[{"role": "user", "content": "2+2?"}]] * 2
    completions = [
        [{"role": "assistant", "content": "<think>easy</think><answer>4</answer>"}],
        [{"role": "assistant", "content": "4"}],
    ]
    out = score([format_reward_func], None, prompts, completions, {})
    torch.testing.assert_close(out.rewards, torch.tensor([1.0, 0.0]))


def test_score_completions_builds_trls_arguments_and_collects_logs():
    chat = [{"role": "user", "content": "2+2?"}]
    rows = [{"prompt": chat, "answer": "4"}, {"prompt": "3+3?", "answer": "6"}]
    seen = {}

    def logs(prompts, completions, answer, completion_ids, trainer_state, log_metric, log_extra):
        seen.update(prompts=prompts, completions=completions, answer=answer, step=trainer_state)
        log_metric("calls", 1.0)
        log_extra("length", [len(ids) for ids in completion_ids])
        return [1.0] * len(completions)

    def logs_too(completions, log_metric, **kwargs):
        log_metric("calls", 3.0)
        return [0.5] * len(completions)

    out = score_completions(
        [logs, logs_too], None, rows, "prompt", ["4", "5", "6", "7"], [[1], [2, 3], [4], []], "S"
    )
    # G = 4 texts / 2 rows = 2; the chat row's completions become assistant messages
    assert seen["prompts"] == [chat, chat, "3+3?", "3+3?"]
    assert seen["completions"] == [
        [{"role": "assistant", "content": "4"}],
        [{"role": "assistant", "content": "5"}],
        "6",
        "7",
    ]
    assert seen["answer"] == ["4", "4", "6", "6"]
    assert seen["step"] == "S"
    torch.testing.assert_close(out.rewards, torch.tensor([1.5] * 4))  # 1 + 0.5
    assert out.logged_metrics == {"calls": 2.0}  # (1 + 3) / 2 calls
    assert out.extra_columns == {"length": [1, 2, 1, 0]}


def test_trainer_state_is_transformers_own():
    from transformers import TrainerState

    state = trainer_state(global_step=6, max_steps=20, epoch=1.5)
    assert isinstance(state, TrainerState)
    assert (state.global_step, state.max_steps, state.epoch) == (6, 20, 1.5)


def test_builtins_take_conversational_completions():
    prompts = [[{"role": "user", "content": "Halve 1."}]] * 2
    completions = [
        [{"role": "assistant", "content": "<think>1 / 2</think> \\boxed{\\frac{1}{2}}"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "\\boxed{2}"}]}],
    ]
    out = score(
        [math_accuracy, think_format, boxed_format],
        [1.0, 0.5, 0.25],
        prompts,
        completions,
        {"solution": ["0.5", "0.5"]},
    )
    # sample 0: 1 * 1 + 0.5 * 1 + 0.25 * 1 = 1.75; sample 1: 1 * 0 + 0.5 * 0 + 0.25 * 1 = 0.25
    torch.testing.assert_close(out.rewards, torch.tensor([1.75, 0.25]))


# ---- registry and loading ---------------------------------------------------------------


@pytest.fixture
def clean_registry():
    saved = dict(REWARDS)
    yield
    REWARDS.clear()
    REWARDS.update(saved)


def test_builtins_are_registered():
    for name in ["math_accuracy", "think_format", "boxed_format", "code_execution"]:
        assert load_reward_function(name) is REWARDS[name]


def test_register_reward(clean_registry):
    @register_reward("always_one")
    def always_one(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    assert load_reward_function("always_one") is always_one
    with pytest.raises(RewardError, match=r"'always_one' is already registered"):
        register_reward("always_one")(first_fn)


def test_load_from_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "def short(completions, **kwargs):\n    return [-len(c) for c in completions]\n"
    )
    function = load_reward_function(f"{path}:short")
    assert function(completions=["ab", "abc"]) == [-2, -3]
    with pytest.raises(RewardError, match=r"my_rewards.py:long'.*has no attribute 'long'"):
        load_reward_function(f"{path}:long")
    with pytest.raises(RewardError, match=r"'.*missing.py' not found"):
        load_reward_function(f"{tmp_path / 'missing.py'}:short")


def test_load_from_module():
    assert load_reward_function("grpo.rewards.math:math_accuracy") is math_accuracy
    with pytest.raises(RewardError, match=r"'no_such_module:f': cannot import"):
        load_reward_function("no_such_module:f")
    with pytest.raises(RewardError, match=r"'DEFAULT_TIMEOUT' is a float, not callable"):
        load_reward_function("grpo.rewards.code:DEFAULT_TIMEOUT")


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(RewardError, match=r"unknown reward function 'acuracy'.*math_accuracy"):
        load_reward_function("acuracy")


# ---- math_accuracy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "solution", "expected"),
    [
        ("The answer is \\boxed{1/2}", "0.5", 1.0),  # 1/2 == 0.5
        ("\\boxed{\\frac{2}{4}}", "$\\frac{1}{2}$", 1.0),
        ("I get 3, then 0.5", "0.5", 1.0),  # no box: the last number
        ("\\boxed{0.5} no wait, 3", "0.5", 1.0),  # the box wins over a later number
        ("\\boxed{3} no wait, \\boxed{0.5}", "0.5", 1.0),  # the last box wins
        ("\\boxed{0.4}", "0.5", 0.0),
        ("\\boxed{0.5", "0.5", 0.0),  # unclosed: truncated, no answer
        ("}{ \\boxed{ \\frac{{ ^^ $$ garbage", "0.5", 0.0),
        ("", "0.5", 0.0),
        ("0.5", "not a number", None),  # unparseable gold: not applicable, as TRL
    ],
)
def test_math_accuracy(completion, solution, expected):
    assert math_accuracy(prompts=["q"], completions=[completion], solution=[solution]) == [expected]


# ---- format rewards ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "completion", "expected"),
    [
        ("q", "<think>2 and 2 make 4</think> The answer is 4.", 1.0),
        ("q", "\n<think>\nreasoning\n</think>\n<answer>4</answer>\n", 1.0),
        ("q", "<think>reasoning</think>", 0.0),  # no answer after it
        ("q", "<think></think> 4", 0.0),  # no reasoning
        ("q", "4 <think>reasoning</think> 4", 0.0),  # not at the start
        ("q", "<think>a</think><think>b</think> 4", 0.0),  # two blocks
        ("q", "<think>a <think>b</think> 4", 0.0),  # nested
        ("q", "reasoning</think> 4", 0.0),  # opening tag missing
        ("Solve. <think>\n", "reasoning</think> 4", 1.0),  # template prefilled <think>
    ],
)
def test_think_format(prompt, completion, expected):
    assert think_format(prompts=[prompt], completions=[completion]) == [expected]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}}.", 1.0),
        ("\\boxed{1} and \\boxed{2}", 0.0),
        ("\\boxed{1", 0.0),
        ("1", 0.0),
    ],
)
def test_boxed_format(completion, expected):
    assert boxed_format(prompts=["q"], completions=[completion]) == [expected]


# ---- code_execution ---------------------------------------------------------------------

SQUARE_TESTS = "assert square(2) == 4\nassert square(3) == 9"


def run_code(completions, tests, timeout=5.0):
    code_execution = make_code_execution(timeout=timeout)
    return code_execution(prompts=["q"] * len(completions), completions=completions, tests=tests)


def fenced(code):
    return f"Here you go:\n```python\n{code}\n```\nDone."


def test_code_execution_scores_fraction_of_asserts():
    completions = [
        fenced("def square(x):\n    return x * x"),  # both asserts pass: 2/2
        fenced("def square(x):\n    return x + x"),  # 2+2 == 4 passes, 3+3 != 9 fails: 1/2
        fenced("def square(x) return x"),  # syntax error: 0
        "def square(x):\n    return x ** 2",  # no fence: the whole completion, 2/2
    ]
    assert run_code(completions, [SQUARE_TESTS] * 4) == [1.0, 0.5, 0.0, 1.0]


def test_code_execution_takes_a_list_of_tests_per_sample():
    tests = [["assert inc(1) == 2", "assert inc(2) == 3", "assert inc(3) == 5", "bad("]]
    # 2 of 4 pass: the third is wrong, the fourth does not compile
    assert run_code([fenced("def inc(x):\n    return x + 1")], tests) == [0.5]


@pytest.mark.parametrize(
    "code",
    [
        "raise RuntimeError('at import')",
        "import sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        "x = bytearray(4 << 30)",  # over the 1 GiB address-space limit: MemoryError
    ],
)
def test_code_execution_crash_gives_zero(code):
    assert run_code([fenced("def square(x):\n    return x * x\n" + code)], [SQUARE_TESTS]) == [0.0]


def test_code_execution_infinite_loop_times_out():
    start = time.monotonic()
    assert run_code([fenced("while True:\n    pass")], [SQUARE_TESTS], timeout=1) == [0.0]
    assert time.monotonic() - start < 4  # 1 s timeout, plus interpreter start and cleanup


def test_code_execution_sees_no_environment(monkeypatch):
    monkeypatch.setenv("GRPO_SECRET", "hunter2")
    code = "import os\nseen = dict(os.environ)"
    tests = "assert 'GRPO_SECRET' not in seen\nassert 'PATH' not in seen\nassert 'HOME' not in seen"
    assert run_code([fenced(code)], [tests]) == [1.0]


def test_code_execution_writes_stay_in_its_own_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = (
        "import os\nos.system('echo hi > shell.txt')\nopen('note.txt', 'w').write('x')\n"
        "def read(name):\n    return open(name).read()"
    )
    tests = [
        f"assert os.getcwd() != {str(tmp_path)!r}",  # os is the program's module
        "assert read('note.txt') == 'x'",
        "assert read('shell.txt') == 'hi\\n'",
    ]
    assert run_code([fenced(code)], [tests]) == [1.0]
    assert os.listdir(tmp_path) == []  # nothing reached the trainer's working directory


def test_code_execution_output_cannot_fake_the_count():
    # The count line carries a per-run random nonce; printed lines go to /dev/null.
    code = "import sys\nprint('1'); print('2 2'); sys.stdout.flush()\nsquare = None"
    assert run_code([fenced(code)], [SQUARE_TESTS]) == [0.0]


# ---- docstring examples -----------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    [
        grpo.rewards.text,
        grpo.rewards.math,
        grpo.rewards.format,
        grpo.rewards.code,
        grpo.rewards._sandboxed,
    ],
    ids=lambda m: m.__name__,
)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0
    assert result.failed == 0
