"""Built-in arithmetic task: generators, splits, demonstrations and verifiers."""

import doctest

import pytest

import grpo.tasks.arithmetic
from grpo.tasks import (
    TASKS,
    ArithmeticTask,
    correctness_reward,
    direct_correctness_reward,
    extract_answer,
    format_reward,
    get_task,
    split_steps,
    step_rewards,
)

ADD = {"prompt": "47+85=", "answer": "132", "a": 47, "b": 85, "op": "+"}
SUB = {"prompt": "805-47=", "answer": "758", "a": 805, "b": 47, "op": "-"}
ADD_DEMO = "7+5+0=12\n4+8+1=13\nA:132"
# 805-47: 5-7 borrows (15-7=8); 0-4-1 borrows (10-4-1=5); 8-0-1=7; answer 758
SUB_DEMO = "15-7-0=8\n10-4-1=5\n8-0-1=7\nA:758"


def test_doctests_in_docstrings_hold():
    result = doctest.testmod(grpo.tasks.arithmetic)
    assert result.attempted >= 6 and result.failed == 0


# ---------------------------------------------------------------- registry


def test_registry_and_get_task():
    assert get_task("add2") is TASKS["add2"]
    assert {"add2", "add3", "addsub3"} <= set(TASKS)
    with pytest.raises(ValueError, match="add2") as error:
        get_task("mul2")
    assert "mul2" in str(error.value)


def test_bad_task_arguments_are_rejected():
    with pytest.raises(ValueError, match="ops"):
        ArithmeticTask(2, "*")
    with pytest.raises(ValueError, match="digits"):
        ArithmeticTask((3, 1))
    with pytest.raises(ValueError, match="split"):
        TASKS["add2"].problems("validation", 1, seed=0)


# ---------------------------------------------------------------- problems and splits


@pytest.mark.parametrize("name", ["add2", "addsub2", "addsub3", "add1to3"])
def test_train_and_test_never_share_a_problem(name):
    task = TASKS[name]
    train = {p["prompt"] for p in task.problems("train", 5000, seed=0)}
    test = {p["prompt"] for p in task.problems("test", 500, seed=1)}
    assert len(test) == 500  # distinct while the split is far from exhausted
    assert not train & test


def test_commuted_addition_stays_in_its_split():
    task = TASKS["add2"]
    test = {(p["a"], p["b"]) for p in task.problems("test", 300, seed=0)}
    train = {(p["a"], p["b"]) for p in task.problems("train", 6000, seed=0)}
    assert not {(b, a) for a, b in test} & train


def test_whole_add2_space_is_split_exactly():
    task = TASKS["add2"]  # 90 * 90 = 8100 problems
    train = {p["prompt"] for p in task.problems("train", 7000, seed=0)}
    test = {p["prompt"] for p in task.problems("test", 700, seed=0)}
    assert len(train) == 7000 and len(test) == 700  # nearly all of each split
    assert not train & test
    # asking for more than a split holds repeats it instead of leaking the other split
    many_tests = task.problems("test", 2000, seed=0)
    assert len({p["prompt"] for p in many_tests}) < 1000
    assert not {p["prompt"] for p in many_tests} & train


def test_problems_are_reproducible_from_the_seed():
    task = TASKS["addsub3"]
    assert task.problems("train", 50, seed=7) == task.problems("train", 50, seed=7)
    assert task.problems("train", 50, seed=7) != task.problems("train", 50, seed=8)
    assert task.problems("test", 20, seed=7) == task.problems("test", 20, seed=7)


def test_problem_fields_and_ranges():
    for p in TASKS["addsub2"].problems("train", 300, seed=0):
        assert set(p) >= {"prompt", "answer", "a", "b", "op"}
        assert 10 <= p["a"] <= 99 and 10 <= p["b"] <= 99
        assert p["prompt"] == f"{p['a']}{p['op']}{p['b']}="
        assert int(p["answer"]) == (p["a"] + p["b"] if p["op"] == "+" else p["a"] - p["b"])
        assert int(p["answer"]) >= 0
    ops = [p["op"] for p in TASKS["addsub2"].problems("train", 400, seed=0)]
    assert 150 < ops.count("+") < 250


def test_mixed_digit_counts():
    problems = TASKS["add1to3"].problems("train", 500, seed=0)
    lengths = {len(str(p["a"])) for p in problems}
    assert lengths == {1, 2, 3}


# ---------------------------------------------------------------- demonstrations


def test_demonstrations_by_hand():
    task = ArithmeticTask(3, "+-")
    assert task.demonstration(ADD) == ADD_DEMO
    assert task.demonstration(SUB) == SUB_DEMO
    zero = {"a": 55, "b": 55, "op": "-", "answer": "0"}
    assert task.demonstration(zero) == "5-5-0=0\n5-5-0=0\nA:0"


@pytest.mark.parametrize("name", sorted(n for n in TASKS if not n.endswith("-direct")))
def test_every_demonstration_scores_full_marks(name):
    task = TASKS[name]
    problems = task.problems("train", 150, seed=0) + task.problems("test", 50, seed=0)
    demos = [task.demonstration(p) for p in problems]
    prompts = [p["prompt"] for p in problems]
    assert correctness_reward(prompts, demos, answer=[p["answer"] for p in problems]) == [1.0] * 200
    assert format_reward(prompts, demos) == [1.0] * 200
    for problem, demo in zip(problems, demos, strict=True):
        scores, ends = step_rewards(problem["prompt"], demo, problem)
        assert scores == [1.0] * (len(str(max(problem["a"], problem["b"]))) + 1)
        assert len(demo) <= task.max_completion_chars
        assert ends[-1] == len(demo) - 1


# ---------------------------------------------------------------- outcome verifiers


@pytest.mark.parametrize(
    ("completion", "correct", "formatted"),
    [
        (ADD_DEMO, 1.0, 1.0),
        ("", 0.0, 0.0),
        ("\x00garbage }{ \n\n", 0.0, 0.0),
        ("A:132", 1.0, 0.0),  # right answer, no scratchpad
        ("The answer is 132", 0.0, 0.0),  # right number, wrong format
        ("7+5+0=12\n4+8+1=13\nA:133", 0.0, 1.0),  # wrong answer, right format
        ("7+5+0=12\n4+8+1=13", 0.0, 0.0),  # no final line
        ("7+5+0=12\n4+8+1=13\nA:132\nA:132", 1.0, 0.0),  # extra trailing text
        ("7+5+0=12\n4+8+1=13\nA:132 ", 1.0, 0.0),  # trailing whitespace breaks format only
        ("7+5+0=12\n4+8+1=13\nA:132abc", 0.0, 0.0),
        ("7+5+0=12\n4+8+1=13\nA:13\nA:132", 0.0, 0.0),  # the first answer counts: no hedging
        ("7+5+0=12\n4+8+1=13\nA:0132", 1.0, 1.0),  # same integer
        ("7+5+0=12\n4+8+1=13\nA:١٣٢", 0.0, 0.0),  # Arabic-Indic digits: not ASCII
        ("7+5+0=12\n4+8+1=13\nA:" + "9" * 5000, 0.0, 1.0),  # huge number: no int() error
        ("7+5+0=12\n4+8+1=13\nA:-132", 0.0, 1.0),
        ("7+5+0=12\n4+8+1=13\nA:", 0.0, 0.0),
        ("７+５+０=１２\nA:132", 1.0, 0.0),  # full-width digits in the scratchpad
        ("7+5+0=12\r\n4+8+1=13\r\nA:132", 1.0, 0.0),
    ],
)
def test_outcome_verifiers_on_hand_written_cases(completion, correct, formatted):
    assert correctness_reward([ADD["prompt"]], [completion], answer=["132"]) == [correct]
    assert format_reward([ADD["prompt"]], [completion]) == [formatted]


def test_rewards_accept_int_answers_extra_columns_and_conversations():
    completions = [ADD_DEMO, [{"role": "assistant", "content": ADD_DEMO}], None]
    rewards = correctness_reward(
        ["p"] * 3, completions, answer=[132, "132", "132"], task=["add2"] * 3
    )
    assert rewards == [1.0, 1.0, 0.0]
    assert format_reward(["p"] * 3, completions, answer=["132"] * 3) == [1.0, 1.0, 0.0]


# ---------------------------------------------------------------- steps


def test_split_steps_offsets_point_at_last_characters():
    completion = "  ab \n\ncd\n   \nefg"
    steps = split_steps(completion)
    assert steps == [("ab", 3), ("cd", 8), ("efg", 16)]
    for text, end in steps:
        assert completion[end] == text[-1]


def test_split_steps_custom_separator():
    completion = "step one. step two. done"
    assert split_steps(completion, separator=". ") == [
        ("step one", 7),
        ("step two", 17),
        ("done", 23),
    ]
    assert split_steps("") == []
    assert split_steps("\n\n \n") == []
    with pytest.raises(ValueError):
        split_steps("x", separator="")


def test_step_offsets_of_a_demonstration():
    scores, ends = step_rewards(ADD["prompt"], ADD_DEMO, ADD)
    assert scores == [1.0, 1.0, 1.0]
    assert ends == [7, 16, 22]  # "...=12" ends at 7, "...=13" at 16, "A:132" at 22
    assert [ADD_DEMO[e] for e in ends] == ["2", "3", "2"]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        # wrong units digit (7+5=13): the carry (1) is still right, so only step 0 fails;
        # the answer it implies is wrong
        ("7+5+0=13\n4+8+1=13\nA:133", [0.0, 1.0, 0.0]),
        # wrong carry written in step 0 (02): step 1 correctly uses carry 0, only step 0 fails
        ("7+5+0=02\n4+8+0=12\nA:122", [0.0, 1.0, 0.0]),
        # step 0 right, step 1 ignores the carry
        ("7+5+0=12\n4+8+0=12\nA:122", [1.0, 0.0, 0.0]),
        # arithmetic right but the answer line is wrong
        ("7+5+0=12\n4+8+1=13\nA:123", [1.0, 1.0, 0.0]),
        # digits copied from the wrong column
        ("4+8+0=12\n7+5+1=13\nA:132", [0.0, 0.0, 1.0]),
    ],
)
def test_one_wrong_step_scores_zero_at_that_step(completion, expected):
    scores, ends = step_rewards(ADD["prompt"], completion, ADD)
    assert scores == expected
    assert ends == [7, 16, 22]


def test_subtraction_steps_follow_the_written_borrow():
    assert step_rewards(SUB["prompt"], SUB_DEMO, SUB)[0] == [1.0] * 4
    # step 1 does not write its borrow (0-4-1=5 instead of 10-4-1=5), so step 2, judged
    # against the borrow written (none), should read 8-0-0=8: the hidden borrow is wrong too
    completion = "15-7-0=8\n0-4-1=5\n8-0-1=7\nA:758"
    assert step_rewards(SUB["prompt"], completion, SUB)[0] == [1.0, 0.0, 0.0, 1.0]
    # step 0 forgets to borrow and writes 5-7-0=2: step 1 then uses borrow 0 (0-4-0 still
    # needs a borrow, so 10-4-0=6 is right given what was written)
    completion = "5-7-0=2\n10-4-0=6\n7-0-1=6\nA:762"
    assert step_rewards(SUB["prompt"], completion, SUB)[0] == [0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("completion", "expected_scores"),
    [
        # no answer line: one more step, the missing answer, scored 0
        ("", [0.0]),
        ("garbage", [0.0, 0.0]),
        ("\n\n\n", [0.0]),
        ("7+5+0=12\n4+8+1=13\n", [1.0, 1.0, 0.0]),
        ("A:132", [1.0]),  # the answer alone: right outcome, no scratchpad steps
        ("7+5+0=12\n4+8+1=13\n0+0+1=01\nA:132", [1.0, 1.0, 0.0, 1.0]),  # extra column line
        ("7+5+0=12\n4+8+1=13\nA:132\nmore\nA:132", [1.0, 1.0, 1.0, 0.0, 0.0]),
        ("7+5+0=12\n¿?\nA:132", [1.0, 0.0, 1.0]),
        ("7+5+0=12\n4+8+1=13\nA:" + "1" * 10_000, [1.0, 1.0, 0.0]),
    ],
)
def test_malformed_completions_give_sensible_steps(completion, expected_scores):
    scores, ends = step_rewards(ADD["prompt"], completion, ADD)
    assert scores == expected_scores
    assert len(ends) == len(scores)
    if completion.strip():
        assert all(0 <= e < len(completion) and not completion[e].isspace() for e in ends)
    else:  # nothing visible: the missing answer step sits on the first token (EOS)
        assert ends == [0]


def test_task_exposes_its_verifiers():
    task = get_task("add2")
    assert set(task.reward_functions) == {"correctness", "format"}
    assert task.step_rewards(ADD["prompt"], ADD_DEMO, ADD) == step_rewards(
        ADD["prompt"], ADD_DEMO, ADD
    )
    assert task.max_completion_chars == len(ADD_DEMO)
    assert task.max_completion_tokens == len(ADD_DEMO) + 1  # EOS
    assert task.extract_answer(ADD_DEMO) == extract_answer(ADD_DEMO) == "132"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [("A:007", "7"), ("x\nA:-3\nA:4", "-3"), ("A:", None), ("", None), ("A:1" + "0" * 99, None)],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_verifiers_are_registered_under_config_names():
    from grpo.rewards import REWARDS, load_reward_function

    assert REWARDS["arithmetic_correct"] is correctness_reward
    assert load_reward_function("arithmetic_format") is format_reward


# ---------------------------------------------------------------- direct-answer tasks


def test_direct_task_shares_the_scratchpad_tasks_problems_and_split():
    direct, scratchpad = get_task("add2-direct"), get_task("add2")
    assert direct.problems("test", 50, seed=3) == scratchpad.problems("test", 50, seed=3)
    train = {p["prompt"] for p in direct.problems("train", 5000, seed=0)}
    test = {p["prompt"] for p in direct.problems("test", 500, seed=1)}
    assert len(test) == 500 and not train & test


@pytest.mark.parametrize("name", sorted(n for n in TASKS if n.endswith("-direct")))
def test_every_direct_demonstration_scores_full_marks(name):
    task = TASKS[name]
    problems = task.problems("train", 150, seed=0) + task.problems("test", 50, seed=0)
    demos = [task.demonstration(p) for p in problems]
    reward = task.reward_functions["correctness"]
    answers = [p["answer"] for p in problems]
    assert reward([p["prompt"] for p in problems], demos, answer=answers) == [1.0] * 200
    assert max(len(d) for d in demos) <= task.max_completion_chars
    assert [task.extract_answer(d) for d in demos] == answers


def test_direct_demonstration_is_the_answer_alone():
    task = get_task("add2-direct")
    assert task.demonstration(ADD) == "132"
    assert task.max_completion_chars == 3  # 99+99=198
    assert task.max_completion_tokens == 4  # and EOS
    assert get_task("add3-direct").max_completion_chars == 4


@pytest.mark.parametrize(
    ("completion", "correct"),
    [
        ("132", 1.0),
        (" 132\n", 1.0),  # surrounding whitespace is not part of the answer
        ("0132", 1.0),  # the same integer
        ("131", 0.0),
        ("13", 0.0),
        ("A:132", 0.0),  # the scratchpad's answer line is not a direct answer
        (ADD_DEMO, 0.0),
        ("132 132", 0.0),
        ("132\n7", 0.0),
        ("", 0.0),
        ("\u0661\u0663\u0662", 0.0),  # Arabic-Indic digits: not [0-9]
        ("1" * 100, 0.0),
    ],
)
def test_direct_reward_on_hand_written_cases(completion, correct):
    reward = get_task("add2-direct").reward_functions["correctness"]
    assert reward(["47+85="], [completion], answer=["132"]) == [correct]


def test_direct_verifiers_and_scratchpad_verifiers_never_agree():
    direct, scratchpad = get_task("add2-direct"), get_task("add2")
    problems = direct.problems("train", 100, seed=0)
    prompts, answers = [p["prompt"] for p in problems], [p["answer"] for p in problems]
    direct_demos = [direct.demonstration(p) for p in problems]
    scratch_demos = [scratchpad.demonstration(p) for p in problems]
    assert direct_correctness_reward(prompts, direct_demos, answer=answers) == [1.0] * 100
    assert correctness_reward(prompts, direct_demos, answer=answers) == [0.0] * 100
    assert direct_correctness_reward(prompts, scratch_demos, answer=answers) == [0.0] * 100


def test_direct_step_rewards_and_extract_answer():
    task = get_task("add2-direct")
    assert task.step_rewards("47+85=", "132", ADD) == ([1.0], [2])
    assert task.step_rewards("47+85=", " 131 ", ADD) == ([0.0], [3])
    assert task.step_rewards("47+85=", "", ADD) == ([0.0], [0])
    assert task.extract_answer("007") == "7"
    assert task.extract_answer("A:7") is None


def test_direct_reward_is_registered_under_its_config_name():
    from grpo.rewards import load_reward_function

    assert load_reward_function("arithmetic_direct_correct") is direct_correctness_reward


def test_direct_doctests_hold():
    import grpo.tasks.direct

    result = doctest.testmod(grpo.tasks.direct)
    assert result.attempted >= 5 and result.failed == 0
