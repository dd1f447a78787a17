"""Checks that an analysis is right, for tests, benchmarks and users' own models."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from pleascc.passes.groups import analyze, coverage, permutation_groups, permute_state, random_permutations
from pleascc.trace import trace


def permutation_invariance(model: nn.Module, example: torch.Tensor, seed: int = 0) -> dict:
    """Permute every free group at random and measure how much the output moves.

    Runs in float64 so that only a wrong group (not rounding) can move it:
    a correct analysis gives a relative difference near 1e-15.
    """
    gm = trace(model)
    analysis = analyze(gm, (as_float(example, torch.float32),))
    gm = copy.deepcopy(gm).double().eval()
    x = as_float(example, torch.float64)
    with torch.no_grad():
        before = flat_outputs(gm(x))
        perms = random_permutations(analysis, torch.Generator().manual_seed(seed))
        gm.load_state_dict(permute_state(analysis, gm.state_dict(), perms))
        after = flat_outputs(gm(x))
    scale = max(float(t.abs().max()) for t in before) or 1.0
    diff = max(float((a - b).abs().max()) for a, b in zip(before, after))
    free = [g for g in permutation_groups(analysis) if g.fixed is None]
    return {
        "relative_diff": diff / scale,
        "free_groups": len(free),
        "coverage": coverage(analysis, model),
        "unsupported": analysis.unsupported,
    }


def permuted_copy(model: nn.Module, example: torch.Tensor, seed: int = 7) -> nn.Module:
    """The same function with every free group permuted at random: a merge must undo it."""
    analysis = analyze(trace(model), (as_float(example[:2], torch.float32),))
    perms = random_permutations(analysis, torch.Generator().manual_seed(seed))
    other = copy.deepcopy(model)
    other.load_state_dict(permute_state(analysis, model.state_dict(), perms))
    return other


def as_float(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A model input in ``dtype``, if it is a float input; token ids stay integers."""
    return x.to(dtype) if x.is_floating_point() else x


def non_degenerate(model: nn.Module) -> nn.Module:
    """Zero-initialised tensors (torchvision ViT's head) get small random values, so the property can fail."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    return model.eval()


def flat_outputs(value) -> list[torch.Tensor]:
    """The tensors of a model's output, in order, whatever its nesting."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for item in value for t in flat_outputs(item)]
