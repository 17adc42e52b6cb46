"""Checkpoints written whole or not at all, verified before use, loaded without running code.

A checkpoint is a directory ``OUTPUT_DIR/checkpoints/step-N`` holding the policy in
``save_pretrained`` form (so any checkpoint is also a loadable model), the tokenizer,
``trainer_state.pt`` (optimizer, scheduler, RNG states, sampler position, step), the
run's ``config.yaml`` and, written last, ``manifest.json``: the size and SHA-256 of
every file.

Writing (``Checkpointer.save``): every named ``Part`` writes into a temporary directory
``.tmp-step-N-PID`` next to the final place; each file and directory is fsynced, the
manifest is written and fsynced, and the directory is renamed into place (and its parent
fsynced). A crash at any moment leaves either the previous set of checkpoints or the new
one; temporaries of dead writers are removed by the next save.

Reading (``load_for_resume``): the manifest is checked (every file present, with its
size and hash), ``trainer_state.pt`` is loaded with ``torch.load(weights_only=True)``,
which builds tensors and plain containers only, so a planted pickle cannot run code, and
the saved config is compared with the current one. A damaged newest checkpoint is
skipped, with a message naming it, in favour of the next older intact one.

Parts are written through a function each (``Part.write(directory)``), so a sharded
writer (``torch.distributed.checkpoint.save`` for the weights and optimizer, on every
rank, with the manifest written by the main rank after a barrier) is one more kind of
part, not a new checkpoint format.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from grpo.errors import CheckpointError

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
MANIFEST = "manifest.json"
REF_DIR = "reference"
FORMAT = 1

# Config keys that may differ on resume: the step budget, and settings that change how a
# run is logged, saved or paced but not the weights it computes.
RESUMABLE_CHANGES = frozenset(
    {
        "optim.max_steps",
        "optim.max_nonfinite_steps",
        "rewards.timeout_s",
        "run.output_dir",
        "run.num_threads",
        "run.log_every",
        "run.save_every",
        "run.save_every_minutes",
        "run.keep_last",
        "run.eval_every",
        "run.eval_prompts",
        "run.progress",
        "distributed.world_size",  # recorded by the trainer; the checkpoint's own is checked
    }
)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- state
def rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """Python's and torch's global RNG states (tuples of ints and a uint8 tensor: both
    load with ``weights_only=True``); on a CUDA ``device`` also each GPU's, as
    ``{"cuda": {index: uint8 tensor}}``: every visible GPU's in one process
    (``get_rng_state_all``), the process's own GPU's under torchrun (reading another one's
    would open a CUDA context there). On the CPU there is no ``"cuda"`` entry."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device is not None and torch.device(device).type == "cuda":
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            index = torch.cuda.current_device()
            state["cuda"] = {index: torch.cuda.get_rng_state(index)}
        else:
            state["cuda"] = dict(enumerate(torch.cuda.get_rng_state_all()))
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved (the GPUs' states only where CUDA is present)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        for index, cuda_state in state["cuda"].items():
            if index < torch.cuda.device_count():
                torch.cuda.set_rng_state(cuda_state, index)


# ---------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class Part:
    """One named piece of a checkpoint: ``write(directory)`` puts its files there."""

    name: str
    write: Callable[[Path], None]
    every_rank: bool = False
    """Under torchrun, written by every process (``torch.distributed.checkpoint``'s
    shards); the other parts are written by rank 0 alone."""


def files_part(name: str, save: Callable[[Path], Any], subdir: str = "") -> Part:
    """A part written by a ``save_pretrained``-like function into ``subdir`` ('' = top)."""

    def write(directory: Path) -> None:
        target = directory / subdir if subdir else directory
        target.mkdir(parents=True, exist_ok=True)
        save(target)

    return Part(name, write)


def state_part(name: str, state: dict[str, Any], filename: str = STATE_FILE) -> Part:
    """A part holding a state dict of tensors and plain Python values (``torch.save``)."""
    return Part(name, lambda directory: torch.save(state, directory / filename))


def text_part(name: str, filename: str, text: str) -> Part:
    return Part(name, lambda directory: (directory / filename).write_text(text))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _fsync_dirs(directory: Path) -> None:
    for sub in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
        _fsync(sub)


def _fsync_tree(directory: Path) -> None:
    """Every file under ``directory``, then every directory, on disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync_dirs(directory)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete directory ``tmp`` to ``final``, replacing an existing ``final``
    whole (it is moved aside first: a directory cannot be renamed over a full one), and
    fsync the parent."""
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale(root: Path, pattern: str) -> None:
    """Remove the temporaries in ``root`` matching ``pattern`` (``...-PID``) whose writer
    died, or is this process."""
    if not root.is_dir():
        return
    for path in root.glob(pattern):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _step_of(path: Path) -> int | None:
    head, _, number = path.name.partition("-")
    return int(number) if head == "step" and number.isdigit() else None


class Checkpointer:
    """Writes, lists and prunes ``OUTPUT_DIR/checkpoints/step-N`` (see the module doc)."""

    def __init__(self, output_dir: str | Path, keep_last: int = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(self, step: int, parts: Iterable[Part], runtime=None) -> Path:
        """Write ``parts`` as ``step-{step}`` atomically; keep the newest ``keep_last``.

        Under torchrun (``runtime`` with several processes) every process calls it: they
        write into rank 0's temporary directory (``every_rank`` parts on every process, the
        rest on rank 0), and rank 0 writes the manifest and renames it once all are done.
        """
        main = runtime is None or runtime.is_main
        many = runtime is not None and runtime.distributed
        pid = runtime.gather_objects(os.getpid())[0] if many else os.getpid()
        final = self.root / f"step-{step}"
        tmp = self.root / f".tmp-step-{step}-{pid}"
        if main:
            self.root.mkdir(parents=True, exist_ok=True)
            self.clean_stale()
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        names = []
        for part in parts:
            if many and part.every_rank:
                runtime.barrier()  # the directory exists
            if main or part.every_rank:
                part.write(tmp)
            names.append(part.name)
        if many:
            runtime.barrier()  # every process has written
        if not main:
            runtime.barrier()  # rank 0 has published
            return final
        self._write_manifest(tmp, step, names)
        _publish(tmp, final)  # the same step may be saved again (e.g. right after a resume)
        self.prune()
        if many:
            runtime.barrier()
        return final

    @staticmethod
    def _write_manifest(directory: Path, step: int, parts: list[str]) -> None:
        files = {}
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            _fsync(path)
            rel = path.relative_to(directory).as_posix()
            files[rel] = {"size": path.stat().st_size, "sha256": _digest(path)}
        manifest = {"format": FORMAT, "step": step, "parts": parts, "files": files}
        with (directory / MANIFEST).open("w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dirs(directory)

    def clean_stale(self) -> None:
        """Remove temporaries left by writers that died (or by this process)."""
        _remove_stale(self.root, ".*-step-*")

    def checkpoints(self) -> list[Path]:
        """``step-N`` directories, oldest first. One of this writer's is complete (it gets
        its name only after the manifest is written); ``verify`` before use."""
        if not self.root.is_dir():
            return []
        return sorted(
            (p for p in self.root.iterdir() if p.is_dir() and _step_of(p) is not None), key=_step_of
        )

    def prune(self) -> None:
        for old in self.checkpoints()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model,
    tokenizer,
    state: dict[str, Any],
    ref_model=None,
    keep: int = 2,
    config: Any = None,
) -> Path:
    """Write ``checkpoints/step-{step}``: policy, tokenizer, reference (only when it is no
    longer the starting model: iterative RL), trainer state and the run's config."""
    parts = [files_part("model", model.save_pretrained)]
    if tokenizer is not None:
        parts.append(files_part("tokenizer", tokenizer.save_pretrained))
    if ref_model is not None:
        parts.append(files_part("reference", ref_model.save_pretrained, REF_DIR))
    parts.append(state_part("trainer_state", state))
    if config is not None:
        dump = config.model_dump() if hasattr(config, "model_dump") else config
        parts.append(text_part("config", CONFIG_FILE, yaml.safe_dump(dump, sort_keys=False)))
    return Checkpointer(output_dir, keep).save(step, parts)


def save_checkpoint_sharded(
    output_dir: str | Path,
    step: int,
    tokenizer,
    state: dict[str, Any],
    write_shards: Callable[[Path], None],
    runtime,
    keep: int = 2,
    config: Any = None,
) -> Path:
    """``save_checkpoint`` under torchrun; every process calls it. ``write_shards`` writes
    the weights, optimizer and each process's own state on every process
    (``grpo.distributed.save_sharded``); rank 0 writes the tokenizer, ``state`` (what the
    processes share) and the config."""
    parts = [Part("sharded", write_shards, every_rank=True)]
    if tokenizer is not None:
        parts.append(files_part("tokenizer", tokenizer.save_pretrained))
    parts.append(state_part("trainer_state", state))
    if config is not None:
        text = yaml.safe_dump(config.model_dump(), sort_keys=False)
        parts.append(text_part("config", CONFIG_FILE, text))
    return Checkpointer(output_dir, keep).save(step, parts, runtime)


def save_final(directory: str | Path, write: Callable[[Path], None], runtime=None) -> Path:
    """Write the trained model to ``directory`` (``OUTPUT_DIR/final``) whole or not at all.

    ``write(tmp)`` fills a temporary directory ``.tmp-final-PID`` beside it; every file
    and directory is fsynced and it is renamed into place, replacing a ``final/`` of an
    earlier run whole. A stop signal arriving meanwhile waits until it is in place (a
    second one aborts and the temporary is removed, the old ``final/`` untouched). Under
    torchrun every process calls it (``write`` gathers the weights; rank 0 writes them)
    and rank 0 renames.
    """
    from grpo.faults import stop_signals  # faults imports this module

    final = Path(directory)
    main = runtime is None or runtime.is_main
    many = runtime is not None and runtime.distributed
    pid = runtime.gather_objects(os.getpid())[0] if many else os.getpid()
    tmp = final.parent / f".tmp-{final.name}-{pid}"
    with stop_signals() as stop:
        if main:
            final.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(final.parent, f".*-{final.name}-*")
            tmp.mkdir()
        if many:
            runtime.barrier()  # the directory exists
        try:
            write(tmp)
            if many:
                runtime.barrier()  # every process has written
            if main:
                _fsync_tree(tmp)
                _publish(tmp, final)
        finally:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)  # gone unless the write failed
        if many:
            runtime.barrier()  # published
    if stop and main:
        _say(f"{stop.name} while writing {final}: it was completed first")
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """``step-N`` checkpoint directories, oldest first (not yet verified: see ``verify``)."""
    return Checkpointer(output_dir).checkpoints()


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------------------- reading
def verify(checkpoint: str | Path, hashes: bool = True) -> None:
    """Check every file the manifest lists: present, same size, same SHA-256 (the hash
    only with ``hashes``: it reads every byte).

    Raises:
        CheckpointError: naming the checkpoint and the first file that does not match.
    """
    path = Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no {MANIFEST}: it was not completely written"
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: {MANIFEST} is unreadable ({err})"
        ) from None
    for rel, want in files.items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r}: {rel} is missing")
        size = file.stat().st_size
        if size != want["size"]:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: {rel} has {size} bytes, the manifest says "
                f"{want['size']} (truncated or overwritten)"
            )
        if hashes and _digest(file) != want["sha256"]:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: {rel} does not match its SHA-256 in the manifest "
                "(corrupted or modified)"
            )


def load_state(checkpoint: str | Path) -> dict[str, Any]:
    """``trainer_state.pt`` loaded as weights only: tensors and plain containers, no code.

    Raises:
        CheckpointError: the file is missing, damaged, or holds anything else (a pickle
            that would call a function when loaded is refused, never run).
    """
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} has no {STATE_FILE}")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # UnpicklingError, RuntimeError (zip), EOFError ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r}: {STATE_FILE} cannot be loaded as weights only "
            f"({first[:200]}); it is not loaded"
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r}: {STATE_FILE} holds no trainer state"
        )
    return state


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(checkpoint: str | Path, cfg) -> list[str]:
    """``key: saved -> now`` for every config key that differs from the checkpoint's saved
    config, except ``RESUMABLE_CHANGES``."""
    path = Path(checkpoint) / CONFIG_FILE
    if not path.is_file():
        return []
    saved = _flatten(yaml.safe_load(path.read_text()) or {})
    now = _flatten(cfg.model_dump())
    missing = object()
    return [
        f"{key}: {saved.get(key, missing)!r} -> {now.get(key, missing)!r}".replace(
            repr(missing), "(absent)"
        )
        for key in sorted(set(saved) | set(now))
        if key not in RESUMABLE_CHANGES and saved.get(key, missing) != now.get(key, missing)
    ]


def _check_config(checkpoint: Path, cfg, allow_config_change: bool) -> None:
    changes = config_changes(checkpoint, cfg) if cfg is not None else []
    if not changes:
        return
    if allow_config_change:
        _say(f"resuming from {checkpoint} with a changed config: {'; '.join(changes)}")
        return
    raise CheckpointError(
        f"the config differs from the one checkpoint {str(checkpoint)!r} was trained with "
        f"({'; '.join(changes)}); only optim.max_steps and logging/saving settings may "
        "change on resume. Restore those values, or pass --allow-config-change"
    )


def check_resumable(
    output_dir: str | Path,
    checkpoint: str | Path | None = None,
    cfg=None,
    allow_config_change: bool = False,
) -> Path:
    """What ``load_for_resume`` will refuse, found from the manifests and the saved config
    alone (no hashing, no state loaded), so that it is reported before any model loads."""
    cfg = None if allow_config_change else cfg  # load_for_resume reports the changes
    if checkpoint:
        verify(checkpoint, hashes=False)
        _check_config(Path(checkpoint), cfg, False)
        return Path(checkpoint)
    found = list_checkpoints(output_dir)
    if not found:
        raise CheckpointError(f"no checkpoint to resume from in {str(output_dir)!r}")
    for path in reversed(found):
        try:
            verify(path, hashes=False)
        except CheckpointError:
            continue  # load_for_resume says why, and skips it
        _check_config(path, cfg, False)
        return path
    raise CheckpointError(
        f"no intact checkpoint to resume from in {str(output_dir)!r}: all {len(found)} are damaged"
    )


def load_for_resume(
    output_dir: str | Path,
    checkpoint: str | Path | None = None,
    cfg=None,
    allow_config_change: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from and its trainer state, verified.

    With ``checkpoint`` given, that one (a damaged one is an error). Otherwise the newest
    intact one in ``OUTPUT_DIR/checkpoints``: damaged ones are skipped with a message.

    Raises:
        CheckpointError: no intact checkpoint, or the config differs (see
            ``config_changes``) and ``allow_config_change`` is False.
    """
    if checkpoint:
        path = Path(checkpoint)
        verify(path)
        state = load_state(path)
        _check_config(path, cfg, allow_config_change)
        return path, state
    found = list_checkpoints(output_dir)
    if not found:
        raise CheckpointError(f"no checkpoint to resume from in {str(output_dir)!r}")
    for path in reversed(found):
        try:
            verify(path)
            state = load_state(path)
        except CheckpointError as err:
            _say(f"skipping damaged checkpoint: {err}")
            continue
        _check_config(path, cfg, allow_config_change)
        return path, state
    raise CheckpointError(
        f"no intact checkpoint to resume from in {str(output_dir)!r}: all {len(found)} are "
        "damaged (see the messages above)"
    )
