"""How much of the models' own input space PLeaS-free's calibration data reaches, layer by layer.

Least squares fits each merged layer on the Gram of its inputs over the
calibration data.  Directions that data never excites are left to the warm
start (the ridge): the fit says nothing about them.  For each layer of model A
this measures the directions holding 99% of the calibration inputs' energy
(their second moment, as the Gram is) and the share of the test-domain inputs'
energy inside those directions: 1.0 means the calibration data constrains every
direction CIFAR images use, lower means a fit that is blind to part of them.
A second, disjoint set of CIFAR-10 training images is the control.  Rows as
least squares reads them: a convolution's im2col patches, a linear layer's
tokens.  Needs ../shared/data.  Writes examples/results/calibration_coverage.{json,md,png}.

    python examples/calibration_coverage.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cifar_merge import CHECKPOINTS, RESULTS, load_pair  # noqa: E402
from cifar10 import load_cifar10, to_tensor  # noqa: E402
from mnist import load_mnist_rgb  # noqa: E402
from provenance import code_version  # noqa: E402

PAIRS = {  # name -> (folder, arch, classes)
    "ResNet-20, setting 1": ("cifar_resnet20", "resnet20", 5),
    "ResNet-20, setting 2": ("cifar_resnet20_images", "resnet20", 10),
    "ViT, setting 1": ("cifar_vit", "vit", 5),
    "ViT, setting 2": ("cifar_vit_images", "vit", 10),
}
SAMPLES = 1024
ENERGY = 0.99
MAX_ROWS = 65536  # rows per batch and layer kept for the Gram (convolutions' patches are sampled)


def layer_grams(model: nn.Module, x: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    """Each convolution's and linear layer's input Gram (rowsᵀ·rows / rows, float64) over ``x``."""
    grams: dict[str, list] = {}

    def hook(name: str, module: nn.Module):
        def record(_, inputs):
            rows = as_rows(module, inputs[0].detach())
            if len(rows) > MAX_ROWS:
                rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:MAX_ROWS]]
            rows = rows.double()
            total = grams.setdefault(name, [0.0, 0])
            total[0] = total[0] + rows.T @ rows
            total[1] += len(rows)
        return record

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for chunk in x.split(batch):
            model(chunk)
    for h in handles:
        h.remove()
    return {name: gram / count for name, (gram, count) in grams.items()}


def as_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as least squares reads it: (rows, features)."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def coverage(calibration: torch.Tensor, domain: torch.Tensor) -> tuple[int, float]:
    """The directions holding ``ENERGY`` of the calibration Gram's trace, and the share of the domain Gram's
    trace inside them."""
    values, vectors = torch.linalg.eigh(calibration)
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    rank = int((values.cumsum(0) / values.sum() < ENERGY).sum()) + 1
    basis = vectors[:, :rank]
    return rank, float(torch.trace(basis.T @ domain @ basis) / torch.trace(domain))


def pick(images: np.ndarray, start: int) -> torch.Tensor:
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return to_tensor(images[order[start:start + SAMPLES].numpy()])


def main() -> None:
    torch.set_num_threads(2)
    cifar = load_cifar10()[0]
    data = {"CIFAR-10 (control)": pick(cifar, SAMPLES), "MNIST (PLeaS-free)": pick(load_mnist_rgb(), 0)}
    domain_images = pick(cifar, 0)
    rows = []
    for pair, (folder, arch, classes) in PAIRS.items():
        model = load_pair(CHECKPOINTS / folder, arch, 1, classes)[0]
        domain = layer_grams(model, domain_images)
        for source, x in data.items():
            for layer, gram in layer_grams(model, x).items():
                rank, share = coverage(gram, domain[layer])
                rows.append({"pair": pair, "calibration": source, "layer": layer, "features": gram.shape[0],
                             "rank_99": rank, "coverage": share})
    by_run: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        by_run.setdefault((r["pair"], r["calibration"]), []).append(r["coverage"])
    summary = [{"pair": pair, "calibration": source, "mean_coverage": float(np.mean(shares)),
                "min_coverage": float(min(shares))} for (pair, source), shares in by_run.items()]
    meta = {"samples": SAMPLES, "energy": ENERGY, "code": code_version(), "command": " ".join(sys.argv)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "calibration_coverage.json").write_text(json.dumps({"meta": meta, "summary": summary,
                                                                   "rows": rows}, indent=1))
    lines = ["| pair | calibration | mean coverage | lowest layer |", "|---|---|---|---|"]
    lines += [f"| {s['pair']} | {s['calibration']} | {s['mean_coverage']:.3f} | {s['min_coverage']:.3f} |"
              for s in summary]
    (RESULTS / "calibration_coverage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, RESULTS / "calibration_coverage.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(PAIRS)
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4), sharey=True)
    for ax, pair in zip(axes, pairs):
        for source in dict.fromkeys(r["calibration"] for r in rows):
            values = [r["coverage"] for r in rows if r["pair"] == pair and r["calibration"] == source]
            ax.plot(range(len(values)), values, marker="o", markersize=3, label=source)
        ax.set_title(pair)
        ax.set_xlabel("layer (input to output)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"CIFAR-10 energy in the calibration's {ENERGY:.0%} directions")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
