"""Emit the merged GraphModule: new parameter shapes, rewritten width literals, heads."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from pleascc.passes.groups import Analysis
from pleascc.passes.merge_maps import MergeMaps

State = dict[str, torch.Tensor]


def emit(gm: fx.GraphModule, analysis: Analysis, maps: MergeMaps, state: State,
         heads: dict[str, State] | None = None) -> fx.GraphModule:
    """A copy of ``gm`` (A's graph) carrying ``state``, resized to the merged widths.

    ``heads`` maps each head layer's node to model B's parameters for a second
    copy of it: the graph from the head layers to the output is duplicated and
    the model returns ``(outputs of A's heads, outputs of B's heads)``.
    """
    merged = copy.deepcopy(gm)
    for name, value in state.items():
        _assign(merged, name, value)
    modules = dict(merged.named_modules())
    for target, rewrite in analysis.module_rewrites.items():
        rewrite(modules[target], maps.size)
    for node in merged.graph.nodes:
        if node.name in analysis.node_rewrites:
            analysis.node_rewrites[node.name](node, maps.size)
    if heads:
        _duplicate_heads(merged, heads)
    merged.graph.lint()
    merged.recompile()
    return merged


def _assign(gm: nn.Module, name: str, value: torch.Tensor) -> None:
    prefix, _, leaf = name.rpartition(".")
    module = gm.get_submodule(prefix) if prefix else gm
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value.detach().float().contiguous(), requires_grad=False)
    elif leaf in module._buffers:
        old = module._buffers[leaf]
        module._buffers[leaf] = value.detach().to(old.dtype).contiguous()
    else:
        setattr(module, leaf, value.detach().float())


def _duplicate_heads(gm: fx.GraphModule, heads: dict[str, State]) -> None:
    """Copy every node from the head layers to the output, using B's head parameters."""
    nodes = list(gm.graph.nodes)
    output = nodes[-1]
    downstream = _reachable({n for n in nodes if n.name in heads}, forward=True)
    copied_nodes = [n for n in nodes if n in downstream and n in _reachable({output}, forward=False)
                    and n is not output]
    env: dict[fx.Node, fx.Node] = {}
    with gm.graph.inserting_before(output):
        for node in copied_nodes:
            new = gm.graph.node_copy(node, lambda n: env.get(n, n))
            if node.op == "call_module":
                new.target = _copy_module(gm, node.target, heads.get(node.name, {}))
            env[node] = new
    value = output.args[0]
    output.args = ((value, fx.node.map_arg(value, lambda n: env.get(n, n))),)


def _copy_module(gm: fx.GraphModule, target: str, params: State) -> str:
    name = target.replace(".", "_") + "_b"
    module = copy.deepcopy(gm.get_submodule(target))
    for param, value in params.items():
        _assign(module, param.removeprefix(target + "."), value)
    gm.add_submodule(name, module)
    return name


def _reachable(start: set[fx.Node], forward: bool) -> set[fx.Node]:
    seen, stack = set(start), list(start)
    while stack:
        node = stack.pop()
        for nxt in (node.users if forward else node.all_input_nodes):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen
