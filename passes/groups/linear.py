"""Rules for layers: ``nn.Linear``, ``F.linear`` and GPT-2's ``Conv1D``, convolutions (grouped, depthwise, transposed,
weight-standardized), and ``@``/``matmul``/``bmm``.  Least squares refits the layers they record."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pleascc.passes.groups.analysis import Size
from pleascc.passes.groups.attention import _observe_heads
from pleascc.passes.groups.driver import _unknown
from pleascc.passes.groups.elementwise import _broadcast_batch
from pleascc.passes.groups.registry import Context, _getattr_path, _is_param, _mixed_axis, _set_arg, rule
from pleascc.passes.layers import ConvLayer, LinearLayer, TransposedLinearLayer
from pleascc.passes.opaque_ops import STANDARDIZED_CONVS, TRANSPOSED_LINEARS
from pleascc.passes.spaces import Dim, Prod


@rule(operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm")
def _matmul(ctx: Context, node: fx.Node):
    """a @ b: a's last axis and b's second-to-last are one space, summed over; batch axes broadcast.

    Between two activations the summed space keeps its width: a product of two
    features (attention scores q·k) is scaled for its length.
    """
    a, b = node.args[:2]
    dims_a, dims_b = ctx.dims_of(a), ctx.dims_of(b)
    if dims_a is None or dims_b is None or len(dims_a) < 2 or len(dims_b) < 2:
        return _unknown(ctx, node, node.target)
    ctx.table.unify(dims_a[-1], dims_b[-2], node.name)
    batch = _broadcast_batch(ctx, node, [dims_a[:-2], dims_b[:-2]],
                             [ctx.shape(a)[:-2], ctx.shape(b)[:-2]])
    out = batch + [dims_a[-2], dims_b[-1]]
    if not (_is_param(a) or _is_param(b)):
        ctx.table.keep(dims_a[-1])
        ctx.products.append(out + [dims_a[-1]])
        _observe_heads(ctx, a, -1)
        _observe_heads(ctx, b, -2)
    return out


@rule(nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
def _linear_module(ctx: Context, node: fx.Node):
    return _linear(ctx, node, node.args[0], f"{node.target}.weight",
                   f"{node.target}.bias" if ctx.module(node).bias is not None else None)


@rule(*TRANSPOSED_LINEARS)
def _transposed_linear_module(ctx: Context, node: fx.Node):
    """GPT-2's ``Conv1D``: a Linear whose weight is stored (in, out)."""
    return _linear(ctx, node, node.args[0], f"{node.target}.weight",
                   f"{node.target}.bias" if ctx.module(node).bias is not None else None, transposed=True)


@rule(F.linear)
def _linear_function(ctx: Context, node: fx.Node):
    """``F.linear`` on a parameter; a bias computed in the graph (EVA, BEiT) is one space with the rows."""
    weight, bias = ctx.arg(node, 1, "weight"), ctx.arg(node, 2, "bias")
    if not _is_param(weight):
        return _unknown(ctx, node, F.linear)
    if bias is None or _is_param(bias):
        return _linear(ctx, node, node.args[0], weight.target, bias.target if bias is not None else None)
    dims = ctx.dims_of(node.args[0])
    out = ctx.table.new(ctx.shape(node)[-1])
    ctx.bind(weight.target, [out, dims[-1]], ["out", "in"])
    ctx.table.unify(out, ctx.dims_of(bias)[-1], node.name)
    return dims[:-1] + [out]  # not refitted: least squares would need the computed bias


def _linear(ctx: Context, node: fx.Node, x: fx.Node, weight: str, bias: str | None, transposed: bool = False):
    dims = ctx.dims_of(x)
    w = _getattr_path(ctx.gm, weight)
    out = ctx.table.new(w.shape[1 if transposed else 0])
    if transposed:
        ctx.bind(weight, [dims[-1], out], ["in", "out"])
    else:
        ctx.bind(weight, [out, dims[-1]], ["out", "in"])
    if bias is not None:
        ctx.bind(bias, [out])
    kind = TransposedLinearLayer if transposed else LinearLayer
    ctx.layers.append(kind(node=node.name, weight=weight, bias=bias, in_axis=-1, in_dim=dims[-1], out_axis=-1,
                           out_dim=out))
    if node.op == "call_module":
        names = ("nx", "nf") if transposed else ("in_features", "out_features")  # Conv1D's, Linear's
        ctx.module_rewrites[node.target] = lambda m, size: _resize_linear(m, names, size(dims[-1]), size(out))
    return dims[:-1] + [out]


def _resize_linear(module: nn.Module, names: tuple[str, str], in_size: int, out_size: int) -> None:
    setattr(module, names[0], in_size)
    setattr(module, names[1], out_size)


def _conv_channels(ctx: Context, node: fx.Node, chan: Dim, m: nn.Module) -> tuple[Dim, Dim | None, Dim, Dim]:
    """A convolution's input units per group, group count, output channels and output units per group.

    Grouped ones split channels into (groups × per group) spaces; only the
    group count may widen, so groups stay whole.
    """
    if m.groups == 1:
        out = ctx.table.new(m.out_channels)
        return chan, None, out, out
    in_group = ctx.table.new(m.in_channels // m.groups, keep_width=True)
    groups_dim = ctx.table.new(m.groups)
    ctx.table.unify(chan, Prod((groups_dim, in_group)), node.name)
    out_group = ctx.table.new(m.out_channels // m.groups, keep_width=True)
    return in_group, groups_dim, Prod((groups_dim, out_group)), out_group


def _conv_layer(ctx: Context, node: fx.Node, m: nn.Module, dims: list, out: Dim, groups_dim: Dim | None,
                refit: bool) -> list:
    """Record a convolution (weight already bound) as a layer; its output's positions are new unless pointwise."""
    if m.bias is not None:
        ctx.bind(f"{node.target}.bias", [out])
    conv = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation)
    ctx.layers.append(ConvLayer(node=node.name, weight=f"{node.target}.weight",
                                bias=f"{node.target}.bias" if m.bias is not None else None,
                                in_axis=1, in_dim=dims[1], out_axis=1, out_dim=out, groups_dim=groups_dim, conv=conv,
                                refit=refit))
    ctx.module_rewrites[node.target] = lambda mod, size: _resize_conv(mod, size, dims[1], out, groups_dim)
    spatial = [d if _pointwise(m, a) else _mixed_axis(ctx, node, d, size)
               for a, (d, size) in enumerate(zip(dims[2:], ctx.shape(node)[2:]))]
    return [dims[0], out, *spatial]


@rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(ctx: Context, node: fx.Node, refit: bool = True):
    """Convolutions: weight (out, in/groups, k…)."""
    m = ctx.module(node)
    dims = ctx.dims_of(node.args[0])
    in_group, groups_dim, out, _ = _conv_channels(ctx, node, dims[1], m)
    kernel = ctx.new_dims(m.weight.shape[2:], "kernel")
    ctx.bind(f"{node.target}.weight", [out, in_group, *kernel], ["out", "in"] + ["out"] * len(kernel))
    return _conv_layer(ctx, node, m, dims, out, groups_dim, refit)


@rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose(ctx: Context, node: fx.Node):
    """Transposed convolutions (learned upsampling): weight (in, out/groups, k…), a convolution's axes swapped.

    Counted and permuted like a convolution; merged by their permuted average,
    not refitted, since least squares builds its rows by im2col, which has no
    transposed counterpart here.  Grouped, axis 0 holds the groups, which the
    outputs follow: it is averaged like an output axis (its units per group
    keep their width, so they are always merged).
    """
    m = ctx.module(node)
    if len(node.args) > 1 or node.kwargs:  # an output_size argument
        return _unknown(ctx, node, type(m))
    dims = ctx.dims_of(node.args[0])
    _, groups_dim, out, out_group = _conv_channels(ctx, node, dims[1], m)
    kernel = ctx.new_dims(m.weight.shape[2:], "kernel")
    roles = ["in" if groups_dim is None else "out", "out"] + ["out"] * len(kernel)
    ctx.bind(f"{node.target}.weight", [dims[1], out_group, *kernel], roles)
    return _conv_layer(ctx, node, m, dims, out, groups_dim, refit=False)


@rule(F.conv1d, F.conv2d, F.conv3d)
def _depthwise_conv_function(ctx: Context, node: fx.Node):
    """``F.conv2d(x, w, groups=C)`` with a fixed per-channel filter ``w`` (C, 1, k…), as in BlurPool.

    Channels pass through one to one, so they stay one space; the filter's
    rows permute with them and the group count is rewritten to the new width.
    Other functional convolutions have no rule.
    """
    weight, groups = ctx.arg(node, 1, "weight"), ctx.arg(node, 6, "groups", 1)
    dims, shape = ctx.dims_of(node.args[0]), ctx.shape(node.args[0])
    if not (_is_param(weight) and ctx.arg(node, 2, "bias") is None and groups == shape[1]
            and _getattr_path(ctx.gm, weight.target).shape[:2] == (groups, 1)):
        return _unknown(ctx, node, node.target)
    kernel = ctx.new_dims(_getattr_path(ctx.gm, weight.target).shape[2:], "kernel")
    ctx.bind(weight.target, [dims[1], ctx.table.new(1), *kernel])
    ctx.node_rewrites[node.name] = lambda n, size: _set_arg(n, 6, "groups", size(dims[1]))
    spatial = [_mixed_axis(ctx, node, d, size) for d, size in zip(dims[2:], ctx.shape(node)[2:])]
    return [dims[0], dims[1], *spatial]


@rule(*STANDARDIZED_CONVS)
def _standardized_conv(ctx: Context, node: fx.Node):
    """Weight-standardized convolutions (timm's StdConv2d, NFNet's ScaledStdConv2d), kept whole by the tracer.

    A filter's standardization ignores the order of its inputs, so they permute
    like any convolution (the gain with the filters), but its statistics (and
    NFNet's fan-in scale) change with their number: the input channels keep
    their width.  Merged by their permuted average, not refitted, since forward
    re-standardizes whatever least squares would fit.
    """
    in_channels = ctx.shape(node.args[0])[1]
    ctx.table.unify(ctx.dims_of(node.args[0])[1], ctx.table.new(in_channels, keep_width=True), node.name)
    dims = _conv(ctx, node, refit=False)
    if getattr(ctx.module(node), "gain", None) is not None:
        ctx.bind(f"{node.target}.gain", [dims[1], *ctx.new_dims((1, 1, 1))])
    return dims


def _pointwise(conv: nn.Module, axis: int) -> bool:
    """A 1-wide kernel with stride 1 and no padding maps each position to itself."""
    padding = 0 if isinstance(conv.padding, str) else conv.padding[axis]  # "same"/"valid" pad 0 at kernel 1
    return conv.kernel_size[axis] == 1 and conv.stride[axis] == 1 and padding == 0


def _resize_conv(module, size: Size, in_dim: Dim, out_dim: Dim, groups_dim: Dim | None) -> None:
    module.in_channels, module.out_channels = size(in_dim), size(out_dim)
    module.groups = size(groups_dim) if groups_dim is not None else 1
