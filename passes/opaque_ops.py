"""Library layers and functions fx keeps opaque, which the tracer and the op rules both know by identity.

timm marks some modules as leaves and some functions as wrapped for fx
(``timm_registrations``); weight-standardized convolutions are kept whole so
that one rule sees a convolution (``STANDARDIZED_CONVS``); ``grid_offsets`` is
the wrapped function ConViT's opened attention calls.  The tracer
(``pleascc.trace``) registers them; the op rules (``groups``) are keyed by them.
"""

from __future__ import annotations

import importlib

import torch
import torch.fx as fx

# timm marks these leaves for feature extraction; tracing through them exposes F.batch_norm.
_TRACE_THROUGH = {"BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"}


def timm_registrations() -> tuple[list, list]:
    """timm's leaf modules (less those traced through) and the functions it keeps opaque to fx; none without timm."""
    try:
        from timm.layers import _fx
    except ImportError:
        return [], []
    leaves = [m for m in _fx._leaf_modules if m.__name__ not in _TRACE_THROUGH]
    return leaves + [m for m in STANDARDIZED_CONVS if m not in leaves], list(_fx._autowrap_functions)


def library_classes(module: str, *names: str) -> list[type]:
    """Classes of a library's module (timm, transformers), for rules and openers keyed by them; none without it."""
    try:
        found = importlib.import_module(module)
    except ImportError:
        return []
    return [getattr(found, name) for name in names if hasattr(found, name)]


# weight-standardized convolutions, kept whole so that one rule sees a convolution
STANDARDIZED_CONVS = library_classes("timm.layers.std_conv", "StdConv2d", "StdConv2dSame", "ScaledStdConv2d",
                                  "ScaledStdConv2dSame")


@fx.wrap
def grid_offsets(x: torch.Tensor) -> torch.Tensor:
    """(1, N, N, 3): ConViT's offsets (dx, dy, dx² + dy²) between the N tokens of ``x``, a square grid.

    Wrapped for fx (its sizes are Python ints); it reads only the token count.
    """
    side = int(x.shape[1] ** 0.5)
    steps = torch.arange(side, dtype=x.dtype, device=x.device)
    offsets = steps.view(1, -1) - steps.view(-1, 1)
    dx = offsets.repeat(side, side)
    dy = offsets.repeat_interleave(side, dim=0).repeat_interleave(side, dim=1)
    return torch.stack([dx, dy, dx**2 + dy**2], dim=-1).unsqueeze(0)



# GPT-2's Conv1D (a Linear with its weight stored (in, out)), kept whole so that one rule sees a layer
TRANSPOSED_LINEARS = library_classes("transformers.pytorch_utils", "Conv1D")


@fx.wrap
def attention_bias(embeds: torch.Tensor, padding: torch.Tensor | None, causal: bool,
                   window: int | None) -> torch.Tensor:
    """(N, 1, T, T): 0 where a token may attend, the dtype's minimum where not, as transformers' eager masks.

    Wrapped for fx (transformers builds its masks with Python control flow);
    it reads only ``embeds``' batch, tokens and dtype, and the (N, T) padding
    mask (1 = a real token), so it touches no feature axis.  ``window``: a
    sliding window of that many tokens (Mistral's).
    """
    tokens = torch.arange(embeds.shape[1], device=embeds.device)
    allowed = torch.ones(embeds.shape[1], embeds.shape[1], dtype=torch.bool, device=embeds.device)
    if causal:
        allowed = allowed & (tokens[None, :] <= tokens[:, None])
    if window is not None:
        allowed = allowed & (tokens[None, :] > tokens[:, None] - window)
    allowed = allowed[None, None].expand(embeds.shape[0], 1, -1, -1)
    if padding is not None:
        allowed = allowed & padding.to(torch.bool)[:, None, None, :]
    zero = torch.zeros((), dtype=embeds.dtype, device=embeds.device)
    return torch.where(allowed, zero, torch.finfo(embeds.dtype).min)


@fx.wrap
def tokens_mask(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The (N, T) padding mask of ``ids``: ``mask`` where given, else all ones (every token is real).

    Wrapped for fx, so that a traced model's optional padding-mask input is a
    tensor in the graph whether or not a caller passes one.
    """
    return torch.ones(ids.shape[:2], dtype=torch.long, device=ids.device) if mask is None else mask
