"""``pleascc eval``: accuracy per head and latency of an ONNX model, with ONNX Runtime."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pleascc.export import session_feed, session_predict
from pleascc.passes.errors import PleasccError, first_line


def open_session(path: str):
    """An ONNX Runtime session on the CPU; a missing or unreadable file is a one-line error."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise PleasccError(f"model {path} not found: check the path")
    try:
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as err:
        first = first_line(err)
        raise PleasccError(f"{path} is not an ONNX model ONNX Runtime can load ({first[:200]}); "
                           "pass a file written by 'pleascc merge'") from None


def parse_head_classes(spec: str | None) -> list[range] | None:
    """``--head-classes`` "0-4,5-9" as one range of labels per head (None: the default), checked before any
    data is read."""
    if spec is None:
        return None
    try:
        return [range(int(lo), int(hi) + 1) for lo, hi in (part.split("-") for part in spec.split(","))]
    except ValueError:
        raise PleasccError(f"--head-classes {spec!r}: write one first-last range per head, e.g. 0-4,5-9") from None


def head_classes(widths: list[int], spec: str | None) -> list[range]:
    """The labels each output head predicts: ``spec`` as "0-4,5-9", or by default consecutive blocks of its width."""
    ranges = parse_head_classes(spec)
    if ranges is None:
        starts = np.cumsum([0, *widths[:-1]])
        return [range(int(s), int(s) + w) for s, w in zip(starts, widths)]
    if [len(r) for r in ranges] != widths:
        raise PleasccError(f"--head-classes {spec} gives {[len(r) for r in ranges]} classes per head but the model's "
                           f"heads have {widths}; give one range per head, as wide as the head")
    return ranges


def accuracies(logits: list[np.ndarray], y: np.ndarray, classes: list[range]) -> dict[str, float]:
    """Each head on the samples of its classes; with several heads also their mean and the joint argmax."""
    if len(logits) == 1:
        return {"accuracy": float((logits[0].argmax(1) + classes[0].start == y).mean())}
    out = {}
    for k, (z, labels) in enumerate(zip(logits, classes)):
        mask = np.isin(y, list(labels))
        out[f"head_{k}"] = float((z[mask].argmax(1) + labels.start == y[mask]).mean()) if mask.any() else None
    scored = [v for v in out.values() if v is not None]
    out["per_head_mean"] = sum(scored) / len(scored) if scored else None
    labels = np.concatenate([np.asarray(r) for r in classes])
    out["joint"] = float((labels[np.concatenate(logits, axis=1).argmax(1)] == y).mean())
    return out


def latency(session, x: torch.Tensor, batch_size: int, repeats: int = 10) -> dict[str, float]:
    """Median ms per batch of 1 and per batch of ``batch_size`` (after one warm-up run each)."""
    out = {}
    for label, batch in (("batch_1_ms", x[:1]), (f"batch_{min(batch_size, len(x))}_ms", x[:batch_size])):
        feed = session_feed(session, batch)
        session.run(None, feed)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - start) * 1e3)
        out[label] = statistics.median(times)
    return out


def evaluate_onnx(path: str, x: torch.Tensor, y: torch.Tensor | None, spec: str | None = None,
                  batch_size: int = 64) -> dict:
    """Accuracy per head (when labels are known) and latency of the ONNX model at ``path`` on ``x``."""
    session = open_session(path)
    try:
        logits = session_predict(session, x, batch_size)
    except Exception as err:
        first = first_line(err)
        raise PleasccError(f"the data of shape {tuple(x.shape[1:])} does not fit {path} ({first[:200]}); "
                           "check --image-size or the data's layout") from None
    classes = head_classes([z.shape[1] for z in logits], spec)
    report = {"model": path, "samples": len(x), "outputs": [o.name for o in session.get_outputs()],
              **latency(session, x, batch_size)}
    if y is not None:
        report.update(accuracies(logits, y.numpy(), classes))
    return report
