"""The analysis' property: permuting every free group at random leaves the output unchanged."""

import pytest
import timm
import torch
import torchvision

from pleascc.verify import permutation_invariance

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
               "densenet121", "vgg11_bn", "squeezenet1_1", "convnext_tiny"]
TIMM = ["resnet18", "efficientnet_b0"]


def build(source: str, name: str) -> torch.nn.Module:
    if source == "torchvision":
        return torchvision.models.get_model(name, weights=None)
    return timm.create_model(name, pretrained=False)


@pytest.mark.parametrize("source,name", [("torchvision", n) for n in TORCHVISION] + [("timm", n) for n in TIMM])
def test_random_permutation_leaves_output_unchanged(source, name):
    torch.manual_seed(0)
    model = build(source, name).eval()
    for m in model.modules():  # non-trivial norm statistics, so a wrong group would show
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    result = permutation_invariance(model, torch.randn(2, 3, 64, 64))
    assert result["relative_diff"] < 1e-4
    assert result["free_groups"] > 0
    assert result["coverage"] > 0.99
    assert result["unsupported"] == []


def test_a_wrong_group_is_caught():
    """The property has teeth: permuting one weight alone changes the output."""
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        w = model.layer1[0].conv1.weight
        w.copy_(w[torch.randperm(w.shape[0])])
        assert (model(x) - before).abs().max() > 1e-3
