"""One trained model made smaller, without fine-tuning: PLeaS merging its own most similar units and refitting by
least squares, against L1-norm channel pruning (Li et al., 2017) at the same FLOPs.

Model A of the committed CIFAR-10 ResNet-20 pair (classes 0-4), calibrated on
2048 unlabeled training images, scored on its five classes' test images
through ONNX Runtime.  Pruning is shown with its BatchNorm statistics
recomputed on the same images (as pleascc runs every method that refits no
layer) and as Li et al. evaluate it without retraining (statistics kept);
its widths by the greedy search (the units of least L1 norm across all
groups, per FLOP saved: the same FLOPs as PLeaS) and uniform (one share of
every group, as Li et al. prune each layer).
Needs ../shared/data.  Writes examples/results/NAME.{json,md,png}.

    python examples/bench_compress.py          # budgets 0.5 and 0.75
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cifar_merge import CHECKPOINTS, RESULTS, calibration, load_pair  # noqa: E402
from cifar10 import load_cifar10, to_tensor  # noqa: E402
from provenance import code_version, cpu_name, peak_rss_mb  # noqa: E402

import pleascc  # noqa: E402
from pleascc.export import onnx_predict  # noqa: E402

VARIANTS = {"pleas": {"method": "pleas"},  # the greedy width search: within a unit of the budget, as pruning's
            "prune (L1, reset BN)": {"method": "prune", "reset_bn": True},
            "prune (L1, uniform, reset BN)": {"method": "prune", "width_search": "uniform", "reset_bn": True},
            "prune (L1)": {"method": "prune", "reset_bn": False}}


def accuracy(path_or_model, x: torch.Tensor, y: torch.Tensor) -> float:
    logits = onnx_predict(path_or_model, x)[0] if isinstance(path_or_model, str) else \
        torch.cat([path_or_model(b) for b in x.split(500)]).detach().numpy()
    return float((logits.argmax(1) == y.numpy()).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="compress_resnet20")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_pair(CHECKPOINTS / "cifar_resnet20", "resnet20", 1, 5)[0]
    _, _, x_test, y_test = load_cifar10()
    own = torch.as_tensor(y_test) < 5  # model A's task: classes 0-4
    x_eval, y_eval = to_tensor(x_test)[own], torch.as_tensor(y_test)[own]
    calib = calibration({}, args.samples)
    with torch.no_grad():
        rows = [{"method": "model A", "budget": 1.0, "relative_flops": 1.0, "accuracy": accuracy(model, x_eval, y_eval)}]
    for name, options in VARIANTS.items():
        for budget in args.budgets:
            start = time.perf_counter()
            result = pleascc.merge(model, model, calib, budget=budget, progress=False, **options)
            seconds = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as tmp:
                pleascc.export_onnx(result.model, x_eval[:8], f"{tmp}/small.onnx")
                score = accuracy(f"{tmp}/small.onnx", x_eval, y_eval)
            rows.append({"method": name, "budget": budget, "relative_flops": result.report["relative_flops"],
                         "params": result.report["params_merged"], "accuracy": score, "merge_seconds": seconds})
            print(f"{name:22s} budget {budget}: accuracy {score:.4f} at {rows[-1]['relative_flops']:.3f} of the "
                  f"FLOPs ({seconds:.1f} s)", flush=True)
    meta = {"command": "python examples/bench_compress.py " + " ".join(sys.argv[1:]), "code": code_version(),
            "cpu": cpu_name(), "samples": args.samples, "peak_rss_mb": peak_rss_mb(),
            "params_a": sum(p.numel() for p in model.parameters())}
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    table = ["| method | budget | FLOPs ratio | parameters | accuracy on A's task | merge s |", "|---|---|---|---|---|---|"]
    table += [f"| {r['method']} | {r['budget']} | {r['relative_flops']:.3f} | {r.get('params', meta['params_a']):,} "
              f"| {r['accuracy']:.4f} | {r.get('merge_seconds', 0):.1f} |" for r in rows]
    (RESULTS / f"{args.name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in VARIANTS:
        points = sorted((r["relative_flops"], r["accuracy"]) for r in rows if r["method"] == name)
        ax.plot(*zip(*points), marker="o", label=name)
    ax.axhline(rows[0]["accuracy"], color="gray", linestyle="--", label="model A (1.0)")
    ax.set(xlabel="FLOPs ÷ model A's", ylabel="accuracy on A's five classes", ylim=(0, 1),
           title="ResNet-20 compressed without fine-tuning\npython examples/bench_compress.py")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png", dpi=120)


if __name__ == "__main__":
    main()
