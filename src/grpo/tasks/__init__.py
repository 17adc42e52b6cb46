"""Built-in tasks: problem generators with their verifiers, looked up by name.

A task has ``problems(split, n, seed) -> list[dict]`` (each dict has at least ``prompt``
and ``answer``), ``demonstration(problem) -> str`` (a correct completion, for supervised
warm-up), ``reward_functions`` (TRL-style outcome verifiers by name) and
``step_rewards(prompt, completion, problem)`` (process supervision) and
``extract_answer(completion)`` (for majority voting). Importing this package registers the
arithmetic verifiers in ``grpo.rewards.REWARDS`` as ``arithmetic_correct`` and
``arithmetic_format`` (scratchpad tasks) and ``arithmetic_direct_correct`` (the
``-direct`` tasks, answer only), the names a config's ``rewards.functions`` uses.
"""

from __future__ import annotations

from grpo.rewards.scoring import register_reward
from grpo.tasks.arithmetic import (
    ArithmeticTask,
    correctness_reward,
    extract_answer,
    format_reward,
    split_steps,
    step_rewards,
)
from grpo.tasks.direct import DirectArithmeticTask, direct_correctness_reward

register_reward("arithmetic_correct")(correctness_reward)
register_reward("arithmetic_format")(format_reward)
register_reward("arithmetic_direct_correct")(direct_correctness_reward)

Task = ArithmeticTask | DirectArithmeticTask

TASKS: dict[str, Task] = {
    "add2": ArithmeticTask(digits=2, ops="+"),
    "add3": ArithmeticTask(digits=3, ops="+"),
    "add4": ArithmeticTask(digits=4, ops="+"),
    "add1to3": ArithmeticTask(digits=(1, 3), ops="+"),
    "sub2": ArithmeticTask(digits=2, ops="-"),
    "sub3": ArithmeticTask(digits=3, ops="-"),
    "addsub2": ArithmeticTask(digits=2, ops="+-"),
    "addsub3": ArithmeticTask(digits=3, ops="+-"),
}
TASKS |= {f"{name}-direct": DirectArithmeticTask(task) for name, task in list(TASKS.items())}
"""Name -> task. ``add2``: two 2-digit numbers added; ``addsub3``: 3-digit, + or -;
``add2-direct``: add2's problems and split, answered with the number alone (``132``)."""


def get_task(name: str) -> Task:
    """The registered task called ``name``; a ValueError lists the allowed names."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(sorted(TASKS))}")
    return TASKS[name]


__all__ = [
    "TASKS",
    "ArithmeticTask",
    "DirectArithmeticTask",
    "Task",
    "correctness_reward",
    "direct_correctness_reward",
    "extract_answer",
    "format_reward",
    "get_task",
    "split_steps",
    "step_rewards",
]
