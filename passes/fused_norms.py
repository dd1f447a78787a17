"""Normalizations fitted in their convolution's pass: half the passes of sequential least squares on a CNN.

A BatchNorm right after a convolution reads that convolution's output,
y = W·x, at the same sampled positions as the convolution's own fit.  Once
W is solved, the norm's moments are quadratic forms of the convolution's:
Σy² = w·XX·w and Σy = w·Σx per channel, and its targets t enter only through
Σ t·x.  So the pass that fits a convolution also sums its norm's targets
against the convolution's rows, and the norm is solved right after it,
without a pass of its own (ResNet-50: 53 of its 107 levels).

What is summed is the norm's residual at both warm starts,
r0 = t − (γ0·W0x + β0), as ``stats._accumulate`` sums the convolution's: a
model merged with itself keeps r0 and W − W0 at rounding size, so its norms
come out exact too.  With δ = W − W0, the norm's residual on the fitted
convolution is r = r0 − γ0·δx, and its sums follow from Σ r0·x, Σ r0² and the
convolution's Gram XX (with its ones column: Σx and the count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pleascc.passes.groups import Analysis
from pleascc.passes.stats import Problem, square_sum


def norm_producers(analysis: Analysis, separate_heads: set[str]) -> dict[str, str]:
    """Each refitted norm that reads a refitted convolution's output → that convolution's node.

    Separate heads are fitted once per model, on their own outputs: they keep passes of their own.
    """
    refit = {layer.node: layer for layer in analysis.layers if layer.refit and layer.node not in separate_heads}
    return {node: layer.source for node, layer in refit.items()
            if layer.source in refit and layer.fuses_into(refit[layer.source])}


def fuse_norms(problems: list[Problem], producers: dict[str, str]) -> None:
    """Hand each norm's problem to every block of its convolution (``Problem.fused``), which sums what its fit
    needs; the norm's own problem is solved after them (``FusedNorm.finish``)."""
    norm_of = {producers[p.layer.node]: p for p in problems if p.layer.node in producers}  # conv node -> norm
    for p in problems:
        if p.layer.node in norm_of:
            p.fused = FusedNorm(norm_of[p.layer.node], p.block.rows)


@dataclass
class FusedNorm:
    """What a norm's fit needs from one block of its convolution: sums of its residual at the warm starts.

    ``rows``: the norm's channels this block computes (None: all).
    """

    norm: Problem
    rows: torch.Tensor | None
    r0x: torch.Tensor | None = None  # (groups, out/groups, d+1): Σ r0·x against the block's rows
    rr0: torch.Tensor | None = None  # (groups, out/groups): Σ r0² per channel
    tt: float = 0.0
    count: float = 0.0

    def add(self, inputs: torch.Tensor, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """One batch: the block's rows (groups, n, d+1), its warm start's outputs W0·x and the norm's
        targets there (groups, n, out/groups), both in the block's row layout."""
        gamma, beta = (v.to(prediction).reshape(prediction.shape[0], 1, -1) for v in self._warm_start())
        residual = target - (prediction * gamma + beta)
        r0x = residual.transpose(1, 2) @ inputs
        self.r0x = r0x.double() if self.r0x is None else self.r0x.add_(r0x)
        rr0 = torch.linalg.vector_norm(residual, dim=1).double().square()
        self.rr0 = rr0 if self.rr0 is None else self.rr0.add_(rr0)
        self.tt += square_sum(target)
        self.count += inputs.shape[1]

    def total(self, total) -> None:
        """The sums over every rank's shard (``distributed.total``)."""
        self.r0x, self.rr0, self.tt, self.count = (total(v) for v in (self.r0x, self.rr0, self.tt, self.count))

    def finish(self, conv: Problem) -> None:
        """With the block's fit ``conv.w`` solved (its Gram ``conv.xx`` still there): the norm's moments on the
        fitted convolution, at this block's channels."""
        w, xx = conv.w.double(), conv.xx
        delta = w - conv.w0.to(w)
        x_w, x_delta = w @ xx, delta @ xx  # XX symmetric: rows of (XX·w), (XX·δ)
        gamma = self._warm_start()[0].to(w).reshape(w.shape[:2])
        y2, y, n = (w * x_w).sum(-1), x_w[..., -1], xx[:, -1, -1, None].expand(w.shape[:2])
        ry = (w * self.r0x).sum(-1) - gamma * (delta * x_w).sum(-1)
        r = self.r0x[..., -1] - gamma * x_delta[..., -1]
        rr = self.rr0 - 2 * gamma * (delta * self.r0x).sum(-1) + gamma.square() * (delta * x_delta).sum(-1)
        norm = self.norm
        if norm.xx is None:
            channels = norm.w0.shape[0]
            norm.xx = torch.zeros(channels, 2, 2, dtype=torch.float64, device=w.device)
            norm.rx = torch.zeros(channels, 1, 2, dtype=torch.float64, device=w.device)
        rows = slice(None) if self.rows is None else self.rows.to(w.device)
        norm.xx[rows] = torch.stack([y2, y, y, n], dim=-1).reshape(-1, 2, 2)
        norm.rx[rows] = torch.stack([ry, r], dim=-1).reshape(-1, 1, 2)
        norm.tt += self.tt
        norm.rr += float(rr.sum())
        norm.count = self.count

    def _warm_start(self) -> tuple[torch.Tensor, torch.Tensor]:
        """γ0 and β0 at this block's channels."""
        w0 = self.norm.w0 if self.rows is None else self.norm.w0[self.rows]
        return w0[:, 0, 0], w0[:, 0, 1]
