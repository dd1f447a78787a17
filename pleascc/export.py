"""Back end: ONNX export, written atomically, checked against ONNX Runtime."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn

from pleascc.outputs import beside, check_writable
from pleascc.passes.errors import PleasccError, first_line
from pleascc.verify import flat_outputs

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with room for the graph
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HALF_TOLERANCE = 3e-2  # half-precision outputs against the float32 merged model, relative to their scale


def output_dtype(name: str, fmt: str = "onnx") -> torch.dtype:
    """The dtype a model is written in, checked against the format before any work is done."""
    dtype = DTYPES[name]
    if fmt == "onnx":
        _check_onnx_dtype(dtype)
    return dtype


def _check_onnx_dtype(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16:
        raise PleasccError("ONNX Runtime has no CPU kernels for bfloat16 models; use --dtype float16 for ONNX, "
                           "or --format pt for bfloat16")


def _cast(model: nn.Module, example: torch.Tensor, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    """The model and example to write in ``dtype`` (merging itself is always float32)."""
    if dtype == torch.float32:
        return model, example
    return copy.deepcopy(model).to(dtype), example.to(dtype)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str, *, verify: bool = True,
                tolerance: float | None = None, external_data: bool | None = None,
                dtype: torch.dtype = torch.float32) -> dict:
    """Export ``model`` to ``path`` with a dynamic batch axis (and token axis: ``_with_dynamic_axes``); verify
    with ONNX Runtime.

    ``dtype`` float16 writes half-precision weights and input, checked against
    the float32 model (bfloat16 has no ONNX Runtime CPU kernels, so it is for
    ``export_torch`` only).  Weights above ~1.8 GB (or ``external_data=True``)
    go to ``path + ".data"`` beside the graph, as ONNX requires past 2 GB.  The
    files appear only when everything succeeded (written in a temporary folder
    beside ``path``, then moved).  Returns the check's figures.
    """
    _check_onnx_dtype(dtype)
    check_writable(path)
    folder = os.path.dirname(os.path.abspath(path))
    model = model.eval()
    with torch.no_grad():
        expected = flat_outputs(model(example))
    model, example = _cast(model, example, dtype)
    if external_data is None:
        external_data = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > EXTERNAL_DATA_BYTES
    if tolerance is None:
        tolerance = 1e-3 if dtype == torch.float32 else HALF_TOLERANCE
    names = ["logits"] if len(expected) == 1 else [f"logits_{k}" for k in range(len(expected))]
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pleascc-") as tmp_folder:
        tmp = os.path.join(tmp_folder, os.path.basename(path))
        _export(model, example, tmp, names, external_data)
        check = _verify(tmp, example, expected, tolerance) if verify else {}
        if external_data:
            os.replace(tmp + ".data", path + ".data")
        os.replace(tmp, path)
    return {"path": path, "outputs": names, "external_data": path + ".data" if external_data else None, **check}


def export_torch(model: nn.Module, example: torch.Tensor, path: str, tolerance: float | None = None,
                 dtype: torch.dtype = torch.float32) -> dict:
    """Save the merged model for PyTorch: its state dict at ``path`` and a torch.export archive (``.pt2``) beside it.

    The archive runs without pleascc (``torch.export.load(p).module()``), with
    a dynamic batch axis (and token axis), in ``dtype``; it is reloaded and checked against the
    float32 model before anything is moved into place.
    """
    archive = beside(path, ".pt2")
    for written in (path, archive):
        check_writable(written)
    folder = os.path.dirname(os.path.abspath(path))
    model = model.eval()
    with torch.no_grad():
        expected = flat_outputs(model(example))
    model, example = _cast(model, example, dtype)
    if tolerance is None:
        tolerance = 1e-5 if dtype == torch.float32 else HALF_TOLERANCE
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pleascc-") as tmp_folder:
        tmp_state, tmp_archive = os.path.join(tmp_folder, "state.pt"), os.path.join(tmp_folder, "model.pt2")
        try:
            program = _with_dynamic_axes(example, lambda axes: torch.export.export(model, (example,),
                                                                                   dynamic_shapes=(axes,)))
            torch.export.save(program, tmp_archive)
            with torch.no_grad():
                got = flat_outputs(torch.export.load(tmp_archive).module()(example))
        except Exception as err:
            first = first_line(err)
            raise PleasccError(f"torch.export failed: {first}; use --format onnx, or keep the model from the "
                               "Python API (pleascc.merge)") from None
        diff = max(float((g.float() - e).abs().max()) for g, e in zip(got, expected))
        if diff > tolerance * (max(float(e.abs().max()) for e in expected) or 1.0):
            raise PleasccError(f"the reloaded torch.export archive disagrees with the merged model (max abs diff "
                               f"{diff:.3g}); please report this model")
        torch.save(model.state_dict(), tmp_state)
        os.replace(tmp_archive, archive)
        os.replace(tmp_state, path)
    return {"path": path, "archive": archive, "max_abs_diff": diff}


def _with_dynamic_axes(example: torch.Tensor, export):
    """``export(axes)`` with the batch axis dynamic, and for token ids (N, tokens) the token axis too, where the
    model allows it (learned positions and RoPE do, up to their table; a model fixed to one length does not)."""
    batch = {0: torch.export.Dim("batch", min=1)}
    if example.dim() == 2 and not example.is_floating_point():
        try:
            return export({**batch, 1: torch.export.Dim("tokens", min=1)})
        except Exception:  # fixed to the example's length: export it at that length
            pass
    return export(batch)


def _export(model: nn.Module, example: torch.Tensor, path: str, names: list[str], external_data: bool) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            _with_dynamic_axes(example, lambda axes: torch.onnx.export(
                model, (example,), path, dynamo=True, input_names=["input"], output_names=names,
                dynamic_shapes=(axes,), external_data=external_data, optimize=True, verbose=False))
        except Exception as err:  # report the exporter's own reason in one line
            first = first_line(err)
            raise PleasccError(f"ONNX export failed: {first}; the merged model is still available "
                               "through the Python API (pleascc.merge)") from None
    if external_data and not os.path.exists(path + ".data"):
        raise PleasccError(f"ONNX export wrote no external data file beside {path}; please report this model")


def _verify(path: str, example: torch.Tensor, expected: list[torch.Tensor], tolerance: float) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, session_feed(session, example))
    diffs = [float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected)]
    scale = max(float(e.abs().max()) for e in expected) or 1.0
    relative = max(diffs) / scale
    if relative > tolerance:
        raise PleasccError(f"ONNX Runtime disagrees with the merged torch model: max abs diff {max(diffs):.3g} "
                           f"({relative:.3g} of the output scale > {tolerance}); please report this model")
    return {"max_abs_diff": max(diffs), "relative_diff": relative}


def onnx_predict(path: str, x: torch.Tensor, batch_size: int = 256) -> list[np.ndarray]:
    """Run an exported model with ONNX Runtime over ``x`` in batches; one array per output."""
    import onnxruntime as ort

    return session_predict(ort.InferenceSession(path, providers=["CPUExecutionProvider"]), x, batch_size)


def session_feed(session, x: torch.Tensor) -> dict[str, np.ndarray]:
    """``x`` as the session's input, in the model's input type (float16 models take float16, token ids int64)."""
    inp = session.get_inputs()[0]
    return {inp.name: x.numpy().astype(_ONNX_INPUTS.get(inp.type, np.float32))}


_ONNX_INPUTS = {"tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def session_predict(session, x: torch.Tensor, batch_size: int) -> list[np.ndarray]:
    """An ONNX Runtime session's outputs over ``x``, run in batches; one array per output."""
    chunks = [session.run(None, session_feed(session, x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
    return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]
