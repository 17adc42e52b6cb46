"""Prompt files, chat templates and the resumable sampler."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grpo.config import DataConfig
from grpo.data import PromptSampler, encode_prompt, training_rows
from grpo.modeling import build_char_tokenizer


def test_jsonl_and_parquet_give_the_same_rows(tmp_path):
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "4+4=", "answer": "8"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    for name in ("p.jsonl", "p.parquet"):
        assert training_rows(DataConfig(train_file=str(tmp_path / name)), seed=0) == rows


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        training_rows(DataConfig(train_file=str(tmp_path / "missing.jsonl")), seed=0)
    (tmp_path / "p.csv").write_text("prompt\n1+1=\n")
    with pytest.raises(ValueError, match=r"unsupported suffix '\.csv'"):
        training_rows(DataConfig(train_file=str(tmp_path / "p.csv")), seed=0)
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "1+1="}) + "\n")
    with pytest.raises(ValueError, match=r"data\.prompt_column='prompt' is missing from row 0"):
        training_rows(DataConfig(train_file=str(tmp_path / "q.jsonl")), seed=0)


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
