"""The rule registry: ``rule`` files a function under module classes, functions or method names (``RULES``).

A rule gets the ``Context`` (input dims, shapes, modules, and ways to record
facts) and the fx node, and returns its output's dims.  The helpers here are
shared by rules of several op families.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx
import torch.nn as nn

from pleascc.passes.groups.analysis import FeatureNorm, Layer, ParamBinding
from pleascc.passes.spaces import Atom, Cat, Dim, Prod, SpaceTable

RULES: dict[Any, Callable] = {}


def rule(*keys):
    """Register a rule for module classes, functions, or method names (strings)."""

    def register(fn):
        for key in keys:
            RULES[key] = fn
        return fn

    return register


class Context:
    """What a rule sees: input dims, shapes, modules, and ways to record facts."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.table = SpaceTable()
        self.dims: dict[str, Any] = {}
        self.params: dict[str, ParamBinding] = {}
        self.layers: list[Layer] = []
        self.module_rewrites: dict[str, Callable] = {}
        self.node_rewrites: dict[str, Callable] = {}
        self.unsupported: list[str] = []
        self.output_roots: set[int] = set()
        self.feature_norms: list[FeatureNorm] = []
        self.products: list[list] = []
        self.sites: list[tuple] = []
        self.modules = dict(gm.named_modules())
        self.saved = set(gm.state_dict())  # learned tensors; the others are inputs the model computes for itself
        self.tied = _tied(gm)

    # ----- reading
    def dims_of(self, arg) -> Any:
        return self.dims.get(arg.name) if isinstance(arg, fx.Node) else None

    def shape(self, node: fx.Node) -> tuple | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if hasattr(meta, "shape") else None

    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[node.target]

    def arg(self, node: fx.Node, index: int, name: str, default=None):
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    # ----- recording
    def new_dims(self, shape, fixed: str | None = None) -> list:
        return [self.table.new(s, fixed) for s in shape]

    def bind(self, name: str, dims: list, roles: list | None = None) -> None:
        """Record a parameter's axes; a layer rule's roles override the "out" a get_attr assumed."""
        if name in self.params:  # a parameter used twice: both uses are one space
            for old, new in zip(self.params[name].dims, dims):
                self.table.unify(old, new, name)
            if roles is not None:
                self.params[name].roles = list(roles)
            return
        self.params[name] = ParamBinding(name, list(dims), list(roles or ["out"] * len(dims)))
        for other in self.tied.get(name, ()):  # one tensor under two names: its uses are one space too
            if other in self.params:
                for old, new in zip(self.params[other].dims, dims):
                    self.table.unify(old, new, f"{name} is {other}")

    def fix_inputs(self, node: fx.Node, reason: str) -> None:
        for arg in node.all_input_nodes:
            for dim in leaves(self.dims_of(arg)):
                self.table.fix(dim, reason)


def _tied(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Names of one tensor held by several modules (tied input and output embeddings): name -> the others."""
    names: dict[int, list[str]] = {}
    for name, t in (*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(name)
    return {name: [o for o in group if o != name] for group in names.values() if len(group) > 1 for name in group}


def leaves(dims) -> list:
    """All dims in a (possibly nested) output structure."""
    if dims is None:
        return []
    if isinstance(dims, (Atom, Cat, Prod)):
        return [dims]
    return [d for item in dims for d in leaves(item)]


def _getattr_path(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _is_param(arg) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def _set_arg(node: fx.Node, index: int, name: str, value) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _mixed_axis(ctx: Context, node: fx.Node, dim: Dim, out_size: int) -> Atom:
    """An axis whose positions an op mixes (a conv window, pooling, resizing) must stay in place.

    Image positions are fixed anyway; this catches a feature axis fed to such
    an op (CoaT's Conv1d runs along the channels).
    """
    ctx.table.fix(dim, f"positions mixed by {node.name}")
    return ctx.table.new(out_size, "spatial")
