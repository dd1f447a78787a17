"""What a layer's fit reads of a value: spatial positions and tokens sampled, convolutions' patches (im2col).

Matching's correlations and least squares' moments read the same sampled
positions of a feature map (``sampled_positions``, fixed per map size, so a
sharded merge reads what one process would); a convolution's fit reads the
im2col patches at them, gathered without unfolding the whole map.  Kept
apart from the sums: matching, least squares and batch sizing all read
through it; which of these a layer's fit reads, its class says
(``layers``: ``Layer.read_input``).
"""

from __future__ import annotations

import contextlib
import functools
from contextvars import ContextVar
from typing import Iterator

import torch
import torch.nn.functional as F

from pleascc.passes.errors import PleasccError
from pleascc.passes.merge_maps import take


@functools.lru_cache(maxsize=None)
def sampled_positions(length: int, most: int | None) -> torch.Tensor | None:
    """A fixed random subset of ``most`` of a feature map's ``length`` spatial positions; None: all of them.

    A 3×3 convolution's least squares has 9·C_in unknowns per output but
    N·H·W rows, and its Gram costs several times the convolution itself; far fewer
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
    check_unpadded("a convolution's channels-first map")
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    keep = sampled_positions(flat.shape[2], positions)
    return flat if keep is None else take(flat, 2, keep.to(flat.device))


_VALID_TOKENS: ContextVar[torch.Tensor | None] = ContextVar("valid_tokens", default=None)


@contextlib.contextmanager
def valid_tokens(mask: torch.Tensor | None) -> Iterator[None]:
    """Within it, ``at_tokens`` reads only the tokens ``mask`` (N, T) marks 1: a padded batch's real ones."""
    token = _VALID_TOKENS.set(None if mask is None else mask.to(torch.bool))
    try:
        yield
    finally:
        _VALID_TOKENS.reset(token)


def padded() -> bool:
    """Whether the batch being read has padded tokens to skip (``valid_tokens``)."""
    return _VALID_TOKENS.get() is not None


def at_tokens(x: torch.Tensor, batch_axis: int, unit_axes: tuple[int, ...], positions: int | None) -> torch.Tensor:
    """``x`` as (N, tokens read, *units): its samples first, its units last, the axes between (tokens,
    within one sample) flattened and read at ``sampled_positions``.

    Within ``valid_tokens``, padded tokens are dropped: the real tokens read
    of every sample become one row of tokens, (1, real tokens read, *units).
    A value with one position per sample (a pooled output) has no padding.
    """
    unit_axes = tuple(a % x.dim() for a in unit_axes)
    x = torch.movedim(x, (batch_axis, *unit_axes), (0, *range(-len(unit_axes), 0)))
    flat = x.reshape(x.shape[0], -1, *x.shape[x.dim() - len(unit_axes):])
    keep = sampled_positions(flat.shape[1], positions)
    read = flat if keep is None else flat.index_select(1, keep.to(flat.device))
    valid = _VALID_TOKENS.get()
    if valid is None or flat.shape[1] == 1:
        return read
    if flat.shape[1] != valid.shape[1]:
        check_unpadded(f"a value with {flat.shape[1]} positions per sample (the padding mask has "
                       f"{valid.shape[1]})")
    valid = valid if keep is None else valid.index_select(1, keep.to(valid.device))
    return read[valid].unsqueeze(0)


def check_unpadded(value: str) -> None:
    """A value whose tokens cannot be told apart must not hold padding: else fail, naming it (``value``)."""
    if padded():
        raise PleasccError(f"cannot tell the padded tokens of {value}: calibrate on unpadded sequences")


def im2col_patches(x: torch.Tensor, conv: dict, positions: int | None) -> torch.Tensor:
    """im2col (N, C·k, L) of a 1- or 2-D convolution's input, at ``sampled_positions`` of its L outputs.

    Only the sampled patches are gathered, from the unpadded map, with zeros
    where a patch reaches into the padding: a full im2col is k× the input,
    and padding the map first would copy all of it to read k·64 values per
    channel.
    """
    if isinstance(conv["padding"], str):
        raise PleasccError("least squares for convolutions with string padding is not supported; "
                           "use --method permute")
    if x.dim() == 3:  # 1-D: a 2-D convolution of height 1
        one = {k: (1, pair(v)[0]) for k, v in conv.items()}
        one["padding"] = (0, pair(conv["padding"])[0])
        return im2col_patches(x.unsqueeze(2), one, positions)
    if x.dim() != 4:
        raise PleasccError("least squares for 3-D convolutions is not supported yet; use --method permute")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (pair(conv[k]) for k in ("kernel_size", "stride", "padding", "dilation"))
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


def pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
