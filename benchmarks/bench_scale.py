"""What a merge costs: time against its floor, peak memory, and how both scale.

The floor is one forward pass of A and B over the calibration data; a merge
also gathers statistics (two passes in one-pass least squares; in the
sequential variant, the default, a matching pass that also records A's and
B's layer outputs, then one pass of the merged model per level of layers, each
resuming the last from a store in memory and on disk) and solves small dense
systems.  Each measurement runs in a fresh process, so its peak resident memory
(VmHWM, from the OS: ``provenance.peak_rss_mb``) is its own; the forward floor is timed in that same
process right after the merge, at the merge's batch size, so the ratio compares
like with like; and again with the models channels-last, as the merge runs them
where that holds (``pleascc.channels_last``): the ratio to that floor counts only what
the merge adds to its forwards.  Beside the peak RSS, the most glibc's malloc had
in use and held from the OS during the merge (``HeapSampler``): their gap is
freed memory the heap keeps, and holes between live blocks.  Random weights,
and random inputs in a .npy on disk read batch by batch (as ``--data x.npy``
does): timing and memory do not depend on them.

    python benchmarks/bench_scale.py ratio     # resnet50, vit_small at 224: 512 and 2048 samples, both LS variants
    python benchmarks/bench_scale.py ratio --arch resnet50 vit_small --samples 2048 --least-squares sequential \
        --floors as-given                       # the default merge at 2048 samples, against the floor as given
    python benchmarks/bench_scale.py ratio --arch vit_b_16 --samples 2048 --least-squares sequential --floors none
        # torchvision's ViT-B/16: the merge's time, peak memory and spill alone
    python benchmarks/bench_scale.py samples   # CIFAR ResNet-20 ×1: 256 … 4096 samples
    python benchmarks/bench_scale.py width     # CIFAR ResNet-20 ×1, ×2, ×4, ×8 at 1024 samples
    python benchmarks/bench_scale.py width --least-squares one-pass   # the same, one-pass least squares
    python benchmarks/bench_scale.py ratio --samples 512 --least-squares one-pass --arch resnet50   # a subset
    python benchmarks/bench_scale.py ratio --smoke   # a minute-long check of the script itself
    python benchmarks/bench_scale.py ratio --device cuda   # on a GPU: scale_ratio_cuda.*
    python benchmarks/bench_scale.py breakdown --arch resnet50 --least-squares one-pass
        # where a merge's time goes (cProfile), in forward floors: scale_breakdown.*
    python benchmarks/bench_scale.py forward   # the floor four ways: modules (as given, channels-last), traced
        # graphs, lockstep as the merge runs them: scale_forward.*
    python benchmarks/bench_scale.py breakdown --glibc-defaults   # the same with glibc's own malloc thresholds
        # (freed activations returned to the OS, as before allocator.reuse_freed_memory): its own rows
    python benchmarks/bench_scale.py ratio --arch resnet50 --samples 512 --least-squares one-pass --match-samples 128
        # matching on the first 128 samples only (1 + 128/512 forwards): its own rows

Writes benchmarks/results/scale_PART.{json,md,png}; a run replaces the rows it measures (same model, samples,
least-squares variant and CPU) and keeps the others, each row naming the commit and the CPU it was measured on.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import json
import multiprocessing
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
from provenance import code_version, cpu_name, peak_rss_mb  # noqa: E402


def build(arch: str, seed: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """A randomly initialised model and its input shape."""
    torch.manual_seed(seed)
    if arch == "resnet50":
        import torchvision

        return torchvision.models.resnet50(num_classes=10).eval(), (3, 224, 224)
    if arch == "vit_b_16":
        import torchvision

        return torchvision.models.vit_b_16(num_classes=10).eval(), (3, 224, 224)
    if arch == "vit_small":
        import timm

        return timm.create_model("vit_small_patch16_224", num_classes=10).eval(), (3, 224, 224)
    if arch == "resnet18-smoke":
        import torchvision

        return torchvision.models.resnet18(num_classes=10).eval(), (3, 96, 96)
    from resnet20 import resnet20

    width = int(arch.removeprefix("resnet20x"))
    return resnet20(num_classes=5, width=width).eval(), (3, 32, 32)


class HeapSampler:
    """The most the process's malloc had in use, and the most it held from the OS, sampled every 50 ms.

    The peak RSS counts freed blocks malloc keeps (``allocator.reuse_freed_memory``)
    and the holes between live ones; in use is what the merge's values
    themselves took.  A lower bound: a peak shorter than 50 ms can be missed.
    None where libc is not glibc 2.33 or later (no ``mallinfo2``).
    """

    def __init__(self, period: float = 0.05) -> None:
        from pleascc.allocator import malloc_info

        self.mallinfo = malloc_info if malloc_info() is not None else None
        self.period, self.in_use, self.held = period, 0, 0
        self.done = threading.Event()

    def __enter__(self) -> "HeapSampler":
        if self.mallinfo:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.mallinfo:
            self.done.set()
            self.thread.join()

    def _sample(self) -> None:
        while not self.done.wait(self.period):
            info = self.mallinfo()
            self.in_use = max(self.in_use, info.uordblks + info.hblkhd)
            self.held = max(self.held, info.arena + info.hblkhd)

    def peaks_mb(self) -> dict:
        found = self.mallinfo is not None
        return {"peak_malloc_in_use_mb": self.in_use / 2**20 if found else None,
                "peak_malloc_held_mb": self.held / 2**20 if found else None}


def measure(job: dict) -> dict:
    """One merge in this (fresh) process, its peak memory, then the forward floor at the merge's own batch size.

    The floor comes after the peak is read, so its activations do not count in it.
    """
    import pleascc

    from pleascc import api
    from pleascc.data import load_data

    if job.get("glibc_defaults"):
        api.reuse_freed_memory = lambda: False
    if job.get("second_pass"):  # one-pass as it ran before its matching pass recorded what it reads
        api.records_reads = lambda *args, **kwargs: False

    torch.set_num_threads(job["threads"])
    (model_a, shape), (model_b, _) = build(job["arch"], 0), build(job["arch"], 1)
    with tempfile.TemporaryDirectory() as tmp:  # on disk, read batch by batch: memory flat in samples
        path = Path(tmp) / "x.npy"
        write_inputs(path, job["samples"], shape)
        x, device = load_data(str(path)).x, torch.device(job["device"])
        profile = cProfile.Profile() if job.get("profile") else None
        start = time.perf_counter()
        with profile or contextlib.nullcontext(), HeapSampler() as heap:
            result = pleascc.merge(model_a, model_b, x, least_squares=job["least_squares"], labels="separate",
                                   match_samples=job.get("match_samples"), device=job["device"], progress=False)
        merge = time.perf_counter() - start
        peaks = {"peak_rss_mb": peak_rss_mb(), **heap.peaks_mb(),
                 "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
        batch = result.report["batch_size"]
        floors = job.get("floors", "both")
        forward = time_forward((model_a, model_b), x, batch, device, torch.contiguous_format) \
            if floors != "none" else None
        forward_channels_last = time_forward((model_a, model_b), x, batch, device, torch.channels_last) \
            if floors == "both" else None
    return {**job, "positions": result.report["positions"], "forward_s": forward, "merge_s": merge,
            "ratio": forward and merge / forward, "forward_channels_last_s": forward_channels_last,
            "ratio_channels_last": forward_channels_last and merge / forward_channels_last, **peaks,
            "batch_size": batch,
            "passes": 1 + result.report["least_squares_passes"],
            **{key: result.report[f"least_squares_{key}"] for key in ("memory_peak_mb", "disk_peak_mb", "spilled_mb")},
            "timings_s": result.report["timings_s"],
            **({"breakdown_s": breakdown(pstats.Stats(profile), merge),
                "top_self_s": top_self_times(pstats.Stats(profile))} if profile else {})}


def time_forward(models: tuple[torch.nn.Module, ...], x, batch: int, device: torch.device,
                 memory_format: torch.memory_format) -> float:
    """Seconds for one forward pass of each model over ``x`` in batches of ``batch``, its 4-D weights (and so
    its maps) in ``memory_format``: as given, the ratio's floor; channels-last, the floor as the merge runs it
    (``pleascc.channels_last``), so a merge's ratio to it counts only what the merge adds to its forwards."""
    from pleascc.passes.rows import read_rows

    start = time.perf_counter()
    with torch.no_grad():
        for model in models:
            on_device = copy.deepcopy(model).to(device, memory_format=memory_format)
            for k in range(0, len(x), batch):
                on_device(read_rows(x[k:k + batch]).to(device))
    synchronize(device)
    return time.perf_counter() - start


FORWARD_MODES = ("modules", "modules, channels-last", "traced", "lockstep")


def measure_forward(job: dict) -> dict:
    """One forward pass of A and B four ways, alternating, at the one-pass merge's batch size: the models as
    given (the ratio's floor), the same channels-last, their traced graphs (out of place, as every pass runs
    them), and both graphs node by node in lockstep, as the merge runs them (``statistics_copies``), with
    nothing read between the layers.  What the merge's forwards cost beyond the last is the statistics' work
    between the layers.  Each mode's time is its fastest of ``repeats``.  On the CPU."""
    from collections import deque

    from pleascc import api
    from pleascc.channels_last import statistics_copies
    from pleascc.options import MergeOptions
    from pleascc.passes.batching import batch_size_for
    from pleascc.passes.executor import lockstep
    from pleascc.passes.groups import analyze
    from pleascc.trace import trace

    torch.set_num_threads(job["threads"])
    api.reuse_freed_memory()  # as a merge does
    (model_a, shape), (model_b, _) = build(job["arch"], 0), build(job["arch"], 1)
    x = torch.randn(job["samples"], *shape, generator=torch.Generator().manual_seed(2))
    gms = (trace(model_a), trace(model_b))
    analysis = analyze(gms[0], (x[:2],))
    batch = batch_size_for(analysis, gms[0].graph, MergeOptions().positions)
    last = [n.name for n in gms[0].graph.nodes if n.op in ("call_module", "call_function", "call_method")][-1]
    merge_runs = statistics_copies(gms, torch.device("cpu"), x[:2])
    cl_a, cl_b = (copy.deepcopy(m).to(memory_format=torch.channels_last) for m in (model_a, model_b))
    runs = {"modules": lambda xb: (model_a(xb), model_b(xb)), "modules, channels-last": lambda xb: (
            cl_a(xb), cl_b(xb)), "traced": lambda xb: (gms[0](xb), gms[1](xb)),
            "lockstep": lambda xb: deque(lockstep(merge_runs, xb, {last: (last,)}), maxlen=0)}
    seconds: dict[str, list[float]] = {mode: [] for mode in FORWARD_MODES}
    with torch.no_grad():
        for _ in range(job["repeats"]):
            for mode in FORWARD_MODES:
                start = time.perf_counter()
                for k in range(0, len(x), batch):
                    runs[mode](x[k:k + batch])
                seconds[mode].append(time.perf_counter() - start)
    return {**job, "batch_size": batch, "seconds": {mode: min(t) for mode, t in seconds.items()}}


def breakdown(profile: pstats.Stats, total: float) -> dict[str, float]:
    """A profiled merge's seconds by what they do; the parts do not overlap, ``other`` is the rest."""
    from pleascc.passes import executor, gram, layers, matching_stats, merge_maps, solve, stats

    def profile_key(function) -> tuple[str, int, str]:  # pstats' name for a Python function
        code = function.__code__
        return code.co_filename, code.co_firstlineno, code.co_name

    def cumulative(function, caller=None) -> float:
        *info, callers = profile.stats.get(profile_key(function), (0, 0, 0, 0, {}))
        return info[3] if caller is None else callers.get(profile_key(caller), (0, 0, 0, 0))[3]

    grams, targets = cumulative(gram.GramSum.add), cumulative(stats._accumulate)
    parts = {
        "forward (every pass)": cumulative(executor.NodeRunner.run_node),
        "matching statistics": cumulative(matching_stats._add_site),
        "least-squares Grams": grams,
        "least-squares targets": targets,
        "least-squares rows (read, mapped)": cumulative(stats._add_layer) - grams - targets
        + cumulative(layers.Layer.read_input) + cumulative(layers.ConvLayer.read_input)
        + cumulative(merge_maps.MergeMaps.merge, caller=stats._mapped_reads),
        "solves": cumulative(solve.ridge_fit),
    }
    return {**parts, "other": total - sum(parts.values())}


def top_self_times(stats: pstats.Stats, count: int = 20) -> dict[str, float]:
    """The functions that spent the most time in their own code: what the parts above leave unexplained."""
    own = sorted(((info[2], f"{Path(path).name}:{line}({name})") for (path, line, name), info in stats.stats.items()),
                 reverse=True)
    return {where: seconds for seconds, where in own[:count]}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_inputs(path: Path, samples: int, shape: tuple[int, ...]) -> None:
    """Random inputs as a .npy, written 64 samples at a time (never all in memory)."""
    generator = torch.Generator().manual_seed(2)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (samples, *shape)})
        for k in range(0, samples, 64):
            f.write(torch.randn(min(64, samples - k), *shape, generator=generator).numpy().tobytes())


def jobs(part: str, smoke: bool, threads: int, counts: list[int] | None = None,
         variants: list[str] | None = None, models: list[str] | None = None) -> list[dict]:
    if part in ("ratio", "breakdown"):
        archs, default = (["resnet18-smoke"], [520, 1040]) if smoke else (models or ["resnet50", "vit_small"],
                                                                        [512, 2048] if part == "ratio" else [168])
        return [{"arch": a, "samples": n, "least_squares": ls, "threads": threads, "profile": part == "breakdown"}
                for a in archs for n in counts or default for ls in variants or ("one-pass", "sequential")]
    if part == "forward":
        archs = ["resnet18-smoke"] if smoke else models or ["resnet50", "vit_small"]
        return [{"arch": a, "samples": n, "least_squares": "one-pass", "threads": threads, "repeats": 3}
                for a in archs for n in counts or ([46] if smoke else [184])]
    if part == "samples":
        counts = [64, 128] if smoke else [256, 512, 1024, 2048, 4096]
        return [{"arch": "resnet20x1", "samples": n, "least_squares": ls, "threads": threads}
                for ls in variants or ("sequential",) for n in counts]
    widths = [1, 2] if smoke else [1, 2, 4, 8]
    return [{"arch": f"resnet20x{w}", "samples": 128 if smoke else 1024, "least_squares": ls,
             "threads": threads} for ls in variants or ("sequential",) for w in widths]


def model(row: dict) -> str:
    """A row's model, whether glibc's malloc thresholds were left as they are, whether one-pass ran its models
    again, and matching's samples if fewer."""
    return (row["arch"] + (" (glibc malloc defaults)" if row.get("glibc_defaults") else "")
            + (" (second pass)" if row.get("second_pass") else "")
            + (f" (matching on {row['match_samples']})" if row.get("match_samples") else ""))


def on_cpu(row: dict) -> str:
    """A plot label's CPU, where the row names one: rows of one model from two CPUs get two bars."""
    return f", {row['cpu'].replace('(R)', '').replace(' Processor', '')}" if row.get("cpu") else ""


def table(header: list[str], cells: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"


def markdown(rows: list[dict]) -> str:
    if rows and "breakdown_s" in rows[0]:
        return breakdown_markdown(rows)
    if rows and "seconds" in rows[0]:
        return forward_markdown(rows)
    return table(["model", "samples", "batch", "positions", "least squares", "passes", "forward A+B s",
                  "forward channels-last s", "merge s", "merge ÷ forward", "merge ÷ forward channels-last",
                  "peak MB", "malloc in use MB", "malloc held MB", "kept in memory MB", "kept on disk MB",
                  "spilled MB", "commit", "CPU"],
                 [[model(r), str(r["samples"]), str(r.get("batch_size", 64)), str(r.get("positions") or "all"),
                   r["least_squares"], str(r["passes"]), optional(r, "forward_s", ".1f"),
                   optional(r, "forward_channels_last_s", ".1f"), f"{r['merge_s']:.1f}", optional(r, "ratio", ".2f"),
                   optional(r, "ratio_channels_last", ".2f"), f"{r['peak_rss_mb']:.0f}",
                   optional(r, "peak_malloc_in_use_mb", ".0f"), optional(r, "peak_malloc_held_mb", ".0f"),
                   optional(r, "memory_peak_mb", ".0f"), optional(r, "disk_peak_mb", ".0f"),
                   optional(r, "spilled_mb", ".0f"), r.get("code", "—"), r.get("cpu", "—")] for r in rows])


def optional(row: dict, field: str, spec: str) -> str:
    """A figure rows measured before it existed lack: "—" there."""
    return format(row[field], spec) if row.get(field) is not None else "—"


def breakdown_markdown(rows: list[dict]) -> str:
    """Each part of a profiled merge in forward floors (one forward pass of A and B over the same data)."""
    parts = list(rows[0]["breakdown_s"])
    return table(["model", "samples", "batch", "least squares", "forward A+B s", "merge s (profiled)", *parts,
                  "commit", "CPU"],
                 [[model(r), str(r["samples"]), str(r["batch_size"]), r["least_squares"], f"{r['forward_s']:.1f}",
                   f"{r['merge_s']:.1f} ({r['ratio']:.2f}×)",
                   *(f"{r['breakdown_s'][k] / r['forward_s']:.2f}×" for k in parts),
                   r.get("code", "—"), r.get("cpu", "—")] for r in rows])


def forward_markdown(rows: list[dict]) -> str:
    """The ways of running the forward pass (``FORWARD_MODES``), as ratios to the models as given (measured in
    one process)."""
    others = FORWARD_MODES[1:]
    return table(["model", "samples", "batch", "modules s", *(f"{mode} ÷ modules" for mode in others), "commit",
                  "CPU"],
                 [[r["arch"], str(r["samples"]), str(r["batch_size"]), f"{r['seconds']['modules']:.2f}",
                   *(f"{r['seconds'][mode] / r['seconds']['modules']:.3f}" if mode in r["seconds"] else "—"
                     for mode in others), r.get("code", "—"), r.get("cpu", "—")] for r in rows])


def plot(rows: list[dict], part: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if part == "breakdown":
        return plot_breakdown(rows, path, plt)
    if part == "forward":
        return plot_forward(rows, path, plt)
    if part == "ratio":
        return plot_ratio(rows, path, plt)
    key = {"samples": "samples", "width": "arch"}[part]  # a curve per least-squares variant
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant in sorted({r["least_squares"] for r in rows}):
        line = sorted((r for r in rows if r["least_squares"] == variant), key=lambda r: r[key])
        xs = [r[key] for r in line]
        axes[0].plot(xs, [r["merge_s"] for r in line], marker="o", label=f"merge, {variant}")
        axes[0].plot(xs, [r["forward_s"] for r in line], marker="o", linestyle=":",
                     label=f"forward A+B (floor), {variant}")
        axes[1].plot(xs, [r["peak_rss_mb"] / 1024 for r in line], marker="o", label=variant)
    axes[0].set(ylabel="seconds", xlabel=key)
    axes[1].set(ylabel="peak RSS, GB", xlabel=key)
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ratio(rows: list[dict], path: Path, plt) -> None:
    """One row of bars per merge: its two ratios against the target, and its peak RSS beside what malloc held
    and had in use (rows measured before ae53948 have the RSS only)."""
    labels = [f"{model(r)}, {r['samples']}, {r['least_squares']}, {r.get('code', '?')}{on_cpu(r)}" for r in rows]
    at = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(14, 1.2 + 0.42 * len(rows)), sharey=True)
    bars = {"÷ forward as given": "ratio", "÷ forward channels-last": "ratio_channels_last"}
    for k, (label, field) in enumerate(bars.items()):
        axes[0].barh(at + 0.2 - 0.4 * k, [r.get(field) or np.nan for r in rows], height=0.4, label=label)
    axes[0].axvline(3, color="gray", linestyle="--", label="target: one-pass 3")
    axes[0].axvline(4, color="black", linestyle=":", label="target: sequential 4")
    axes[0].set(xlabel="merge time ÷ forward A+B", yticks=at, yticklabels=labels)
    bars = {"peak RSS": "peak_rss_mb", "malloc held": "peak_malloc_held_mb", "malloc in use": "peak_malloc_in_use_mb"}
    for k, (label, field) in enumerate(bars.items()):
        axes[1].barh(at + 0.27 - 0.27 * k, [(r.get(field) or np.nan) / 1024 for r in rows], height=0.27, label=label)
    axes[1].set(xlabel="GB")
    for ax in axes:
        ax.invert_yaxis()
        ax.legend(fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_forward(rows: list[dict], path: Path, plt) -> None:
    """Per model, each way of running the forward pass as a share of the models as given."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for k, mode in enumerate(FORWARD_MODES):
        ax.bar(np.arange(len(rows)) + 0.2 * (k - 1.5), [r["seconds"].get(mode, np.nan) / r["seconds"]["modules"]
                                                         for r in rows], width=0.2, label=mode)
    ax.set_xticks(np.arange(len(rows)), [f"{r['arch']}{on_cpu(r)}" for r in rows], fontsize=7)
    ax.set(ylabel="seconds ÷ modules as given")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_breakdown(rows: list[dict], path: Path, plt) -> None:
    """One stacked bar per merge: its parts in forward floors, against the target of 3."""
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.6 * len(rows)))
    labels = [f"{model(r)}, {r['samples']}, {r['least_squares']}{on_cpu(r)}" for r in rows]
    left = np.zeros(len(rows))
    for part in rows[0]["breakdown_s"]:
        width = np.array([r["breakdown_s"][part] / r["forward_s"] for r in rows])
        ax.barh(labels, width, left=left, label=part)
        left += width
    ax.axvline(3, color="gray", linestyle="--", label="target 3")
    ax.set(xlabel="seconds ÷ forward A+B")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the bars, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("ratio", "samples", "width", "breakdown", "forward"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where the forward floor and the merge's passes run (cuda: "
                   "results go to scale_PART_cuda.*)")
    p.add_argument("--smoke", action="store_true", help="tiny settings, to check the script")
    p.add_argument("--samples", type=int, nargs="*", help="ratio, breakdown and forward: these sample counts only "
                   "(default 512 2048; breakdown 168; forward 184)")
    p.add_argument("--least-squares", nargs="*", choices=("one-pass", "sequential"),
                   help="these variants only (ratio, breakdown: default both; samples, width: default sequential)")
    p.add_argument("--arch", nargs="*", choices=("resnet50", "vit_small", "vit_b_16"),
                   help="ratio, breakdown and forward: these models only")
    p.add_argument("--match-samples", type=int, help="ratio and breakdown: matching reads only the first N samples "
                   "(pleascc merge --match-samples; rows of their own)")
    p.add_argument("--floors", choices=("both", "as-given", "none"), default="both",
                   help="ratio: the forward floors timed after each merge: as given and channels-last (default), "
                        "as given only, or none (the merge's time, memory and spill alone)")
    p.add_argument("--glibc-defaults", action="store_true", help="leave glibc's malloc thresholds as they are "
                   "(rows of their own), to measure what reuse_freed_memory saves")
    p.add_argument("--second-pass", action="store_true", help="one-pass: run A and B again for the least-squares "
                   "statistics instead of reading what the matching pass recorded (rows of their own)")
    args = p.parse_args()
    name = f"scale_{args.part}{'_cuda' if args.device != 'cpu' else ''}{'_smoke' if args.smoke else ''}"
    RESULTS.mkdir(exist_ok=True)
    meta = {"command": " ".join(sys.argv), "torch": torch.__version__, "threads": args.threads, "device": args.device}
    version, cpu = code_version(), cpu_name()
    meta["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    if meta["gpu"] is None:
        print("no GPU on this machine: rows for --device cuda (scale_PART_cuda.*) are not measured here", flush=True)
    rows = previous_rows(RESULTS / f"{name}.json")
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        todo = jobs(args.part, args.smoke, args.threads, args.samples, args.least_squares, args.arch)
        work = measure_forward if args.part == "forward" else measure
        for row in pool.imap(work, [{**job, "device": args.device, "glibc_defaults": args.glibc_defaults,
                                     "second_pass": args.second_pass, "match_samples": args.match_samples,
                                     "floors": args.floors} for job in todo]):
            row.update(code=version, cpu=cpu, command=" ".join(sys.argv))
            rows = [r for r in rows if key(r) != key(row)] + [row]
            print(markdown([row]).splitlines()[-1], flush=True)
            write(rows, meta, args.part, name)  # after every row: a stopped run keeps what it measured


def key(row: dict) -> tuple:
    """What a row measures; a run replaces the earlier row with the same key (rows from another CPU stay)."""
    return (row["arch"], row["samples"], row["least_squares"], row.get("glibc_defaults", False),
            row.get("second_pass", False), row.get("match_samples"), row.get("cpu"))


def previous_rows(path: Path) -> list[dict]:
    """The rows an earlier run wrote, to keep those this run does not measure again."""
    return json.loads(path.read_text())["rows"] if path.exists() else []


def write(rows: list[dict], meta: dict, part: str, name: str) -> None:
    rows = sorted(rows, key=lambda r: (r["arch"], r["least_squares"], r["samples"], r.get("glibc_defaults", False)))
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(rows))
    plot(rows, part, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
