"""Keep freed memory for reuse: glibc's defaults make every batch of a statistics pass page-fault its activations.

glibc serves blocks above its mmap threshold (at most 32 MB, adjusted as
blocks are freed) with a fresh mmap and unmaps them on free, and returns the
heap's free top to the OS past its trim threshold.  A statistics pass
allocates and frees the same activations batch after batch, ResNet-50's
first stage alone 67 MB per tensor at batch 21, so every batch faults them
back in, zero-filled page by page: in a one-pass ResNet-50 merge the two
passes' forwards took 3.77 times one forward of A and B, not 2
(`benchmarks/bench_scale.py breakdown`, at 0558694).  Raising both
thresholds keeps freed blocks in the heap for the next batch: back to back
at 1941463 that merge took 136 s, and 179 s with glibc's defaults
(`breakdown --glibc-defaults`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
KEEP_BYTES = 1 << 30  # blocks up to 1 GB come from (and return to) the heap; at most 1 GB of free top is kept


@functools.lru_cache(maxsize=None)
def glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc, whose malloc these knobs (and ``mallinfo2``) belong to;
    None elsewhere (musl, macOS: other allocators, other knobs)."""
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path) if path else None
    return libc if hasattr(libc, "gnu_get_libc_version") else None


@functools.lru_cache(maxsize=None)
def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to ``KEEP_BYTES``, once per process; False where libc is not glibc.

    Process-wide and for good (mallopt has no undo): the process keeps up
    to 1 GB of freed memory for reuse instead of returning it to the OS.
    """
    libc = glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))


def release_freed_memory() -> None:
    """Hand the free pages inside malloc's heap back to the OS (glibc's ``malloc_trim``); nothing elsewhere.

    Between the passes of sequential least squares: each pass frees the
    last one's activations around values the store keeps for later passes,
    so without this the heap's holes add up pass after pass (a ViT merge's
    peak RSS grew to 1.8 times what its values used).  Once per pass, the
    pages one batch faults back in cost little.
    """
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
