"""Matching of N aligned models: unit k of every model is one tuple, merged whole or kept apart whole.

Once every model past the first is permuted into model A's layout (the
driver's ``align``), unit k of each is A's unit k's partner.  A tuple is as
coherent as its members agree with A's unit (the mean of the pairs'
correlations), which is all the pairwise matching passes measured.  Above
budget 1.0 the least coherent tuples are kept apart, one unit per model
(each adds N − 1 units: ``Matching.split_width``); below it the tuples merge into
clusters, the most similar first, every model feeding every merged unit.
For two models this is a pair's matching, with A's unit order kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pleascc.passes.match import Matching
from pleascc.passes.merge_maps import selections_from_tuples


@dataclass
class Tuples(Matching):
    """One space's tuples of aligned units (``pairs_a`` = ``pairs_b``: most coherent first)."""

    def selections(self, width: int) -> tuple[torch.Tensor, ...]:
        """Every model's selection at ``width``: from n up, the most coherent tuples merged and the rest apart,
        one block per model ([merged | A's | B's | …], each in A's unit order); below n, clusters of tuples."""
        if width < self.n:
            merged, _ = super().selections(width)  # aligned: one selection serves every model
            return tuple(merged.clone() for _ in range(self.models))
        count = (self.models * self.n - width) // (self.models - 1)  # tuples merged (checked by the builder)
        order = torch.cat([self.pairs_a[:count].sort().values, self.pairs_a[count:].sort().values])
        return selections_from_tuples(self.n, [order] * self.models, width)


def tuples(pairs: list[Matching], perms: list[torch.Tensor]) -> Tuples:
    """The tuples of one space from each other model's matching to A (``pairs[k]``) and the permutation that
    aligned it (``perms[k]``: its unit for each of A's).

    A tuple's coherence is the mean of its pairs' correlations; two tuples are
    as similar as the mean of their aligned A×B correlations (what merging
    them below n reads: ``Matching.pair_merges``), known where every matching
    kept its correlations.
    """
    n = pairs[0].n
    coherence = torch.zeros(n, dtype=torch.float64)
    for m in pairs:
        coherence[m.pairs_a] += m.corr.double() / len(pairs)
    order = torch.argsort(coherence, descending=True, stable=True)
    cross = None
    if all(m.cross is not None for m in pairs):
        cross = sum(m.cross.double()[:, perm] for m, perm in zip(pairs, perms)) / len(pairs)
    return Tuples(order, order, coherence[order], cross=cross, models=len(pairs) + 1)
