"""Matching's statistics: per free space, how A's units correlate with B's (``feature_moments``).

The first of the two statistics passes (``stats``' docstring): features
where layers read them, split into their spaces' units (``observe``), and
summed into cross-moments (``CrossMoments``), n×n per space; and the
weights' similarity that breaks ties between units the data cannot tell
apart (``weight_similarity``).  The pass also records A's and B's layer
outputs for sequential least squares (``stats.record_output``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.fx as fx

from pleascc.passes import distributed
from pleascc.passes.batching import batches, device_of
from pleascc.passes.executor import lockstep
from pleascc.passes.frontier import LayerReads
from pleascc.passes.groups import Analysis
from pleascc.passes.reads import at_positions, at_tokens, check_unpadded, padded
from pleascc.passes.spaces import Atom, Cat, Dim, Prod, SpaceTable
from pleascc.passes.stats import checked, record_input, record_output


JOINT_LIMIT = 4096  # widest product axis whose full correlation is kept for joint matching


def observe(table: SpaceTable, x: torch.Tensor, axes: tuple[int, ...], dims: tuple[Dim, ...]
            ) -> Iterator[tuple[int | tuple, torch.Tensor]]:
    """Yield (space, samples × units) views of ``x`` along ``axes``, one per free atom in ``dims``.

    Other factors of a product axis (kernel or spatial positions) become samples.
    A product of several free atoms (heads × head dim, on one axis or on
    several) is also yielded whole, keyed by the tuple of its factors, so
    matching can pair heads as units.
    """
    x = torch.movedim(x, axes, tuple(range(-len(axes), 0)))
    units = math.prod(x.shape[-len(axes):])
    yield from _observe(table, x.reshape(-1, units), dims[0] if len(dims) == 1 else Prod(tuple(dims)))


def _observe(table: SpaceTable, x: torch.Tensor, dim: Dim):
    dim = table.resolve(dim)
    if isinstance(dim, Atom):
        if dim.id not in table.fixed:
            yield dim.id, x
        return
    if isinstance(dim, Cat):
        for part, piece in zip(dim.parts, torch.split(x, [table.size(p) for p in dim.parts], dim=1)):
            yield from _observe(table, piece, part)
        return
    dim = Prod(tuple(table.resolve(f) for f in dim.factors))  # several axes: factors not yet flattened
    sizes = [table.size(f) for f in dim.factors]
    if all(isinstance(f, Atom) for f in dim.factors) and x.shape[1] <= JOINT_LIMIT and sum(
            f.id not in table.fixed for f in dim.factors) > 1:
        yield tuple(f.id for f in dim.factors), x
    y = x.reshape(x.shape[0], *sizes)
    for k, factor in enumerate(dim.factors):
        yield from _observe(table, torch.movedim(y, k + 1, -1).reshape(-1, sizes[k]), factor)


@dataclass
class CrossMoments:
    """Running sums for the correlation of A's units with B's units at one site.

    Sums are taken around the first batch's means (a shifted algorithm), so
    small variances on top of large means do not cancel away.  ``within``:
    also A×A and B×B (ZipIt! merges units of one model too), as one joint
    correlation of [A's units, B's units, …] of every model given.
    """

    n: int
    within: bool = False
    count: float = 0.0

    def add(self, *features: torch.Tensor) -> None:
        """One batch of each model's units (two, unless ``within``): products in float32 (the bulk of the work,
        on centred values), sums in float64."""
        z = torch.cat(features, dim=1).float()
        if not self.count:
            self.shift = z.mean(0, dtype=torch.float64)
            self.sum = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device)
            self.sq = torch.zeros_like(self.sum)
            side = z.shape[1] if self.within else self.n
            self.cross = torch.zeros(side, side, dtype=torch.float64, device=z.device)
        z = z - self.shift.float()
        self.count += z.shape[0]
        self.sum += z.sum(0, dtype=torch.float64)
        self.sq += (z * z).sum(0, dtype=torch.float64)
        self.cross += (z.T @ z if self.within else z[:, :self.n].T @ z[:, self.n:]).double()

    def reduce(self) -> None:
        """Add every rank's sums (``distributed``), re-centred on rank 0's shift first."""
        if not distributed.active():
            return
        common = distributed.rank_zero_first(self.shift)
        d, n = self.shift - common, self.count
        left, right = (d, d) if self.within else (d[:self.n], d[self.n:])
        sum_left, sum_right = (self.sum, self.sum) if self.within else (self.sum[:self.n], self.sum[self.n:])
        cross = self.cross + torch.outer(left, sum_right) + torch.outer(sum_left, right) + n * torch.outer(left, right)
        sq = self.sq + 2 * d * self.sum + n * d * d
        self.cross, self.sq = distributed.total(cross), distributed.total(sq)
        self.sum, self.count, self.shift = distributed.total(self.sum + n * d), distributed.total(n), common

    def correlation(self) -> torch.Tensor:
        """A×B, or with ``within`` the joint (N·n × N·n) correlation."""
        mean = self.sum / self.count
        std = (self.sq / self.count - mean**2).clamp(min=0).sqrt()
        rows, cols = (slice(None), slice(None)) if self.within else (slice(0, self.n), slice(self.n, None))
        cov = self.cross / self.count - torch.outer(mean[rows], mean[cols])
        live = torch.outer(std[rows] > 0, std[cols] > 0)
        corr = torch.where(live, cov / (torch.outer(std[rows], std[cols]) + 1e-300), cov.new_zeros(()))
        return corr.clamp(-1, 1)


def weight_similarity(analysis: Analysis, states: tuple[dict, dict]) -> dict[int, torch.Tensor]:
    """Per free space, the cosine similarity of A's and B's units' sorted weight rows.

    Matching uses it only to break ties between units the data cannot tell
    apart (dead or constant units), which correlation scores as 0.  Rows are
    sorted because their columns live in other spaces, not yet matched.
    """
    rows: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, binding in analysis.params.items():
        for axis, (dim, role) in enumerate(zip(binding.dims, binding.roles)):
            dim = analysis.table.resolve(dim)
            if role == "out" and isinstance(dim, Atom) and dim.id not in analysis.table.fixed:
                pair = [torch.movedim(s[name], axis, 0).reshape(s[name].shape[axis], -1).sort(dim=1).values.double()
                        for s in states]  # sorted in their own precision: the same order, half the memory
                rows.setdefault(dim.id, []).append(tuple(pair))
    out = {}
    for root, pairs in rows.items():
        a = torch.cat([p[0] for p in pairs], dim=1)
        b = torch.cat([p[1] for p in pairs], dim=1)
        a = a / a.norm(dim=1, keepdim=True).clamp(min=1e-30)
        b = b / b.norm(dim=1, keepdim=True).clamp(min=1e-30)
        out[root] = a @ b.T
    return out


def feature_moments(gms: tuple[fx.GraphModule, ...], analysis: Analysis, data: torch.Tensor,
                    batch_size: int = 64, progress: bool = True, within: bool = False,
                    positions: int | None = None, outputs: LayerReads | None = None) -> dict[int, torch.Tensor]:
    """Per free space, the A×B correlation of its units, averaged over the sites that read it.

    Keys are root ids, and tuples of root ids for whole product axes (see
    ``observe``).  ``within``: spaces keyed by a root get the joint correlation
    of [A's units, B's units, …] of all of ``gms`` instead (else two models).  ``positions``: a channels-first 2-D
    feature map is read at that many positions per sample (``sampled_positions``),
    a value whose batch axis is known at that many tokens (``at_tokens``).
    ``outputs``: also record the outputs of its layers there, for sequential least squares, and their inputs
    where it says (``LayerReads.inputs``), for one-pass least squares.
    """
    sites = _observation_sites(analysis)
    batch_axes = {name: analysis.batch_axis(name) for name, _, _ in sites}  # once, not per batch
    at_node: dict[str, list[int]] = {}
    for site, (name, _, _) in enumerate(sites):
        at_node.setdefault(name, []).append(site)
    layers = {layer.node: layer for layer in analysis.layers if layer.node in outputs.nodes} if outputs else {}
    reads = {name: (name,) for name in at_node}
    reads.update({name: (layer.source, name) if outputs.inputs else (name,) for name, layer in layers.items()})
    moments: dict[tuple, CrossMoments] = {}
    with torch.no_grad():
        for batch, x in enumerate(batches(data, batch_size, "matching statistics", progress, device_of(gms[0]))):
            for name, values in lockstep(gms, x, reads):
                for site in at_node.get(name, ()):
                    _add_site(analysis, moments, site, sites[site], batch_axes[name], values[name], within,
                              positions)
                if name in layers:
                    record_output(outputs, layers[name], batch, values[name], positions)
                    if outputs.inputs:
                        layer = layers[name]
                        record_input(outputs, layer, batch, values[layer.source], values[name][0], positions)
    by_root: dict[int | tuple, list[torch.Tensor]] = {}
    for m in moments.values():  # the same keys in the same order on every rank
        m.reduce()
    for (_, _, root), m in moments.items():
        by_root.setdefault(root, []).append(m.correlation().cpu())  # matching runs on the CPU
    return {root: torch.stack(corrs).mean(0) for root, corrs in by_root.items()}


def _add_site(analysis: Analysis, moments: dict[tuple, CrossMoments], site: int, where: tuple,
              batch_axis: int | None, values: list[torch.Tensor], within: bool, positions: int | None) -> None:
    """One batch's features of every model at one observation site, added to its spaces' moments."""
    name, axes, dims = where
    observed = [_observed_positions(v, name, axes, batch_axis, positions) for v in values]
    checked([value for value, _ in observed], name)
    spaces = zip(*(observe(analysis.table, v, read_axes, dims) for v, read_axes in observed))
    for k, per_model in enumerate(spaces):
        root, features = per_model[0][0], [f for _, f in per_model]
        joint = within and isinstance(root, int)
        if len(features) > 2 and not joint:
            continue  # more than two models: only joint correlations (product axes are matched pair by pair)
        key = (site, k, root)
        if key not in moments:
            moments[key] = CrossMoments(features[0].shape[1], within=joint)
        moments[key].add(*features)


def _observed_positions(value: torch.Tensor, name: str, axes: tuple[int, ...], batch_axis: int | None,
                        positions: int | None) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A value (of node ``name``) and its unit axes as observed: an (N, C, H, W) map along C at
    ``sampled_positions``; a value whose samples are on ``batch_axis`` at sampled tokens, less padded ones
    (``at_tokens``); others whole."""
    if value.dim() == 4 and tuple(axes) == (1,) and not padded():
        return at_positions(value, positions), axes
    if batch_axis is None:
        check_unpadded(f"{name} (its batch axis is unknown)")
        return value, axes
    if positions is None and not padded():
        return value, axes
    tokens = at_tokens(value, batch_axis, axes, positions)
    return tokens, tuple(range(2, tokens.dim()))


def _observation_sites(analysis: Analysis) -> list[tuple[str, tuple[int, ...], tuple[Dim, ...]]]:
    """Where features are compared: what layers read, and what the analysis adds (attention's q and k)."""
    sites = dict.fromkeys((layer.source, (layer.in_axis,), (layer.in_dim,)) for layer in analysis.layers)
    sites.update(dict.fromkeys(analysis.sites))
    return list(sites)
