"""Where a CPU run's freed tensors go: back to the operating system, or kept by malloc.

PyTorch takes CPU tensors from the C library's ``malloc``. glibc serves a request of at
least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap`` and returns it on ``free``;
smaller ones come from its heap, which keeps freed memory for reuse. The threshold starts
at 128 KiB and rises (up to 32 MiB) to the size of each large block freed, so after the
first decode steps most activations of a training pass, megabytes each, come from the
heap. The backward pass frees them in another order and size than the gradients it
allocates, so the heap fragments and resident memory grows far past what is alive.
Measured on ``bench/vs_trl.py --config big-vocab-lora`` (2 threads): peak RSS of the
update 2577 MiB with glibc's default, 1925 MiB with a 1 MiB threshold during the
training passes (the live tensors are the same).

Decoding is the opposite case: every token allocates and frees the same ``[N, V]``
temporaries, which the heap hands back without a page fault, while fresh ``mmap`` pages
fault on first touch (about 3x slower decoding at V = 151,936 with a 1 MiB threshold).
So ``release_freed_memory`` sets a 1 MiB threshold for the run, and ``decoding`` lifts it
to 32 MiB while the engine samples, then trims the heap (``malloc_trim``) when it ends.

The price is speed: every mmapped block is faulted in page by page when first touched,
which the heap's recycled blocks are not. On ``bench/vs_trl.py --config short`` (25M
Llama, 2 threads) a step takes 7.0 s instead of 5.5 s, so it is an option
(``run.release_freed_memory``), off by default, for runs that must fit in host memory.

Both are no-ops off glibc (macOS, musl) and on a CUDA device, where activations live in
PyTorch's CUDA allocator, not in malloc's heap.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

import torch

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
TRAINING_THRESHOLD = 1 << 20
"""Bytes from which an allocation is mmapped outside decoding: 1 MiB, well under one
activation of a training pass (positions x hidden size x 4 bytes)."""
DECODING_THRESHOLD = 32 << 20
"""Bytes from which an allocation is mmapped while decoding: glibc's own upper bound."""

_active = False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (``mallopt`` and ``malloc_trim``), else None."""
    name = ctypes.util.find_library("c")
    lib = ctypes.CDLL(name) if name else None
    api = ("mallopt", "malloc_trim", "gnu_get_libc_version")
    return lib if lib is not None and all(hasattr(lib, f) for f in api) else None


def _set_threshold(nbytes: int) -> bool:
    libc = _glibc()
    return libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, nbytes) == 1


def release_freed_memory(device: torch.device) -> bool:
    """From now on return freed tensors of 1 MiB or more to the OS (CPU devices under glibc;
    returns whether the setting took effect)."""
    global _active
    _active = device.type == "cpu" and _set_threshold(TRAINING_THRESHOLD)
    return _active


@contextlib.contextmanager
def decoding() -> Iterator[None]:
    """Let the heap recycle decode temporaries inside the block, then give its free pages
    back and restore the training threshold (a no-op unless ``release_freed_memory`` is on)."""
    if not _active:
        yield
        return
    _set_threshold(DECODING_THRESHOLD)
    try:
        yield
    finally:
        _set_threshold(TRAINING_THRESHOLD)
        _glibc().malloc_trim(0)
