"""Rules for ops that pool or reduce: pooling and interpolation (positions mixed, channels kept),
mean/sum/amax/amin, max/min, vector norms."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pleascc.passes.groups.elementwise import _elementwise
from pleascc.passes.groups.registry import Context, _mixed_axis, rule
from pleascc.passes.opaque_ops import library_classes


@rule(
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate,
    *library_classes("timm.layers.pool2d_same", "MaxPool2dSame", "AvgPool2dSame"),  # padded to "same" first
)
def _pool(ctx: Context, node: fx.Node):
    """Channels-first spatial ops: batch and channel pass through, spatial axes are new."""
    dims = ctx.dims_of(node.args[0])
    return dims[:2] + [_mixed_axis(ctx, node, d, n) for d, n in zip(dims[2:], ctx.shape(node)[2:])]


@rule(torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin")
def _reduce(ctx: Context, node: fx.Node):
    """Reductions: reduced axes disappear (or become size 1), the rest pass through."""
    return _reduced(ctx, ctx.dims_of(node.args[0]), ctx.arg(node, 1, "dim"), ctx.arg(node, 2, "keepdim", False))


@rule(torch.max, torch.min, "max", "min")
def _extremum(ctx: Context, node: fx.Node):
    """max/min over an axis: (values, indices), both reduced; over everything: a scalar; of two tensors: elementwise.

    The indices of a maximum over channels would name units, so that axis is fixed.
    """
    other = ctx.arg(node, 1, "dim")
    if isinstance(other, fx.Node):
        return _elementwise(ctx, node)
    dims = ctx.dims_of(node.args[0])
    if other is None:
        return []
    ctx.table.fix(dims[other % len(dims)], f"{node.name}: arg-extremum indices")
    reduced = _reduced(ctx, dims, other, ctx.arg(node, 2, "keepdim", False))
    return [reduced, list(reduced)]


@rule(torch.norm, torch.linalg.vector_norm, "norm")
def _vector_norm(ctx: Context, node: fx.Node):
    """A p-norm over axes is a reduction: its value does not depend on the order of the units."""
    return _reduced(ctx, ctx.dims_of(node.args[0]), ctx.arg(node, 2, "dim"), ctx.arg(node, 3, "keepdim", False))


def _reduced(ctx: Context, dims: list, axes, keepdim: bool) -> list:
    if axes is None:
        return []
    axes = {a % len(dims) for a in (axes if isinstance(axes, (tuple, list)) else (axes,))}
    return [ctx.table.new(1) if k in axes else d for k, d in enumerate(dims) if keepdim or k not in axes]
