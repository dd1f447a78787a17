"""Permutation-group analysis: abstract interpretation of an fx graph over spaces.

Each node's output gets one dim per axis (see ``spaces``); an op's *rule* says
which dims are equal, which parameters axes live in which dims, which layers
least squares can solve, and how to rewrite the op when widths change.  Rules
live in one registry keyed by module class, function or method name; an op
with no rule fixes every space it touches and is reported.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.ops import stochastic_depth

from pleascc.passes.spaces import Atom, Cat, Dim, Prod, SpaceTable

Size = Callable[[Dim], int]  # a dim's width in the emitted model


@dataclass
class ParamBinding:
    """Which dim each axis of a parameter or buffer lives in.

    ``roles[k]`` is "out" where the axis holds features the tensor produces
    (rows of a weight, biases, norm parameters) and "in" where it reads them
    (input columns of a weight).
    """

    name: str
    dims: list
    roles: list


@dataclass
class Layer:
    """An affine op that least squares can refit: y = W·x + b along one axis."""

    node: str
    kind: str  # "linear" | "conv" | "norm"
    weight: str
    bias: str | None
    in_axis: int
    in_dim: Dim
    out_axis: int
    out_dim: Dim
    groups_dim: Dim | None = None  # conv: the dim whose width is the group count
    conv: dict = field(default_factory=dict)  # kernel_size, stride, padding, dilation
    running: tuple | None = None  # norm: (running_mean, running_var, eps)
    source: str = ""  # the node holding the layer's input
    is_module: bool = False  # a call_module node (emit can split it into blocks)


@dataclass
class Analysis:
    """The result of the pass: spaces plus everything later passes need."""

    table: SpaceTable
    node_dims: dict[str, Any]
    params: dict[str, ParamBinding]
    layers: list[Layer]
    module_rewrites: dict[str, Callable[[nn.Module, Size], None]]
    node_rewrites: dict[str, Callable[[fx.Node, Size], None]]
    unsupported: list[str]
    output_roots: set[int]
    shapes: dict[str, Any]

    def free_roots(self) -> list[int]:
        """Root atoms that may be permuted, in first-seen order."""
        seen: dict[int, None] = {}
        for binding in self.params.values():
            for dim in binding.dims:
                for atom in self.table.atoms(dim):
                    if atom.id not in self.table.fixed:
                        seen.setdefault(atom.id)
        return list(seen)

    def root_size(self, root: int) -> int:
        return self.table.size(Atom(root))


RULES: dict[Any, Callable] = {}


def rule(*keys):
    """Register a rule for module classes, functions, or method names (strings)."""

    def register(fn):
        for key in keys:
            RULES[key] = fn
        return fn

    return register


class Context:
    """What a rule sees: input dims, shapes, modules, and ways to record facts."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.table = SpaceTable()
        self.dims: dict[str, Any] = {}
        self.params: dict[str, ParamBinding] = {}
        self.layers: list[Layer] = []
        self.module_rewrites: dict[str, Callable] = {}
        self.node_rewrites: dict[str, Callable] = {}
        self.unsupported: list[str] = []
        self.output_roots: set[int] = set()
        self.modules = dict(gm.named_modules())

    # ----- reading
    def dims_of(self, arg) -> Any:
        return self.dims.get(arg.name) if isinstance(arg, fx.Node) else None

    def shape(self, node: fx.Node) -> tuple | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if hasattr(meta, "shape") else None

    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[node.target]

    def arg(self, node: fx.Node, index: int, name: str, default=None):
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    # ----- recording
    def new_dims(self, shape, fixed: str | None = None) -> list:
        return [self.table.new(s, fixed) for s in shape]

    def bind(self, name: str, dims: list, roles: list | None = None) -> None:
        """Record a parameter's axes; a layer rule's roles override the "out" a get_attr assumed."""
        if name in self.params:  # a parameter used twice: both uses are one space
            for old, new in zip(self.params[name].dims, dims):
                self.table.unify(old, new, name)
            if roles is not None:
                self.params[name].roles = list(roles)
            return
        self.params[name] = ParamBinding(name, list(dims), list(roles or ["out"] * len(dims)))

    def fix_inputs(self, node: fx.Node, reason: str) -> None:
        for arg in node.all_input_nodes:
            for dim in _leaves(self.dims_of(arg)):
                self.table.fix(dim, reason)


def analyze(gm: fx.GraphModule, example_inputs: tuple) -> Analysis:
    """Run the rules over ``gm`` (shapes from one forward pass on ``example_inputs``)."""
    ShapeProp(gm).propagate(*example_inputs)
    ctx = Context(gm)
    for node in gm.graph.nodes:
        ctx.dims[node.name] = _apply_rule(ctx, node)
    nodes = {n.name: n for n in gm.graph.nodes}
    for layer in ctx.layers:
        layer.source = nodes[layer.node].args[0].name
        layer.is_module = nodes[layer.node].op == "call_module"
    return Analysis(
        table=ctx.table,
        node_dims=ctx.dims,
        params=ctx.params,
        layers=ctx.layers,
        module_rewrites=ctx.module_rewrites,
        node_rewrites=ctx.node_rewrites,
        unsupported=ctx.unsupported,
        output_roots=ctx.output_roots,
        shapes={n.name: ctx.shape(n) for n in gm.graph.nodes},
    )


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
    tensor_inputs = [a for a in node.all_input_nodes if ctx.dims_of(a) is not None]
    out = _fresh_outputs(ctx, node, f"{node.name}: no rule for {_describe_target(key)}")
    if tensor_inputs or out is not None:
        reason = f"{node.name}: no rule for {_describe_target(key)}"
        ctx.fix_inputs(node, reason)
        ctx.unsupported.append(reason)
        if node.op == "call_module":
            for name, p in ctx.module(node).named_parameters(recurse=True):
                ctx.bind(f"{node.target}.{name}", ctx.new_dims(p.shape, reason))
    return out


def _fresh_outputs(ctx: Context, node: fx.Node, reason: str):
    meta = node.meta.get("tensor_meta")
    if hasattr(meta, "shape"):
        return ctx.new_dims(meta.shape, reason)
    if isinstance(meta, (tuple, list)) and all(hasattr(m, "shape") for m in meta):
        return [ctx.new_dims(m.shape, reason) for m in meta]
    return None


def _leaves(dims) -> list:
    """All dims in a (possibly nested) output structure."""
    if dims is None:
        return []
    if isinstance(dims, (Atom, Cat, Prod)):
        return [dims]
    return [d for item in dims for d in _leaves(item)]


def _output(ctx: Context, node: fx.Node):
    for arg in node.all_input_nodes:
        for dim in _leaves(ctx.dims_of(arg)):
            ctx.table.fix(dim, "model output")
            ctx.output_roots.update(a.id for a in ctx.table.atoms(dim))
    return None


def _get_attr(ctx: Context, node: fx.Node):
    value = _getattr_path(ctx.gm, node.target)
    if not isinstance(value, torch.Tensor):
        return None
    dims = ctx.new_dims(value.shape)
    ctx.bind(node.target, dims)
    return dims


def _getattr_path(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


# ---------------------------------------------------------------- shape-preserving ops


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
    "sqrt", "square",
)(_same)


rule(nn.Softmax, torch.softmax, F.softmax, "softmax")(_same)  # normalizing an axis commutes with permuting it


@rule("to", "type")
def _cast(ctx: Context, node: fx.Node):
    return _same(ctx, node) if ctx.shape(node) is not None else None


rule(stochastic_depth)(_same)


@rule(
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
    torch.div, torch.maximum, torch.minimum, "add", "sub", "mul", "div",
)
def _elementwise(ctx: Context, node: fx.Node):
    """Broadcasting binary ops: axes that meet with size > 1 are one space."""
    shape = ctx.shape(node)
    if shape is None:
        return None
    operands = [(ctx.dims_of(a), ctx.shape(a)) for a in node.args if isinstance(a, fx.Node)]
    operands = [(d, s) for d, s in operands if d is not None and s is not None]
    out = []
    for k in range(1, len(shape) + 1):
        candidates = [d[-k] for d, s in operands if len(s) >= k and s[-k] != 1]
        for other in candidates[1:]:
            ctx.table.unify(candidates[0], other, node.name)
        out.append(candidates[0] if candidates else ctx.table.new(1))
    return out[::-1]


# ---------------------------------------------------------------- layers


@rule(nn.Linear)
def _linear_module(ctx: Context, node: fx.Node):
    return _linear(ctx, node, node.args[0], f"{node.target}.weight",
                   f"{node.target}.bias" if ctx.module(node).bias is not None else None)


@rule(F.linear)
def _linear_function(ctx: Context, node: fx.Node):
    weight, bias = ctx.arg(node, 1, "weight"), ctx.arg(node, 2, "bias")
    if not _is_param(weight) or (bias is not None and not _is_param(bias)):
        return _unknown(ctx, node, F.linear)
    return _linear(ctx, node, node.args[0], weight.target, bias.target if bias is not None else None)


def _is_param(arg) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def _linear(ctx: Context, node: fx.Node, x: fx.Node, weight: str, bias: str | None):
    dims = ctx.dims_of(x)
    w = _getattr_path(ctx.gm, weight)
    out = ctx.table.new(w.shape[0])
    ctx.bind(weight, [out, dims[-1]], ["out", "in"])
    if bias is not None:
        ctx.bind(bias, [out])
    ctx.layers.append(Layer(node.name, "linear", weight, bias, -1, dims[-1], -1, out))
    if node.op == "call_module":
        ctx.module_rewrites[node.target] = lambda m, size: _resize_linear(m, size, dims[-1], out)
    return dims[:-1] + [out]


def _resize_linear(module: nn.Linear, size: Size, in_dim: Dim, out_dim: Dim) -> None:
    module.in_features, module.out_features = size(in_dim), size(out_dim)


@rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(ctx: Context, node: fx.Node):
    """Convolutions; grouped ones split channels into (groups × per-group) spaces."""
    m = ctx.module(node)
    dims = ctx.dims_of(node.args[0])
    chan, groups = dims[1], m.groups
    per_group_out = m.out_channels // groups
    if groups == 1:
        in_group, groups_dim, out = chan, None, ctx.table.new(m.out_channels)
    else:  # channels are (groups × per group); only the group count may widen, so groups stay whole
        in_group = ctx.table.new(m.in_channels // groups, keep_width=True)
        groups_dim = ctx.table.new(groups)
        ctx.table.unify(chan, Prod((groups_dim, in_group)), node.name)
        out = Prod((groups_dim, ctx.table.new(per_group_out, keep_width=True)))
    kernel = ctx.new_dims(m.weight.shape[2:], "kernel")
    ctx.bind(f"{node.target}.weight", [out, in_group, *kernel], ["out", "in"] + ["out"] * len(kernel))
    if m.bias is not None:
        ctx.bind(f"{node.target}.bias", [out])
    conv = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation)
    ctx.layers.append(Layer(node.name, "conv", f"{node.target}.weight",
                            f"{node.target}.bias" if m.bias is not None else None,
                            1, chan, 1, out, groups_dim, conv))
    ctx.module_rewrites[node.target] = lambda mod, size: _resize_conv(mod, size, chan, out, groups_dim)
    spatial = ctx.new_dims(ctx.shape(node)[2:], "spatial")
    return [dims[0], out, *spatial]


def _resize_conv(module, size: Size, in_dim: Dim, out_dim: Dim, groups_dim: Dim | None) -> None:
    module.in_channels, module.out_channels = size(in_dim), size(out_dim)
    module.groups = size(groups_dim) if groups_dim is not None else 1


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
        ctx.layers.append(Layer(node.name, "norm", f"{node.target}.weight", f"{node.target}.bias",
                                1, chan, 1, chan, running=running))
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
        ctx.layers.append(Layer(node.name, "norm", names["weight"], names["bias"], 1, dims[1], 1, dims[1],
                                running=(names["running_mean"], names["running_var"], eps)))
    return dims


@rule(nn.LayerNorm)
def _layer_norm_module(ctx: Context, node: fx.Node):
    m = ctx.module(node)
    dims = ctx.dims_of(node.args[0])
    normed = dims[len(dims) - len(m.normalized_shape):]
    for name in ("weight", "bias"):
        if getattr(m, name, None) is not None:
            ctx.bind(f"{node.target}.{name}", normed)
    ctx.module_rewrites[node.target] = lambda mod, size: setattr(
        mod, "normalized_shape", tuple(size(d) for d in normed))
    return dims


@rule(F.layer_norm)
def _layer_norm_function(ctx: Context, node: fx.Node):
    dims = ctx.dims_of(node.args[0])
    shape = ctx.arg(node, 1, "normalized_shape")
    normed = dims[len(dims) - len(shape):]
    for index, name in ((2, "weight"), (3, "bias")):
        param = ctx.arg(node, index, name)
        if isinstance(param, fx.Node):
            for d, pd in zip(normed, ctx.dims_of(param)):
                ctx.table.unify(d, pd, node.name)

    def rewrite(n: fx.Node, size: Size) -> None:
        _set_arg(n, 1, "normalized_shape", [size(d) for d in normed])

    ctx.node_rewrites[node.name] = rewrite
    return dims


@rule(nn.GroupNorm)
def _group_norm(ctx: Context, node: fx.Node):
    m = ctx.module(node)
    dims = ctx.dims_of(node.args[0])
    chan = dims[1]
    if 1 < m.num_groups < m.num_channels:
        groups_dim = ctx.table.new(m.num_groups)
        per_group = ctx.table.new(m.num_channels // m.num_groups, keep_width=True)
        ctx.table.unify(chan, Prod((groups_dim, per_group)), node.name)
        ctx.module_rewrites[node.target] = lambda mod, size: (
            setattr(mod, "num_channels", size(chan)), setattr(mod, "num_groups", size(groups_dim)))
    else:
        ctx.module_rewrites[node.target] = lambda mod, size: setattr(mod, "num_channels", size(chan))
        if m.num_groups > 1:  # one group per channel: the group count is the width
            ctx.module_rewrites[node.target] = lambda mod, size: (
                setattr(mod, "num_channels", size(chan)), setattr(mod, "num_groups", size(chan)))
    for name in ("weight", "bias"):
        if getattr(m, name, None) is not None:
            ctx.bind(f"{node.target}.{name}", [chan])
    return dims


def _set_arg(node: fx.Node, index: int, name: str, value) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


# ---------------------------------------------------------------- spatial ops


@rule(
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate,
)
def _pool(ctx: Context, node: fx.Node):
    """Channels-first spatial ops: batch and channel pass through, spatial axes are new."""
    dims = ctx.dims_of(node.args[0])
    return dims[:2] + ctx.new_dims(ctx.shape(node)[2:], "spatial")


@rule(torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin")
def _reduce(ctx: Context, node: fx.Node):
    """Reductions: reduced axes disappear (or become size 1), the rest pass through."""
    dims = ctx.dims_of(node.args[0])
    axes = ctx.arg(node, 1, "dim")
    keepdim = ctx.arg(node, 2, "keepdim", False)
    if axes is None:
        return []
    axes = {a % len(dims) for a in (axes if isinstance(axes, (tuple, list)) else (axes,))}
    return [ctx.table.new(1) if k in axes else d for k, d in enumerate(dims) if keepdim or k not in axes]


# ---------------------------------------------------------------- axis bookkeeping


@rule(torch.flatten, "flatten", nn.Flatten, torch.reshape, "reshape", "view")
def _reshape(ctx: Context, node: fx.Node):
    """Reshapes factor or merge axes; width literals among the args are rewritten."""
    dims = ctx.dims_of(node.args[0])
    in_shape, out_shape = ctx.shape(node.args[0]), ctx.shape(node)
    out = _reshape_dims(ctx, node, dims, in_shape, out_shape)
    if node.target in ("view", "reshape", torch.reshape):
        _record_shape_literals(ctx, node, out)
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
    """Remember which int literals of a view/reshape are widths, to rewrite them on emit."""
    shape_args = node.args[1:] if isinstance(node.target, str) else node.args[1:2]
    if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
        shape_args, packed = tuple(shape_args[0]), True
    else:
        packed = False
    literal_axes = [k for k, a in enumerate(shape_args) if isinstance(a, int) and a != -1]
    if not literal_axes:
        return

    def rewrite(n: fx.Node, size: Size) -> None:
        values = list(n.args[1] if packed else n.args[1:])
        for k in literal_axes:
            values[k] = size(out[k])
        n.args = (n.args[0], tuple(values)) if packed else (n.args[0], *values)

    ctx.node_rewrites[node.name] = rewrite


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


@rule(operator.getitem)
def _getitem(ctx: Context, node: fx.Node):
    source, index = node.args
    dims = ctx.dims_of(source)
    if dims is None:
        return None
    if dims and isinstance(dims[0], list):  # an element of split/chunk's tuple
        return dims[index]
    return _index_tensor(ctx, node, dims, index)


def _index_tensor(ctx: Context, node: fx.Node, dims: list, index):
    """Basic indexing: full slices keep a space, anything else touching it fixes it."""
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, fx.Node) or isinstance(i, (list, torch.Tensor)) for i in index):
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
        if item == slice(None):
            out.append(dim)
            continue
        ctx.table.fix(dim, f"{node.name}: indexed by {item!r}")
        if isinstance(item, slice):
            out.append(ctx.table.new(out_shape[len(out)], "indexed"))
    out.extend(dims[k:])
    return out


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
        if lo == hi == 0:
            continue
        if ctx.table.is_fixed(dims[axis]) or mode != "constant" or lo < 0 or hi < 0:
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


@rule(getattr, torch._assert, "size", "dim")
def _metadata(ctx: Context, node: fx.Node):
    """Reading a shape is harmless: at run time it reads the emitted width."""
    return None


# ---------------------------------------------------------------- reading the result


@dataclass
class Group:
    """One permutable space, as the `groups` report shows it."""

    root: int
    size: int
    fixed: str | None
    producers: list[str]
    consumers: list[str]
    structure: set[str] = field(default_factory=set)  # "axis", "segment", "factor", "per-group"


def permutation_groups(analysis: Analysis) -> list[Group]:
    """Group every parameter axis by its root space (free ones first)."""
    groups: dict[int, Group] = {}
    table = analysis.table
    for binding in analysis.params.values():
        for axis, (dim, role) in enumerate(zip(binding.dims, binding.roles)):
            for atom, place in _places(table, table.resolve(dim), "axis"):
                if table.size(atom) <= 1:
                    continue
                g = groups.setdefault(atom.id, Group(atom.id, table.size(atom), table.fixed.get(atom.id), [], []))
                g.structure.add("per-group" if atom.id in table.keep_width else place)
                entry = f"{binding.name}[{axis}]"
                target = g.producers if role == "out" else g.consumers
                if entry not in target:
                    target.append(entry)
    return sorted(groups.values(), key=lambda g: (g.fixed is not None, g.root))


def _places(table: SpaceTable, dim: Dim, place: str):
    """Each atom of a resolved dim with where it sits: a whole axis, a segment, or a factor."""
    if isinstance(dim, Atom):
        yield dim, place
        return
    inner = "segment" if isinstance(dim, Cat) else "factor"
    for child in (dim.parts if isinstance(dim, Cat) else dim.factors):
        yield from _places(table, child, inner)


def coverage(analysis: Analysis, model: nn.Module) -> float:
    """Share of parameters (by count) that live in at least one permutable space."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    covered = sum(
        sizes.get(name, 0)
        for name, b in analysis.params.items()
        if any(a.id not in analysis.table.fixed for d in b.dims for a in analysis.table.atoms(d))
    )
    return covered / max(1, sum(sizes.values()))


def random_permutations(analysis: Analysis, generator: torch.Generator) -> dict[int, torch.Tensor]:
    """A random permutation for every free space (used by the invariance property)."""
    return {r: torch.randperm(analysis.root_size(r), generator=generator) for r in analysis.free_roots()}


def permute_state(analysis: Analysis, state: dict[str, torch.Tensor], perms: dict[int, torch.Tensor]) -> dict:
    """Apply ``perms`` to every bound parameter and buffer in ``state``."""
    out = dict(state)
    for name, binding in analysis.params.items():
        if name not in out:
            continue
        t = out[name]
        for axis, dim in enumerate(binding.dims):
            t = t.index_select(axis, analysis.table.index(dim, perms))
        out[name] = t
    return out
