"""Matching: pair A's units with B's units per space, best pairs first."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


@dataclass
class Matching:
    """A full pairing of one space's units, sorted by correlation (best first)."""

    pairs_a: torch.Tensor
    pairs_b: torch.Tensor
    corr: torch.Tensor

    @property
    def n(self) -> int:
        return len(self.pairs_a)


def hungarian(corr: torch.Tensor) -> Matching:
    """The pairing that maximizes total correlation (``linear_sum_assignment``)."""
    cost = np.nan_to_num(corr.double().numpy(), nan=0.0)
    rows, cols = linear_sum_assignment(cost, maximize=True)
    return _sorted(torch.as_tensor(rows), torch.as_tensor(cols), corr)


def identity(corr: torch.Tensor) -> Matching:
    """Unit i with unit i: what plain weight averaging assumes."""
    index = torch.arange(corr.shape[0])
    return _sorted(index, index, corr)


def _sorted(rows: torch.Tensor, cols: torch.Tensor, corr: torch.Tensor) -> Matching:
    values = torch.nan_to_num(corr[rows, cols].double(), nan=0.0)
    order = torch.argsort(values, descending=True, stable=True)
    return Matching(rows[order], cols[order], values[order])


MATCHERS = {"hungarian": hungarian, "identity": identity}


def match_all(scores: dict[int, torch.Tensor], sizes: dict[int, int], matcher: str) -> dict[int, Matching]:
    """A matching for every free space, from its A×B similarity scores."""
    fn = MATCHERS[matcher]
    return {root: fn(scores[root]) for root in sizes}
