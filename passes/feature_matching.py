"""Feature matching: every free space's pairing of A's units with B's, from the matching pass's correlations.

Plain spaces are matched one by one (``match.match_all``; ZipIt! zips them
from their joint correlations); heads and the dims inside them, which permute
together, are matched jointly (``match_heads``, ``match_product``).  A small
weight-based tie-break separates units the data cannot tell apart.
"""

from __future__ import annotations

import torch

from pleascc.passes.groups import Analysis
from pleascc.passes.match import match_all, match_heads, match_product, zipit
from pleascc.passes.matching_stats import weight_similarity
from pleascc.passes.merge_maps import per_head_selections

TIE_BREAK = 1e-3  # weight of weight-row similarity in matching scores: separates units data can't tell apart


def match_features(analysis: Analysis, correlations: dict, states, matcher: str, zip_options: dict) -> dict:
    """Pair units per free group: correlation, plus a small weight-based tie-break.

    ``zipit`` zips the plain spaces (``correlations`` then holds their joint
    A+B correlations); heads, head dims and per-group channels are paired as
    by ``hungarian``.
    """
    sizes = {root: analysis.root_size(root) for root in analysis.free_roots()}
    joints = {r: c for r, c in correlations.items() if r in sizes and c.shape[0] == 2 * sizes[r]}
    correlations = {r: c[:sizes[r], sizes[r]:] if r in joints else c for r, c in correlations.items()}
    ties = weight_similarity(analysis, states)
    scores = {root: correlations.get(root, torch.zeros(n, n)) + TIE_BREAK * ties.get(root, torch.zeros(n, n))
              for root, n in sizes.items()}
    matchings = match_all(scores, sizes, "identity" if matcher == "identity" else "hungarian")
    if matcher == "identity":
        return matchings
    _match_products(analysis, correlations, sizes, matchings)
    if matcher == "zipit":
        matchings.update(zip_spaces(analysis, joints, jointly_matched(analysis, correlations), zip_options))
    return matchings


def zip_spaces(analysis: Analysis, correlations: dict, held: set[int], zip_options: dict, models: int = 2) -> dict:
    """ZipIt! of every space whose correlation is joint (of all ``models`` models' units:
    ``feature_moments(within=True)``), but those ``held`` (matched jointly, as heads and product factors are)
    and per-group axes."""
    sizes = {root: analysis.root_size(root) for root in analysis.free_roots()}
    return {root: zipit(joint, models=models, **zip_options) for root, joint in correlations.items()
            if root in sizes and joint.shape[0] == models * sizes[root] and root not in held
            and root not in analysis.table.keep_width}


def jointly_matched(analysis: Analysis, correlations: dict) -> set[int]:
    """The spaces matched jointly with others: factors of product axes, heads and the dims inside them."""
    return ({root for key in correlations if isinstance(key, tuple) for root in key}
            | set(analysis.per_head) | set(analysis.per_head.values()))


def _match_products(analysis: Analysis, correlations: dict, sizes: dict, matchings: dict) -> None:
    """Product axes (heads × head dim): their factors are matched jointly."""
    done = _match_heads(analysis, correlations, sizes, matchings)
    for key, corr in correlations.items():
        if isinstance(key, tuple) and not set(key) <= done:
            known = {f: _partner_of(matchings[r]) for f, r in enumerate(key) if r in done}
            found = match_product(corr, [analysis.root_size(r) for r in key], [r in sizes for r in key], known=known)
            for root, m in zip(key, found):
                if root in sizes and root not in done:
                    matchings[root] = m
            done.update(r for r in key if r in sizes)
    _match_grouped_heads(analysis, correlations, sizes, matchings)


def _match_grouped_heads(analysis: Analysis, correlations: dict, sizes: dict, matchings: dict) -> None:
    """Heads whose per-head units share their axis with further factors (grouped-query attention's kv heads ×
    queries per kv head × head dim): the queries of each pair of kv heads paired on their own.

    ``match_product`` gives each factor one permutation, the same in every kv
    head; the queries may be ordered differently in each.  With the other
    factors' matchings fixed, each axis' correlation is taken along them
    (``_along``), and ``match_heads`` pairs the kv heads and, inside each pair,
    their queries."""
    grouped: dict[tuple[int, int], list[torch.Tensor]] = {}
    for key, corr in correlations.items():
        if isinstance(key, tuple):
            for k, (outer, inner) in enumerate(zip(key, key[1:])):
                if analysis.per_head.get(inner) == outer and inner in sizes and outer in sizes \
                        and matchings[inner].within is None:
                    grouped.setdefault((outer, inner), []).append(_along(analysis, corr, key, (k, k + 1), matchings))
    for (outer, inner), blocks in grouped.items():  # one space read at several sites: their mean correlation
        matchings[outer], (matchings[inner],) = match_heads([torch.stack(blocks).mean(0)], sizes[outer])


def _along(analysis: Analysis, corr: torch.Tensor, key: tuple, kept: tuple[int, int], matchings: dict) -> torch.Tensor:
    """The A×B correlation of a product axis over the factors ``kept`` only: every other factor's units
    paired as its matching pairs them (a fixed factor's with themselves) and averaged."""
    shape = [analysis.root_size(r) for r in key]
    c = corr.double().reshape(*shape, *shape)
    for k in reversed(range(len(key))):
        if k in kept:
            continue
        root = key[k]
        partner = _partner_of(matchings[root]) if root in matchings else torch.arange(shape[k])
        c = c.index_select(c.dim() // 2 + k, partner)  # B's axis k in A's order
        c = torch.diagonal(c, dim1=k, dim2=c.dim() // 2 + k).mean(-1)
    side = shape[kept[0]] * shape[kept[1]]
    return c.reshape(side, side)


def _match_heads(analysis: Analysis, correlations: dict, sizes: dict, matchings: dict) -> set[int]:
    """Heads whose head dims may differ per head: heads as units, then dims inside each pair of heads."""
    by_heads: dict[int, list[int]] = {}
    for inner, outer in analysis.per_head.items():
        if inner in sizes and outer in sizes and (outer, inner) in correlations:
            by_heads.setdefault(outer, []).append(inner)
    for outer, inners in by_heads.items():
        matchings[outer], found = match_heads([correlations[(outer, i)] for i in inners], sizes[outer])
        matchings.update(zip(inners, found))
    return {r for outer, inners in by_heads.items() for r in (outer, *inners)}


def selections(analysis: Analysis, matchings: dict, widths: dict) -> dict:
    """Every free space's (P_A, P_B); per-head head dims follow their heads' pairs."""
    selections = {root: m.selections(widths[root]) for root, m in matchings.items()}
    for root, m in matchings.items():
        if m.within is not None:
            selections[root] = per_head_selections(selections[analysis.per_head[root]], m.within)
    return selections


def _partner_of(m) -> torch.Tensor:
    """B's unit for each of A's units."""
    partner = torch.empty_like(m.pairs_b)
    partner[m.pairs_a] = m.pairs_b
    return partner
