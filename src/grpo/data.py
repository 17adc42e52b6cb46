"""Prompt datasets and the group sampler.

Rows are plain dicts: ``prompt`` (a string, or a list of chat messages) plus any other
columns, which reach the reward functions as keyword arguments (TRL's convention).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from grpo.config import DataConfig


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL/JSON or Parquet file of prompts into a list of row dicts."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.train_file {str(path)!r} does not exist")
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    if path.suffix not in kinds:
        raise ValueError(
            f"data.train_file {str(path)!r}: unsupported suffix {path.suffix!r}; "
            f"expected one of {sorted(kinds)}"
        )
    ds = datasets.load_dataset(kinds[path.suffix], data_files=str(path), split="train")
    return ds.to_list()


def training_rows(cfg: DataConfig, seed: int) -> list[dict[str, Any]]:
    """The training prompts a config names: a file of its own, or a built-in task's train split."""
    if cfg.train_file:
        rows = load_rows(cfg.train_file)
    else:
        from grpo.tasks import get_task

        rows = get_task(cfg.task).problems("train", cfg.num_train_prompts, seed)
    if not rows:
        raise ValueError("the training data has no rows")
    missing = [i for i, r in enumerate(rows) if cfg.prompt_column not in r]
    if missing:
        raise ValueError(
            f"data.prompt_column={cfg.prompt_column!r} is missing from row {missing[0]} "
            f"(columns: {sorted(rows[missing[0]])})"
        )
    return rows


def encode_prompt(tokenizer, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids of one prompt; chat messages go through the tokenizer's chat template."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


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
