"""The embedded default model: a character-level tokenizer and a tiny transformers LM.

No hub download is possible in CI and a user without a GPU must still see GRPO learn, so
the default run builds its own model: a randomly initialised ``LlamaForCausalLM`` (or
``Qwen2ForCausalLM``) of about a million parameters over a character vocabulary, saved
with ``save_pretrained`` so that every later stage loads it exactly like a hub model.
``grpo.hf.load_model_and_tokenizer`` is the one loader for both cases (local path or hub id).

Tokenizer conventions (decided once, here):

* one token per character of a fixed alphabet; any other character becomes ``<unk>``;
* encoding never adds ``<s>`` or ``</s>`` (not even with ``add_special_tokens=True``):
  the chat template writes ``</s>`` after each assistant turn, and supervised code that
  trains on raw text appends ``eos_token_id`` itself;
* ``decode(ids, skip_special_tokens=True)`` returns the encoded text exactly (no space
  clean-up, no normalisation), as long as the text is in the alphabet;
* chat roles are special tokens (``<|system|>``, ``<|user|>``, ``<|assistant|>``) so a
  rendered prompt costs two tokens more than its text:
  ``<|user|>47+85=<|assistant|>``.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)

DEFAULT_ALPHABET = (
    string.digits
    + "+-*/=<>()[]{}:.,;!?#'\"_|%$&@^~ \n"
    + string.ascii_lowercase
    + string.ascii_uppercase
)
"""Digits, arithmetic and punctuation, space, newline and ASCII letters (94 characters)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
"""``<|user|>47+85=<|assistant|>7+5+0=12...</s>``: role tokens, no extra characters."""

ARCHITECTURES = ("llama", "qwen2")


def build_char_tokenizer(
    alphabet: str | None = None, vocab_size: int | None = None
) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: ids 0-6 are special tokens, then one id per character.

    Args:
        alphabet: characters to give an id, in order; duplicates are ignored. Defaults to
            ``DEFAULT_ALPHABET``.
        vocab_size: pad the vocabulary with filler tokens ``<v7>``, ``<v8>``, ... up to this
            size (encoding never produces them; a model may sample them, and they decode
            as written). Gives a real-sized output head, e.g. Qwen2's 151,936, for
            benchmarks. Default: no filler.

    Returns:
        A ``PreTrainedTokenizerFast`` with pad/bos/eos/unk set, ``padding_side="left"``
        (generation pads prompts on the left) and ``CHAT_TEMPLATE``. See the module
        docstring for what encoding adds (nothing) and what decoding returns (the text).
    """
    alphabet = DEFAULT_ALPHABET if alphabet is None else alphabet
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    if vocab_size is not None and vocab_size < len(vocab):
        raise ValueError(f"vocab_size={vocab_size} is below the {len(vocab)} tokens needed")
    for i in range(len(vocab), vocab_size or 0):
        vocab[f"<v{i}>"] = i
    # BPE with no merges is exactly "one token per known character, <unk> otherwise";
    # with no pre-tokenizer, spaces and newlines are ordinary characters.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()  # join tokens with nothing in between
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    arch: Literal["llama", "qwen2"] = "llama",
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised causal LM sized for the CPU demo, in float32.

    The defaults give 1.06M parameters with the default tokenizer (101 tokens): 4 layers of
    262K (attention 4 * 128^2, SwiGLU MLP 3 * 128 * 512, two norms) plus a 101 x 128
    embedding tied to the output head. ``hidden_size=192`` gives 1.8M; ``256`` with
    ``intermediate_size=688`` gives 3.2M.

    Args:
        tokenizer: gives the vocabulary size and the pad/bos/eos ids.
        arch: ``"llama"`` (``LlamaForCausalLM``) or ``"qwen2"`` (``Qwen2ForCausalLM``,
            which adds biases to the q/k/v projections).
        hidden_size, num_layers, num_heads, intermediate_size, max_position_embeddings:
            the transformer's sizes (RoPE positions, so max_position_embeddings adds no
            parameters).
        seed: seeds ``torch`` before initialisation, so the same arguments give the same
            weights.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if hidden_size % num_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})"
        )
    special_ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[arch]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        **special_ids,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    model.generation_config = GenerationConfig(**special_ids)
    return model


def init_model_dir(
    path: str | Path,
    arch: Literal["llama", "qwen2"] = "llama",
    alphabet: str | None = None,
    vocab_size: int | None = None,
    **sizes: int,
) -> Path:
    """Build the tokenizer and a tiny model and ``save_pretrained`` both into ``path``.

    Args:
        path: directory to write (created if missing).
        arch: see ``build_tiny_model``.
        alphabet, vocab_size: see ``build_char_tokenizer``.
        **sizes: keyword arguments of ``build_tiny_model`` (``hidden_size``, ``seed``, ...).

    Returns:
        ``path`` as a ``Path``, loadable by ``grpo.hf.load_model_and_tokenizer``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer(alphabet, vocab_size)
    model = build_tiny_model(tokenizer, arch=arch, **sizes)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
