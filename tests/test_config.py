"""The typed config: defaults, YAML + overrides, and errors that name field and value."""

import pytest

from grpo.algorithms import several_updates
from grpo.config import ConfigError, build_config, load_config, parse_overrides


def test_defaults_are_the_papers():
    cfg = build_config()
    assert cfg.algorithm.beta == 0.04  # DeepSeekMath
    assert cfg.algorithm.clip_high == cfg.algorithm.epsilon == 0.2  # eps_high defaults to eps
    assert cfg.algorithm.scale_rewards == "group" and cfg.algorithm.loss_type == "grpo"
    assert cfg.completions_per_step == 8 * 8
    assert not several_updates(cfg)  # mu = 1, one mini-batch: ratio exactly 1


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "algorithm:\n  beta: 0.1\n  epsilon_high: 0.28\nrollout:\n  num_generations: 4\n"
    )
    cfg = load_config(path, ["algorithm.beta=0", "optim.num_minibatches=2", "run.seed=7"])
    assert cfg.algorithm.beta == 0.0  # the override wins over the file
    assert cfg.algorithm.clip_high == 0.28
    assert cfg.rollout.num_generations == 4 and cfg.run.seed == 7
    assert several_updates(cfg)  # two mini-batches: the policy moves before the second


def test_parse_overrides_reads_yaml_values():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=none", "e=abc"]) == {
        "a": {"b": 1, "c": [1, 2]},
        "d": "none",
        "e": "abc",
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rollout.num_generations=1"], "rollout.num_generations = 1"),
        (["algorithm.epsilon=-0.1"], "algorithm.epsilon = -0.1"),
        (["algorithm.scale_rewards=std"], "'group', 'batch' or 'none'"),
        (["algorithm.loss_type=bnpo"], "'grpo', 'token_mean' or 'dr_grpo'"),
        (["algorithm.betaa=0.1"], "algorithm.betaa: unknown key"),
        (["optim.num_minibatches=3"], "does not divide rollout.prompts_per_step=8"),
        (["optim.gradient_accumulation_steps=5"], "does not divide the 64 completions"),
        (["rewards.weights=[1, 2]"], "weights has 2 entries but functions has 1"),
        (["rollout.top_p=1.5"], "rollout.top_p = 1.5"),
        (["beta"], "expected key=value"),
    ],
)
def test_errors_name_field_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config(overrides=overrides)
    assert message in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_small_model_recipe_loads_and_points_at_either_task_form():
    from importlib import resources

    path = resources.files("grpo") / "configs" / "small-model.yaml"
    cfg = load_config(str(path))
    assert cfg.completions_per_step == 32 * 8
    assert cfg.optim.learning_rate == 1e-4 and cfg.optim.warmup_steps == 20
    assert cfg.algorithm.num_iterations == 2 and cfg.algorithm.clip_high == 0.28
    direct = load_config(
        str(path), ["data.task=add2-direct", "rewards.functions=[arithmetic_direct_correct]"]
    )
    assert direct.data.task == "add2-direct"
