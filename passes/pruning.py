"""L1-norm channel pruning (Li et al., "Pruning Filters for Efficient ConvNets", 2017): the baseline that
compression by merging is measured against.

A unit's importance is the L1 norm of the weights that compute it, summed
over every layer that writes its group (a residual stream has several).
Below one model's width a group keeps its most important units and drops
the rest, with no refit; the width search sees the dropped units' share of
the group's total norm as what each step loses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pleascc.passes.groups import Analysis
from pleascc.passes.match import Matching
from pleascc.passes.matching_stats import observe

State = dict[str, torch.Tensor]


@dataclass
class Pruning(Matching):
    """One group's units by importance (each unit paired with itself, most important first)."""

    @property
    def narrows(self) -> bool:
        return True

    def selections(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Below n, one row per kept unit, the dropped units in no row; from n up, as any matching."""
        if width >= self.n:
            return super().selections(width)
        keep = torch.zeros(width, self.n, dtype=torch.float64)
        keep[torch.arange(width), self.pairs_a[:width].sort().values] = 1
        return keep, keep.clone()

    def pair_merges(self) -> tuple[list, torch.Tensor]:
        """What each narrowing step keeps, least important unit first: 1 − its share of the group's norm."""
        share = self.corr.flip(0) / self.corr.sum().clamp(min=1e-30)
        return [], 1 - share[: self.n - self.narrowest]


def l1_pruning(analysis: Analysis, state: State) -> dict[int, Pruning]:
    """Every free group's units ranked by the L1 norm of the dense layers' weights that write them."""
    norms: dict[int, torch.Tensor] = {}
    for layer in (layer for layer in analysis.layers if layer.blocked):
        weight = state[layer.weight].detach().double().abs()
        out = analysis.params[layer.weight].dims[0]
        for root, view in observe(analysis.table, weight, (0,), (out,)):
            if isinstance(root, int):
                norms[root] = norms.get(root, 0) + view.sum(0)
    out = {}
    for root in analysis.free_roots():
        norm = norms.get(root, torch.ones(analysis.root_size(root), dtype=torch.float64))
        order = torch.argsort(norm, descending=True, stable=True)
        out[root] = Pruning(order, order, norm[order])
    return out
