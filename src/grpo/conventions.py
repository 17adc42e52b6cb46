"""What real checkpoints declare, honoured the way TRL honours it, and checked before work.

- Generation stops at every end token the model declares: the tokenizer's EOS and each id
  of ``model.generation_config.eos_token_id`` (an int or a list). Instruct models list
  more than one there (Qwen2.5 Instruct: ``<|im_end|>`` and ``<|endoftext|>``; Llama 3
  Instruct: ``<|eot_id|>`` besides ``<|end_of_text|>``), so a completion that ends its turn
  stops instead of running on to ``max_completion_length``.
- Chat-message prompts need a tokenizer with a chat template; a run whose data has them
  and whose tokenizer has none stops before the model loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grpo.config import ConfigError
from grpo.rewards.scoring import is_conversational


def stop_token_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """Every id that ends a completion: the tokenizer's EOS first, then each id the model's
    generation config lists, without repeats (TRL 1.16's ``eos_token_ids``).

    >>> from types import SimpleNamespace as NS
    >>> model = NS(generation_config=NS(eos_token_id=[151645, 151643]))  # Qwen2.5 Instruct
    >>> stop_token_ids(model, NS(eos_token_id=151645))
    (151645, 151643)
    >>> stop_token_ids(NS(generation_config=NS(eos_token_id=7)), NS(eos_token_id=2))
    (2, 7)
    >>> stop_token_ids(NS(generation_config=NS(eos_token_id=None)), NS(eos_token_id=2))
    (2,)
    """
    config = getattr(model, "generation_config", None)
    declared = getattr(config, "eos_token_id", None)
    if declared is None:
        declared = []
    elif isinstance(declared, int):
        declared = [declared]
    ids = [tokenizer.eos_token_id, *declared]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def check_chat_prompts(
    rows: Sequence[dict[str, Any]],
    prompt_column: str,
    tokenizer: Any = None,
    name_or_path: str | None = None,
) -> None:
    """Raise ConfigError when a prompt is a list of chat messages and the tokenizer has no
    chat template to render it with.

    Args:
        rows: the training rows.
        prompt_column: the column holding the prompt.
        tokenizer: the run's tokenizer; when None it is loaded from ``name_or_path``
            (the tokenizer alone, not the model), and only if some prompt is a message list.
        name_or_path: where the tokenizer comes from (named in the error).
    """
    first = next((i for i, r in enumerate(rows) if is_conversational(r[prompt_column])), None)
    if first is None:
        return
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if getattr(tokenizer, "chat_template", None):
        return
    where = f"model.name_or_path={str(name_or_path)!r}" if name_or_path else "the tokenizer given"
    raise ConfigError(
        f"data.prompt_column={prompt_column!r}: row {first} is a list of chat messages, but "
        f"the tokenizer of {where} has no chat template; give string prompts, or a "
        "tokenizer with a chat_template"
    )
