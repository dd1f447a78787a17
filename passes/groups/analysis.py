"""What the analysis finds (``Analysis``: spaces, parameter bindings, layers, feature norms) and ways to read it.

``Layer`` (one class per kind of refittable layer) lives in ``passes.layers``; it is re-exported here.

``permutation_groups`` and ``coverage`` are what ``pleascc groups`` reports;
``random_permutations`` and ``permute_state`` permute a model's free spaces
(the invariance property).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from pleascc.passes.layers import Layer
from pleascc.passes.spaces import Atom, Cat, Dim, SpaceTable

Size = Callable[[Dim], int]  # a dim's width in the emitted model


@dataclass
class ParamBinding:
    """Which dim each axis of a parameter or buffer lives in.

    ``roles[k]`` is "out" where the axis holds features the tensor produces
    (rows of a weight, biases, norm parameters) and "in" where it reads them
    (input columns of a weight).
    """

    name: str
    dims: list
    roles: list


@dataclass
class FeatureNorm:
    """A LayerNorm/RMSNorm over one feature axis: it mixes the units it normalizes.

    Merged wider than one model, that axis holds A-only and B-only units,
    which each model's norm must not see; emit normalizes each model's view
    apart (see ``emit``), so budget 2.0 is the two models side by side.
    """

    node: str
    dim: Dim
    kind: str  # "layer" | "rms"
    weight: str | None
    bias: str | None
    eps: float | None


@dataclass
class Analysis:
    """The result of the pass: spaces plus everything later passes need."""

    table: SpaceTable
    node_dims: dict[str, Any]
    params: dict[str, ParamBinding]
    layers: list[Layer]
    module_rewrites: dict[str, Callable[[nn.Module, Size], None]]
    node_rewrites: dict[str, Callable[[fx.Node, Size], None]]
    unsupported: list[str]
    output_roots: set[int]
    shapes: dict[str, Any]
    feature_norms: list[FeatureNorm] = field(default_factory=list)
    products: list[list] = field(default_factory=list)  # activation×activation products: [*out dims, summed dim]
    sites: list[tuple] = field(default_factory=list)  # extra (node, axes, dims) where matching compares features
    per_head: dict[int, int] = field(default_factory=dict)  # inner root -> the factor whose units each permute it
    batch: Atom | None = None  # the model input's first axis: the samples

    def batch_axis(self, node: str) -> int | None:
        """The one axis of ``node``'s value that holds the samples (maybe folded with other axes), else None.

        Axes other than it and the units are within one sample (tokens), so
        reading a fixed subset of them reads the same rows however the samples
        are batched or sharded.
        """
        dims = self.node_dims.get(node)
        if self.batch is None or not isinstance(dims, list):
            return None
        batch = self.table.find(self.batch.id)
        axes = [k for k, dim in enumerate(dims)
                if dim is not None and any(atom.id == batch for atom in self.table.atoms(dim))]
        return axes[0] if len(axes) == 1 else None

    @property
    def example_batch(self) -> int:
        """Samples in the example the shapes were found on (the first input's axis 0): shapes ÷ it are per sample."""
        return self.shapes[next(iter(self.shapes))][0]

    def free_roots(self) -> list[int]:
        """Root atoms that may be permuted, in first-seen order."""
        seen: dict[int, None] = {}
        for binding in self.params.values():
            for dim in binding.dims:
                for atom in self.table.atoms(dim):
                    if atom.id not in self.table.fixed:
                        seen.setdefault(atom.id)
        return list(seen)

    def root_size(self, root: int) -> int:
        return self.table.size(Atom(root))


@dataclass
class Group:
    """One permutable space, as the `groups` report shows it."""

    root: int
    size: int
    fixed: str | None
    producers: list[str]
    consumers: list[str]
    structure: set[str] = field(default_factory=set)  # "axis", "segment", "factor", "per-group"


def permutation_groups(analysis: Analysis) -> list[Group]:
    """Group every parameter axis by its root space (free ones first)."""
    groups: dict[int, Group] = {}
    table = analysis.table
    for binding in analysis.params.values():
        for axis, (dim, role) in enumerate(zip(binding.dims, binding.roles)):
            for atom, place in _places(table, table.resolve(dim), "axis"):
                if table.size(atom) <= 1:
                    continue
                g = groups.setdefault(atom.id, Group(atom.id, table.size(atom), table.fixed.get(atom.id), [], []))
                g.structure.add("per-group" if atom.id in table.keep_width else place)
                entry = f"{binding.name}[{axis}]"
                target = g.producers if role == "out" else g.consumers
                if entry not in target:
                    target.append(entry)
    return sorted(groups.values(), key=lambda g: (g.fixed is not None, g.root))


def _places(table: SpaceTable, dim: Dim, place: str):
    """Each atom of a resolved dim with where it sits: a whole axis, a segment, or a factor."""
    if isinstance(dim, Atom):
        yield dim, place
        return
    inner = "segment" if isinstance(dim, Cat) else "factor"
    for child in (dim.parts if isinstance(dim, Cat) else dim.factors):
        yield from _places(table, child, inner)


def coverage(analysis: Analysis, model: nn.Module) -> float:
    """Share of parameters (by count) that live in at least one permutable space."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    covered = sum(
        sizes.get(name, 0)
        for name, b in analysis.params.items()
        if any(a.id not in analysis.table.fixed for d in b.dims for a in analysis.table.atoms(d))
    )
    return covered / max(1, sum(sizes.values()))


def random_permutations(analysis: Analysis, generator: torch.Generator) -> dict[int, torch.Tensor]:
    """A random permutation for every free space (used by the invariance property); head dims get one per head."""
    def perm(root: int) -> torch.Tensor:
        n = analysis.root_size(root)
        if root not in analysis.per_head:
            return torch.randperm(n, generator=generator)
        heads = analysis.root_size(analysis.per_head[root])
        return torch.stack([torch.randperm(n, generator=generator) for _ in range(heads)])

    return {r: perm(r) for r in analysis.free_roots()}


def permute_state(analysis: Analysis, state: dict[str, torch.Tensor], perms: dict[int, torch.Tensor]) -> dict:
    """Apply ``perms`` to every bound parameter and buffer in ``state``.  Axes no permutation moves stay as
    they are: a separate head's classes may differ in number from model A's, whose analysis this is."""
    out = dict(state)
    for name, binding in analysis.params.items():
        if name not in out:
            continue
        t = out[name]
        for axis, dim in enumerate(binding.dims):
            if analysis.table.permutes(dim, perms):
                t = t.index_select(axis, analysis.table.index(dim, perms))
        out[name] = t
    return out
