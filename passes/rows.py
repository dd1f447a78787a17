"""Calibration samples the passes read a batch at a time: ``NpyRows`` on disk, ``PaddedTokens`` with their
padding mask, and ``read_rows`` for a batch of any kind.

The driver's ``load_data`` makes an ``NpyRows`` of a float ``.npy`` file; the
statistics passes read its batches as they go, so memory stays flat however
many samples calibrate.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pleascc.passes.errors import PleasccError, first_line


class NpyRows:
    """The samples of a float ``.npy`` file, read from disk only when a batch is taken.

    Memory then stays flat however many samples calibrate.  Plain reads, not
    ``np.load(mmap_mode=...)``: mapped pages that were read count as the
    process's resident memory.  Indexing with a slice gives a lazy view;
    ``read`` returns the rows as a float32 tensor (checked for NaN and Inf).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                    np.lib.format.read_magic(f), np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                self.offset = f.tell()
        except (OSError, ValueError) as exc:
            raise PleasccError(f"cannot read {path} ({first_line(exc)}): save the inputs with numpy.save") from exc
        if dtype.kind != "f" or fortran or len(shape) < 2 or shape[0] == 0:
            raise PleasccError(f"{path} holds a {'Fortran-order ' if fortran else ''}{dtype} array of shape {shape}: "
                               "save preprocessed float inputs (N, ...) with numpy.save(path, x)")
        self.dtype, self.row_shape = dtype, tuple(shape[1:])
        self.row_bytes = dtype.itemsize * math.prod(self.row_shape)
        if os.path.getsize(path) < self.offset + shape[0] * self.row_bytes:
            raise PleasccError(f"{path} is shorter than its header's shape {shape} says: the file is truncated; "
                               "save it again with numpy.save")
        self.rows: range | list[int] = range(shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.row_shape)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice | list[int]) -> NpyRows:
        """A lazy view of some rows (a slice, or a list of positions); nothing is read."""
        view = NpyRows.__new__(NpyRows)
        rows = self.rows[index] if isinstance(index, slice) else [self.rows[i] for i in index]
        view.__dict__.update(self.__dict__, rows=rows)
        return view

    def read(self) -> torch.Tensor:
        out = np.empty((len(self.rows), *self.row_shape), self.dtype)
        with open(self.path, "rb") as f:
            for k, row in enumerate(self.rows):  # consecutive rows are one read
                if k == 0 or row != self.rows[k - 1] + 1:
                    f.seek(self.offset + row * self.row_bytes)
                    run = _run_length(self.rows, k)
                    f.readinto(memoryview(out[k:k + run]).cast("B"))
        x = torch.from_numpy(np.asarray(out, dtype=np.float32))  # native byte order, float32
        if not torch.isfinite(x).all():
            raise PleasccError(f"{self.path} contains NaN or Inf: clean the inputs before saving")
        return x


def _run_length(rows, k: int) -> int:
    n = 1
    while k + n < len(rows) and rows[k + n] == rows[k] + n:
        n += 1
    return n


@dataclass(frozen=True)
class PaddedTokens:
    """Token ids (N, T) and their padding mask (1: a real token, 0: padding), indexed together.

    A batch feeds a traced model's two inputs (``executor.NodeRunner``), and
    while a pass holds it, every read of a value skips its padded tokens
    (``batching.batches``, ``reads.valid_tokens``): padding never enters the
    statistics.
    """

    ids: torch.Tensor
    mask: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.ids.shape

    @property
    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids, self.mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index) -> PaddedTokens:
        return PaddedTokens(self.ids[index], self.mask[index])

    def to(self, device: torch.device | None) -> PaddedTokens:
        return PaddedTokens(self.ids.to(device), self.mask.to(device))


def read_rows(x: torch.Tensor | NpyRows | PaddedTokens) -> torch.Tensor | PaddedTokens:
    """A batch as tensors, read from disk if need be."""
    return x.read() if isinstance(x, NpyRows) else x


def model_inputs(x: torch.Tensor | PaddedTokens) -> tuple[torch.Tensor, ...]:
    """A batch as a model's positional inputs: token ids and their padding mask, or the one tensor."""
    return x.inputs if isinstance(x, PaddedTokens) else (x,)
