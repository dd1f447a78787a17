"""Calibration statistics, streamed: sums only (sequential least squares keeps a bounded ``frontier``).

Two passes over the data, each running A and B node by node together, batch
by batch (``lockstep``), each value summed as soon as both models have it
and dropped once nothing later reads it:

1. ``feature_moments``: per free space, the cross-moments of A's and B's
   features where layers read them (what matching needs; n×n per space);
2. ``layer_moments``: per layer, the second moments of its *merged* input and
   its cross-moments with its merged target (what least squares needs).

Two passes instead of one because the second needs the matching: gathering
the joint (2n·k²)² im2col moments of both models in one pass would cost
quadratically more memory and time than the merged-layout moments.
Sums over the data are float64; products within a batch are float32 (least
squares' widest Grams sum a few batches in float32 first: ``GramSum``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from scipy.linalg import blas
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from pleascc.passes import distributed
from pleascc.passes.errors import PleasccError
from pleascc.passes.frontier import Frontier, LayerOutputs, arguments, execute
from pleascc.passes.groups import Analysis, Layer
from pleascc.passes.in_place import in_place_twin
from pleascc.passes.merge_maps import Block, MergeMaps, take
from pleascc.passes.rows import NpyRows, read_rows
from pleascc.passes.spaces import Atom, Cat, Dim, Prod, SpaceTable

if TYPE_CHECKING:
    from pleascc.passes.fused_norms import FusedNorm


def lockstep(gms: tuple[fx.GraphModule, ...], x: torch.Tensor, reads: dict[str, tuple[str, ...]]
             ) -> Iterator[tuple[str, dict[str, list[torch.Tensor]]]]:
    """Run models of one graph (``check_same_graph``) node by node together on one batch.

    Once a node named in ``reads`` has run in every model, yield its name and
    the values of the nodes it reads, one per model; readers check what they
    read of them (``_checked``).  A value is dropped as soon
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


JOINT_LIMIT = 4096  # widest product axis whose full correlation is kept for joint matching


def observe(table: SpaceTable, x: torch.Tensor, axes: tuple[int, ...], dims: tuple[Dim, ...]
            ) -> Iterator[tuple[int | tuple, torch.Tensor]]:
    """Yield (space, samples × units) views of ``x`` along ``axes``, one per free atom in ``dims``.

    Other factors of a product axis (kernel or spatial positions) become samples.
    A product of several free atoms (heads × head dim, on one axis or on
    several) is also yielded whole, keyed by the tuple of its factors, so
    matching can pair heads as units.
    """
    x = torch.movedim(x, axes, tuple(range(-len(axes), 0)))
    units = math.prod(x.shape[-len(axes):])
    yield from _observe(table, x.reshape(-1, units), dims[0] if len(dims) == 1 else Prod(tuple(dims)))


def _observe(table: SpaceTable, x: torch.Tensor, dim: Dim):
    dim = table.resolve(dim)
    if isinstance(dim, Atom):
        if dim.id not in table.fixed:
            yield dim.id, x
        return
    if isinstance(dim, Cat):
        for part, piece in zip(dim.parts, torch.split(x, [table.size(p) for p in dim.parts], dim=1)):
            yield from _observe(table, piece, part)
        return
    dim = Prod(tuple(table.resolve(f) for f in dim.factors))  # several axes: factors not yet flattened
    sizes = [table.size(f) for f in dim.factors]
    if all(isinstance(f, Atom) for f in dim.factors) and x.shape[1] <= JOINT_LIMIT and sum(
            f.id not in table.fixed for f in dim.factors) > 1:
        yield tuple(f.id for f in dim.factors), x
    y = x.reshape(x.shape[0], *sizes)
    for k, factor in enumerate(dim.factors):
        yield from _observe(table, torch.movedim(y, k + 1, -1).reshape(-1, sizes[k]), factor)


@dataclass
class CrossMoments:
    """Running sums for the correlation of A's units with B's units at one site.

    Sums are taken around the first batch's means (a shifted algorithm), so
    small variances on top of large means do not cancel away.  ``within``:
    also A×A and B×B (ZipIt! merges units of one model too), as one joint
    correlation of [A's units, B's units].
    """

    n: int
    within: bool = False
    count: float = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """One batch: products in float32 (the bulk of the work, on centred values), sums in float64."""
        z = torch.cat([a, b], dim=1).float()
        if not self.count:
            self.shift = z.mean(0, dtype=torch.float64)
            self.sum = torch.zeros(2 * self.n, dtype=torch.float64, device=z.device)
            self.sq = torch.zeros_like(self.sum)
            side = 2 * self.n if self.within else self.n
            self.cross = torch.zeros(side, side, dtype=torch.float64, device=z.device)
        z = z - self.shift.float()
        self.count += z.shape[0]
        self.sum += z.sum(0, dtype=torch.float64)
        self.sq += (z * z).sum(0, dtype=torch.float64)
        self.cross += (z.T @ z if self.within else z[:, :self.n].T @ z[:, self.n:]).double()

    def reduce(self) -> None:
        """Add every rank's sums (``distributed``), re-centred on rank 0's shift first."""
        if not distributed.active():
            return
        common = distributed.rank_zero_first(self.shift)
        d, n = self.shift - common, self.count
        left, right = (d, d) if self.within else (d[:self.n], d[self.n:])
        sum_left, sum_right = (self.sum, self.sum) if self.within else (self.sum[:self.n], self.sum[self.n:])
        cross = self.cross + torch.outer(left, sum_right) + torch.outer(sum_left, right) + n * torch.outer(left, right)
        sq = self.sq + 2 * d * self.sum + n * d * d
        self.cross, self.sq = distributed.total(cross), distributed.total(sq)
        self.sum, self.count, self.shift = distributed.total(self.sum + n * d), distributed.total(n), common

    def correlation(self) -> torch.Tensor:
        """A×B, or with ``within`` the joint (2n × 2n) correlation."""
        mean = self.sum / self.count
        std = (self.sq / self.count - mean**2).clamp(min=0).sqrt()
        rows, cols = (slice(None), slice(None)) if self.within else (slice(0, self.n), slice(self.n, None))
        cov = self.cross / self.count - torch.outer(mean[rows], mean[cols])
        live = torch.outer(std[rows] > 0, std[cols] > 0)
        corr = torch.where(live, cov / (torch.outer(std[rows], std[cols]) + 1e-300), cov.new_zeros(()))
        return corr.clamp(-1, 1)


def weight_similarity(analysis: Analysis, states: tuple[dict, dict]) -> dict[int, torch.Tensor]:
    """Per free space, the cosine similarity of A's and B's units' sorted weight rows.

    Matching uses it only to break ties between units the data cannot tell
    apart (dead or constant units), which correlation scores as 0.  Rows are
    sorted because their columns live in other spaces, not yet matched.
    """
    rows: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, binding in analysis.params.items():
        for axis, (dim, role) in enumerate(zip(binding.dims, binding.roles)):
            dim = analysis.table.resolve(dim)
            if role == "out" and isinstance(dim, Atom) and dim.id not in analysis.table.fixed:
                pair = [torch.movedim(s[name], axis, 0).reshape(s[name].shape[axis], -1).sort(dim=1).values.double()
                        for s in states]  # sorted in their own precision: the same order, half the memory
                rows.setdefault(dim.id, []).append(tuple(pair))
    out = {}
    for root, pairs in rows.items():
        a = torch.cat([p[0] for p in pairs], dim=1)
        b = torch.cat([p[1] for p in pairs], dim=1)
        a = a / a.norm(dim=1, keepdim=True).clamp(min=1e-30)
        b = b / b.norm(dim=1, keepdim=True).clamp(min=1e-30)
        out[root] = a @ b.T
    return out


STREAMED_BYTES = 2**29  # the activations one batch may hold in the statistics passes (all models together):
# larger batches were no faster on 2 cores, and peak higher
MAX_BATCH = 64


def batch_size_for(analysis: Analysis, graph: fx.Graph, positions: int | None = None,
                   limit_bytes: float = STREAMED_BYTES) -> int:
    """The largest batch (up to ``MAX_BATCH``) whose values fit in ``limit_bytes``.

    The passes stream ``graph`` (``lockstep``): per model, its live values
    (``peak_live_bytes``), and one layer's rows at a time; sequential least
    squares' passes run a level of layers at a time and keep the rest in a
    store (``frontier``).  Sizes come from ShapeProp's shapes on the example.
    """
    rows = max((_rows_bytes(layer, analysis.shapes, positions) for layer in analysis.layers), default=0)
    per_sample = (2 * peak_live_bytes(graph, analysis.shapes) + rows) / analysis.example_batch
    return int(max(1, min(MAX_BATCH, limit_bytes // per_sample)))


def _rows_bytes(layer: Layer, shapes: dict[str, tuple | None], positions: int | None) -> int:
    """A layer's least-squares rows on the example: up to twice one model's input width, read (float32)
    and laid out as rows (float32)."""
    source, output = shapes.get(layer.source), shapes.get(layer.node)
    if not source or not output:
        return 0
    if layer.kind == "linear":
        return 2 * 8 * math.prod(source)
    read = math.prod(output[2:])
    read = read if positions is None else min(read, positions)
    return 2 * 8 * output[0] * source[1] * _kernel_positions(layer) * read


FIRST_BATCH = 2  # samples in a statistics pass's first batch (``batches``)


def batches(x: torch.Tensor | NpyRows, batch_size: int, desc: str, progress: bool,
            device: torch.device | None = None, small_first: bool = True) -> Iterator[torch.Tensor]:
    """The data in batches, each read from disk only now if it is ``NpyRows``, and moved to ``device``.

    With ``small_first`` the first batch holds ``FIRST_BATCH`` samples.  A
    pass makes its long-lived values (sums, tensor headers, library caches)
    in its first batch; made between a full batch's activations, they pin
    the holes those leave when freed, and glibc's heap grows by gigabytes it
    cannot reuse (``benchmarks/results/scale_ratio_one_pass_runs.log``: a
    vit_small merge's peak with and without a small first batch).  The statistics
    are sums over samples, so how the samples are batched does not change
    them; callers whose result depends on the batches (BatchNorm's average
    of batch moments) pass False.
    """
    starts = _batch_starts(len(x), batch_size, small_first)
    for start, stop in tqdm(zip(starts, [*starts[1:], len(x)]), total=len(starts), desc=desc,
                            disable=not progress or distributed.rank() > 0, leave=False, unit="batch"):
        yield read_rows(x[start:stop]).to(device)


def batch_count(samples: int, batch_size: int) -> int:
    """How many batches ``batches`` makes of ``samples`` (with ``small_first``)."""
    return len(_batch_starts(samples, batch_size, True))


def _batch_starts(samples: int, batch_size: int, small_first: bool) -> list[int]:
    first = min(FIRST_BATCH, batch_size) if small_first else batch_size
    return [0, *range(first, samples, batch_size)] if samples else []


def device_of(gm: torch.nn.Module) -> torch.device:
    """Where a model's parameters live, and so where the passes run it and keep their sums."""
    return next(iter(gm.parameters()), torch.empty(0)).device


def _checked(values: list[torch.Tensor], node: str) -> list[torch.Tensor]:
    """What a pass reads of ``node``'s value in A and in B, checked for NaN and Inf (``_check_finite``).

    Checked as read, after sampling, not as computed: the statistics see
    only what is read, and checking whole activations costs a pass over the
    memory of every value read.  A NaN off the sampled positions spreads to
    later layers' and is found there.
    """
    for value, model in zip(values, "AB"):
        _check_finite(value, model, node)
    return values


def _check_finite(value: torch.Tensor, model: str, node: str) -> None:
    """NaN and Inf reach a tensor's least or greatest value, so one reduction checks it all; unlike a sum's,
    its result cannot overflow (large activations, as in randomly initialised deep nets, would send every
    value to an element-by-element check)."""
    if value.numel() and not all(torch.isfinite(end) for end in torch.aminmax(value)):
        raise PleasccError(f"model {model} produces NaN or Inf at {node} on the calibration data; "
                           "check the checkpoint's weights and the data's preprocessing")


def feature_moments(gms: tuple[fx.GraphModule, fx.GraphModule], analysis: Analysis, data: torch.Tensor,
                    batch_size: int = 64, progress: bool = True, within: bool = False,
                    positions: int | None = None, outputs: LayerOutputs | None = None) -> dict[int, torch.Tensor]:
    """Per free space, the A×B correlation of its units, averaged over the sites that read it.

    Keys are root ids, and tuples of root ids for whole product axes (see
    ``observe``).  ``within``: spaces keyed by a root get the joint correlation
    of [A's units, B's units] instead.  ``positions``: a channels-first 2-D
    feature map is read at that many positions per sample (``sampled_positions``),
    a value whose batch axis is known at that many tokens (``at_tokens``).
    ``outputs``: also record the outputs of its layers there, for sequential least squares.
    """
    sites = _observation_sites(analysis)
    batch_axes = {name: analysis.batch_axis(name) for name, _, _ in sites}  # once, not per batch
    at_node: dict[str, list[int]] = {}
    for site, (name, _, _) in enumerate(sites):
        at_node.setdefault(name, []).append(site)
    layers = {layer.node: layer for layer in analysis.layers if layer.node in outputs.nodes} if outputs else {}
    moments: dict[tuple, CrossMoments] = {}
    with torch.no_grad():
        for batch, x in enumerate(batches(data, batch_size, "matching statistics", progress, device_of(gms[0]))):
            for name, values in lockstep(gms, x, {name: (name,) for name in [*at_node, *layers]}):
                for site in at_node.get(name, ()):
                    _add_site(analysis, moments, site, sites[site], batch_axes[name], values[name], within,
                              positions)
                if name in layers:
                    _record_output(outputs, layers[name], batch, values[name], positions)
    by_root: dict[int | tuple, list[torch.Tensor]] = {}
    for m in moments.values():  # the same keys in the same order on every rank
        m.reduce()
    for (_, _, root), m in moments.items():
        by_root.setdefault(root, []).append(m.correlation().cpu())  # matching runs on the CPU
    return {root: torch.stack(corrs).mean(0) for root, corrs in by_root.items()}


def _add_site(analysis: Analysis, moments: dict[tuple, CrossMoments], site: int, where: tuple,
              batch_axis: int | None, values: list[torch.Tensor], within: bool, positions: int | None) -> None:
    """One batch's A and B features at one observation site, added to its spaces' moments."""
    name, axes, dims = where
    observed = [_observed_positions(v, axes, batch_axis, positions) for v in values]
    _checked([value for value, _ in observed], name)
    pairs = zip(*(observe(analysis.table, v, read_axes, dims) for v, read_axes in observed))
    for k, ((root, fa), (_, fb)) in enumerate(pairs):
        key = (site, k, root)
        if key not in moments:
            moments[key] = CrossMoments(fa.shape[1], within=within and isinstance(root, int))
        moments[key].add(fa, fb)


def _observed_positions(value: torch.Tensor, axes: tuple[int, ...], batch_axis: int | None,
                        positions: int | None) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A value and its unit axes as observed: an (N, C, H, W) map along C at ``sampled_positions``;
    a value whose samples are on ``batch_axis`` at sampled tokens (``at_tokens``); others whole."""
    if value.dim() == 4 and tuple(axes) == (1,):
        return at_positions(value, positions), axes
    if batch_axis is None or positions is None:
        return value, axes
    tokens = at_tokens(value, batch_axis, axes, positions)
    return tokens, tuple(range(2, tokens.dim()))


def _observation_sites(analysis: Analysis) -> list[tuple[str, tuple[int, ...], tuple[Dim, ...]]]:
    """Where features are compared: what layers read, and what the analysis adds (attention's q and k)."""
    sites = dict.fromkeys((layer.source, (layer.in_axis,), (layer.in_dim,)) for layer in analysis.layers)
    sites.update(dict.fromkeys(analysis.sites))
    return list(sites)


# ---------------------------------------------------------------- least-squares moments


@dataclass
class Problem:
    """One least-squares fit: a layer and how to build its target from A's and B's outputs."""

    layer: Layer
    target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    name: str
    w0: torch.Tensor  # warm start, (groups, out/groups, d+1); the fit solves for W − W0
    model: int | None = None  # a separate head of model 0 or 1; None: the merged layer
    block: Block = field(default_factory=Block)  # which output rows, from which input units
    xx: torch.Tensor | None = None  # (groups, d+1, d+1): merged inputs (+1 for the bias)
    rx: torch.Tensor | None = None  # (groups, out/groups, d+1): residual T − W0·X against inputs
    count: float = 0.0
    tt: float = 0.0  # ‖T‖²
    rr: float = 0.0  # ‖T − W0·X‖²
    w: torch.Tensor | None = None  # the fit, once solved
    grams: dict[int, torch.Tensor] = field(default_factory=dict)  # RegMean: each model's own inputs' Gram
    fused: FusedNorm | None = None  # the norm after this convolution block, fitted in its pass (``fused_norms``)


@dataclass
class MergedReads:
    """What sequential least squares reads in a pass: the merged model's own inputs at the layers, resumed
    from ``frontier``, and A's and B's outputs there, recorded in the matching pass (``LayerOutputs``).
    ``tick``: called after each batch (the whole phase's progress bar)."""

    model: fx.GraphModule
    inputs: dict[str, str]  # layer node -> the merged model's node that feeds it (``emit.layer_inputs``)
    frontier: Frontier
    outputs: LayerOutputs
    tick: Callable[[], None] = lambda: None


def layer_moments(gms: tuple[fx.GraphModule, fx.GraphModule], analysis: Analysis, maps: MergeMaps,
                  problems: list[Problem], data: torch.Tensor, batch_size: int = 64,
                  progress: bool = True, merged: MergedReads | None = None, positions: int | None = None) -> None:
    """Accumulate each problem's input and target moments, in the merged layout (in place).

    Inputs are A's and B's features mapped to the merged layout (one pass), or,
    given ``merged``, the merged model's own features (the sequential variant).
    ``positions``: convolutions and normalizations read at most that many
    spatial positions per sample (``sampled_positions``), linear layers that
    many tokens (``at_tokens``).
    """
    by_node: dict[str, list[ProblemRead]] = {}
    grams: dict[tuple, GramSum] = {}  # (node, rows key) -> its Gram, summed over batches
    device = device_of(gms[0])
    for p in problems:
        key = _rows_key(p, maps)
        columns = _block_columns(p, maps) if key is None and p.block.cols is not None else None
        by_node.setdefault(p.layer.node, []).append(ProblemRead(p, key, columns, p.w0.to(device, torch.float32)))
    layers = {node: group[0].problem.layer for node, group in by_node.items()}
    fused = {node: sorted({r.problem.fused.norm.layer.node for r in group if r.problem.fused})
             for node, group in by_node.items()}
    if merged:
        merged.frontier.start(merged.model, sorted({merged.inputs[node] for node in layers}))
    with torch.no_grad(), threadpool_limits(torch.get_num_threads(), user_api="blas"):  # syrk's threads too
        for batch, x in enumerate(batches(data, batch_size, "least-squares statistics", progress and not merged,
                                          device)):
            reads = (_merged_model_reads(merged, batch, x, layers, fused, positions)
                     if merged else _mapped_reads(gms, maps, x, layers, positions))
            for node, x_merged, outputs in reads:  # one layer's merged input and rows alive at a time
                _add_layer(by_node[node], x_merged, outputs, maps, grams)
            if merged:
                merged.tick()
    if merged:
        merged.frontier.finish()
    totals = {k: mirror_upper(distributed.total(g.result())) for k, g in grams.items()}  # over every rank's shard
    for p, key, columns, _ in (read for group in by_node.values() for read in group):
        p.xx = totals[p.layer.node, key]
        if columns is not None:
            columns = columns.to(p.xx.device)
            p.xx = p.xx[:, columns][:, :, columns]
        p.rx, p.count = distributed.total(p.rx), distributed.total(p.count)
        p.tt, p.rr = distributed.total(p.tt), distributed.total(p.rr)
        if p.fused:
            p.fused.total(distributed.total)


def layer_outputs(gms: tuple[fx.GraphModule, fx.GraphModule], analysis: Analysis, data: torch.Tensor,
                  outputs: LayerOutputs, batch_size: int = 64, positions: int | None = None,
                  tick: Callable[[], None] = lambda: None) -> None:
    """Record A's and B's outputs at ``outputs.nodes`` as their fits read them, in a pass of their own (the
    matching pass records the first ones: ``feature_moments``); it stops after the last of them."""
    layers = {layer.node: layer for layer in analysis.layers if layer.node in outputs.nodes}
    with torch.no_grad():
        for batch, x in enumerate(batches(data, batch_size, "layer outputs", False, device_of(gms[0]))):
            for name, values in lockstep(gms, x, {name: (name,) for name in layers}):
                _record_output(outputs, layers[name], batch, values[name], positions)
            tick()


def _record_output(outputs: LayerOutputs, layer: Layer, batch: int, values: list[torch.Tensor],
                   positions: int | None) -> None:
    """A layer's outputs as its fit reads them, copied where the read shares the value's memory: the pass
    goes on, and may overwrite the value in place (``lockstep``'s in-place twins)."""
    reads = _read_outputs(layer, values, positions)
    outputs.add(layer.node, batch, [r.clone() if r.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
                                    else r for r, v in zip(reads, values)])


# a layer's node, its merged input, and A's and B's outputs read at it (and at the norms fused into it)
LayerRead = tuple[str, torch.Tensor, dict[str, list[torch.Tensor]]]


class ProblemRead(NamedTuple):
    """What one problem reads of its layer's batches: its rows (``_rows_key``), its block's columns of them
    (None: all), and its warm start in the rows' precision (converted once, not every batch)."""

    problem: Problem
    key: tuple | None
    columns: torch.Tensor | None
    warm_start: torch.Tensor


def _mapped_reads(gms, maps: MergeMaps, x: torch.Tensor, layers: dict[str, Layer], positions: int | None
                  ) -> Iterator[LayerRead]:
    """One pass: each layer's merged input is A's and B's inputs mapped to the merged layout, layer by layer
    as the models run (``lockstep``)."""
    for node, values in lockstep(gms, x, {node: (layer.source, node) for node, layer in layers.items()}):
        layer = layers[node]
        merged_input = _merged_input(layer, values[layer.source], values[node][0], maps, positions)
        yield node, merged_input, {node: _read_outputs(layer, values[node], positions)}


def _read_outputs(layer: Layer, values: list[torch.Tensor], positions: int | None) -> list[torch.Tensor]:
    """A's and B's outputs of a layer as its fit reads them (``_read_layer_value``), checked (``_checked``)."""
    return _checked([_read_layer_value(layer, v, positions) for v in values], layer.node)


def _merged_input(layer: Layer, inputs: list[torch.Tensor], output: torch.Tensor, maps: MergeMaps,
                  positions: int | None) -> torch.Tensor:
    """A layer's merged input as its fit reads it (``_read_input``), from A's and B's inputs.

    The merge maps units one by one, so it commutes with reading patches or
    positions.  A convolution whose patches hold more values per channel
    than its input map (ResNet-50's last stages: 9·64 from 14² or 7²) merges
    the maps first and reads patches once; other layers read first, so the
    merge touches only what is read.
    """
    if layer.kind == "conv" and _patch_values(layer, output, positions) >= math.prod(inputs[0].shape[2:]):
        return _read_input(layer, maps.merge(_checked(inputs, layer.source), [(1, layer.in_dim)]), positions)
    read = _checked([_read_input(layer, v, positions) for v in inputs], layer.source)
    return maps.merge(read, [(_unit_axis(layer), layer.in_dim)])


def _patch_values(layer: Layer, output: torch.Tensor, positions: int | None) -> int:
    """Values per input channel a convolution's patches hold: its kernel's size at each output position read."""
    outputs = math.prod(output.shape[2:])
    return _kernel_positions(layer) * (outputs if positions is None else min(outputs, positions))


def _merged_model_reads(merged: MergedReads, batch: int, x: torch.Tensor, layers: dict[str, Layer],
                        fused: dict[str, list[str]], positions: int | None) -> Iterator[LayerRead]:
    """Sequential: each layer's merged input is the merged model's own, resumed from the frontier.
    ``fused``: each layer's norms fitted in its pass, whose outputs are read with its own."""
    merged.frontier.read_ahead(batch + 1)  # read from disk while this batch computes
    merged.outputs.read_ahead([n for node in layers for n in (node, *fused[node])], batch + 1)
    inputs = merged.frontier.run(batch, x)
    for node, layer in layers.items():
        source = merged.inputs[node]
        read = _read_input(layer, inputs[source], positions)
        _check_finite(read, "merged", source)
        yield node, read, {n: merged.outputs.pop(n, batch) for n in (node, *fused[node])}


def _add_layer(group: list[ProblemRead], x_merged: torch.Tensor,
               outputs: dict[str, list[torch.Tensor]], maps: MergeMaps, grams: dict[tuple, GramSum]) -> None:
    """One batch of one layer: its Grams (one per rows key) and each of its problems' target moments, from
    its merged input and A's and B's outputs as its fit reads them (and at the norms fused into it)."""
    layer = group[0].problem.layer
    axis = _unit_axis(layer)
    rows: dict[tuple | None, torch.Tensor] = {}
    for p, key, columns, warm_start in group:
        if key not in rows:
            x_in = x_merged if key is None else take(x_merged, axis, p.block.cols.to(x_merged.device))
            gram = grams.setdefault((layer.node, key), GramSum())
            if layer.kind == "norm":  # its values as read: moments per channel (``_norm_gram``)
                rows[key] = x_in
                gram.add_product(_norm_gram(x_in))
            else:
                rows[key] = _rows(layer, x_in, maps)
                gram.add(rows[key])
        y = _block_target(p, outputs)
        if layer.kind == "norm":
            _accumulate_norm(p, rows[key], y, warm_start)
            continue
        inputs = rows[key] if columns is None else take(rows[key], 2, columns.to(x_merged.device))
        prediction = inputs @ warm_start.transpose(1, 2)
        _accumulate(p, inputs, _target_rows(layer, y, maps), prediction)
        if p.fused:
            norm_target = _block_target(p.fused.norm, outputs, p.block.rows)
            p.fused.add(inputs, prediction, _target_rows(layer, norm_target, maps))


def _block_target(p: Problem, outputs: dict[str, list[torch.Tensor]], rows: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``p``'s target from A's and B's outputs at its layer, at its block's rows (or at ``rows``)."""
    layer = p.layer
    y = p.target(*outputs[layer.node])
    rows = p.block.rows if rows is None else rows
    return y if rows is None else take(y, layer.out_axis, rows.to(y.device))


def _rows_key(p: Problem, maps: MergeMaps) -> tuple | None:
    """Which rows (and Gram) a problem reads: None for all the merged input's units, else its block's.

    A one-group convolution or linear layer's blocks read columns of the
    full rows, so they share its Gram (an A-only block's is a submatrix of
    it): one Gram per layer, not one per block.
    """
    layer, cols = p.layer, p.block.cols
    one_group = layer.kind == "linear" or layer.kind == "conv" and (
        layer.groups_dim is None or maps.size(layer.groups_dim) == 1)
    return None if cols is None or one_group else tuple(cols.tolist())


def _block_columns(p: Problem, maps: MergeMaps) -> torch.Tensor:
    """The columns of a one-group layer's rows its block reads: its units' (channel-major, as im2col
    lays them out), and the bias column."""
    per_unit = _kernel_positions(p.layer)
    units = p.block.cols[:, None] * per_unit + torch.arange(per_unit)
    return torch.cat([units.flatten(), torch.tensor([maps.size(p.layer.in_dim) * per_unit])])


def _kernel_positions(layer: Layer) -> int:
    """Columns of a layer's rows per input unit: a convolution's kernel size, else 1."""
    return math.prod(_pair(layer.conv["kernel_size"])) if layer.kind == "conv" else 1


def gram_moments(gms: tuple[fx.GraphModule, fx.GraphModule], maps: MergeMaps, problems: list[Problem],
                 data: torch.Tensor, batch_size: int = 64, progress: bool = True,
                 positions: int | None = None) -> None:
    """RegMean's statistics: each model's own layer inputs in the merged layout, as Gram matrices (in place).

    A block's rows that only one model feeds see only that model's inputs.
    ``positions``: read as least squares reads them (``_read_input``); both
    models' Grams then shrink by the same factor, which RegMean's solution
    does not see.
    """
    by_source: dict[str, list[tuple[Problem, list[int]]]] = {}  # with the models each block's rows stand for
    for p in problems:
        by_source.setdefault(p.layer.source, []).append((p, _feeding(maps, p)))
    grams: dict[tuple, GramSum] = {}  # (node, model, block's columns) -> that model's Gram
    with torch.no_grad(), threadpool_limits(torch.get_num_threads(), user_api="blas"):  # syrk's threads too
        for x in batches(data, batch_size, "RegMean statistics", progress, device_of(gms[0])):
            for source, values in lockstep(gms, x, {source: (source,) for source in by_source}):
                added: set[tuple] = set()
                for p, models in by_source[source]:
                    layer, cols = p.layer, p.block.cols
                    for model in models:
                        key = _regmean_key(p, model)
                        if key not in added:
                            axis = _unit_axis(layer)
                            x_in = _read_input(layer, values[source][model], positions)
                            _check_finite(x_in, "AB"[model], source)
                            x_in = maps.gather(x_in, model, [(axis, layer.in_dim)])
                            x_in = x_in if cols is None else take(x_in, axis, cols.to(x_in.device))
                            grams.setdefault(key, GramSum()).add(_rows(layer, x_in, maps))
                            added.add(key)
    totals = {key: mirror_upper(distributed.total(g.result())) for key, g in grams.items()}
    for p, models in (read for group in by_source.values() for read in group):
        p.grams = {model: totals[_regmean_key(p, model)] for model in models}


def _regmean_key(p: Problem, model: int) -> tuple:
    """Which Gram a RegMean problem reads of one model: its layer's, of its block's columns."""
    return p.layer.node, model, None if p.block.cols is None else tuple(p.block.cols.tolist())


def _feeding(maps: MergeMaps, p: Problem) -> list[int]:
    """The models whose units a block's output rows stand for."""
    if p.model is not None:
        return [p.model]
    fed = [maps.participation(p.layer.out_dim, m) > 0 for m in (0, 1)]
    rows = p.block.rows
    return [m for m in (0, 1) if bool((fed[m] if rows is None else fed[m][rows]).any())]


@functools.lru_cache(maxsize=None)
def sampled_positions(length: int, most: int | None) -> torch.Tensor | None:
    """A fixed random subset of ``most`` of a feature map's ``length`` spatial positions; None: all of them.

    A 3×3 convolution's least squares has 9·C_in unknowns per output but
    N·H·W rows, and its Gram costs ~4.5× the convolution itself; far fewer
    rows determine the fit (and a BatchNorm's two unknowns, or matching's
    correlations, need fewer still).  The subset is the same for every
    sample, so a sharded merge reads the same rows as a single process.
    """
    if most is None or length <= most:
        return None
    generator = torch.Generator().manual_seed(length)
    return torch.randperm(length, generator=generator)[:most].sort().values


def at_positions(x: torch.Tensor, positions: int | None) -> torch.Tensor:
    """A channels-first (N, C, *spatial) tensor as (N, C, positions read): ``sampled_positions`` of its spatial ones."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    keep = sampled_positions(flat.shape[2], positions)
    return flat if keep is None else take(flat, 2, keep.to(flat.device))


def at_tokens(x: torch.Tensor, batch_axis: int, unit_axes: tuple[int, ...], positions: int | None) -> torch.Tensor:
    """``x`` as (N, tokens read, *units): its samples first, its units last, the axes between (tokens,
    within one sample) flattened and read at ``sampled_positions``."""
    unit_axes = tuple(a % x.dim() for a in unit_axes)
    x = torch.movedim(x, (batch_axis, *unit_axes), (0, *range(-len(unit_axes), 0)))
    flat = x.reshape(x.shape[0], -1, *x.shape[x.dim() - len(unit_axes):])
    keep = sampled_positions(flat.shape[1], positions)
    return flat if keep is None else flat.index_select(1, keep.to(flat.device))


def _read_layer_value(layer: Layer, v: torch.Tensor, positions: int | None) -> torch.Tensor:
    """A layer's input or output as its fit reads it: channels-first maps at ``sampled_positions``, a linear
    layer's value at sampled tokens where the analysis knows its batch axis (units stay last)."""
    if layer.kind == "linear":
        return v if layer.batch_axis is None else at_tokens(v, layer.batch_axis, (-1,), positions)
    return at_positions(v, positions)


def _read_input(layer: Layer, x: torch.Tensor, positions: int | None) -> torch.Tensor:
    """What a layer's fit reads of one input, before the models' are merged along ``_unit_axis``.

    A convolution's: its im2col patches at the sampled output positions,
    as (N, C, k·P); a normalization's: (N, C, P); a linear layer's: (N, tokens
    read, C) where its batch axis is known, else all of it.  Sampling first
    means the merge only touches the values that are read.
    """
    if layer.kind == "conv":
        return _patches(x, layer.conv, positions).reshape(x.shape[0], x.shape[1], -1)
    return _read_layer_value(layer, x, positions)


def _unit_axis(layer: Layer) -> int:
    """The axis of ``_read_input``'s result that holds the layer's input units."""
    return layer.in_axis if layer.kind == "linear" else 1


def _rows(layer: Layer, x: torch.Tensor, maps: MergeMaps) -> torch.Tensor:
    """Merged ``_read_input`` as (groups, samples, features per group), with a ones column for the bias,
    in the input's precision (float32: see ``GramSum``)."""
    if layer.kind == "conv":
        groups = maps.size(layer.groups_dim) if layer.groups_dim is not None else 1
        n, per_group = x.shape[0], x.shape[1] // groups * _kernel_positions(layer)
        cols = x.reshape(n, groups, per_group, -1).permute(1, 0, 3, 2)  # (groups, N, P, features)
    else:
        cols = x.reshape(1, -1, x.shape[-1])
    rows = cols.new_empty(*cols.shape[:-1], cols.shape[-1] + 1)  # one copy: layout and ones
    rows[..., :-1] = cols
    rows[..., -1] = 1
    return rows.reshape(cols.shape[0], -1, rows.shape[-1])


def _target_rows(layer: Layer, y: torch.Tensor, maps: MergeMaps) -> torch.Tensor:
    """Target (sampled like ``_read_input``: (N, C, P) for convolutions) as (groups, samples, outputs per
    group), matching ``_rows``."""
    if layer.kind == "conv":
        groups = maps.size(layer.groups_dim) if layer.groups_dim is not None else 1
        n, c = y.shape[:2]
        return y.reshape(n, groups, c // groups, -1).permute(1, 0, 3, 2).reshape(groups, -1, c // groups)
    return y.reshape(-1, y.shape[-1]).unsqueeze(0)


def _patches(x: torch.Tensor, conv: dict, positions: int | None) -> torch.Tensor:
    """im2col (N, C·k, L) of a 1- or 2-D convolution's input, at ``sampled_positions`` of its L outputs.

    Only the sampled patches are gathered, from the unpadded map, with zeros
    where a patch reaches into the padding: a full im2col is k× the input,
    and padding the map first copied all of it to read k·64 values per
    channel (5–10× slower for ResNet-50's first three stages).
    """
    if isinstance(conv["padding"], str):
        raise PleasccError("least squares for convolutions with string padding is not supported; "
                           "use --method permute")
    if x.dim() == 3:  # 1-D: a 2-D convolution of height 1
        one = {k: (1, _pair(v)[0]) for k, v in conv.items()}
        one["padding"] = (0, _pair(conv["padding"])[0])
        return _patches(x.unsqueeze(2), one, positions)
    if x.dim() != 4:
        raise PleasccError("least squares for 3-D convolutions is not supported yet; use --method permute")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(conv[k]) for k in ("kernel_size", "stride", "padding", "dilation"))
    out_h = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    keep = sampled_positions(out_h * out_w, positions)
    if keep is None:
        return F.unfold(x, (kh, kw), (dh, dw), (ph, pw), (sh, sw))
    keep, (h, w) = keep.to(x.device), x.shape[2:]
    rows = (keep // out_w * sh - ph)[None, :] + (torch.arange(kh, device=x.device) * dh)[:, None]  # (kh, P)
    cols = (keep % out_w * sw - pw)[None, :] + (torch.arange(kw, device=x.device) * dw)[:, None]  # (kw, P)
    index = rows.clamp(0, h - 1)[:, None, :] * w + cols.clamp(0, w - 1)[None, :, :]  # (kh, kw, P) into the map
    patches = take(x.reshape(*x.shape[:2], h * w), 2, index.reshape(-1))
    inside = ((rows >= 0) & (rows < h))[:, None, :] & ((cols >= 0) & (cols < w))[None, :, :]
    if not bool(inside.all()):
        patches.masked_fill_(~inside.reshape(-1), 0)
    return patches.reshape(x.shape[0], -1, len(keep))


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


SYRK_MIN = 128  # columns from which one group's Gram goes to BLAS syrk
FLUSH_ROWS = 8192  # rows a float32 partial Gram sums before it is added to the float64 total


class GramSum:
    """rowsᵀ·rows per group, summed over batches; only the upper triangle is meant (see ``mirror_upper``).

    Products are float32, as the rows are: one group of many columns goes to
    BLAS ssyrk, which computes one triangle (half a matrix product's flops; a
    3×3 convolution's im2col Gram, 9·C_in columns, is the bulk of a merge's
    work) at twice dsyrk's speed, adding in place into a float32 partial sum.
    Every ``FLUSH_ROWS`` rows the partial sum goes into the float64 total, so
    rounding never builds up over more rows than that, however many samples
    there are; flushing every batch would cost as much as the float32 saved.
    Other shapes take a batched product, added to the total each batch.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None  # float64
        self.partial: np.ndarray | None = None  # float32, Fortran order: its lower triangle is the upper one
        self.partial_rows = 0

    def add(self, rows: torch.Tensor) -> None:
        groups, n, d = rows.shape
        if groups > 1 or d < SYRK_MIN or rows.device.type != "cpu" or rows.dtype != torch.float32:
            self.add_product(rows.transpose(1, 2) @ rows)
            return
        if self.partial is None:
            self.partial = np.zeros((d, d), dtype=np.float32, order="F")
        out = blas.ssyrk(1.0, rows[0].numpy().T, beta=1.0, c=self.partial, trans=0, lower=1, overwrite_c=1)
        if not np.shares_memory(out, self.partial):  # f2py had to copy
            self.partial[...] = out
        self.partial_rows += n
        if self.partial_rows >= FLUSH_ROWS:
            self._flush()

    def add_product(self, gram: torch.Tensor) -> None:
        """One batch's (groups, d, d) product, formed already (``_norm_gram``)."""
        self.total = gram.double() if self.total is None else self.total.add_(gram)

    def _flush(self) -> None:
        if self.partial_rows:
            d = self.partial.shape[0]
            self.total = torch.zeros(1, d, d, dtype=torch.float64) if self.total is None else self.total
            self.total[0].T.add_(torch.from_numpy(self.partial))  # the same layout: a streaming add
            self.partial.fill(0)
            self.partial_rows = 0

    def result(self) -> torch.Tensor:
        """The float64 sum so far, upper triangle (``mirror_upper``); the partial sum's memory is freed."""
        self._flush()
        self.partial = None
        return self.total


MIRROR_BLOCK = 512  # rows per step of ``mirror_upper``: a strip small enough to stay in cache


def mirror_upper(m: torch.Tensor) -> torch.Tensor:
    """``m``, each (d, d) matrix's upper triangle copied onto its lower one in place (a ``GramSum``'s result).

    ssyrk fills one triangle only.  Building the symmetric matrix as
    triu + triu(1)ᵀ took three d×d float64 copies per Gram, 2.6 s of a
    ResNet-50 merge (6% of its forward floor); a strip at a time, it
    needs no copy the size of the matrix.
    """
    d = m.shape[-1]
    for start in range(0, d, MIRROR_BLOCK):
        end = min(start + MIRROR_BLOCK, d)
        m[..., end:, start:end] = m[..., start:end, end:].transpose(-2, -1)
        corner = m[..., start:end, start:end]
        corner.copy_(corner.triu() + corner.triu(1).transpose(-2, -1))
    return m


def _accumulate(p: Problem, inputs: torch.Tensor, target: torch.Tensor, prediction: torch.Tensor) -> None:
    """One batch of the target's moments with the layer's rows, whose Gram is the layer's (``_rows_key``).

    What is summed is the residual against the warm start, R = T − W0·X
    (``prediction``: W0·X), formed per batch: for a model merged with itself R is float32 rounding,
    and R·Xᵀ stays at its size.  Forming R·Xᵀ from the sums instead, as
    T·Xᵀ − W0·(X·Xᵀ), would take the difference of two large sums, each
    rounded in float32 with the Gram (``GramSum``), and move a self-merge's
    weights visibly through an ill-conditioned Gram.  Products are float32,
    sums across batches float64, added to in place (no float64 copy of each product).
    """
    residual = target - prediction
    rx = residual.transpose(1, 2) @ inputs
    p.rx = rx.double() if p.rx is None else p.rx.add_(rx)
    p.count += inputs.shape[1]
    p.tt += _square_sum(target)
    p.rr += _square_sum(residual)


def _norm_gram(x: torch.Tensor) -> torch.Tensor:
    """A normalization's Gram per channel of its read input (N, C, P): [[Σx², Σx], [Σx, n]], as (C, 2, 2).

    Its fit has two unknowns per channel (γ, β), so its moments are sums over
    each channel's values, reduced in the maps' own layout, not formed as
    (C, N·P, 2) rows through batched 1×2 products (slow, channels-last slower).
    """
    total, square = x.sum((0, 2)), x.square().sum((0, 2))
    gram = torch.stack([square, total, total, torch.full_like(total, x.shape[0] * x.shape[2])], dim=1)
    return gram.reshape(-1, 2, 2)


def _accumulate_norm(p: Problem, x: torch.Tensor, target: torch.Tensor, warm_start: torch.Tensor) -> None:
    """``_accumulate`` for a normalization, on its read input and target (N, C, P) as they are: the
    residual against the warm start's γ·x + β per channel, and its sums with x and with 1."""
    gamma, beta = warm_start[:, 0, 0, None], warm_start[:, 0, 1, None]
    residual = target - (x * gamma + beta)
    rx = torch.stack([(residual * x).sum((0, 2)), residual.sum((0, 2))], dim=1).unsqueeze(1)
    p.rx = rx.double() if p.rx is None else p.rx.add_(rx)
    p.count += x.shape[0] * x.shape[2]
    p.tt += _square_sum(target)
    p.rr += _square_sum(residual)


def _square_sum(x: torch.Tensor) -> float:
    """‖x‖²: the norms along its innermost stored axis (a streaming read, channels-last maps too) in its own
    precision, their squares summed in float64 (converting all of it to float64 first cost a twentieth of a
    ResNet-50 merge)."""
    inner = min((a for a in range(x.dim()) if x.shape[a] > 1), key=x.stride, default=x.dim() - 1)
    return float(torch.linalg.vector_norm(x, dim=inner).double().square().sum())
