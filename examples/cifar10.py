"""CIFAR-10 from the shared JPEG archive, decoded once and cached outside the repository."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CACHE_PATH = Path.home() / ".cache" / "pleascc" / "cifar10_decoded.npz"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _decode(archive: Path) -> dict[str, np.ndarray]:
    """Decode every JPEG in the archive to one uint8 N x 32 x 32 x 3 array."""
    with np.load(archive) as z:
        jpeg, offsets = z["jpeg"], z["offsets"]
        labels, is_test = z["labels"], z["is_test"]
    images = np.empty((len(labels), 32, 32, 3), dtype=np.uint8)
    for i in tqdm(range(len(labels)), desc="decode cifar10", unit="img"):
        blob = jpeg[offsets[i] : offsets[i + 1]].tobytes()
        images[i] = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    return {"images": images, "labels": labels, "is_test": is_test}


def _cached_arrays(root: Path) -> dict[str, np.ndarray]:
    """Return decoded arrays, decoding only on first use (~10 s) and writing the cache atomically."""
    if not CACHE_PATH.exists():
        arrays = _decode(root / "cifar10_jpeg.npz")
        CACHE_PATH.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE_PATH.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(CACHE_PATH)
    with np.load(CACHE_PATH) as z:
        return {k: z[k] for k in z.files}


def load_cifar10(root: str | Path = DEFAULT_ROOT) -> Split:
    """(x_train, y_train, x_test, y_test): uint8 N x 32 x 32 x 3 images and int64 labels."""
    a = _cached_arrays(Path(root))
    test = a["is_test"]
    return a["images"][~test], a["labels"][~test], a["images"][test], a["labels"][test]


def to_tensor(x: np.ndarray, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> torch.Tensor:
    """uint8 N x H x W x C images to normalized float32 N x C x H x W."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((t - m) / s).contiguous()


def select_classes(x: np.ndarray, y: np.ndarray, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Keep only `classes` and relabel them 0..k-1 in the given order, for per-task heads."""
    remap = np.full(max(int(y.max()), *classes) + 1, -1, dtype=np.int64)
    remap[np.asarray(classes)] = np.arange(len(classes))
    keep = remap[y] >= 0
    return x[keep], remap[y[keep]]
