"""Rules for attention: ``F.scaled_dot_product_attention``, and asking matching to compare attention
operands along their head dims (``_observe_heads``, for attention written with ``@`` too)."""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from pleascc.passes.groups.elementwise import _broadcast_batch
from pleascc.passes.groups.registry import Context, rule


def _observe_heads(ctx: Context, operand: fx.Node, axis: int) -> None:
    """Ask matching to compare an attention operand along its head dim, with the heads axis before it."""
    dims = ctx.dims_of(operand)
    axes = (-3, axis) if len(dims) >= 4 else (axis,)
    ctx.sites.append((operand.name, axes, tuple(dims[a] for a in axes)))


@rule(F.scaled_dot_product_attention)
def _attention(ctx: Context, node: fx.Node):
    """softmax(q·kᵀ·scale)·v over (..., tokens, head dim): heads permute as units with v's head dim.

    q and k share their head dim; the head dims keep their width (the softmax
    scale is 1/√d); the heads axis and leading axes are shared by q, k, v.
    """
    q, k, v = (ctx.arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    dq, dk, dv = ctx.dims_of(q), ctx.dims_of(k), ctx.dims_of(v)
    ctx.table.unify(dq[-1], dk[-1], node.name)
    ctx.table.unify(dk[-2], dv[-2], node.name)
    ctx.table.keep(dq[-1])
    ctx.table.keep(dv[-1])
    lead = _broadcast_batch(ctx, node, [dq[:-2], dk[:-2], dv[:-2]],
                            [ctx.shape(q)[:-2], ctx.shape(k)[:-2], ctx.shape(v)[:-2]])
    mask = ctx.arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node) and ctx.shape(mask) is not None:  # broadcast against the scores (.., q, k tokens)
        scores = lead + [dq[-2], dk[-2]]
        _broadcast_batch(ctx, node, [scores, ctx.dims_of(mask)], [ctx.shape(node)[:-1] + (ctx.shape(k)[-2],),
                                                                  ctx.shape(mask)])
    ctx.products += [lead + [dq[-2], dk[-2], dq[-1]], lead + [dq[-2], dv[-1], dk[-2]]]  # q·kᵀ, then ·v
    for operand in (q, k, v):
        _observe_heads(ctx, operand, -1)
    return lead + [dq[-2], dv[-1]]
