"""Matching: pair A's units with B's units per space, best pairs first; below one model's width, merge the pairs
themselves into clusters, most similar first."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from pleascc.passes.merge_maps import selections_from_clusters, selections_from_tuples


@dataclass
class Matching:
    """A full pairing of one space's units, sorted by correlation (best first).

    Every matching's ``corr`` lists, best first, the merges the width search
    may undo above width n, each one unit wider: here a pair kept apart.
    """

    pairs_a: torch.Tensor
    pairs_b: torch.Tensor
    corr: torch.Tensor
    within: torch.Tensor | None = None  # per-head spaces: row i = B's unit for each of A's, inside A's head i's pair
    cross: torch.Tensor | None = None  # A×B similarity of the units (n×n): what merges pairs below width n
    models: int = 2  # models whose units it pairs
    _clustering: tuple | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return len(self.pairs_a)

    @property
    def narrows(self) -> bool:
        """Whether ``selections`` goes below width n (``pair_merges``): with ``cross``, outside heads."""
        return self.cross is not None and self.within is None

    @property
    def narrowest(self) -> int:
        """The least width ``selections`` gives: a share ``MIN_SHARE`` of n where it ``narrows``, else n."""
        return max(1, math.ceil(self.n * MIN_SHARE)) if self.narrows else self.n

    def fed_by(self, width: int) -> dict[int, int]:
        """How many merged units each set of models feeds at ``width`` (a set is a bit mask: model k is bit k),
        what a layer's cost is counted from (``budget.cost_of``).  Here every unit is fed by every model or by
        one: pairs merged or kept apart (ZipIt!'s count, as if it zipped across models only)."""
        everyone = (1 << self.models) - 1
        if width <= self.n:
            return {everyone: width}
        merged = (self.models * self.n - width) // (self.models - 1)
        return {everyone: merged, **{1 << model: self.n - merged for model in range(self.models)}}

    def selections(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_A, P_B) at ``width``: the best pairs merged, the rest kept apart; below n, every pair merged and
        the pairs merged into ``width`` clusters (``pair_merges``)."""
        if width >= self.n:
            return selections_from_tuples(self.n, (self.pairs_a, self.pairs_b), width)
        merges, _ = self.pair_merges()
        clusters = replay(self.n, merges[: self.n - width])
        p_a = torch.zeros(width, self.n, dtype=torch.float64)
        p_b = torch.zeros(width, self.n, dtype=torch.float64)
        for row, cluster in enumerate(clusters):
            p_a[row, self.pairs_a[cluster]] = 1
            p_b[row, self.pairs_b[cluster]] = 1
        return p_a, p_b

    def pair_merges(self) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """The merges of pairs into clusters down to ``narrowest``, most similar first, and each one's similarity.

        Pairs p and q are as similar as their units across the models:
        (corr(A_p, B_q) + corr(A_q, B_p)) / 2, known from the A×B correlation
        (for a model merged with itself, its own units' correlation).
        """
        if self._clustering is None:
            corr = torch.nan_to_num(self.cross.double(), nan=0.0)[self.pairs_a][:, self.pairs_b]
            self._clustering = agglomerate((corr + corr.T) / 2, self.narrowest)
        return self._clustering


@dataclass
class Zipping(Matching):
    """ZipIt!'s merges of one space: clusters of units from either model, redone at each width."""

    joint: torch.Tensor | None = None
    alpha: float = 0.3
    beta: float = 0.125
    zipped: list[list[int]] | None = field(default=None, repr=False)  # the clusters of zipping to width n

    @property
    def narrows(self) -> bool:
        return True

    def selections(self, width: int) -> tuple[torch.Tensor, ...]:
        """Zipped to ``width`` (from n up); below n, zipped to n and those clusters merged further
        (``pair_merges``)."""
        if width > self.n:
            clusters, _ = zip_units(self.joint, width, self.alpha, self.beta, self.models)
        else:
            merges, _ = self.pair_merges() if width < self.n else ([], None)
            zipped = self._zipped_to_n()
            clusters = [[u for k in group for u in zipped[k]] for group in replay(self.n, merges[:self.n - width])]
        return selections_from_clusters(self.n, clusters, self.models)

    def _zipped_to_n(self) -> list[list[int]]:
        if self.zipped is None:
            self.zipped = zip_units(self.joint, self.n, self.alpha, self.beta, self.models)[0]
        return self.zipped

    def pair_merges(self) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """Below n: the n clusters of zipping to n merged further, the most similar first; two clusters are as
        similar as their least similar units (ZipIt!'s joint correlation)."""
        if self._clustering is None:
            zipped = self._zipped_to_n()
            joint = torch.nan_to_num(self.joint.double(), nan=0.0)
            members = torch.full((self.n, max(map(len, zipped))), -1)
            for k, cluster in enumerate(zipped):
                members[k, :len(cluster)] = torch.tensor(cluster)
            least = torch.full((self.n, self.n), torch.inf, dtype=torch.float64)
            for a in members.T:  # one member slot of each cluster against one of every other: n×n at a time
                for b in members.T:
                    pair = joint[a.clamp(min=0)][:, b.clamp(min=0)]
                    least = torch.minimum(least, pair.masked_fill((a < 0)[:, None] | (b < 0)[None], torch.inf))
            self._clustering = agglomerate(least, self.narrowest)
        return self._clustering


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
    return Matching(rows[order], cols[order], values[order], cross=corr)


MIN_SHARE = 1 / 8  # the narrowest a space is merged to below one model's width, as a share of its units


def agglomerate(similarity: torch.Tensor, width: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Merge n items into ``width`` clusters, the two most similar clusters at a time; a cluster is as similar to
    another as its least similar member (complete linkage), so clusters stay tight.  Returns the merges (a
    cluster is named by its first item) and their similarities, in order."""
    sims = similarity.clone()
    sims.fill_diagonal_(-torch.inf)
    merges, values = [], []
    for _ in range(similarity.shape[0] - width):
        i, j = sorted(divmod(int(torch.argmax(sims)), sims.shape[0]))
        merges.append((i, j))
        values.append(float(sims[i, j]))
        merged = torch.minimum(sims[i], sims[j])
        sims[i], sims[:, i] = merged, merged
        sims[j], sims[:, j] = -torch.inf, -torch.inf
        sims[i, i] = -torch.inf
    return merges, torch.tensor(values, dtype=torch.float64)


def replay(n: int, merges: list[tuple[int, int]]) -> list[list[int]]:
    """The clusters of n items after ``merges`` (``agglomerate``'s), ordered by their first item."""
    clusters: list[list[int] | None] = [[i] for i in range(n)]
    for i, j in merges:
        clusters[i] = clusters[i] + clusters[j]
        clusters[j] = None
    return [c for c in clusters if c is not None]


MATCHERS = {"hungarian": hungarian, "identity": identity}


def zip_units(joint: torch.Tensor, width: int, alpha: float = 0.3, beta: float = 0.125, models: int = 2
              ) -> tuple[list[list[int]], list[float]]:
    """ZipIt!'s greedy merging of the models' N·n units into ``width`` clusters (Stoica et al., 2024).

    ``joint``: the N·n×N·n correlation of [A's units, B's units, …].  The most
    correlated pair of clusters merges, within a model or across; a new
    cluster's similarity to the others is the least of its parts', times
    ``alpha`` (≤ 0: a pair is final), so clusters do not snowball.  Merges
    inside one model are capped at ``beta`` × the merges ÷ N, per model (a
    cluster counts as the model of its first unit); past the cap, that model's
    clusters merge only across; where the cap leaves no merge at all (more
    than two models, whose clusters count as one model each), it is lifted.
    Returns the clusters (unit indices, model k's offset by k·n) and each
    merge's similarity, in order.
    """
    size = joint.shape[0]
    n = size // models
    if not n <= width <= size:
        raise ValueError(f"width {width} outside [{n}, {size}]")
    sims = torch.nan_to_num(joint.double(), nan=0.0).clone()
    sims.fill_diagonal_(-torch.inf)
    clusters: list[list[int] | None] = [[i] for i in range(size)]
    model = torch.arange(size) // n
    merges = size - width
    uncapped = sims.clone()  # the same similarities, no merge closed: where the cap leaves none
    left = [int(merges // models * beta)] * models  # same-model merges each model may still make
    for m in range(models):
        if left[m] <= 0:
            _close_model(sims, model, m, clusters)
    values = []
    for _ in range(merges):
        i, j = sorted(divmod(int(torch.argmax(sims)), size))
        if sims[i, j] == -torch.inf:
            i, j = sorted(divmod(int(torch.argmax(uncapped)), size))
        values.append(float(uncapped[i, j]))
        same = bool(model[i] == model[j])
        clusters[i] = clusters[i] + clusters[j]
        clusters[j] = None
        for s in (sims, uncapped):
            merged = torch.minimum(s[i], s[j]) * alpha if alpha > 0 else torch.full_like(s[i], -torch.inf)
            s[i], s[:, i] = merged, merged
            s[j], s[:, j] = -torch.inf, -torch.inf
            s[i, i] = -torch.inf
        if same:
            m = int(model[i])
            left[m] -= 1
            if left[m] <= 0:
                _close_model(sims, model, m, clusters)
    return [c for c in clusters if c is not None], values


def _close_model(sims: torch.Tensor, model: torch.Tensor, m: int, clusters: list) -> None:
    """No more merges between two clusters of model ``m``."""
    mine = (model == m) & torch.tensor([c is not None for c in clusters])
    sims[mine[:, None] & mine[None, :]] = -torch.inf


def zipit(joint: torch.Tensor, alpha: float = 0.3, beta: float = 0.125, models: int = 2) -> Zipping:
    """One space's ZipIt! matching of ``models`` models; ``corr`` holds the merge similarities of zipping all the
    way, best first ((N − 1)·n of them: the un-merges the width search may undo, a unit each).

    The budget pass reads ``corr`` to choose widths; ``selections`` then zips
    to the chosen width (the same-model cap depends on it).
    """
    n = joint.shape[0] // models
    clusters, values = zip_units(joint, n, alpha, beta, models)
    index = torch.arange(n)
    return Zipping(index, index, torch.tensor(values, dtype=torch.float64).sort(descending=True).values,
                   models=models, joint=joint, alpha=alpha, beta=beta, zipped=clusters)


def match_all(scores: dict[int, torch.Tensor], sizes: dict[int, int], matcher: str) -> dict[int, Matching]:
    """A matching for every free space, from its A×B similarity scores."""
    fn = MATCHERS[matcher]
    return {root: fn(scores[root]) for root in sizes}


def match_heads(blocks: list[torch.Tensor], heads: int) -> tuple[Matching, list[Matching]]:
    """Heads as units, then the dims within every matched pair of heads, each pair its own.

    ``blocks``: for each head dim of these heads (q·k's, v's), the A×B
    correlation of the (heads × head dim) axis.  A pair of heads scores the best
    pairing of its dims (a Hungarian per head pair, summed over the head dims);
    since dims pair independently inside each pair of heads, the Hungarian over
    heads on those scores maximizes the whole axis' correlation.
    """
    scores, best = np.zeros((heads, heads)), []
    for corr in blocks:
        dim = corr.shape[0] // heads
        c = torch.nan_to_num(corr.double(), nan=0.0).reshape(heads, dim, heads, dim).permute(0, 2, 1, 3).numpy()
        cols = np.empty((heads, heads, dim), dtype=np.int64)
        for i in range(heads):
            for j in range(heads):
                cols[i, j] = linear_sum_assignment(c[i, j], maximize=True)[1]
                scores[i, j] += c[i, j][np.arange(dim), cols[i, j]].sum()
        best.append((c, cols))
    rows, partner = linear_sum_assignment(scores, maximize=True)
    total = sum(corr.shape[0] // heads for corr in blocks)
    outer = _sorted(torch.as_tensor(rows), torch.as_tensor(partner), torch.as_tensor(scores / total))
    inner = []
    for c, cols in best:
        within = torch.as_tensor(cols[rows, partner])  # A's head i (rows are 0..heads-1) with its partner
        paired = torch.as_tensor(np.stack([c[i, partner[i]][np.arange(c.shape[2]), cols[i, partner[i]]]
                                           for i in rows])).mean(0)
        dims = torch.arange(c.shape[2])
        inner.append(Matching(dims, dims, paired, within))
    return outer, inner


def match_product(corr: torch.Tensor, sizes: list[int], free: list[bool], rounds: int = 3,
                  known: dict[int, torch.Tensor] | None = None) -> list[Matching]:
    """Jointly match the factors of a product axis (heads × head dim): one permutation per factor.

    ``corr`` is the A×B correlation of the whole axis.  Matching each factor
    on its own would pool heads over unaligned head dims; instead the outer
    factor's units are scored by how well their inner blocks can be paired
    (a Hungarian per pair of heads), then each factor is re-matched in turn with
    the others held (coordinate ascent on the total correlation).  ``known``:
    factors already matched elsewhere (B's unit for each of A's), held fixed.
    """
    k = len(sizes)
    known = known or {}
    c = torch.nan_to_num(corr.double(), nan=0.0).reshape(*sizes, *sizes)
    perms = [known.get(f, torch.arange(n)) for f, n in enumerate(sizes)]
    free = [is_free and f not in known for f, is_free in enumerate(free)]
    if free[0] and k > 1:
        outer, rest = sizes[0], corr.shape[0] // sizes[0]
        blocks = c.reshape(outer, rest, outer, rest).permute(0, 2, 1, 3).numpy()
        scores = np.array([[blocks[i, j][linear_sum_assignment(blocks[i, j], maximize=True)].sum()
                            for j in range(outer)] for i in range(outer)])
        perms[0] = torch.as_tensor(linear_sum_assignment(scores, maximize=True)[1])
    order = [f for f in (*range(1, k), 0) if free[f]]  # inner factors first: the outer one is initialised
    for _ in range(rounds):
        for f in order:
            perms[f] = torch.as_tensor(linear_sum_assignment(_factor_scores(c, perms, f).numpy(), maximize=True)[1])
    out = []
    for f in range(k):
        scores = _factor_scores(c, perms, f) / (corr.shape[0] // sizes[f])
        out.append(_sorted(torch.arange(sizes[f]), perms[f], scores))
    return out


def _factor_scores(c: torch.Tensor, perms: list[torch.Tensor], f: int) -> torch.Tensor:
    """Total correlation of A's unit i with B's unit j of factor f, the other factors paired by ``perms``."""
    k = len(perms)
    for g in range(k):
        if g != f:
            c = c.index_select(k + g, perms[g])
    letters = "abcdefghijklmnop"[:k]
    left = "".join("i" if g == f else letters[g] for g in range(k))
    right = "".join("j" if g == f else letters[g] for g in range(k))
    return torch.einsum(f"{left}{right}->ij", c)
