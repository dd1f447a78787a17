"""The Python API's choices: labels, methods, budgets."""

import pytest
import torch

import pleascc
from pleascc.demo import digits_cnn


def _pair(classes_b: int = 5):
    torch.manual_seed(0)
    a = digits_cnn(5, width=8).eval()
    torch.manual_seed(1)
    return a, digits_cnn(classes_b, width=8).eval()


def test_heads_of_different_sizes_default_to_separate_labels():
    a, b = _pair(classes_b=3)
    x = torch.randn(200, 1, 8, 8)
    result = pleascc.merge(a, b, x, progress=False)
    assert result.report["separate"]
    out_a, out_b = result.model(x[:4])
    assert out_a.shape == (4, 5) and out_b.shape == (4, 3)
    with pytest.raises(pleascc.PleasccError, match="--labels separate"):
        pleascc.merge(a, b, x, labels="shared", progress=False)


def test_shared_labels_give_one_head_fit_to_the_mean_logits():
    a, b = _pair()
    x = torch.randn(200, 1, 8, 8)
    result = pleascc.merge(a, b, x, budget=2.0, labels="shared", progress=False)
    with torch.no_grad():
        want = (a(x) + b(x)) / 2
        assert (result.model(x) - want).abs().max() / want.abs().max() < 1e-4


@pytest.mark.parametrize("bad", [dict(budget=0.5), dict(budget=2.5), dict(method="zipit"), dict(labels="both")])
def test_bad_settings_are_one_line_errors(bad):
    a, b = _pair()
    with pytest.raises(pleascc.PleasccError):
        pleascc.merge(a, b, torch.randn(100, 1, 8, 8), progress=False, **bad)
