"""Widths per space from a compute budget, counted on the layers the emitter will produce.

A merged space of n units at width w ≥ n has k = 2n − w merged units,
n − k A-only and n − k B-only; below n (a budget under 1.0) all w are
merged, each a cluster of pairs.  In general each merged unit is fed by a
set of the models (``Matching.fed_by``: all of them or one for pairs; for N
aligned models any set holding A, as a tuple loses members one at a time).
The emitter computes a layer's rows fed by a set S from the inputs some
model of S feeds only (``row_blocks``: A-only outputs never read B-only
inputs), so a dense layer costs

    Σ_S rows(S) · inputs meeting S   multiply-accumulates × kernel size,

rows fed by every model reading every input.  For two models that is
2·a_out·a_in − k_out·k_in with a = min(w, n): n_out·n_in fully merged, twice
that fully apart (the two models side by side) and w_out·w_in below.
Separate heads each read their own model's a_in units.
Depthwise and grouped convolutions and norms cost their emitted size, and
products of two activations (attention's q·kᵀ and ·v) theirs: whole heads.

Widths, three ways (``WIDTHS``): "greedy" starts fully merged and un-merges,
a step at a time, where it gives the most lost correlation back per FLOP
added, while within budget; "uniform" un-merges the same share of every
space; "stages" keeps the deepest spaces apart first (merge early layers,
keep late ones separate: the PLeaS code's schedule).  Below 1.0, "greedy"
merges clusters of pairs where that loses the least similarity per FLOP
saved, and the others narrow every space by the same share.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass

from pleascc.passes.errors import PleasccError
from pleascc.passes.groups import Analysis, Layer
from pleascc.passes.match import MIN_SHARE, Matching
from pleascc.passes.spaces import Atom, Cat, Dim, children


@dataclass
class Cost:
    """One layer's cost as a function of widths."""

    kind: str  # "blocked" (dense layer, cross blocks skipped), "heads" (separate heads), "plain"
    dims: list  # blocked/heads: [out, in, *kernel]; plain: every dim the cost is a product of
    positions: float
    models: int = 2


def positions(analysis: Analysis, layer: Layer) -> int:
    """Where a layer is applied per sample: its output's size without batch and feature axes."""
    shape = analysis.shapes[layer.node]
    return math.prod(s for k, s in enumerate(shape) if k not in (0, layer.out_axis % len(shape)))


def layer_costs(analysis: Analysis, separate_heads: set[str], models: int = 2) -> list[Cost]:
    costs = []
    for layer in analysis.layers:
        where = positions(analysis, layer)
        dims = analysis.params[layer.weight].dims
        if layer.node in separate_heads:
            costs.append(Cost("heads", dims, where, models))
        elif layer.blocked:
            costs.append(Cost("blocked", dims, where, models))
        else:
            costs.append(Cost("plain", dims, where, models))  # grouped convolutions, norms (one axis): as emitted
    per_sample = 1 / analysis.example_batch
    costs += [Cost("plain", dims, per_sample, models) for dims in analysis.products]  # attention: scores, ·v
    return costs


def cost_of(analysis: Analysis, c: Cost, widths: dict[int, int], matchings: dict[int, Matching]) -> int:
    table = analysis.table
    if c.kind == "plain":
        return c.positions * math.prod(table.size(d, widths) for d in c.dims)
    out, inp, *kernel = c.dims
    per_unit = c.positions * math.prod(table.size(d) for d in kernel)
    rows, cols = (fed_by(analysis, d, widths, matchings, c.models) for d in (out, inp))
    if c.kind == "heads":  # each model's head reads the units it feeds
        return per_unit * c.models * _fed_by_one(rows) * _fed_by_one(cols)
    everyone = (1 << c.models) - 1
    return per_unit * sum(count * sum(k for fed, k in cols.items() if pattern in (0, everyone) or fed & pattern)
                          for pattern, count in rows.items())


def fed_by(analysis: Analysis, dim: Dim, widths: dict[int, int], matchings: dict[int, Matching],
           models: int) -> dict[int, int]:
    """How many of ``dim``'s merged units each set of models feeds (bit k: model k), as ``row_blocks`` sees them:
    a fixed space's units by all, a product's by the models feeding each factor of it."""
    table = analysis.table
    dim = table.resolve(dim)
    if isinstance(dim, Atom):
        if dim.id in widths:
            return matchings[dim.id].fed_by(widths[dim.id])
        return {(1 << models) - 1: table.size(dim)}
    parts = [Counter(fed_by(analysis, part, widths, matchings, models)) for part in children(dim)]
    if isinstance(dim, Cat):
        return sum(parts, Counter())
    out = parts[0]
    for part in parts[1:]:
        product: Counter[int] = Counter()
        for (fed, count), (other, times) in itertools.product(out.items(), part.items()):
            product[fed & other] += count * times
        out = product
    return out


def _fed_by_one(fed: dict[int, int]) -> int:
    """The units model A feeds (every model feeds as many)."""
    return sum(count for pattern, count in fed.items() if pattern & 1)


def flops(analysis: Analysis, costs: list[Cost], widths: dict[int, int], matchings: dict[int, Matching]) -> int:
    """The merged model's cost with each space of ``matchings`` at its width (the others as one model's)."""
    return sum(cost_of(analysis, c, widths, matchings) for c in costs)


def base_flops(analysis: Analysis, costs: list[Cost]) -> int:
    """One input model's FLOPs (one head)."""
    single = [Cost("blocked" if c.kind == "heads" else c.kind, c.dims, c.positions, c.models) for c in costs]
    return flops(analysis, single, {}, {})


def choose_widths(analysis: Analysis, matchings: dict[int, Matching], costs: list[Cost],
                  budget: float) -> dict[int, int]:
    """Widths meeting ``flops(merged) <= budget × flops(one model)``: un-merging pairs above 1.0, merging
    clusters of pairs below it (``_narrow``)."""
    table = analysis.table
    limit = budget * base_flops(analysis, costs)
    widths = {root: m.n for root, m in matchings.items()}
    touching = _touching(analysis, matchings, costs)
    current = flops(analysis, costs, widths, matchings)
    if budget < 1.0 and current > limit * (1 + 1e-12):  # from 1.0 up, never below full merging (two heads)
        return _narrow(analysis, matchings, costs, touching, widths, budget)
    steps = {root: max(1, m.n // 32) for root, m in matchings.items()}
    while True:
        best, best_score, best_delta, best_step = None, -1.0, 0, 0
        for root, m in matchings.items():
            left = len(m.corr) - (widths[root] - m.n)  # merges not undone: one unit each, worst last
            step = 0 if root in table.keep_width else min(steps[root], left)
            if step <= 0:
                continue
            trial = {**widths, root: widths[root] + step}
            delta = _added(analysis, touching[root], trial, widths, matchings)
            if current + delta > limit * (1 + 1e-12):
                continue
            gain = float((1 - m.corr[left - step:left]).sum())
            score = gain / max(delta, 1)
            if score > best_score:
                best, best_score, best_delta, best_step = root, score, delta, step
        if best is None:
            return widths
        widths[best] += best_step
        current += best_delta


def _added(analysis: Analysis, costs: list[Cost], trial: dict[int, int], widths: dict[int, int],
           matchings: dict[int, Matching]) -> float:
    """What ``costs`` come to at ``trial``'s widths more than at ``widths``'."""
    return sum(cost_of(analysis, c, trial, matchings) - cost_of(analysis, c, widths, matchings) for c in costs)


def _touching(analysis: Analysis, matchings: dict[int, Matching], costs: list[Cost]) -> dict[int, list[Cost]]:
    """The costs each space's width changes."""
    touching: dict[int, list[Cost]] = {root: [] for root in matchings}
    for c in costs:
        for root in {a.id for d in c.dims for a in analysis.table.atoms(d)} & touching.keys():
            touching[root].append(c)
    return touching


def _narrowable(analysis: Analysis, matchings: dict[int, Matching]) -> dict[int, Matching]:
    """The groups whose pairs may merge into clusters: not fixed in width, and not attention's heads or head dims
    (the spaces of its activation products), whose units a merged head could not stand for."""
    attention = {atom.id for dims in analysis.products for dim in dims for atom in analysis.table.atoms(dim)}
    attention |= set(analysis.per_head) | set(analysis.per_head.values())
    return {root: m for root, m in matchings.items()
            if m.narrowest < m.n and root not in analysis.table.keep_width | attention}


def _narrow(analysis: Analysis, matchings: dict[int, Matching], costs: list[Cost], touching: dict[int, list[Cost]],
            widths: dict[int, int], budget: float) -> dict[int, int]:
    """Below one model's FLOPs: merge clusters of pairs, a step at a time where it loses the least similarity
    per FLOP saved, until within budget."""
    limit = budget * base_flops(analysis, costs) * (1 + 1e-12)
    current = flops(analysis, costs, widths, matchings)
    narrowable = _narrowable(analysis, matchings)
    while current > limit:
        best, best_score, best_step, best_delta = None, math.inf, 0, 0
        for root, m in narrowable.items():
            done = m.n - widths[root]  # merges of pairs made so far
            step = min(max(1, m.n // 32), widths[root] - m.narrowest)
            if step <= 0:
                continue
            trial = {**widths, root: widths[root] - step}
            saved = -_added(analysis, touching[root], trial, widths, matchings)
            loss = float((1 - m.pair_merges()[1][done:done + step]).sum())
            if saved > 0 and loss / saved < best_score:
                best, best_score, best_step, best_delta = root, loss / saved, step, saved
        if best is None:
            _unreachable(analysis, costs, widths, matchings, budget)
        widths[best] -= best_step
        current -= best_delta
    return widths


def _unreachable(analysis: Analysis, costs: list[Cost], widths: dict[int, int], matchings: dict[int, Matching],
                 budget: float):
    least = relative_flops(analysis, costs, widths, matchings)
    raise PleasccError(f"budget {budget:g} is below the {least:.2f} of one model's FLOPs that merging units "
                       f"reaches here (each group down to {MIN_SHARE:.3g} of its units; heads and fixed spaces "
                       f"keep theirs): pass --budget {math.ceil(least * 100) / 100:g} or more")


def relative_flops(analysis: Analysis, costs: list[Cost], widths: dict[int, int],
                   matchings: dict[int, Matching]) -> float:
    return flops(analysis, costs, widths, matchings) / base_flops(analysis, costs)


def uniform_widths(analysis: Analysis, matchings: dict[int, Matching], costs: list[Cost],
                   budget: float) -> dict[int, int]:
    """The largest share r of every space's merges undone (width n + ⌊r·len(corr)⌋) within budget;
    below one model's FLOPs, the least share of every space's pairs merged into clusters (``_narrow_uniformly``)."""
    def at(share: float) -> dict[int, int]:
        return {root: m.n + (0 if root in analysis.table.keep_width else int(share * len(m.corr)))
                for root, m in matchings.items()}

    limit, low, high = budget * base_flops(analysis, costs), 0.0, 1.0
    if budget < 1.0 and flops(analysis, costs, at(0.0), matchings) > limit * (1 + 1e-12):
        return _narrow_uniformly(analysis, matchings, costs, budget)
    if flops(analysis, costs, at(high), matchings) <= limit * (1 + 1e-12):
        return at(high)
    for _ in range(30):  # bisection on the share
        mid = (low + high) / 2
        low, high = (mid, high) if flops(analysis, costs, at(mid), matchings) <= limit * (1 + 1e-12) else (low, mid)
    return at(low)


def _narrow_uniformly(analysis: Analysis, matchings: dict[int, Matching], costs: list[Cost],
                      budget: float) -> dict[int, int]:
    """Every narrowable space's width n − ⌈r·(n − narrowest)⌉, for the least share r within budget."""
    narrowable = _narrowable(analysis, matchings)

    def at(share: float) -> dict[int, int]:
        return {root: m.n - (math.ceil(share * (m.n - m.narrowest)) if root in narrowable else 0)
                for root, m in matchings.items()}

    limit, low, high = budget * base_flops(analysis, costs) * (1 + 1e-12), 0.0, 1.0
    if flops(analysis, costs, at(high), matchings) > limit:
        _unreachable(analysis, costs, at(high), matchings, budget)
    for _ in range(30):
        mid = (low + high) / 2
        low, high = (low, mid) if flops(analysis, costs, at(mid), matchings) <= limit else (mid, high)
    return at(high)


def stage_widths(analysis: Analysis, matchings: dict[int, Matching], costs: list[Cost],
                 budget: float) -> dict[int, int]:
    """Spaces kept apart whole, deepest first, while within budget; the first that does not fit, in part.
    Below one model's FLOPs, as ``uniform``: no space is kept apart."""
    limit = budget * base_flops(analysis, costs) * (1 + 1e-12)
    widths = {root: m.n for root, m in matchings.items()}
    if budget < 1.0 and flops(analysis, costs, widths, matchings) > limit:
        return _narrow_uniformly(analysis, matchings, costs, budget)
    for root in sorted(widths, key=_depths(analysis).get, reverse=True):
        if root in analysis.table.keep_width:
            continue
        m = matchings[root]
        full = m.n + len(m.corr)
        widths[root] = next((w for w in range(full, widths[root], -1)  # the widest that fits
                             if flops(analysis, costs, {**widths, root: w}, matchings) <= limit), widths[root])
        if widths[root] < full:
            return widths
    return widths


def _depths(analysis: Analysis) -> dict[int, int]:
    """Each root's depth: the index of the first layer that writes it (spaces no layer writes: 0)."""
    depth: dict[int, int] = {}
    for k, layer in enumerate(analysis.layers):
        for atom in analysis.table.atoms(layer.out_dim):
            depth.setdefault(atom.id, k)
    return {root: depth.get(root, 0) for root in analysis.free_roots()}


WIDTHS = {"greedy": choose_widths, "uniform": uniform_widths, "stages": stage_widths}


def zip_until_widths(analysis: Analysis, matchings: dict[int, Matching], layer: str) -> dict[int, int]:
    """ZipIt!'s partial zipping: spaces a layer after ``layer`` writes are kept apart, the others merged.

    ``layer`` names a layer (module or node) or a module holding several (a
    stage, ``layer3``): the cut is after its last layer.  A space has one width,
    so one written on both sides of the cut (a residual stream) is kept apart
    too: the zip then ends where it begins.
    """
    names = [(lay.node, lay.weight.rpartition(".")[0]) for lay in analysis.layers]
    inside = [k for k, (node, module) in enumerate(names) if layer in (node, module) or module.startswith(layer + ".")]
    cut = inside[-1] if inside else None
    if cut is None:
        raise PleasccError(f"--zip-until {layer}: the model has no such layer; its layers are "
                           f"{', '.join(module for _, module in names[:4])}, …, {names[-1][1]}")
    late = {atom.id for lay in analysis.layers[cut + 1:] for atom in analysis.table.atoms(lay.out_dim)}
    return {root: 2 * m.n if root in late and root not in analysis.table.keep_width else m.n
            for root, m in matchings.items()}
