"""Rules for axis bookkeeping: reshape/view/flatten, permute/transpose, (un)squeeze, expand, repeat/tile,
im2col and fold, unbind/stack, roll/flip, cat/split, and reading sizes."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pleascc.passes.groups.analysis import Size
from pleascc.passes.groups.registry import Context, _mixed_axis, rule
from pleascc.passes.spaces import Cat, Prod


@rule(torch.flatten, "flatten", nn.Flatten, torch.reshape, "reshape", "view", "reshape_as", "view_as")
def _reshape(ctx: Context, node: fx.Node):
    """Reshapes factor or merge axes; width arguments are rewritten."""
    dims = ctx.dims_of(node.args[0])
    in_shape, out_shape = ctx.shape(node.args[0]), ctx.shape(node)
    out = _reshape_dims(ctx, node, dims, in_shape, out_shape)
    if node.target in ("view", "reshape", torch.reshape):
        _record_shape_literals(ctx, node, out)
    elif node.target in ("reshape_as", "view_as"):
        for d, other in zip(out, ctx.dims_of(node.args[1])):
            ctx.table.unify(d, other, node.name)
    return out


def _reshape_dims(ctx: Context, node: fx.Node, dims: list, in_shape: tuple, out_shape: tuple) -> list:
    out: list = [None] * len(out_shape)
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        if i < len(in_shape) and in_shape[i] == 1:
            i += 1
            continue
        if j < len(out_shape) and out_shape[j] == 1:
            out[j] = ctx.table.new(1)
            j += 1
            continue
        i0, j0 = i, j
        pi, pj = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi, i = pi * in_shape[i], i + 1
            else:
                pj, j = pj * out_shape[j], j + 1
        ins = [d for d, s in zip(dims[i0:i], in_shape[i0:i]) if s != 1]
        if len(ins) == 1 and j - j0 == 1:
            out[j0] = ins[0]
        elif j - j0 == 1:
            out[j0] = Prod(tuple(ins))
        elif len(ins) == 1:
            parts = ctx.new_dims(out_shape[j0:j])
            ctx.table.unify(ins[0], Prod(tuple(parts)), node.name)
            out[j0:j] = parts
        else:
            reason = f"{node.name}: reshape mixes several axes into several axes"
            for d in ins:
                ctx.table.fix(d, reason)
            out[j0:j] = ctx.new_dims(out_shape[j0:j], reason)
    return out


def _record_shape_literals(ctx: Context, node: fx.Node, out: list) -> None:
    """Remember the shape arguments of a view/reshape/expand, to rewrite those whose width changes.

    An argument may be a literal or a size read at run time from another
    tensor (``B, N, C = x.shape``), which may belong to another space; both
    become the merged width.  -1 stays -1.
    """
    shape_args = node.args[1:] if isinstance(node.target, str) else node.args[1:2]
    original = [ctx.table.size(d) for d in out]
    if len(shape_args) == 1 and isinstance(shape_args[0], fx.Node):  # a shape computed in the graph
        ctx.node_rewrites[node.name] = lambda n, size: _computed_shape(n, out, original, size)
        return
    if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
        shape_args, packed = tuple(shape_args[0]), True
    else:
        packed = False
    if len(shape_args) != len(out):
        return

    def rewrite(n: fx.Node, size: Size) -> None:
        values = list(n.args[1] if packed else n.args[1:])
        for k, value in enumerate(values):
            if value != -1 and size(out[k]) != original[k]:
                values[k] = size(out[k])
        n.args = (n.args[0], tuple(values)) if packed else (n.args[0], *values)

    ctx.node_rewrites[node.name] = rewrite


def _computed_shape(node: fx.Node, out: list, original: list[int], size: Size) -> None:
    """A shape the graph computes (GPT-2's ``(-1,) + input_shape[1:] + (C,)``) gets the merged widths where they
    changed, by a node that replaces those entries when it runs."""
    widths = tuple((k, size(d)) for k, (d, n) in enumerate(zip(out, original)) if size(d) != n)
    if widths:
        with node.graph.inserting_before(node):
            shape = node.graph.call_function(with_widths, (node.args[1], widths))
        node.args = (node.args[0], shape, *node.args[2:])


def with_widths(shape, widths: tuple[tuple[int, int], ...]) -> tuple:
    """``shape`` (a sequence of sizes, or one size) with the entries at ``widths``' axes replaced."""
    values = [shape] if isinstance(shape, int) else list(shape)
    for axis, width in widths:
        values[axis] = width
    return tuple(values)


@rule(torch.permute, "permute")
def _permute(ctx: Context, node: fx.Node):
    dims = ctx.dims_of(node.args[0])
    order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
    order = order or ctx.arg(node, 1, "dims")
    return [dims[k] for k in order]


@rule(torch.transpose, "transpose")
def _transpose(ctx: Context, node: fx.Node):
    dims = list(ctx.dims_of(node.args[0]))
    a, b = (x % len(dims) for x in node.args[1:3])
    dims[a], dims[b] = dims[b], dims[a]
    return dims


@rule(torch.unsqueeze, "unsqueeze")
def _unsqueeze(ctx: Context, node: fx.Node):
    dims = list(ctx.dims_of(node.args[0]))
    axis = node.args[1] % (len(dims) + 1)
    return dims[:axis] + [ctx.table.new(1)] + dims[axis:]


@rule(torch.squeeze, "squeeze")
def _squeeze(ctx: Context, node: fx.Node):
    dims = ctx.dims_of(node.args[0])
    shape = ctx.shape(node.args[0])
    axes = ctx.arg(node, 1, "dim")
    axes = range(len(dims)) if axes is None else (axes if isinstance(axes, (tuple, list)) else (axes,))
    drop = {a % len(dims) for a in axes if shape[a % len(dims)] == 1}
    return [d for k, d in enumerate(dims) if k not in drop]


@rule("expand")
def _expand(ctx: Context, node: fx.Node):
    """Broadcast size-1 axes (a cls token over the batch); width literals are rewritten."""
    dims = ctx.dims_of(node.args[0])
    in_shape, out_shape = ctx.shape(node.args[0]), ctx.shape(node)
    new = len(out_shape) - len(in_shape)
    out = [ctx.table.new(s) if k < new or in_shape[k - new] != out_shape[k] else dims[k - new]
           for k, s in enumerate(out_shape)]
    _record_shape_literals(ctx, node, out)
    return out


@rule("expand_as")
def _expand_as(ctx: Context, node: fx.Node):
    """x.expand_as(other): axes x broadcasts take other's spaces (a gate over channels)."""
    dims, other = ctx.dims_of(node.args[0]), ctx.dims_of(node.args[1])
    in_shape, out_shape = ctx.shape(node.args[0]), ctx.shape(node)
    new = len(out_shape) - len(in_shape)
    return [other[k] if k < new or in_shape[k - new] != out_shape[k] else dims[k - new] for k in range(len(out_shape))]


@rule(torch.repeat_interleave, "repeat_interleave")
def _repeat_interleave(ctx: Context, node: fx.Node):
    """Each entry repeated r times along an axis: (units × r), so a permutation moves whole blocks of r.

    Repeats known only at run time (or per entry) leave that axis mixed;
    without an axis the input is flattened, so every axis is.
    """
    dims, shape = list(ctx.dims_of(node.args[0])), ctx.shape(node)
    repeats, dim = ctx.arg(node, 1, "repeats"), ctx.arg(node, 2, "dim")
    if dim is None:
        return [_mixed_axis(ctx, node, Prod(tuple(dims)), shape[0])]
    axis = dim % len(dims)
    if isinstance(repeats, int):
        dims[axis] = Prod((dims[axis], ctx.table.new(repeats, f"{node.name}: repeats")))
    else:
        dims[axis] = _mixed_axis(ctx, node, dims[axis], shape[axis])
    return dims


@rule("repeat", "tile", torch.tile)
def _tile(ctx: Context, node: fx.Node):
    """Whole copies of an axis, r times: (r × units), so every copy is permuted alike; leading new axes are fixed."""
    dims, shape = list(ctx.dims_of(node.args[0])), ctx.shape(node)
    reps = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list)) else node.args[1]
    reps = [1] * (len(dims) - len(reps)) + list(reps)
    out = ctx.new_dims(shape[:len(reps) - len(dims)], f"{node.name}: tiles")
    for dim, r, size in zip(dims, reps[len(reps) - len(dims):], shape[len(shape) - len(dims):]):
        if r == 1:
            out.append(dim)
        elif isinstance(r, int):
            out.append(Prod((ctx.table.new(r, f"{node.name}: tiles"), dim)))
        else:
            out.append(_mixed_axis(ctx, node, dim, size))
    return out


@rule(nn.Unfold, F.unfold)
def _im2col(ctx: Context, node: fx.Node):
    """(N, C, H, W) → (N, C·window, positions): each channel's window stays together, channel outer."""
    dims, shape = ctx.dims_of(node.args[0]), ctx.shape(node)
    for dim, size in zip(dims[2:], ctx.shape(node.args[0])[2:]):
        _mixed_axis(ctx, node, dim, size)
    window = ctx.table.new(shape[1] // ctx.shape(node.args[0])[1], f"{node.name}: window")
    return [dims[0], Prod((dims[1], window)), ctx.table.new(shape[2], "spatial")]


@rule(nn.Fold, F.fold)
def _col2im(ctx: Context, node: fx.Node):
    """(N, C·window, positions) → (N, C, H, W), im2col's inverse: channel outer, window inner, positions mixed."""
    dims, shape = ctx.dims_of(node.args[0]), ctx.shape(node)
    channels = ctx.table.new(shape[1])
    ctx.table.unify(dims[1], Prod((channels, ctx.table.new(ctx.shape(node.args[0])[1] // shape[1], "window"))),
                    node.name)
    ctx.table.fix(dims[2], f"positions mixed by {node.name}")
    return [dims[0], channels] + ctx.new_dims(shape[2:], "positions")


@rule("unfold")
def _unfold_windows(ctx: Context, node: fx.Node):
    """x.unfold(axis, size, step): sliding windows along an axis (which is therefore fixed), each a new last axis."""
    dims, shape = ctx.dims_of(node.args[0]), ctx.shape(node)
    axis = ctx.arg(node, 1, "dimension") % len(dims)
    out = list(dims)
    out[axis] = _mixed_axis(ctx, node, dims[axis], shape[axis])
    return out + [ctx.table.new(shape[-1], "window")]


@rule(torch.unbind, "unbind")
def _unbind(ctx: Context, node: fx.Node):
    """Each output is one index along the axis, which is therefore fixed."""
    dims = ctx.dims_of(node.args[0])
    axis = ctx.arg(node, 1, "dim", 0) % len(dims)
    ctx.table.fix(dims[axis], f"{node.name}: unbound")
    rest = dims[:axis] + dims[axis + 1:]
    return [list(rest) for _ in range(ctx.shape(node.args[0])[axis])]


@rule(torch.stack)
def _stack(ctx: Context, node: fx.Node):
    """Stacked tensors share every axis; the new axis indexes them."""
    tensors = ctx.arg(node, 0, "tensors")
    all_dims = [ctx.dims_of(t) for t in tensors]
    for dims in all_dims[1:]:
        for d0, d in zip(all_dims[0], dims):
            ctx.table.unify(d0, d, node.name)
    axis = ctx.arg(node, 1, "dim", 0) % (len(all_dims[0]) + 1)
    return all_dims[0][:axis] + [ctx.table.new(len(tensors), f"{node.name}: stacked")] + all_dims[0][axis:]


@rule(torch.roll, "roll")
def _roll(ctx: Context, node: fx.Node):
    """Rolled axes are shifted, so fixed; the others pass through."""
    return _fixed_along(ctx, node, ctx.arg(node, 2, "dims"), "rolled")


@rule(torch.flip, "flip")
def _flip(ctx: Context, node: fx.Node):
    """Flipped axes reverse their units' order, which no permutation of them commutes with: fixed; the others
    pass through.  ``x.flip(2, 3)`` passes its axes one by one."""
    axes = node.args[1:] if len(node.args) > 2 else ctx.arg(node, 1, "dims")
    return _fixed_along(ctx, node, axes, "flipped")


def _fixed_along(ctx: Context, node: fx.Node, axes, why: str) -> list:
    """The input's dims, those along ``axes`` (an int, a sequence, or None: all) fixed for ``why``."""
    dims = ctx.dims_of(node.args[0])
    axes = range(len(dims)) if axes is None else (axes if isinstance(axes, (tuple, list)) else (axes,))
    for a in axes:
        ctx.table.fix(dims[a], f"{node.name}: {why}")
    return dims


@rule(torch.cat, torch.concat, torch.concatenate)
def _cat(ctx: Context, node: fx.Node):
    """Concatenation makes an axis of segments; other axes are one space."""
    tensors = ctx.arg(node, 0, "tensors")
    axis = ctx.arg(node, 1, "dim", 0)
    all_dims = [ctx.dims_of(t) for t in tensors]
    rank = len(all_dims[0])
    axis %= rank
    out = list(all_dims[0])
    for dims in all_dims[1:]:
        for k in range(rank):
            if k != axis:
                ctx.table.unify(out[k], dims[k], node.name)
    out[axis] = Cat(tuple(d[axis] for d in all_dims))
    return out


@rule(torch.split, torch.chunk, "split", "chunk")
def _split(ctx: Context, node: fx.Node):
    """Splitting refines the axis into segments, one per output."""
    dims = ctx.dims_of(node.args[0])
    outputs = node.meta["tensor_meta"]
    axis = ctx.arg(node, 2, "dim", 0) % len(dims)
    parts = [ctx.table.new(m.shape[axis]) for m in outputs]
    ctx.table.unify(dims[axis], Cat(tuple(parts)), node.name)
    def rewrite(n: fx.Node, size: Size) -> None:
        # Always an explicit split: merged segments may no longer be equal chunks.
        n.target = torch.split if n.op == "call_function" else "split"
        n.args = (n.args[0], [size(p) for p in parts], axis)
        n.kwargs = {}

    ctx.node_rewrites[node.name] = rewrite
    return [dims[:axis] + [p] + dims[axis + 1:] for p in parts]


@rule(getattr, torch._assert, "dim")
def _metadata(ctx: Context, node: fx.Node):
    """Reading metadata (``x.shape``) defines no space; see ``_frozen_size`` for reading one size."""
    return None


@rule("size")
def _size(ctx: Context, node: fx.Node):
    axis = ctx.arg(node, 1, "dim")
    if axis is not None:
        _frozen_size(ctx, node, node.args[0], axis)
    return None


def _frozen_size(ctx: Context, node: fx.Node, tensor: fx.Node, axis: int) -> None:
    """A feature width read at run time (C in ``B, N, C = x.shape``) becomes its original value.

    Code computes from it what the merge keeps (head dim = C // heads, the
    softmax scale); reshapes whose widths change get their new widths from
    their own rewrite.  Sizes of fixed axes (batch, tokens) stay dynamic.
    """
    dims = ctx.dims_of(tensor)
    if dims is None:
        return
    dim, value = dims[axis], ctx.shape(tensor)[axis]

    def rewrite(n: fx.Node, size: Size) -> None:
        if ctx.table.is_fixed(dim):
            return
        for user in list(n.users):
            user.args = fx.node.map_aggregate(user.args, lambda a: value if a is n else a)
            user.kwargs = fx.node.map_aggregate(user.kwargs, lambda a: value if a is n else a)

    ctx.node_rewrites[node.name] = rewrite
