"""Character-level steps -> token-level tensors (grpo.steps), checked by hand."""

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from grpo.advantages import process_advantages
from grpo.modeling import build_char_tokenizer
from grpo.rewards.process import char_to_token_ends, step_tensors
from grpo.tasks.arithmetic import split_steps, step_rewards

COMPLETION = "7+5+0=12\n4+8+1=13\nA:132"  # steps end at characters 7, 16, 22


@pytest.fixture(scope="module")
def char_tok():
    return build_char_tokenizer()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_char_tokenizer_token_is_character(char_tok):
    ids = [*_ids(char_tok, COMPLETION), char_tok.eos_token_id]  # 23 characters, then EOS
    text = char_tok.decode(ids, skip_special_tokens=True)
    assert text == COMPLETION
    ends = [end for _, end in split_steps(text)]
    assert ends == [7, 16, 22]
    # One token per character: token index == character index; the EOS (index 23) is
    # never chosen, not even for an offset past the text (99) which clamps to character 22.
    # A negative offset clamps to character 0.
    assert char_to_token_ends(char_tok, [ids], [text], [[*ends, 99, -3]]) == [[7, 16, 22, 22, 0]]


def _bpe_tokenizer(vocab_chars, merges):
    vocab = {"<pad>": 0, "</s>": 1}
    for piece in [*vocab_chars, *(a + b for a, b in merges)]:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.add_special_tokens(["<pad>", "</s>"])
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")


def test_multi_character_tokens():
    # "12" and "A:" are single tokens, so the 23 characters become 21 tokens:
    #   token: 0 1 2 3 4 5 6    7  8 9 10 11 12 13 14 15 16  17   18 19 20
    #   text : 7 + 5 + 0 = "12" \n 4 + 8  +  1  =  1  3  \n "A:" 1  3  2
    #   chars: 0 1 2 3 4 5 6-7  8  9 ...             15 16 17 18-19 20 21 22
    tok = _bpe_tokenizer("0123456789+=\nA:", [("1", "2"), ("A", ":")])
    ids = [*_ids(tok, COMPLETION), tok.eos_token_id]
    assert len(ids) == 22
    text = tok.decode(ids, skip_special_tokens=True)
    assert text == COMPLETION
    # char 7 ('2' of "12") and char 6 ('1' of "12") -> token 6; char 16 ('3' of "13") ->
    # token 15; char 17 ('\n') -> 16; char 18 ('A' of "A:") -> 17; char 22 -> token 20.
    got = char_to_token_ends(tok, [ids], [text], [[7, 6, 16, 17, 18, 22, 50]])
    assert got == [[6, 6, 15, 16, 17, 20, 20]]


def test_byte_level_character_split_over_two_tokens():
    # 'é' is the bytes C3 A9, byte-level characters 'Ã' and '©': two tokens, no merges.
    # decode(first token) is '\ufffd' (half a character), which covers nothing, so 'é'
    # (char 0) belongs to token 1, the one that completes it; '!' (char 1) is token 2.
    vocab = {"<pad>": 0, "Ã": 1, "©": 2, "!": 3}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")
    ids = _ids(tok, "é!")
    assert ids == [1, 2, 3]
    assert tok.decode(ids[:1]) == "\ufffd"
    assert char_to_token_ends(tok, [ids], ["é!"], [[0, 1]]) == [[1, 2]]


def test_degenerate_inputs_never_raise(char_tok):
    ids = _ids(char_tok, "ab")
    # An empty completion maps its (impossible) steps to 0; a text that the ids do not
    # decode to maps every step to the last token; no steps gives no ends.
    assert char_to_token_ends(char_tok, [[], ids, ids], ["", "zz", "ab"], [[0], [0, 1], []]) == [
        [0],
        [1, 1],
        [],
    ]
    with pytest.raises(ValueError, match="one of each per completion"):
        char_to_token_ends(char_tok, [ids], [], [[0]])


def test_step_tensors_by_hand():
    step_rewards_, step_mask, step_end = step_tensors(
        [[1.0, 0.0], [0.0, 1.0, 1.0]], [[2, 5], [1, 3, 6]]
    )
    assert step_rewards_.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    assert step_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert step_end.tolist() == [[2, 5, 0], [1, 3, 6]]
    assert step_rewards_.dtype == torch.float32 and step_end.dtype == torch.long

    adv = process_advantages(step_rewards_, step_mask, step_end, group_size=2, completion_length=7)
    # The group's 5 real step rewards are 1, 0, 0, 1, 1: mean 0.6, Bessel variance
    # (0.16 + 0.36 + 0.36 + 0.16 + 0.16) / 4 = 0.3, so a 1 normalises to 0.4 / sqrt(0.3)
    # and a 0 to -0.6 / sqrt(0.3) (eps = 1e-4 is added to the std).
    std = math.sqrt(0.3) + 1e-4
    good, bad = 0.4 / std, -0.6 / std
    # Row 0: steps end at tokens 2 (good) and 5 (bad); row 1 at 1 (bad), 3 and 6 (good).
    expected = torch.tensor(
        [
            [good + bad] * 3 + [bad] * 3 + [0.0],
            [bad + 2 * good] * 2 + [2 * good] * 2 + [good] * 3,
        ]
    )
    assert adv.shape == (2, 7) and torch.isfinite(adv).all()
    torch.testing.assert_close(adv, expected)


def test_no_steps_is_all_masked_with_one_column():
    step_rewards_, step_mask, step_end = step_tensors([[], []], [[], []])
    assert step_rewards_.shape == step_mask.shape == step_end.shape == (2, 1)
    assert step_mask.sum() == 0
    adv = process_advantages(step_rewards_, step_mask, step_end, group_size=2, completion_length=4)
    assert adv.eq(0).all()


def test_step_tensors_rejects_ragged_pairs():
    with pytest.raises(ValueError, match="completion 0 has 2 step scores but 1 ends"):
        step_tensors([[1.0, 0.0]], [[3]])


def test_verifier_steps_to_advantages_end_to_end(char_tok):
    problem = {"a": 47, "b": 85, "op": "+", "answer": "132"}
    completions = [COMPLETION, "7+5+0=12\n4+8+0=12\nA:122"]
    ids = [[*_ids(char_tok, c), char_tok.eos_token_id] for c in completions]
    texts = [char_tok.decode(i, skip_special_tokens=True) for i in ids]
    verified = [step_rewards("47+85=", t, problem) for t in texts]
    assert [s for s, _ in verified] == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    token_ends = char_to_token_ends(char_tok, ids, texts, [e for _, e in verified])
    assert token_ends == [[7, 16, 22], [7, 16, 22]]
    tensors = step_tensors([s for s, _ in verified], token_ends)
    adv = process_advantages(*tensors, group_size=2, completion_length=24)  # [2, 24]
    assert torch.isfinite(adv).all()
    assert adv[:, 23].eq(0).all()  # the EOS comes after the last step
    assert adv[0, 0] > 0 > adv[1, 0]
