"""How the statistics passes cut the calibration data into batches: their size, their order, their device.

A batch is as large as the values it holds allow (``batch_size_for``: the
models' live values while ``executor.lockstep`` runs them, and one layer's
rows), read from disk only when it is reached, and first small
(``FIRST_BATCH``).  Every pass batches alike, so these rules live apart from
what the passes sum.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from pleascc.passes import distributed
from pleascc.passes.executor import peak_live_bytes
from pleascc.passes.groups import Analysis, Layer
from pleascc.passes.reads import valid_tokens
from pleascc.passes.rows import NpyRows, PaddedTokens, read_rows


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
    return layer.rows_bytes(source, output, positions) if source and output else 0


FIRST_BATCH = 2  # samples in a statistics pass's first batch (``batches``)


def batches(x: torch.Tensor | NpyRows | PaddedTokens, batch_size: int, desc: str, progress: bool,
            device: torch.device | None = None, small_first: bool = True
            ) -> Iterator[torch.Tensor | PaddedTokens]:
    """The data in batches, each read from disk only now if it is ``NpyRows``, and moved to ``device``.

    With ``small_first`` the first batch holds ``FIRST_BATCH`` samples.  A
    pass makes its long-lived values (sums, tensor headers, library caches)
    in its first batch; made between a full batch's activations, they pin
    the holes those leave when freed, and glibc's heap grows by gigabytes it
    cannot reuse (``benchmarks/results/scale_ratio_one_pass_runs.log``: a
    vit_small merge's peak with and without a small first batch).  The statistics
    are sums over samples, so how the samples are batched does not change
    them; callers whose result depends on the batches (BatchNorm's average
    of batch moments) pass False.  While the caller holds a batch of
    ``PaddedTokens``, reads skip its padded tokens (``reads.valid_tokens``).
    """
    starts = _batch_starts(len(x), batch_size, small_first)
    for start, stop in tqdm(zip(starts, [*starts[1:], len(x)]), total=len(starts), desc=desc,
                            disable=not progress or distributed.rank() > 0, leave=False, unit="batch"):
        batch = read_rows(x[start:stop]).to(device)
        with valid_tokens(batch.mask if isinstance(batch, PaddedTokens) else None):
            yield batch


def batch_count(samples: int, batch_size: int) -> int:
    """How many batches ``batches`` makes of ``samples`` (with ``small_first``)."""
    return len(_batch_starts(samples, batch_size, True))


def _batch_starts(samples: int, batch_size: int, small_first: bool) -> list[int]:
    first = min(FIRST_BATCH, batch_size) if small_first else batch_size
    return [0, *range(first, samples, batch_size)] if samples else []


def device_of(gm: torch.nn.Module) -> torch.device:
    """Where a model's parameters live, and so where the passes run it and keep their sums."""
    return next(iter(gm.parameters()), torch.empty(0)).device
