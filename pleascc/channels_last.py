"""The memory layout the statistics passes run the models in: channels-last where it is faster and holds."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from pleascc.passes.rows import PaddedTokens, model_inputs


def statistics_copies(gms: tuple[fx.GraphModule, ...], device: torch.device, example: torch.Tensor | PaddedTokens
                      ) -> tuple[fx.GraphModule, ...]:
    """The graphs the statistics passes run: ``gms`` on ``device``, channels-last on the CPU where that holds.

    oneDNN's CPU convolutions run faster on channels-last maps
    (``bench_scale.py forward`` measures it), and the passes read values by
    their logical shape only, so the statistics are the same.  A graph that
    ``.view``s a map, or whose output changes so, keeps its layout: the copy
    is checked on ``example``.  So does a graph with one 4-D weight (a ViT's
    patch embedding: a single convolution, nothing to gain).
    Copies, as the caller's models share their weights with ``gms``.
    """
    if device.type != "cpu":
        return tuple(copy.deepcopy(gm).to(device) for gm in gms)
    if sum(p.dim() == 4 for p in gms[0].parameters()) < 2:  # a ViT's lone patch embedding: nothing to gain
        return gms
    copies = tuple(_channels_last(gm) for gm in gms)
    return copies if _same_outputs(gms[0], copies[0], example) else gms


def _channels_last(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose 4-D weights and buffers are channels-last (``Module.to`` also converts 5-D ones, and fails
    on those, as Swin's); maps computed from them follow."""
    twin = copy.deepcopy(gm)
    for tensor in (*twin.parameters(), *twin.buffers()):
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return twin


def _same_outputs(reference: fx.GraphModule, candidate: fx.GraphModule, example: torch.Tensor) -> bool:
    """Whether ``candidate`` runs on ``example`` and gives ``reference``'s outputs, up to rounding."""
    with torch.no_grad():
        expected = [t for t in tree_leaves(reference(*model_inputs(example))) if isinstance(t, torch.Tensor)]
        try:
            got = [t for t in tree_leaves(candidate(*model_inputs(example))) if isinstance(t, torch.Tensor)]
        except RuntimeError:  # a .view of a map that is no longer contiguous
            return False
    return len(got) == len(expected) and all(g.shape == e.shape and _close(g.float(), e.float())
                                             for g, e in zip(got, expected))


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to float32 rounding through the graph; NaN and Inf where the reference has them (the
    passes name those as they read them)."""
    scale = float(expected.nan_to_num(0.0, 0.0, 0.0).abs().max()) if expected.numel() else 0.0
    return torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * scale, equal_nan=True)
