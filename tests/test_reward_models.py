"""Learned reward sources (grpo.rewards.models) on tiny random Llama classifiers.

Every model is saved with ``save_pretrained`` next to the character tokenizer and loaded
back by path, as a real reward model would be. Each batched score is compared with a
plain one-at-a-time forward pass of the same model.
"""

import doctest

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
)

from grpo.modeling import build_char_tokenizer
from grpo.rewards import score
from grpo.rewards.models import (
    OutcomeRewardModel,
    ProcessRewardModel,
    StepRewardSource,
    StepScores,
    verifier_step_source,
)
from grpo.tasks import correctness_reward, get_task, split_steps

PROMPTS = ["47+85=", "9+3=", "123+456="]
COMPLETIONS = ["7+5+0=12\n4+8+1=13\nA:132", "A:12", "3+6+0=09\n2+5+0=07\nA:579\n"]
ANSWERS = ["132", "12", "579"]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _save(model_cls, tok, path, num_labels, pad=True, seed=0):
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
        pad_token_id=tok.pad_token_id if pad else None,
        initializer_range=0.2,  # scores far enough apart that a wrong token shows
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _logits(model, ids):
    """Logits of one unpadded sequence, no batching."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


# ---------------------------------------------------------------- outcome reward model


@pytest.mark.parametrize("num_labels", [1, 2])
def test_orm_batched_equals_one_at_a_time(tok, tmp_path, num_labels):
    model = _save(LlamaForSequenceClassification, tok, tmp_path, num_labels)
    orm = OutcomeRewardModel(str(tmp_path), batch_size=2)  # 3 texts of 3 lengths: padding
    got = orm(prompts=PROMPTS, completions=COMPLETIONS)
    assert orm.__name__ == "reward_model"
    assert isinstance(got, list) and all(isinstance(v, float) for v in got)
    expected = []
    for prompt, completion in zip(PROMPTS, COMPLETIONS, strict=True):
        logits = _logits(model, _ids(tok, prompt + completion))  # [1] or [2], last token pooled
        # one label: the logit; two labels: the log-odds logit[1] - logit[0]
        expected.append(logits[0] if num_labels == 1 else logits[1] - logits[0])
    torch.testing.assert_close(torch.tensor(got), torch.stack(expected))
    assert len(set(got)) == 3


def test_orm_runs_in_inference_mode_without_gradients(tok, tmp_path):
    _save(LlamaForSequenceClassification, tok, tmp_path, 1)
    orm = OutcomeRewardModel(str(tmp_path))
    seen = []
    orm.model.register_forward_hook(
        lambda module, args, output: seen.append(
            (torch.is_inference_mode_enabled(), module.training, output.logits.requires_grad)
        )
    )
    orm(prompts=PROMPTS, completions=COMPLETIONS)
    assert seen == [(True, False, False)]
    assert not any(p.requires_grad for p in orm.model.parameters())


def test_orm_sets_a_missing_pad_token_id(tok, tmp_path):
    model = _save(LlamaForSequenceClassification, tok, tmp_path, 1, pad=False)
    orm = OutcomeRewardModel(str(tmp_path), batch_size=3)
    # Without a pad id the model would refuse a batch; it is taken from the tokenizer.
    assert orm.model.config.pad_token_id == tok.pad_token_id == orm.pad_id
    got = orm(prompts=PROMPTS, completions=COMPLETIONS)
    expected = [
        _logits(model, _ids(tok, p + c))[0] for p, c in zip(PROMPTS, COMPLETIONS, strict=True)
    ]
    torch.testing.assert_close(torch.tensor(got), torch.stack(expected))


def test_orm_chat_format_uses_the_chat_template(tok, tmp_path):
    model = _save(LlamaForSequenceClassification, tok, tmp_path, 1)
    orm = OutcomeRewardModel(str(tmp_path), batch_size=2)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    got = orm(prompts=prompts, completions=completions)
    expected = []
    for p, c in zip(PROMPTS, COMPLETIONS, strict=True):
        text = f"<|user|>{p}<|assistant|>{c}</s>"  # the character tokenizer's template
        assert text == tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False
        )
        expected.append(_logits(model, _ids(tok, text))[0])
    torch.testing.assert_close(torch.tensor(got), torch.stack(expected))


def test_orm_max_length_keeps_the_last_tokens(tok, tmp_path):
    model = _save(LlamaForSequenceClassification, tok, tmp_path, 1)
    orm = OutcomeRewardModel(str(tmp_path), max_length=5)
    got = orm(prompts=PROMPTS, completions=COMPLETIONS)
    expected = [
        _logits(model, _ids(tok, p + c)[-5:])[0] for p, c in zip(PROMPTS, COMPLETIONS, strict=True)
    ]
    torch.testing.assert_close(torch.tensor(got), torch.stack(expected))


def test_orm_inside_score(tok, tmp_path):
    _save(LlamaForSequenceClassification, tok, tmp_path, 1)
    orm = OutcomeRewardModel(str(tmp_path))
    direct = orm(prompts=PROMPTS, completions=COMPLETIONS)
    out = score(
        [orm, correctness_reward],
        [0.5, 1.0],
        PROMPTS,
        COMPLETIONS,
        {"answer": ANSWERS},
        completion_ids=[_ids(tok, c) for c in COMPLETIONS],
    )
    assert out.names == ["reward_model", "correctness_reward"]
    torch.testing.assert_close(out.per_function[:, 0], torch.tensor(direct))
    torch.testing.assert_close(out.rewards, 0.5 * torch.tensor(direct) + 1.0)  # all correct


def test_orm_rejects_more_than_two_labels(tok, tmp_path):
    _save(LlamaForSequenceClassification, tok, tmp_path, 3)
    with pytest.raises(ValueError, match="num_labels=3"):
        OutcomeRewardModel(str(tmp_path))


# ---------------------------------------------------------------- process reward model


@pytest.mark.parametrize("num_labels", [2, 1])
def test_prm_token_mode_scores_each_step_end_token(tok, tmp_path, num_labels):
    model = _save(LlamaForTokenClassification, tok, tmp_path, num_labels)
    prm = ProcessRewardModel(str(tmp_path), batch_size=2)
    completions = [*COMPLETIONS, "\n \n"]  # the last has no steps
    prompts = [*PROMPTS, "1+1="]
    got = prm.score_steps(prompts, completions)
    assert isinstance(prm, StepRewardSource)
    assert got[3] == StepScores([], [])
    assert [s.ends for s in got[:3]] == [[7, 16, 22], [3], [7, 16, 22]]
    for prompt, completion, steps in zip(prompts[:3], completions[:3], got[:3], strict=True):
        logits = _logits(model, _ids(tok, prompt + completion))  # [S, L]
        # Character tokenizer: the step ending at character e is token len(prompt) + e.
        at_ends = logits[[len(prompt) + e for e in steps.ends]]  # [K, L]
        expected = at_ends.softmax(-1)[:, 1] if num_labels == 2 else at_ends[:, 0].sigmoid()
        torch.testing.assert_close(torch.tensor(steps.scores), expected)


def test_prm_separator_is_configurable(tok, tmp_path):
    _save(LlamaForTokenClassification, tok, tmp_path, 2)
    prm = ProcessRewardModel(str(tmp_path), separator="; ")
    completion = "a=1; b=2;c=3 ; A:3"
    (steps,) = prm.score_steps(["q"], [completion])
    # "a=1" ends at 2, "b=2;c=3" at 11 (the space before "; " is stripped), "A:3" at 17
    assert steps.ends == [2, 11, 17] == [e for _, e in split_steps(completion, "; ")]
    assert len(steps.scores) == 3


def test_prm_chat_prompt_appends_the_completion_after_the_generation_prompt(tok, tmp_path):
    model = _save(LlamaForTokenClassification, tok, tmp_path, 2)
    prm = ProcessRewardModel(str(tmp_path))
    prompt = [{"role": "user", "content": "47+85="}]
    completion = [{"role": "assistant", "content": COMPLETIONS[0]}]
    (steps,) = prm.score_steps([prompt], [completion])
    # "<|user|>47+85=<|assistant|>" is 1 + 6 + 1 = 8 tokens before the completion.
    prefix = _ids(tok, "<|user|>47+85=<|assistant|>")
    assert len(prefix) == 8
    logits = _logits(model, prefix + _ids(tok, COMPLETIONS[0]))
    expected = logits[[8 + 7, 8 + 16, 8 + 22]].softmax(-1)[:, 1]
    torch.testing.assert_close(torch.tensor(steps.scores), expected)


def test_prm_sequence_mode_scores_each_prefix(tok, tmp_path):
    model = _save(LlamaForSequenceClassification, tok, tmp_path, 1)
    prm = ProcessRewardModel(str(tmp_path), mode="sequence", batch_size=2)
    got = prm.score_steps(PROMPTS[:2], COMPLETIONS[:2])
    assert [s.ends for s in got] == [[7, 16, 22], [3]]
    for prompt, completion, steps in zip(PROMPTS[:2], COMPLETIONS[:2], got, strict=True):
        # one sequence per step: prompt + completion up to and including the step's end
        expected = [
            _logits(model, _ids(tok, prompt + completion[: e + 1]))[0].sigmoid() for e in steps.ends
        ]
        torch.testing.assert_close(torch.tensor(steps.scores), torch.stack(expected))


def test_prm_rejects_unknown_mode(tok, tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        ProcessRewardModel(str(tmp_path), mode="tokens")


# ---------------------------------------------------------------- built-in verifier


def test_verifier_adapter_gives_the_task_step_scores():
    task = get_task("add2")
    problems = task.problems("train", 3, seed=0)
    completions = [task.demonstration(p) for p in problems]
    completions[1] = completions[1].replace("A:", "A:9")  # a wrong answer line
    prompts = [p["prompt"] for p in problems]
    source = verifier_step_source(task)
    assert isinstance(source, StepRewardSource)
    got = source.score_steps(prompts, completions, problems)
    expected = [
        task.step_rewards(p, c, row)
        for p, c, row in zip(prompts, completions, problems, strict=True)
    ]
    assert [tuple(s) for s in got] == expected
    assert got[1].scores[-1] == 0.0 and got[0].scores == [1.0, 1.0, 1.0]
    # Conversational completions are verified on their text.
    chat = [[{"role": "assistant", "content": c}] for c in completions]
    assert source.score_steps(prompts, chat, problems) == got
    with pytest.raises(ValueError, match="needs the dataset rows"):
        source.score_steps(prompts, completions)


def test_doctests_in_docstrings_hold():
    import grpo.rewards.models
    import grpo.rewards.process

    for module in (grpo.rewards.models, grpo.rewards.process):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0
