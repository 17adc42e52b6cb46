"""The embedded default model: character tokenizer, tiny LM, save/load round trip."""

import pytest
import torch

from grpo.hf import load_model_and_tokenizer
from grpo.modeling import (
    DEFAULT_ALPHABET,
    build_char_tokenizer,
    build_tiny_model,
    init_model_dir,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_encode_decode_round_trip_is_exact(tokenizer):
    text = "7+5+0=12\n4+8+1=13\nA:132  two  spaces, punctuation!? (x) [y] #### 9"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, no bos/eos added
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_every_alphabet_character_has_its_own_id(tokenizer):
    ids = tokenizer(DEFAULT_ALPHABET)["input_ids"]
    assert len(set(ids)) == len(DEFAULT_ALPHABET)
    assert tokenizer.unk_token_id not in ids


def test_unknown_characters_map_to_unk_one_each(tokenizer):
    ids = tokenizer("1é€2")["input_ids"]
    unk = tokenizer.unk_token_id
    assert ids == [
        tokenizer.convert_tokens_to_ids("1"),
        unk,
        unk,
        tokenizer.convert_tokens_to_ids("2"),
    ]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "12"


def test_special_tokens_are_set_and_skipped_on_decode(tokenizer):
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    )
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    ids = tokenizer("A:12")["input_ids"] + [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "A:12"
    assert tokenizer.padding_side == "left"


def test_chat_template_ends_with_assistant_prefix(tokenizer):
    messages = [{"role": "user", "content": "47+85="}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>47+85=<|assistant|>"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == 2 + len("47+85=")  # each role marker is one token
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    no_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert no_prompt == "<|user|>47+85="


def test_chat_template_closes_assistant_turns_with_eos(tokenizer):
    messages = [
        {"role": "system", "content": "add"},
        {"role": "user", "content": "1+2="},
        {"role": "assistant", "content": "A:3"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|system|>add<|user|>1+2=<|assistant|>A:3</s>"


def test_custom_alphabet_is_used():
    tokenizer = build_char_tokenizer("01+=")
    assert len(tokenizer) == 7 + 4  # 7 special tokens
    assert tokenizer.decode(tokenizer("10+1=")["input_ids"]) == "10+1="
    assert tokenizer("2")["input_ids"] == [tokenizer.unk_token_id]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_defaults(tokenizer, arch):
    model = build_tiny_model(tokenizer, arch=arch)
    num_params = sum(p.numel() for p in model.parameters())
    assert 0.8e6 <= num_params <= 3e6  # the documented demo size
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tokenizer)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert model.dtype == torch.float32
    for config in (model.config, model.generation_config):
        assert config.pad_token_id == tokenizer.pad_token_id
        assert config.bos_token_id == tokenizer.bos_token_id
        assert config.eos_token_id == tokenizer.eos_token_id


def test_same_seed_same_weights(tokenizer):
    a = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, intermediate_size=64, seed=3)
    b = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, intermediate_size=64, seed=3)
    c = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, intermediate_size=64, seed=4)
    torch.testing.assert_close(a.state_dict(), b.state_dict())
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_bad_sizes_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="arch"):
        build_tiny_model(tokenizer, arch="gpt2")
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_model(tokenizer, hidden_size=30, num_heads=4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_and_load_round_trip(tmp_path, arch):
    sizes = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
    path = init_model_dir(tmp_path / "tiny", arch=arch, seed=1, **sizes)
    model, tokenizer = load_model_and_tokenizer(path)
    fresh_tokenizer = build_char_tokenizer()
    fresh_model = build_tiny_model(fresh_tokenizer, arch=arch, seed=1, **sizes).eval()

    texts = ["<|user|>47+85=<|assistant|>7+5", "<|user|>1+2=<|assistant|>"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    fresh_batch = fresh_tokenizer(texts, return_tensors="pt", padding=True)
    torch.testing.assert_close(batch["input_ids"], fresh_batch["input_ids"])
    assert batch["input_ids"][1, 0] == tokenizer.pad_token_id  # left padding survives loading

    with torch.no_grad():
        logits = model(**batch).logits  # [2, L, V]
        fresh_logits = fresh_model(**fresh_batch).logits  # [2, L, V]
    torch.testing.assert_close(logits, fresh_logits)
    assert tokenizer.chat_template == fresh_tokenizer.chat_template
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == "47+85=7+5"


def test_tiny_model_generates_greedily_and_stops_at_eos(tokenizer):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, intermediate_size=64).eval()
    batch = tokenizer(
        ["<|user|>1+2=<|assistant|>", "<|user|>10+20=<|assistant|>"],
        return_tensors="pt",
        padding=True,
    )
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)  # [2, P + <=5]
    assert out.shape[0] == 2 and out.shape[1] <= batch["input_ids"].shape[1] + 5


def test_filler_tokens_pad_the_vocabulary_and_never_encode():
    from grpo.modeling import build_char_tokenizer

    plain, padded = build_char_tokenizer(), build_char_tokenizer(vocab_size=120)
    assert (len(plain), len(padded)) == (101, 120)  # 7 special + 94 characters, then 19 fillers
    text = "<v110> 47+85"
    assert padded(text)["input_ids"] == plain(text)["input_ids"]  # one id per character
    assert padded.decode([110, 8]) == "<v110>1"  # id 8: "1"
    with pytest.raises(ValueError, match="vocab_size=50"):
        build_char_tokenizer(vocab_size=50)
