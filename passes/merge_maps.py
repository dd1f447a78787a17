"""How merged units relate to the models' units, and how to apply that to tensors.

For every free space a merge keeps one 0/1 selection matrix per model,
``P_A``, ``P_B`` for two (width × n): row k says which unit of each model
feeds merged unit k.  A merged pair has a 1 in both; an A-only unit only in
``P_A``.  Fixed spaces use the identity for every model.  A head dim matched
inside each pair of heads has one such matrix per model and merged head
(heads × width × n).  Everything else follows:

- merged features  = (P_A·x_A + P_B·x_B + …) / (number of models feeding each unit)
- a weight's input columns gather with the same P (a merged input stands for
  each unit it came from), its output rows average like features.

Cat and Prod axes compose these block-diagonally and as Kronecker products,
through ``SpaceTable.apply``.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pleascc.passes.spaces import Atom, Dim, SpaceTable


@dataclass
class MergeMaps:
    table: SpaceTable
    selections: dict[int, tuple[torch.Tensor, ...]]  # root -> (P_A, P_B, …): one per model
    models: int = 2
    _participation: dict = field(default_factory=dict, repr=False)  # (dim, model) -> vector, per batch reused
    _gathers: dict = field(default_factory=dict, repr=False)  # (root, model) -> Gather, or the matrix itself

    @property
    def widths(self) -> dict[int, int]:
        return {root: matrices[0].shape[-2] for root, matrices in self.selections.items()}

    def size(self, dim: Dim) -> int:
        """Width of ``dim`` in the merged model."""
        return self.table.size(dim, self.widths)

    def _matrix(self, model: int):
        def select(atom: Atom) -> torch.Tensor | Gather | None:
            matrices = self.selections.get(atom.id)
            if matrices is None:
                return None
            key = (atom.id, model)
            if key not in self._gathers:
                self._gathers[key] = Gather.of(matrices[model]) or matrices[model]
            return self._gathers[key]

        return select

    def participation(self, dim: Dim, model: int) -> torch.Tensor:
        """1 for merged units that model ``model`` (0 = A, 1 = B, …) feeds, else 0."""
        key = (dim, model)
        if key not in self._participation:
            ones = torch.ones(self.table.size(dim), dtype=torch.float64)
            self._participation[key] = self.table.apply(ones, 0, dim, self._matrix(model))
        return self._participation[key]

    def gather(self, x: torch.Tensor, model: int, axes: list[tuple[int, Dim]]) -> torch.Tensor:
        """Map axes of one model's tensor to the merged layout, without averaging."""
        for axis, dim in axes:
            x = self.table.apply(x, axis, dim, self._matrix(model))
        return x

    def merge(self, tensors: tuple[torch.Tensor, ...], axes: list[tuple[int, Dim]],
              averaged: list[tuple[int, Dim]] | None = None) -> torch.Tensor:
        """Merge the models' tensors (one each) along ``axes``; average over the ``averaged`` ones.

        Features: every axis is averaged.  Weights: output axes are averaged,
        input axes only gathered.
        """
        averaged = axes if averaged is None else averaged
        total = functools.reduce(operator.add, (self.gather(t, model, axes) for model, t in enumerate(tensors)))
        count = functools.reduce(operator.add, (self._count(total, averaged, model) for model in range(len(tensors))))
        return total / count.clamp(min=1).to(total)

    def _count(self, like: torch.Tensor, averaged: list[tuple[int, Dim]], model: int) -> torch.Tensor:
        """Whether ``model`` feeds each merged position (the product over the averaged axes)."""
        count = torch.ones([1] * like.dim(), dtype=torch.float64)
        for axis, dim in averaged:
            shape = [1] * like.dim()
            shape[axis % like.dim()] = -1
            count = count * self.participation(dim, model).reshape(shape)
        return count


@dataclass(frozen=True)
class Gather:
    """A 0/1 selection matrix with at most one 1 per row, applied as an index gather.

    A merge's features pass through these at every layer, so they are worth
    not multiplying: a gather reads each value once, and needs no copy with
    the axis moved last.
    """

    rows: torch.Tensor  # the merged units some unit feeds
    units: torch.Tensor  # the unit feeding each of them
    width: int

    @staticmethod
    def of(matrix: torch.Tensor) -> Gather | None:
        """The gather for ``matrix``, or None if it is not such a selection (ZipIt! sums, per-head stacks)."""
        if matrix.dim() != 2 or not bool(((matrix == 0) | (matrix == 1)).all()) or bool((matrix.sum(1) > 1).any()):
            return None
        rows = matrix.sum(1).nonzero().flatten()
        return Gather(rows, matrix[rows].argmax(1), matrix.shape[0])

    def __call__(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        picked = take(x, axis, self.units.to(x.device))
        if len(self.rows) == self.width:  # every merged unit fed: rows are 0 … width − 1
            return picked
        shape = list(x.shape)
        shape[axis] = self.width
        rows = self.rows.to(x.device)
        if axis % x.dim() == x.dim() - 1:
            return x.new_zeros(shape).scatter_(-1, rows.expand(*picked.shape[:-1], -1), picked)
        return x.new_zeros(shape).index_copy_(axis, rows, picked)


def take(x: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(axis, index)``, in ``x``'s own memory order (channels-last maps stay so).

    Copying whole runs of the axes stored after ``axis`` is fast; an index into
    the innermost axis is taken by ``gather``, as index_select copies there
    element by element, several times slower on the CPU (linear layers' units
    are last).  So a channels-last map's positions are read as whole rows of
    channels, not one channel at a time across its stride.
    """
    axis %= x.dim()
    order = sorted(range(x.dim()), key=lambda a: (-x.stride(a), a))  # outermost in memory first
    stored = x.permute(order)
    if order == list(range(x.dim())) or not stored.is_contiguous():
        return _take_stored(x, axis, index)
    return _take_stored(stored, order.index(axis), index).permute(sorted(range(x.dim()), key=order.__getitem__))


def _take_stored(x: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    if axis != x.dim() - 1:
        return x.index_select(axis, index)
    return x.gather(-1, index.expand(*x.shape[:-1], -1))


def selections_from_tuples(n: int, members: Sequence[torch.Tensor], width: int) -> tuple[torch.Tensor, ...]:
    """Selections for width ``width``: the first tuples merged, the rest kept apart, one unit per model each
    (every tuple kept apart adds N − 1 units).

    ``members[k][i]``: model k's unit in the i-th tuple, best first (two models: pairs).
    Layout: [merged | model 0's | model 1's | …].
    """
    models = len(members)
    if not n <= width <= models * n or (models * n - width) % (models - 1):
        raise ValueError(f"width {width} is not {n} + a multiple of {models - 1} in [{n}, {models * n}]")
    merged = (models * n - width) // (models - 1)
    apart = n - merged
    out = []
    for model, units in enumerate(members):
        selection = torch.zeros(width, n, dtype=torch.float64)
        selection[torch.arange(merged), units[:merged]] = 1
        selection[merged + model * apart + torch.arange(apart), units[merged:]] = 1
        out.append(selection)
    return tuple(out)


def selections_from_clusters(n: int, clusters: list[list[int]], models: int = 2) -> tuple[torch.Tensor, ...]:
    """Selections for merged units that each stand for a cluster of units (model k's offset by k·``n``).

    A cluster may hold several units of one model (ZipIt!): its merged feature
    is their mean, and a next layer's input column is the sum of theirs.
    """
    out = tuple(torch.zeros(len(clusters), n, dtype=torch.float64) for _ in range(models))
    for row, cluster in enumerate(sorted(clusters, key=min)):
        for unit in cluster:
            out[unit // n][row, unit % n] = 1
    return out


def per_head_selections(heads: tuple[torch.Tensor, torch.Tensor], within: torch.Tensor):
    """A head dim's selections per merged head: A's dims in place, B's dims moved to their partners.

    ``heads``: the heads' (P_A, P_B); ``within[i]``: B's dim for each of A's
    dims, in A's head i and the head it is paired with.  Heads kept apart read
    one model only, so the identity serves them.
    """
    p_a, p_b = heads
    eye = torch.eye(within.shape[1], dtype=torch.float64)
    q_a, q_b = eye.repeat(len(p_a), 1, 1), eye.repeat(len(p_a), 1, 1)
    for k in range(len(p_a)):
        if p_a[k].any() and p_b[k].any():
            q_b[k] = eye[within[int(p_a[k].argmax())]]
    return q_a, q_b


@dataclass
class Block:
    """Rows of a merged dense layer computed together, and the input units they read.

    ``None`` means all.  A-only rows never read B-only inputs (and back), so
    those cross blocks are neither fitted nor computed.
    """

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None


def row_blocks(maps: MergeMaps, out_dim: Dim, in_dim: Dim, model: int | None = None) -> list[Block]:
    """Split a dense layer's outputs by the models that feed them: [every model | A only | B only] for two.

    Rows that some models feed read only the inputs those models feed, so the
    blocks between the others are neither fitted nor computed.  ``model``: a
    separate head of that model, which reads only its model's units.
    """
    fed_in = [maps.participation(in_dim, m) > 0 for m in range(maps.models)]
    if model is not None:
        return [Block(None, _subset(fed_in[model]))]
    fed_out = torch.stack([maps.participation(out_dim, m) > 0 for m in range(maps.models)], dim=1)  # rows × models
    everyone = fed_out.all(1) | ~fed_out.any(1)
    blocks = [Block(_subset(everyone), None)]
    for pattern in sorted({tuple(row) for row in fed_out[~everyone].tolist()}, reverse=True):  # A's before B's
        rows = (fed_out == torch.tensor(pattern)).all(1)
        cols = functools.reduce(operator.or_, (fed for fed, feeds in zip(fed_in, pattern) if feeds))
        blocks.append(Block(_subset(rows), _subset(cols)))
    return [b for b in blocks if b.rows is None or len(b.rows)]


def _subset(mask: torch.Tensor) -> torch.Tensor | None:
    """Indices where ``mask`` holds, or None when it holds everywhere."""
    return None if bool(mask.all()) else mask.nonzero().flatten()
