"""The Python API's choices: labels, methods, budgets."""

import gc
import weakref

import numpy as np
import pytest
import torch

import pleascc
from pleascc import api, least_squares
from pleascc.demo import digits_cnn
from pleascc.passes import emit as emit_pass
from pleascc.passes import store
from pleascc.passes.batching import batch_count
from pleascc.passes.fused_norms import norm_producers
from pleascc.passes.solve import layer_levels
from pleascc.trace import trace


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


def test_batch_size_and_data_on_disk_do_not_change_the_merge(tmp_path):
    """Statistics are sums over samples: batches of 7 read from a .npy give the in-memory merge of batch 64."""
    a, b = _pair()
    x = torch.randn(200, 1, 8, 8)
    np.save(tmp_path / "x.npy", x.numpy())
    eager = pleascc.merge(a, b, x, budget=1.5, progress=False)
    lazy = pleascc.merge(a, b, str(tmp_path / "x.npy"), budget=1.5, batch_size=7, progress=False)
    assert eager.report["batch_size"] == 64 and lazy.report["batch_size"] == 7
    with torch.no_grad():
        for want, got in zip(eager.model(x[:8]), lazy.model(x[:8])):
            assert (want - got).abs().max() <= 1e-4 * want.abs().max()


def test_batch_size_shrinks_with_the_activations():
    """The default batch holds a fixed number of activation bytes: a 16× larger image, a smaller batch."""
    from pleascc.passes.groups import analyze
    from pleascc.passes.batching import MAX_BATCH, batch_size_for

    gm = trace(torchvision_resnet18())
    small, large = (batch_size_for(analyze(gm, (torch.randn(2, 3, size, size),)), gm.graph) for size in (32, 224))
    assert small == MAX_BATCH and 1 <= large < MAX_BATCH


def torchvision_resnet18():
    import torchvision

    return torchvision.models.resnet18(num_classes=10).eval()


def test_shared_labels_give_one_head_fit_to_the_mean_logits():
    a, b = _pair()
    x = torch.randn(200, 1, 8, 8)
    result = pleascc.merge(a, b, x, budget=2.0, labels="shared", progress=False)
    with torch.no_grad():
        want = (a(x) + b(x)) / 2
        assert (result.model(x) - want).abs().max() / want.abs().max() < 1e-4


@pytest.mark.parametrize("bad", [dict(budget=0.0), dict(budget=2.5), dict(method="zipper"), dict(labels="both"),
                                 dict(matching="weights"),
                                 dict(method="zipit", matching="weight"),
                                 dict(least_squares="twice"), dict(match_samples=0)])
def test_bad_settings_are_one_line_errors(bad):
    a, b = _pair()
    with pytest.raises(pleascc.PleasccError):
        pleascc.merge(a, b, torch.randn(100, 1, 8, 8), progress=False, **bad)


def test_matching_reads_only_the_first_match_samples():
    """Matching alone (permute) on the first 60 of 200 samples is the merge of those 60; least squares (pleas)
    still reads all 200, so cutting the rest changes its merge."""
    a, b = _pair()
    x = torch.randn(200, 1, 8, 8)

    def outputs(data, method, **kw):
        result = pleascc.merge(a, b, data, budget=1.5, method=method, labels="separate", least_squares="one-pass",
                               progress=False, **kw)
        with torch.no_grad():
            return result.report, torch.cat(result.model(x[:16]), 1)

    report, subset = outputs(x, "permute", match_samples=60, reset_bn=False)  # the reset would read all 200
    assert report["match_samples"] == 60 and report["samples"] == 200
    assert torch.equal(subset, outputs(x[:60], "permute", reset_bn=False)[1])
    fit_on_all = outputs(x, "pleas", match_samples=60)[1]
    assert not torch.allclose(fit_on_all, outputs(x[:60], "pleas")[1])


@pytest.mark.parametrize("cache_gb", [2.0, 2 * 2**-20 + 2**-12])  # the spill buffers, and 256 KB: most to disk
def test_sequential_passes_give_the_same_merge_kept_in_memory_or_on_disk(cache_gb, monkeypatch):
    """Blocks of merged and kept-apart units, separate heads: the same weights wherever the passes' values were
    kept (all in memory, or all on disk)."""
    monkeypatch.setattr(store, "QUEUED_BYTES", 2**10)  # the spill file's buffers, taken from --cache-gb
    monkeypatch.setattr(store, "AHEAD_BYTES", 2**10)
    a, b = _pair()
    x = torch.randn(300, 1, 8, 8)
    kept = pleascc.merge(a, b, x, budget=1.5, labels="separate", cache_gb=cache_gb, progress=False)
    spilled = pleascc.merge(a, b, x, budget=1.5, labels="separate", cache_gb=0, progress=False)
    assert kept.report["least_squares_memory_peak_mb"] > 0 and spilled.report["least_squares_memory_peak_mb"] == 0
    assert (kept.report["least_squares_spilled_mb"] > 0) == (cache_gb < 1)
    for (name, got), want in zip(kept.model.state_dict().items(), spilled.model.state_dict().values()):
        assert torch.equal(got, want), name


def test_each_passes_merged_model_is_freed_once_the_next_replaces_it(monkeypatch):
    """An emitted GraphModule is a reference cycle: without the collection after each pass, every level's
    weights would stay until Python's full collection (a ResNet-50 merge held gigabytes of them).  With the
    automatic collector off, at most the model being fitted and the one just emitted are alive, and the idle
    memory bound is checked after every batch."""
    a, b = _pair()
    x = torch.randn(300, 1, 8, 8)
    emitted, alive, checks = [], [], []

    def emit(*args):
        model = emit_pass.emit(*args)
        emitted.append(weakref.ref(model))
        alive.append(sum(ref() is not None for ref in emitted))
        return model

    monkeypatch.setattr(api, "emit", emit)
    monkeypatch.setattr(least_squares, "release_freed_memory", lambda: checks.append(1))
    gc.disable()
    try:
        result = pleascc.merge(a, b, x, batch_size=100, progress=False)
    finally:
        gc.enable()
    passes = result.report["least_squares_passes"]
    assert len(emitted) == passes + 1 > 3 and max(alive) <= 2  # a model per level, then the merged one
    assert len(checks) == passes * batch_count(len(x), 100)  # every batch of every level's pass


@pytest.mark.parametrize("budget", [1.0, 1.5])
def test_a_batch_norm_fitted_in_its_convolutions_pass_gets_the_fit_of_a_pass_of_its_own(budget, monkeypatch):
    """Each BatchNorm's moments follow from its convolution's (``fused_norms``): half the passes, the same
    merge up to rounding (1.5: blocks of merged and kept-apart units, each adding its channels)."""
    a, b = _pair()
    x = torch.randn(300, 1, 8, 8)
    fused = pleascc.merge(a, b, x, budget=budget, progress=False)
    monkeypatch.setattr(api, "norm_producers", lambda *args: {})
    apart = pleascc.merge(a, b, x, budget=budget, progress=False)
    assert 2 * fused.report["least_squares_passes"] - 1 == apart.report["least_squares_passes"]
    for name, residual in apart.report["least_squares_residuals"].items():
        assert fused.report["least_squares_residuals"][name] == pytest.approx(residual, rel=1e-4, abs=1e-12), name
    with torch.no_grad():
        for want, got in zip(apart.model(x[:50]), fused.model(x[:50])):
            assert (want - got).norm() <= 1e-5 * want.norm()


class _Returning(torch.nn.Module):
    """The demo network, returning its logits inside ``wrap``."""

    def __init__(self, wrap):
        super().__init__()
        self.net, self.wrap = digits_cnn(5, width=8), wrap

    def forward(self, x):
        return self.wrap(self.net(x))


def test_outputs_of_different_structure_are_an_error():
    a, b = _Returning(lambda y: y), _Returning(lambda y: {"logits": y})
    with pytest.raises(pleascc.PleasccError, match="differently structured outputs"):
        pleascc.merge(a, b, torch.randn(100, 1, 8, 8), progress=False)


def test_sequential_least_squares_fits_each_level_on_the_merged_models_own_features():
    """One pass per level; the last layer's residual is then the merged model's real output error.

    Fitting on the merged model's own features also beats fitting on the originals'.
    """
    a, b = _pair()
    x = torch.randn(300, 1, 8, 8)
    errors, reports = {}, {}
    for variant in ("one-pass", "sequential"):
        result = pleascc.merge(a, b, x, labels="shared", least_squares=variant, progress=False)
        with torch.no_grad():
            want = (a(x) + b(x)) / 2
            errors[variant] = float((result.model(x) - want).pow(2).sum() / want.pow(2).sum())
        reports[variant] = result.report
    levels = layer_levels(trace(a), result.analysis, norm_producers(result.analysis, set()))
    assert reports["one-pass"]["least_squares_passes"] == 0  # it reads what the matching pass recorded
    assert reports["sequential"]["least_squares_passes"] == len(set(levels.values())) > 1
    head = max(levels, key=levels.get)
    assert reports["sequential"]["least_squares_residuals"][head] == pytest.approx(errors["sequential"], rel=1e-3)
    assert errors["sequential"] < errors["one-pass"] / 2


@pytest.mark.parametrize("budget", [1.0, 1.5, 2.0])
def test_zipit_merges_within_and_across_models_at_any_budget(budget):
    """ZipIt!'s clusters may hold two units of one model; 2.0 is still the two models side by side."""
    a, b = _pair()
    x = torch.randn(300, 1, 8, 8)
    result = pleascc.merge(a, b, x, budget=budget, labels="separate", method="zipit", zip_beta=0.5, reset_bn=False,
                           progress=False)  # the models' own statistics: side by side is both models
    assert 1.0 <= result.report["relative_flops"] <= budget + 1e-3  # separate heads: two small heads
    with torch.no_grad():
        got_a, got_b = result.model(x[:50])
        if budget == 2.0:
            assert torch.allclose(got_a, a(x[:50]), atol=1e-4) and torch.allclose(got_b, b(x[:50]), atol=1e-4)
    assert torch.isfinite(got_a).all() and torch.isfinite(got_b).all()


def test_regmean_is_its_papers_closed_form():
    """Layer 2 of an MLP: W = (G_A + G_B)⁻¹ (G_A W_A + G_B W_B), G_m the Gram of model m's own hidden features."""
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval())
    x = torch.randn(500, 6)
    result = pleascc.merge(*nets, x, method="regmean", regmean_alpha=1.0, labels="shared", ridge=1e-9,
                           progress=False)
    grams, rhs = 0, 0
    with torch.no_grad():
        for net in nets:
            h = torch.cat([net[1](net[0](x)), torch.ones(len(x), 1)], dim=1).double()
            w = torch.cat([net[2].weight, net[2].bias[:, None]], dim=1).double()
            grams, rhs = grams + h.T @ h, rhs + h.T @ h @ w.T
    want = torch.linalg.solve(grams, rhs).T
    state = result.model.state_dict()
    average = (nets[0][0].weight + nets[1][0].weight) / 2  # layer 1's inputs are shared: RegMean averages
    order = torch.cdist(state["0.weight"], average).argmin(1)  # merged units come sorted by correlation
    assert torch.allclose(state["0.weight"], average[order], atol=1e-5)
    got = torch.cat([state["2.weight"], state["2.bias"][:, None]], dim=1).double()
    assert torch.allclose(got, want[:, torch.cat([order, torch.tensor([8])])], atol=1e-5)


@pytest.mark.parametrize("budget", [1.0, 2.0])
def test_regmean_self_merge_and_side_by_side_are_exact(budget):
    a, b = _pair()
    x = torch.randn(300, 1, 8, 8)
    other = a if budget == 1.0 else b
    result = pleascc.merge(a, other, x, budget=budget, labels="separate", method="regmean", progress=False)
    with torch.no_grad():
        got_a, got_b = result.model(x[:50])
        assert torch.allclose(got_a, a(x[:50]), atol=1e-4) and torch.allclose(got_b, other(x[:50]), atol=1e-4)


def test_zip_until_merges_the_first_stage_and_keeps_the_rest_apart():
    """ZipIt!'s partial zipping: stage 1 (8 channels) merged, stage 2 (16) kept apart; a wrong name is an error."""
    a, b = _pair()
    x = torch.randn(300, 1, 8, 8)
    result = pleascc.merge(a, b, x, labels="separate", method="zipit", zip_until="3.bn2", progress=False)
    widths = sorted((g["size"], g["width"]) for g in result.report["groups"])
    assert widths == [(8, 8), (8, 8), (16, 32), (16, 32)]
    assert 1.0 < result.report["relative_flops"] < 2.0
    assert result.report["width_search"] == "zip-until 3.bn2"
    whole_block = pleascc.merge(a, b, x, labels="separate", method="zipit", zip_until="3", progress=False)
    assert sorted((g["size"], g["width"]) for g in whole_block.report["groups"]) == widths  # cut after its last layer
    with pytest.raises(pleascc.PleasccError, match="no such layer"):
        pleascc.merge(a, b, x, method="zipit", zip_until="head", progress=False)
    with pytest.raises(pleascc.PleasccError, match="leave --budget at 1.0"):
        pleascc.merge(a, b, x, method="zipit", zip_until="3.bn2", budget=1.5, progress=False)


def test_reset_bn_recomputes_the_merged_batch_norm_statistics():
    """After the reset, each BatchNorm's running statistics are those of its inputs on the calibration data."""
    a, b = _pair()
    x = torch.randn(256, 1, 8, 8)
    result = pleascc.merge(a, b, x, method="permute", labels="separate", reset_bn=True, progress=False)
    model = result.model
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    handle = norm.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    features = seen[0].transpose(0, 1).flatten(1)
    assert torch.allclose(norm.running_mean, features.mean(1), atol=1e-4)
    assert torch.allclose(norm.running_var, features.var(1), rtol=1e-2)


def test_reset_bn_side_by_side_on_the_models_own_statistics_is_both_models():
    """The reset keeps the averaged γ and β (not a folded scale and shift, which a second normalization would
    distort): side by side (2.0), on the data the models' own statistics come from, it is both models exactly."""
    from pleascc.api import reset_batch_norm

    a, b = _pair()
    x = torch.randn(256, 1, 8, 8)
    for model in (a, b):
        reset_batch_norm(model, x, batch_size=64)
    result = pleascc.merge(a, b, x, method="permute", labels="separate", budget=2.0, reset_bn=True,
                           batch_size=64, progress=False)
    with torch.no_grad():
        for got, model in zip(result.model(x[:32]), (a, b)):
            want = model(x[:32])
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    with pytest.raises(pleascc.PleasccError, match="drop --reset-bn"):
        pleascc.merge(a, b, x, method="pleas", reset_bn=True, progress=False)


def _state(result) -> dict[str, torch.Tensor]:
    return result.model.state_dict()


@pytest.mark.parametrize("method", ["permute", "average", "zipit", "regmean"])
def test_the_baselines_that_refit_no_layer_reset_batch_norm_by_default(method):
    """permute, average and zipit are evaluated after the reset in their papers: it is their default, and
    ``reset_bn=False`` opts out; regmean keeps the averaged statistics unless asked."""
    a, b = _pair()
    x = torch.randn(128, 1, 8, 8)
    merges = {reset: pleascc.merge(a, b, x, method=method, labels="separate", reset_bn=reset, progress=False)
              for reset in (None, True, False)}
    default = True if method != "regmean" else False
    assert merges[None].report["reset_bn"] is default
    for name, value in _state(merges[None]).items():
        assert torch.equal(value, _state(merges[default])[name]), name
    assert not torch.equal(_state(merges[True])["1.running_var"], _state(merges[False])["1.running_var"])


def test_the_reset_leaves_a_model_without_batch_norm_as_it_is(monkeypatch):
    """No BatchNorm: the default reset is a no-op and costs no pass over the data."""
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval())
    x = torch.randn(100, 6)
    kept = pleascc.merge(*nets, x, method="permute", reset_bn=False, progress=False)
    monkeypatch.setattr(api, "batches", lambda *args, **kwargs: pytest.fail("a pass over the data"))
    reset = pleascc.merge(*nets, x, method="permute", progress=False)
    assert reset.report["reset_bn"]
    for name, value in _state(kept).items():
        assert torch.equal(value, _state(reset)[name]), name


def test_statistics_read_a_fixed_subset_of_positions():
    """Past ``positions`` spatial positions per sample, a fixed subset is read: the fit barely moves.

    Reading every position (None, or more than there are) gives the same merge.
    """
    from pleascc.passes.reads import sampled_positions

    assert sampled_positions(100, 100) is None and sampled_positions(100, None) is None
    keep = sampled_positions(100, 10)
    assert len(keep) == 10 and torch.equal(keep, keep.unique()) and 0 <= int(keep.min()) and int(keep.max()) < 100
    a, b = _pair()
    x = torch.randn(400, 1, 16, 16)
    merges = {p: pleascc.merge(a, b, x, labels="shared", positions=p, least_squares="one-pass", progress=False)
              for p in (None, 10_000, 32)}
    with torch.no_grad():
        want = (a(x) + b(x)) / 2
        errors = {p: float((m.model(x) - want).pow(2).sum() / want.pow(2).sum()) for p, m in merges.items()}
    assert errors[None] == errors[10_000] and merges[32].report["positions"] == 32
    assert errors[32] != errors[None] and errors[32] <= 1.2 * errors[None]


class _Tokens(torch.nn.Module):
    """A token MLP pooled over tokens: its linear layers read (samples, tokens, features)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = torch.nn.Linear(4, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))).mean(1))


@pytest.mark.parametrize("method", ["pleas", "regmean"])
def test_statistics_read_a_fixed_subset_of_tokens(method):
    """Linear layers on tokens are read at ``positions`` tokens per sample, like convolutions' positions."""
    torch.manual_seed(0)
    a, b = _Tokens().eval(), _Tokens().eval()
    x = torch.randn(300, 40, 4)
    merges = {p: pleascc.merge(a, b, x, labels="shared", positions=p, least_squares="one-pass", method=method,
                               progress=False) for p in (None, 40, 8)}
    with torch.no_grad():
        want = (a(x) + b(x)) / 2
        errors = {p: float((m.model(x) - want).pow(2).sum() / want.pow(2).sum()) for p, m in merges.items()}
    assert errors[None] == errors[40]
    assert errors[8] != errors[None] and errors[8] <= 1.2 * errors[None]


class _Embedded(torch.nn.Module):
    """Token ids, embedded, one linear layer, pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc, self.head = torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.embed(ids))).mean(1))


def test_by_default_images_are_read_at_64_positions_and_token_ids_at_every_token():
    from conftest import raises

    from pleascc.options import MergeOptions

    a, b = _pair()
    images = pleascc.merge(a, b, torch.randn(100, 1, 8, 8), method="permute", progress=False)
    torch.manual_seed(0)
    tokens = pleascc.merge(_Embedded(), _Embedded(), torch.randint(0, 10, (100, 6)), method="permute",
                           progress=False)
    assert images.report["positions"] == 64 and tokens.report["positions"] is None
    raises("is neither a count nor 'auto'", MergeOptions, positions="all")


def test_blocks_of_a_layer_read_one_shared_gram(monkeypatch):
    """A-only and B-only blocks take their Grams out of the layer's one Gram: the merge of separate Grams."""
    from pleascc.passes import stats

    a, b = _pair()
    x = torch.randn(300, 1, 8, 8)
    shared = pleascc.merge(a, b, x, budget=1.5, least_squares="one-pass", progress=False)
    monkeypatch.setattr(stats, "_rows_key", lambda p, maps: None if p.block.cols is None else tuple(
        p.block.cols.tolist()))
    separate = pleascc.merge(a, b, x, budget=1.5, least_squares="one-pass", progress=False)
    for name, value in separate.model.state_dict().items():
        assert torch.allclose(shared.model.state_dict()[name], value, rtol=1e-5, atol=1e-6), name
