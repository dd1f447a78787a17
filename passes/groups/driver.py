"""``analyze``: one rule per node of the graph, in order, and what they record gathered into an ``Analysis``.

Placeholders, attributes and the output have their rules here; an op with
no rule in the registry fixes every space it touches and is reported
(``_unknown``).  Afterwards: the inner factors of product axes keep their
width, and head dims that may be permuted per head are found.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from pleascc.passes.groups.analysis import Analysis
from pleascc.passes.groups.registry import RULES, Context, _getattr_path, leaves
from pleascc.passes.spaces import Atom, Cat, Prod, SpaceTable


def analyze(gm: fx.GraphModule, example_inputs: tuple) -> Analysis:
    """Run the rules over ``gm`` (shapes from one forward pass on ``example_inputs``)."""
    ShapeProp(gm).propagate(*example_inputs)
    ctx = Context(gm)
    for node in gm.graph.nodes:
        ctx.dims[node.name] = _apply_rule(ctx, node)
    _keep_inner_factors(ctx.table, [d for b in ctx.params.values() for d in b.dims])
    nodes = {n.name: n for n in gm.graph.nodes}
    for layer in ctx.layers:
        layer.source = nodes[layer.node].args[0].name
    analysis = Analysis(
        table=ctx.table,
        node_dims=ctx.dims,
        params=ctx.params,
        layers=ctx.layers,
        module_rewrites=ctx.module_rewrites,
        node_rewrites=ctx.node_rewrites,
        unsupported=ctx.unsupported,
        output_roots=ctx.output_roots,
        shapes={n.name: ctx.shape(n) for n in gm.graph.nodes},
        feature_norms=ctx.feature_norms,
        products=ctx.products,
        sites=ctx.sites,
        per_head=per_head_spaces(ctx.table, [*_tensor_dims(ctx.dims)], [b.dims for b in ctx.params.values()]),
        batch=_input_batch(gm, ctx.dims),
    )
    for layer in analysis.layers:
        layer.batch_axis = analysis.batch_axis(layer.source)
    return analysis


def _input_batch(gm: fx.GraphModule, dims: dict[str, Any]) -> Atom | None:
    """The first input's first axis (the samples), if it is a tensor."""
    first = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    found = dims.get(first.name) if first is not None else None
    return found[0] if isinstance(found, list) and found else None


def _keep_inner_factors(table: SpaceTable, dims: list) -> None:
    """In a product axis only the outermost free factor widens (whole heads, whole groups).

    Widening two factors of one product would multiply the axis' width: two
    models side by side would be 4× as wide, not 2×.
    """
    for dim in dims:
        dim = table.resolve(dim)
        if isinstance(dim, Prod):
            free = [f for f in dim.factors if not table.is_fixed(f)]
            for inner in free[1:]:
                table.keep(inner)
            _keep_inner_factors(table, list(dim.factors))
        elif isinstance(dim, Cat):
            _keep_inner_factors(table, list(dim.parts))


def _apply_rule(ctx: Context, node: fx.Node):
    if node.op == "placeholder":
        shape = ctx.shape(node)
        return ctx.new_dims(shape, "model input") if shape is not None else None
    if node.op == "output":
        return _output(ctx, node)
    if node.op == "get_attr":
        return _get_attr(ctx, node)
    key = type(ctx.module(node)) if node.op == "call_module" else node.target
    fn = RULES.get(key)
    if fn is None:
        return _unknown(ctx, node, key)
    return fn(ctx, node)


def _describe_target(key) -> str:
    if isinstance(key, str):
        return f"method .{key}()"
    return getattr(key, "__module__", "") + "." + getattr(key, "__qualname__", str(key))


def _unknown(ctx: Context, node: fx.Node, key) -> Any:
    """No rule: every space the op touches is fixed, and the op is reported.

    A function of no tensor at all (a position grid built from sizes) is a
    constant: its fixed output spaces are all it needs, so it is not reported.
    """
    tensor_inputs = [a for a in node.all_input_nodes if ctx.dims_of(a) is not None]
    out = _fresh_outputs(ctx, node, f"{node.name}: no rule for {_describe_target(key)}")
    if tensor_inputs or (out is not None and node.op != "call_function"):
        reason = f"{node.name}: no rule for {_describe_target(key)}"
        ctx.fix_inputs(node, reason)
        ctx.unsupported.append(reason)
        if node.op == "call_module":
            for name, p in ctx.module(node).named_parameters(recurse=True):
                ctx.bind(f"{node.target}.{name}", ctx.new_dims(p.shape, reason))
    return out


def _fresh_outputs(ctx: Context, node: fx.Node, reason: str):
    """New fixed spaces for every tensor an op returns, in the nesting it returns them (an LSTM's (y, (h, c)))."""

    def fresh(meta):
        if hasattr(meta, "shape"):
            return ctx.new_dims(meta.shape, reason)
        if isinstance(meta, (tuple, list)):
            return [fresh(m) for m in meta]
        return None

    return fresh(node.meta.get("tensor_meta"))


def per_head_spaces(table: SpaceTable, activations: list[list], parameters: list[list]) -> dict[int, int]:
    """Head dims that may be permuted differently inside every head: inner root -> heads root.

    A head dim qualifies when every axis holding it is (heads × head dim) with
    one and the same heads space, or, in an activation, its own axis beside a
    heads axis (q as batch × heads × tokens × head dim).  A parameter holding it
    without the heads (a LayerNorm over the head dim, shared by all heads) ties
    the heads together: one permutation for all of them.
    """
    outers: dict[int, set[int]] = {}
    loose: list[tuple[int, set[int] | None]] = []  # (atom, the tensor's whole-axis atoms; None for parameters)

    def free(dim) -> bool:
        return isinstance(dim, Atom) and dim.id not in table.fixed

    def walk(dim, before, whole: set[int] | None) -> None:
        if isinstance(dim, Atom):
            if free(dim) and dim.id in table.keep_width and free(before):
                outers.setdefault(dim.id, set()).add(before.id)
            elif free(dim):
                loose.append((dim.id, whole if before is None else None))
            return
        children = dim.parts if isinstance(dim, Cat) else dim.factors
        for k, child in enumerate(children):
            walk(child, children[k - 1] if isinstance(dim, Prod) and k else False, None)

    for dims, is_param in [(d, False) for d in activations] + [(d, True) for d in parameters]:
        dims = [table.resolve(d) for d in dims]
        whole = None if is_param else {d.id for d in dims if isinstance(d, Atom)}
        for dim in dims:
            walk(dim, None, whole)
    per_head = {inner: next(iter(o)) for inner, o in outers.items() if len(o) == 1}
    for atom, whole in loose:
        if atom in per_head and (whole is None or per_head[atom] not in whole):
            del per_head[atom]
    return per_head


def _tensor_dims(dims):
    """Each tensor's list of axis dims in the rule results (outputs may nest tensors)."""
    if isinstance(dims, dict):
        for value in dims.values():
            yield from _tensor_dims(value)
    elif isinstance(dims, (list, tuple)) and dims:
        if any(isinstance(d, (Atom, Cat, Prod)) for d in dims):
            yield [d for d in dims if isinstance(d, (Atom, Cat, Prod))]
        else:
            for item in dims:
                yield from _tensor_dims(item)


def _output(ctx: Context, node: fx.Node):
    for arg in node.all_input_nodes:
        for dim in leaves(ctx.dims_of(arg)):
            ctx.table.fix(dim, "model output")
            ctx.output_roots.update(a.id for a in ctx.table.atoms(dim))
    return None


def _get_attr(ctx: Context, node: fx.Node):
    value = _getattr_path(ctx.gm, node.target)
    if not isinstance(value, torch.Tensor):
        return None
    if not value.is_floating_point():
        fixed = "integer buffer (indices)"
    elif node.target not in ctx.saved and not _uniform(value):
        fixed = "constant tensor (a non-persistent buffer, outside the state dict)"
    else:
        fixed = None
    dims = ctx.new_dims(value.shape, fixed)
    ctx.bind(node.target, dims)
    return dims


def _uniform(value: torch.Tensor) -> bool:
    """All entries equal (EVA's zero k-bias): no permutation or merge changes it, so it fixes nothing."""
    return value.numel() == 0 or bool((value == value.reshape(-1)[0]).all())
