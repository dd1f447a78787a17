"""Train models on disjoint parts of CIFAR-10 from different seeds: a pair, three, or five.

Two settings (the PLeaS paper's): ``labels`` (default) gives A classes 0-4 and B
classes 5-9, each with a 5-way head; ``images`` gives each model half of the
training images, all 10 classes, one shared label space.  ``tasks5`` trains
five models, model k on classes 2k and 2k + 1 with a 2-way head, and
``labels3`` three, on classes 0-2, 3-5 and 6-9 (merges of more than two
models).
Usage: python examples/train_cifar_pair.py --out runs/cifar_resnet20 [--arch resnet20|vit] [--width 1]
       [--setting labels|images|labels3|tasks5] [--epochs E] [--seeds 0 1 ...] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10 import load_cifar10, select_classes, to_tensor  # noqa: E402
from resnet20 import resnet20  # noqa: E402
from vit_cifar import vit_cifar  # noqa: E402
from provenance import cpu_name  # noqa: E402

TASKS = {"labels": {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7, 8, 9]},  # setting -> model's name -> its classes
         "images": {"a": list(range(10)), "b": list(range(10))},
         "labels3": {"0": [0, 1, 2], "1": [3, 4, 5], "2": [6, 7, 8, 9]},
         "tasks5": {str(k): [2 * k, 2 * k + 1] for k in range(5)}}
BATCH = 128
EPOCHS = {"resnet20": 8, "vit": 15}  # ~80 s (ResNet-20) / ~100 s (ViT) per epoch per model on 2 CPU cores


def build(arch: str, width: int, num_classes: int) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    """The model, its optimizer, and the peak learning rate of its one-cycle schedule."""
    if arch == "vit":
        model = vit_cifar(num_classes=num_classes, dim=128 * width, depth=4, heads=4)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05), 1e-3
    model = resnet20(num_classes=num_classes, width=width, shortcut="A")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return model, opt, 0.1


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and random horizontal flip, per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen).tolist()
    dx = torch.randint(0, 9, (n,), generator=gen).tolist()
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


def train_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator, desc: str,
                bf16: bool = False) -> float:
    """One shuffled pass over (x, y); returns the mean training loss.  ``bf16``: forward under bfloat16
    autocast (weights, gradients and optimizer stay float32)."""
    model.train()
    order = torch.randperm(len(x), generator=gen)
    total = 0.0
    steps = range(0, len(x) - BATCH + 1, BATCH)  # drop the ragged last batch: BN needs real batches
    for i in tqdm(steps, desc=desc, unit="batch", mininterval=10):
        idx = order[i : i + BATCH]
        xb = augment(x[idx], gen).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item()
    return total / len(steps)


def task_data(name: str, setting: str, data: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Model ``name``'s training and test split: its classes (``labels``, ``labels3``, ``tasks5``) or its half of
    the images."""
    x_tr, y_tr, x_te, y_te = data
    if setting != "images":
        classes = TASKS[setting][name]
        return (*select_classes(x_tr, y_tr, classes), *select_classes(x_te, y_te, classes))
    half = np.random.default_rng(0).permutation(len(x_tr)).reshape(2, -1)["ab".index(name)]
    return x_tr[half], y_tr[half], x_te, y_te


def train_one(name: str, seed: int, arch: str, width: int, epochs: int, setting: str,
              data: tuple[np.ndarray, ...], bf16: bool = False) -> tuple[nn.Module, dict]:
    """Train one model on its part of the data and measure its test accuracy there."""
    xa, ya, xt, yt = task_data(name, setting, data)
    xa, ya, xt, yt = to_tensor(xa), torch.from_numpy(ya), to_tensor(xt), torch.from_numpy(yt)
    classes = TASKS[setting][name]

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, opt, lr = build(arch, width, len(classes))
    model = model.to(memory_format=torch.channels_last)  # ~15% faster convolutions on CPU
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * (len(xa) // BATCH), pct_start=0.15)

    start = time.time()
    for epoch in range(epochs):
        loss = train_epoch(model, xa, ya, opt, sched, gen, f"model_{name} epoch {epoch + 1}/{epochs}", bf16)
        print(f"model_{name} epoch {epoch + 1}/{epochs} loss {loss:.4f} ({time.time() - start:.0f} s)", flush=True)
    seconds = time.time() - start
    acc = accuracy(model, xt, yt)
    print(f"model_{name}: test accuracy {acc:.4f} on classes {classes} in {seconds:.0f} s", flush=True)
    return model, {"seed": seed, "classes": classes, "train_images": len(xa), "test_accuracy": acc,
                   "seconds": round(seconds, 1)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True,
                   help="output directory for model_a.pt, model_b.pt (labels3, tasks5: model_0.pt, model_1.pt, …), "
                   "train.json")
    p.add_argument("--arch", choices=sorted(EPOCHS), default="resnet20")
    p.add_argument("--width", type=int, default=1, help="channel multiplier (ResNet-20: of 16/32/64; ViT: of 128)")
    p.add_argument("--setting", choices=tuple(TASKS), default="labels",
                   help="disjoint label sets (A: classes 0-4, B: 5-9), disjoint halves of the images (10 classes), "
                        "or five models of two classes each (model k: classes 2k, 2k + 1)")
    p.add_argument("--epochs", type=int, help=f"epochs per model (default {EPOCHS})")
    p.add_argument("--seeds", type=int, nargs="+", help="one per model (default 0, 1, ...)")
    p.add_argument("--bf16", action="store_true",
                   help="train under bfloat16 autocast (weights stay float32): several times faster on a CPU "
                        "with AMX")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_cifar10()
    epochs = args.epochs or EPOCHS[args.arch]
    report: dict = {"arch": args.arch, "width": args.width, "setting": args.setting, "epochs": epochs, "batch": BATCH,
                    "autocast": "bfloat16" if args.bf16 else None, "cpu": cpu_name()}
    names = list(TASKS[args.setting])
    seeds = args.seeds or list(range(len(names)))
    if len(seeds) != len(names):
        raise SystemExit(f"--seeds: {len(names)} models in --setting {args.setting}, {len(seeds)} seeds given")
    for name, seed in zip(names, seeds):
        model, info = train_one(name, seed, args.arch, args.width, epochs, args.setting, data, args.bf16)
        torch.save(model.to(memory_format=torch.contiguous_format).state_dict(), args.out / f"model_{name}.pt")
        report[f"model_{name}"] = info
    (args.out / "train.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
