"""Running traced models node by node, together, on one batch (``lockstep``), and what that holds at once.

Every statistics pass streams the calibration data through A and B this way:
a value is read as soon as both models have it, dropped once nothing later
reads it, and overwritten in place where nothing else reads it.  Kept apart
from the sums the passes take (``matching_stats``, ``stats``), so that batch
sizing (``batching``) counts the live values without depending on them.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.fx as fx

from pleascc.passes.frontier import arguments, execute
from pleascc.passes.in_place import in_place_twin


def lockstep(gms: tuple[fx.GraphModule, ...], x: torch.Tensor, reads: dict[str, tuple[str, ...]]
             ) -> Iterator[tuple[str, dict[str, list[torch.Tensor]]]]:
    """Run models of one graph (``check_same_graph``) node by node together on one batch.

    Once a node named in ``reads`` has run in every model, yield its name and
    the values of the nodes it reads, one per model; readers check what they
    read of them (``checked``).  A value is dropped as soon
    as no later node or read needs it, so a batch holds about one forward's
    live activations per model, not every value read (what lets batches be
    large), and the models stop after the last read.
    """
    graphs = [list(gm.graph.nodes) for gm in gms]
    position = {node.name: k for k, node in enumerate(graphs[0])}
    dropped_after = _dropped_after(graphs[0], reads)
    twins = _in_place_twins(gms, graphs, position, dropped_after, reads)
    envs: list[dict[str, object]] = [{} for _ in gms]
    for k in range(max(position[name] for name in reads) + 1):
        name = graphs[0][k].name
        for m, (gm, env, nodes) in enumerate(zip(gms, envs, graphs)):
            twin = twins.get((m, k))
            twin = twin if twin is not None and _may_overwrite(nodes[k], env) else None
            env[nodes[k].name] = execute(gm, nodes[k], env, x, twin)
        if name in reads:
            yield name, {read: [env[nodes[position[read]].name] for env, nodes in zip(envs, graphs)]
                         for read in reads[name]}
        for j in dropped_after.get(k, ()):
            for env, nodes in zip(envs, graphs):
                del env[nodes[j].name]


def _dropped_after(nodes: list[fx.Node], reads: dict[str, tuple[str, ...]]) -> dict[int, list[int]]:
    """For each node's position, the positions of the values no later node or read needs once it has run."""
    position = {node.name: k for k, node in enumerate(nodes)}
    last = {k: max([k, *(position[user.name] for user in node.users)]) for k, node in enumerate(nodes)}
    for name, needed in reads.items():
        for read in needed:
            last[position[read]] = max(last[position[read]], position[name])
    dropped: dict[int, list[int]] = {}
    for k, end in last.items():
        dropped.setdefault(end, []).append(k)
    return dropped


def _in_place_twins(gms: tuple[fx.GraphModule, ...], graphs: list[list[fx.Node]], position: dict[str, int],
                    dropped_after: dict[int, list[int]], reads: dict[str, tuple[str, ...]]
                    ) -> dict[tuple[int, int], Callable]:
    """Per (model, position), the in-place twin (``in_place_twin``) of a node that may overwrite its first
    argument: a value computed by an op, read by this node alone, and by no read from here on."""
    twins = {}
    for k, node in enumerate(graphs[0]):
        first = node.args[0] if node.args else None
        if (not isinstance(first, fx.Node) or first.op not in ("call_module", "call_function", "call_method")
                or len(first.users) != 1 or position[first.name] not in dropped_after.get(k, ())
                or first.name in reads.get(node.name, ())):
            continue
        for m, (gm, nodes) in enumerate(zip(gms, graphs)):
            twin = in_place_twin(gm, nodes[k])
            if twin is not None:
                twins[m, k] = twin
    return twins


def _may_overwrite(node: fx.Node, env: dict[str, object]) -> bool:
    """Whether ``node``'s first argument's value is a tensor no other live value shares memory with (an op
    may return its input, or a view of it), and the result has its shape and dtype (no broadcast into it)."""
    value = env[node.args[0].name]
    if not isinstance(value, torch.Tensor) or value._base is not None:
        return False
    for name, other in env.items():
        if name != node.args[0].name and any(t is value or t._base is value for t in _tensors_in(other)):
            return False
    args, kwargs = arguments(node, env)
    tensors = [t for t in (*args[1:], *kwargs.values()) if isinstance(t, torch.Tensor)]
    numbers = [n for n in args[1:2] if isinstance(n, (int, float, bool))]
    return (torch.broadcast_shapes(value.shape, *(t.shape for t in tensors)) == value.shape
            and all(torch.result_type(value, other) == value.dtype for other in (*tensors, *numbers)))


def _tensors_in(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors_in(item)


def peak_live_bytes(graph: fx.Graph, shapes: dict[str, tuple | None]) -> int:
    """The most bytes of float32 values ``lockstep`` holds at once for one model (shapes as ShapeProp's)."""
    nodes = list(graph.nodes)
    size = [4 * math.prod(shapes[n.name]) if shapes.get(n.name) and n.op != "get_attr" else 0 for n in nodes]
    dropped = _dropped_after(nodes, {})
    live = peak = 0
    for k in range(len(nodes)):
        live += size[k]
        peak = max(peak, live)
        live -= sum(size[j] for j in dropped.get(k, ()))
    return peak
