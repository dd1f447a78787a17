"""MNIST test images from the shared data, as 32×32 RGB: calibration data from neither CIFAR model's domain.

PLeaS-free calibrates on such data (the benchmark's ``pleas-free`` rows).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from cifar10 import DEFAULT_ROOT

IMAGES = "t10k-images-idx3-ubyte.gz"


def load_mnist_rgb(root: str | Path = DEFAULT_ROOT, size: int = 32) -> np.ndarray:
    """uint8 N × size × size × 3: the 10,000 digits, resized and replicated to three channels."""
    with gzip.open(Path(root) / "mnist" / IMAGES) as f:
        raw = f.read()
    magic, count, rows, cols = (int.from_bytes(raw[k:k + 4], "big") for k in range(0, 16, 4))
    if magic != 2051 or len(raw) != 16 + count * rows * cols:
        raise ValueError(f"{IMAGES} is not an IDX image file of {count} images")
    digits = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, rows, cols)
    resized = np.stack([np.asarray(Image.fromarray(d).resize((size, size), Image.BILINEAR)) for d in digits])
    return np.repeat(resized[..., None], 3, axis=3)
