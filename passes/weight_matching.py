"""Weight matching (Git Re-Basin, Ainsworth et al., 2023): pair units by their weights alone, no data.

Each free space's permutation of B maximizes Σ ⟨W_A, π(W_B)⟩ over every
parameter that holds the space, with the other spaces' permutations held:
a Hungarian per space, in random order, until a round changes nothing
(coordinate ascent, as in the paper).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from pleascc.passes.groups import Analysis, permute_state
from pleascc.passes.match import Matching
from pleascc.passes.matching_stats import observe

State = dict[str, torch.Tensor]


def weight_matching(analysis: Analysis, states: tuple[State, State], rounds: int = 50,
                    seed: int = 0) -> dict[int, Matching]:
    """A matching per free space from the two models' parameters; ``corr`` is each pair's weight cosine."""
    sizes = {root: analysis.root_size(root) for root in analysis.free_roots()}
    perms = {root: torch.arange(n) for root, n in sizes.items()}  # B's unit for each of A's
    generator = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        changed = False
        for root in [list(sizes)[k] for k in torch.randperm(len(sizes), generator=generator)]:
            others = {r: p for r, p in perms.items() if r != root}
            inner = _inner_products(analysis, states[0], permute_state(analysis, states[1], others), {root})
            cols = torch.as_tensor(linear_sum_assignment(inner[root].numpy(), maximize=True)[1])
            changed |= not torch.equal(cols, perms[root])
            perms[root] = cols
        if not changed:
            break
    return _matchings(analysis, states, perms)


def _inner_products(analysis: Analysis, a: State, b: State, roots: set[int]) -> dict:
    """Per free space, the A×B inner products of its units' weights (every parameter that holds it)."""
    out: dict[int, torch.Tensor] = {}
    for name, binding in analysis.params.items():
        if name not in a or not a[name].is_floating_point():
            continue
        for axis, dim in enumerate(binding.dims):
            views = zip(observe(analysis.table, a[name].double(), (axis,), (dim,)),
                        observe(analysis.table, b[name].double(), (axis,), (dim,)))
            for (root, va), (_, vb) in views:
                if root in roots:
                    out[root] = out.get(root, 0) + va.T @ vb
    return out


def _matchings(analysis: Analysis, states: tuple[State, State], perms: dict) -> dict[int, Matching]:
    """The final pairing of every space, its pairs scored by the cosine of their weights."""
    aligned = permute_state(analysis, states[1], perms)
    roots = set(perms)
    cross = _inner_products(analysis, states[0], aligned, roots)
    norm_a = _inner_products(analysis, states[0], states[0], roots)
    norm_b = _inner_products(analysis, aligned, aligned, roots)
    out = {}
    for root in perms:
        cosine = cross[root].diagonal() / (norm_a[root].diagonal() * norm_b[root].diagonal()).sqrt().clamp(min=1e-30)
        order = torch.argsort(cosine, descending=True, stable=True)
        out[root] = Matching(order, perms[root][order], cosine[order])
    return out
