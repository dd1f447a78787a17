"""Merges whose answer is known, checked end to end through ONNX Runtime.

- a model merged with itself at budget 1.0 is the model;
- a model merged with a randomly permuted copy of itself at budget 1.0 is the model;
- two models at budget 2.0 with separate labels are the two models side by side.
"""


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from conftest import healthy, predict_through_onnx, relative_error
from resnet20 import resnet20

import pleascc
from pleascc.demo import digits_cnn
from pleascc.verify import permuted_copy

pytestmark = pytest.mark.slow  # exact merges of whole models through ONNX Runtime


class TinyMix(nn.Module):
    """Concatenation, grouped conv, chunk gating, channel padding and flatten→Linear in one net."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.left, self.right = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.gate = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.bn(torch.cat([self.left(x), self.right(x)], dim=1)))
        a, b = self.grouped(x).chunk(2, dim=1)
        y = self.gate(a) * torch.sigmoid(b)
        y = F.pad(y, (0, 0, 0, 0, 4, 4)) + x
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 4), 1))


MODELS = {
    "resnet20-optionA": (lambda: resnet20(), (3, 32, 32), 300),
    "resnet20-optionB-w2": (lambda: resnet20(width=2, shortcut="B"), (3, 32, 32), 300),
    "tinymix": (TinyMix, (3, 16, 16), 400),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (3, 32, 32), 1100),
    "digits_cnn": (digits_cnn, (1, 8, 8), 300),
}


# Sequential least squares (the default) runs a pass per level of layers; on the three deepest nets the one-pass
# variant keeps the suite short. The other nets cover the sequential path through the same emit code.
ONE_PASS = {"resnet20-optionA", "resnet20-optionB-w2", "mobilenet_v3_small"}


def _variant(name: str) -> str:
    return "one-pass" if name in ONE_PASS else "sequential"


def _setup(name, seed=0):
    factory, shape, n = MODELS[name]
    torch.manual_seed(seed)
    x = torch.randn(n, *shape)
    return healthy(factory(), x[:256], seed), x, torch.randn(64, *shape)


@pytest.mark.parametrize("name", list(MODELS))
def test_self_and_permuted_copy_merge_reproduce_the_model(name, tmp_path):
    model, x, x_test = _setup(name)
    twin = permuted_copy(model, x)
    with torch.no_grad():
        want = model(x_test)
        assert (twin(x_test) - want).abs().max() / want.abs().max() < 1e-5  # the copy is the same function
    for other in (model, twin):
        result = pleascc.merge(model, other, x, budget=1.0, least_squares=_variant(name), progress=False)
        assert result.report["relative_flops"] == pytest.approx(1.0)
        (got,) = predict_through_onnx(result.model, x_test, tmp_path)
        assert relative_error(got, want) < 1e-4


@pytest.mark.parametrize("name", list(MODELS))
def test_budget_two_with_separate_labels_is_the_two_models_side_by_side(name, tmp_path):
    model_a, x, x_test = _setup(name, seed=0)
    model_b, _, _ = _setup(name, seed=1)
    result = pleascc.merge(model_a, model_b, x, budget=2.0, labels="separate", least_squares=_variant(name),
                           progress=False)
    assert result.report["relative_flops"] == pytest.approx(2.0)
    got_a, got_b = predict_through_onnx(result.model, x_test, tmp_path)
    with torch.no_grad():
        assert relative_error(got_a, model_a(x_test)) < 1e-4
        assert relative_error(got_b, model_b(x_test)) < 1e-4


@pytest.mark.parametrize("method", ["average", "permute", "zipit"])
def test_baselines_are_exact_on_a_permuted_copy_only_when_they_match(method, tmp_path):
    """Averaging ignores permutations; activation matching and zipping undo them."""
    model, x, x_test = _setup("resnet20-optionA")
    twin = permuted_copy(model, x)
    result = pleascc.merge(model, twin, x, budget=1.0, method=method, reset_bn=False, progress=False)
    with torch.no_grad():
        diff = relative_error(result.model(x_test).numpy(), model(x_test))
    assert (diff < 1e-4) == (method != "average")



def test_weight_matching_undoes_a_permutation_without_data(tmp_path):
    """Git Re-Basin's weight matching finds a permuted copy's permutation from the weights alone."""
    model, x, x_test = _setup("resnet20-optionA")
    twin = permuted_copy(model, x)
    result = pleascc.merge(model, twin, x[:8], method="permute", matching="weight", reset_bn=False, progress=False)
    (got,) = predict_through_onnx(result.model, x_test, tmp_path)
    with torch.no_grad():
        assert relative_error(got, model(x_test)) < 1e-4
    assert "matching_statistics" not in result.report["timings_s"]
