"""The algebra of spaces: which tensor axes must be permuted together.

Every axis of every tensor in the graph gets a *dim*, built from *atoms*
(union-find elements, one per independent space).  A dim is

- ``Atom(id)``      one space: any permutation of it is allowed;
- ``Cat(parts)``    an axis made of segments (``cat``, ``split``, channel ``pad``);
- ``Prod(factors)`` an axis that is the row-major product of others
                    (``flatten`` of C×H×W, grouped-conv channels G×C/G).

Op rules only say "these two dims are equal" (``unify``); unifying an atom with
a composite *refines* the atom, so structure found anywhere propagates
everywhere.  Where two structures cannot be reconciled, the atoms involved are
*fixed* (never permuted) with a reason: fail closed, never guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Union

import torch


@dataclass(frozen=True)
class Atom:
    id: int


@dataclass(frozen=True)
class Cat:
    parts: tuple


@dataclass(frozen=True)
class Prod:
    factors: tuple


Dim = Union[Atom, Cat, Prod]


class SpaceTable:
    """Union-find over atoms, with refinement into composites and fixed marks."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        self._definition: dict[int, Dim] = {}
        self.fixed: dict[int, str] = {}
        self.keep_width: set[int] = set()  # permutable, but never widened (per-group axes of grouped ops)

    # ----- atoms
    def new(self, size: int, fixed: str | None = None, keep_width: bool = False, piece: bool = False) -> Atom:
        """A new space; size-1 ones are fixed (broadcast axes) unless ``piece`` of a split axis."""
        self._parent.append(len(self._parent))
        self._size.append(int(size))
        atom = Atom(len(self._parent) - 1)
        if fixed is not None or (size <= 1 and not piece):
            self.fixed[atom.id] = fixed or "size 1"
        if keep_width:
            self.keep_width.add(atom.id)
        return atom

    def find(self, i: int) -> int:
        root = i
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[i] != root:
            self._parent[i], i = root, self._parent[i]
        return root

    def fixed_reason(self, atom: Atom) -> str | None:
        return self.fixed.get(self.find(atom.id))

    # ----- structure
    def resolve(self, dim: Dim) -> Dim:
        """The dim with every atom replaced by its root or its refinement, flattened."""
        if isinstance(dim, Atom):
            root = self.find(dim.id)
            if root in self._definition:
                return self.resolve(self._definition[root])
            return Atom(root)
        kind = type(dim)
        flat: list[Dim] = []
        for child in children(dim):
            child = self.resolve(child)
            if kind is Prod and self.size(child) == 1 and self.is_fixed(child):
                continue  # a broadcast axis; size-1 pieces of a split axis may still widen
            flat.extend(children(child) if type(child) is kind else [child])
        if not flat:  # a product of size-1 axes
            return self.resolve(children(dim)[0])
        return flat[0] if len(flat) == 1 else kind(tuple(flat))

    def size(self, dim: Dim, widths: dict[int, int] | None = None) -> int:
        """Size of ``dim``; with ``widths`` (root id -> width), its size after merging."""
        dim = self.resolve(dim)
        if isinstance(dim, Atom):
            return widths.get(dim.id, self._size[dim.id]) if widths else self._size[dim.id]
        sizes = [self.size(c, widths) for c in children(dim)]
        if isinstance(dim, Cat):
            return sum(sizes)
        out = 1
        for s in sizes:
            out *= s
        return out

    def atoms(self, dim: Dim) -> Iterator[Atom]:
        """The root atoms of ``dim``, in layout order (repeats possible)."""
        dim = self.resolve(dim)
        if isinstance(dim, Atom):
            yield dim
        else:
            for child in children(dim):
                yield from self.atoms(child)

    def fix(self, dim: Dim, reason: str) -> None:
        for atom in self.atoms(dim):
            self.fixed.setdefault(atom.id, reason)

    def keep(self, dim: Dim) -> None:
        """Permutable, but never widened (head dims, per-group channels)."""
        self.keep_width.update(a.id for a in self.atoms(dim))

    def is_fixed(self, dim: Dim) -> bool:
        return all(a.id in self.fixed for a in self.atoms(dim))

    # ----- unification
    def unify(self, a: Dim, b: Dim, where: str = "") -> None:
        """Declare ``a`` and ``b`` the same space; fix both if their structures clash."""
        a, b = self.resolve(a), self.resolve(b)
        if a == b:
            return
        if self.size(a) != self.size(b):
            raise ValueError(f"internal: unify sizes {self.size(a)} and {self.size(b)} at {where}")
        if isinstance(a, Atom) and isinstance(b, Atom):
            self._union(a.id, b.id)
        elif isinstance(a, Atom) or isinstance(b, Atom):
            atom, comp = (a, b) if isinstance(a, Atom) else (b, a)
            self._refine(atom, comp, where)
        elif isinstance(a, Cat) and isinstance(b, Cat):
            self._unify_cats(a, b, where)
        elif isinstance(a, Cat) and isinstance(b, Prod):
            self._unify_cats(a, self._distribute(b), where)
        elif isinstance(a, Prod) and isinstance(b, Cat):
            self._unify_cats(self._distribute(a), b, where)
        elif isinstance(a, Prod) and isinstance(b, Prod) and [self.size(f) for f in a.factors] == [
            self.size(f) for f in b.factors
        ]:
            for fa, fb in zip(a.factors, b.factors):
                self.unify(fa, fb, where)
        else:
            reason = f"{where}: axis structures {self.describe(a)} and {self.describe(b)} cannot be related"
            self.fix(a, reason)
            self.fix(b, reason)

    def _union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri == rj:
            return
        self._parent[rj] = ri
        if rj in self.fixed:
            self.fixed.setdefault(ri, self.fixed.pop(rj))
        if rj in self.keep_width:
            self.keep_width.add(ri)

    def _refine(self, atom: Atom, comp: Dim, where: str) -> None:
        if any(a.id == atom.id for a in self.atoms(comp)):
            reason = f"{where}: a space is defined in terms of itself"
            self.fix(atom, reason)
            self.fix(comp, reason)
            return
        reason = self.fixed.pop(atom.id, None)
        self._definition[atom.id] = comp
        if reason is not None:
            self.fix(comp, reason)
        if atom.id in self.keep_width:
            self.keep_width.update(a.id for a in self.atoms(comp))

    def _unify_cats(self, a: Cat, b: Cat, where: str) -> None:
        """Align two segmentations, splitting segments at the other side's boundaries."""
        left, right = list(a.parts), list(b.parts)
        while left and right:
            x, y = self.resolve(left.pop(0)), self.resolve(right.pop(0))
            sx, sy = self.size(x), self.size(y)
            if sx == sy:
                self.unify(x, y, where)
                continue
            big, small, rest = (x, y, left) if sx > sy else (y, x, right)
            split = self._split(big, self.size(small), where)
            if split is None:
                reason = f"{where}: segments of {self.describe(a)} and {self.describe(b)} do not align"
                self.fix(a, reason)
                self.fix(b, reason)
                return
            self.unify(split[0], small, where)
            rest.insert(0, split[1])

    def _split(self, dim: Dim, at: int, where: str) -> tuple[Dim, Dim] | None:
        """Refine ``dim`` into a head of size ``at`` and a tail, if its structure allows."""
        if isinstance(dim, Atom):
            head, tail = self.new(at, piece=True), self.new(self.size(dim) - at, piece=True)
            self._refine(dim, Cat((head, tail)), where)
            return head, tail
        if isinstance(dim, Prod) and isinstance(dim.factors[0], Cat):
            dim = self._distribute(dim)
        if isinstance(dim, Cat):  # split the segment the boundary falls in
            offset = 0
            for k, part in enumerate(dim.parts):
                size = self.size(part)
                if offset + size >= at:
                    inner = (part, None) if offset + size == at else self._split(self.resolve(part), at - offset, where)
                    if inner is None:
                        return None
                    head = Cat((*dim.parts[:k], inner[0]))
                    tail = dim.parts[k + 1:] if inner[1] is None else (inner[1], *dim.parts[k + 1:])
                    return self.resolve(head), self.resolve(Cat(tail))
                offset += size
        if isinstance(dim, Prod) and isinstance(dim.factors[0], Atom):  # split whole rows of the outer factor
            rest = dim.factors[1:]
            row = self.size(Prod(rest)) if len(rest) > 1 else self.size(rest[0])
            if at % row == 0:
                outer_head, outer_tail = self._split(dim.factors[0], at // row, where)
                return Prod((outer_head, *rest)), Prod((outer_tail, *rest))
        return None

    def _distribute(self, prod: Prod) -> Cat:
        """(G1 | G2) x R = (G1 x R) | (G2 x R): a product as segments, for aligning with a Cat."""
        outer, rest = prod.factors[0], prod.factors[1:]
        if isinstance(outer, Cat):
            return Cat(tuple(Prod((g, *rest)) for g in outer.parts))
        return Cat((prod,))

    # ----- reading
    def describe(self, dim: Dim) -> str:
        dim = self.resolve(dim)
        if isinstance(dim, Atom):
            return f"s{dim.id}[{self._size[dim.id]}]" + ("!" if dim.id in self.fixed else "")
        sep = " | " if isinstance(dim, Cat) else " x "
        return "(" + sep.join(self.describe(c) for c in children(dim)) + ")"

    def apply(
        self,
        x: torch.Tensor,
        axis: int,
        dim: Dim,
        matrix: Callable[[Atom], torch.Tensor | Callable | None],
        outer_axis: int | None = None,
    ) -> torch.Tensor:
        """Multiply axis ``axis`` of ``x`` by the matrix the dim's structure composes.

        ``matrix(atom)`` gives an (out × in) matrix per atom, or None for identity,
        or a stack of them, one per unit of the product factor just before it
        (a head dim permuted differently in every head), or a function
        ``(x, axis) -> y`` that applies its matrix faster (a gather).  Cat
        composes block-diagonally, Prod as a Kronecker product, without ever
        building the big matrix.
        """
        dim = self.resolve(dim)
        axis = axis % x.dim()
        if isinstance(dim, Atom):
            m = matrix(dim)
            if m is None:
                return x
            if callable(m):
                return m(x, axis)
            if m.dim() == 3:
                return _per_unit(x, outer_axis, axis, m.to(x))
            return torch.movedim(torch.tensordot(x, m.to(x), dims=([axis], [1])), -1, axis)
        if isinstance(dim, Cat):
            sizes = [self.size(p) for p in dim.parts]
            pieces = torch.split(x, sizes, dim=axis)
            return torch.cat([self.apply(p, axis, d, matrix) for p, d in zip(pieces, dim.parts)], dim=axis)
        sizes = [self.size(f) for f in dim.factors]
        y = x.reshape(*x.shape[:axis], *sizes, *x.shape[axis + 1 :])
        for k, factor in enumerate(dim.factors):  # outer factors first: a per-unit inner one sees their new layout
            y = self.apply(y, axis + k, factor, matrix, outer_axis=axis + k - 1 if k else None)
        return y.reshape(*y.shape[:axis], -1, *y.shape[axis + len(sizes) :])

    def permutes(self, dim: Dim, perms: dict[int, torch.Tensor]) -> bool:
        """Whether ``perms`` holds a permutation of any atom of ``dim``."""
        dim = self.resolve(dim)
        if isinstance(dim, Atom):
            return dim.id in perms
        return any(self.permutes(c, perms) for c in children(dim))

    def index(self, dim: Dim, perms: dict[int, torch.Tensor]) -> torch.Tensor:
        """The gather index that permutes an axis laid out as ``dim``.

        A 2-D entry of ``perms`` holds one permutation per (new) unit of the
        product factor just before that atom.
        """
        dim = self.resolve(dim)
        if isinstance(dim, Atom):
            return perms.get(dim.id, torch.arange(self._size[dim.id]))
        parts = [self.index(c, perms) for c in children(dim)]
        if isinstance(dim, Cat):
            offsets, out = 0, []
            for p in parts:
                out.append(p + offsets)
                offsets += len(p)
            return torch.cat(out)
        out = parts[0]
        for before, p in zip(parts, parts[1:]):
            rows = p[torch.arange(len(out)) % before.shape[-1]] if p.dim() == 2 else p[None, :]
            out = (out[:, None] * rows.shape[-1] + rows).reshape(-1)
        return out


def _per_unit(x: torch.Tensor, outer_axis: int | None, axis: int, m: torch.Tensor) -> torch.Tensor:
    """Multiply ``axis`` by ``m[u]`` at every unit ``u`` of ``outer_axis`` (per-head head-dim maps)."""
    if outer_axis is None:
        raise ValueError("internal: per-unit matrices for an axis that is not an inner product factor")
    y = torch.movedim(x, (outer_axis, axis), (-2, -1))
    y = torch.einsum("...ud,ued->...ue", y, m)
    return torch.movedim(y, (-2, -1), (outer_axis, axis))


def children(dim: Dim) -> tuple:
    return dim.parts if isinstance(dim, Cat) else dim.factors
