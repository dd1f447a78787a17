"""Rules for ops that keep their input's axes: activations, dropout, softmax, casts, and elementwise
arithmetic, whose broadcast axes meeting with size > 1 are one space."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import stochastic_depth

from pleascc.passes.groups.registry import Context, rule


def _same(ctx: Context, node: fx.Node):
    return ctx.dims_of(node.args[0])


_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.SELU, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
rule(*_ACTIVATIONS)(_same)
rule(
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.sqrt, torch.square,
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu,
    F.sigmoid, F.tanh, F.dropout, F.softplus, operator.neg,
    "relu", "sigmoid", "tanh", "contiguous", "clone", "float", "detach", "exp", "abs", "neg",
    "sqrt", "square", torch.sin, torch.cos, "sin", "cos",
)(_same)


# normalizing an axis commutes with permuting it
rule(nn.Softmax, torch.softmax, F.softmax, "softmax", F.normalize)(_same)


@rule("to", "type")
def _cast(ctx: Context, node: fx.Node):
    return _same(ctx, node) if ctx.shape(node) is not None else None


rule(stochastic_depth)(_same)
rule("type_as")(_same)


@rule(
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
    torch.div, torch.maximum, torch.minimum, torch.addcmul, torch.addcdiv, "add", "sub", "mul", "div", "addcmul",
    "addcdiv", torch.clamp, torch.clip, "clamp", "clip", "clamp_min", "clamp_max", operator.pow, torch.pow, "pow",
)
def _elementwise(ctx: Context, node: fx.Node):
    """Broadcasting elementwise ops (tensor clamp bounds too): axes that meet with size > 1 are one space."""
    shape = ctx.shape(node)
    if shape is None:
        return None
    operands = [(ctx.dims_of(a), ctx.shape(a)) for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
    operands = [(d, s) for d, s in operands if d is not None and s is not None]
    return _broadcast(ctx, node, [d for d, _ in operands], [s for _, s in operands], len(shape))


def _broadcast(ctx: Context, node: fx.Node, operands: list[list], shapes: list[tuple], rank: int) -> list:
    """The ``rank`` trailing axes of broadcasting operands: axes that meet with size > 1 are one space."""
    out = []
    for k in range(rank, 0, -1):
        sized = [(d[-k], s[-k]) for d, s in zip(operands, shapes) if len(s) >= k and s[-k] != 1]
        if len({size for _, size in sized}) > 1:  # not broadcasting (an op this rule does not know): fixed
            reason = f"{node.name}: axes of sizes {sorted({size for _, size in sized})} meet"
            for dim, _ in sized:
                ctx.table.fix(dim, reason)
            out.append(ctx.table.new(max(size for _, size in sized), reason))
            continue
        for other, _ in sized[1:]:
            ctx.table.unify(sized[0][0], other, node.name)
        out.append(sized[0][0] if sized else ctx.table.new(1))
    return out


def _broadcast_batch(ctx: Context, node: fx.Node, operands: list[list], shapes: list[tuple]) -> list:
    """Leading (batch) axes of matmul/attention operands broadcast like elementwise ops."""
    return _broadcast(ctx, node, operands, shapes, max(len(s) for s in shapes))
