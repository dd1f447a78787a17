"""Rules for functions libraries hide from tracing: torchvision Swin's, timm's (windows, grids,
resampling), ``grid_offsets`` (ConViT's offsets), and ``tokens_mask`` and ``attention_bias`` (transformers' padding
and attention masks), from ``opaque_ops``."""

from __future__ import annotations

import torch.fx as fx
from torchvision.models import swin_transformer as swin

from pleascc.passes.groups.analysis import Size
from pleascc.passes.groups.reductions import _pool
from pleascc.passes.groups.registry import RULES, Context, _mixed_axis, _set_arg, rule
from pleascc.passes.opaque_ops import attention_bias, grid_offsets, timm_registrations, tokens_mask
from pleascc.passes.spaces import Cat, Prod


@rule(swin._patch_merging_pad)
def _patch_merging(ctx: Context, node: fx.Node):
    """(…, H, W, C) → (…, H/2, W/2, 4C): the four 2×2 neighbours' channels, concatenated."""
    dims = ctx.dims_of(node.args[0])
    chan = dims[-1]
    return dims[:-3] + [_mixed_axis(ctx, node, d, n) for d, n in zip(dims[-3:-1], ctx.shape(node)[-3:-1])] + [
        Cat((chan,) * 4)]


@rule(swin._get_relative_position_bias)
def _relative_position_bias(ctx: Context, node: fx.Node):
    """A (positions, heads) table gathered into (1, heads, tokens, tokens)."""
    table = ctx.dims_of(node.args[0])
    ctx.table.fix(table[0], f"{node.name}: relative positions")
    _, _, n, m = ctx.shape(node)
    return [ctx.table.new(1), table[1]] + ctx.new_dims((n, m), "tokens")


@rule(swin.shifted_window_attention)
def _shifted_window_attention(ctx: Context, node: fx.Node):
    """torchvision's Swin attention: the channels are (heads × head dim), read by qkv and written by proj.

    It splits its input's width into heads itself (head dim = C / num_heads), so
    the residual stream is that product; qkv and proj live inside the function
    and are merged by their permuted average, not refitted.
    """
    names = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
             "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale")
    args = {name: ctx.arg(node, k, name) for k, name in enumerate(names)}
    dims = ctx.dims_of(args["input"])
    heads = ctx.table.new(args["num_heads"])
    head_dim = ctx.table.new(ctx.shape(args["input"])[-1] // args["num_heads"], keep_width=True)
    ctx.table.unify(dims[-1], Prod((heads, head_dim)), node.name)
    qkv_rows = Prod((ctx.table.new(3, f"{node.name}: q, k, v"), heads, head_dim))
    out = ctx.table.new(ctx.shape(node)[-1])
    expected = {"qkv_weight": [qkv_rows, dims[-1]], "proj_weight": [out, dims[-1]], "qkv_bias": [qkv_rows],
                "proj_bias": [out], "relative_position_bias": [None, heads, None, None], "logit_scale": [heads]}
    for name, want in expected.items():
        got = ctx.dims_of(args[name])
        for d, w in zip(got or [], want):
            if w is not None and ctx.table.size(d) > 1:
                ctx.table.unify(d, w, node.name)

    def rewrite(n: fx.Node, size: Size) -> None:
        _set_arg(n, 5, "num_heads", size(heads))

    ctx.node_rewrites[node.name] = rewrite
    return dims[:-1] + [out]


def _channels_last_passthrough(ctx: Context, node: fx.Node):
    """Mixes the leading axes (which stay in place) and keeps the last, channels: timm's windows, resampling."""
    dims = ctx.dims_of(node.args[0])
    for dim in dims[:-1]:
        ctx.table.fix(dim, f"positions mixed by {node.name}")
    return ctx.new_dims(ctx.shape(node)[:-1], "positions") + [dims[-1]]


def _channels_first_passthrough(ctx: Context, node: fx.Node):
    """Mixes every axis but the channels (axis 1): timm's NCHW window and grid reversal."""
    dims, shape = ctx.dims_of(node.args[0]), ctx.shape(node)
    for dim in dims[:1] + dims[2:]:
        ctx.table.fix(dim, f"positions mixed by {node.name}")
    return [ctx.table.new(shape[0], "positions"), dims[1]] + ctx.new_dims(shape[2:], "positions")


# timm's functions hidden from fx; CrossViT's scale_image resizes or crops an image, a spatial op like pooling
_TIMM_FUNCTIONS = {"window_reverse": _channels_last_passthrough, "window_partition": _channels_last_passthrough,
                   "grid_reverse": _channels_last_passthrough, "deblockify": _channels_last_passthrough,
                   "window_reverse_nchw": _channels_first_passthrough,
                   "grid_reverse_nchw": _channels_first_passthrough, "scale_image": _pool,
                   "resample_abs_pos_embed": _channels_last_passthrough}


for _fn in timm_registrations()[1]:
    if _fn.__name__ in _TIMM_FUNCTIONS:
        RULES[_fn] = _TIMM_FUNCTIONS[_fn.__name__]


@rule(grid_offsets)
def _token_grid(ctx: Context, node: fx.Node):
    """Offsets between token positions: axes of positions and of (dx, dy, d²), none a feature space."""
    return ctx.new_dims(ctx.shape(node), f"{node.name}: token offsets")


@rule(attention_bias)
def _attention_bias(ctx: Context, node: fx.Node):
    """(N, 1, T, T) from the embeddings' batch and token count and the (N, T) padding mask: no feature axis.

    Its token axes are new (a causal mask does not commute with reordering
    tokens); the batch is the embeddings' and the padding mask's.
    """
    embeds, padding = ctx.dims_of(node.args[0]), ctx.dims_of(ctx.arg(node, 1, "padding"))
    if padding is not None:
        ctx.table.unify(embeds[0], padding[0], node.name)
        ctx.table.fix(padding[1], f"{node.name}: padded tokens")
    ctx.table.fix(embeds[1], f"{node.name}: tokens")
    tokens = ctx.shape(node)[-1]
    return [embeds[0], ctx.table.new(1), *ctx.new_dims((tokens, tokens), f"{node.name}: tokens")]


@rule(tokens_mask)
def _tokens_mask(ctx: Context, node: fx.Node):
    """(N, T) over the ids' samples and tokens: the given mask's axes, which it passes through."""
    ids, mask = ctx.dims_of(node.args[0]), ctx.dims_of(ctx.arg(node, 1, "mask"))
    for k, dim in enumerate(mask or []):
        ctx.table.unify(ids[k], dim, node.name)
    return ids[:2]
