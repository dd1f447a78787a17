"""Rules for indexing and padding: ``x[...]`` (slices, one gather) and elements of tuples, ``gather``,
embedding tables gathered by ids, ``F.pad`` and the padding modules."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pleascc.passes.groups.analysis import Size
from pleascc.passes.groups.driver import _unknown
from pleascc.passes.groups.registry import Context, _getattr_path, _is_param, _set_arg, rule
from pleascc.passes.groups.shape import _frozen_size
from pleascc.passes.spaces import Cat


@rule(operator.getitem)
def _getitem(ctx: Context, node: fx.Node):
    source, index = node.args
    dims = ctx.dims_of(source)
    if _reads_shape(source) and isinstance(index, int):
        _frozen_size(ctx, node, source.args[0], index)
    if dims is None:
        return None
    if dims and (dims[0] is None or isinstance(dims[0], list)):  # an element of a tuple (split, chunk, a leaf)
        return dims[index]
    return _index_tensor(ctx, node, dims, index)


def _index_tensor(ctx: Context, node: fx.Node, dims: list, index):
    """Indexing: full slices keep a space, anything else touching it fixes it.

    One integer index tensor (a gather, as in relative position biases) or
    one list of positions (a fixed reordering, as CSATv2's zigzag) is allowed:
    its axis is fixed and replaced by the index's axes.
    """
    index = index if isinstance(index, tuple) else (index,)
    gathers = [i for i in index if isinstance(i, (fx.Node, list))]
    if len(gathers) > 1 or any(isinstance(i, torch.Tensor) for i in index) or not all(map(_positions, gathers)):
        return _unknown(ctx, node, "advanced indexing")
    if Ellipsis in index:
        k = index.index(Ellipsis)
        fill = len(dims) - (len(index) - 1 - sum(i is None for i in index))
        index = index[:k] + (slice(None),) * fill + index[k + 1:]
    out, k = [], 0
    out_shape = ctx.shape(node)
    for item in index:
        if item is None:
            out.append(ctx.table.new(1))
            continue
        dim = dims[k]
        k += 1
        if isinstance(item, slice) and item == slice(None):
            out.append(dim)
            continue
        ctx.table.fix(dim, f"{node.name}: indexed by {item!r}")
        if isinstance(item, slice):
            out.append(ctx.table.new(out_shape[len(out)], "indexed"))
        elif isinstance(item, list):
            out.append(ctx.table.new(len(item), "indexed"))
        elif isinstance(item, fx.Node):  # the index's own axes, whose order the gather keeps
            for d in ctx.dims_of(item):
                ctx.table.fix(d, f"{node.name}: gather index")
                out.append(d)
    out.extend(dims[k:])
    return out


def _positions(index) -> bool:
    """An integer index tensor or a list of ints (not a boolean mask)."""
    if isinstance(index, list):
        return all(isinstance(i, int) for i in index)
    return _dtype(index) in (torch.int64, torch.int32)


def _reads_shape(node) -> bool:
    """``x.shape`` or ``x.size()``."""
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target is getattr and node.args[1] == "shape")
        or (node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs))


def _dtype(node: fx.Node):
    return getattr(node.meta.get("tensor_meta"), "dtype", None)


@rule(torch.gather, "gather")
def _gather(ctx: Context, node: fx.Node):
    """``x.gather(dim, index)``: along ``dim`` the index's values name x's units, so that axis of x is fixed and
    the output's is the index's; the other axes are x's and the index's, one space where their sizes agree
    (else the index reads a prefix of x's axis, which is fixed)."""
    x, index = node.args[0], ctx.arg(node, 2, "index")
    dims_x, dims_i, shape_x, shape_i = ctx.dims_of(x), ctx.dims_of(index), ctx.shape(x), ctx.shape(index)
    axis = ctx.arg(node, 1, "dim") % len(dims_x)
    out = list(dims_i)
    for k, dim in enumerate(dims_x):
        if k != axis and shape_x[k] == shape_i[k]:
            ctx.table.unify(dim, dims_i[k], node.name)
        else:
            ctx.table.fix(dim, f"{node.name}: gathered")
    return out


@rule(nn.Embedding)
def _embedding_module(ctx: Context, node: fx.Node):
    m = ctx.module(node)
    if m.max_norm is not None:  # renormalizes rows in place: left to _unknown
        return _unknown(ctx, node, type(m))
    out = _embedding(ctx, node, node.args[0], f"{node.target}.weight")
    ctx.module_rewrites[node.target] = lambda mod, size: setattr(mod, "embedding_dim", size(out[-1]))
    return out


@rule(F.embedding)
def _embedding_function(ctx: Context, node: fx.Node):
    weight = ctx.arg(node, 1, "weight")
    if not _is_param(weight) or ctx.arg(node, 3, "max_norm") is not None:
        return _unknown(ctx, node, F.embedding)
    return _embedding(ctx, node, node.args[0], weight.target)


def _embedding(ctx: Context, node: fx.Node, ids: fx.Node, weight: str) -> list:
    """A (vocabulary × width) table gathered by ids: the ids' axes, then the width, a space of its own.

    The ids name the table's rows, so the vocabulary stays fixed; the width
    is the features the table produces (token, position or type embeddings).
    """
    rows, width = _getattr_path(ctx.gm, weight).shape
    vocab = ctx.table.new(rows, f"{node.name}: vocabulary (rows named by ids)")
    out = ctx.table.new(width)
    ctx.bind(weight, [vocab, out])
    return list(ctx.dims_of(ids)) + [out]


@rule(F.pad)
def _pad(ctx: Context, node: fx.Node):
    """Constant padding of a channel axis adds zero segments, which any permutation keeps."""
    dims = list(ctx.dims_of(node.args[0]))
    pads = list(ctx.arg(node, 1, "pad"))
    mode = ctx.arg(node, 2, "mode", "constant")
    shape = ctx.shape(node)
    segments: dict[int, tuple] = {}
    for p in range(len(pads) // 2):
        axis = len(dims) - 1 - p
        lo, hi = pads[2 * p], pads[2 * p + 1]
        computed = not (isinstance(lo, int) and isinstance(hi, int))  # amounts known only at run time
        if not computed and lo == hi == 0:
            continue
        if computed or ctx.table.is_fixed(dims[axis]) or mode != "constant" or lo < 0 or hi < 0:
            ctx.table.fix(dims[axis], f"{node.name}: padded")
            dims[axis] = ctx.table.new(shape[axis], "padded")
            continue
        parts = [ctx.table.new(lo)] if lo else []
        parts.append(dims[axis])
        parts += [ctx.table.new(hi)] if hi else []
        segments[p] = (parts[0] if lo else None, parts[-1] if hi else None)
        dims[axis] = Cat(tuple(parts))
    if segments:

        def rewrite(n: fx.Node, size: Size) -> None:
            new = list(pads)
            for p, (lo_dim, hi_dim) in segments.items():
                new[2 * p] = size(lo_dim) if lo_dim is not None else 0
                new[2 * p + 1] = size(hi_dim) if hi_dim is not None else 0
            _set_arg(n, 1, "pad", tuple(new))

        ctx.node_rewrites[node.name] = rewrite
    return dims


@rule(nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
      nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
      nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
def _pad_module(ctx: Context, node: fx.Node):
    """Padding modules pad trailing (spatial) axes: each padded axis becomes a new, fixed one."""
    dims = list(ctx.dims_of(node.args[0]))
    padding = ctx.module(node).padding
    for p in range(len(padding) // 2):
        if padding[2 * p] or padding[2 * p + 1]:
            axis = len(dims) - 1 - p
            ctx.table.fix(dims[axis], f"{node.name}: padded")
            dims[axis] = ctx.table.new(ctx.shape(node)[axis], "padded")
    return dims
