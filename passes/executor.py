"""Running traced models node by node: one model (``NodeRunner``), several together on one batch (``lockstep``).

Every statistics pass streams the calibration data through A and B this way:
a value is read as soon as both models have it, dropped once nothing later
reads it, and overwritten in place where nothing else reads it.  Kept apart
from the sums the passes take (``matching_stats``, ``stats``), so that batch
sizing (``batching``) counts the live values without depending on them.

``NodeRunner`` is a ``torch.fx.Interpreter``, as ``torch.fx.passes.shape_prop.ShapeProp``
is: fx's own op methods say what each node means (a placeholder, an attribute,
a call), and a runner only says what the passes do differently.  Its callers
run nodes one at a time (``step``) rather than the whole graph (``run``):
``lockstep`` interleaves models and yields between nodes, and sequential least
squares (``frontier.Frontier.run``) runs only the nodes whose values the store
does not hold, from the values it loads.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx

from pleascc.passes.in_place import in_place_twin
from pleascc.passes.rows import model_inputs


class NodeRunner(fx.Interpreter):
    """One traced model run a node at a time on the batch ``x``, holding the values in ``env`` (keyed by node).

    The model is called with ``x``'s inputs (``placeholder``).  ``env``: values to start from (the nodes
    they belong to are not run).  ``last_uses``: per node, the values to drop
    once it has run and been read (``free``), as ``garbage_collect_values``
    does, but after the caller's reads.  ``in_place``: per node, its op
    writing into its first argument (``in_place.in_place_twin``), run instead
    where that argument's value may be overwritten (``_may_overwrite``).
    """

    def __init__(self, gm: fx.GraphModule, x: torch.Tensor, env: dict[fx.Node, Any] | None = None,
                 last_uses: dict[fx.Node, list[fx.Node]] | None = None,
                 in_place: dict[fx.Node, Callable] | None = None) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.x, self.env = x, env if env is not None else {}
        self.last_uses, self.in_place = last_uses or {}, in_place or {}
        self.inputs = [n.target for n in self.graph.nodes if n.op == "placeholder"]

    def step(self, node: fx.Node) -> None:
        """Run ``node`` on the values in ``env`` and hold its value there."""
        self.env[node] = self.run_node(node)

    def free(self, node: fx.Node) -> None:
        """Drop the values nothing needs once ``node`` has run (``last_uses``)."""
        for done in self.last_uses.get(node, ()):
            del self.env[done]

    def run_node(self, n: fx.Node) -> Any:
        """``n``'s value, by its op method, or by its in-place twin where it may overwrite its first argument.

        Unlike ``fx.Interpreter.run_node``, it sets no node metadata for the
        op and logs nothing: the passes run every node of every batch here.
        """
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        twin = self.in_place.get(n)
        if twin is not None and self._may_overwrite(n, args, kwargs):
            return twin(*args, **kwargs)
        return getattr(self, n.op)(n.target, args, kwargs)

    def placeholder(self, target: str, args: tuple, kwargs: dict) -> Any:
        """The batch's inputs (``rows.model_inputs``: one tensor, or token ids and their padding mask) for the
        first placeholders; a later one's default (None without one)."""
        given, k = model_inputs(self.x), self.inputs.index(target)
        return given[k] if k < len(given) else (args[0] if args else None)

    def _may_overwrite(self, node: fx.Node, args: tuple, kwargs: dict) -> bool:
        """Whether ``node``'s first argument's value (``args[0]``) is a tensor no other live value shares memory
        with (an op may return its input, or a view of it), and the result has its shape and dtype (no
        broadcast into it)."""
        value = args[0]
        if not isinstance(value, torch.Tensor) or value._base is not None:
            return False
        for source, other in self.env.items():
            if source is not node.args[0] and any(t is value or t._base is value for t in _tensors_in(other)):
                return False
        tensors = [t for t in (*args[1:], *kwargs.values()) if isinstance(t, torch.Tensor)]
        numbers = [n for n in args[1:2] if isinstance(n, (int, float, bool))]
        return (torch.broadcast_shapes(value.shape, *(t.shape for t in tensors)) == value.shape
                and all(torch.result_type(value, other) == value.dtype for other in (*tensors, *numbers)))


def lockstep(gms: tuple[fx.GraphModule, ...], x: torch.Tensor, reads: dict[str, tuple[str, ...]]
             ) -> Iterator[tuple[str, dict[str, list[torch.Tensor]]]]:
    """Run models of one graph (``check_same_graph``) node by node together on one batch, a runner each.

    Once a node named in ``reads`` has run in every model, yield its name and
    the values of the nodes it reads, one per model; readers check what they
    read of them (``checked``), or its sums.  A value is dropped as soon
    as no later node or read needs it, so a batch holds about one forward's
    live activations per model, not every value read (what lets batches be
    large), and the models stop after the last read.
    """
    graphs = [list(gm.graph.nodes) for gm in gms]
    position = {node.name: k for k, node in enumerate(graphs[0])}
    dropped_after = _dropped_after(graphs[0], reads)
    overwritable = _overwritable(graphs[0], position, dropped_after, reads)
    runners = [NodeRunner(gm, x, last_uses={nodes[k]: [nodes[j] for j in done] for k, done in dropped_after.items()},
                          in_place={nodes[k]: twin for k in overwritable
                                    if (twin := in_place_twin(gm, nodes[k])) is not None})
               for gm, nodes in zip(gms, graphs)]
    for k in range(max(position[name] for name in reads) + 1):
        for runner, nodes in zip(runners, graphs):
            runner.step(nodes[k])
        name = graphs[0][k].name
        if name in reads:
            yield name, {read: [runner.env[nodes[position[read]]] for runner, nodes in zip(runners, graphs)]
                         for read in reads[name]}
        for runner, nodes in zip(runners, graphs):
            runner.free(nodes[k])


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


def _overwritable(nodes: list[fx.Node], position: dict[str, int], dropped_after: dict[int, list[int]],
                  reads: dict[str, tuple[str, ...]]) -> list[int]:
    """The positions of the nodes that may overwrite their first argument where they have an in-place twin
    (``in_place_twin``): a value computed by an op, read by this node alone, and by no read from here on."""
    return [k for k, node in enumerate(nodes) if node.args and isinstance(first := node.args[0], fx.Node)
            and first.op in ("call_module", "call_function", "call_method") and len(first.users) == 1
            and position[first.name] in dropped_after.get(k, ()) and first.name not in reads.get(node.name, ())]


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
