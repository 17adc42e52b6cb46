"""Atomic checkpoints and exact resume.

A checkpoint is a directory ``OUTPUT_DIR/checkpoints/step-N`` holding the policy in
``save_pretrained`` form (so any checkpoint is also a loadable model), the tokenizer, and
``trainer_state.pt`` with optimizer, scheduler, RNG states, sampler position and step.
It is written into a temporary directory next to its final place and renamed when
complete, so a crash mid-write never leaves a half checkpoint that resume would pick up.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.pt"
REF_DIR = "reference"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model,
    tokenizer,
    state: dict[str, Any],
    ref_model=None,
    keep: int = 2,
) -> Path:
    """Write ``checkpoints/step-{step}`` atomically; keep the newest ``keep`` checkpoints.

    ``state`` holds everything besides weights (optimizer, scheduler, RNG, sampler, step).
    ``ref_model`` is saved only when it is no longer the starting model (iterative RL).
    """
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if ref_model is not None:
        ref_model.save_pretrained(tmp / REF_DIR)
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(checkpoint)!r} is not a complete checkpoint (no {STATE_FILE})"
        )
    return torch.load(path, weights_only=False)
