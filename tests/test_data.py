"""Prompt files in every format datasets reads, named errors, chat templates, the sampler."""

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grpo.config import ConfigError, DataConfig, build_config
from grpo.data import DataError, PromptSampler, encode_prompt, eval_rows, training_rows
from grpo.modeling import build_char_tokenizer
from grpo.trainer import GRPOTrainer

ROWS = [{"prompt": "1+2=", "answer": "<3>"}, {"prompt": "4+4=", "answer": "<8>"}]


def write_every_format(d):
    """ROWS in each format ``data.train_file`` reads, written with the formats' own tools."""
    import datasets

    jsonl = "".join(json.dumps(r) + "\n" for r in ROWS)
    (d / "p.jsonl").write_text(jsonl)
    with gzip.open(d / "p.jsonl.gz", "wt") as f:
        f.write(jsonl)
    (d / "p.json").write_text(json.dumps(ROWS))
    with (d / "p.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "answer"])
        writer.writeheader()
        writer.writerows(ROWS)
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, d / "p.parquet")
    with pa.ipc.new_stream(d / "stream.arrow", table.schema) as w:  # what datasets writes
        w.write_table(table)
    with pa.ipc.new_file(d / "file.arrow", table.schema) as w:  # Arrow's random-access file
        w.write_table(table)
    datasets.Dataset.from_list(ROWS).save_to_disk(str(d / "saved"))
    return [
        "p.jsonl", "p.jsonl.gz", "p.json", "p.csv", "p.parquet", "stream.arrow", "file.arrow",
        "saved",
    ]  # fmt: skip


def test_every_file_format_gives_the_same_rows(tmp_path):
    for name in write_every_format(tmp_path):
        assert training_rows(DataConfig(train_file=str(tmp_path / name)), seed=0) == ROWS, name


def test_dataset_dicts_and_dataset_directories_give_the_named_split(tmp_path):
    import datasets

    held_out = [{"prompt": "9+9=", "answer": "<18>"}]
    both = {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(held_out)}
    datasets.DatasetDict(both).save_to_disk(str(tmp_path / "dict"))
    cfg = DataConfig(train_file=str(tmp_path / "dict"), eval_split="test")
    assert training_rows(cfg, seed=0) == ROWS
    assert eval_rows(cfg) == held_out
    # data.dataset: a directory of data files, one per split, read by datasets.load_dataset
    (tmp_path / "hub").mkdir()
    for split, rows in (("train", ROWS), ("test", held_out)):
        (tmp_path / "hub" / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
    cfg = DataConfig(dataset=str(tmp_path / "hub"), eval_split="test")
    assert training_rows(cfg, seed=0) == ROWS
    assert eval_rows(cfg) == held_out


def test_unreadable_inputs_are_named_one_line_errors(tmp_path):
    def error(cfg: DataConfig, kind=DataError) -> str:
        with pytest.raises(kind) as info:
            training_rows(cfg, seed=0) if cfg.eval_file is None else eval_rows(cfg)
        message = str(info.value)
        assert "\n" not in message
        return message

    missing = error(DataConfig(train_file=str(tmp_path / "missing.jsonl")), FileNotFoundError)
    assert "data.train_file" in missing and "missing.jsonl" in missing
    (tmp_path / "p.txt").write_text("1+1=\n")
    assert "p.txt" in error(DataConfig(train_file=str(tmp_path / "p.txt")))
    assert "unsupported file type" in error(DataConfig(train_file=str(tmp_path / "p.txt")))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    assert "bad.parquet' cannot be read as parquet" in error(
        DataConfig(train_file=str(tmp_path / "bad.parquet"))
    )
    (tmp_path / "torn.jsonl").write_text('{"prompt": "1+1="}\n{"prompt": \n')
    assert "torn.jsonl' cannot be read as json" in error(
        DataConfig(train_file=str(tmp_path / "torn.jsonl"))
    )
    (tmp_path / "plain_dir").mkdir()
    assert "not a save_to_disk one" in error(DataConfig(train_file=str(tmp_path / "plain_dir")))
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "dict")
    )
    message = error(DataConfig(train_file=str(tmp_path / "dict"), split="validation"))
    assert "has no split 'validation'; its splits: train" in message
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "train.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    message = error(DataConfig(dataset=str(tmp_path / "hub"), split="validation"))
    assert message.startswith(f"data.dataset={str(tmp_path / 'hub')!r} (config None, split")
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "1+1="}) + "\n")
    assert "data.prompt_column='prompt' is missing from row 0" in error(
        DataConfig(train_file=str(tmp_path / "q.jsonl"))
    )
    held_out = error(DataConfig(eval_file=str(tmp_path / "gone.csv")), FileNotFoundError)
    assert "data.eval_file" in held_out and "gone.csv" in held_out


def test_eval_every_on_own_data_needs_held_out_prompts():
    with pytest.raises(ConfigError, match=r"run.eval_every=5 with your own training data"):
        build_config(overrides=["data.train_file=p.jsonl", "run.eval_every=5"])
    with pytest.raises(ConfigError, match=r"data.train_file='a.jsonl' and data.dataset='b'"):
        build_config(overrides=["data.train_file=a.jsonl", "data.dataset=b"])


def test_bad_data_stops_the_trainer_before_any_model_loads(tmp_path):
    # the model path does not exist either: the data error must come first
    (tmp_path / "p.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    cfg = build_config(
        overrides=[
            f"model.name_or_path={tmp_path / 'no-model'}",
            f"data.train_file={tmp_path / 'p.jsonl'}",
            f"data.eval_file={tmp_path / 'held_out.jsonl'}",
            "run.eval_every=1",
        ]
    )
    with pytest.raises(FileNotFoundError, match=r"data.eval_file .*held_out\.jsonl"):
        GRPOTrainer(cfg, reward_functions=[lambda prompts, completions, **kw: [0.0]])


def test_chat_messages_go_through_the_template():
    tok = build_char_tokenizer()
    plain = encode_prompt(tok, "47+85=")
    chat = encode_prompt(tok, [{"role": "user", "content": "47+85="}])
    assert tok.decode(plain) == "47+85="
    assert tok.decode(chat) == "<|user|>47+85=<|assistant|>"


def test_sampler_covers_each_epoch_and_resumes_exactly():
    s = PromptSampler(5, seed=3)
    first = s.next(3) + s.next(2)
    assert sorted(first) == [0, 1, 2, 3, 4]  # one epoch: every row once
    s.next(2)
    state = s.state_dict()
    rest = s.next(7)
    resumed = PromptSampler(5, seed=3)
    resumed.load_state_dict(state)
    assert resumed.next(7) == rest


def bos_tokenizer(single: str = "<s> $A"):
    """A tokenizer built elsewhere: characters 0-9, '+', '=', and a post-processor that
    writes ``single`` around the text (``<s> $A``: Llama's BOS; ``<s> $A </s>``: BOS and EOS).
    Its chat template writes the BOS itself, as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab |= {c: 4 + i for i, c in enumerate("0123456789+=")}  # '4' -> 8, '+' -> 14, '=' -> 15
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    backend.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )


TEXT_IDS = [8, 11, 14, 12, 9, 15]  # "47+85=": 4 -> 8, 7 -> 11, + -> 14, 8 -> 12, 5 -> 9, = -> 15


def test_a_string_prompt_keeps_the_bos_its_tokenizer_adds():
    tok = bos_tokenizer()
    assert tok("47+85=")["input_ids"] == [1, *TEXT_IDS]  # what the model saw in pretraining
    assert encode_prompt(tok, "47+85=") == [1, *TEXT_IDS]
    assert encode_prompt(tok, "47+85=", add_special_tokens=True) == [1, *TEXT_IDS]
    assert encode_prompt(tok, "47+85=", add_special_tokens=False) == TEXT_IDS  # opted out
    assert encode_prompt(tok, "") == [1]


def test_a_prompt_never_ends_with_the_eos_a_tokenizer_appends():
    tok = bos_tokenizer("<s> $A </s>")
    assert tok("47+85=")["input_ids"] == [1, *TEXT_IDS, 2]
    assert encode_prompt(tok, "47+85=") == [1, *TEXT_IDS]
    assert encode_prompt(tok, "47+85=", add_special_tokens=False) == TEXT_IDS


def test_a_chat_prompt_gets_the_templates_bos_once():
    tok = bos_tokenizer()
    chat = [{"role": "user", "content": "47+85="}]
    assert encode_prompt(tok, chat) == [1, *TEXT_IDS]  # the template's <s>, no second one
    assert encode_prompt(tok, chat, add_special_tokens=True) == [1, *TEXT_IDS]
    assert encode_prompt(tok, chat, add_special_tokens=False) == TEXT_IDS
    tok.chat_template = "{{ bos_token }}" + tok.chat_template  # a template writing it twice
    assert encode_prompt(tok, chat) == [1, *TEXT_IDS]


def test_the_char_tokenizer_adds_no_bos_unless_asked():
    tok = build_char_tokenizer()  # the demo's: its encoding never adds a special token
    text = tok("47+85=", add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, "47+85=") == text  # the demo's prompts are unchanged
    assert encode_prompt(tok, "47+85=", add_special_tokens=True) == [tok.bos_token_id, *text]
    chat = encode_prompt(tok, [{"role": "user", "content": "47+85="}], add_special_tokens=True)
    assert tok.convert_ids_to_tokens(chat)[:2] == ["<s>", "<|user|>"]


def test_forcing_a_bos_needs_one():
    tok = build_char_tokenizer()
    tok.bos_token = None
    with pytest.raises(ValueError, match=r"data\.add_special_tokens=true .* no bos_token"):
        encode_prompt(tok, "1+1=", add_special_tokens=True)


def test_doctests_in_docstrings_hold():
    import doctest

    import grpo.data

    result = doctest.testmod(grpo.data)
    assert result.attempted > 0 and result.failed == 0
