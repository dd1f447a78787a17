"""More than two models: each one past the first permuted into the first's layout, then unit k of every model
merged, kept apart, or merged with other units, as the budget says.

Model A is the reference: every other model is matched to it as a pair is
(the matching pass on the two, Hungarian per space, heads with their dims),
and its weights are permuted by that matching (``alignment``), which leaves
its function unchanged.  Once aligned, the N models share one layout: unit k
of every model is a tuple (``aligned_matchings``), merged whole at budget
1.0, losing members where the budget allows more (those least correlated
with their A unit first: clusters of 1 to N units), and merged with other
tuples below 1.0; least squares then fits each layer to the mean of its
cluster's models' outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.fx as fx

from pleascc.passes.aligned_matching import Tuples, tuples, tuples_of
from pleascc.passes.groups import Analysis, permute_state
from pleascc.passes.match import Matching


def alignment(matchings: dict[int, Matching]) -> dict[int, torch.Tensor]:
    """Per free space, the permutation that puts model B's units where their partners in A are
    (``permute_state``'s): B's unit for each of A's, and for head dims, per head of A."""
    perms = {}
    for root, m in matchings.items():
        if m.within is not None:
            perms[root] = m.within
            continue
        partner = torch.empty_like(m.pairs_b)
        partner[m.pairs_a] = m.pairs_b
        perms[root] = partner
    return perms


def aligned_copy(gm: fx.GraphModule, analysis: Analysis, state: dict[str, torch.Tensor],
                 perms: dict[int, torch.Tensor]) -> tuple[fx.GraphModule, dict[str, torch.Tensor]]:
    """A copy of a model's graph with its weights permuted by ``perms`` (the same function), and those weights."""
    permuted = permute_state(analysis, state, perms)
    aligned = copy.deepcopy(gm)  # the caller's model shares its tensors with ``gm``: write into a copy only
    tensors = graph_tensors(aligned)
    with torch.no_grad():
        for name, value in permuted.items():
            tensors[name].copy_(value)
    return aligned, tensors


def graph_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Parameters and every buffer, non-persistent ones too (EVA's zero k-bias is resized like the rest); a tensor
    several modules hold (tied embeddings) under each name, each merged on its own."""
    return {name: t.detach() for name, t in (*gm.named_parameters(remove_duplicate=False),
                                            *gm.named_buffers(remove_duplicate=False))}


def aligned_matchings(analysis: Analysis, pairs: list[dict[int, Matching]], perms: list[dict[int, torch.Tensor]],
                      models: int) -> dict[int, Tuples]:
    """Every free space's tuples of aligned units (``aligned_matching.tuples``) from each other model's matching to
    A and the ``alignment`` it gave.  Head dims matched inside each pair of heads (``Matching.within``), and every
    space where the models were not matched (``average``), keep A's order: identity tuples; the former are never
    widened (``aligned_widths``)."""
    out = {}
    for root in analysis.free_roots():
        found = [pair[root] for pair in pairs]
        if found and all(m.within is None for m in found):
            out[root] = tuples(found, [perm[root] for perm in perms])
        else:
            out[root] = tuples_of(torch.zeros(models - 1, analysis.root_size(root), dtype=torch.float64))
    return out


def aligned_widths(analysis: Analysis, matchings: dict[int, Tuples], costs: list, budget: float,
                   search: Callable) -> dict[int, int]:
    """The width ``search`` (``budget.WIDTHS``) gives each space; a head dim stays at its width whether its head
    is merged or kept apart, as a pair's per-head dims do."""
    held = {root for root in matchings if root in analysis.per_head}
    widths = search(analysis, {root: m for root, m in matchings.items() if root not in held}, costs, budget)
    return {**widths, **{root: matchings[root].n for root in held}}
