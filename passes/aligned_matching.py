"""Matching of N aligned models: unit k of every model is one tuple, merged whole, kept apart member by member,
or merged with other tuples.

Once every model past the first is permuted into model A's layout (the
driver's ``align``), unit k of each is A's unit k's partner, as correlated
with it as their pair's matching measured.  Above budget 1.0 the members
least correlated with their A unit, of any tuple, are kept apart first, one
unit wider each: a tuple becomes a cluster of A's unit and the members left,
beside its members kept apart (clusters of 1 to N units).  Below it the
tuples merge into clusters, the most similar first, every model feeding every
merged unit.  For two models this is a pair's matching, with A's unit order kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pleascc.passes.match import Matching


@dataclass
class Tuples(Matching):
    """One space's tuples of aligned units.

    ``pairs_a`` = ``pairs_b``: A's units, the most coherent tuple first (the
    mean of its members' correlations: what merging tuples below n orders by).
    ``corr``: each member past A's, its correlation with A's unit, best first;
    ``members`` says which it is (A's unit, model), and the width search keeps
    them apart from the last.
    """

    members: torch.Tensor | None = None  # (N − 1)·n × 2, in the order of ``corr``
    _fed: dict = field(default_factory=dict, repr=False)  # width -> ``fed_by``'s count

    def apart(self, width: int) -> torch.Tensor:
        """models × n: whether model k's unit is kept apart from its tuple at ``width`` ≥ n (A's never are)."""
        out = torch.zeros(self.models, self.n, dtype=torch.bool)
        split = self.members[len(self.members) - (width - self.n):]
        out[split[:, 1], split[:, 0]] = True
        return out

    def fed_by(self, width: int) -> dict[int, int]:
        """Each tuple's cluster is fed by A and its members left; a member kept apart by its model alone."""
        if width <= self.n:
            return super().fed_by(width)
        if width not in self._fed:
            apart = self.apart(width)
            bits = (1 << torch.arange(self.models))[:, None].expand_as(apart)
            patterns = torch.cat([(bits * ~apart).sum(0), bits[apart]])  # each tuple's cluster, each member apart
            counts = torch.bincount(patterns, minlength=1 << self.models).tolist()
            self._fed[width] = {pattern: count for pattern, count in enumerate(counts) if count}
        return self._fed[width]

    def selections(self, width: int) -> tuple[torch.Tensor, ...]:
        """Every model's selection at ``width``: from n up, [each tuple's cluster, in A's unit order | model 1's
        members kept apart | model 2's | …]; below n, clusters of tuples (aligned: one selection serves every
        model)."""
        if width < self.n:
            merged, _ = super().selections(width)
            return tuple(merged.clone() for _ in range(self.models))
        apart, units, start = self.apart(width), torch.arange(self.n), self.n
        out = []
        for model in range(self.models):
            selection = torch.zeros(width, self.n, dtype=torch.float64)
            stays, leaves = units[~apart[model]], units[apart[model]]
            selection[stays, stays] = 1
            selection[start + torch.arange(len(leaves)), leaves] = 1
            start += len(leaves)
            out.append(selection)
        return tuple(out)


def tuples(pairs: list[Matching], perms: list[torch.Tensor]) -> Tuples:
    """The tuples of one space from each other model's matching to A (``pairs[k]``) and the permutation that
    aligned it (``perms[k]``: its unit for each of A's).

    Two tuples are as similar as the mean of their aligned A×B correlations
    (what merging them below n reads: ``Matching.pair_merges``), known where
    every matching kept its correlations.
    """
    correlations = torch.zeros(len(pairs), pairs[0].n, dtype=torch.float64)
    for k, m in enumerate(pairs):
        correlations[k, m.pairs_a] = m.corr.double()
    cross = None
    if all(m.cross is not None for m in pairs):
        cross = sum(m.cross.double()[:, perm] for m, perm in zip(pairs, perms)) / len(pairs)
    return tuples_of(correlations, cross)


def tuples_of(correlations: torch.Tensor, cross: torch.Tensor | None = None) -> Tuples:
    """Tuples from each member's correlation with A's unit (``correlations[k, u]``: model k + 1's member of A's
    unit u's tuple); equal correlations keep whole tuples together, the last tuple kept apart first."""
    others, n = correlations.shape
    coherence = torch.zeros(n, dtype=torch.float64)
    for row in correlations:
        coherence += row / others
    order = torch.argsort(coherence, descending=True, stable=True)
    members = torch.stack([order.repeat_interleave(others), torch.arange(1, others + 1).repeat(n)], 1)
    values = correlations[:, order].T.flatten()
    best = torch.argsort(values, descending=True, stable=True)
    return Tuples(order, order, values[best], cross=cross, models=others + 1, members=members[best])
