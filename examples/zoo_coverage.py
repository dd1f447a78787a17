"""Coverage of the permutation-group analysis over a model zoo (random weights): CNNs and transformers.

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

from pleascc.verify import non_degenerate, permutation_invariance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_vit import TinyViT  # noqa: E402

# (source, name, input resolution, constructor arguments)
ZOO = [("torchvision", n, 64, {}) for n in ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small",
                                            "efficientnet_b0", "regnet_y_400mf", "densenet121", "vgg11_bn",
                                            "squeezenet1_1", "convnext_tiny")]
ZOO += [("timm", "resnet18", 64, {}), ("timm", "efficientnet_b0", 64, {})]
TRANSFORMERS = [("torchvision", "vit_b_16", 224, {}), ("torchvision", "swin_t", 224, {})]
TRANSFORMERS += [("timm", n, r, kw) for n, r, kw in (
    ("vit_tiny_patch16_224", 224, {}), ("deit_tiny_patch16_224", 224, {}),
    ("vit_small_patch16_224", 224, {"reg_tokens": 4}), ("convnext_atto", 64, {}),
    ("swin_tiny_patch4_window7_224", 224, {}), ("eva02_tiny_patch14_224", 224, {"num_classes": 10}),
    ("beit_base_patch16_224", 224, {}), ("mobilevit_xxs", 256, {}), ("levit_128s", 224, {}),
    ("efficientformer_l1", 224, {}))]
TRANSFORMERS += [("user", "TinyViT", 16, {})]
ZOO += TRANSFORMERS
RESULTS = Path(__file__).resolve().parent / "results"


def build(source: str, name: str, kwargs: dict) -> torch.nn.Module:
    """Random weights; zero-initialised tensors (torchvision ViT's head) made random so the property can fail."""
    if source == "torchvision":
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    elif source == "timm":
        model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        model = TinyViT(**kwargs)
    return non_degenerate(model)


def main() -> None:
    rows = []
    for source, name, resolution, kwargs in ZOO:
        torch.manual_seed(0)
        start = time.perf_counter()
        result = permutation_invariance(build(source, name, kwargs), torch.randn(2, 3, resolution, resolution))
        rows.append({"model": f"{source}:{name}", **result, "seconds": time.perf_counter() - start})
        print(f"{source}:{name}: {rows[-1]}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "zoo_coverage.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    lines = ["| model | groups | parameters in groups | output change after random permutation | ops without a rule |",
             "|---|---|---|---|---|"]
    for r in rows:
        stops = "; ".join(r["unsupported"]) or "none"
        lines.append(f"| {r['model']} | {r['free_groups']} | {r['coverage']:.2%} | {r['relative_diff']:.1e} | "
                     f"{stops} |")
    (RESULTS / "zoo_coverage.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
