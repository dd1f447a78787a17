"""Transformers: the permutation property on the zoo, and exact merges of small configurations through ONNX."""

import pytest
import timm
import torch
import torchvision
from conftest import predict_through_onnx, relative_error
from tiny_vit import TinyViT
from vit_cifar import vit_cifar
from zoo_coverage import TRANSFORMERS, build

import pleascc
from pleascc.verify import non_degenerate, permutation_invariance, permuted_copy

pytestmark = pytest.mark.slow  # the transformer zoo and its exact merges


@pytest.mark.parametrize("source,name,resolution,kwargs", TRANSFORMERS, ids=[z[1] for z in TRANSFORMERS])
def test_random_permutation_leaves_transformers_unchanged(source, name, resolution, kwargs):
    torch.manual_seed(0)
    model = build(source, name, kwargs)
    result = permutation_invariance(model, torch.randn(2, 3, resolution, resolution))
    assert result["relative_diff"] < 1e-4
    assert result["unsupported"] == []
    assert result["coverage"] > 0.99  # attention, MLP and residual groups are all permutable
    assert result["free_groups"] > 0


SMALL = {  # factory, input shape, calibration samples
    "user-vit": (TinyViT, (3, 16, 16), 200),
    "timm-vit": (lambda: vit_cifar(num_classes=10, dim=32, depth=2, heads=2), (3, 32, 32), 200),
    "torchvision-vit": (lambda: torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10),
        (3, 32, 32), 200),
    "torchvision-swin": (lambda: torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10),
        (3, 32, 32), 200),
    "timm-swin": (lambda: timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=10),
        (3, 32, 32), 200),
    "timm-eva": (lambda: timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=2, num_classes=10),
                 (3, 28, 28), 200),
    "timm-mobilevit": (lambda: timm.create_model("mobilevit_xxs", num_classes=10), (3, 64, 64), 400),
}


ONE_PASS = {"timm-mobilevit"}  # its many levels of conv layers make sequential least squares slow for the suite


def _small(name: str, seed: int):
    factory, shape, n = SMALL[name]
    torch.manual_seed(seed)
    return non_degenerate(factory()), torch.randn(n, *shape), torch.randn(16, *shape)


@pytest.mark.parametrize("name", list(SMALL))
def test_transformer_merges_that_must_be_exact(name, tmp_path):
    """Self-merge and permuted-copy merge at 1.0 are the model; 2.0 with separate labels is A and B side by side."""
    model, x, x_test = _small(name, 0)
    variant = "one-pass" if name in ONE_PASS else "sequential"
    twin = permuted_copy(model, x)
    with torch.no_grad():
        want = model(x_test)
    for other in (model, twin):
        result = pleascc.merge(model, other, x, budget=1.0, least_squares=variant, progress=False)
        assert result.report["relative_flops"] == pytest.approx(1.0)
        (got,) = predict_through_onnx(result.model, x_test, tmp_path)
        assert relative_error(got, want) < 1e-4
    model_b, _, _ = _small(name, 1)
    result = pleascc.merge(model, model_b, x, budget=2.0, labels="separate", least_squares=variant, progress=False)
    assert result.report["relative_flops"] == pytest.approx(2.0)
    got_a, got_b = predict_through_onnx(result.model, x_test, tmp_path)
    with torch.no_grad():
        assert relative_error(got_a, want) < 1e-4
        assert relative_error(got_b, model_b(x_test)) < 1e-4


def test_head_widths_change_by_whole_heads():
    """Between 1.0 and 2.0 the head dim keeps its width; the number of heads grows."""
    model, x, _ = _small("timm-vit", 0)
    other, _, _ = _small("timm-vit", 1)
    result = pleascc.merge(model, other, x, budget=1.5, labels="separate", progress=False)
    rows: dict[str, int] = {}
    for name, m in result.model.named_modules():
        if isinstance(m, torch.nn.Linear) and "qkv" in name:  # in place, or split into blocks
            layer = name.replace(".", "_").split("_block")[0]
            rows[layer] = rows.get(layer, 0) + m.out_features
    assert rows and all(n % (3 * 16) == 0 for n in rows.values())  # q, k, v × whole heads of 16
    kept = [g for g in result.report["groups"] if g["group"] in result.analysis.table.keep_width]
    assert kept and all(g["width"] == g["size"] == 16 for g in kept)
    assert 1.0 < result.report["relative_flops"] <= 1.5 + 1e-9
    with torch.no_grad():
        a, b = result.model(x[:4])
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
