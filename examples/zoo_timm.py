"""Coverage over the timm zoo: trace, permutation property, share of parameters in groups, exact self-merge.

For up to ``--per-family`` architectures of every timm module (family) with at
most ``--max-params`` parameters (random weights, 10 classes):

- traced: torch.fx traces it (pleascc's tracer);
- property: permuting every free group at random leaves the output unchanged
  (float64, relative change < 1e-4) and no op lacks a rule; all-zero
  parameters (zero-initialised heads) get small random values first, or an
  output of zeros would pass every check;
- coverage: share of parameters that live in a permutable group;
- self-merge: the model merged with itself at budget 1.0 (``--method permute``,
  8 samples), exported to ONNX, gives the model's outputs in ONNX Runtime
  (relative difference < 1e-4);
- seconds for all of it.

Any failure is recorded with its one-line reason; a merged model is never
accepted unchecked.  Results are appended to examples/results/zoo_timm.json as
they come (an interrupted run resumes; each row names the commit it was computed
with), then summarised in zoo_timm.md.  ``--redo-failed`` recomputes the rows
that did not pass, after a fix.

    python examples/zoo_timm.py [--max-params 30e6] [--per-family 2] [--threads 2]

Tracing and ONNX export are mostly single-threaded Python, so on a small
machine two workers of one thread each finish sooner than one of two threads:

    python examples/zoo_timm.py --threads 1 --shard 0/2 & python examples/zoo_timm.py --threads 1 --shard 1/2
"""

from __future__ import annotations

import argparse
import fcntl
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

import pleascc
from pleascc.export import onnx_predict
from pleascc.trace import trace
from pleascc.verify import flat_outputs, non_degenerate, permutation_invariance
from provenance import code_version

RESULTS = Path(__file__).resolve().parent / "results"


def candidates(max_params: float, per_family: int) -> list[str]:
    """Up to ``per_family`` small architectures per timm module, smallest first (by a meta-device count)."""
    chosen = []
    for family in timm.list_modules():
        sized = []
        for name in timm.list_models(module=family):
            try:
                with torch.device("meta"):
                    params = sum(p.numel() for p in timm.create_model(name, num_classes=10).parameters())
            except Exception:
                continue
            if params <= max_params:
                sized.append((params, name))
        chosen += [name for _, name in sorted(sized)[:per_family]]
    return chosen


def check(name: str, version: str) -> dict:
    """Every stage for one architecture; the first failing stage is recorded with its reason."""
    row: dict = {"model": name, "code": version, "traced": False, "property": False, "self_merge_exact": False}
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = non_degenerate(timm.create_model(name, pretrained=False, num_classes=10))  # zero heads: no check
        row["params"] = sum(p.numel() for p in model.parameters())
        shape = model.pretrained_cfg.get("input_size", (3, 224, 224))
        row["input"] = list(shape)
        x = torch.randn(8, *shape)
        trace(model)
        row["traced"] = True
        result = permutation_invariance(model, x[:2])
        row.update(relative_diff=result["relative_diff"], coverage=result["coverage"],
                   free_groups=result["free_groups"], unsupported=sorted(set(result["unsupported"]))[:5])
        row["property"] = result["relative_diff"] < 1e-4 and not result["unsupported"]
        merged = pleascc.merge(model, model, x, method="permute", reset_bn=False, progress=False).model
        with tempfile.TemporaryDirectory() as tmp:
            pleascc.export_onnx(merged, x[:2], f"{tmp}/m.onnx")
            got = onnx_predict(f"{tmp}/m.onnx", x)
        with torch.no_grad():
            want = [t.numpy() for t in flat_outputs(model(x))]
        scale = max(abs(w).max() for w in want) or 1.0
        row["self_merge_diff"] = float(max(abs(g - w).max() for g, w in zip(got, want)) / scale)
        row["self_merge_exact"] = row["self_merge_diff"] < 1e-4
    except Exception as err:  # record why, and go on
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _passed(row: dict) -> bool:
    return row["traced"] and row["property"] and row["self_merge_exact"]


def _reason(row: dict) -> str:
    error = row.get("error") or ""
    if "can't allocate memory" in error:
        return "needs more memory than the worker's --memory-gb cap"
    if not error and row.get("unsupported") == [] and not row["property"]:
        return f"a wrong group: the property moves the output by {row['relative_diff']:.0e}"
    return error or "; ".join(row.get("unsupported") or [])


def summary(rows: list[dict]) -> str:
    traced = [r for r in rows if r["traced"]]
    passed = [r for r in traced if _passed(r)]
    failed = [r for r in rows if not _passed(r)]
    lines = [f"{len(rows)} architectures from {len({r['model'].split('_')[0] for r in rows})} name stems; "
             f"{len(traced)} trace; {len(passed)} of those ({len(passed) / max(1, len(traced)):.0%}) pass the "
             "property and the exact self-merge through ONNX Runtime.", "",
             "Failing: " + "; ".join(f"{r['model']} ({_reason(r)[:90]})" for r in failed) + ".", "",
             "Rows by the commit they were computed with: " + ", ".join(
                 f"{code} {sum(str(r.get('code')) == code for r in rows)}" for code in sorted(
                     {str(r.get("code")) for r in rows})) + ".", "",
             "| model | params | traced | property (rel. diff) | coverage | self-merge via ONNX | s | failure |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = f"{r['relative_diff']:.0e}" if "relative_diff" in r else "–"
        cov = f"{r['coverage']:.0%}" if "coverage" in r else "–"
        merge = f"{r['self_merge_diff']:.0e}" if "self_merge_diff" in r else "–"
        why = _reason(r)
        lines.append(f"| {r['model']} | {r.get('params', 0) / 1e6:.1f}M | {'yes' if r['traced'] else 'no'} | "
                     f"{'pass' if r['property'] else 'fail'} ({diff}) | {cov} | "
                     f"{'exact' if r['self_merge_exact'] else 'no'} ({merge}) | {r['seconds']} | "
                     f"{why.replace('|', '/')[:120]} |")
    return "\n".join(lines) + "\n"


def _save(path: Path, row: dict, names: list[str]) -> list[dict]:
    """Add one row to the results file under a lock (workers of other shards write to it too)."""
    path.parent.mkdir(exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(path.read_text())["rows"] if path.exists() else []
        rows = sorted([r for r in rows if r["model"] != row["model"]] + [row], key=lambda r: names.index(r["model"]))
        meta = {"command": " ".join(sys.argv), "timm": timm.__version__, "torch": torch.__version__, "models": names}
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-params", type=float, default=30e6)
    p.add_argument("--per-family", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "zoo_timm.json")
    p.add_argument("--redo-failed", action="store_true", help="recompute the rows that did not pass")
    p.add_argument("--redo", nargs="*", default=[], help="recompute these models' rows")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 leaves a core for other work)")
    p.add_argument("--shard", default="0/1", help="K/N: this worker checks every N-th model from the K-th")
    p.add_argument("--memory-gb", type=float, default=9.0,
                   help="cap on this worker's data memory: a model needing more fails with an allocation error "
                        "(recorded) instead of the machine killing the worker")
    p.add_argument("--summarize", action="store_true", help="only rewrite the summary (.md) from the results")
    args = p.parse_args()
    if args.summarize:
        args.out.with_suffix(".md").write_text(summary(json.loads(args.out.read_text())["rows"]))
        return
    limit = int(args.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    torch.set_num_threads(args.threads)
    shard, shards = (int(v) for v in args.shard.split("/"))
    saved = json.loads(args.out.read_text()) if args.out.exists() else {"meta": {}, "rows": []}
    rows = saved["rows"]
    seen = {r["model"] for r in rows if not (args.redo_failed and not _passed(r)) and r["model"] not in args.redo}
    names = saved["meta"].get("models") or candidates(args.max_params, args.per_family)  # listing takes minutes
    todo = [n for n in names[shard::shards] if n not in seen]
    print(f"{len(names)} architectures, {len(seen)} already done, {len(todo)} for this worker", flush=True)
    version = code_version()
    for name in todo:
        row = check(name, version)
        rows = _save(args.out, row, names)
        print(f"[{len(rows)}/{len(names)}] {json.dumps(row)}", flush=True)
    args.out.with_suffix(".md").write_text(summary(rows))
    print(summary(rows).splitlines()[0])

if __name__ == "__main__":
    main()
