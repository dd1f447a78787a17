"""The space algebra: unification, refinement into segments and products, fixing, apply/index."""

import torch

from pleascc.passes.spaces import Atom, Cat, Prod, SpaceTable


def test_unify_atoms_and_fixed_propagates():
    t = SpaceTable()
    a, b = t.new(4), t.new(4, "model input")
    t.unify(a, b)
    assert t.find(a.id) == t.find(b.id)
    assert t.is_fixed(a)


def test_atom_refined_into_segments_aligns_concatenations():
    t = SpaceTable()
    whole = t.new(6)
    x, y = t.new(2), t.new(4)
    t.unify(whole, Cat((x, y)))
    p, q = t.new(3), t.new(3)
    t.unify(whole, Cat((p, q)))  # boundaries 2|4 and 3|3: refine to 2|1|3
    sizes = [t.size(a) for a in t.atoms(whole)]
    assert sizes == [2, 1, 3]
    assert t.size(whole) == 6


def test_product_refinement_and_size_with_widths():
    t = SpaceTable()
    flat = t.new(12)
    c, s = t.new(3), t.new(4, "spatial")
    t.unify(flat, Prod((c, s)))
    assert t.size(flat, {t.find(c.id): 5}) == 20
    assert t.describe(flat) == f"(s{c.id}[3] x s{s.id}[4]!)"


def test_clashing_structures_fix_both_sides():
    t = SpaceTable()
    a, b, c, d = t.new(2), t.new(6), t.new(3), t.new(4)
    t.unify(Prod((a, b)), Prod((c, d)))
    assert all(t.is_fixed(x) for x in (a, b, c, d))


def test_index_and_apply_agree_on_composites():
    t = SpaceTable()
    a, b = t.new(2), t.new(3)
    dim = Cat((Prod((a, t.new(2, "spatial"))), b))
    perms = {a.id: torch.tensor([1, 0]), b.id: torch.tensor([2, 0, 1])}
    index = t.index(dim, perms)
    x = torch.arange(7.0)
    eye = {a.id: torch.eye(2)[perms[a.id]], b.id: torch.eye(3)[perms[b.id]]}
    applied = t.apply(x, 0, dim, lambda atom: eye.get(atom.id))
    assert torch.equal(x[index], applied)
    assert index.tolist() == [2, 3, 0, 1, 6, 4, 5]


def test_size_one_atoms_are_fixed():
    t = SpaceTable()
    assert t.is_fixed(t.new(1))
    assert isinstance(t.resolve(Prod((t.new(5), t.new(1)))), Atom)


def test_per_head_permutations_index_and_apply_agree():
    """A head dim permuted differently in every head: 2-D perms for index, per-head matrices for apply."""
    t = SpaceTable()
    qkv, heads, head_dim = t.new(3, "q, k, v"), t.new(2), t.new(3)
    dim = Prod((qkv, heads, head_dim))
    within = torch.tensor([[2, 0, 1], [1, 2, 0]])  # per new head
    perms = {heads.id: torch.tensor([1, 0]), head_dim.id: within}
    x = torch.arange(18.0)
    index = t.index(dim, perms)
    assert index[:6].tolist() == [3 + 2, 3 + 0, 3 + 1, 0 + 1, 0 + 2, 0 + 0]  # new head 0 is old head 1, dims by row 0
    eye = {heads.id: torch.eye(2)[perms[heads.id]], head_dim.id: torch.eye(3)[within]}
    assert torch.equal(x[index], t.apply(x, 0, dim, lambda atom: eye.get(atom.id)))
