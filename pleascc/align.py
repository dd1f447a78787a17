"""More than two models: each one past the first permuted into the first's layout, then unit k of every model
merged (budget 1.0) or all kept side by side (budget N).

Model A is the reference: every other model is matched to it as a pair is
(the matching pass on the two, Hungarian per space, heads with their dims),
and its weights are permuted by that matching (``alignment``), which leaves
its function unchanged.  Once aligned, the N models share one layout, and the
merge maps every model's unit k to merged unit k (``aligned_maps``); least
squares then fits each layer to the mean of the N models' outputs.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from pleascc.passes.groups import Analysis, permute_state
from pleascc.passes.match import Matching, identity
from pleascc.passes.merge_maps import MergeMaps


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


def _block(n: int, model: int, models: int) -> torch.Tensor:
    """The selection of ``model``'s n units into the model'th block of a width of ``models`` blocks."""
    selection = torch.zeros(models * n, n, dtype=torch.float64)
    selection[model * n:(model + 1) * n] = torch.eye(n, dtype=torch.float64)
    return selection


def aligned_maps(analysis: Analysis, models: int, budget: float) -> tuple[dict[int, Matching], dict[int, int],
                                                                          MergeMaps]:
    """Identity matchings of aligned models, their widths and maps: every model's unit k in merged unit k at
    budget 1.0; at budget ``models``, each model's units in a block of their own (heads kept whole, their dims
    and per-group axes at their width, as a pair's side-by-side merge keeps them)."""
    matchings, widths, selections = {}, {}, {}
    for root in analysis.free_roots():
        n = analysis.root_size(root)
        matchings[root] = identity(torch.zeros(n, n))
        apart = budget > 1.0 and root not in analysis.per_head and root not in analysis.table.keep_width
        widths[root] = n * (models if apart else 1)
        selections[root] = tuple(_block(n, m, models) if apart else torch.eye(n, dtype=torch.float64)
                                 for m in range(models))
    return matchings, widths, MergeMaps(analysis.table, selections, models)
