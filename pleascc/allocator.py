"""Keep freed memory for reuse: glibc's defaults make every batch of a statistics pass page-fault its activations.

glibc serves blocks above its mmap threshold (at most 32 MB, adjusted as
blocks are freed) with a fresh mmap and unmaps them on free, and returns the
heap's free top to the OS past its trim threshold.  A statistics pass
allocates and frees the same activations batch after batch, a 224² CNN's
first stage tens of MB per tensor, so every batch faults them back in,
zero-filled page by page.  Raising both thresholds keeps freed
blocks in the heap for the next batch (`benchmarks/bench_scale.py breakdown
--glibc-defaults` measures the difference).  After each batch of
sequential least squares, ``release_freed_memory`` hands back what the heap
holds past a bound.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

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



class MallInfo(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h): every arena's totals, in bytes."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_info() -> MallInfo | None:
    """What malloc has in use and holds now (``mallinfo2``); None where libc is not glibc 2.33 or later."""
    mallinfo = getattr(glibc(), "mallinfo2", None)
    if mallinfo is None:
        return None
    mallinfo.restype = MallInfo
    return mallinfo()


IDLE_RESIDENT_BYTES = 3 * 2**29  # 1.5 GB: anonymous resident bytes beyond malloc's in use past which free pages go back


def release_freed_memory() -> bool:
    """Hand the free pages inside malloc's heap back to the OS (``malloc_trim``) where the process's anonymous
    memory exceeds what malloc has in use by more than ``IDLE_RESIDENT_BYTES``; True if it did.

    After each batch of sequential least squares: a batch frees its
    activations around values the store keeps for later passes and spill
    buffers still queued, and the holes add up within a pass to gigabytes
    on a 224² model.  Released
    pages are faulted back in when reused, so it is done only past the bound
    (``KEEP_BYTES`` kept for reuse, the libraries' own, a batch's holes); the
    check itself (``mallinfo2``) costs about a millisecond.  Anonymous, not
    all resident memory: pages of mapped files (libraries, a memory-mapped
    dataset) are not malloc's, and trimming cannot release them.
    """
    info, anonymous = malloc_info(), _anonymous_resident_bytes()
    if info is None or anonymous is None or anonymous - info.uordblks - info.hblkhd <= IDLE_RESIDENT_BYTES:
        return False
    glibc().malloc_trim(0)
    return True


def _anonymous_resident_bytes() -> int | None:
    """The process's resident memory not backed by a file now (Linux's /proc/self/statm: resident − shared),
    None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            _, resident, shared = map(int, f.read().split()[:3])
            return (resident - shared) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None
