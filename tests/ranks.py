"""Run a function on N local processes joined by gloo, as torchrun would start them.

``run_ranks(fn, world_size, tmp_path, *args)`` starts ``world_size`` spawned processes with
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``),
calls ``fn(*args)`` in each and returns their results in rank order. ``fn`` joins the
process group itself (``Runtime.from_settings``), exactly as a torchrun-launched run does.
A process that raises fails the test with its traceback; a hang fails after ``timeout``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world_size: int, port: int, out: Path, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        torch.save(result, out / f"result-{rank}.pt")
    except BaseException:
        (out / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, tmp_path: Path, *args, timeout: float = 120.0) -> list:
    out = Path(tmp_path) / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, out, args))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    errors = sorted(out.glob("error-*.txt"))
    if errors:
        raise AssertionError("\n".join(e.read_text() for e in errors))
    if hung:
        raise AssertionError(f"{len(hung)} of {world_size} processes still ran after {timeout}s")
    return [torch.load(out / f"result-{r}.pt", weights_only=False) for r in range(world_size)]
