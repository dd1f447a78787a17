"""BLAS numerics of least squares' Grams: float32 products summed in float64, one triangle at a time.

A 3×3 convolution's im2col Gram is the bulk of a merge's work, so it is
formed as BLAS ssyrk forms it (``GramSum``: one triangle, float32, flushed
into a float64 total every ``FLUSH_ROWS`` rows) and completed in place
(``mirror_upper``).  Kept apart from the statistics: what is tuned here is
speed and rounding, not what is summed.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import blas


SYRK_MIN = 128  # columns from which one group's Gram goes to BLAS syrk
FLUSH_ROWS = 8192  # rows a float32 partial Gram sums before it is added to the float64 total


class GramSum:
    """rowsᵀ·rows per group, summed over batches; only the upper triangle is meant (see ``mirror_upper``).

    Products are float32, as the rows are: one group of many columns goes to
    BLAS ssyrk, which computes one triangle (half a matrix product's flops; a
    3×3 convolution's im2col Gram, 9·C_in columns, is the bulk of a merge's
    work) at twice dsyrk's speed, adding in place into a float32 partial sum.
    Every ``FLUSH_ROWS`` rows the partial sum goes into the float64 total, so
    rounding never builds up over more rows than that, however many samples
    there are; flushing every batch would cost as much as the float32 saved.
    Other shapes take a batched product, added to the total each batch.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None  # float64
        self.partial: np.ndarray | None = None  # float32, Fortran order: its lower triangle is the upper one
        self.partial_rows = 0

    def add(self, rows: torch.Tensor) -> None:
        groups, n, d = rows.shape
        if groups > 1 or d < SYRK_MIN or rows.device.type != "cpu" or rows.dtype != torch.float32:
            self.add_product(rows.transpose(1, 2) @ rows)
            return
        if self.partial is None:
            self.partial = np.zeros((d, d), dtype=np.float32, order="F")
        out = blas.ssyrk(1.0, rows[0].numpy().T, beta=1.0, c=self.partial, trans=0, lower=1, overwrite_c=1)
        if not np.shares_memory(out, self.partial):  # f2py had to copy
            self.partial[...] = out
        self.partial_rows += n
        if self.partial_rows >= FLUSH_ROWS:
            self._flush()

    def add_product(self, gram: torch.Tensor) -> None:
        """One batch's (groups, d, d) product, formed already (a norm's: ``layers._norm_gram``)."""
        self.total = gram.double() if self.total is None else self.total.add_(gram)

    def _flush(self) -> None:
        if self.partial_rows:
            d = self.partial.shape[0]
            self.total = torch.zeros(1, d, d, dtype=torch.float64) if self.total is None else self.total
            self.total[0].T.add_(torch.from_numpy(self.partial))  # the same layout: a streaming add
            self.partial.fill(0)
            self.partial_rows = 0

    def result(self) -> torch.Tensor:
        """The float64 sum so far, upper triangle (``mirror_upper``); the partial sum's memory is freed."""
        self._flush()
        self.partial = None
        return self.total


MIRROR_BLOCK = 512  # rows per step of ``mirror_upper``: a strip small enough to stay in cache


def mirror_upper(m: torch.Tensor) -> torch.Tensor:
    """``m``, each (d, d) matrix's upper triangle copied onto its lower one in place (a ``GramSum``'s result).

    ssyrk fills one triangle only.  Building the symmetric matrix as
    triu + triu(1)ᵀ takes three d×d float64 copies per Gram; a strip at a
    time, it needs no copy the size of the matrix.
    """
    d = m.shape[-1]
    for start in range(0, d, MIRROR_BLOCK):
        end = min(start + MIRROR_BLOCK, d)
        m[..., end:, start:end] = m[..., start:end, end:].transpose(-2, -1)
        corner = m[..., start:end, start:end]
        corner.copy_(corner.triu() + corner.triu(1).transpose(-2, -1))
    return m
