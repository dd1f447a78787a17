"""A bounded store for the activations sequential least squares keeps between its passes.

Values stay in memory up to a byte limit; past it, new values go to one
append-only file in a temporary directory (``SpillFile``), are read back when
asked for, and their blocks are freed when dropped.  A value comes back bit
for bit as it went in (dtype, shape and memory layout), so where it was kept
never changes a result.  The directory goes with the store: ``close`` (or
leaving its ``with`` block, on success, on an error or on Ctrl-C) removes it
and the file in it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable

import numpy as np
import torch

from pleascc.passes.errors import PleasccError

ALIGN = 64  # bytes: each tensor in a spilled value starts on such a boundary, so it can be viewed in its dtype
BLOCK = 4096  # bytes: direct I/O's unit; each spilled value starts on one and is padded to whole ones
QUEUED_BYTES = 2**26  # spilled values waiting for the writer thread at most; ``put`` waits past it
AHEAD_BYTES = 2**26  # spilled values being read ahead at most; past it a value is read when asked for
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02  # linux/falloc.h


@dataclass(frozen=True)
class _Spilled:
    """Where one tensor of a spilled value lies in its bytes, and how to rebuild it."""

    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


class ActivationStore:
    """Key → value (tensors, or tuples and lists of them; anything else is kept as it is).

    ``memory_bytes``: how much memory the store holds at most: values kept
    in memory and, once some have spilled, the spill file's buffers (writes
    queued, reads ahead) and what its readers hold of values read back
    (``reserve``).  The rest goes to a file under ``work_dir`` (default: the
    system's temporary directory).
    """

    def __init__(self, memory_bytes: float, work_dir: str | Path | None = None) -> None:
        self.limit = memory_bytes
        self.work_dir = work_dir
        self._memory: dict[Hashable, object] = {}
        self._disk: dict[Hashable, tuple[int, int, object, int]] = {}  # key -> (offset, length, skeleton, bytes)
        self._file: SpillFile | None = None
        self.memory_bytes = self.disk_bytes = 0
        self.reserved = 0  # bytes of values read back that a reader holds at once, at most (``reserve``)
        self.peak_memory_bytes = self.peak_disk_bytes = self.spilled_bytes = 0

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._memory or key in self._disk

    def put(self, key: Hashable, value: object, memory_limit: float | None = None) -> None:
        """Keep ``value`` under ``key`` (replacing what was there): in memory while it fits, else on disk.

        ``memory_limit``: in memory only while the store's values there stay
        within it (below the store's limit: leave the rest to values read more often).
        """
        self.drop(key)
        size = nbytes(value)
        limit = self.limit if memory_limit is None else min(memory_limit, self.limit)
        if self._file is not None:  # the spill file's buffers and the values read back take the same memory
            limit -= QUEUED_BYTES + AHEAD_BYTES + self.reserved
        if size == 0 or self.memory_bytes + size <= limit:
            self._memory[key] = _owned(value)
            self.memory_bytes += size
            self.peak_memory_bytes = max(self.peak_memory_bytes, self.memory_bytes)
            return
        if self._file is None:
            self._file = SpillFile(Path(tempfile.mkdtemp(prefix="pleascc-", dir=self.work_dir)))
        value = _densified(value)
        skeleton, length = _layout(value, [0])
        raw = _aligned_empty(-(-length // BLOCK) * BLOCK)
        _copy_into(value, skeleton, raw)
        self._disk[key] = (self._file.write(raw), len(raw), skeleton, size)
        self.disk_bytes += size
        self.spilled_bytes += size
        self.peak_disk_bytes = max(self.peak_disk_bytes, self.disk_bytes)

    def get(self, key: Hashable) -> object:
        """The value kept under ``key``, read back from the spill file if it went there."""
        if key in self._memory:
            return self._memory[key]
        offset, length, skeleton, _ = self._disk[key]
        return _rebuild(skeleton, self._file.read(offset, length))

    def reserve(self, keys: list[Hashable]) -> None:
        """Leave room in the limit for a reader to hold the values of ``keys`` that went to disk, read back.

        A value read back is a copy its reader holds outside what the store
        counts; a reader that holds several at once (a pass's batch) says so,
        and values kept from then on leave room for the most it asked.
        """
        self.reserved = max(self.reserved, sum(self._disk[key][3] for key in keys if key in self._disk))

    def read_ahead(self, keys: list[Hashable]) -> None:
        """Start reading those of ``keys`` that went to disk, to be asked for soon (``get``)."""
        for key in keys:
            if key in self._disk:
                offset, length, _, _ = self._disk[key]
                self._file.read_ahead(offset, length)

    def drop(self, key: Hashable) -> None:
        """Forget ``key``'s value, freeing its blocks on disk if it has some (no error if there is none)."""
        if key in self._memory:
            self.memory_bytes -= nbytes(self._memory.pop(key))
        elif key in self._disk:
            offset, length, _, size = self._disk.pop(key)
            self._file.free(offset, length)
            self.disk_bytes -= size

    def keys(self) -> list[Hashable]:
        return [*self._memory, *self._disk]

    def close(self) -> None:
        """Drop every value and remove the spill directory."""
        self._memory.clear()
        self._disk.clear()
        self.memory_bytes = self.disk_bytes = 0
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def directory(self) -> Path | None:
        """The spill directory, once a value has been spilled."""
        return self._file.directory if self._file else None


class SpillFile:
    """One append-only file of spilled values, written and read ahead by threads of their own while the
    passes compute.

    Direct I/O where the file system allows it: a value is written once and
    read once, so the page cache would only copy it and compete with the
    store for memory.  A dropped value's blocks are punched out of the
    file, so the disk holds about what the store holds.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        path = directory / "spill.bin"
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o600)
        except OSError:  # a file system without direct I/O (tmpfs): through the page cache
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.end = 0
        self.queued: dict[int, torch.Tensor] = {}  # offset -> bytes not yet written
        self.freed: set[int] = set()  # offsets dropped while queued
        self.punches: list[tuple[int, int]] = []  # (offset, length) written, then dropped
        self.queued_bytes = 0
        self.closed = False
        self.error: OSError | None = None
        self.changed = threading.Condition()
        self.writer = threading.Thread(target=self._write_queued, daemon=True)
        self.writer.start()
        self.reader = ThreadPoolExecutor(max_workers=1)
        self.ahead: dict[int, tuple[Future, int]] = {}  # offset -> its bytes being read ahead, and their length
        self.ahead_bytes = 0

    def write(self, raw: torch.Tensor) -> int:
        """Queue ``raw`` (aligned, whole blocks) to be written; return its offset in the file."""
        with self.changed:
            self._raise_error()
            while self.queued_bytes > QUEUED_BYTES:
                self.changed.wait()
                self._raise_error()
            offset, self.end = self.end, self.end + len(raw)
            self.queued[offset] = raw
            self.queued_bytes += len(raw)
            self.changed.notify_all()
        return offset

    def read_ahead(self, offset: int, length: int) -> None:
        """Start reading the bytes at ``offset``, for a ``read`` soon, unless ``AHEAD_BYTES`` are being read ahead."""
        with self.changed:
            if offset not in self.queued and offset not in self.ahead and self.ahead_bytes + length <= AHEAD_BYTES:
                self.ahead[offset] = self.reader.submit(self._read, offset, length), length
                self.ahead_bytes += length

    def read(self, offset: int, length: int) -> torch.Tensor:
        with self.changed:
            self._raise_error()
            raw, ahead = self.queued.get(offset), self._forget_ahead(offset)
        if raw is not None:  # not written yet: its bytes are still here
            return raw
        return ahead.result() if ahead is not None else self._read(offset, length)

    def free(self, offset: int, length: int) -> None:
        with self.changed:
            self._forget_ahead(offset)
            if offset in self.queued:
                self.freed.add(offset)
            else:
                self.punches.append((offset, length))
            self.changed.notify_all()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()
        self.writer.join()
        self.reader.shutdown(cancel_futures=True)
        os.close(self.fd)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _forget_ahead(self, offset: int) -> Future | None:
        """The read ahead of ``offset``'s bytes, if one was started, no longer counted (the lock held)."""
        future, length = self.ahead.pop(offset, (None, 0))
        self.ahead_bytes -= length
        return future

    def _read(self, offset: int, length: int) -> torch.Tensor:
        raw = _aligned_empty(length)
        os.preadv(self.fd, [raw.numpy().data], offset)
        return raw

    def _write_queued(self) -> None:
        """The writer thread: queued values in order, and punches for dropped ones, until closed."""
        while True:
            with self.changed:
                while not self.queued and not self.punches and not self.closed:
                    self.changed.wait()
                if self.closed or self.error:
                    return
                if self.punches:
                    punch, write = self.punches.pop(), None
                else:
                    offset = min(self.queued)
                    punch, write = None, (offset, self.queued[offset], offset in self.freed)
            if punch:
                _punch(self.fd, *punch)
                continue
            offset, raw, dropped = write
            try:
                if not dropped:
                    os.pwrite(self.fd, raw.numpy().data, offset)
            except OSError as exc:
                self.error = exc
            with self.changed:
                del self.queued[offset]
                self.queued_bytes -= len(raw)
                if offset in self.freed:
                    self.freed.discard(offset)
                    if not dropped:
                        self.punches.append((offset, len(raw)))
                self.changed.notify_all()

    def _raise_error(self) -> None:
        if self.error is not None:
            raise PleasccError(f"cannot write activations to {self.directory} ({self.error.strerror}): pass "
                               "--work-dir DIR on a disk with room, or a larger --cache-gb")


def _punch(fd: int, offset: int, length: int) -> None:
    """Free a dropped value's blocks (Linux's fallocate; elsewhere they are freed when the file goes)."""
    if _FALLOCATE is not None:
        _FALLOCATE(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ctypes.c_long(offset), ctypes.c_long(length))


_FALLOCATE = getattr(ctypes.CDLL(None), "fallocate", None) if os.name == "posix" else None


def nbytes(value: object) -> int:
    """Bytes of the tensors in a value (tuples and lists looked into)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 0


def _owned(value: object) -> object:
    """``value`` holding no more memory than its own bytes: a view of a larger tensor is copied."""
    if isinstance(value, torch.Tensor):
        whole = value.untyped_storage().nbytes() == value.numel() * value.element_size()
        return value if _dense(value) and whole else value.clone(memory_format=torch.preserve_format)
    if isinstance(value, (tuple, list)):
        return type(value)(_owned(v) for v in value)
    return value


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one block of memory, in some order of its axes (channels-last too)."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _aligned_empty(length: int) -> torch.Tensor:
    """``length`` bytes starting on a ``BLOCK`` boundary, as direct I/O needs."""
    raw = torch.empty(length + BLOCK, dtype=torch.uint8)
    start = -raw.data_ptr() % BLOCK
    return raw[start:start + length]


def _densified(value: object) -> object:
    """``value`` with each tensor filling one block of memory (``_dense``), copied contiguous where not."""
    if isinstance(value, torch.Tensor):
        return value if _dense(value) else value.contiguous()
    if isinstance(value, (tuple, list)):
        return type(value)(_densified(v) for v in value)
    return value


def _layout(value: object, end: list[int]) -> tuple[object, int]:
    """A dense value's skeleton (its tensors replaced by where their bytes go) and its length in bytes."""
    if isinstance(value, torch.Tensor):
        spilled = _Spilled(end[0], tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
        end[0] += -(-value.numel() * value.element_size() // ALIGN) * ALIGN
        return spilled, end[0]
    if isinstance(value, (tuple, list)):
        return type(value)(_layout(v, end)[0] for v in value), end[0]
    return value, end[0]


def _copy_into(value: object, skeleton: object, raw: torch.Tensor) -> None:
    """Copy a dense value's tensors' bytes, each in its own memory order, to where ``skeleton`` places them."""
    if isinstance(skeleton, _Spilled):
        flat = value.detach().as_strided((value.numel(),), (1,), value.storage_offset()).view(torch.uint8)
        raw[skeleton.offset:skeleton.offset + len(flat)].copy_(flat)
    elif isinstance(skeleton, (tuple, list)):
        for v, s in zip(value, skeleton):
            _copy_into(v, s, raw)


def _rebuild(skeleton: object, raw: torch.Tensor) -> object:
    if isinstance(skeleton, _Spilled):
        size = int(np.prod(skeleton.shape)) * skeleton.dtype.itemsize
        if not size:
            return torch.empty_strided(skeleton.shape, skeleton.stride, dtype=skeleton.dtype, device=skeleton.device)
        flat = raw[skeleton.offset:skeleton.offset + size].view(skeleton.dtype)
        return flat.as_strided(skeleton.shape, skeleton.stride).to(skeleton.device)
    if isinstance(skeleton, (tuple, list)):
        return type(skeleton)(_rebuild(s, raw) for s in skeleton)
    return skeleton
