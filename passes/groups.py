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
from torchvision.models import swin_transformer as swin
from torchvision.ops import stochastic_depth

from pleascc.passes.opaque_ops import STANDARDIZED_CONVS, grid_offsets, timm_classes, timm_registrations
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
    batch_axis: int | None = None  # the axis of its input (and output) holding the samples, if known
    refit: bool = True  # False: counted and observed like any layer, merged by its permuted average


@dataclass
class FeatureNorm:
    """A LayerNorm/RMSNorm over one feature axis: it mixes the units it normalizes.

    Merged wider than one model, that axis holds A-only and B-only units,
    which each model's norm must not see; emit normalizes each model's view
    apart (see ``emit``), so budget 2.0 is the two models side by side.
    """

    node: str
    dim: Dim
    kind: str  # "layer" | "rms"
    weight: str | None
    bias: str | None
    eps: float | None


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
    feature_norms: list[FeatureNorm] = field(default_factory=list)
    products: list[list] = field(default_factory=list)  # activation×activation products: [*out dims, summed dim]
    sites: list[tuple] = field(default_factory=list)  # extra (node, axes, dims) where matching compares features
    per_head: dict[int, int] = field(default_factory=dict)  # inner root -> the factor whose units each permute it
    batch: Atom | None = None  # the model input's first axis: the samples

    def batch_axis(self, node: str) -> int | None:
        """The one axis of ``node``'s value that holds the samples (maybe folded with other axes), else None.

        Axes other than it and the units are within one sample (tokens), so
        reading a fixed subset of them reads the same rows however the samples
        are batched or sharded.
        """
        dims = self.node_dims.get(node)
        if self.batch is None or not isinstance(dims, list):
            return None
        batch = self.table.find(self.batch.id)
        axes = [k for k, dim in enumerate(dims)
                if dim is not None and any(atom.id == batch for atom in self.table.atoms(dim))]
        return axes[0] if len(axes) == 1 else None

    @property
    def example_batch(self) -> int:
        """Samples in the example the shapes were found on (the first input's axis 0): shapes ÷ it are per sample."""
        return self.shapes[next(iter(self.shapes))][0]

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
        self.feature_norms: list[FeatureNorm] = []
        self.products: list[list] = []
        self.sites: list[tuple] = []
        self.modules = dict(gm.named_modules())
        self.saved = set(gm.state_dict())  # learned tensors; the others are inputs the model computes for itself

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
            for dim in leaves(self.dims_of(arg)):
                self.table.fix(dim, reason)


def analyze(gm: fx.GraphModule, example_inputs: tuple) -> Analysis:
    """Run the rules over ``gm`` (shapes from one forward pass on ``example_inputs``)."""
    ShapeProp(gm).propagate(*example_inputs)
    ctx = Context(gm)
    for node in gm.graph.nodes:
        ctx.dims[node.name] = _apply_rule(ctx, node)
    _keep_inner_factors(ctx.table, [d for b in ctx.params.values() for d in b.dims])
    nodes = {n.name: n for n in gm.graph.nodes}
    for layer in ctx.layers:
        layer.source = nodes[layer.node].args[0].name
    analysis = Analysis(
        table=ctx.table,
        node_dims=ctx.dims,
        params=ctx.params,
        layers=ctx.layers,
        module_rewrites=ctx.module_rewrites,
        node_rewrites=ctx.node_rewrites,
        unsupported=ctx.unsupported,
        output_roots=ctx.output_roots,
        shapes={n.name: ctx.shape(n) for n in gm.graph.nodes},
        feature_norms=ctx.feature_norms,
        products=ctx.products,
        sites=ctx.sites,
        per_head=per_head_spaces(ctx.table, [*_tensor_dims(ctx.dims)], [b.dims for b in ctx.params.values()]),
        batch=_input_batch(gm, ctx.dims),
    )
    for layer in analysis.layers:
        layer.batch_axis = analysis.batch_axis(layer.source)
    return analysis


def _input_batch(gm: fx.GraphModule, dims: dict[str, Any]) -> Atom | None:
    """The first input's first axis (the samples), if it is a tensor."""
    first = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    found = dims.get(first.name) if first is not None else None
    return found[0] if isinstance(found, list) and found else None


def _keep_inner_factors(table: SpaceTable, dims: list) -> None:
    """In a product axis only the outermost free factor widens (whole heads, whole groups).

    Widening two factors of one product would multiply the axis' width: two
    models side by side would be 4× as wide, not 2×.
    """
    for dim in dims:
        dim = table.resolve(dim)
        if isinstance(dim, Prod):
            free = [f for f in dim.factors if not table.is_fixed(f)]
            for inner in free[1:]:
                table.keep(inner)
            _keep_inner_factors(table, list(dim.factors))
        elif isinstance(dim, Cat):
            _keep_inner_factors(table, list(dim.parts))


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
    """No rule: every space the op touches is fixed, and the op is reported.

    A function of no tensor at all (a position grid built from sizes) is a
    constant: its fixed output spaces are all it needs, so it is not reported.
    """
    tensor_inputs = [a for a in node.all_input_nodes if ctx.dims_of(a) is not None]
    out = _fresh_outputs(ctx, node, f"{node.name}: no rule for {_describe_target(key)}")
    if tensor_inputs or (out is not None and node.op != "call_function"):
        reason = f"{node.name}: no rule for {_describe_target(key)}"
        ctx.fix_inputs(node, reason)
        ctx.unsupported.append(reason)
        if node.op == "call_module":
            for name, p in ctx.module(node).named_parameters(recurse=True):
                ctx.bind(f"{node.target}.{name}", ctx.new_dims(p.shape, reason))
    return out


def _fresh_outputs(ctx: Context, node: fx.Node, reason: str):
    """New fixed spaces for every tensor an op returns, in the nesting it returns them (an LSTM's (y, (h, c)))."""

    def fresh(meta):
        if hasattr(meta, "shape"):
            return ctx.new_dims(meta.shape, reason)
        if isinstance(meta, (tuple, list)):
            return [fresh(m) for m in meta]
        return None

    return fresh(node.meta.get("tensor_meta"))


def per_head_spaces(table: SpaceTable, activations: list[list], parameters: list[list]) -> dict[int, int]:
    """Head dims that may be permuted differently inside every head: inner root -> heads root.

    A head dim qualifies when every axis holding it is (heads × head dim) with
    one and the same heads space, or, in an activation, its own axis beside a
    heads axis (q as batch × heads × tokens × head dim).  A parameter holding it
    without the heads (a LayerNorm over the head dim, shared by all heads) ties
    the heads together: one permutation for all of them.
    """
    outers: dict[int, set[int]] = {}
    loose: list[tuple[int, set[int] | None]] = []  # (atom, the tensor's whole-axis atoms; None for parameters)

    def free(dim) -> bool:
        return isinstance(dim, Atom) and dim.id not in table.fixed

    def walk(dim, before, whole: set[int] | None) -> None:
        if isinstance(dim, Atom):
            if free(dim) and dim.id in table.keep_width and free(before):
                outers.setdefault(dim.id, set()).add(before.id)
            elif free(dim):
                loose.append((dim.id, whole if before is None else None))
            return
        children = dim.parts if isinstance(dim, Cat) else dim.factors
        for k, child in enumerate(children):
            walk(child, children[k - 1] if isinstance(dim, Prod) and k else False, None)

    for dims, is_param in [(d, False) for d in activations] + [(d, True) for d in parameters]:
        dims = [table.resolve(d) for d in dims]
        whole = None if is_param else {d.id for d in dims if isinstance(d, Atom)}
        for dim in dims:
            walk(dim, None, whole)
    per_head = {inner: next(iter(o)) for inner, o in outers.items() if len(o) == 1}
    for atom, whole in loose:
        if atom in per_head and (whole is None or per_head[atom] not in whole):
            del per_head[atom]
    return per_head


def _tensor_dims(dims):
    """Each tensor's list of axis dims in the rule results (outputs may nest tensors)."""
    if isinstance(dims, dict):
        for value in dims.values():
            yield from _tensor_dims(value)
    elif isinstance(dims, (list, tuple)) and dims:
        if any(isinstance(d, (Atom, Cat, Prod)) for d in dims):
            yield [d for d in dims if isinstance(d, (Atom, Cat, Prod))]
        else:
            for item in dims:
                yield from _tensor_dims(item)


def leaves(dims) -> list:
    """All dims in a (possibly nested) output structure."""
    if dims is None:
        return []
    if isinstance(dims, (Atom, Cat, Prod)):
        return [dims]
    return [d for item in dims for d in leaves(item)]


def _output(ctx: Context, node: fx.Node):
    for arg in node.all_input_nodes:
        for dim in leaves(ctx.dims_of(arg)):
            ctx.table.fix(dim, "model output")
            ctx.output_roots.update(a.id for a in ctx.table.atoms(dim))
    return None


def _get_attr(ctx: Context, node: fx.Node):
    value = _getattr_path(ctx.gm, node.target)
    if not isinstance(value, torch.Tensor):
        return None
    if not value.is_floating_point():
        fixed = "integer buffer (indices)"
    elif node.target not in ctx.saved and not _uniform(value):
        fixed = "constant tensor (a non-persistent buffer, outside the state dict)"
    else:
        fixed = None
    dims = ctx.new_dims(value.shape, fixed)
    ctx.bind(node.target, dims)
    return dims


def _uniform(value: torch.Tensor) -> bool:
    """All entries equal (EVA's zero k-bias): no permutation or merge changes it, so it fixes nothing."""
    return value.numel() == 0 or bool((value == value.reshape(-1)[0]).all())


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
        sized = [d[-k] for d, s in zip(operands, shapes) if len(s) >= k and s[-k] != 1]
        for other in sized[1:]:
            ctx.table.unify(sized[0], other, node.name)
        out.append(sized[0] if sized else ctx.table.new(1))
    return out


def _broadcast_batch(ctx: Context, node: fx.Node, operands: list[list], shapes: list[tuple]) -> list:
    """Leading (batch) axes of matmul/attention operands broadcast like elementwise ops."""
    return _broadcast(ctx, node, operands, shapes, max(len(s) for s in shapes))


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


# ---------------------------------------------------------------- layers


@rule(nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
def _linear_module(ctx: Context, node: fx.Node):
    return _linear(ctx, node, node.args[0], f"{node.target}.weight",
                   f"{node.target}.bias" if ctx.module(node).bias is not None else None)


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


def _reads_shape(node) -> bool:
    """``x.shape`` or ``x.size()``."""
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target is getattr and node.args[1] == "shape")
        or (node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs))


def _dtype(node: fx.Node):
    return getattr(node.meta.get("tensor_meta"), "dtype", None)


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
    ctx.layers.append(Layer(node.name, "conv", f"{node.target}.weight",
                            f"{node.target}.bias" if m.bias is not None else None,
                            1, dims[1], 1, out, groups_dim, conv, refit=refit))
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


def _mixed_axis(ctx: Context, node: fx.Node, dim: Dim, out_size: int) -> Atom:
    """An axis whose positions an op mixes (a conv window, pooling, resizing) must stay in place.

    Image positions are fixed anyway; this catches a feature axis fed to such
    an op (CoaT's Conv1d runs along the channels).
    """
    ctx.table.fix(dim, f"positions mixed by {node.name}")
    return ctx.table.new(out_size, "spatial")


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
    *timm_classes("timm.layers.pool2d_same", "MaxPool2dSame", "AvgPool2dSame"),  # padded to "same" first
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


# ---------------------------------------------------------------- axis bookkeeping


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
    if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
        shape_args, packed = tuple(shape_args[0]), True
    else:
        packed = False
    if len(shape_args) != len(out):
        return
    original = [ctx.table.size(d) for d in out]

    def rewrite(n: fx.Node, size: Size) -> None:
        values = list(n.args[1] if packed else n.args[1:])
        for k, value in enumerate(values):
            if value != -1 and size(out[k]) != original[k]:
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


# ---------------------------------------------------------------- functions libraries hide from tracing


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
    """A random permutation for every free space (used by the invariance property); head dims get one per head."""
    def perm(root: int) -> torch.Tensor:
        n = analysis.root_size(root)
        if root not in analysis.per_head:
            return torch.randperm(n, generator=generator)
        heads = analysis.root_size(analysis.per_head[root])
        return torch.stack([torch.randperm(n, generator=generator) for _ in range(heads)])

    return {r: perm(r) for r in analysis.free_roots()}


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
