"""Closed-form least squares against gradient descent, on the same layers and the same data.

The PLeaS paper's code fits each merged layer by gradient descent: Adam, lr
5e-4, 400 steps, a cosine schedule, warm-started from the permuted average.
pleascc solves the same objective in closed form.  This runs a real one-pass
PLeaS merge (the committed CIFAR ResNet-20 pair of train_cifar_pair.py, in
examples/checkpoints/cifar_resnet20, or a random pair of the same net with
--random) and, for every layer block pleascc solves,
also runs that gradient descent on the very same moments (full batch, so
without its forward passes: a lower bound on its cost).  Reports each block's
relative residual both ways and the wall times, measured in the same run.
Writes examples/results/closed_form_vs_gd.{json,png,md}.

    python examples/bench_closed_form.py [--models examples/checkpoints/cifar_resnet20] [--budget 1.0] [--samples 2048]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10 import load_cifar10, to_tensor  # noqa: E402
from resnet20 import resnet20  # noqa: E402

import pleascc  # noqa: E402
import pleascc.least_squares  # noqa: E402
from pleascc.passes.solve import ridge_fit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RELATIVE_TIE = 1e-6  # closer residuals are a tie: BatchNorm blocks fit to ~1e-15, where the two differ by float noise


def gradient_descent(problem, has_bias: bool, steps: int = 400, lr: float = 5e-4) -> tuple[float, float]:
    """Adam with a cosine schedule from the warm start, on the block's own moments; (relative residual, seconds)."""
    start = time.perf_counter()
    xx, rx = problem.xx, problem.rx
    if not has_bias:
        xx, rx = xx[:, :-1, :-1], rx[:, :, :-1]
    delta = torch.zeros_like(rx, requires_grad=True)  # W − W0: the warm start is the permuted average
    opt = torch.optim.Adam([delta], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = (problem.rr - 2 * (delta * rx).sum() + (delta @ xx * delta).sum()) / max(problem.tt, 1e-30)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        residual = float((problem.rr - 2 * (delta * rx).sum() + (delta @ xx * delta).sum()) / max(problem.tt, 1e-30))
    return residual, time.perf_counter() - start


def pair(args) -> list[torch.nn.Module]:
    models = []
    for k, name in enumerate("ab"):
        torch.manual_seed(k)
        model = resnet20(num_classes=5)
        if not args.random:
            model.load_state_dict(torch.load(args.models / f"model_{name}.pt", weights_only=True))
        models.append(model.eval())
    return models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=Path(__file__).resolve().parent / "checkpoints" / "cifar_resnet20")
    p.add_argument("--random", action="store_true", help="a random pair instead of trained models")
    p.add_argument("--budget", type=float, default=1.0)
    p.add_argument("--samples", type=int, default=2048)
    args = p.parse_args()
    torch.set_num_threads(2)
    x_train = load_cifar10()[0]
    calib = to_tensor(x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:args.samples]])

    rows = []

    def recorded(problem, ridge, has_bias):  # pleascc's own solve, timed, then GD on the same block
        start = time.perf_counter()
        w, residual = ridge_fit(problem, ridge, has_bias)
        seconds = time.perf_counter() - start
        gd_residual, gd_seconds = gradient_descent(problem, has_bias)
        rows.append({"block": problem.name, "unknowns": int(math.prod(problem.rx.shape)),
                     "closed_form_residual": residual, "closed_form_seconds": seconds,
                     "gd_residual": gd_residual, "gd_seconds": gd_seconds})
        return w, residual

    pleascc.least_squares.ridge_fit = recorded  # the merge's own least-squares step, instrumented
    pleascc.merge(*pair(args), calib, budget=args.budget, labels="separate", least_squares="one-pass", progress=False)
    totals = {"closed_form_seconds": sum(r["closed_form_seconds"] for r in rows),
              "gd_seconds": sum(r["gd_seconds"] for r in rows),
              "blocks_gd_lower": sum(r["gd_residual"] < r["closed_form_residual"] * (1 - RELATIVE_TIE) for r in rows),
              "blocks_closed_form_lower": sum(r["closed_form_residual"] < r["gd_residual"] * (1 - RELATIVE_TIE)
                                              for r in rows),
              "blocks": len(rows)}
    totals["speedup"] = totals["gd_seconds"] / totals["closed_form_seconds"]
    RESULTS.mkdir(exist_ok=True)
    meta = {"command": " ".join(sys.argv), "budget": args.budget, "samples": args.samples, "random": args.random}
    (RESULTS / "closed_form_vs_gd.json").write_text(json.dumps({"meta": meta, "totals": totals, "rows": rows},
                                                               indent=1))
    lines = ["| block | unknowns | closed-form residual | GD residual | closed-form ms | GD ms |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['block']} | {r['unknowns']} | {r['closed_form_residual']:.4g} | {r['gd_residual']:.4g} | "
              f"{1e3 * r['closed_form_seconds']:.1f} | {1e3 * r['gd_seconds']:.0f} |" for r in rows]
    lines.append(f"| **all {len(rows)} blocks** | | | | {1e3 * totals['closed_form_seconds']:.0f} | "
                 f"{1e3 * totals['gd_seconds']:.0f} ({totals['speedup']:.0f}× slower) |")
    (RESULTS / "closed_form_vs_gd.md").write_text("\n".join(lines) + "\n")
    plot(rows, RESULTS / "closed_form_vs_gd.png")
    print("\n".join(lines[-1:]))
    print(f"of {len(rows)} blocks, the closed form's residual is lower on {totals['blocks_closed_form_lower']}, "
          f"GD's on {totals['blocks_gd_lower']}, the rest tie (within {RELATIVE_TIE:g} relative)")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    closed, gd = [r["closed_form_residual"] for r in rows], [r["gd_residual"] for r in rows]
    axes[0].scatter(closed, gd, s=12)
    low, high = min(closed + gd), max(closed + gd)
    axes[0].plot([low, high], [low, high], "k--", lw=0.8)
    axes[0].set(xscale="log", yscale="log", xlabel="closed-form relative residual", ylabel="GD relative residual",
                title="per layer block (above the line: GD worse)")
    axes[1].bar(["closed form", "Adam, 400 steps"], [sum(r["closed_form_seconds"] for r in rows),
                                                     sum(r["gd_seconds"] for r in rows)])
    axes[1].set(ylabel="seconds, all blocks", yscale="log", title="solve time (same moments, same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
