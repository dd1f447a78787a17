"""Least squares as a merge runs it: the problems (one per block of every refitted layer), their fits in one
pass over the data (``one-pass``) or level by level on the merged model's own features (``sequential``), and
where the sequential passes keep what they read.

Sequential least squares fits each level of layers on the inputs the merged
model, refitted up to there, gives it: one pass of the merged model per
level, resumed from the frontier the store keeps, with A's and B's outputs
recorded once (by the matching pass, or by passes of their own per segment
of levels that fits memory and disk, ``plan_outputs``).
"""

from __future__ import annotations

import functools
import gc
import math
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from pleascc.allocator import release_freed_memory
from pleascc.passes import budget as budget_pass
from pleascc.passes import distributed
from pleascc.passes.batching import batch_count
from pleascc.passes.emit import layer_inputs
from pleascc.passes.errors import PleasccError, model_name
from pleascc.passes.frontier import (Frontier, LayerReads, frontier_bytes, level_output_bytes, output_segments,
                                     shared_inputs)
from pleascc.passes.groups import Analysis, Layer
from pleascc.passes.merge_maps import Block, MergeMaps, row_blocks
from pleascc.passes.solve import block_slice, ridge_fit, warm_start
from pleascc.passes.stats import MergedReads, Problem, layer_moments, layer_outputs
from pleascc.passes.store import ActivationStore

SPILL_SHARE = 0.9  # of the work directory's free space, the most sequential least squares plans to fill


@dataclass


class LeastSquares:
    """What every least-squares pass of one merge shares: the models' statistics copies, the analysis and merge
    maps, this process's calibration samples, and the time spent per phase (``timings``)."""

    runs: tuple[fx.GraphModule, ...]
    analysis: Analysis
    maps: MergeMaps
    x: torch.Tensor
    batch_size: int
    progress: bool
    ridge: float
    positions: int | None
    timings: dict[str, float]

    def fit(self, problems: list[Problem], merged: MergedReads | None = None,
            recorded: LayerReads | None = None) -> dict[str, float]:
        """One pass over the data (or over what the matching pass ``recorded``), then each problem's
        least-squares fit (``p.w``); returns the residuals."""
        clock = time.perf_counter()
        layer_moments(self.runs, self.analysis, self.maps, problems, self.x, self.batch_size, self.progress,
                      merged, self.positions, recorded)
        clock = add_time(self.timings, "least_squares_statistics", clock)
        residuals = {}
        norms = {id(p.fused.norm): p.fused.norm for p in problems if p.fused}  # solved after their convolutions
        for p in [*problems, *norms.values()]:
            p.w, residuals[p.name] = ridge_fit(p, self.ridge, has_bias=p.layer.has_bias)
            if p.fused:
                p.fused.finish(p)
            p.xx = p.rx = None  # solved: a wide layer's moments are hundreds of MB
        add_time(self.timings, "solves", clock)
        return residuals

    def fit_sequentially(self, problems: list[Problem], levels: dict[str, int], segments: list[list[int]], record,
                         reads, emit_current) -> dict[str, float]:
        """Fit layers level by level, each on the inputs the merged model, refitted up to there, gives it.

        A level's layers depend only on earlier levels, so this equals fitting one
        layer at a time, in one pass over the data per level.  ``record``: a
        segment's number and layers → A's and B's outputs there recorded
        (``output_segments``); ``reads``: the merged model and its layer inputs →
        ``MergedReads``.
        """
        residuals: dict[str, float] = {}
        gc.freeze()  # what exists now outlives the passes: the collections below scan only what they made
        try:
            for k, segment in enumerate(segments):
                record(k, {node for node, level in levels.items() if level in segment})
                for level in segment:
                    todo = [p for p in problems if levels[p.layer.node] == level]
                    clock = time.perf_counter()
                    merged = emit_current()
                    add_time(self.timings, "emit", clock)
                    residuals.update(self.fit(todo, reads(merged, layer_inputs(merged))))
                    gc.collect()  # the model this pass replaced is a cycle (GraphModule <-> graph): free its weights
        finally:
            gc.unfreeze()
        return residuals

    def fit_in_levels(self, problems: list[Problem], fused: dict[str, str], levels: dict[str, int],
                      segments: list[list[int]], outputs: LayerReads, store: ActivationStore, recorded: bool,
                      emit_current) -> tuple[dict[str, float], int]:
        """Sequential least squares under one progress bar; returns the residuals and the passes it made.

        ``fused``: norms fitted in their convolution's pass; ``recorded``: the
        matching pass recorded the first segment's outputs; ``emit_current``:
        the merged model as refitted so far.
        """
        passes = len(set(levels.values())) + len(segments) - recorded
        with tqdm(total=passes * batch_count(len(self.x), self.batch_size), desc="least squares", unit="batch",
                  disable=not self.progress or distributed.rank() > 0) as bar:
            def record(segment: int, nodes: set[str]) -> None:
                if segment or not recorded:  # the matching pass did not record it
                    outputs.nodes = nodes
                    layer_outputs(self.runs, self.analysis, self.x, outputs, self.batch_size, self.positions,
                                  bar.update)

            def after_batch() -> None:
                bar.update()
                release_freed_memory()  # holes a pass leaves around what the store keeps add up within it

            reads = functools.partial(MergedReads, frontier=Frontier(store), outputs=outputs, tick=after_batch)
            own_pass = [p for p in problems if p.layer.node not in fused]  # fused norms: with their conv
            residuals = self.fit_sequentially(own_pass, levels, segments, record, reads, emit_current)
        return residuals, passes


def plan_outputs(gm: fx.GraphModule, analysis: Analysis, levels: dict[str, int], samples: int,
                 positions: int | None, memory: float, work_dir: str | None,
                 models: int = 2) -> tuple[list[list[int]], float]:
    """Before any heavy work, where sequential least squares keeps what it reads: the runs of levels whose
    recorded outputs fit memory and disk together (``output_segments``), and how much of the memory the
    outputs may take (when not all fits, what the frontier's bound leaves; the rest goes to disk)."""
    level_bytes = level_output_bytes(analysis, levels, samples, positions, models)
    frontier = frontier_bytes(gm, analysis, samples)
    if sum(level_bytes.values()) + frontier <= memory:
        return [list(level_bytes)], memory
    directory = work_dir or tempfile.gettempdir()
    needed = frontier + max(level_bytes.values(), default=0) - memory
    fix = f"pass --work-dir DIR on a disk with room, or --cache-gb {math.ceil(needed / 2**30) + 1} or more"
    try:
        free = spill_space(directory)
    except OSError as exc:
        raise PleasccError(f"sequential least squares needs to spill activations to {directory}, which cannot be "
                           f"written ({exc.strerror}): {fix}") from exc
    room = memory + SPILL_SHARE * free - frontier
    if room < max(level_bytes.values(), default=0):
        raise PleasccError(f"sequential least squares needs to spill {needed / 2**30:.1f} GB of activations to "
                           f"{directory}, which has {free / 2**30:.1f} GB free: {fix}")
    return output_segments(level_bytes, room), max(memory - frontier, 0.0)


def records_reads(analysis: Analysis, samples: int, positions: int | None, memory: float, work_dir: str | None,
                  models: int = 2) -> bool:
    """One-pass: whether every layer's inputs and outputs, as the fits read them (the inputs before the models'
    are merged), fit memory and the work directory's disk.  Then the matching pass records them and least
    squares runs no model: no second forward.  Else (or where the directory cannot be written) a second pass
    runs the models again, as it may."""
    layers = [layer for layer in analysis.layers if layer.refit]
    shared = shared_inputs(layers)
    needed = sum(models * samples * layer_read_bytes(analysis, layer, positions, layer.node in shared)
                 // analysis.example_batch for layer in layers)
    if needed <= memory:
        return True
    try:
        return needed <= memory + SPILL_SHARE * spill_space(work_dir or tempfile.gettempdir())
    except OSError:
        return False


def spill_space(directory: str) -> int:
    """The free bytes of ``directory``, once a temporary directory was made and removed in it (OSError if not)."""
    shutil.rmtree(tempfile.mkdtemp(prefix="pleascc-", dir=directory))
    return shutil.disk_usage(directory).free


def layer_read_bytes(analysis: Analysis, layer: Layer, positions: int | None, shared: bool) -> int:
    """One model's float32 bytes of a layer's input and output as its fit reads them, on the example batch;
    its input not counted where ``shared`` (its producer's recorded output: ``shared_inputs``)."""
    source, output = analysis.shapes.get(layer.source), analysis.shapes.get(layer.node)
    if not isinstance(source, tuple) or not isinstance(output, tuple):
        return 0
    return (0 if shared else layer.input_bytes(source, output, positions)) + layer.read_bytes(output, positions)


def make_problems(analysis: Analysis, maps: MergeMaps, states, separate_heads: set[str]) -> list[Problem]:
    """One fit per block of every layer; a separate head is fitted once per model."""
    problems = []
    for layer in (layer for layer in analysis.layers if layer.refit):
        for model in range(len(states)) if layer.node in separate_heads else (None,):
            w0 = warm_start(analysis, maps, layer, states, model)
            target = _own_output(model) if model is not None else functools.partial(_merged_output, maps, layer)
            blocks = row_blocks(maps, layer.out_dim, layer.in_dim, model) if layer.blocked else [Block()]
            for k, block in enumerate(blocks):
                name = layer.node + ("" if model is None else f"[{model_name(model)}]")
                name += f"#{k}" if len(blocks) > 1 else ""
                problems.append(Problem(layer, target, name, block_slice(w0, block, maps.size(layer.in_dim)),
                                        model, block))
    return problems


def _merged_output(maps: MergeMaps, layer: Layer, *outputs: torch.Tensor) -> torch.Tensor:
    return maps.merge(outputs, [(layer.out_axis, layer.out_dim)])


def _own_output(model: int):
    return lambda *outputs: outputs[model]



def check_samples(analysis: Analysis, separate_heads: set[str], samples: int, positions: int | None) -> list[str]:
    """Before any pass over the data: the layers whose fits will have fewer observations than one model's layer
    has unknowns per output.

    Such a fit is still defined: the ridge toward the warm start picks the
    smallest change that fits the data, where gradient descent from the warm
    start would converge.  So a few of them (a wide classifier on a small
    calibration set) are reported; when they hold most of the fitted weights
    (one model's, each separate head once per model), the data are too few and
    the merge stops, saying how many samples would do.  (Past one model's
    unknowns, the extra inputs of wider merged layers are held by the warm start.)
    """
    needs: list[tuple[int, int, str]] = []  # (samples needed, weights fitted, layer)
    for layer in (layer for layer in analysis.layers if layer.refit):
        read = budget_pass.positions(analysis, layer)
        read = min(read, positions) if layer.sampled and positions else read
        unknowns = layer.unknowns(analysis)
        weights = unknowns * analysis.table.size(analysis.params[layer.weight].dims[0])
        needs.append((math.ceil(unknowns / read), weights * (2 if layer.node in separate_heads else 1), layer.node))
    fitted = sum(weights for _, weights, _ in needs)

    def underdetermined(count: int) -> int:
        return sum(weights for needed, weights, _ in needs if count < needed)

    if 2 * underdetermined(samples) > fitted:
        enough = min(needed for needed, _, _ in needs if 2 * underdetermined(needed) <= fitted)
        largest = max((n for n in needs if samples < n[0]), key=lambda n: n[1])[2]
        raise PleasccError(f"calibration data has {samples} samples but least squares needs at least {enough} to "
                           f"determine most layers (e.g. {largest}): pass more data (--samples) "
                           "or use --method permute")
    return sorted({layer for needed, _, layer in needs if samples < needed})


def layer_weights(problems: list[Problem], states) -> dict[tuple[str, int | None], list]:
    """Each block's parameters: its fit where there is one, else its warm start (the baselines)."""
    weights: dict[tuple[str, int | None], list] = {}
    for p in problems:
        params = p.layer.params((p.w0 if p.w is None else p.w).cpu(), states[p.model or 0])
        weights.setdefault((p.layer.node, p.model), []).append((p.block, params))
    return weights


def add_time(timings: dict[str, float], phase: str, since: float) -> float:
    """Add the time since ``since`` to ``phase``'s; return now."""
    now = time.perf_counter()
    timings[phase] = timings.get(phase, 0.0) + now - since
    return now
