"""Budgets below 1.0: matched pairs merged further into clusters (merge and compress), and one model compressed."""

import pytest
import torch
import torch.nn as nn
from conftest import ARCH, cli_error, predict_through_onnx, raises, relative_error

import pleascc
from pleascc.cli import main
from pleascc.passes import budget as budget_pass
from pleascc.passes.groups import analyze
from pleascc.passes.match import identity
from pleascc.trace import trace
from pleascc.verify import permuted_copy

torch.manual_seed(0)


def _duplicate_rows(layer: nn.Module, half: int) -> None:
    """Units half… of ``layer``'s output copy units 0…half-1 (weights, bias, a norm's running statistics)."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(layer, name, None)
        if t is not None:
            t.data[half:] = t.data[:half]


def duplicated_mlp() -> nn.Module:
    """An MLP whose two hidden spaces each hold every unit twice: half its units carry its whole function."""
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
    for layer in (model[0], model[2]):
        _duplicate_rows(layer, 6)
    return model.eval()


def duplicated_cnn() -> nn.Module:
    """Two convolutions with BatchNorm whose channels come in identical pairs, then a linear head (tanh: a
    channel ReLU kept at zero would be constant, as similar to every unit as to its copy)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Tanh(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Tanh(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    for norm in (model[1], model[4]):
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-0.5, 0.5)
    for layer in model[:5]:
        if isinstance(layer, (nn.Conv2d, nn.BatchNorm2d)):
            _duplicate_rows(layer, 4)
    return model.eval()


def halved_budget(model: nn.Module, x: torch.Tensor) -> float:
    """One model's FLOPs with every free space at half its units, as a share of its own."""
    analysis = analyze(trace(model), (x[:2],))
    costs = budget_pass.layer_costs(analysis, set())
    matchings = {root: identity(torch.eye(analysis.root_size(root))) for root in analysis.free_roots()}
    widths = {root: m.n // 2 for root, m in matchings.items()}
    return budget_pass.relative_flops(analysis, costs, widths, matchings)


CASES = {"mlp": (duplicated_mlp, lambda n: torch.randn(n, 8)),
         "cnn": (duplicated_cnn, lambda n: torch.randn(n, 3, 8, 8))}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("method", ["pleas", "permute", "zipit"])
def test_duplicated_units_merge_away_exactly(name, method, tmp_path):
    """At the budget of half the units, a model merged with itself, or with a permuted copy, computes what it
    did: the duplicates are the most similar units, so they merge first, and a merged input column sums both."""
    build, inputs = CASES[name]
    model, x, x_test = build(), inputs(256), inputs(16)
    budget = halved_budget(model, x)
    assert budget < 0.6
    with torch.no_grad():
        want = model(x_test)
    for other in (model, permuted_copy(model, x)):
        result = pleascc.merge(model, other, x, budget=budget, method=method, reset_bn=False if method != "pleas"
                               else None, progress=False)
        assert result.report["relative_flops"] == pytest.approx(budget)
        assert all(g["width"] == g["size"] // 2 for g in result.report["groups"])
        (got,) = predict_through_onnx(result.model, x_test, tmp_path)
        assert relative_error(got, want) < 1e-4


def test_two_models_merged_below_one_keep_within_the_budget(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    from resnet20 import resnet20

    a = resnet20(num_classes=10).eval()
    torch.manual_seed(1)
    b = resnet20(num_classes=10).eval()
    x = torch.randn(128, 3, 32, 32)
    for budget, search, step in ((0.5, "greedy", 0.02), (0.75, "uniform", 0.1), (0.5, "stages", 0.1)):
        result = pleascc.merge(a, b, x, budget=budget, width_search=search, progress=False)
        # greedy steps one space by a unit; the others every space at once, by a unit of the narrowest (16)
        assert budget - step < result.report["relative_flops"] <= budget
        assert any(g["width"] < g["size"] for g in result.report["groups"])
    (got,) = predict_through_onnx(result.model, x[:8], tmp_path)
    with torch.no_grad():
        assert relative_error(got, result.model(x[:8])) < 1e-4


def test_a_budget_below_what_merging_reaches_names_the_least():
    model, x = duplicated_mlp(), torch.randn(64, 8)
    message = raises("below the", pleascc.merge, model, model, x, budget=0.01, progress=False)
    assert "pass --budget" in message


def test_one_checkpoint_is_compressed_alone(files, tmp_path, capsys):
    out = tmp_path / "small.onnx"
    assert main(["merge", files["a"], *ARCH, "--data", files["calib"], "--budget", "0.5", "-o", str(out),
                 "--no-progress"]) == 0
    assert "budget 0.5: 0.4" in capsys.readouterr().out
    assert "one checkpoint is compressed" in cli_error(capsys, ["merge", files["a"], *ARCH, "--data",
                                                               files["calib"], "--budget", "1.5", "-o", str(out)])


def test_pruning_drops_the_units_of_least_l1_norm(tmp_path):
    """L1-norm pruning (the baseline): units no weight writes are the first dropped, and the model is unchanged."""
    model = duplicated_mlp()
    for layer in (model[0], model[2]):
        layer.weight.data[6:] = 0
        layer.bias.data[6:] = 0
    x = torch.randn(64, 8)
    budget = halved_budget(model, x)
    result = pleascc.merge(model, model, x, budget=budget, method="prune", width_search="uniform", progress=False)
    assert result.report["relative_flops"] == pytest.approx(budget)
    (got,) = predict_through_onnx(result.model, x[:16], tmp_path)
    with torch.no_grad():
        assert relative_error(got, model(x[:16])) < 1e-5


def test_attention_heads_and_head_dims_keep_their_width_below_one(tmp_path):
    """A merged unit stands for a cluster; a merged head could not stand for several heads' dims, so below 1.0
    a transformer narrows its residual stream and MLPs only, and still computes what its export does."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    from vit_cifar import vit_cifar

    torch.manual_seed(0)
    a = vit_cifar(num_classes=5, dim=64, depth=2, heads=4).eval()
    x = torch.randn(64, 3, 32, 32)
    result = pleascc.merge(a, permuted_copy(a, x), x, budget=0.6, progress=False)
    analysis = analyze(trace(a), (x[:2],))
    attention = {atom.id for dims in analysis.products for dim in dims for atom in analysis.table.atoms(dim)}
    widths = {g["group"]: (g["size"], g["width"]) for g in result.report["groups"]}
    assert attention and all(widths[root][0] == widths[root][1] for root in attention if root in widths)
    assert result.report["relative_flops"] <= 0.6 and any(w < n for n, w in widths.values())
    (got,) = predict_through_onnx(result.model, x[:8], tmp_path)
    with torch.no_grad():
        assert relative_error(got, result.model(x[:8])) < 1e-4
