"""Where a run executes: its device, its autocast, and its place among processes.

One ``Runtime`` is built per process, before any model loads, and every part of a step
asks it instead of testing the config again: which device tensors live on, which
autocast wraps the forward passes, this process's rank and the world size, and the
collective operations (all-reduce, gather, barrier) that make batch statistics global.
A single CPU process is the no-op case: collectives return their input unchanged.

Multi-process runs are launched with ``torchrun``, which sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``; the process group is joined from that environment (gloo on CPU,
NCCL on CUDA). torch.distributed does the work; nothing here reimplements it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from grpo.config import ConfigError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
"""Values ``model.device`` accepts."""


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """``auto | cpu | cuda | cuda:N`` -> a concrete device; CUDA where none is fails here,
    naming the field, before any model loads. ``auto`` and ``cuda`` take this process's
    ``LOCAL_RANK``-th GPU, so each torchrun process gets its own."""
    if not DEVICE_PATTERN.match(setting):
        raise ConfigError(f"model.device = {setting!r}: expected auto, cpu, cuda or cuda:N")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"model.device = {setting!r}: no CUDA device is available on this machine "
            "(torch.cuda.is_available() is False); use model.device=cpu or auto"
        )
    index = int(setting.split(":")[1]) if ":" in setting else local_rank
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"model.device = {setting!r}: this machine has {torch.cuda.device_count()} CUDA "
            f"device(s), so index {index} does not exist"
        )
    return torch.device("cuda", index)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matmuls natively (oneDNN's check on a CPU)."""
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


@dataclass(frozen=True)
class AutocastState:
    """The autocast in force on a device type when a custom ``autograd.Function`` ran its
    forward; its backward pass re-enters it (autograd does not), so that the recomputed
    matmuls and casts are those the forward made."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def current(cls, device_type: str) -> AutocastState:
        enabled = torch.is_autocast_enabled(device_type)
        return cls(device_type, enabled, torch.get_autocast_dtype(device_type))

    def again(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


@dataclass
class Runtime:
    """This process's device, autocast and rank; the collectives of a multi-process run."""

    device: torch.device
    """Where every model and every tensor of a step lives."""
    autocast_dtype: torch.dtype | None = None
    """The forward passes' autocast dtype (``model.autocast``), None for none."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_settings(cls, device: str = "auto", autocast: str = "none") -> Runtime:
        """Resolve ``model.device`` and ``model.autocast``, and join the process group when
        launched by torchrun (``WORLD_SIZE > 1``). Raises ConfigError before any loading."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device, local_rank)
        dtype = None
        if autocast != "none":
            if not native_bf16(dev):
                raise ConfigError(
                    f"model.autocast = {autocast!r} needs native bfloat16 matmuls (a CPU with "
                    f"avx512_bf16 or AMX, or a GPU with bf16 support); this {dev.type} has "
                    "none, so it would run slower than float32. Set model.autocast=none."
                )
            dtype = torch.bfloat16
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(dev, dtype, rank, world_size, local_rank)

    # ------------------------------------------------------------------ placement
    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, shows progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of every forward pass (not the backward: PyTorch's advice)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def generator(self, seed: int) -> torch.Generator:
        """A sampling generator on this device, seeded. Its stream is keyed by the seed
        alone: callers that need per-rank streams pass a per-rank seed."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def rank_seed(self, seed: int) -> int:
        """This rank's own seed: ``seed`` itself on rank 0, so one process reproduces a
        single-process run, and a distinct one on every other rank, so ranks sampling
        their own groups draw independent noise."""
        return seed + 1_000_003 * self.rank

    def shard(self, items: list) -> list:
        """This rank's contiguous share of ``items``, whose length the world size divides
        (rank r takes the r-th of ``world_size`` equal slices)."""
        if len(items) % self.world_size:
            raise ValueError(f"{len(items)} items do not split over {self.world_size} processes")
        per_rank = len(items) // self.world_size
        return items[self.rank * per_rank : (self.rank + 1) * per_rank]

    def seed_everything(self, seed: int) -> None:
        """Seed Python's and torch's global generators (initialisation, dropout)."""
        random.seed(seed)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``x`` summed (or ``max``/``min``) over processes, in place and returned; the
        identity in a single process. A CPU tensor travels through this process's device
        (NCCL reduces CUDA tensors only)."""
        if self.distributed:
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            on_device = x.to(self.device)
            dist.all_reduce(on_device, op=ops[op])
            if on_device is not x:
                x.copy_(on_device)
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``x`` overwritten in place with rank ``src``'s values (returned); the identity in
        a single process. A CPU tensor travels through this process's device, as in
        ``all_reduce``."""
        if self.distributed:
            on_device = x.to(self.device)
            dist.broadcast(on_device, src=src)
            if on_device is not x:
                x.copy_(on_device)
        return x

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (``[obj]`` in a single process)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (once, at the end of a run)."""
        if self.distributed and dist.is_initialized():
            dist.barrier()  # no process tears its connections down while another still uses them
            dist.destroy_process_group()
