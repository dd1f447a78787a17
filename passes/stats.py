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
quadratically more memory and time than the merged-layout moments.  Where
what the second reads fits memory and disk, the first pass records it (each
layer's inputs before the merge, and its outputs: ``record_input``), and the
second runs no model (``_recorded_reads``).
Sums over the data are float64; products within a batch are float32 (least
squares' widest Grams sum a few batches in float32 first: ``GramSum``).

This module holds the second pass, and RegMean's Grams (``gram_moments``);
the first, matching's, is ``matching_stats``.  Both run the models with
``executor.lockstep`` in ``batching``'s batches and read layers as
``reads`` says; the Grams are summed by ``gram.GramSum``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple

import torch
import torch.fx as fx
from threadpoolctl import threadpool_limits

from pleascc.passes import distributed
from pleascc.passes.batching import batches, device_of
from pleascc.passes.errors import PleasccError, model_name
from pleascc.passes.executor import lockstep
from pleascc.passes.frontier import Frontier, LayerReads
from pleascc.passes.gram import GramSum, mirror_upper
from pleascc.passes.groups import Analysis, Layer
from pleascc.passes.merge_maps import Block, MergeMaps, take

if TYPE_CHECKING:
    from pleascc.passes.fused_norms import FusedNorm


@dataclass
class Problem:
    """One least-squares fit: a layer and how to build its target from A's and B's outputs."""

    layer: Layer
    target: Callable[..., torch.Tensor]  # the models' outputs -> the fit's target
    name: str
    w0: torch.Tensor  # warm start, (groups, out/groups, d+1); the fit solves for W − W0
    model: int | None = None  # a separate head of model 0, 1, …; None: the merged layer
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
    from ``frontier``, and A's and B's outputs there, recorded in the matching pass (``LayerReads``).
    ``tick``: called after each batch (the whole phase's progress bar)."""

    model: fx.GraphModule
    inputs: dict[str, str]  # layer node -> the merged model's node that feeds it (``emit.layer_inputs``)
    frontier: Frontier
    outputs: LayerReads
    tick: Callable[[], None] = lambda: None


def layer_moments(gms: tuple[fx.GraphModule, fx.GraphModule], analysis: Analysis, maps: MergeMaps,
                  problems: list[Problem], data: torch.Tensor, batch_size: int = 64,
                  progress: bool = True, merged: MergedReads | None = None, positions: int | None = None,
                  recorded: LayerReads | None = None) -> None:
    """Accumulate each problem's input and target moments, in the merged layout (in place).

    Inputs are A's and B's features mapped to the merged layout (one pass; from
    what the matching pass recorded, given ``recorded``), or, given ``merged``,
    the merged model's own features (the sequential variant).
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
            reads = (_merged_model_reads(merged, batch, x, layers, fused, positions) if merged
                     else _recorded_reads(recorded, batch, layers, maps, positions) if recorded
                     else _mapped_reads(gms, maps, x, layers, positions))
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
        if not merged and not _finite_sums(p):  # one pass: its reads are checked summed (``_mapped_reads``)
            _name_non_finite(gms, data, batch_size, p.layer)


def layer_outputs(gms: tuple[fx.GraphModule, fx.GraphModule], analysis: Analysis, data: torch.Tensor,
                  outputs: LayerReads, batch_size: int = 64, positions: int | None = None,
                  tick: Callable[[], None] = lambda: None) -> None:
    """Record A's and B's outputs at ``outputs.nodes`` as their fits read them, in a pass of their own (the
    matching pass records the first ones: ``feature_moments``); it stops after the last of them."""
    layers = {layer.node: layer for layer in analysis.layers if layer.node in outputs.nodes}
    with torch.no_grad():
        for batch, x in enumerate(batches(data, batch_size, "layer outputs", False, device_of(gms[0]))):
            for name, values in lockstep(gms, x, {name: (name,) for name in layers}):
                record_output(outputs, layers[name], batch, values[name], positions)
            tick()


def record_output(outputs: LayerReads, layer: Layer, batch: int, values: list[torch.Tensor],
                  positions: int | None) -> None:
    """A layer's outputs as its fit reads them, checked (``checked``); for one-pass least squares
    (``LayerReads.inputs``) unchecked, as ``_mapped_reads`` leaves them, and its inputs too (``record_input``)."""
    reads = [layer.read_value(v, positions) for v in values]
    outputs.add("output", layer.node, batch,
                _copied_if_shared(reads if outputs.inputs else checked(reads, layer.node), values))


def record_input(outputs: LayerReads, layer: Layer, batch: int, inputs: list[torch.Tensor], output: torch.Tensor,
                 positions: int | None) -> None:
    """A layer's inputs as one-pass least squares will merge them (``unmerged_reads``); not again where they
    are another layer's outputs as recorded (``LayerReads.shared``: a convolution's, read by its norm)."""
    if layer.node in outputs.shared:
        return
    whole, reads = unmerged_reads(layer, inputs, output, positions)
    outputs.add("input", layer.node, batch, (whole, _copied_if_shared(reads, inputs)))


def _copied_if_shared(reads: list[torch.Tensor], values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Reads of the pass's values, copied where they share a value's memory: the pass goes on, and may
    overwrite the value in place (``lockstep``'s in-place twins)."""
    return [r.clone() if r.untyped_storage().data_ptr() == v.untyped_storage().data_ptr() else r
            for r, v in zip(reads, values)]


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
    as the models run (``lockstep``).

    Unchecked: the matching pass checked these models on these data, at the
    sites it reads, and NaN or Inf anywhere else reaches the sums, checked
    once per layer after the pass (``_check_finite_sums``); checking every
    read again cost a twentieth of a one-pass merge.
    """
    for node, values in lockstep(gms, x, {node: (layer.source, node) for node, layer in layers.items()}):
        layer = layers[node]
        merged_input = _merged_input(layer, values[layer.source], values[node][0], maps, positions)
        yield node, merged_input, {node: [layer.read_value(v, positions) for v in values[node]]}


def checked(values: list[torch.Tensor], node: str) -> list[torch.Tensor]:
    """What a pass reads of ``node``'s value in each model, checked for NaN and Inf (``_check_finite``).

    Checked as read, after sampling, not as computed: the statistics see
    only what is read, and checking whole activations costs a pass over the
    memory of every value read.  A NaN off the sampled positions spreads to
    later layers' and is found there.
    """
    for model, value in enumerate(values):
        _check_finite(value, model_name(model), node)
    return values


def _check_finite(value: torch.Tensor, model: str, node: str) -> None:
    """NaN and Inf reach a tensor's least or greatest value, so one reduction checks it all; unlike a sum's,
    its result cannot overflow (large activations, as in randomly initialised deep nets, would send every
    value to an element-by-element check)."""
    if value.numel() and not all(torch.isfinite(end) for end in torch.aminmax(value)):
        raise PleasccError(f"model {model} produces NaN or Inf at {node} on the calibration data; "
                           "check the checkpoint's weights and the data's preprocessing")


def _merged_input(layer: Layer, inputs: list[torch.Tensor], output: torch.Tensor, maps: MergeMaps,
                  positions: int | None) -> torch.Tensor:
    """A layer's merged input as its fit reads it (``Layer.read_input``), from A's and B's inputs."""
    return merged_reads(layer, *unmerged_reads(layer, inputs, output, positions), maps, positions)


def unmerged_reads(layer: Layer, inputs: list[torch.Tensor], output: torch.Tensor, positions: int | None
                   ) -> tuple[bool, list[torch.Tensor]]:
    """What of A's and B's inputs the merge reads: whole (True) or as the fit reads them (``read_input``).

    The merge maps units one by one, so it commutes with reading patches or
    positions.  Where reading holds more values than the inputs (a
    convolution's patches: ``ConvLayer.merges_first``) the inputs are merged
    whole, then read once; otherwise read first, so the merge touches only
    what is read.
    """
    if layer.merges_first(tuple(inputs[0].shape), tuple(output.shape), positions):
        return True, inputs
    return False, [layer.read_input(v, positions) for v in inputs]


def merged_reads(layer: Layer, whole: bool, reads: list[torch.Tensor], maps: MergeMaps, positions: int | None
                 ) -> torch.Tensor:
    """``unmerged_reads``' result merged, and read if it was whole: the layer's merged input as its fit reads it."""
    merged = maps.merge(reads, [(layer.unit_axis, layer.in_dim)])
    return layer.read_input(merged, positions) if whole else merged


def _finite_sums(p: Problem) -> bool:
    """Whether NaN or Inf stayed out of what a problem read: its inputs' Gram and its targets' moments."""
    return bool(torch.isfinite(p.xx).all() and torch.isfinite(p.rx).all())


def _name_non_finite(gms: tuple[fx.GraphModule, fx.GraphModule], data: torch.Tensor, batch_size: int,
                     layer: Layer) -> None:
    """Raise naming the model and node (the layer's input or output) that gave NaN or Inf: a pass of its own,
    on the error's path only."""
    reads = (layer.source, layer.node)
    with torch.no_grad():
        for x in batches(data, batch_size, "", False, device_of(gms[0])):
            for _, values in lockstep(gms, x, {layer.node: reads}):
                for node in reads:
                    checked(values[node], node)
    raise PleasccError(f"least squares' statistics at {layer.node} overflow float32 on the calibration data; "
                       "check the checkpoints' weights and the data's preprocessing")


def _merged_model_reads(merged: MergedReads, batch: int, x: torch.Tensor, layers: dict[str, Layer],
                        fused: dict[str, list[str]], positions: int | None) -> Iterator[LayerRead]:
    """Sequential: each layer's merged input is the merged model's own, resumed from the frontier.
    ``fused``: each layer's norms fitted in its pass, whose outputs are read with its own."""
    merged.frontier.read_ahead(batch + 1)  # read from disk while this batch computes
    merged.outputs.read_ahead([("output", n, batch + 1) for node in layers for n in (node, *fused[node])])
    inputs = merged.frontier.run(batch, x)
    for node, layer in layers.items():
        source = merged.inputs[node]
        read = layer.read_input(inputs[source], positions)
        _check_finite(read, "merged", source)
        yield node, read, {n: merged.outputs.pop("output", n, batch) for n in (node, *fused[node])}


def _recorded_reads(recorded: LayerReads, batch: int, layers: dict[str, Layer], maps: MergeMaps,
                    positions: int | None) -> Iterator[LayerRead]:
    """One pass, recorded: each layer's merged input from A's and B's inputs as the matching pass recorded them
    (``record_input``), and their outputs; no model runs.  What is read next is read ahead from disk."""
    order = [(kind, node, b) for b in (batch, batch + 1) for node in layers for kind in ("input", "output")
             if kind == "output" or node not in recorded.shared]
    readers = Counter([*layers, *(recorded.shared[node] for node in layers if node in recorded.shared)])
    kept: dict[str, list[torch.Tensor]] = {}  # outputs a layer still to come reads as its input

    def output(node: str) -> list[torch.Tensor]:
        value = kept.pop(node) if node in kept else recorded.pop("output", node, batch)
        readers[node] -= 1
        if readers[node]:
            kept[node] = value
        return value

    done = 0
    for node, layer in layers.items():
        recorded.read_ahead(order[done:])
        shared = recorded.shared.get(node)
        whole, reads = (False, output(shared)) if shared else recorded.pop("input", node, batch)
        done += 1 if shared else 2
        yield node, merged_reads(layer, whole, reads, maps, positions), {node: output(node)}


def _add_layer(group: list[ProblemRead], x_merged: torch.Tensor,
               outputs: dict[str, list[torch.Tensor]], maps: MergeMaps, grams: dict[tuple, GramSum]) -> None:
    """One batch of one layer: its Grams (one per rows key) and each of its problems' target moments, from
    its merged input and A's and B's outputs as its fit reads them (and at the norms fused into it)."""
    layer = group[0].problem.layer
    axis = layer.unit_axis
    rows: dict[tuple | None, torch.Tensor] = {}
    for p, key, columns, warm_start in group:
        if key not in rows:
            x_in = x_merged if key is None else take(x_merged, axis, p.block.cols.to(x_merged.device))
            rows[key] = layer.rows(x_in, maps)
            layer.add_gram(grams.setdefault((layer.node, key), GramSum()), rows[key])
        inputs = rows[key] if columns is None else take(rows[key], 2, columns.to(x_merged.device))
        prediction = layer.predict(inputs, warm_start)
        _accumulate(p, inputs, layer.target_rows(_block_target(p, outputs), maps), prediction)
        if p.fused:
            norm_target = _block_target(p.fused.norm, outputs, p.block.rows)
            p.fused.add(inputs, prediction, layer.target_rows(norm_target, maps))


def _block_target(p: Problem, outputs: dict[str, list[torch.Tensor]], rows: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``p``'s target from A's and B's outputs at its layer, at its block's rows (or at ``rows``)."""
    layer = p.layer
    y = p.target(*outputs[layer.node])
    rows = p.block.rows if rows is None else rows
    return y if rows is None else take(y, layer.out_axis, rows.to(y.device))


def _rows_key(p: Problem, maps: MergeMaps) -> tuple | None:
    """Which rows (and Gram) a problem reads: None for all the merged input's units, else its block's.

    A one-group layer's blocks (``Layer.one_group``: a linear layer's, a
    convolution's of one group) read columns of the full rows, so they share
    its Gram (an A-only block's is a submatrix of it): one Gram per layer,
    not one per block.
    """
    cols = p.block.cols
    return None if cols is None or p.layer.one_group(maps) else tuple(cols.tolist())


def _block_columns(p: Problem, maps: MergeMaps) -> torch.Tensor:
    """The columns of a one-group layer's rows its block reads: its units' (channel-major, as im2col
    lays them out), and the bias column."""
    per_unit = p.layer.kernel_positions
    units = p.block.cols[:, None] * per_unit + torch.arange(per_unit)
    return torch.cat([units.flatten(), torch.tensor([maps.size(p.layer.in_dim) * per_unit])])


def gram_moments(gms: tuple[fx.GraphModule, fx.GraphModule], maps: MergeMaps, problems: list[Problem],
                 data: torch.Tensor, batch_size: int = 64, progress: bool = True,
                 positions: int | None = None) -> None:
    """RegMean's statistics: each model's own layer inputs in the merged layout, as Gram matrices (in place).

    A block's rows that only one model feeds see only that model's inputs.
    ``positions``: read as least squares reads them (``Layer.read_input``); both
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
                            axis = layer.unit_axis
                            x_in = layer.read_input(values[source][model], positions)
                            _check_finite(x_in, model_name(model), source)
                            x_in = maps.gather(x_in, model, [(axis, layer.in_dim)])
                            x_in = x_in if cols is None else take(x_in, axis, cols.to(x_in.device))
                            layer.add_gram(grams.setdefault(key, GramSum()), layer.rows(x_in, maps))
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
    fed = [maps.participation(p.layer.out_dim, m) > 0 for m in range(maps.models)]
    rows = p.block.rows
    return [m for m in range(maps.models) if bool((fed[m] if rows is None else fed[m][rows]).any())]


def _accumulate(p: Problem, inputs: torch.Tensor, target: torch.Tensor, prediction: torch.Tensor) -> None:
    """One batch of the target's moments with the layer's rows, whose Gram is the layer's (``_rows_key``).

    What is summed is the residual against the warm start, R = T − W0·X
    (``prediction``: W0·X), formed per batch: for a model merged with itself R is float32 rounding,
    and R·Xᵀ stays at its size.  Forming R·Xᵀ from the sums instead, as
    T·Xᵀ − W0·(X·Xᵀ), would take the difference of two large sums, each
    rounded in float32 with the Gram (``GramSum``), and move a self-merge's
    weights visibly through an ill-conditioned Gram.  Products are float32,
    sums across batches float64, added to in place (no float64 copy of each product).
    A layer's rows, ``prediction`` and products are its kind's (``Layer.rows``, ``predict``,
    ``residual_moments``): a normalization's are sums per channel.
    """
    residual = target - prediction
    rx, count = p.layer.residual_moments(residual, inputs)
    p.rx = rx.double() if p.rx is None else p.rx.add_(rx)
    p.count += count
    p.tt += square_sum(target)
    p.rr += square_sum(residual)


def square_sum(x: torch.Tensor) -> float:
    """‖x‖²: the norms along its innermost stored axis (a streaming read, channels-last maps too) in its own
    precision, their squares summed in float64 (converting all of it to float64 first cost a twentieth of a
    ResNet-50 merge)."""
    inner = min((a for a in range(x.dim()) if x.shape[a] > 1), key=x.stride, default=x.dim() - 1)
    return float(torch.linalg.vector_norm(x, dim=inner).double().square().sum())
