"""Calibration inputs for PLeaS: preprocessed float inputs or token ids (and optional labels) from user files.

The merge only needs activations, so the data is read once, validated up front, and every
problem a user can cause becomes a one-line PleasccError naming the cause and the fix.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pleascc.load import check_checksums, check_layouts
from pleascc.passes.errors import PleasccError, first_line
from pleascc.passes.rows import NpyRows, PaddedTokens, read_rows

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TENSOR_EXTENSIONS = (".npz", ".pt", ".pth")
TEXT_EXTENSIONS = (".txt", ".md", ".text")
TOKEN_DTYPES = (torch.int64, torch.int32)  # token ids; other integers (uint8 images) still need preprocessing
STREAMED_EXTENSIONS = (".npy",)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224


@dataclass
class CalibrationData:
    """Inputs x (float32, N×…; token ids, int64 N×T, with their padding mask as ``PaddedTokens`` where it pads;
    or ``NpyRows``, read batch by batch) and, when known, integer labels y (int64, N)."""

    x: torch.Tensor | NpyRows | PaddedTokens
    y: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def _subset(n: int, samples: int | None, seed: int) -> torch.Tensor:
    """Indices of a seeded random subset of size `samples`, in ascending order (all if None)."""
    if samples is None or samples >= n:
        return torch.arange(n)
    if samples < 1:
        raise PleasccError(f"--samples is {samples}: pass a positive number of calibration samples")
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:samples].sort().values


# ---------------------------------------------------------------------------- image folders


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def _list_images(root: Path) -> tuple[list[Path], list[int] | None]:
    """Images in class subfolders (sorted names → labels 0..K-1), or unlabeled images at top level."""
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for label, d in enumerate(classes):
        found = sorted(p for p in d.rglob("*") if _is_image(p))
        files += found
        labels += [label] * len(found)
    if files:
        return files, labels
    flat = sorted(p for p in root.iterdir() if _is_image(p))
    if flat:
        return flat, None
    raise PleasccError(
        f"folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...): "
        f"put images in one subfolder per class, e.g. {root}/cat/1.jpg"
    )


def _image_config(model: nn.Module | None) -> dict:
    """timm's preprocessing for the model when it carries a pretrained config, else ImageNet's."""
    if model is not None and (getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)):
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=model)
        return {"image_size": cfg["input_size"][-1], "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
    return {"image_size": DEFAULT_IMAGE_SIZE, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def _read_image(path: Path, transform: Callable) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return transform(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise PleasccError(f"cannot read image {path} ({first_line(exc)}): remove or replace the file") from exc


def _load_image_folder(
    root: Path,
    samples: int | None,
    image_size: int | None,
    mean: tuple | None,
    std: tuple | None,
    model: nn.Module | None,
    seed: int,
) -> CalibrationData:
    from torchvision import transforms

    files, labels = _list_images(root)
    cfg = _image_config(model)
    size = image_size or cfg["image_size"]
    transform = transforms.Compose([
        transforms.Resize(size),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean or cfg["mean"], std or cfg["std"]),
    ])
    idx = _subset(len(files), samples, seed).tolist()
    x = torch.stack([_read_image(files[i], transform) for i in idx])
    y = None if labels is None else torch.tensor([labels[i] for i in idx], dtype=torch.int64)
    return CalibrationData(x, y)


# ---------------------------------------------------------------------------- tensor files


def _read_arrays(path: Path) -> dict:
    """The named arrays in a .npz or .pt file, without unpickling code."""
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: torch.from_numpy(npz[k]) for k in npz.files}
        check_checksums(str(path))
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except PleasccError:
        raise
    except Exception as exc:
        raise PleasccError(
            f"cannot read {path} ({first_line(exc)}): save plain arrays with "
            f"numpy.savez(path, x=..., y=...) or torch.save({{'x': x, 'y': y}}, path)"
        ) from exc
    if isinstance(obj, torch.Tensor):
        obj = {"x": obj}
    if not isinstance(obj, dict):
        raise PleasccError(
            f"{path} holds a {type(obj).__name__}: save a dict with torch.save({{'x': x, 'y': y}}, path)"
        )
    check_layouts(str(path), obj)
    return obj


def _check_x(path: Path, x: object, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise PleasccError(f"'{name}' in {path} is a {type(x).__name__}: store {name} as a tensor or array")
    if x.dtype in TOKEN_DTYPES:
        if x.ndim != 2 or x.shape[0] == 0 or (x < 0).any():
            raise PleasccError(f"'{name}' in {path} has shape {_shape(x)}{' and negative ids' if x.ndim == 2 else ''}"
                               ": store token ids as (N, tokens) integers ≥ 0")
        return x.long()
    if not x.is_floating_point():
        raise PleasccError(
            f"'{name}' in {path} has dtype {x.dtype}: store already-preprocessed float inputs (convert and normalize "
            "first), or token ids as int64"
        )
    if x.ndim < 2 or x.shape[0] == 0:
        raise PleasccError(f"'{name}' in {path} has shape {_shape(x)}: expected N ≥ 1 samples stacked as (N, ...)")
    if not torch.isfinite(x).all():
        raise PleasccError(f"'{name}' in {path} contains NaN or Inf: clean the inputs before saving")
    return x.float()


def token_inputs(ids: torch.Tensor, mask: object, where: str) -> torch.Tensor | PaddedTokens:
    """Token ids with their padding mask (``where`` names them in messages), as the passes read them: the
    ids alone where every token is real, else ``PaddedTokens``, whose padded tokens no statistic reads."""
    if mask is None:
        return ids
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        shape = _shape(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise PleasccError(f"'attention_mask' in {where} has shape {shape}, input_ids {_shape(ids)}: store one 0/1 "
                           "per token")
    if mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise PleasccError(f"'attention_mask' in {where} holds values other than 0 and 1: store 1 for a real "
                           "token, 0 for padding")
    if not bool(mask.any(dim=1).all()):
        raise PleasccError(f"'attention_mask' in {where} has samples with no real token: drop them")
    return ids if bool(mask.all()) else PaddedTokens(ids, mask.long())


def _check_y(path: Path, y: object, n: int) -> torch.Tensor | None:
    if y is None:
        return None
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        kind = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
        raise PleasccError(f"'y' in {path} has type {kind}: store y as integer class labels")
    if y.ndim != 1 or y.shape[0] != n:
        raise PleasccError(f"'y' in {path} has shape {_shape(y)} but x has {n} samples: store one label per sample")
    return y.long()


def _load_tensor_file(path: Path, samples: int | None, seed: int) -> CalibrationData:
    arrays = _read_arrays(path)
    name = "input_ids" if "input_ids" in arrays and "x" not in arrays else "x"
    if name not in arrays:
        keys = ", ".join(map(str, arrays)) or "none"
        raise PleasccError(f"{path} has no 'x' or 'input_ids' (keys: {keys}): save the inputs under the name x, "
                           "or token ids under input_ids")
    x = _check_x(path, arrays[name], name)
    if name == "input_ids":
        x = token_inputs(x, arrays.get("attention_mask"), str(path))
    y = _check_y(path, arrays.get("y", arrays.get("labels")), x.shape[0])
    idx = _subset(x.shape[0], samples, seed)
    return CalibrationData(x[idx], None if y is None else y[idx])


def _load_text(path: Path, samples: int | None, seed: int, tokenizer: str | None, seq_len: int) -> CalibrationData:
    from pleascc.hf_io import text_tokens

    x = text_tokens(path, tokenizer, seq_len)
    return CalibrationData(x[_subset(len(x), samples, seed)].contiguous())


# ---------------------------------------------------------------------------- public API


def load_data(
    path: str,
    *,
    samples: int | None = None,
    image_size: int | None = None,
    mean: tuple | None = None,
    std: tuple | None = None,
    model: nn.Module | None = None,
    seed: int = 0,
    tokenizer: str | None = None,
    seq_len: int = 128,
) -> CalibrationData:
    """Load calibration inputs from an image folder, a .npz/.pt file (float x, or token ids), a .npy file (read
    batch by batch), or a text file cut into ``seq_len`` tokens by a local ``tokenizer`` directory.

    ``samples`` takes a seeded subset.
    """
    p = Path(path)
    if not p.exists():
        raise PleasccError(f"calibration data {path} not found: check the path")
    if p.is_dir():
        return _load_image_folder(p, samples, image_size, mean, std, model, seed)
    if p.suffix.lower() in TENSOR_EXTENSIONS:
        return _load_tensor_file(p, samples, seed)
    if p.suffix.lower() in TEXT_EXTENSIONS:
        return _load_text(p, samples, seed, tokenizer, seq_len)
    if p.suffix.lower() in STREAMED_EXTENSIONS:
        x = NpyRows(p)
        return CalibrationData(x[_subset(len(x), samples, seed).tolist()] if samples else x)
    raise PleasccError(
        f"calibration data {path} has unsupported type '{p.suffix or os.path.basename(path)}': "
        f"pass a folder of images in class subfolders, a .npz/.pt file with x (and y) or input_ids, a .npy of x "
        f"alone, or a .txt with --tokenizer"
    )


def check_data_fits(model: nn.Module, data: CalibrationData) -> None:
    """Fail fast, before the expensive passes, when the inputs do not match the model's input layout."""
    if isinstance(data.x, PaddedTokens) and "attention_mask" not in inspect.signature(model.forward).parameters:
        raise PleasccError("the calibration tokens are padded (attention_mask has zeros) but the model's forward "
                           "takes no attention_mask: calibrate on unpadded sequences")
    try:
        with torch.no_grad():
            x = read_rows(data.x[:2])
            model(x.ids, attention_mask=x.mask) if isinstance(x, PaddedTokens) else model(x)
    except Exception as exc:
        raise PleasccError(
            f"calibration data of shape {_shape(data.x)} does not fit the model: {first_line(exc)}; "
            f"check --image-size or the data's layout"
        ) from exc
