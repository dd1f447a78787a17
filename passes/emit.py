"""Emit the merged GraphModule: new parameter shapes, rewritten width literals, blocks, heads."""

from __future__ import annotations

import copy
import functools
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pleascc.passes.errors import model_name
from pleascc.passes.groups import Analysis, FeatureNorm, Layer
from pleascc.passes.merge_maps import Block, MergeMaps

State = dict[str, torch.Tensor]
LAYER_KEY = "pleascc_layer"  # node.meta: this node computes (a block of) the named layer
SELECT_KEY = "pleascc_select"  # node.meta: this node picks a block's input columns
LayerWeights = dict[tuple[str, int | None], list[tuple[Block, State]]]


def emit(gm: fx.GraphModule, analysis: Analysis, maps: MergeMaps, state: State,
         layer_weights: LayerWeights) -> fx.GraphModule:
    """A copy of ``gm`` (A's graph) carrying the merged weights, resized to the merged widths.

    ``layer_weights[(node, model)]`` holds each layer's solved blocks; a layer
    fitted per model (``model`` 0, 1, …: separate heads) is copied for every
    model past the first, with everything from it to the output, and the model
    returns ``(outputs from A's heads, outputs from B's heads, …)``.
    """
    shared = {id(t): t for t in (*gm.parameters(), *gm.buffers())}  # each replaced below: copy the rest only
    merged = copy.deepcopy(gm, memo=shared)
    for name, value in state.items():
        _assign(merged, name, value)
    modules = dict(merged.named_modules())
    for target, rewrite in analysis.module_rewrites.items():
        rewrite(modules[target], maps.size)
    nodes = {n.name: n for n in merged.graph.nodes}
    for name, rewrite in analysis.node_rewrites.items():
        rewrite(nodes[name], maps.size)
    for norm in analysis.feature_norms:
        _split_feature_norm(merged, nodes[norm.node], norm, maps)
    models = sorted({model for _, model in layer_weights if model})
    heads = {node for node, model in layer_weights if model == 1}
    copies = _duplicate_heads(merged, heads, models) if heads else {}
    for layer in analysis.layers:
        for model in (None, 0, *models):
            blocks = layer_weights.get((layer.node, model))
            if blocks:
                node = copies[model][layer.node] if model else nodes[layer.node]
                _emit_layer(merged, node, layer, blocks)
    merged.graph.lint()
    merged.delete_all_unused_submodules()  # the layers replaced by their blocks
    merged.recompile()
    return merged


def layer_inputs(merged: fx.GraphModule) -> dict[str, str]:
    """For each layer of the analysis, the merged graph's node that feeds it (what sequential fits read)."""
    inputs = {}
    for node in merged.graph.nodes:
        if LAYER_KEY in node.meta and node.meta[LAYER_KEY] not in inputs:
            source = node.args[0]
            inputs[node.meta[LAYER_KEY]] = (source.args[0] if source.meta.get(SELECT_KEY) else source).name
    return inputs


def _assign(root: nn.Module, name: str, value: torch.Tensor) -> None:
    prefix, _, leaf = name.rpartition(".")
    module = root.get_submodule(prefix) if prefix else root
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value.detach().float().contiguous(), requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value.detach().to(module._buffers[leaf].dtype).contiguous()
    else:
        setattr(module, leaf, value.detach().float())


def _emit_layer(gm: fx.GraphModule, node: fx.Node, layer: Layer, blocks: list[tuple[Block, State]]) -> None:
    """Give a layer node its weights: in place when one block covers it, else one sub-layer per block."""
    prefix = layer.weight.rpartition(".")[0] if node.op == "call_module" else ""
    if len(blocks) == 1 and blocks[0][0].rows is None and blocks[0][0].cols is None:
        node.meta[LAYER_KEY] = layer.node
        owner = gm.get_submodule(node.target) if node.op == "call_module" else gm
        for name, value in blocks[0][1].items():
            _assign(owner, name.removeprefix(prefix + ".") if prefix else name, value)
        return
    graph = gm.graph
    pieces, order = [], []
    with graph.inserting_before(node):
        for k, (block, params) in enumerate(blocks):
            source = node.args[0]
            if block.cols is not None:
                source = graph.call_function(torch.index_select, (source, layer.in_axis, _constant(gm, block.cols)))
                source.meta[SELECT_KEY] = True
            module = _block_module(gm, node, layer, params, prefix)
            name = f"{(node.target if node.op == 'call_module' else node.name).replace('.', '_')}_block{k}"
            gm.add_submodule(name, module)
            pieces.append(graph.call_module(name, (source,)))
            pieces[-1].meta[LAYER_KEY] = layer.node
            order.append(block.rows)
        out = pieces[0] if len(pieces) == 1 else graph.call_function(torch.cat, (pieces, layer.out_axis))
        if any(rows is not None for rows in order):
            inverse = torch.argsort(torch.cat([r for r in order if r is not None]))
            if not torch.equal(inverse, torch.arange(len(inverse))):
                out = graph.call_function(torch.index_select, (out, layer.out_axis, _constant(gm, inverse)))
    inputs = node.all_input_nodes
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    for param in (n for n in inputs if n.op == "get_attr" and not n.users):  # F.linear's own weight and bias
        graph.erase_node(param)
        owner, _, leaf = param.target.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, leaf)


def _block_module(gm: fx.GraphModule, node: fx.Node, layer: Layer, params: State, prefix: str) -> nn.Module:
    """One block of a layer as a module: a resized copy of a layer module, or an nn.Linear for F.linear."""
    if node.op == "call_module":
        return _sized_copy(gm.get_submodule(node.target), params, prefix, layer)
    linear = nn.Linear(1, 1, bias=layer.bias is not None)
    _assign(linear, "weight", params[layer.weight])
    if layer.bias is not None:
        _assign(linear, "bias", params[layer.bias])
    linear.out_features, linear.in_features = linear.weight.shape
    return linear


class ViewwiseNorm(nn.Module):
    """A LayerNorm/RMSNorm over a merged axis, taken over each model's units apart.

    Model A's view is the units A feeds, B's likewise, and so on; each is
    normalized as its own model would, and a merged unit gets the mean of the
    normalizations of the models that feed it (``back``: per model, each
    unit's place in its view, any place where it feeds none; ``share``: 1 ÷
    the models feeding the unit where this one does, else 0).  At full
    merging it is the plain norm; with nothing merged, the models' norms side
    by side.
    """

    def __init__(self, kind: str, eps: float | None, fed: list[torch.Tensor]) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        self.names = [model_name(m).lower() for m in range(len(fed))]
        sizes = [int(f.sum()) for f in fed]
        starts = torch.cumsum(torch.tensor([0, *sizes[:-1]]), 0)
        count = functools.reduce(operator.add, (f.double() for f in fed)).clamp(min=1)
        for name, f, start in zip(self.names, fed, starts):
            self.register_buffer(f"view_{name}", f.nonzero().flatten())
            self.register_buffer(f"back_{name}", torch.where(f, torch.cumsum(f, 0) - 1 + start, 0))
            self.register_buffer(f"share_{name}", (f / count).float())

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        outs = []
        for view in (getattr(self, f"view_{name}") for name in self.names):
            w = weight.index_select(0, view) if weight is not None else None
            shape = (view.shape[0],)
            if self.kind == "rms":
                outs.append(F.rms_norm(x.index_select(-1, view), shape, w, self.eps))
            else:
                b = bias.index_select(0, view) if bias is not None else None
                outs.append(F.layer_norm(x.index_select(-1, view), shape, w, b, self.eps))
        y = torch.cat(outs, -1)
        return functools.reduce(operator.add, (y.index_select(-1, getattr(self, f"back_{name}"))
                                               * getattr(self, f"share_{name}") for name in self.names))


def _split_feature_norm(gm: fx.GraphModule, node: fx.Node, norm: FeatureNorm, maps: MergeMaps) -> None:
    """Replace a norm whose axis holds units some model does not feed by its ``ViewwiseNorm``."""
    fed = [maps.participation(norm.dim, m) > 0 for m in range(maps.models)]
    if bool(functools.reduce(operator.and_, fed).all()):
        return
    name = f"{node.name}_viewwise"
    gm.add_submodule(name, ViewwiseNorm(norm.kind, norm.eps, fed))
    graph = gm.graph
    with graph.inserting_before(node):
        params = [graph.get_attr(p) if p is not None else None for p in (norm.weight, norm.bias)]
        new = graph.call_module(name, (node.args[0], *params))
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _sized_copy(module: nn.Module, params: State, prefix: str, layer: Layer) -> nn.Module:
    """A copy of a layer module holding ``params``, its size attributes updated."""
    module = copy.deepcopy(module)
    for name, value in params.items():
        _assign(module, name.removeprefix(prefix + "."), value)
    layer.resize(module)
    return module


def _constant(gm: fx.GraphModule, value: torch.Tensor) -> fx.Node:
    """A get_attr node for an index tensor stored as a buffer of the module."""
    k = sum(1 for name, _ in gm.named_buffers() if name.startswith("_pleascc_index"))
    name = f"_pleascc_index{k}"
    gm.register_buffer(name, value.clone())
    return gm.graph.get_attr(name)


def _duplicate_heads(gm: fx.GraphModule, heads: set[str], models: list[int]) -> dict[int, dict[str, fx.Node]]:
    """Copy every node from the head layers to the output once per model in ``models`` (B, C, …); the output
    becomes (A's, B's, …); return model -> original name -> its copy."""
    nodes = list(gm.graph.nodes)
    output = nodes[-1]
    downstream = _reachable({n for n in nodes if n.name in heads}, forward=True)
    upstream = _reachable({output}, forward=False)
    value, copies = output.args[0], {}
    for model in models:
        env: dict[fx.Node, fx.Node] = {}
        with gm.graph.inserting_before(output):
            for node in nodes:
                if node in downstream and node in upstream and node is not output:
                    new = gm.graph.node_copy(node, lambda n: env.get(n, n))
                    if node.op == "call_module":
                        new.target = node.target.replace(".", "_") + "_" + model_name(model).lower()
                        gm.add_submodule(new.target, copy.deepcopy(gm.get_submodule(node.target)))
                    env[node] = new
        copies[model] = env
    output.args = ((value, *(fx.node.map_arg(value, lambda n, env=env: env.get(n, n)) for env in copies.values())),)
    return {model: {node.name: new for node, new in env.items()} for model, env in copies.items()}


def _reachable(start: set[fx.Node], forward: bool) -> set[fx.Node]:
    seen, stack = set(start), list(start)
    while stack:
        node = stack.pop()
        for nxt in (node.users if forward else node.all_input_nodes):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen
