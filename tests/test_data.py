"""Loading calibration data: image folders, .npz/.pt tensors, subsets, and every user error."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pleascc.data import CalibrationData, check_data_fits, load_data
from pleascc.passes.rows import NpyRows, read_rows
from conftest import raises

def write_image(path, color, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    for i in range(3):
        write_image(root / "cat" / f"{i}.jpg", (255, 0, 0))
    for i in range(2):
        write_image(root / "dog" / f"{i}.png", (0, 0, 255))
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def tiny_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()


# ---------------------------------------------------------------------------- image folders


def test_image_folder(image_folder):
    data = load_data(str(image_folder), image_size=16)
    assert data.x.shape == (5, 3, 16, 16) and data.x.dtype == torch.float32
    assert data.y.tolist() == [0, 0, 0, 1, 1] and data.y.dtype == torch.int64
    assert len(data) == 5


def test_image_folder_normalization(image_folder):
    data = load_data(str(image_folder), image_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    red = data.x[0, :, 4, 4]
    assert torch.allclose(red, torch.tensor([1.0, -1.0, -1.0]), atol=0.02)


def test_image_folder_default_size_is_224(image_folder):
    assert load_data(str(image_folder), samples=1).x.shape == (1, 3, 224, 224)


def test_image_folder_size_from_timm_config(image_folder):
    import timm

    model = timm.create_model("test_resnet", pretrained=False)
    data = load_data(str(image_folder), samples=2, model=model)
    assert data.x.shape[-1] == model.pretrained_cfg["input_size"][-1]


def test_flat_image_folder_is_unlabeled(tmp_path):
    for i in range(2):
        write_image(tmp_path / f"{i}.png", (0, 255, 0))
    data = load_data(str(tmp_path), image_size=8)
    assert data.x.shape == (2, 3, 8, 8) and data.y is None


def test_image_folder_subset_is_deterministic(image_folder):
    a = load_data(str(image_folder), image_size=8, samples=3, seed=1)
    b = load_data(str(image_folder), image_size=8, samples=3, seed=1)
    assert len(a) == 3 and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_empty_folder(tmp_path):
    (tmp_path / "cat").mkdir()
    raises("holds no images", load_data, str(tmp_path))


def test_unreadable_image_named(image_folder):
    bad = image_folder / "dog" / "broken.jpg"
    bad.write_bytes(b"not really a jpeg")
    raises("broken.jpg", load_data, str(image_folder), image_size=8)


# ---------------------------------------------------------------------------- tensor files


def test_npz(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.rand(6, 3, 8, 8), y=np.arange(6))
    data = load_data(str(path))
    assert data.x.shape == (6, 3, 8, 8) and data.x.dtype == torch.float32
    assert data.y.tolist() == list(range(6)) and data.y.dtype == torch.int64


def test_npz_without_labels(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.rand(4, 5).astype(np.float16))
    data = load_data(str(path))
    assert data.y is None and data.x.dtype == torch.float32


def test_pt(tmp_path):
    path = tmp_path / "d.pt"
    x = torch.randn(10, 3, 8, 8)
    torch.save({"x": x, "y": torch.arange(10, dtype=torch.int32)}, path)
    data = load_data(str(path))
    assert torch.equal(data.x, x) and data.y.dtype == torch.int64


def test_pt_bare_tensor(tmp_path):
    path = tmp_path / "d.pt"
    torch.save(torch.randn(3, 4), path)
    assert load_data(str(path)).x.shape == (3, 4)


def test_subset_is_deterministic_and_paired(tmp_path):
    path = tmp_path / "d.pt"
    torch.save({"x": torch.arange(20.0).reshape(20, 1), "y": torch.arange(20)}, path)
    a = load_data(str(path), samples=5, seed=3)
    b = load_data(str(path), samples=5, seed=3)
    c = load_data(str(path), samples=5, seed=4)
    assert len(a) == 5 and torch.equal(a.x, b.x)
    assert not torch.equal(a.x, c.x)
    assert a.x[:, 0].long().tolist() == a.y.tolist()


def test_samples_beyond_size_uses_all(tmp_path):
    path = tmp_path / "d.pt"
    torch.save({"x": torch.randn(4, 2)}, path)
    assert len(load_data(str(path), samples=100)) == 4


def test_npy_is_read_batch_by_batch(tmp_path):
    """A .npy stays on disk: slices are lazy views, read only when a batch is taken, in any stride."""
    path = tmp_path / "d.npy"
    x = np.random.rand(20, 3, 4, 4)
    np.save(path, x)
    data = load_data(str(path))
    assert isinstance(data.x, NpyRows) and data.x.shape == (20, 3, 4, 4) and data.y is None
    view = data.x[3:17][1::4]
    assert isinstance(view, NpyRows) and len(view) == 4
    batch = read_rows(view)
    assert batch.dtype == torch.float32 and torch.equal(batch, torch.from_numpy(x[3:17][1::4]).float())


def test_npy_subset_is_the_same_as_npz(tmp_path):
    x = np.random.rand(30, 5).astype(np.float32)
    np.save(tmp_path / "d.npy", x)
    np.savez(tmp_path / "d.npz", x=x)
    lazy, eager = (load_data(str(tmp_path / f"d.{ext}"), samples=7, seed=2) for ext in ("npy", "npz"))
    assert torch.equal(read_rows(lazy.x), eager.x)


@pytest.mark.parametrize("array, match", [(np.zeros((4, 2), np.int64), "int64 array"),
                                          (np.zeros(4, np.float32), "array of shape (4,)"),
                                          (np.array([{"a": 1}] * 2, dtype=object), "object array")])
def test_bad_npy(tmp_path, array, match):
    path = tmp_path / "d.npy"
    np.save(path, array, allow_pickle=True)
    raises(match, load_data, str(path))


def test_npy_nan_found_when_read(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.array([[1.0], [np.nan]], np.float32))
    raises("NaN or Inf", read_rows, load_data(str(path)).x)


def test_npy_truncated_or_big_endian(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.arange(12, dtype=">f8").reshape(4, 3))
    assert torch.equal(read_rows(load_data(str(path)).x), torch.arange(12.0).reshape(4, 3))
    path.write_bytes(path.read_bytes()[:-8])
    raises("truncated", load_data, str(path))


def test_npy_not_numpy(tmp_path):
    path = tmp_path / "d.npy"
    path.write_bytes(b"not a numpy file")
    raises("cannot read", load_data, str(path))


class Payload:
    """A class torch.load(weights_only=True) must refuse to rebuild."""


def test_pt_does_not_unpickle_code(tmp_path):
    path = tmp_path / "d.pt"
    torch.save({"x": torch.randn(2, 2), "meta": Payload()}, path)
    raises("cannot read", load_data, str(path))


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"inputs": np.zeros((2, 3), np.float32)}, "has no 'x' or 'input_ids' (keys: inputs)"),
        ({"x": np.zeros((2, 3), np.uint8)}, "dtype torch.uint8"),
        ({"x": np.zeros((2, 3), np.float32), "y": np.zeros(3, np.int64)}, "x has 2 samples"),
        ({"x": np.zeros((2, 3), np.float32), "y": np.zeros(2, np.float32)}, "integer class labels"),
        ({"x": np.array([[0.0, np.nan]], np.float32)}, "NaN or Inf"),
        ({"x": np.array([[np.inf]], np.float32)}, "NaN or Inf"),
        ({"x": np.zeros((0, 3), np.float32)}, "expected N"),
        ({"x": np.zeros(5, np.float32)}, "expected N"),
    ],
)
def test_bad_npz(tmp_path, arrays, match):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    raises(match, load_data, str(path))


def test_npz_object_array_refused(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    raises("cannot read", load_data, str(path))


def test_missing_path(tmp_path):
    raises("not found", load_data, str(tmp_path / "nope.npz"))


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("1,2,3\n")
    raises("unsupported type '.csv'", load_data, str(path))


def test_bad_samples(tmp_path):
    path = tmp_path / "d.pt"
    torch.save({"x": torch.randn(4, 2)}, path)
    raises("--samples", load_data, str(path), samples=0)


# ---------------------------------------------------------------------------- check_data_fits


def test_data_fits():
    check_data_fits(tiny_model(), CalibrationData(torch.randn(4, 3, 8, 8), None))


def test_data_does_not_fit():
    msg = raises("calibration data of shape (4, 1, 8, 8) does not fit the model", check_data_fits,
                 tiny_model(), CalibrationData(torch.randn(4, 1, 8, 8), None))
    assert "--image-size" in msg
