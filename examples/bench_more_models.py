"""More than two models: CIFAR-10 split into tasks, one model each, merged several at a time.

Five ResNet-20s (``examples/train_cifar_pair.py --setting tasks5``; committed in
``examples/checkpoints/cifar_resnet20_tasks5``), model k trained from seed k on
classes 2k and 2k + 1 with a 2-way head; or three ViTs (``--setting labels3``:
classes 0-2, 3-5, 6-9; ``examples/checkpoints/cifar_vit_labels3``).  The first N
are merged with separate heads, calibrated on 2048 unlabeled CIFAR-10 training
images of all classes, and scored through ONNX Runtime on the test images of
their tasks' classes: the mean of the tasks' accuracies (each head on its
classes) and the joint accuracy (the argmax over all heads), against the N
models side by side (the ensemble).  Budgets 0.5, 1.0, 2.0 and N
(``pleascc/align.py`` for N > 2).  Needs ../shared/data.  Writes
examples/results/NAME.{json,md,png}.

    python examples/bench_more_models.py
    python examples/bench_more_models.py --models examples/checkpoints/cifar_vit_labels3 --counts 3 \
        --name more_models_vit
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cifar_merge import CHECKPOINTS, RESULTS, calibration  # noqa: E402
from cifar10 import load_cifar10, to_tensor  # noqa: E402
from provenance import code_version, cpu_name  # noqa: E402
from train_cifar_pair import build  # noqa: E402

import pleascc  # noqa: E402
from pleascc.evaluate import accuracies  # noqa: E402
from pleascc.export import onnx_predict  # noqa: E402

MODELS = CHECKPOINTS / "cifar_resnet20_tasks5"
ARCH_NAMES = {"resnet20": "ResNet-20s", "vit": "ViTs"}
VARIANTS = {"pleas": {"method": "pleas"},  # the baselines as Git Re-Basin and ZipIt! evaluate them: BN recomputed
            "permute (reset BN)": {"method": "permute", "reset_bn": True},
            "zipit (reset BN)": {"method": "zipit", "reset_bn": True},
            "pleas, last model as reference": {"method": "pleas"}}  # the models in reverse order: A is the last
MORE_ONLY = {"pleas, last model as reference"}  # how much the choice of reference moves an N-way merge, at 1.0


def load_models(directory: Path, count: int) -> tuple[list[torch.nn.Module], list[range]]:
    """The first ``count`` models of ``directory`` (``train_cifar_pair.py``'s), and each one's classes."""
    train = json.loads((directory / "train.json").read_text())
    models, classes = [], []
    for k in range(count):
        own = train[f"model_{k}"]["classes"]
        model = build(train["arch"], train["width"], len(own))[0]
        model.load_state_dict(torch.load(directory / f"model_{k}.pt", weights_only=True, map_location="cpu"))
        models.append(model.eval())
        classes.append(range(own[0], own[-1] + 1))
    return models, classes


def test_split(classes: list[range]) -> tuple[torch.Tensor, np.ndarray]:
    """The test images of the tasks' classes, and their labels."""
    _, _, x_test, y_test = load_cifar10()
    keep = np.isin(y_test, [c for task in classes for c in task])
    return to_tensor(x_test[keep]), y_test[keep]


def budgets(count: int, variant: str) -> list[float]:
    """Half a model, one, two, and N side by side (which equals the ensemble: ``tests/test_more_models.py``); the
    choice of reference at 1.0 only."""
    return [1.0] if variant in MORE_ONLY else sorted({0.5, 1.0, 2.0, float(count)})


def run(directory: Path, counts: list[int], samples: int) -> list[dict]:
    calib = calibration({}, samples)
    rows = []
    for count in counts:
        models, classes = load_models(directory, count)
        x, y = test_split(classes)
        with torch.no_grad():
            logits = [torch.cat([m(b) for b in x.split(500)]).numpy() for m in models]
        rows.append({"models": count, "method": "ensemble", "budget": float(count), "relative_flops": float(count),
                     **accuracies(logits, y, classes)})
        print(_line(rows[-1]), flush=True)
        for variant, options in VARIANTS.items():
            for budget in budgets(count, variant):
                if variant in MORE_ONLY and count == 2:
                    continue
                order = models[::-1] if variant in MORE_ONLY else models
                start = time.perf_counter()
                result = pleascc.merge(order, calib, budget=budget, labels="separate", progress=False, **options)
                seconds = time.perf_counter() - start
                with tempfile.TemporaryDirectory() as tmp:
                    pleascc.export_onnx(result.model, x[:8], f"{tmp}/merged.onnx")
                    merged = onnx_predict(f"{tmp}/merged.onnx", x)
                merged = merged[::-1] if variant in MORE_ONLY else merged  # heads back in task order
                rows.append({"models": count, "method": variant, "budget": budget,
                             "relative_flops": result.report["relative_flops"], "merge_seconds": round(seconds, 1),
                             **accuracies(merged, y, classes)})
                print(_line(rows[-1]), flush=True)
    return rows


def _line(row: dict) -> str:
    return (f"{row['models']} models, {row['method']:<18} {row['budget']:>4}: per task {row['per_head_mean']:.4f}  "
            f"joint {row['joint']:.4f}")


def markdown(rows: list[dict]) -> str:
    lines = ["| models | method | budget | FLOPs ratio | per-task mean | joint | merge s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['models']} | {r['method']} | {r['budget']:g} | {r['relative_flops']:.3f} "
                     f"| {r['per_head_mean']:.4f} | {r['joint']:.4f} | {r.get('merge_seconds', '–')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, arch: str, command: str) -> None:
    counts = sorted({r["models"] for r in rows})
    fig, axes = plt.subplots(1, len(counts), figsize=(4.5 * len(counts), 4), sharey=True)
    for ax, count in zip(np.atleast_1d(axes), counts):
        mine = [r for r in rows if r["models"] == count]
        ensemble = next(r for r in mine if r["method"] == "ensemble")
        ax.axhline(ensemble["per_head_mean"], color="gray", linestyle="--", label="ensemble")
        for method in VARIANTS:
            points = [(r["relative_flops"], r["per_head_mean"]) for r in mine if r["method"] == method]
            if points:
                ax.plot(*zip(*sorted(points)), marker="o", label=method)
        ax.set(title=f"{count} {ARCH_NAMES[arch]}, one task each", xlabel="FLOPs ÷ one model's",
               ylabel="mean per-task accuracy")
    for ax in np.atleast_1d(axes):
        ax.legend(fontsize=7)
    fig.suptitle(f"CIFAR-10 tasks merged: python {command}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=MODELS, help="train_cifar_pair.py's output: model_0.pt, …")
    parser.add_argument("--name", default="more_models", help="results' file name in examples/results")
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 3, 5], help="how many of the models to merge")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.models, args.counts, args.samples)
    command = " ".join(["examples/bench_more_models.py", *sys.argv[1:]])
    train = json.loads((args.models / "train.json").read_text())
    meta = {"command": command, "code": code_version(), "cpu": cpu_name(), "samples": args.samples, "train": train}
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(rows))
    plot(rows, RESULTS / f"{args.name}.png", train["arch"], command)
    print(markdown(rows))

if __name__ == "__main__":
    main()
