"""Merge two CIFAR-10 models at several budgets with every method; evaluate with ONNX Runtime.

Two settings, as trained by examples/train_cifar_pair.py (read from the models'
train.json): ``labels`` (A: classes 0-4, B: 5-9, separate heads; metrics: mean
per-task accuracy and joint 10-way accuracy) and ``images`` (disjoint halves of
the training images, all 10 classes, one shared head; metric: accuracy).  Each
merge runs in a fresh process, so its peak memory (VmHWM) is its own.  Needs
../shared/data.  Writes examples/results/NAME.{json,png,md}.

    python examples/bench_cifar_merge.py     # the committed pair, examples/checkpoints/cifar_resnet20
    python examples/train_cifar_pair.py --out runs/cifar_resnet20    # or a pair of your own
    python examples/bench_cifar_merge.py --models runs/cifar_resnet20
    python examples/train_cifar_pair.py --arch vit --out runs/cifar_vit
    python examples/bench_cifar_merge.py --arch vit --models runs/cifar_vit --name cifar_vit

``--only pleas zipit`` recomputes those variants' rows (at ``--budgets``) and keeps the others from the last
results; each row names the commit it was computed at (rows from before this was recorded: –).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10 import load_cifar10, to_tensor  # noqa: E402
from mnist import load_mnist_rgb  # noqa: E402
from train_cifar_pair import build  # noqa: E402
from provenance import code_version, cpu_name, peak_rss_mb  # noqa: E402

import pleascc  # noqa: E402
from pleascc.demo import task_accuracies  # noqa: E402
from pleascc.export import onnx_predict  # noqa: E402

BUDGETS = (1.0, 1.25, 1.5, 1.75, 2.0)
VARIANTS = {  # row label -> pleascc.merge options; "samples" and "data" choose the calibration set; the baselines'
    # rows without "(reset BN)" keep the averaged BatchNorm statistics (pleascc resets them by default)
    "average": {"method": "average", "reset_bn": False},
    "permute": {"method": "permute", "reset_bn": False},
    "permute (weight)": {"method": "permute", "matching": "weight", "reset_bn": False},
    "zipit": {"method": "zipit", "reset_bn": False},
    "regmean": {"method": "regmean"},
    "pleas one-pass": {"method": "pleas", "least_squares": "one-pass"},
    "pleas": {"method": "pleas"},
    "pleas uniform": {"method": "pleas", "width_search": "uniform"},
    "pleas stages": {"method": "pleas", "width_search": "stages"},
    "pleas 256": {"method": "pleas", "samples": 256},
    "pleas 1024": {"method": "pleas", "samples": 1024},
    "pleas 2048": {"method": "pleas", "samples": 2048},  # the ×4 tables calibrate on 1024
    "pleas 4096": {"method": "pleas", "samples": 4096},
    "pleas-free": {"method": "pleas", "data": "mnist"},
    "pleas-free stages": {"method": "pleas", "data": "mnist", "width_search": "stages"},
    "pleas-free, all positions": {"method": "pleas", "data": "mnist", "positions": None},
    "pleas, matching on 256": {"method": "pleas", "match_samples": 256},  # least squares on all the samples
    "pleas, matching on 512": {"method": "pleas", "match_samples": 512},
    "pleas one-pass, all positions": {"method": "pleas", "least_squares": "one-pass", "positions": None},
    "pleas one-pass, 64 positions": {"method": "pleas", "least_squares": "one-pass", "positions": 64},
    "pleas one-pass, 16 positions": {"method": "pleas", "least_squares": "one-pass", "positions": 16},
    "pleas sequential, all positions": {"method": "pleas", "positions": None},
    "pleas sequential, 64 positions": {"method": "pleas", "positions": 64},
    "average (reset BN)": {"method": "average", "reset_bn": True},  # as ZipIt! and Git Re-Basin evaluate
    "permute (reset BN)": {"method": "permute", "reset_bn": True},
    "zipit (reset BN)": {"method": "zipit", "reset_bn": True},
    "zipit, all positions": {"method": "zipit", "positions": None, "reset_bn": False},
}
DEFAULT_VARIANTS = ["average", "permute", "pleas one-pass", "pleas"]
RESULTS = Path(__file__).resolve().parent / "results"
CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"  # trained pairs the committed tables come from


def load_pair(folder: Path, arch: str, width: int, classes: int) -> list[torch.nn.Module]:
    models = []
    for name in "ab":
        model = build(arch, width, classes)[0]
        model.load_state_dict(torch.load(folder / f"model_{name}.pt", weights_only=True, map_location="cpu"))
        models.append(model.eval())
    return models


def scores(logits: list[np.ndarray], y: torch.Tensor, setting: str) -> dict:
    """``labels``: each head on its classes, their mean, joint 10-way; ``images``: the shared head's accuracy."""
    if setting == "labels":
        return task_accuracies(logits, y)
    return {"accuracy": float((logits[0].argmax(1) == y.numpy()).mean())}


def calibration(variant: dict, samples: int) -> torch.Tensor:
    """Training images (seeded pick), or MNIST digits as RGB for PLeaS-free."""
    count = variant.get("samples", samples)
    generator = torch.Generator().manual_seed(0)
    images = load_mnist_rgb() if variant.get("data") == "mnist" else load_cifar10()[0]
    return to_tensor(images[torch.randperm(len(images), generator=generator)[:count].numpy()])


def merge_row(job: dict) -> dict:
    """One merge, evaluated through ONNX Runtime; run in a fresh process (its peak RSS is this merge's)."""
    torch.set_num_threads(job["threads"])
    setting, variant = job["setting"], VARIANTS[job["variant"]]
    models = load_pair(Path(job["models"]), job["arch"], job["width"], 5 if setting == "labels" else 10)
    calib = calibration(variant, job["samples"])
    _, _, x_test, y_test = load_cifar10()
    x_eval, y_eval = to_tensor(x_test), torch.as_tensor(y_test)
    options = {k: v for k, v in variant.items() if k not in ("samples", "data")}
    options |= {"cache_gb": job["cache_gb"]} if job["cache_gb"] is not None else {}
    start = time.perf_counter()
    result = pleascc.merge(*models, calib, budget=job["budget"], progress=False,
                           labels="separate" if setting == "labels" else "shared", **options)
    seconds, peak = time.perf_counter() - start, peak_rss_mb()  # the merge's peak, before export and evaluation
    with tempfile.TemporaryDirectory() as tmp:
        check = pleascc.export_onnx(result.model, x_eval[:8], f"{tmp}/merged.onnx")
        logits = onnx_predict(f"{tmp}/merged.onnx", x_eval)
    return {"method": job["variant"], "budget": job["budget"], "relative_flops": result.report["relative_flops"],
            "params": result.report["params_merged"], "samples": len(calib), "merge_seconds": seconds,
            "peak_rss_mb": peak,
            "least_squares_passes": result.report["least_squares_passes"],
            **{key: result.report[key] for key in ("least_squares_memory_peak_mb", "least_squares_disk_peak_mb",
                                                   "least_squares_spilled_mb")},
            **scores(logits, y_eval, setting), "onnx_max_abs_diff": check["max_abs_diff"], "code": job["code"],
            "cpu": job["cpu"]}


def run(args: argparse.Namespace, setting: str, variants: list[str]) -> list[dict]:
    _, _, x_test, y_test = load_cifar10()
    models = load_pair(args.models, args.arch, args.width, 5 if setting == "labels" else 10)
    x_eval = to_tensor(x_test)
    with torch.no_grad():  # in batches: all 10,000 images at once held 13 GB of a ×4 model's activations
        logits = [torch.cat([m(x) for x in x_eval.split(500)]).numpy() for m in models]
    ensemble = scores(logits, torch.as_tensor(y_test), "labels") if setting == "labels" else \
        scores([sum(logits) / 2], torch.as_tensor(y_test), setting)
    rows = [{"method": "ensemble (A and B side by side)", "budget": 2.0, "relative_flops": 2.0, **ensemble}]
    rows += [{"method": f"model {'AB'[k]} alone", "budget": 1.0, "relative_flops": 1.0,
              **scores([z], torch.as_tensor(y_test), setting)} for k, z in enumerate(logits) if setting == "images"]
    partial = RESULTS / f"{args.name}.partial.json"  # every finished merge, so an interrupted run can resume
    done = json.loads(partial.read_text()) if args.resume and partial.exists() else []
    rows += done
    common = {"setting": setting, "models": str(args.models), "arch": args.arch, "width": args.width,
              "samples": args.samples, "threads": args.threads, "cache_gb": args.cache_gb, "code": code_version(),
              "cpu": cpu_name()}
    jobs = [{**common, "variant": v, "budget": b} for v in variants for b in args.budgets
            if not any(r["method"] == v and r["budget"] == b for r in done)]
    metric = "per_task_mean" if setting == "labels" else "accuracy"
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for row in pool.imap(merge_row, jobs):
            rows.append(row)
            done.append(row)
            partial.write_text(json.dumps(done, indent=1))
            print(f"{row['method']:16s} budget {row['budget']:4.2f}: {metric} {row[metric]:.4f} "
                  f"({row['merge_seconds']:.1f} s, {row['peak_rss_mb']:.0f} MB)", flush=True)
    return rows


def plot(rows: list[dict], path: Path, title: str, metrics: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    present = [method for method in VARIANTS if any(r["method"] == method for r in rows)]
    for ax, metric in zip(axes[0], metrics):
        for k, method in enumerate(present):  # a colour each: the default cycle repeats after ten
            pts = [(r["relative_flops"], r[metric]) for r in rows if r["method"] == method]
            ax.plot(*zip(*pts), marker="o", label=method, color=plt.get_cmap("tab20")(k % 20))
        for r in rows:  # the references, found by name: ``--only`` sorts them by budget, the models alone first
            if r["method"] not in VARIANTS:
                ensemble = r["method"].startswith("ensemble")
                ax.axhline(r[metric], color="gray" if ensemble else "black", linestyle="--" if ensemble else ":",
                           linewidth=1, label="ensemble (2x)" if ensemble else r["method"])
        ax.set_xlabel("FLOPs of the merged model ÷ one model")
        ax.set_ylabel(LABELS[metric])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 60 * len(metrics)))  # one panel is narrow: wrap, not cut
    fig.tight_layout()
    fig.savefig(path, dpi=120)


LABELS = {"per_task_mean": "mean per-task accuracy", "joint": "joint 10-way accuracy", "accuracy": "test accuracy"}


def markdown(rows: list[dict], metrics: list[str]) -> str:
    head = " | ".join(LABELS[m] for m in metrics)
    lines = [f"| method | budget | FLOPs ratio | {head} | samples | merge s (passes) | peak MB | commit |",
             "|---|---|---|" + "---|" * len(metrics) + "---|---|---|---|"]
    for r in rows:
        cost = f"{r['merge_seconds']:.0f} ({r.get('least_squares_passes', '–')})" if "merge_seconds" in r else "–"
        peak = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "–"
        values = " | ".join(f"{r[m]:.4f}" for m in metrics)
        lines.append(f"| {r['method']} | {r['budget']} | {r['relative_flops']:.3f} | {values} | "
                     f"{r.get('samples', '–')} | {cost} | {peak} | {r.get('code', '–')} |")
    return "\n".join(lines)


def shortfalls(rows: list[dict], metric: str) -> list[str]:
    """Where another method scores above PLeaS at the same budget below 2.0."""
    pleas = {r["budget"]: r[metric] for r in rows if r["method"] == "pleas"}
    return [f"{r['method']} at {r['budget']}: {r[metric]:.4f} > {pleas[r['budget']]:.4f}" for r in rows
            if "merge_seconds" in r and r["budget"] in pleas and r["budget"] < 2.0 and r[metric] > pleas[r["budget"]]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=CHECKPOINTS / "cifar_resnet20",
                   help="a folder with model_a.pt, model_b.pt and train.json (default: the committed ResNet-20 pair "
                        "the README's table comes from)")
    p.add_argument("--samples", type=int, default=2048, help="calibration images from the training split")
    p.add_argument("--arch", choices=("resnet20", "vit"), default="resnet20")
    p.add_argument("--width", type=int, default=1)
    p.add_argument("--name", default="cifar_resnet20")
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    p.add_argument("--budgets", nargs="*", type=float, default=list(BUDGETS))
    p.add_argument("--threads", type=int, default=2, help="torch threads per merge")
    p.add_argument("--cache-gb", type=float, help="sequential least squares' activation cache (pleascc merge "
                   "--cache-gb; default: its 2 GB); a ×4 model at 1024 images outgrows 2 GB, and every one of its "
                   "39 passes then starts from the input")
    p.add_argument("--only", nargs="*", choices=list(VARIANTS),
                   help="recompute these variants at --budgets and keep the other rows of the existing results")
    p.add_argument("--resume", action="store_true",
                   help="reuse the merges an interrupted run saved in NAME.partial.json")
    p.add_argument("--replot", action="store_true", help="only rebuild the table and plot from the saved JSON")
    args = p.parse_args()
    setting = json.loads((args.models / "train.json").read_text()).get("setting", "labels")
    out = RESULTS / f"{args.name}.json"
    if args.replot:  # the setting the results were made in, whatever --models says
        saved = json.loads(out.read_text())
        return report(args, saved["rows"], saved["meta"].get("setting", setting))
    rows = run(args, setting, args.only or args.variants)
    meta = {"calibration_samples": args.samples, "arch": args.arch, "width": args.width, "setting": setting,
            "threads": args.threads, "cache_gb": args.cache_gb,
            "command": " ".join(sys.argv)}
    if args.only:  # the rows not recomputed, and the commands that made them, from the last results
        old = json.loads(out.read_text())
        rows = [r for r in rows if "merge_seconds" not in r] + [
            r for r in old["rows"] if "merge_seconds" in r and (r["method"], r["budget"]) not in {
                (v, b) for v in args.only for b in args.budgets}] + [r for r in rows if "merge_seconds" in r]
        rows.sort(key=lambda r: (list(VARIANTS).index(r["method"]) if r["method"] in VARIANTS else -1, r["budget"]))
        meta["earlier"] = old["meta"]
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / f"{args.name}.partial.json").unlink(missing_ok=True)
    report(args, rows, setting)


def report(args: argparse.Namespace, rows: list[dict], setting: str) -> None:
    """The table (.md), the plot (.png), and where PLeaS is behind, from the rows."""
    metrics = ["per_task_mean", "joint"] if setting == "labels" else ["accuracy"]
    title = {"resnet20": f"ResNet-20 ×{args.width}", "vit": f"ViT (dim {128 * args.width}, depth 4, 4 heads)"}
    what = "A (0–4) + B (5–9)" if setting == "labels" else "A and B on disjoint halves of the images"
    plot(rows, RESULTS / f"{args.name}.png", f"CIFAR-10 {title[args.arch]}: {what}", metrics)
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, metrics) + "\n")
    print(markdown(rows, metrics))
    behind = shortfalls(rows, metrics[0])
    print("PLeaS is at or above every other method at every budget below 2.0" if not behind
          else "PLeaS is behind: " + "; ".join(behind))


if __name__ == "__main__":
    main()
