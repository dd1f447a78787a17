"""Rules for norms: BatchNorm (a layer least squares refits), LayerNorm and RMSNorm (feature norms),
GroupNorm; as modules and as functions."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pleascc.passes.groups.analysis import FeatureNorm, Size
from pleascc.passes.groups.registry import Context, _is_param, _set_arg, rule
from pleascc.passes.layers import NormLayer
from pleascc.passes.spaces import Dim, Prod


@rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm(ctx: Context, node: fx.Node):
    m = ctx.module(node)
    dims = ctx.dims_of(node.args[0])
    chan = dims[1]
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, name, None) is not None:
            ctx.bind(f"{node.target}.{name}", [chan])
    if m.affine and m.track_running_stats:
        running = (f"{node.target}.running_mean", f"{node.target}.running_var", m.eps)
        ctx.layers.append(NormLayer(node=node.name, weight=f"{node.target}.weight", bias=f"{node.target}.bias",
                                    in_axis=1, in_dim=chan, out_axis=1, out_dim=chan, running=running))
    ctx.module_rewrites[node.target] = lambda mod, size: setattr(mod, "num_features", size(chan))
    return dims


@rule(F.batch_norm)
def _batch_norm_function(ctx: Context, node: fx.Node):
    """``F.batch_norm`` on parameters (timm's BatchNormAct2d traces to this)."""
    dims = ctx.dims_of(node.args[0])
    names = {}
    for index, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        param = ctx.arg(node, index, name)
        if isinstance(param, fx.Node):
            ctx.table.unify(dims[1], ctx.dims_of(param)[0], node.name)
            names[name] = param.target if _is_param(param) else None
    eps = ctx.arg(node, 7, "eps", 1e-5)
    if len(names) == 4 and all(names.values()):
        ctx.layers.append(NormLayer(node=node.name, weight=names["weight"], bias=names["bias"], in_axis=1,
                                    in_dim=dims[1], out_axis=1, out_dim=dims[1],
                                    running=(names["running_mean"], names["running_var"], eps)))
    return dims


@rule(nn.LayerNorm, nn.RMSNorm)
def _layer_norm_module(ctx: Context, node: fx.Node):
    m = ctx.module(node)
    dims = ctx.dims_of(node.args[0])
    normed = dims[len(dims) - len(m.normalized_shape):]
    names = {}
    for name in ("weight", "bias"):
        if getattr(m, name, None) is not None:
            ctx.bind(f"{node.target}.{name}", normed)
            names[name] = f"{node.target}.{name}"
    ctx.module_rewrites[node.target] = lambda mod, size: setattr(
        mod, "normalized_shape", tuple(size(d) for d in normed))
    if len(normed) == 1:
        kind = "rms" if isinstance(m, nn.RMSNorm) else "layer"
        ctx.feature_norms.append(FeatureNorm(node.name, normed[0], kind, names.get("weight"), names.get("bias"), m.eps))
    return dims


@rule(F.layer_norm, F.rms_norm)
def _layer_norm_function(ctx: Context, node: fx.Node):
    dims = ctx.dims_of(node.args[0])
    shape = ctx.arg(node, 1, "normalized_shape")
    normed = dims[len(dims) - len(shape):]
    rms = node.target is F.rms_norm
    params = {"weight": ctx.arg(node, 2, "weight"), "bias": None if rms else ctx.arg(node, 3, "bias")}
    for param in params.values():
        if isinstance(param, fx.Node):
            for d, pd in zip(normed, ctx.dims_of(param)):
                ctx.table.unify(d, pd, node.name)

    def rewrite(n: fx.Node, size: Size) -> None:
        _set_arg(n, 1, "normalized_shape", [size(d) for d in normed])

    ctx.node_rewrites[node.name] = rewrite
    if len(normed) == 1 and all(p is None or _is_param(p) for p in params.values()):
        eps = ctx.arg(node, 3, "eps") if rms else ctx.arg(node, 4, "eps", 1e-5)
        names = {k: p.target if p is not None else None for k, p in params.items()}
        ctx.feature_norms.append(FeatureNorm(node.name, normed[0], "rms" if rms else "layer",
                                             names["weight"], names["bias"], eps))
    return dims


@rule(nn.GroupNorm)
def _group_norm(ctx: Context, node: fx.Node):
    m = ctx.module(node)
    dims = ctx.dims_of(node.args[0])
    chan = dims[1]
    groups = _channel_groups(ctx, node, chan, m.num_groups)
    ctx.module_rewrites[node.target] = lambda mod, size: (
        setattr(mod, "num_channels", size(chan)), setattr(mod, "num_groups", size(groups) if groups is not None else 1))
    for name in ("weight", "bias"):
        if getattr(m, name, None) is not None:
            ctx.bind(f"{node.target}.{name}", [chan])
    return dims


@rule(F.group_norm)
def _group_norm_function(ctx: Context, node: fx.Node):
    dims = ctx.dims_of(node.args[0])
    chan = dims[1]
    groups = _channel_groups(ctx, node, chan, ctx.arg(node, 1, "num_groups"))
    for param in (ctx.arg(node, 2, "weight"), ctx.arg(node, 3, "bias")):
        if isinstance(param, fx.Node):
            ctx.table.unify(chan, ctx.dims_of(param)[0], node.name)
    if groups is not None:
        ctx.node_rewrites[node.name] = lambda n, size: _set_arg(n, 1, "num_groups", size(groups))
    return dims


def _channel_groups(ctx: Context, node: fx.Node, chan: Dim, num_groups: int) -> Dim | None:
    """The space counting a group norm's groups: split off the channels, or the channels themselves.

    Groups keep their size (the statistics stay per group), so the count
    changes with the width; None for a single group.
    """
    channels = ctx.table.size(chan)
    if 1 < num_groups < channels:
        groups = ctx.table.new(num_groups)
        ctx.table.unify(chan, Prod((groups, ctx.table.new(channels // num_groups, keep_width=True))), node.name)
        return groups
    return chan if num_groups > 1 else None
