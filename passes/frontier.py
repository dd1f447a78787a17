"""What sequential least squares keeps between its passes, so each costs one level of layers, not a forward.

Sequential least squares fits the layers level by level, each on the merged
model's own inputs, so it runs one pass over the data per level.  Two things
make the passes together cost about one forward of the merged model:

- ``LayerReads``: A's and B's layer outputs, as the fits read them (at the
  sampled positions), recorded once, in the matching pass, which runs both
  models over the data anyway.  A and B never run again.
- ``Frontier``: the merged model's values that later levels still read, per
  batch, so each pass resumes where the last stopped.  A value that one cheap
  op (a norm, an activation, an add, a view) makes from values kept already is
  not kept but recomputed when read: a convolution's output is kept once, not
  again after its BatchNorm and after its ReLU.

Both live in an ``ActivationStore``: memory up to ``--cache-gb``, the rest on
disk.  Where the recorded outputs would not fit the disk, they are recorded a
run of levels at a time (``output_segments``), each run by a pass of A and B.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from pleascc.passes.executor import NodeRunner
from pleascc.passes.groups import Analysis, Layer
from pleascc.passes.store import ActivationStore, nbytes

# Ops that do real work per value: never recomputed to save keeping their output.
EXPENSIVE = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, torch.conv2d, torch.matmul,
             operator.matmul, torch.bmm, torch.mm, torch.einsum, torch.baddbmm, torch.addmm,
             F.scaled_dot_product_attention, "matmul", "bmm", "mm", "einsum"}


class LayerReads:
    """A's and B's outputs at some layers, as their fits read them, recorded batch by batch in a store; for
    one-pass least squares their inputs too, before the models' are merged (``stats.record_input``).

    ``nodes``: the layers recorded now (``output_segments``: those of a run
    of levels whose outputs fit the store).  ``memory_bytes``: the most of
    the store's memory they may take; the rest goes to disk, leaving memory
    to the frontier, whose values are read more than once.
    Each layer's reads are read by one pass, then dropped.
    """

    def __init__(self, store: ActivationStore, nodes: set[str], memory_bytes: float, inputs: bool = False,
                 shared: dict[str, str] | None = None) -> None:
        self.store, self.nodes, self.memory_bytes, self.inputs = store, nodes, memory_bytes, inputs
        self.shared = shared or {}  # a layer -> the layer whose recorded outputs are its inputs (``shared_inputs``)

    def add(self, kind: str, node: str, batch: int, value: object) -> None:
        """Keep one batch's ``kind`` ("output" or "input") of a layer."""
        self.store.put((kind, node, batch), value, memory_limit=self.memory_bytes)

    def read_ahead(self, keys: list[tuple[str, str, int]]) -> None:
        """Start reading those of (kind, node, batch) ``keys`` that went to disk, in that order."""
        self.store.read_ahead(keys)

    def pop(self, kind: str, node: str, batch: int) -> object:
        value = self.store.get((kind, node, batch))
        self.store.drop((kind, node, batch))
        return value


def shared_inputs(layers: list[Layer]) -> dict[str, str]:
    """Each layer whose fit reads its input as the layer making it reads its output (``Layer.reads_input_as``: a
    norm after a convolution) → that layer: one recording of those reads serves both."""
    by_node = {layer.node: layer for layer in layers}
    return {layer.node: layer.source for layer in layers
            if layer.source in by_node and layer.reads_input_as(by_node[layer.source])}


class Frontier:
    """The merged model's node values that later passes read, per batch, in an ``ActivationStore``.

    The merged model is re-emitted between passes with the same node names:
    only values of nodes before the layers being fitted are computed, and
    those no longer change.  A graph whose code changed (renamed nodes)
    starts from the input again.
    """

    def __init__(self, store: ActivationStore) -> None:
        self.store = store
        self.code: tuple | None = None
        self.kept: set[str] = set()  # nodes whose values the store holds, for every batch
        self.done: set[str] = set()  # nodes computed whose values are kept or used up (not to recompute)
        self.ran_before: set[str] = set()  # nodes run in an earlier pass
        self.plan: tuple | None = None  # this pass's (values to put in the store, values to drop from it)

    def start(self, gm: fx.GraphModule, names: list[str]) -> None:
        """Prepare a pass that reads ``names`` from ``gm``, batch by batch (``run``)."""
        code = tuple((n.name, n.op, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes)
        if code != self.code:
            self._forget()
            self.code = code
        self.gm, self.names = gm, names
        self.nodes = {node.name: node for node in gm.graph.nodes}
        needed, stack = set(), [self.nodes[name] for name in names]
        while stack:
            node = stack.pop()
            if node.name not in self.kept and node.name not in needed:
                needed.add(node.name)
                stack.extend(node.all_input_nodes)
        self.run_nodes = [n for n in gm.graph.nodes if n.name in needed]
        read = {source.name for node in self.run_nodes for source in node.all_input_nodes} | set(names)
        self.loads = sorted(read & self.kept)
        self.plan = None

    def read_ahead(self, batch: int) -> None:
        """Start reading what ``run`` will load for ``batch`` (``ActivationStore.read_ahead``)."""
        self.store.read_ahead([("frontier", batch, name) for name in self.loads])

    def run(self, batch: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The names' values on batch ``batch`` (input ``x``), computing only what the store does not hold
        (a ``NodeRunner`` that starts from the values it loads and runs only the nodes they do not give)."""
        keys = {name: ("frontier", batch, name) for name in self.loads}
        self.store.reserve(list(keys.values()))  # those read back from disk: held beside the store's memory
        runner = NodeRunner(self.gm, x, {self.nodes[name]: self.store.get(key) for name, key in keys.items()})
        for node in self.run_nodes:
            runner.step(node)
        if self.plan is None:
            self.plan = self._plan(runner.env)
        newly_kept, forgotten = self.plan
        for name in newly_kept:
            self.store.put(("frontier", batch, name), runner.env[self.nodes[name]])
        for name in forgotten:
            self.store.drop(("frontier", batch, name))
        return {name: runner.env[self.nodes[name]] for name in self.names}

    def finish(self) -> None:
        """After every batch of a pass: what the store holds now is what the next pass resumes from."""
        if self.plan is not None:
            newly_kept, forgotten = self.plan
            self.kept = (self.kept - set(forgotten)) | set(newly_kept)

    def _plan(self, env: dict[fx.Node, object]) -> tuple[list[str], list[str]]:
        """Which values to keep after this pass (decided on its first batch): those a node not yet run reads,
        less the ones cheap nodes make from values kept already.  Those are recomputed when read instead,
        once: a node run a second time is kept if still read, so chains of recomputation stay one long."""
        ran = {node.name for node in self.run_nodes}
        recomputable: set[str] = set()
        for node in self.run_nodes:
            inputs = node.all_input_nodes
            if node.name not in self.ran_before and inputs and _is_cheap(self.gm, node, env) and all(
                    n.name in self.kept or n.name in recomputable or n.op in ("get_attr", "placeholder")
                    for n in inputs):
                recomputable.add(node.name)
        self.ran_before |= ran
        self.done = (self.done | ran) - recomputable
        keep = {name for name in self.done if self.nodes[name].op not in ("get_attr", "placeholder")
                and any(user.name not in self.done for user in self.nodes[name].users)}
        return sorted(keep - self.kept), sorted(self.kept - keep)

    def _forget(self) -> None:
        for key in [k for k in self.store.keys() if k[0] == "frontier"]:
            self.store.drop(key)
        self.kept, self.done, self.ran_before = set(), set(), set()


def _is_cheap(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, object]) -> bool:
    """A node whose value costs less to recompute than to keep: an op with no matrix of weights that makes
    a value at least as large as each input (a norm, an activation, an add, a view)."""
    if node.op == "call_module":
        if any(p.dim() >= 2 for p in gm.get_submodule(node.target).parameters()):
            return False
    elif node.op not in ("call_function", "call_method") or node.target in EXPENSIVE or (
            str(getattr(node.target, "__name__", node.target)).endswith("_")):
        return False
    out = nbytes(env[node])
    return out > 0 and all(nbytes(env[n]) <= out for n in node.all_input_nodes if n in env)


def level_output_bytes(analysis: Analysis, levels: dict[str, int], samples: int,
                       positions: int | None, models: int = 2) -> dict[int, int]:
    """Per level, the float32 bytes of the ``models``' outputs its layers' fits read, over ``samples`` samples
    (from the shapes ShapeProp found on the example batch)."""
    per_level: dict[int, int] = {}
    for layer in analysis.layers:
        shape = analysis.shapes.get(layer.node)
        size = models * samples * (layer.read_bytes(shape, positions) if shape else 0) // analysis.example_batch
        per_level[levels[layer.node]] = per_level.get(levels[layer.node], 0) + size
    return dict(sorted(per_level.items()))


def output_segments(level_bytes: dict[int, int], budget: float) -> list[list[int]]:
    """Levels in order, cut into runs whose recorded outputs take at most ``budget`` bytes together (a level
    larger than that alone): each run's outputs are recorded by one pass of A and B, the first run's in the
    matching pass."""
    segments: list[list[int]] = [[]]
    size = 0
    for level, level_size in level_bytes.items():
        if segments[-1] and size + level_size > budget:
            segments.append([])
            size = 0
        segments[-1].append(level)
        size += level_size
    return segments


def frontier_bytes(gm: fx.GraphModule, analysis: Analysis, samples: int) -> int:
    """An upper bound on the merged model's frontier over ``samples`` samples: the most float32 bytes that
    nodes run so far hold for nodes not yet run, in graph order (kept whole, as if nothing were recomputed)."""
    nodes = list(gm.graph.nodes)
    position = {node.name: k for k, node in enumerate(nodes)}
    ends: dict[int, int] = {}
    live = widest = 0
    for k, node in enumerate(nodes):
        shape = analysis.shapes.get(node.name)
        size = 4 * math.prod(shape) if isinstance(shape, tuple) and node.op not in ("get_attr", "placeholder") else 0
        last = max([k, *(position[u.name] for u in node.users)])
        ends[last] = ends.get(last, 0) + size
        live += size
        widest = max(widest, live - ends.get(k, 0))
        live -= ends.pop(k, 0)
    return widest * samples // analysis.example_batch
