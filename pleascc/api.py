"""The driver's pipeline, one named step each: trace and analyse → match → choose widths → least squares → emit.

``merge`` reads as that diagram; each step's work lives in the passes
(``pleascc.passes``) and in ``pleascc.least_squares``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from pleascc.align import aligned_copy, aligned_matchings, aligned_widths, alignment, graph_tensors
from pleascc.allocator import reuse_freed_memory
from pleascc.channels_last import statistics_copies
from pleascc.data import TOKEN_DTYPES, CalibrationData, check_data_fits, load_data, token_inputs
from pleascc.export import export_onnx
from pleascc.least_squares import (LeastSquares, add_time, check_samples, layer_weights, make_problems, plan_outputs,
                                   records_reads)
from pleascc.load import check_same_architecture
from pleascc.options import METHODS, MergeOptions, read_positions
from pleascc.passes import budget as budget_pass
from pleascc.passes import distributed
from pleascc.passes.batching import batch_size_for, batches
from pleascc.passes.emit import emit
from pleascc.passes.errors import PleasccError, model_name
from pleascc.passes.feature_matching import jointly_matched, match_features, selections, zip_spaces
from pleascc.passes.frontier import LayerReads, shared_inputs
from pleascc.passes.fused_norms import fuse_norms, norm_producers
from pleascc.passes.groups import Analysis, Layer, analyze, coverage
from pleascc.passes.matching_stats import feature_moments
from pleascc.passes.merge_maps import MergeMaps
from pleascc.passes.pruning import l1_pruning
from pleascc.passes.rows import NpyRows, PaddedTokens, model_inputs, read_rows
from pleascc.passes.solve import block_slice, layer_levels, merge_param, own_weights, regmean
from pleascc.passes.stats import Problem, gram_moments
from pleascc.passes.store import ActivationStore
from pleascc.passes.weight_matching import weight_matching
from pleascc.trace import check_same_graph, trace

__all__ = ["merge", "export_onnx", "MergeResult", "METHODS"]


@dataclass


class MergeResult:
    """The merged model (a GraphModule; with separate labels it returns (logits_A, logits_B, …))."""

    model: fx.GraphModule
    report: dict
    analysis: Analysis


@dataclass


class _Plan:
    """What a merge settles before its heavy work: inputs checked, graphs traced and analysed, and how its
    least-squares passes will run (``sequential``: which levels, which segments of recorded outputs)."""

    options: MergeOptions
    x: torch.Tensor | NpyRows  # every calibration sample
    local: torch.Tensor | NpyRows  # this process's share of them
    gms: tuple[fx.GraphModule, ...]  # one per model
    runs: tuple[fx.GraphModule, ...]  # the copies the statistics passes run (``statistics_copies``)
    analysis: Analysis
    heads: list[Layer]
    states: tuple[dict, ...]
    batch_size: int
    separate: bool
    fused: dict[str, str] = field(default_factory=dict)  # sequential: norms fitted in their convolution's pass
    levels: dict[str, int] = field(default_factory=dict)  # sequential: each layer's level
    segments: list[list[int]] = field(default_factory=list)  # sequential: runs of levels recorded together
    outputs_memory: float = 0.0  # sequential: memory the recorded outputs may take
    records_reads: bool = False  # one-pass: the matching pass records what least squares reads (``records_reads``)
    underdetermined: list[str] = field(default_factory=list)  # least squares: fits with fewer rows than unknowns

    @property
    def models(self) -> int:
        return len(self.gms)

    @property
    def matcher(self) -> str:
        return METHODS[self.options.method][0]

    @property
    def refit(self) -> str | None:
        return self.options.refit

    @property
    def sequential(self) -> bool:
        """Whether least squares fits level by level, recording A's and B's layer outputs."""
        return self.refit == "least-squares" and self.options.least_squares == "sequential"

    @property
    def separate_heads(self) -> set[str]:
        return {layer.node for layer in self.heads} if self.separate else set()

    @property
    def matches_every_sample(self) -> bool:
        """Whether the matching pass reads every sample (so it can record the first segment's outputs): of a
        pair; more models are aligned pair by pair (``align``), and least squares records their outputs."""
        opts = self.options
        return not self.data_free and (opts.match_samples is None or opts.match_samples >= len(self.x)) \
            and self.models == 2

    @property
    def data_free(self) -> bool:
        """Whether units are matched (or ranked, for pruning) from the weights alone."""
        return self.options.matching == "weight" or self.matcher == "l1"


def merge(models: nn.Module | Sequence[nn.Module], *args, **choices) -> MergeResult:
    """Merge models of one architecture into one of ``budget`` × the FLOPs of one:
    ``merge(model_a, model_b, data[, options])``, or ``merge([model_1, …, model_N], data[, options])``.

    More than two models are merged at budget 1.0 (unit k of every model,
    once each is permuted into the first's layout: ``align``) or N (side by
    side).  ``data``: calibration inputs (a tensor N×…, a ``CalibrationData``,
    a path ``load_data`` reads, or a tokenizer's ``input_ids`` and
    ``attention_mask``, whose padded tokens no statistic reads).  ``options``: a ``MergeOptions``, or its fields as
    keywords (``budget=1.5, method="zipit"``, …; each field's help says what it
    does), checked before any work.  After ``permute``, ``average`` and ``zipit``
    the merged BatchNorms' running statistics are recomputed on the data, as
    those methods' papers evaluate (``reset_bn=False`` keeps them averaged).
    On glibc, the process keeps up to 1 GB of freed memory for reuse from then
    on (``allocator.reuse_freed_memory``): the passes free and reallocate the
    same activations every batch.
    """
    models, data, options = _arguments(models, args, choices)
    opts = dataclasses.replace(options or MergeOptions(), **choices)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    reuse_freed_memory()  # else every batch page-faults its activations back in
    plan = _plan(models, data, opts)
    opts = plan.options  # with the positions read (``read_positions``)
    clock = add_time(timings, "trace_and_analyze", clock)
    with ActivationStore(opts.cache_gb * 2**30, opts.work_dir) as store:
        outputs = _recorded(plan, store)
        if plan.models == 2:
            correlations = _matching_statistics(plan, outputs, timings)
            clock = time.perf_counter()
            matchings = _match(plan, correlations)
        else:
            plan, matchings = _aligned(plan, timings)
            clock = time.perf_counter()
        costs, widths = _widths(plan, matchings)
        maps = MergeMaps(plan.analysis.table, selections(plan.analysis, matchings, widths), plan.models)
        clock = add_time(timings, "match_and_budget", clock)
        fits, emit_with = _warm_start(plan, maps)
        residuals, passes, underdetermined = _refit(plan, maps, fits, emit_with, store, outputs, timings)
        kept = {"least_squares_memory_peak_mb": store.peak_memory_bytes / 2**20,
                "least_squares_disk_peak_mb": store.peak_disk_bytes / 2**20,
                "least_squares_spilled_mb": store.spilled_bytes / 2**20}
    add_time(timings, "solve", clock)
    merged = _emit(plan, fits, emit_with, timings)
    report = _report(plan.analysis, models[0], merged, matchings, widths, costs, residuals, timings,
                     method=opts.method, budget=opts.budget, models=plan.models, separate=plan.separate,
                     samples=len(plan.x),
                     reset_bn=opts.resets_batch_norm,
                     batch_size=plan.batch_size,
                     match_samples=None if opts.matching == "weight" else min(len(plan.x), opts.match_samples
                                                                              or len(plan.x)),
                     width_search="zip-until " + opts.zip_until if opts.zip_until else opts.width_search,
                     least_squares=opts.least_squares if plan.refit == "least-squares" else None,
                     positions=opts.positions, least_squares_passes=passes, **kept, device=str(opts.device),
                     underdetermined_layers=underdetermined)
    return MergeResult(merged.eval(), report, plan.analysis)


def _recorded(plan: _Plan, store: ActivationStore) -> LayerReads | None:
    """What the matching pass records for least squares: sequential, the first segment's outputs; one-pass,
    where ``records_reads``, every layer's inputs and outputs."""
    if plan.sequential:
        return LayerReads(store, {n for n, level in plan.levels.items() if level in plan.segments[0]},
                          plan.outputs_memory)
    if plan.records_reads:
        layers = [layer for layer in plan.analysis.layers if layer.refit]
        return LayerReads(store, {layer.node for layer in layers}, store.limit, inputs=True,
                          shared=shared_inputs(layers))
    return None


def _arguments(models, args: tuple, choices: dict) -> tuple[list[nn.Module], object, MergeOptions | None]:
    """``merge``'s models, data and options, from either of its two forms."""
    if isinstance(models, nn.Module):
        if not args or not isinstance(args[0], nn.Module):
            raise PleasccError("merge takes two models and the data, or a list of models and the data: "
                               "pleascc.merge(model_a, model_b, data) or pleascc.merge([m1, m2, m3], data)")
        models, args = [models, args[0]], args[1:]
    models = list(models)
    if not args:
        raise PleasccError("merge needs the calibration data after the models")
    if len(models) < 2:
        raise PleasccError(f"merge takes 2 or more models, not {len(models)}: to compress one, pass it twice "
                           "with a budget below 1.0")
    return models, args[0], args[1] if len(args) > 1 else choices.pop("options", None)


def _plan(models: list[nn.Module], data, opts: MergeOptions) -> _Plan:
    """Check the inputs, trace and analyse the models, and plan the passes: every error a merge can raise
    before its heavy work comes from here."""
    target = usable_device(opts.device)
    opts.check_models(len(models))
    x = _calibration_tensor(data, opts.samples, models[0], opts.seed)
    token_ids = isinstance(x, PaddedTokens) or (isinstance(x, torch.Tensor) and x.dtype in TOKEN_DTYPES)
    opts = dataclasses.replace(opts, positions=read_positions(opts.positions, token_ids))
    gms, analysis, heads, states = _trace_all(models, x)
    runs = statistics_copies(gms, target, read_rows(x[:2]))
    batch_size = opts.batch_size or batch_size_for(analysis, gms[0].graph, opts.positions)
    local = _shard(x)  # this process's samples; all of them unless run under torch.distributed
    plan = _Plan(options=opts, x=x, local=local, gms=gms, runs=runs, analysis=analysis, heads=heads, states=states,
                 batch_size=batch_size, separate=_separate_labels(opts.labels, heads, states))
    if plan.refit == "least-squares":
        plan.underdetermined = check_samples(analysis, plan.separate_heads, len(x), opts.positions)
    if plan.sequential:
        plan.fused = norm_producers(analysis, plan.separate_heads)
        plan.levels = layer_levels(gms[0], analysis, plan.fused)
        plan.segments, plan.outputs_memory = plan_outputs(gms[0], analysis, plan.levels, len(local), opts.positions,
                                                          opts.cache_gb * 2**30, opts.work_dir, len(models))
    elif plan.refit == "least-squares" and plan.matches_every_sample:
        plan.records_reads = records_reads(analysis, len(local), opts.positions, opts.cache_gb * 2**30,
                                           opts.work_dir, len(models))
    return plan


def _matching_statistics(plan: _Plan, outputs: LayerReads | None, timings: dict[str, float]) -> dict | None:
    """The matching pass's correlations (None where matching reads the weights alone); reading every sample, it
    also records what least squares reads (``_recorded``)."""
    opts = plan.options
    if plan.data_free:
        return None
    clock = time.perf_counter()
    everything = plan.matches_every_sample
    matched_on = plan.local if everything else _shard(plan.x[:opts.match_samples])
    correlations = feature_moments(plan.runs, plan.analysis, matched_on, plan.batch_size, opts.progress,
                                   within=plan.matcher == "zipit", positions=opts.positions,
                                   outputs=outputs if everything else None)
    add_time(timings, "matching_statistics", clock)
    return correlations


def _aligned(plan: _Plan, timings: dict[str, float]) -> tuple[_Plan, dict]:
    """More than two models: each past the first permuted into A's layout (``align``), matched to A as a pair
    is by Hungarian matching (``average`` merges them as they are), and the tuples of aligned units that the
    budget merges; ZipIt! zips the plain spaces of all of them from one more, joint, pass."""
    if plan.matcher == "identity":
        return plan, aligned_matchings(plan.analysis, [], [], plan.models)
    gms, states, pairs, perms = list(plan.gms), list(plan.states), [], []
    paired = dataclasses.replace(plan.options, method="permute") if plan.matcher == "zipit" else plan.options
    for k in range(1, plan.models):
        pair = dataclasses.replace(plan, options=paired, gms=(gms[0], gms[k]), runs=(plan.runs[0], plan.runs[k]),
                                   states=(states[0], states[k]))
        pairs.append(_match(pair, _matching_statistics(pair, None, timings)))
        perms.append(alignment(pairs[-1]))
        gms[k], states[k] = aligned_copy(gms[k], plan.analysis, states[k], perms[-1])
    runs = statistics_copies(tuple(gms), usable_device(plan.options.device), read_rows(plan.x[:2]))
    plan = dataclasses.replace(plan, gms=tuple(gms), runs=runs, states=tuple(states))
    matchings = aligned_matchings(plan.analysis, pairs, perms, plan.models)
    if plan.matcher == "zipit":  # the plain spaces zipped across every model at once, heads kept aligned
        joint = _matching_statistics(plan, None, timings)
        matchings.update(zip_spaces(plan.analysis, joint, jointly_matched(plan.analysis, joint),
                                    plan.options.zip_options, plan.models))
    return plan, matchings


def _match(plan: _Plan, correlations: dict | None) -> dict:
    """Every free space's matching: from the features' correlations, or the weights alone (data-free)."""
    opts = plan.options
    if plan.matcher == "l1":
        return l1_pruning(plan.analysis, plan.states[0])
    if correlations is None:
        return weight_matching(plan.analysis, plan.states, seed=opts.seed)
    return match_features(plan.analysis, correlations, plan.states, plan.matcher, opts.zip_options)


def _widths(plan: _Plan, matchings: dict) -> tuple[list, dict]:
    """Each layer's cost, and each free space's merged width under the budget (or ZipIt!'s stopping rule)."""
    opts = plan.options
    costs = budget_pass.layer_costs(plan.analysis, plan.separate_heads, plan.models)
    if opts.zip_until is not None:
        return costs, budget_pass.zip_until_widths(plan.analysis, matchings, opts.zip_until)
    search = budget_pass.WIDTHS[opts.width_search]
    if plan.models > 2:
        return costs, aligned_widths(plan.analysis, matchings, costs, opts.budget, search)
    return costs, search(plan.analysis, matchings, costs, opts.budget)


def _warm_start(plan: _Plan, maps: MergeMaps):
    """The fits to make (one per block of every refitted layer, each from its permuted average), and the
    emitter of merged models, its other parameters permuted and averaged."""
    fits = make_problems(plan.analysis, maps, plan.states, plan.separate_heads)
    fuse_norms(fits, plan.fused)
    own = {n for layer in plan.heads if layer.node in plan.separate_heads for n in (layer.weight, layer.bias)}
    state = {name: merge_param(plan.analysis, maps, name, tuple(s[name] for s in plan.states))
             for name in plan.states[0] if name not in own}  # separate heads: from their own fits
    return fits, functools.partial(emit, plan.gms[0], plan.analysis, maps, state)


def _refit(plan: _Plan, maps: MergeMaps, fits: list[Problem], emit_with, store: ActivationStore,
           outputs: LayerReads | None, timings: dict[str, float]) -> tuple[dict, int, list[str]]:
    """The method's refit of the warm start: least squares (one pass, or level by level), RegMean, or none;
    returns the residuals, the passes made and the underdetermined layers."""
    opts = plan.options
    if plan.refit == "regmean":
        _regmean(plan, maps, fits)
    if plan.refit != "least-squares":
        return {}, 0, []
    solver = LeastSquares(plan.runs, plan.analysis, maps, plan.local, plan.batch_size, opts.progress, opts.ridge,
                          opts.positions, timings)
    if not plan.sequential:  # no pass of the models where the matching pass recorded what the fits read
        return solver.fit(fits, recorded=outputs), 0 if outputs else 1, plan.underdetermined
    residuals, passes = solver.fit_in_levels(
        fits, plan.fused, plan.levels, plan.segments, outputs, store, plan.matches_every_sample,
        lambda: emit_with(layer_weights(fits, plan.states)).to(opts.device))
    return residuals, passes, plan.underdetermined


def _regmean(plan: _Plan, maps: MergeMaps, fits: list[Problem]) -> None:
    """RegMean: each dense block from both models' own weights and Grams; norms stay averaged."""
    opts = plan.options
    blocked = [p for p in fits if p.layer.blocked or p.model is not None]
    gram_moments(plan.runs, maps, blocked, plan.local, plan.batch_size, opts.progress, opts.positions)
    for p in blocked:
        in_width = maps.size(p.layer.in_dim)
        per_model = {m: block_slice(own_weights(plan.analysis, maps, p.layer, plan.states[m], m), p.block, in_width)
                     for m in p.grams}
        p.w = regmean(p, per_model, opts.regmean_alpha, opts.ridge, has_bias=p.layer.has_bias)


def _emit(plan: _Plan, fits: list[Problem], emit_with, timings: dict[str, float]) -> fx.GraphModule:
    """The merged model, with each block's fit (or warm start); BatchNorm statistics recomputed where the
    options say (``MergeOptions.resets_batch_norm``)."""
    opts = plan.options
    clock = time.perf_counter()
    # the reset re-estimates running statistics, which norms' fits fold into γ, β: those stay averaged
    refitted = fits if not opts.resets_batch_norm else [p for p in fits if not p.layer.folds_running_stats]
    merged = emit_with(layer_weights(refitted, plan.states))
    add_time(timings, "emit", clock)
    if opts.resets_batch_norm:
        reset_batch_norm(merged, plan.local, plan.batch_size, opts.progress)
    return merged


def _trace_all(models: list[nn.Module], x: torch.Tensor):
    """Trace every model, analyse A's graph, and check the others have the same graph and parameters."""
    check_data_fits(models[0], CalibrationData(x))
    gm_a = trace(models[0], "model A")
    analysis = analyze(gm_a, model_inputs(read_rows(x[:2])))
    heads = head_layers(analysis)
    own = frozenset(n for h in heads for n in (h.weight, h.bias) if n)
    gms = [gm_a]
    for k, model in enumerate(models[1:], 1):
        check_same_architecture(models[0], model, ("A", model_name(k)), heads=own)
        gms.append(trace(model, f"model {model_name(k)}"))
        check_same_graph(gm_a, gms[-1], model_name(k))
    states = tuple(graph_tensors(gm) for gm in gms)
    _check_finite_weights(states)
    return tuple(gms), analysis, heads, states


def _check_finite_weights(states: tuple[dict, ...]) -> None:
    """A weight that is NaN or Inf (a diverged run) would reach every statistic and every fit: name it first."""
    for model, state in zip(map(model_name, range(len(states))), states):
        broken = next((name for name, t in state.items() if t.is_floating_point() and not t.isfinite().all()), None)
        if broken is not None:
            raise PleasccError(f"model {model}'s {broken} holds NaN or Inf: the checkpoint is broken (from a "
                               "diverged run?); merge a finite one")


def usable_device(device: str) -> torch.device:
    """``device`` parsed and tried with one allocation, before any work is done on it."""
    try:
        target = torch.device(device)
        torch.empty(0, device=target)
    except (RuntimeError, AssertionError) as exc:
        raise PleasccError(f"device {device!r} is not usable here ({str(exc).splitlines()[0]}): "
                           "pass --device cpu, or cuda on a machine with a GPU") from exc
    return target


def _calibration_tensor(data, samples: int | None, model: nn.Module, seed: int
                        ) -> torch.Tensor | NpyRows | PaddedTokens:
    """The calibration inputs, checked; a ``NpyRows`` stays on disk (its batches are checked as they are read).
    A mapping with ``input_ids`` and ``attention_mask`` (a tokenizer's output) is token ids with their padding."""
    if isinstance(data, str):
        data = load_data(data, samples=samples, model=model, seed=seed)
    x = data.x if isinstance(data, CalibrationData) else data
    if isinstance(x, Mapping) and "input_ids" in x:
        x = token_inputs(x["input_ids"], x.get("attention_mask"), "the calibration data")
    if not isinstance(x, (NpyRows, PaddedTokens)) and (not isinstance(x, torch.Tensor) or not (
            x.is_floating_point() or x.dtype in TOKEN_DTYPES)):
        raise PleasccError("calibration data must be a float tensor of preprocessed inputs (N, ...), an "
                           "integer tensor of token ids (N, tokens), or a tokenizer's input_ids and attention_mask")
    x = x[:samples] if samples else x
    if len(x) < 2:
        raise PleasccError(f"calibration data has {len(x)} sample(s); matching needs at least 2: pass more data")
    if isinstance(x, (NpyRows, PaddedTokens)) or not x.is_floating_point():
        return x
    if not torch.isfinite(x).all():
        raise PleasccError("calibration data contains NaN or Inf: check its preprocessing")
    return x.float()


def reset_batch_norm(model: nn.Module, x: torch.Tensor, batch_size: int = 64, progress: bool = False) -> None:
    """Recompute every BatchNorm module's running statistics on ``x`` (a cumulative average over its batches).

    Under torch.distributed each rank's statistics are averaged over the ranks.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:  # nothing to recompute: no pass over the data
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for batch in batches(x, batch_size, "BatchNorm statistics", progress, small_first=False):
            model(*model_inputs(batch))
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
    differ = any(s[layer.weight].shape != states[0][layer.weight].shape for layer in heads for s in states[1:])
    if labels == "shared" and differ:
        raise PleasccError("the models' heads differ in size, so they cannot share labels: use --labels separate")
    if labels == "separate" and not heads:
        raise PleasccError("--labels separate needs a classifier head (a Linear or Conv whose output is the "
                           "model's output); none was found")
    return labels == "separate" or (labels is None and differ)


def _report(analysis, model_a, merged, matchings, widths, costs, residuals, timings, **settings) -> dict:
    groups = []
    for root, m in matchings.items():
        merged_pairs = len(m.corr) - max(0, widths[root] - m.n)  # the merges not undone
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
        "flops_merged": budget_pass.flops(analysis, costs, widths, matchings),
        "relative_flops": budget_pass.relative_flops(analysis, costs, widths, matchings),
        "params_a": params, "params_b": params,
        "params_merged": sum(p.numel() for p in merged.parameters()),
        "coverage": coverage(analysis, model_a),
        "unsupported": analysis.unsupported,
        "groups": groups,
        "least_squares_residuals": residuals,
        "timings_s": timings,
    }
