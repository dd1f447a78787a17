"""Merge two CIFAR-10 models (A: classes 0–4, B: 5–9) at several budgets; evaluate with ONNX Runtime.

Needs the checkpoints of examples/train_cifar_pair.py and ../shared/data.  Writes
examples/results/NAME.{json,png,md}.

    python examples/train_cifar_pair.py --out runs/cifar_resnet20
    python examples/bench_cifar_merge.py --models runs/cifar_resnet20
    python examples/train_cifar_pair.py --arch vit --out runs/cifar_vit
    python examples/bench_cifar_merge.py --arch vit --models runs/cifar_vit --name cifar_vit

``--only pleas`` recomputes those variants' rows and keeps the others from the last results.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10 import load_cifar10, to_tensor  # noqa: E402
from train_cifar_pair import build  # noqa: E402

import pleascc  # noqa: E402
from pleascc.demo import task_accuracies  # noqa: E402
from pleascc.export import onnx_predict  # noqa: E402

BUDGETS = (1.0, 1.25, 1.5, 1.75, 2.0)
VARIANTS = {  # row label -> pleascc.merge options
    "average": {"method": "average"},
    "permute": {"method": "permute"},
    "pleas one-pass": {"method": "pleas", "least_squares": "one-pass"},
    "pleas": {"method": "pleas", "least_squares": "sequential"},
}
RESULTS = Path(__file__).resolve().parent / "results"


def load_pair(folder: Path, arch: str, width: int) -> list[torch.nn.Module]:
    models = []
    for name in "ab":
        model = build(arch, width, 5)[0]
        model.load_state_dict(torch.load(folder / f"model_{name}.pt", weights_only=True, map_location="cpu"))
        models.append(model.eval())
    return models


def evaluate(model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/merged.onnx"
        check = pleascc.export_onnx(model, x_test[:8], path)
        return {**task_accuracies(onnx_predict(path, x_test), y_test), "onnx_max_abs_diff": check["max_abs_diff"]}


def run(models_dir: Path, samples: int, arch: str, width: int, variants: list[str]) -> list[dict]:
    torch.manual_seed(0)
    x_train, _, x_test, y_test = load_cifar10()
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:samples].numpy()
    calib, x_eval, y_eval = to_tensor(x_train[pick]), to_tensor(x_test), torch.as_tensor(y_test)
    models = load_pair(models_dir, arch, width)
    with torch.no_grad():
        ensemble = task_accuracies([m(x_eval).numpy() for m in models], y_eval)
    rows = [{"method": "ensemble (A and B side by side)", "budget": 2.0, "relative_flops": 2.0, **ensemble}]
    for method in variants:
        options = VARIANTS[method]
        for budget in BUDGETS:
            start = time.perf_counter()
            result = pleascc.merge(*models, calib, budget=budget, labels="separate", progress=False, **options)
            seconds = time.perf_counter() - start
            row = {"method": method, "budget": budget, "relative_flops": result.report["relative_flops"],
                   "params": result.report["params_merged"], "merge_seconds": seconds,
                   "least_squares_passes": result.report["least_squares_passes"],
                   **evaluate(result.model, x_eval, y_eval)}
            rows.append(row)
            print(f"{method:14s} budget {budget:4.2f}: per-task {row['per_task_mean']:.4f} joint {row['joint']:.4f} "
                  f"({seconds:.1f} s)", flush=True)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("per_task_mean", "joint")):
        for method in VARIANTS:
            pts = [(r["relative_flops"], r[metric]) for r in rows if r["method"] == method]
            if not pts:
                continue
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.axhline(rows[0][metric], color="gray", linestyle="--", label="ensemble (2x)")
        ax.set_xlabel("FLOPs of the merged model ÷ one model")
        ax.set_ylabel({"per_task_mean": "mean per-task accuracy", "joint": "joint 10-way accuracy"}[metric])
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(rows: list[dict]) -> str:
    lines = ["| method | budget | FLOPs ratio | task A (0–4) | task B (5–9) | per-task mean | joint 10-way | "
             "merge s (passes) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cost = f"{r['merge_seconds']:.0f} ({r['least_squares_passes']})" if "merge_seconds" in r else "–"
        lines.append(f"| {r['method']} | {r['budget']} | {r['relative_flops']:.3f} | {r['task_A']:.4f} | "
                     f"{r['task_B']:.4f} | {r['per_task_mean']:.4f} | {r['joint']:.4f} | {cost} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=Path("runs/cifar_resnet20"))
    p.add_argument("--samples", type=int, default=2048, help="calibration images from the training split")
    p.add_argument("--arch", choices=("resnet20", "vit"), default="resnet20")
    p.add_argument("--width", type=int, default=1)
    p.add_argument("--name", default="cifar_resnet20")
    p.add_argument("--only", nargs="*", choices=list(VARIANTS),
                   help="recompute these variants and keep the other rows of the existing results")
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = run(args.models, args.samples, args.arch, args.width, args.only or list(VARIANTS))
    out = RESULTS / f"{args.name}.json"
    meta = {"calibration_samples": args.samples, "arch": args.arch, "width": args.width,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "command": " ".join(sys.argv)}
    if args.only:  # the other variants' rows, and the commands that made them, from the last results
        old = json.loads(out.read_text())
        rows = rows[:1] + [r for r in old["rows"][1:] if r["method"] not in args.only] + rows[1:]
        rows.sort(key=lambda r: list(VARIANTS).index(r["method"]) if r["method"] in VARIANTS else -1)
        meta["earlier"] = old["meta"]
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    title = {"resnet20": f"ResNet-20 ×{args.width}", "vit": f"ViT (dim {128 * args.width}, depth 4, 4 heads)"}
    plot(rows, RESULTS / f"{args.name}.png", f"CIFAR-10 {title[args.arch]}: A (0–4) + B (5–9)")
    (RESULTS / f"{args.name}.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    worse = [b for b in BUDGETS[:-1] if not all(
        _get(rows, "pleas", b)["per_task_mean"] > _get(rows, m, b)["per_task_mean"] for m in ("average", "permute"))]
    print("PLeaS beats permute and average at every budget below 2.0" if not worse
          else f"PLeaS does NOT beat both baselines at budgets {worse}")


def _get(rows: list[dict], method: str, budget: float) -> dict:
    return next(r for r in rows if r["method"] == method and r["budget"] == budget)


if __name__ == "__main__":
    main()
