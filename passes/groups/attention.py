"""Rules for attention: ``F.scaled_dot_product_attention``, and asking matching to compare attention
operands along their head dims (``_observe_heads``, for attention written with ``@`` too)."""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from pleascc.passes.groups.elementwise import _broadcast_batch
from pleascc.passes.groups.registry import Context, rule
from pleascc.passes.spaces import Prod


def _observe_heads(ctx: Context, operand: fx.Node, axis: int) -> None:
    """Ask matching to compare an attention operand along its head dim, with the heads axis before it.

    Its other axes become samples, so they must be fixed: pooled over a
    permutable axis (v's head dim, where ``attn @ v`` sums tokens), A's
    samples would not line up with B's.
    """
    dims = ctx.dims_of(operand)
    axes = tuple(a % len(dims) for a in ((-3, axis) if len(dims) >= 4 else (axis,)))
    if all(ctx.table.is_fixed(d) for k, d in enumerate(dims) if k not in axes):
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
    shapes = [ctx.shape(q)[:-2], ctx.shape(k)[:-2], ctx.shape(v)[:-2]]
    if ctx.arg(node, 7, "enable_gqa", False) and shapes[0][-1] != shapes[1][-1]:
        dk, dv, shapes = _grouped_heads(ctx, node, dq, dk, dv, shapes)
    lead = _broadcast_batch(ctx, node, [dq[:-2], dk[:-2], dv[:-2]], shapes)
    mask = ctx.arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node) and ctx.shape(mask) is not None:  # broadcast against the scores (.., q, k tokens)
        scores = lead + [dq[-2], dk[-2]]
        _broadcast_batch(ctx, node, [scores, ctx.dims_of(mask)], [ctx.shape(node)[:-1] + (ctx.shape(k)[-2],),
                                                                  ctx.shape(mask)])
    ctx.products += [lead + [dq[-2], dk[-2], dq[-1]], lead + [dq[-2], dv[-1], dk[-2]]]  # q·kᵀ, then ·v
    for operand in (q, k, v):
        _observe_heads(ctx, operand, -1)
    return lead + [dq[-2], dv[-1]]


def _grouped_heads(ctx: Context, node: fx.Node, dq: list, dk: list, dv: list, shapes: list):
    """Grouped-query attention (``enable_gqa``): query head h reads key/value head h // (Hq / Hkv).

    So q's heads are (kv heads × queries per kv head): a kv head permutes as
    a block with the query heads that read it, which permute within their
    group.  Returns k's and v's dims and the shapes with q's heads in place of
    theirs, for the leading axes to broadcast as usual.
    """
    rep = ctx.table.new(shapes[0][-1] // shapes[1][-1])
    ctx.table.unify(dq[-3], Prod((dk[-3], rep)), node.name)
    ctx.table.unify(dk[-3], dv[-3], node.name)
    heads = [dk[:-3] + [dq[-3]] + dk[-2:], dv[:-3] + [dq[-3]] + dv[-2:]]
    return heads[0], heads[1], [shapes[0]] + [s[:-1] + shapes[0][-1:] for s in shapes[1:]]
