"""Widths per space from a compute budget, counted on the shapes the emitter will produce.

FLOPs (multiply-accumulates) of every layer = its weight's size at the chosen
widths × the positions it is applied at; separate heads count twice.  Start
with every pair merged (width n) and greedily un-merge, a step at a time, in
the space where un-merging gives the most lost correlation back per FLOP
added, until the next step would exceed the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pleascc.passes.groups import Analysis
from pleascc.passes.match import Matching


@dataclass
class Cost:
    """A layer's cost as a function of widths."""

    dims: list
    positions: int
    copies: int


def layer_costs(analysis: Analysis, head_nodes: set[str], separate_heads: bool) -> list[Cost]:
    costs = []
    for layer in analysis.layers:
        shape = analysis.shapes[layer.node]
        axis = layer.out_axis % len(shape)
        positions = math.prod(s for k, s in enumerate(shape) if k not in (0, axis))
        copies = 2 if separate_heads and layer.node in head_nodes else 1
        costs.append(Cost(analysis.params[layer.weight].dims, positions, copies))
    return costs


def flops(analysis: Analysis, costs: list[Cost], widths: dict[int, int]) -> int:
    return sum(
        c.copies * c.positions * math.prod(analysis.table.size(d, widths) for d in c.dims) for c in costs
    )


def choose_widths(analysis: Analysis, matchings: dict[int, Matching], costs: list[Cost],
                  budget: float) -> dict[int, int]:
    """Widths meeting ``flops(merged) <= budget × flops(one model)`` (never below full merging)."""
    table = analysis.table
    limit = budget * flops(analysis, [Cost(c.dims, c.positions, 1) for c in costs], {})
    widths = {root: m.n for root, m in matchings.items()}
    touching = {root: [] for root in matchings}  # the costs each space's width changes
    for c in costs:
        for root in {a.id for d in c.dims for a in table.atoms(d)} & touching.keys():
            touching[root].append(c)

    def cost_of(c: Cost, w: dict[int, int]) -> int:
        return c.copies * c.positions * math.prod(table.size(d, w) for d in c.dims)

    current = flops(analysis, costs, widths)
    steps = {root: max(1, m.n // 32) for root, m in matchings.items()}
    while True:
        best, best_score, best_delta = None, -1.0, 0
        for root, m in matchings.items():
            unmerged = widths[root] - m.n  # pairs already un-merged, worst first
            step = min(steps[root], m.n - unmerged)
            if step <= 0:
                continue
            trial = {**widths, root: widths[root] + step}
            delta = sum(cost_of(c, trial) - cost_of(c, widths) for c in touching[root])
            if current + delta > limit:
                continue
            gain = float((1 - m.corr[m.n - unmerged - step:m.n - unmerged]).sum())
            score = gain / max(delta, 1)
            if score > best_score:
                best, best_score, best_delta = root, score, delta
        if best is None:
            return widths
        widths[best] += min(steps[best], 2 * matchings[best].n - widths[best])
        current += best_delta


def relative_flops(analysis: Analysis, costs: list[Cost], widths: dict[int, int]) -> float:
    base = flops(analysis, [Cost(c.dims, c.positions, 1) for c in costs], {})
    return flops(analysis, costs, widths) / base
