"""More than two models: a model with permuted copies merges back to it, N models at budget N are side by side,
through ONNX Runtime, for a CNN and transformers; and what N-way merging refuses."""

import json

import pytest
import torch
from conftest import ARCH, predict_through_onnx, raises, relative_error
from test_hf import _first, _model

import pleascc
from pleascc.cli import main
from pleascc.demo import digits_cnn
from pleascc.export import onnx_predict
from pleascc.passes.aligned_matching import tuples_of
from pleascc.passes.match import zip_units
from pleascc.verify import permuted_copy

pytest.importorskip("transformers")


def _digits(seed: int = 0):
    torch.manual_seed(seed)
    return digits_cnn(5, width=8).eval(), lambda n: torch.randn(n, 1, 8, 8)


def _factory(name: str):
    return _digits if name == "digits_cnn" else lambda seed=0: _model(name, seed)


@pytest.mark.parametrize("name, budget", [("digits_cnn", 1.0), ("llama-gqa", 1.0), ("vit", 1.0),
                                          ("digits_cnn", 2.0), ("vit", 1.6)])
def test_a_model_and_permuted_copies_merge_back_to_it(name, budget, tmp_path):
    """Each copy is aligned to the first (queries of each kv head apart in Llama's grouped-query attention,
    head dims of each head apart in ViT's), so at 1.0 the merge is the model; above 1.0, some of the copies'
    units are kept apart, each computing what A's does."""
    model, inputs = _factory(name)()
    torch.manual_seed(0)
    x, x_test = inputs(300 if name == "digits_cnn" else 64), inputs(8)
    copies = [model, permuted_copy(model, x, seed=3), permuted_copy(model, x, seed=4)]
    result = pleascc.merge(copies, x, budget=budget, progress=False)
    assert result.report["models"] == 3 and budget - 0.1 < result.report["relative_flops"] <= budget + 1e-9
    assert (budget > 1.0) == any(g["width"] > g["size"] for g in result.report["groups"])
    (got,) = predict_through_onnx(result.model, x_test, tmp_path)
    with torch.no_grad():
        assert relative_error(got, _first(model(x_test))) < 1e-4


def _digits_heads(seed: int):
    torch.manual_seed(seed)
    return digits_cnn(3 + seed, width=8).eval(), None


@pytest.mark.parametrize("name", ["digits_cnn", "bert"])
def test_n_models_at_budget_n_are_side_by_side(name, tmp_path):
    """The digits CNNs' heads have 3, 4 and 5 classes: each model keeps its own."""
    models = [(_digits_heads if name == "digits_cnn" else _factory(name))(seed)[0] for seed in range(3)]
    inputs = _factory(name)()[1]
    torch.manual_seed(0)
    x, x_test = inputs(300 if name == "digits_cnn" else 64), inputs(8)
    result = pleascc.merge(models, x, budget=3.0, labels="separate", progress=False)
    assert result.report["relative_flops"] == pytest.approx(3.0)
    outputs = predict_through_onnx(result.model, x_test, tmp_path)
    assert len(outputs) == 3
    with torch.no_grad():
        for got, model in zip(outputs, models):
            assert relative_error(got, _first(model(x_test))) < 1e-4


def test_grouped_query_heads_pair_their_queries_per_kv_head():
    """Two models: a copy whose queries are ordered differently in each kv head merges back exactly."""
    model, inputs = _model("llama-gqa")
    torch.manual_seed(0)
    x, x_test = inputs(64), inputs(8)
    twin = permuted_copy(model, x, seed=3)  # kv head 0's queries in place, kv head 1's swapped
    result = pleascc.merge(model, twin, x, progress=False)
    with torch.no_grad():
        want = _first(model(x_test))
        assert (result.model(x_test) - want).norm() / want.norm() < 1e-5


@pytest.mark.parametrize("name, method, budget", [("digits_cnn", "pleas", 0.5), ("digits_cnn", "pleas", 2.0),
                                                  ("vit", "pleas", 2.0), ("digits_cnn", "zipit", 0.5),
                                                  ("digits_cnn", "zipit", 1.0), ("digits_cnn", "zipit", 2.0)])
def test_three_models_merge_into_any_budget(name, method, budget, tmp_path):
    """Below 1.0 the tuples of aligned units merge into clusters, above it their members least correlated with A's
    unit are kept apart (in a ViT, heads and the residual stream's units, whose norms average the models feeding
    each); ZipIt! zips all three models' units at once: the merged model costs the budget (within a step of the
    width search) and runs through ONNX Runtime."""
    models = [_factory(name)(seed)[0] for seed in range(3)]
    torch.manual_seed(0)
    x, x_test = _factory(name)()[1](300 if name == "digits_cnn" else 64), _factory(name)()[1](8)
    result = pleascc.merge(models, x, budget=budget, method=method, progress=False)
    assert budget - 0.1 < result.report["relative_flops"] <= budget + 1e-9
    assert all(g["width"] <= g["size"] if budget < 1 else g["width"] >= g["size"] for g in result.report["groups"])
    (got,) = predict_through_onnx(result.model, x_test, tmp_path)
    with torch.no_grad():
        assert relative_error(got, _first(result.model(x_test))) < 1e-4


def test_tuples_keep_apart_the_members_least_correlated_with_their_a_unit():
    """Three aligned models, four tuples: each unit wider keeps one member apart, the least correlated first, so a
    tuple becomes a cluster of 2 units and then of 1; a selection row is a cluster, and the cost model counts which
    models feed each."""
    correlations = torch.tensor([[0.9, 0.2, 0.8, 0.7],    # model 1's member of A's units 0 … 3
                                 [0.6, 0.5, 0.1, 0.95]],  # model 2's
                                dtype=torch.float64)
    m = tuples_of(correlations)
    assert len(m.corr) == 8  # a member each: the width search's steps

    def clusters(width: int) -> list[set]:
        rows = torch.stack(m.selections(width), 1)  # width × models × units
        return [{(model, unit) for model, unit in row.nonzero().tolist()} for row in rows]

    assert clusters(4) == [{(0, u), (1, u), (2, u)} for u in range(4)]
    assert clusters(5)[2] == {(0, 2), (1, 2)} and clusters(5)[4] == {(2, 2)}  # 0.1: model 2 leaves unit 2's tuple
    assert clusters(6)[1] == {(0, 1), (2, 1)} and clusters(6)[4] == {(1, 1)}  # 0.2: model 1 leaves unit 1's
    assert m.fed_by(6) == {0b111: 2, 0b101: 1, 0b011: 1, 0b010: 1, 0b100: 1}
    assert clusters(12) == [{(model, u)} for model in range(3) for u in range(4)]
    assert m.fed_by(12) == {0b001: 4, 0b010: 4, 0b100: 4}


def test_zipit_zips_three_transformers(tmp_path):
    """ZipIt!'s joint pass over three ViTs gathers only the joint correlations (heads are aligned pair by pair)."""
    models = [_model("vit", seed)[0] for seed in range(3)]
    torch.manual_seed(0)
    x = _model("vit")[1](72)
    result = pleascc.merge(models, x[:64], budget=1.5, method="zipit", progress=False)
    assert 1.4 < result.report["relative_flops"] <= 1.5 + 1e-9
    (got,) = predict_through_onnx(result.model, x[64:], tmp_path)
    with torch.no_grad():
        assert relative_error(got, _first(result.model(x[64:]))) < 1e-4


def test_regmean_merges_three_models_as_it_merges_two(tmp_path):
    """RegMean's closed form sums every model's Grams: three copies of one model merge back to it, and three
    models merge through ONNX Runtime (RegMean does not permute: for models from one base)."""
    model = _digits(0)[0]
    torch.manual_seed(0)
    x, x_test = torch.randn(300, 1, 8, 8), torch.randn(8, 1, 8, 8)
    result = pleascc.merge([model, model, model], x, method="regmean", progress=False)
    with torch.no_grad():
        assert relative_error(result.model(x_test).numpy(), model(x_test)) < 1e-5
    models = [_digits(seed)[0] for seed in range(3)]
    result = pleascc.merge(models, x, method="regmean", progress=False)
    (got,) = predict_through_onnx(result.model, x_test, tmp_path)
    with torch.no_grad():
        assert result.report["relative_flops"] == pytest.approx(1.0)
        assert relative_error(got, result.model(x_test)) < 1e-4


def test_zipping_three_models_reaches_every_width():
    """ZipIt!'s cap on merges inside one model closes similarities, and a merged cluster's are the least of its
    parts': with three models that can leave no merge allowed before the width is reached (here at width 6 of
    random units), and the cap is then lifted."""
    torch.manual_seed(0)
    joint = torch.corrcoef(torch.randn(50, 18).T)
    for width in range(6, 19):
        clusters, values = zip_units(joint, width, models=3)
        assert len(clusters) == width and sorted(u for c in clusters for u in c) == list(range(18))
        assert len(values) == 18 - width and all(v > -1 for v in values)


@pytest.mark.parametrize("options, expected", [
    ({"method": "prune"}, "--method prune merges two models; 3 models merge with pleas, permute, average, zipit, "
                          "regmean"),
    ({"method": "zipit", "zip_alpha": 0.0}, "--zip-alpha 0 zips pairs only, and 3 models need clusters of more"),
    ({"budget": 3.5}, "budget 3.5 is above 3.0: 3 models side by side are 3.0"),
    ({"method": "average", "budget": 2.0}, "average merges 3 models at budget 1.0 or 3 (side by side), not 2: "
                                           "other budgets choose which units to merge by matching"),
    ({"method": "regmean", "budget": 0.5}, "regmean merges 3 models at budget 1.0 or 3 (side by side), not 0.5"),
])
def test_what_n_way_merging_refuses_is_named(options, expected):
    models = [_digits(seed)[0] for seed in range(3)]
    raises(expected, pleascc.merge, models, torch.randn(100, 1, 8, 8), progress=False, **options)


def test_one_model_or_two_side_by_side_past_two_are_refused():
    a, b = _digits(0)[0], _digits(1)[0]
    x = torch.randn(100, 1, 8, 8)
    raises("merge takes 2 or more models, not 1", pleascc.merge, [a], x)
    raises("budget 2.5 is above 2.0: two models side by side are 2.0", pleascc.merge, a, b, x, budget=2.5)


def test_three_checkpoints_merge_from_the_command_line(files, tmp_path):
    torch.manual_seed(2)
    third = tmp_path / "c.pt"
    torch.save(digits_cnn(num_classes=5, width=8).state_dict(), third)
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    assert main(["merge", files["a"], files["b"], str(third), *ARCH, "--data", files["calib"], "--budget", "3",
                 "--labels", "separate", "-o", str(out), "--report", str(report), "--no-progress"]) == 0
    assert json.loads(report.read_text())["onnx"]["outputs"] == ["logits_0", "logits_1", "logits_2"]
    assert len(onnx_predict(str(out), torch.randn(2, 1, 8, 8))) == 3


def _mac_count(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the linear layers a model runs, counted by PyTorch as it runs them."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("models, budget", [(3, 1.5), (3, 2.0), (3, 2.6), (4, 1.25), (4, 3.0)])
def test_the_merged_model_runs_the_flops_the_budget_counted(models, budget):
    """The width search's cost model against the emitted graph: the merged MLP's multiply-accumulates, counted as
    it runs, are the report's share of one model's, whatever clusters the budget made."""
    def mlp(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.ReLU(), torch.nn.Linear(24, 24), torch.nn.ReLU(),
                                   torch.nn.Linear(24, 3)).eval()

    nets = [mlp(seed) for seed in range(models)]
    torch.manual_seed(0)
    x = torch.randn(400, 6)
    result = pleascc.merge(nets, x, budget=budget, progress=False)
    counted = _mac_count(result.model, x[:8]) / _mac_count(nets[0], x[:8])
    assert counted == pytest.approx(result.report["relative_flops"], rel=1e-9)
    assert budget - 0.1 < counted <= budget + 1e-9
