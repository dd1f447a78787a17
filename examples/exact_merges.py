"""Exact merges at full size through ONNX Runtime, for every transformer of the zoo (random weights).

For each model of ``zoo_coverage.TRANSFORMERS`` at its own resolution:

- self-merge at budget 1.0 is the model;
- a merge with a randomly permuted copy of itself at 1.0 is the model (the
  matching must undo the permutation, heads and head dims included);
- two differently seeded models at 2.0 with separate labels are the two side
  by side.

Each merged model is exported to ONNX and run in ONNX Runtime; the largest
output difference relative to the output scale must be below 1e-4.  These
merges use ``--method permute`` so that a few samples suffice at 224×224 (a
least-squares fit of a 768-wide head needs 769); the least-squares versions of
the same checks run in the test suite on small configurations of the same code.
Writes examples/results/exact_merges.{json,md}.

    python examples/exact_merges.py [--samples 16] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_coverage import RESULTS, TRANSFORMERS, build  # noqa: E402
from provenance import code_version  # noqa: E402

import pleascc  # noqa: E402
from pleascc.export import onnx_predict  # noqa: E402
from pleascc.verify import flat_outputs, permuted_copy  # noqa: E402

TOLERANCE = 1e-4


def _through_onnx(model: torch.nn.Module, x: torch.Tensor) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        pleascc.export_onnx(model, x[:2], f"{tmp}/m.onnx")
        return onnx_predict(f"{tmp}/m.onnx", x)


def _relative(got: list, want: list[torch.Tensor]) -> float:
    scale = max(float(w.abs().max()) for w in want) or 1.0
    return max(float(abs(g - w.numpy()).max()) for g, w in zip(got, want)) / scale


def check(source: str, name: str, resolution: int, kwargs: dict, samples: int) -> dict:
    """The three merges of one model; each difference is recorded, failures with their reason."""
    row: dict = {"model": f"{source}:{name}", "resolution": resolution, "code": code_version()}
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = build(source, name, kwargs)
        x, x_test = torch.randn(samples, 3, resolution, resolution), torch.randn(4, 3, resolution, resolution)
        with torch.no_grad():
            want = flat_outputs(model(x_test))
        for label, other in (("self", model), ("permuted_copy", permuted_copy(model, x))):
            merged = pleascc.merge(model, other, x, budget=1.0, method="permute", reset_bn=False,
                                   progress=False).model
            row[label] = _relative(_through_onnx(merged, x_test), want)
        torch.manual_seed(1)
        model_b = build(source, name, kwargs)
        merged = pleascc.merge(model, model_b, x, budget=2.0, labels="separate", method="permute", reset_bn=False,
                               progress=False).model
        got = _through_onnx(merged, x_test)
        with torch.no_grad():
            want_b = flat_outputs(model_b(x_test))
        row["side_by_side"] = max(_relative(got[:len(want)], want), _relative(got[len(want):], want_b))
    except Exception as err:  # record why, and go on
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
    row["exact"] = all(row.get(k, 1.0) < TOLERANCE for k in ("self", "permuted_copy", "side_by_side"))
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | self-merge 1.0 | permuted copy 1.0 | side by side 2.0 | exact | s | code |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]:.1e}" if k in r else "–" for k in ("self", "permuted_copy", "side_by_side")]
        verdict = "yes" if r["exact"] else f"no: {r.get('error', 'difference above 1e-4')}"
        lines.append(f"| {r['model']} | {' | '.join(cells)} | {verdict} | {r['seconds']} | {r['code']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=16, help="calibration samples (random inputs)")
    p.add_argument("--only", nargs="*", help="model names to check (default: all)")
    args = p.parse_args()
    rows = []
    for source, name, resolution, kwargs in TRANSFORMERS:
        if not args.only or name in args.only:
            rows.append(check(source, name, resolution, kwargs, args.samples))
            print(json.dumps(rows[-1]), flush=True)
    out = RESULTS / "exact_merges.json"
    if args.only and out.exists():  # update those rows, keep the others (each row names its commit)
        fresh = {r["model"] for r in rows}
        old = json.loads(out.read_text())
        code = old["meta"].get("code", "?").split()[0]
        order = [f"{source}:{name}" for source, name, _, _ in TRANSFORMERS]
        rows = sorted([{"code": code, **r} for r in old["rows"] if r["model"] not in fresh] + rows,
                      key=lambda r: order.index(r["model"]))
    RESULTS.mkdir(exist_ok=True)
    meta = {"command": " ".join(sys.argv), "tolerance": TOLERANCE, "method": "permute"}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "exact_merges.md").write_text(markdown(rows))
    print(markdown(rows))
    sys.exit(0 if all(r["exact"] for r in rows) else 1)


if __name__ == "__main__":
    main()
