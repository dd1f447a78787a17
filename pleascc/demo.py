"""`pleascc demo`: a complete merge on data scikit-learn ships, in about a minute.

Two small residual CNNs, trained from different seeds on digits 0–4 and 5–9
of scikit-learn's bundled 8×8 digits, are merged at several budgets with
each method, exported to ONNX, and evaluated with ONNX Runtime.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TASKS = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
BUDGETS = (1.0, 1.5, 2.0)
METHODS = ("average", "permute", "pleas")


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


def digits_cnn(num_classes: int = 5, width: int = 16) -> nn.Module:
    """A small residual CNN for 1×8×8 digits (the demo's architecture; usable with --arch)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        _Block(width),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        _Block(2 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as standardized 1×8×8 tensors, split 1297 train / 500 test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:500], order[500:]
    return x[train], y[train], x[test], y[test]


def train_task(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...], seed: int, epochs: int = 40) -> nn.Module:
    torch.manual_seed(seed)
    keep = torch.isin(y, torch.tensor(classes))
    x, y = x[keep], y[keep] - classes[0]
    model = digits_cnn(len(classes))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def task_accuracies(logits: list[np.ndarray], y: torch.Tensor) -> dict[str, float]:
    """Each head on its own classes, their mean, and joint 10-way accuracy over both heads."""
    y = y.numpy()
    out = {}
    for k, (classes, z) in enumerate(zip(TASKS, logits)):
        mask = np.isin(y, classes)
        out[f"task_{'AB'[k]}"] = float((z[mask].argmax(1) + classes[0] == y[mask]).mean())
    out["per_task_mean"] = (out["task_A"] + out["task_B"]) / 2
    joint = np.concatenate(logits, axis=1)
    out["joint"] = float((joint.argmax(1) == y).mean())
    return out


def run_demo(out: str = "pleascc-demo") -> dict:
    import pleascc
    from pleascc.export import onnx_predict

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    os.makedirs(out, exist_ok=True)
    x_train, y_train, x_test, y_test = load_digits_split()
    print("training two CNNs: A on digits 0-4 (seed 0), B on digits 5-9 (seed 1)")
    models = [train_task(x_train, y_train, classes, seed) for seed, classes in enumerate(TASKS)]
    for name, model in zip("ab", models):
        torch.save(model.state_dict(), os.path.join(out, f"model_{name}.pt"))
    np.savez(os.path.join(out, "calibration.npz"), x=x_train.numpy(), y=y_train.numpy())
    with torch.no_grad():
        originals = task_accuracies([m(x_test).numpy() for m in models], y_test)
    rows = [("originals (2 models)", "-", 2.0, originals)]
    for method in METHODS:
        for budget in BUDGETS:
            result = pleascc.merge(*models, x_train, budget=budget, labels="separate", method=method, progress=False)
            path = os.path.join(out, f"merged_{method}_{budget}.onnx")
            pleascc.export_onnx(result.model, x_test[:8], path)
            acc = task_accuracies(onnx_predict(path, x_test), y_test)
            rows.append((method, budget, result.report["relative_flops"], acc))
            print(f"  merged with {method:8s} at budget {budget}: per-task accuracy {acc['per_task_mean']:.3f}")
    print(_table(rows))
    results = [{"method": m, "budget": b, "relative_flops": f, **acc} for m, b, f, acc in rows]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\ncheckpoints, calibration data, ONNX files and results.json are in {out}/; merge them yourself with\n"
          f"  pleascc merge {out}/model_a.pt {out}/model_b.pt --arch pleascc.demo:digits_cnn "
          f"--data {out}/calibration.npz --labels separate --budget 1.25 -o {out}/merged.onnx")
    return {"results": results}


def _table(rows) -> str:
    head = f"\n{'method':22s} {'budget':>6} {'FLOPs':>6} {'task A':>7} {'task B':>7} {'mean':>7} {'joint':>7}"
    lines = [head, "-" * len(head)]
    for method, budget, flops, acc in rows:
        lines.append(f"{method:22s} {budget!s:>6} {flops:6.2f} {acc['task_A']:7.3f} {acc['task_B']:7.3f} "
                     f"{acc['per_task_mean']:7.3f} {acc['joint']:7.3f}")
    return "\n".join(lines)
