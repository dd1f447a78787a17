"""The analysis' property: permuting every free group at random leaves the output unchanged."""

import pytest
import torch
import torchvision
from zoo_coverage import TRANSFORMERS, ZOO, build

from pleascc.trace import trace
from pleascc.verify import non_degenerate, permutation_invariance

pytestmark = pytest.mark.slow  # every architecture of the zoo

CNNS = [z for z in ZOO if z not in TRANSFORMERS]  # transformers: tests/test_transformers.py


@pytest.mark.parametrize("source,name,resolution,kwargs", CNNS, ids=[f"{z[0]}-{z[1]}" for z in CNNS])
def test_random_permutation_leaves_output_unchanged(source, name, resolution, kwargs):
    torch.manual_seed(0)
    model = build(source, name, kwargs)
    for m in model.modules():  # non-trivial norm statistics, so a wrong group would show
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    result = permutation_invariance(model, torch.randn(2, 3, resolution, resolution))
    assert result["relative_diff"] < 1e-4
    assert result["free_groups"] > 0
    assert result["coverage"] > 0.99
    assert result["unsupported"] == []


OPENED = ["convit_tiny", "efficientvit_b0", "edgenext_xx_small", "efficientvit_m0", "cpubone_nano", "mobilevitv2_050",
          "xcit_nano_12_p8_224", "tiny_vit_5m_224", "nf_regnet_b0", "lowformer_b0"]


@pytest.mark.parametrize("name", OPENED)
def test_opened_timm_leaves_compute_the_same_and_stay_permutable(name):
    """Leaves fx cannot trace, replaced by equivalents (trace.OPENERS): same outputs, every op with a rule."""
    import timm

    torch.manual_seed(0)
    model = non_degenerate(timm.create_model(name, num_classes=10))  # timm zeroes attention biases
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        assert torch.allclose(trace(model)(x), model(x), atol=1e-5)
    result = permutation_invariance(model, x)
    assert result["unsupported"] == [] and result["relative_diff"] < 1e-4


def test_weight_standardized_convs_count_in_the_budget_and_keep_their_input_width():
    """NFNet's convs re-standardize their filters: never widened on the input side, so a self-merge is exact."""
    import timm

    import pleascc

    torch.manual_seed(0)
    model = non_degenerate(timm.create_model("test_nfnet", num_classes=10))
    x = torch.randn(8, *model.pretrained_cfg["input_size"])
    result = pleascc.merge(model, model, x, method="permute", budget=1.5, reset_bn=False, progress=False)
    assert result.report["relative_flops"] <= 1.5
    with torch.no_grad():
        assert (result.model(x) - model(x)).abs().max() < 1e-4 * model(x).abs().max()


def test_a_wrong_group_is_caught(monkeypatch):
    """The property has teeth: pleascc's own check flags a deliberately broken rule, a BatchNorm whose parameters
    it leaves out of its channels' group (so permuting the channels leaves them in place)."""
    import torch.nn as nn

    from pleascc.passes.groups.registry import RULES

    def broken_batch_norm(ctx, node):
        dims = ctx.dims_of(node.args[0])
        apart = ctx.table.new(ctx.module(node).num_features)
        for name in ("weight", "bias", "running_mean", "running_var"):
            ctx.bind(f"{node.target}.{name}", [apart])
        return dims

    model = non_degenerate(torchvision.models.resnet18(weights=None).eval())
    x = torch.randn(2, 3, 64, 64)
    assert permutation_invariance(model, x)["relative_diff"] < 1e-6
    monkeypatch.setitem(RULES, nn.BatchNorm2d, broken_batch_norm)
    assert permutation_invariance(model, x)["relative_diff"] > 1e-3
