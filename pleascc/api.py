"""The driver: load → trace → groups → stats → match → budget → solve → emit."""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
from tqdm.auto import tqdm

from pleascc.allocator import release_freed_memory, reuse_freed_memory
from pleascc.data import CalibrationData, check_data_fits, load_data
from pleascc.export import export_onnx
from pleascc.channels_last import statistics_copies
from pleascc.load import check_same_architecture
from pleascc.options import METHODS, MergeOptions
from pleascc.passes import budget as budget_pass
from pleascc.passes import distributed
from pleascc.passes.emit import emit, layer_inputs
from pleascc.passes.errors import PleasccError
from pleascc.passes.groups import Analysis, Layer, analyze, coverage
from pleascc.passes.match import match_all, match_heads, match_product, zipit
from pleascc.passes.merge_maps import Block, MergeMaps, per_head_selections, row_blocks
from pleascc.passes.solve import block_slice, layer_levels, merge_param, own_weights, regmean, warm_start
from pleascc.passes.solve import least_squares as ridge_fit
from pleascc.passes.fused_norms import fuse_norms, norm_producers
from pleascc.passes.frontier import Frontier, LayerOutputs, frontier_bytes, level_output_bytes, output_segments
from pleascc.passes.rows import NpyRows, read_rows
from pleascc.passes.batching import batch_count, batch_size_for, batches
from pleascc.passes.matching_stats import feature_moments, weight_similarity
from pleascc.passes.stats import MergedReads, Problem, gram_moments, layer_moments, layer_outputs
from pleascc.passes.store import ActivationStore
from pleascc.passes.weight_matching import weight_matching
from pleascc.trace import check_same_graph, trace

__all__ = ["merge", "export_onnx", "MergeResult", "METHODS"]

SPILL_SHARE = 0.9  # of the work directory's free space, the most sequential least squares plans to fill
TIE_BREAK = 1e-3  # weight of weight-row similarity in matching scores: separates units data can't tell apart


@dataclass
class MergeResult:
    """The merged model (a GraphModule; with separate labels it returns (logits_A, logits_B))."""

    model: fx.GraphModule
    report: dict
    analysis: Analysis


def merge(model_a: nn.Module, model_b: nn.Module, data: CalibrationData | torch.Tensor | str,
          options: MergeOptions | None = None, **choices) -> MergeResult:
    """Merge two models of one architecture into one of ``budget`` × the FLOPs of one.

    ``data``: calibration inputs (a tensor N×…, a ``CalibrationData``, or a path
    ``load_data`` reads).  ``options``: a ``MergeOptions``, or its fields as
    keywords (``budget=1.5, method="zipit"``, …; each field's help says what it
    does), checked before any work.  On glibc, the process keeps up to 1 GB of
    freed memory for reuse from then on (``allocator.reuse_freed_memory``): the
    passes free and reallocate the same activations every batch.
    """
    opts = dataclasses.replace(options or MergeOptions(), **choices)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    reuse_freed_memory()  # else every batch page-faults its activations back in
    target = _usable_device(opts.device)
    matcher, refit = METHODS[opts.method]
    x = _calibration_tensor(data, opts.samples, model_a, opts.seed)
    gms, analysis, heads, states = _trace_pair(model_a, model_b, x)
    runs = statistics_copies(gms, target, read_rows(x[:2]))
    sequential = refit == "least-squares" and opts.least_squares == "sequential"  # records A's and B's layer outputs
    batch_size = opts.batch_size or batch_size_for(analysis, gms[0].graph, opts.positions)
    local = _shard(x)  # this process's samples; all of them unless run under torch.distributed
    separate = _separate_labels(opts.labels, heads, states)
    separate_heads = {layer.node for layer in heads} if separate else set()
    fused = norm_producers(analysis, separate_heads) if sequential else {}  # norms fitted in their conv's pass
    levels = layer_levels(gms[0], analysis, fused) if sequential else {}
    segments, outputs_memory = _plan_outputs(gms[0], analysis, levels, len(local), opts.positions,
                                             opts.cache_gb * 2**30, opts.work_dir) if sequential else ([], 0)
    timings["trace_and_analyze"] = time.perf_counter() - clock

    with ActivationStore(opts.cache_gb * 2**30, opts.work_dir) as store:
        outputs = LayerOutputs(store, {n for n, level in levels.items() if level in segments[0]}, outputs_memory) \
            if sequential else None
        clock = time.perf_counter()
        # the matching pass reads every sample, so it records the first segment's outputs
        everything = opts.matching != "weight" and (opts.match_samples is None or opts.match_samples >= len(x))
        if opts.matching == "weight":  # data-free: the weights alone
            matchings = weight_matching(analysis, states, seed=opts.seed)
        else:
            matched_on = local if everything else _shard(x[:opts.match_samples])
            correlations = feature_moments(runs, analysis, matched_on, batch_size, opts.progress,
                                           within=matcher == "zipit", positions=opts.positions,
                                           outputs=outputs if everything else None)
            timings["matching_statistics"] = time.perf_counter() - clock
            clock = time.perf_counter()
            matchings = _match(analysis, correlations, states, matcher,
                               {"alpha": opts.zip_alpha, "beta": opts.zip_beta})
        costs = budget_pass.layer_costs(analysis, separate_heads)
        if opts.zip_until is not None:
            widths = budget_pass.zip_until_widths(analysis, matchings, opts.zip_until)
        else:
            widths = budget_pass.WIDTHS[opts.width_search](analysis, matchings, costs, opts.budget)
        maps = MergeMaps(analysis.table, _selections(analysis, matchings, widths))
        timings["match_and_budget"] = time.perf_counter() - clock

        clock = time.perf_counter()
        problems = _problems(analysis, maps, states, separate_heads)
        fuse_norms(problems, fused)
        own = {n for layer in heads if layer.node in separate_heads for n in (layer.weight, layer.bias)}
        state = {name: merge_param(analysis, maps, name, states[0][name], states[1][name])
                 for name in states[0] if name not in own}  # separate heads: from their own fits
        emit_with = functools.partial(emit, gms[0], analysis, maps, state)
        residuals, passes, underdetermined = {}, 0, []
        if refit == "regmean":
            blocked = [p for p in problems if p.layer.blocked or p.model is not None]  # norms stay averaged
            gram_moments(runs, maps, blocked, local, batch_size, opts.progress, opts.positions)
            for p in blocked:
                in_width = maps.size(p.layer.in_dim)
                per_model = {m: block_slice(own_weights(analysis, maps, p.layer, states[m], m), p.block, in_width)
                             for m in p.grams}
                p.w = regmean(p, per_model, opts.regmean_alpha, opts.ridge, has_bias=p.layer.has_bias)
        elif refit:
            underdetermined = _check_least_squares_samples(problems, analysis, x, opts.positions)
            fit = functools.partial(_fit, runs, analysis, maps, local, batch_size, opts.progress, opts.ridge,
                                    opts.positions, timings)
            if not sequential:
                residuals, passes = fit(problems), 1
            else:
                passes = len(set(levels.values())) + len(segments) - everything
                with tqdm(total=passes * batch_count(len(local), batch_size), desc="least squares", unit="batch",
                          disable=not opts.progress or distributed.rank() > 0) as bar:
                    def record(segment: int, nodes: set[str]) -> None:
                        if segment or not everything:  # the matching pass did not record it
                            outputs.nodes = nodes
                            layer_outputs(runs, analysis, local, outputs, batch_size, opts.positions, bar.update)

                    def after_batch() -> None:
                        bar.update()
                        release_freed_memory()  # holes a pass leaves around what the store keeps add up within it

                    reads = functools.partial(MergedReads, frontier=Frontier(store), outputs=outputs, tick=after_batch)
                    own_pass = [p for p in problems if p.layer.node not in fused]  # fused norms: with their conv
                    residuals = _fit_sequentially(fit, own_pass, levels, segments, record, reads, timings,
                                                  lambda: emit_with(_layer_weights(problems, states)).to(opts.device))
        kept = {"least_squares_memory_peak_mb": store.peak_memory_bytes / 2**20,
                "least_squares_disk_peak_mb": store.peak_disk_bytes / 2**20,
                "least_squares_spilled_mb": store.spilled_bytes / 2**20}
    timings["solve"] = time.perf_counter() - clock

    clock = time.perf_counter()
    # --reset-bn re-estimates running statistics, which norms' fits fold into γ, β: those stay averaged
    refitted = problems if not opts.reset_bn else [p for p in problems if not p.layer.folds_running_stats]
    merged = emit_with(_layer_weights(refitted, states))
    _add_time(timings, "emit", clock)
    if opts.reset_bn:
        reset_batch_norm(merged, local, batch_size, opts.progress)
    report = _report(analysis, model_a, merged, matchings, widths, costs, residuals, timings,
                     method=opts.method, budget=opts.budget, separate=separate, samples=len(x), batch_size=batch_size,
                     match_samples=None if opts.matching == "weight" else min(len(x), opts.match_samples or len(x)),
                     width_search="zip-until " + opts.zip_until if opts.zip_until else opts.width_search,
                     least_squares=opts.least_squares if refit == "least-squares" else None, positions=opts.positions,
                     least_squares_passes=passes, **kept, device=str(opts.device),
                     underdetermined_layers=underdetermined)
    return MergeResult(merged.eval(), report, analysis)


def _trace_pair(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor):
    """Trace both models, analyse A's graph, and check B has the same graph and parameters."""
    check_data_fits(model_a, CalibrationData(x))
    gm_a = trace(model_a, "model A")
    analysis = analyze(gm_a, (read_rows(x[:2]),))
    heads = head_layers(analysis)
    check_same_architecture(model_a, model_b, heads=frozenset(n for h in heads for n in (h.weight, h.bias) if n))
    gm_b = trace(model_b, "model B")
    check_same_graph(gm_a, gm_b)
    states = (_tensors(gm_a), _tensors(gm_b))
    _check_finite_weights(states)
    return (gm_a, gm_b), analysis, heads, states


def _check_finite_weights(states: tuple[dict, dict]) -> None:
    """A weight that is NaN or Inf (a diverged run) would reach every statistic and every fit: name it first."""
    for model, state in zip("AB", states):
        broken = next((name for name, t in state.items() if t.is_floating_point() and not t.isfinite().all()), None)
        if broken is not None:
            raise PleasccError(f"model {model}'s {broken} holds NaN or Inf: the checkpoint is broken (from a "
                               "diverged run?); merge a finite one")


def _plan_outputs(gm: fx.GraphModule, analysis: Analysis, levels: dict[str, int], samples: int,
                  positions: int | None, memory: float, work_dir: str | None) -> tuple[list[list[int]], float]:
    """Before any heavy work, where sequential least squares keeps what it reads: the runs of levels whose
    recorded outputs fit memory and disk together (``output_segments``), and how much of the memory the
    outputs may take (when not all fits, what the frontier's bound leaves; the rest goes to disk)."""
    level_bytes = level_output_bytes(analysis, levels, samples, positions)
    frontier = frontier_bytes(gm, analysis, samples)
    if sum(level_bytes.values()) + frontier <= memory:
        return [list(level_bytes)], memory
    directory = work_dir or tempfile.gettempdir()
    needed = frontier + max(level_bytes.values(), default=0) - memory
    fix = f"pass --work-dir DIR on a disk with room, or --cache-gb {math.ceil(needed / 2**30) + 1} or more"
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix="pleascc-", dir=directory))
    except OSError as exc:
        raise PleasccError(f"sequential least squares needs to spill activations to {directory}, which cannot be "
                           f"written ({exc.strerror}): {fix}") from exc
    free = shutil.disk_usage(directory).free
    room = memory + SPILL_SHARE * free - frontier
    if room < max(level_bytes.values(), default=0):
        raise PleasccError(f"sequential least squares needs to spill {needed / 2**30:.1f} GB of activations to "
                           f"{directory}, which has {free / 2**30:.1f} GB free: {fix}")
    return output_segments(level_bytes, room), max(memory - frontier, 0.0)


def _usable_device(device: str) -> torch.device:
    """``device`` parsed and tried with one allocation, before any work is done on it."""
    try:
        target = torch.device(device)
        torch.empty(0, device=target)
    except (RuntimeError, AssertionError) as exc:
        raise PleasccError(f"device {device!r} is not usable here ({str(exc).splitlines()[0]}): "
                           "pass --device cpu, or cuda on a machine with a GPU") from exc
    return target


def _tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Parameters and every buffer, non-persistent ones too (EVA's zero k-bias is resized like the rest)."""
    return {name: t.detach() for name, t in (*gm.named_parameters(), *gm.named_buffers())}


def _match(analysis: Analysis, correlations: dict, states, matcher: str, zip_options: dict) -> dict:
    """Pair units per free group: correlation, plus a small weight-based tie-break.

    ``zipit`` zips the plain spaces (``correlations`` then holds their joint
    A+B correlations); heads, head dims and per-group channels are paired as
    by ``hungarian``.
    """
    sizes = {root: analysis.root_size(root) for root in analysis.free_roots()}
    joints = {r: c for r, c in correlations.items() if r in sizes and c.shape[0] == 2 * sizes[r]}
    correlations = {r: c[:sizes[r], sizes[r]:] if r in joints else c for r, c in correlations.items()}
    ties = weight_similarity(analysis, states)
    scores = {root: correlations.get(root, torch.zeros(n, n)) + TIE_BREAK * ties.get(root, torch.zeros(n, n))
              for root, n in sizes.items()}
    matchings = match_all(scores, sizes, "identity" if matcher == "identity" else "hungarian")
    if matcher == "identity":
        return matchings
    done = _match_products(analysis, correlations, sizes, matchings)
    if matcher == "zipit":
        matchings.update({root: zipit(joint, **zip_options) for root, joint in joints.items()
                          if root not in done and root not in analysis.table.keep_width})
    return matchings


def _match_products(analysis: Analysis, correlations: dict, sizes: dict, matchings: dict) -> set[int]:
    """Product axes (heads × head dim): their factors are matched jointly; returns the spaces matched so."""
    done = _match_heads(analysis, correlations, sizes, matchings)
    for key, corr in correlations.items():
        if isinstance(key, tuple) and not set(key) <= done:
            known = {f: _partner_of(matchings[r]) for f, r in enumerate(key) if r in done}
            found = match_product(corr, [analysis.root_size(r) for r in key], [r in sizes for r in key], known=known)
            for root, m in zip(key, found):
                if root in sizes and root not in done:
                    matchings[root] = m
            done.update(r for r in key if r in sizes)
    return done


def _match_heads(analysis: Analysis, correlations: dict, sizes: dict, matchings: dict) -> set[int]:
    """Heads whose head dims may differ per head: heads as units, then dims inside each pair of heads."""
    by_heads: dict[int, list[int]] = {}
    for inner, outer in analysis.per_head.items():
        if inner in sizes and outer in sizes and (outer, inner) in correlations:
            by_heads.setdefault(outer, []).append(inner)
    for outer, inners in by_heads.items():
        matchings[outer], found = match_heads([correlations[(outer, i)] for i in inners], sizes[outer])
        matchings.update(zip(inners, found))
    return {r for outer, inners in by_heads.items() for r in (outer, *inners)}


def _selections(analysis: Analysis, matchings: dict, widths: dict) -> dict:
    """Every free space's (P_A, P_B); per-head head dims follow their heads' pairs."""
    selections = {root: m.selections(widths[root]) for root, m in matchings.items()}
    for root, m in matchings.items():
        if m.within is not None:
            selections[root] = per_head_selections(selections[analysis.per_head[root]], m.within)
    return selections


def _partner_of(m) -> torch.Tensor:
    """B's unit for each of A's units."""
    partner = torch.empty_like(m.pairs_b)
    partner[m.pairs_a] = m.pairs_b
    return partner


def _fit(gms, analysis: Analysis, maps: MergeMaps, x: torch.Tensor, batch_size: int, progress: bool,
         ridge: float, positions: int | None, timings: dict[str, float], problems: list[Problem],
         merged: MergedReads | None = None) -> dict[str, float]:
    """One pass over the data, then each problem's least-squares fit (``p.w``); returns the residuals."""
    clock = time.perf_counter()
    layer_moments(gms, analysis, maps, problems, x, batch_size, progress, merged, positions)
    clock = _add_time(timings, "least_squares_statistics", clock)
    residuals = {}
    norms = {id(p.fused.norm): p.fused.norm for p in problems if p.fused}  # solved after their convolutions
    for p in [*problems, *norms.values()]:
        p.w, residuals[p.name] = ridge_fit(p, ridge, has_bias=p.layer.has_bias)
        if p.fused:
            p.fused.finish(p)
        p.xx = p.rx = None  # solved: a wide layer's moments are hundreds of MB
    _add_time(timings, "solves", clock)
    return residuals


def _fit_sequentially(fit, problems: list[Problem], levels: dict[str, int], segments: list[list[int]], record,
                      reads, timings: dict[str, float], emit_current) -> dict[str, float]:
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
                _add_time(timings, "emit", clock)
                residuals.update(fit(todo, reads(merged, layer_inputs(merged))))
                gc.collect()  # the model this pass replaced is a cycle (GraphModule <-> graph): free its weights
    finally:
        gc.unfreeze()
    return residuals


def _add_time(timings: dict[str, float], phase: str, since: float) -> float:
    """Add the time since ``since`` to ``phase``'s; return now."""
    now = time.perf_counter()
    timings[phase] = timings.get(phase, 0.0) + now - since
    return now


def _layer_weights(problems: list[Problem], states) -> dict[tuple[str, int | None], list]:
    """Each block's parameters: its fit where there is one, else its warm start (the baselines)."""
    layer_weights: dict[tuple[str, int | None], list] = {}
    for p in problems:
        params = p.layer.params((p.w0 if p.w is None else p.w).cpu(), states[p.model or 0])
        layer_weights.setdefault((p.layer.node, p.model), []).append((p.block, params))
    return layer_weights


def _calibration_tensor(data, samples: int | None, model: nn.Module, seed: int) -> torch.Tensor | NpyRows:
    """The calibration inputs, checked; a ``NpyRows`` stays on disk (its batches are checked as they are read)."""
    if isinstance(data, str):
        data = load_data(data, samples=samples, model=model, seed=seed)
    x = data.x if isinstance(data, CalibrationData) else data
    if not isinstance(x, NpyRows) and (not isinstance(x, torch.Tensor) or not x.is_floating_point()):
        raise PleasccError("calibration data must be a float tensor of preprocessed inputs (N, ...)")
    x = x[:samples] if samples else x
    if len(x) < 2:
        raise PleasccError(f"calibration data has {len(x)} sample(s); matching needs at least 2: pass more data")
    if isinstance(x, NpyRows):
        return x
    if not torch.isfinite(x).all():
        raise PleasccError("calibration data contains NaN or Inf: check its preprocessing")
    return x.float()


def reset_batch_norm(model: nn.Module, x: torch.Tensor, batch_size: int = 64, progress: bool = False) -> None:
    """Recompute every BatchNorm module's running statistics on ``x`` (a cumulative average over its batches).

    Under torch.distributed each rank's statistics are averaged over the ranks.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for batch in batches(x, batch_size, "BatchNorm statistics", progress, small_first=False):
            model(batch)
    model.eval()
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum  # as the user's model had it, should they train the merged one
        m.running_mean.copy_(distributed.mean(m.running_mean))
        m.running_var.copy_(distributed.mean(m.running_var))


def _shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's share of the calibration data (``passes.distributed``); every rank needs some."""
    local = distributed.shard(x)
    if len(local) == 0:
        raise PleasccError(f"calibration data has {len(x)} samples, fewer than the processes sharing it; "
                           "pass more data or start fewer processes")
    return local


def head_layers(analysis: Analysis) -> list[Layer]:
    """Layers whose outputs are the model's outputs (the classifier heads)."""
    table = analysis.table
    return [
        layer for layer in analysis.layers
        if layer.may_head and {a.id for a in table.atoms(layer.out_dim)} <= analysis.output_roots
    ]


def _separate_labels(labels: str | None, heads: list[Layer], states) -> bool:
    differ = any(states[0][layer.weight].shape != states[1][layer.weight].shape for layer in heads)
    if labels == "shared" and differ:
        raise PleasccError("the models' heads differ in size, so they cannot share labels: use --labels separate")
    if labels == "separate" and not heads:
        raise PleasccError("--labels separate needs a classifier head (a Linear or Conv whose output is the "
                           "model's output); none was found")
    return labels == "separate" or (labels is None and differ)


def _problems(analysis: Analysis, maps: MergeMaps, states, separate_heads: set[str]) -> list[Problem]:
    """One fit per block of every layer; a separate head is fitted once per model."""
    problems = []
    for layer in (layer for layer in analysis.layers if layer.refit):
        for model in (0, 1) if layer.node in separate_heads else (None,):
            w0 = warm_start(analysis, maps, layer, states, model)
            target = _own_output(model) if model is not None else functools.partial(_merged_output, maps, layer)
            blocks = row_blocks(maps, layer.out_dim, layer.in_dim, model) if layer.blocked else [Block()]
            for k, block in enumerate(blocks):
                name = layer.node + ("" if model is None else f"[{'AB'[model]}]")
                name += f"#{k}" if len(blocks) > 1 else ""
                problems.append(Problem(layer, target, name, block_slice(w0, block, maps.size(layer.in_dim)),
                                        model, block))
    return problems


def _merged_output(maps: MergeMaps, layer: Layer, y_a: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor:
    return maps.merge((y_a, y_b), [(layer.out_axis, layer.out_dim)])


def _own_output(model: int):
    return lambda y_a, y_b: (y_a, y_b)[model]


def _check_least_squares_samples(problems: list[Problem], analysis: Analysis, x: torch.Tensor,
                                 positions: int | None) -> list[str]:
    """The layers whose fits have fewer observations than one model's layer has unknowns per output.

    Such a fit is still defined: the ridge toward the warm start picks the
    smallest change that fits the data, where gradient descent from the warm
    start would converge.  So a few of them (a wide classifier on a small
    calibration set) are reported; when they hold most of the fitted weights,
    the data are too few and the merge stops.  (Past one model's unknowns, the
    extra inputs of wider merged layers are held by the warm start.)
    """
    needs: list[tuple[int, int, str]] = []  # (samples needed, weights fitted, layer)
    for p in problems:
        layer = p.layer
        read = budget_pass.positions(analysis, layer)
        read = min(read, positions) if layer.sampled and positions else read
        needs.append((math.ceil(layer.unknowns(analysis) / read), p.w0.numel(), layer.node))
    fitted = sum(weights for _, weights, _ in needs)

    def underdetermined(samples: int) -> int:
        return sum(weights for needed, weights, _ in needs if samples < needed)

    if 2 * underdetermined(len(x)) > fitted:
        enough = min(needed for needed, _, _ in needs if 2 * underdetermined(needed) <= fitted)
        largest = max((n for n in needs if len(x) < n[0]), key=lambda n: n[1])[2]
        raise PleasccError(f"calibration data has {len(x)} samples but least squares needs at least {enough} to "
                           f"determine most layers (e.g. {largest}): pass more data (--samples) "
                           "or use --method permute")
    return sorted({layer for needed, _, layer in needs if len(x) < needed})


def _report(analysis, model_a, merged, matchings, widths, costs, residuals, timings, **settings) -> dict:
    groups = []
    for root, m in matchings.items():
        merged_pairs = 2 * m.n - widths[root]
        groups.append({
            "group": root, "size": m.n, "width": widths[root], "merged_pairs": merged_pairs,
            "merged_corr_mean": float(m.corr[:merged_pairs].mean()) if merged_pairs else None,
            "corr": [round(float(c), 4) for c in m.corr],
        })
    base_flops = budget_pass.base_flops(analysis, costs)
    params = sum(p.numel() for p in model_a.parameters())
    return {
        **settings,
        "flops_a": base_flops, "flops_b": base_flops,
        "flops_merged": budget_pass.flops(analysis, costs, widths),
        "relative_flops": budget_pass.relative_flops(analysis, costs, widths),
        "params_a": params, "params_b": params,
        "params_merged": sum(p.numel() for p in merged.parameters()),
        "coverage": coverage(analysis, model_a),
        "unsupported": analysis.unsupported,
        "groups": groups,
        "least_squares_residuals": residuals,
        "timings_s": timings,
    }
