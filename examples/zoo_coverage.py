"""Coverage of the permutation-group analysis over a model zoo (random weights).

For each model: the random-permutation property (max output change, relative,
in float64), the number of permutation groups, the share of parameters in
them, and the ops without a rule.  Writes examples/results/zoo_coverage.{json,md}.

    python examples/zoo_coverage.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import timm
import torch
import torchvision

from pleascc.verify import permutation_invariance

ZOO = [("torchvision", n) for n in ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
                                    "regnet_y_400mf", "densenet121", "vgg11_bn", "squeezenet1_1", "convnext_tiny")]
ZOO += [("timm", "resnet18"), ("timm", "efficientnet_b0")]
RESULTS = Path(__file__).resolve().parent / "results"


def build(source: str, name: str) -> torch.nn.Module:
    if source == "torchvision":
        return torchvision.models.get_model(name, weights=None).eval()
    return timm.create_model(name, pretrained=False).eval()


def main() -> None:
    rows = []
    for source, name in ZOO:
        torch.manual_seed(0)
        start = time.perf_counter()
        result = permutation_invariance(build(source, name), torch.randn(2, 3, 64, 64))
        rows.append({"model": f"{source}:{name}", **result, "seconds": time.perf_counter() - start})
        print(f"{source}:{name}: {rows[-1]}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "zoo_coverage.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    lines = ["| model | groups | parameters in groups | output change after random permutation | ops without a rule |",
             "|---|---|---|---|---|"]
    for r in rows:
        stops = "; ".join(r["unsupported"]) or "none"
        lines.append(f"| {r['model']} | {r['free_groups']} | {r['coverage']:.2%} | {r['relative_diff']:.1e} | {stops} |")
    (RESULTS / "zoo_coverage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
