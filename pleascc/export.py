"""Back end: ONNX export, written atomically, checked against ONNX Runtime."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn

from pleascc.errors import PleasccError
from pleascc.verify import flat_outputs




def export_onnx(model: nn.Module, example: torch.Tensor, path: str, *, verify: bool = True,
                tolerance: float = 1e-3) -> dict:
    """Export ``model`` to ``path`` with a dynamic batch axis; verify with ONNX Runtime.

    The file appears only when everything succeeded (written to a temporary file
    in the same folder, then renamed).  Returns the check's figures.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise PleasccError(f"cannot write {path}: folder {folder} does not exist or is not writable; "
                           "choose another -o path")
    model = model.eval()
    with torch.no_grad():
        expected = flat_outputs(model(example))
    names = ["logits"] if len(expected) == 1 else [f"logits_{k}" for k in range(len(expected))]
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        _export(model, example, tmp, names)
        check = _verify(tmp, example, expected, tolerance) if verify else {}
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp + ".data"):
            if os.path.exists(leftover):
                os.remove(leftover)
    return {"path": path, "outputs": names, **check}


def _export(model: nn.Module, example: torch.Tensor, path: str, names: list[str]) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), path, dynamo=True, input_names=["input"], output_names=names,
                              dynamic_shapes=({0: batch},), external_data=False, optimize=True, verbose=False)
        except Exception as err:  # report the exporter's own reason in one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PleasccError(f"ONNX export failed: {first}; the merged model is still available "
                               "through the Python API (pleascc.merge)") from None


def _verify(path: str, example: torch.Tensor, expected: list[torch.Tensor], tolerance: float) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: example.numpy()})
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

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    chunks = [session.run(None, {name: x[i:i + batch_size].numpy()}) for i in range(0, len(x), batch_size)]
    return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]
