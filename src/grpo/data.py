"""Prompt datasets and the group sampler.

Rows are plain dicts: ``prompt`` (a string, or a list of chat messages) plus any other
columns, which reach the reward functions as keyword arguments (TRL's convention).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from grpo.config import DataConfig
from grpo.errors import DataError

FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
"""File name ending -> the ``datasets`` builder that reads it."""




def _builder(path: Path) -> str | None:
    name = path.name.lower()
    return next((b for end, b in FILE_BUILDERS.items() if name.endswith(end)), None)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(err).__name__}: {line[:200]}"


def load_rows(path: str | Path, field: str = "data.train_file", split: str = "train") -> list[dict]:
    """Rows of a prompt file or ``save_to_disk`` directory, read with ``datasets``.

    Files: JSONL (also gzipped), JSON, CSV, Parquet, Arrow. A DatasetDict directory
    gives its ``split``. ``field`` names the input in errors (``data.eval_file``, ``--data``).

    Raises:
        FileNotFoundError: the path does not exist.
        DataError: the file or directory cannot be read as what its name says.
    """
    path = Path(path)
    if path.is_dir():
        return _rows_from_disk(path, field, split)
    if not path.is_file():
        raise FileNotFoundError(
            f"{field} {str(path)!r} does not exist; expected a prompt file "
            f"({', '.join(FILE_BUILDERS)}) or a save_to_disk directory"
        )
    builder = _builder(path)
    if builder is None:
        raise DataError(
            f"{field} {str(path)!r}: unsupported file type; expected a name ending in "
            f"{', '.join(FILE_BUILDERS)}, or a save_to_disk directory"
        )
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:
        raise DataError(
            f"{field} {str(path)!r} cannot be read as {builder} ({_first_line(err)})"
        ) from err
    return ds.to_list()


def _rows_from_disk(path: Path, field: str, split: str) -> list[dict]:
    import datasets

    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise DataError(
            f"{field} {str(path)!r} is a directory but not a save_to_disk one (no state.json or "
            "dataset_dict.json); for a directory of data files use data.dataset"
        )
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(
            f"{field} {str(path)!r}: cannot be read as a save_to_disk directory "
            f"({_first_line(err)})"
        ) from err
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{field} {str(path)!r} has no split {split!r}; its splits: {', '.join(ds)}"
            )
        ds = ds[split]
    return ds.to_list()


def load_dataset_rows(name: str, config: str | None, split: str) -> list[dict]:
    """Rows of ``datasets.load_dataset(name, config, split=split)``: a hub id or a local
    dataset directory (data files, optionally with a README's configs)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:
        raise DataError(
            f"data.dataset={name!r} (config {config!r}, split {split!r}) cannot be loaded "
            f"({_first_line(err)})"
        ) from err
    return ds.to_list()


def _check_prompts(rows: list[dict], prompt_column: str, source: str) -> list[dict]:
    if not rows:
        raise DataError(f"{source} has no rows; expected at least one prompt")
    missing = [i for i, r in enumerate(rows) if r.get(prompt_column) is None]
    if missing:
        raise DataError(
            f"data.prompt_column={prompt_column!r} is missing from row {missing[0]} of {source} "
            f"(columns: {sorted(rows[missing[0]])})"
        )
    return rows


def training_rows(cfg: DataConfig, seed: int) -> list[dict[str, Any]]:
    """The training prompts a config names: a file, a dataset, or a built-in task's train split."""
    if cfg.train_file:
        rows, source = load_rows(cfg.train_file, "data.train_file", cfg.split), cfg.train_file
    elif cfg.dataset:
        rows, source = load_dataset_rows(cfg.dataset, cfg.config, cfg.split), cfg.dataset
    else:
        from grpo.tasks import get_task

        rows = get_task(cfg.task).problems("train", cfg.num_train_prompts, seed)
        source = f"task {cfg.task!r}"
    return _check_prompts(rows, cfg.prompt_column, source)


def eval_rows(cfg: DataConfig, limit: int | None = None) -> list[dict[str, Any]] | None:
    """Held-out prompts from ``data.eval_file`` or ``data.eval_split`` (at most ``limit``),
    or None when the config names neither."""
    if cfg.eval_file:
        rows = load_rows(cfg.eval_file, "data.eval_file", cfg.eval_split or "test")
        source = cfg.eval_file
    elif cfg.eval_split and cfg.train_file:
        rows = load_rows(cfg.train_file, "data.train_file", cfg.eval_split)
        source = f"{cfg.train_file} [{cfg.eval_split}]"
    elif cfg.eval_split:
        rows = load_dataset_rows(cfg.dataset, cfg.config, cfg.eval_split)
        source = f"{cfg.dataset} [{cfg.eval_split}]"
    else:
        return None
    return _check_prompts(rows[:limit] if limit else rows, cfg.prompt_column, source)


AddSpecialTokens = Literal["auto"] | bool
"""``data.add_special_tokens``: ``"auto"`` (as the tokenizer or chat template does),
``True`` (always start with BOS) or ``False`` (never)."""


def encode_prompt(
    tokenizer, prompt: str | list[dict[str, str]], add_special_tokens: AddSpecialTokens = "auto"
) -> list[int]:
    """Token ids of one prompt, encoded the way the model saw text in pretraining.

    A string is encoded as ``tokenizer(text)`` encodes it by default: with the BOS that
    tokenizers of Llama, Mistral or Gemma put first, and none for Qwen's or the embedded
    character tokenizer, which add nothing. Whatever the tokenizer appends after the text
    (an EOS, a separator) is dropped: a prompt is to be continued, never ended. Chat
    messages go through the tokenizer's chat template, which writes the BOS itself where
    the model wants one, so none is added (and a doubled BOS is cut to one).

    Args:
        tokenizer: a transformers tokenizer.
        prompt: a string, or a list of ``{"role", "content"}`` chat messages.
        add_special_tokens: ``"auto"`` as described; ``True`` also puts
            ``tokenizer.bos_token_id`` first where the encoding lacks it (a model pretrained
            with a BOS its tokenizer does not add); ``False`` gives no BOS at all (a string's
            text tokens only; a chat template's output without a leading BOS).

    >>> from grpo.modeling import build_char_tokenizer
    >>> tok = build_char_tokenizer()  # adds no BOS of its own
    >>> tok.convert_ids_to_tokens(encode_prompt(tok, "1+2="))
    ['1', '+', '2', '=']
    >>> tok.convert_ids_to_tokens(encode_prompt(tok, "1+2=", add_special_tokens=True))
    ['<s>', '1', '+', '2', '=']
    """
    bos = tokenizer.bos_token_id
    if add_special_tokens is True and bos is None:
        raise ValueError(
            "data.add_special_tokens=true puts a BOS first, but this tokenizer has no "
            "bos_token; use auto or false"
        )
    if isinstance(prompt, str):
        ids = _encode_text(tokenizer, prompt, add_special_tokens is not False)
    else:
        out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    starts_with_bos = bos is not None and ids[:1] == [bos]
    while starts_with_bos and ids[:2] == [bos, bos]:  # template text that wrote BOS twice
        ids = ids[1:]
    if add_special_tokens is True and not starts_with_bos:
        ids = [bos, *ids]
    if add_special_tokens is False and starts_with_bos:
        ids = ids[1:]
    return ids


def _encode_text(tokenizer, text: str, with_special: bool) -> list[int]:
    """``tokenizer(text)``'s ids up to the end of the text: the special tokens its
    post-processor puts before the text are kept, those it appends are dropped."""
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not with_special:
        return body
    full = tokenizer(text)["input_ids"]
    n = len(body)
    start = next((i for i in range(len(full) - n + 1) if full[i : i + n] == body), None)
    if n and start is not None:
        return full[: start + n]
    # nothing to anchor on (empty text, or a post-processor that rewrote it): keep its BOS
    bos = tokenizer.bos_token_id
    return [bos, *body] if bos is not None and full[:1] == [bos] else body


class PromptSampler:
    """Draws prompt indices from seeded shuffles of ``range(n)``, epoch after epoch.

    Its state is ``(epoch, position)``, so a resumed run draws exactly the prompts that an
    uninterrupted run would have drawn.
    """

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed = num_rows, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()

    def next(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            take = min(k - len(out), self.num_rows - self.position)
            out += self._order[self.position : self.position + take]
            self.position += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle()
