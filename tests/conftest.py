"""Shared fixtures and helpers: make examples/ importable, locate the read-only shared data, run a model through
ONNX Runtime."""

import sys
from pathlib import Path

import pytest

import pleascc
from pleascc.export import onnx_predict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data next to the repository; skips the test where it is absent."""
    root = REPO.parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    return root


def healthy(model, x, seed: int = 0):
    """Random weights with BatchNorm statistics set from data, so features neither die nor explode.

    Plain random initializations of deep nets (MobileNet's SE gates, say) collapse
    to near-constant features that float32 rounding dominates; no merge can be
    checked on those.
    """
    import torch

    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def raises(match: str, fn, *args, **kwargs) -> str:
    """Assert a one-line PleasccError mentioning `match`; return its message."""
    from pleascc.passes.errors import PleasccError

    with pytest.raises(PleasccError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    assert match in msg, msg
    return msg


def predict_through_onnx(model, x_test, tmp_path):
    """``model``'s outputs on ``x_test`` as ONNX Runtime computes them from its export."""
    path = str(tmp_path / "merged.onnx")
    pleascc.export_onnx(model, x_test[:4], path)
    return onnx_predict(path, x_test)


def relative_error(got, want) -> float:
    """Largest absolute difference of ``got`` (NumPy) from ``want`` (a tensor), relative to ``want``'s largest."""
    want = want.detach().numpy()
    return float(abs(got - want).max() / abs(want).max())
