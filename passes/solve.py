"""Weights of the merged model: permute-and-average, and PLeaS' closed-form least squares.

Every parameter first gets the *warm start*: its A and B versions mapped to the
merged layout (output axes averaged, input axes gathered; see ``merge_maps``).
That alone is the ``permute``/``average`` baselines.  PLeaS then refits each
layer in closed form,

    W = W0 + (T·Xᵀ − W0·X·Xᵀ) (X·Xᵀ + λI)⁻¹,

the ridge solution pulled toward the warm start rather than toward zero, so
directions the calibration data never excites keep the warm start's weights
(and a model merged with itself, or kept side by side at 2×, comes out exact).
"""

from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx

from pleascc.passes.groups import Analysis, Layer
from pleascc.passes.merge_maps import Block, MergeMaps
from pleascc.passes.stats import Problem

State = dict[str, torch.Tensor]


def merge_param(analysis: Analysis, maps: MergeMaps, name: str, values: tuple[torch.Tensor, ...],
                model: int | None = None) -> torch.Tensor:
    """One parameter, given each model's ``values`` of it, in the merged layout; ``model`` keeps that model's own
    (head) values."""
    a = values[0]
    if not a.is_floating_point():
        return a.clone()
    binding = analysis.params.get(name)
    if binding is None:
        return (functools.reduce(operator.add, (v.double() for v in values)) / len(values)).to(a.dtype) \
            if model is None else values[model].clone()
    axes = list(enumerate(binding.dims))
    averaged = [(k, d) for k, d in axes if binding.roles[k] == "out"]
    if model is not None:
        in_axes = [(k, d) for k, d in axes if binding.roles[k] == "in"]
        return maps.gather(values[model].double(), model, in_axes).to(a.dtype)
    return maps.merge(tuple(v.double() for v in values), axes, averaged).to(a.dtype)


def warm_start(analysis: Analysis, maps: MergeMaps, layer: Layer, states: tuple[State, ...],
               model: int | None) -> torch.Tensor:
    """The layer's warm-start weights as (groups, outputs per group, inputs per group + 1): its kind's
    (``Layer.warm_start``), from its parameters merged (``merge_param``)."""
    def merged(name: str) -> torch.Tensor:
        return merge_param(analysis, maps, name, tuple(s[name] for s in states), model).double()

    return layer.warm_start(analysis, maps, states, merged)


def own_weights(analysis: Analysis, maps: MergeMaps, layer: Layer, state: State, model: int) -> torch.Tensor:
    """One model's weights in the merged layout, rows and columns gathered, not averaged (RegMean's W_m)."""
    def gathered(name: str) -> torch.Tensor:
        return maps.gather(state[name].double(), model, list(enumerate(analysis.params[name].dims)))

    return layer.as_rows(maps, gathered(layer.weight), gathered(layer.bias) if layer.bias else None)


def block_slice(w: torch.Tensor, block: Block, in_width: int) -> torch.Tensor:
    """The rows and input columns of a (groups, out, d + 1) weight that ``block`` owns (bias kept)."""
    if block.rows is not None:
        w = w[:, block.rows]
    if block.cols is not None:
        per_unit = (w.shape[2] - 1) // in_width
        cols = (block.cols[:, None] * per_unit + torch.arange(per_unit)).flatten()
        w = torch.cat([w[:, :, cols], w[:, :, -1:]], dim=2)
    return w


def ridge_fit(problem: Problem, ridge: float, has_bias: bool) -> tuple[torch.Tensor, float]:
    """The ridge fit around the warm start; returns the weights and the relative residual."""
    xx, rx = problem.xx, problem.rx
    if not has_bias:  # no bias to fit: drop the ones column
        xx, rx = xx[:, :-1, :-1], rx[:, :, :-1]
    system, damping = _ridged(xx, ridge)
    delta = _solve_spd(system, rx.transpose(1, 2)).transpose(1, 2)
    # ‖R − δX‖² = rr − 2⟨δ, rx⟩ + ⟨δ·xx, δ⟩, and δ·xx = rx − damping·δ: no (out × d) by (d × d) product
    err = problem.rr - (delta * rx).sum() - (damping[:, None, None] * delta * delta).sum()
    return problem.w0.to(delta) + _with_bias_column(delta, has_bias), max(float(err), 0.0) / max(problem.tt, 1e-30)


def regmean(problem: Problem, own: dict[int, torch.Tensor], alpha: float, ridge: float,
            has_bias: bool) -> torch.Tensor:
    """RegMean (Jin et al., 2023): W = (Σ G̃_m)⁻¹ Σ G̃_m W_m, with G̃ = α·G + (1 − α)·diag(G).

    ``own[m]``: model m's block weights in the merged layout; the Gram
    matrices of its inputs are ``problem.grams``.  Shrinking the Grams'
    off-diagonals (α < 1) pulls the merge toward plain averaging.  The ridge
    pulls toward the warm start, as in ``ridge_fit``, so a self-merge is exact.
    """
    keep = slice(None) if has_bias else slice(0, -1)  # no bias: drop the ones column
    some = next(iter(problem.grams.values()))
    w0 = problem.w0.to(some)[:, :, keep].transpose(1, 2)
    system, rhs = 0, 0
    for m, gram in problem.grams.items():
        g = gram[:, keep, keep]
        g = alpha * g + (1 - alpha) * torch.diag_embed(g.diagonal(dim1=1, dim2=2))
        system, rhs = system + g, rhs + g @ (own[m].to(g)[:, :, keep].transpose(1, 2) - w0)
    delta = _solve_spd(_ridged(system, ridge)[0], rhs).transpose(1, 2)
    return problem.w0.to(delta) + _with_bias_column(delta, has_bias)


def _ridged(gram: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``gram`` + λ·I per group, λ = ``ridge`` × the mean of its diagonal (scale-free); returns both."""
    damping = ridge * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-12)
    system = gram.clone()  # problems of one layer share its Gram
    system.diagonal(dim1=1, dim2=2).add_(damping[:, None])
    return system, damping


def _solve_spd(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``system``⁻¹·``rhs`` for a Gram plus a ridge: by Cholesky (half LU's flops).  Where a zero ridge left
    it singular (an input no sample excites), the least-norm solution, which leaves that input's weights
    at the warm start."""
    factor, info = torch.linalg.cholesky_ex(system)
    if bool((info != 0).any()):
        return torch.linalg.pinv(system, hermitian=True) @ rhs
    return torch.cholesky_solve(rhs, factor)


def _with_bias_column(delta: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """A fit without a bias solved for no ones column: give it a zero one back."""
    if has_bias:
        return delta
    return torch.cat([delta, torch.zeros(*delta.shape[:2], 1, dtype=delta.dtype, device=delta.device)], dim=2)


def layer_levels(gm: fx.GraphModule, analysis: Analysis, fused: dict[str, str] | None = None) -> dict[str, int]:
    """Each layer's level: the most layers on a path from the input to it, itself excluded.

    Layers of one level never feed each other, so they can be fitted together.
    ``fused``: norms fitted with the convolution they read (``fused_norms``),
    which take its level and add none.
    """
    fused = fused or {}
    layers = {layer.node for layer in analysis.layers}
    depth: dict[fx.Node, int] = {}
    levels = {}
    for node in gm.graph.nodes:
        level = max((depth[n] for n in node.all_input_nodes), default=0)
        if node.name in fused:
            levels[node.name] = levels[fused[node.name]]
            depth[node] = level
            continue
        if node.name in layers:
            levels[node.name] = level
        depth[node] = level + (node.name in layers)
    return levels
