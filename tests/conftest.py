"""Shared fixtures and helpers: make examples/ importable, locate the read-only shared data, run a model through
ONNX Runtime, and the command line's inputs and checks."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pleascc
from pleascc.cli import main
from pleascc.demo import digits_cnn
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


# ---------------------------------------------------------------------------- the command line

ARCH = ["--arch", "pleascc.demo:digits_cnn", "--arch-kwargs", '{"width": 8}']
SAMPLES = 300
UNTRACEABLE = """\
import torch.nn as nn
from pleascc.demo import digits_cnn


class Net(nn.Sequential):
    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return super().forward(x)


def make(num_classes=5, width=8):
    return Net(*digits_cnn(num_classes, width))
"""


@pytest.fixture(scope="module")
def one_thread():
    """Two cores shared with other jobs: torch's thread pool would oversubscribe them (100× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_npz(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The command line's inputs, good and bad: checkpoints, calibration files and architecture files of the
    demo's small CNN (``ARCH``), made once per module."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    f = {}
    for name, width in (("a", 8), ("b", 8), ("b16", 16)):
        f[name] = str(root / f"{name}.pt")
        torch.save(digits_cnn(num_classes=5, width=width).state_dict(), f[name])
    nan_model = digits_cnn(num_classes=5, width=8)
    with torch.no_grad():
        nan_model[0].weight[0, 0, 0, 0] = float("nan")
    f["nan_weight"] = str(root / "nan_weight.pt")
    torch.save(nan_model.state_dict(), f["nan_weight"])
    f["whole"] = str(root / "whole.pt")
    torch.save(digits_cnn(num_classes=5, width=8), f["whole"])
    f["whole_other"] = str(root / "whole_other.pt")
    torch.save(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 5)),
               f["whole_other"])
    f["junk"] = str(root / "junk.pt")
    (root / "junk.pt").write_bytes(np.random.default_rng(0).bytes(1000))
    x = np.random.default_rng(0).standard_normal((SAMPLES, 1, 8, 8)).astype(np.float32)
    f["calib"] = save_npz(root / "calib.npz", x=x)
    f["few"] = save_npz(root / "few.npz", x=x[:6])  # most layers underdetermined
    f["ten"] = save_npz(root / "ten.npz", x=x[:10])  # only the classifier (17 unknowns) underdetermined
    f["three_channels"] = save_npz(root / "three_channels.npz", x=np.repeat(x, 3, axis=1))
    x_nan = x.copy()
    x_nan[5, 0, 1, 1] = np.nan
    f["nan_data"] = save_npz(root / "nan_data.npz", x=x_nan)
    f["no_x"] = save_npz(root / "no_x.npz", inputs=x)
    for name, array in (("calib_npy", x), ("nan_npy", x_nan)):  # read batch by batch from disk
        f[name] = str(root / f"{name}.npy")
        np.save(f[name], array)
    f["untraceable"] = str(root / "untraceable.py")
    (root / "untraceable.py").write_text(UNTRACEABLE)
    f["a_file"] = str(root / "somefile.txt")
    (root / "somefile.txt").write_text("not a folder\n")
    return f


def merge_args(files: dict, out, *extra, a="a", b="b", data="calib", arch=ARCH) -> list[str]:
    """A ``pleascc merge`` command line over the ``files`` fixture's checkpoints and data."""
    return ["merge", files[a], files[b], *arch, "--data", files[data], "-o", str(out), "--no-progress", *extra]


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expecting exit 2 and a single-line 'pleascc: error:' message; return the message."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pleascc: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err
