"""Unit tests of the passes on small inputs whose answers are known."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pleascc.passes import budget as budget_pass
from pleascc.passes.batching import FIRST_BATCH, batches
from pleascc.passes.emit import ViewwiseNorm
from pleascc.passes.gram import GramSum, mirror_upper
from pleascc.passes.groups import analyze, permutation_groups
from pleascc.passes.layers import ConvLayer, Layer, LinearLayer, NormLayer
from pleascc.passes.match import hungarian, identity, match_heads, zip_units
from pleascc.passes.matching_stats import CrossMoments, feature_moments
from pleascc.passes.merge_maps import Gather, MergeMaps, row_blocks, selections_from_clusters, selections_from_tuples
from pleascc.passes.stats import Problem, _accumulate
from pleascc.passes.solve import ridge_fit
from pleascc.passes.spaces import SpaceTable
from pleascc.trace import trace


def _toy_layer(kind: type[Layer] = LinearLayer) -> Layer:
    """A layer of ``kind`` for problems built by hand: what its moments sum, not where it sits in a graph."""
    return kind(node="toy", weight="toy.weight", bias="toy.bias", in_axis=-1, in_dim=None, out_axis=-1, out_dim=None)


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def test_groups_of_an_mlp():
    analysis = analyze(trace(_mlp(0)), (torch.randn(2, 4),))
    free = [g for g in permutation_groups(analysis) if g.fixed is None]
    assert len(free) == 1 and free[0].size == 6
    assert free[0].producers == ["0.weight[0]", "0.bias[0]"] and free[0].consumers == ["2.weight[1]"]


def test_unknown_op_fixes_its_spaces_and_is_reported():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), dim=1))

    analysis = analyze(trace(Odd()), (torch.randn(2, 4),))
    assert [g for g in permutation_groups(analysis) if g.fixed is None] == []
    assert any("cumsum" in u for u in analysis.unsupported)


def test_correlation_is_one_for_identical_features_and_hungarian_recovers_a_permutation():
    x = torch.randn(500, 5) * torch.tensor([1e-4, 1, 10, 1e3, 1]) + 50
    perm = torch.tensor([3, 0, 4, 1, 2])
    moments = CrossMoments(5)
    for chunk in x.split(100):
        moments.add(chunk, chunk[:, perm])
    corr = moments.correlation()
    matching = hungarian(corr)
    assert torch.equal(perm[matching.pairs_b], matching.pairs_a)
    assert torch.allclose(matching.corr, torch.ones(5, dtype=torch.float64))
    assert torch.equal(identity(corr).pairs_a, identity(corr).pairs_b)


def test_partial_selections_layout():
    p_a, p_b = selections_from_tuples(3, (torch.tensor([2, 0, 1]), torch.tensor([0, 1, 2])), width=4)
    # width 4 = 2 merged pairs, (2,0) and (0,1); then A-only unit 1, then B-only unit 2
    assert p_a.argmax(1).tolist()[:3] == [2, 0, 1] and p_a[3].sum() == 0
    assert p_b.argmax(1).tolist()[:2] == [0, 1] and p_b[2].sum() == 0 and p_b[3, 2] == 1


@pytest.mark.parametrize("width", [5, 7, 10])
def test_gather_is_the_selection_product(width):
    """Pair selections are applied as gathers; clusters (several units of a model in one row) stay products."""
    p_a, p_b = selections_from_tuples(5, (torch.randperm(5), torch.randperm(5)), width)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    for p in (p_a, p_b):
        want = torch.movedim(torch.tensordot(x, p, dims=([1], [1])), -1, 1)
        assert torch.equal(Gather.of(p)(x, 1), want)
        last = x.movedim(1, -1)  # units last, as linear layers hold them: a gather, not an index_select
        assert torch.equal(Gather.of(p)(last, -1), want.movedim(1, -1))
    assert Gather.of(selections_from_clusters(3, [[0, 1], [2, 3], [4, 5]])[0]) is None


@pytest.mark.parametrize("axis", [0, 1, 2, 3])
def test_take_is_index_select_in_any_memory_order(axis):
    """``take`` reads in a tensor's own memory order (channels-last maps, permuted and sliced views) and gives
    index_select's values."""
    from pleascc.passes.merge_maps import take

    torch.manual_seed(0)
    base = torch.randn(4, 6, 5, 7)
    index = torch.tensor([2, 0, 1, 1])
    for x in (base, base.contiguous(memory_format=torch.channels_last), base.permute(0, 2, 1, 3),
              base.transpose(0, 3), base[:, ::2], base.expand(4, 6, 5, 7)[:, :, :1].expand(4, 6, 5, 7)):
        assert torch.equal(take(x, axis, index), x.index_select(axis, index))


def test_merge_averages_merged_units_and_blocks_skip_cross_terms():
    table = SpaceTable()
    inp, out = table.new(3), table.new(2)
    maps = MergeMaps(table, {
        inp.id: selections_from_tuples(3, (torch.arange(3), torch.arange(3)), 4),  # one pair apart
        out.id: selections_from_tuples(2, (torch.arange(2), torch.arange(2)), 2),  # all merged
    })
    a, b = torch.ones(1, 3), 3 * torch.ones(1, 3)
    assert maps.merge((a, b), [(1, inp)]).tolist() == [[2.0, 2.0, 1.0, 3.0]]
    blocks = row_blocks(maps, out, inp)
    assert len(blocks) == 1 and blocks[0].rows is None  # merged rows read every input
    rows = row_blocks(maps, inp, out)  # the A-only and B-only rows read only their model's inputs
    assert [b.rows.tolist() if b.rows is not None else None for b in rows] == [[0, 1], [2], [3]]


def test_three_models_merge_by_who_feeds_each_unit():
    """Merged unit 0 stands for a unit of all three models, unit 1 for one of A and C, units 2 and 3 for B's own:
    each is the mean of the units feeding it, and each block of rows reads only its models' inputs."""
    table = SpaceTable()
    inp, out = table.new(2), table.new(2)
    one = torch.eye(2, dtype=torch.float64)
    p_a, p_b, p_c = (torch.zeros(4, 2, dtype=torch.float64) for _ in range(3))
    p_a[0, 0] = p_b[0, 1] = p_c[0, 1] = 1
    p_a[1, 1] = p_c[1, 0] = 1
    p_b[2, 0] = 1
    p_b[3, 1] = 1  # B-only, as unit 2
    maps = MergeMaps(table, {inp.id: (p_a, p_b, p_c), out.id: (one, one, one)}, models=3)
    a, b, c = (torch.tensor([[1.0, 2.0]], dtype=torch.float64) * scale for scale in (1, 10, 100))
    assert maps.merge((a, b, c), [(1, inp)]).tolist() == [[(1 + 20 + 200) / 3, (2 + 100) / 2, 10.0, 20.0]]
    blocks = row_blocks(maps, inp, out)
    assert [(b.rows.tolist(), b.cols) for b in blocks] == [([0], None), ([1], None), ([2, 3], None)]
    blocks = row_blocks(maps, out, inp)
    assert len(blocks) == 1 and blocks[0].rows is None
    both = MergeMaps(table, {inp.id: (p_a, p_b, p_c), out.id: (p_a, p_b, p_c)}, models=3)
    blocks = row_blocks(both, out, inp)  # A's and C's row reads what A or C feeds; B's rows what B feeds
    assert [(b.rows.tolist(), b.cols.tolist()) for b in blocks[1:]] == [([1], [0, 1]), ([2, 3], [0, 2, 3])]


@pytest.mark.parametrize("positions", [1, 64])  # 9 patch values per channel from 4² positions: read, then merge;
def test_merged_patches_are_the_patches_merged(positions):  # 9·4 from 4²: merge the maps, then read
    """One-pass least squares merges a convolution's input maps before reading patches where that is less
    work; merging maps units one by one, the rows are those of merging each model's patches."""
    from pleascc.passes.stats import _merged_input

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1, stride=2)).eval()
    gm = trace(model)
    analysis = analyze(gm, (torch.randn(2, 3, 4, 4),))
    layer = next(layer for layer in analysis.layers if isinstance(layer, ConvLayer) and analysis.table.size(layer.in_dim) == 6)
    root = analysis.table.resolve(layer.in_dim).id
    maps = MergeMaps(analysis.table, {root: selections_from_tuples(6, (torch.randperm(6), torch.randperm(6)), 9)})
    inputs = [torch.randn(2, 6, 4, 4) for _ in range(2)]
    output = model[2](inputs[0])
    want = maps.merge([layer.read_input(v, positions) for v in inputs], [(1, layer.in_dim)])
    assert torch.equal(_merged_input(layer, inputs, output, maps, positions), want)


@pytest.mark.parametrize("search", list(budget_pass.WIDTHS))
def test_budget_endpoints_and_monotonicity(search):
    model = _mlp(0)
    analysis = analyze(trace(model), (torch.randn(2, 4),))
    corr = torch.eye(6, dtype=torch.float64) * torch.linspace(1, 0.1, 6, dtype=torch.float64)
    matchings = {root: hungarian(corr) for root in analysis.free_roots()}
    costs = budget_pass.layer_costs(analysis, set())
    widths = [budget_pass.WIDTHS[search](analysis, matchings, costs, b) for b in (1.0, 1.3, 1.6, 2.0)]
    flops = [budget_pass.relative_flops(analysis, costs, w, matchings) for w in widths]
    assert flops[0] == 1.0 and flops[-1] == 2.0
    assert all(f <= b + 1e-9 for f, b in zip(flops, (1.0, 1.3, 1.6, 2.0)))
    assert flops == sorted(flops)


def test_uniform_widths_share_one_ratio_and_stages_keep_the_deepest_apart_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    analysis = analyze(trace(model), (torch.randn(2, 4),))
    first, second = analysis.free_roots()  # written by layers 0 and 2
    matchings = {root: hungarian(torch.eye(16, dtype=torch.float64)) for root in (first, second)}
    costs = budget_pass.layer_costs(analysis, set())
    uniform = budget_pass.uniform_widths(analysis, matchings, costs, 1.4)
    assert uniform[first] == uniform[second] > 16
    stages = budget_pass.stage_widths(analysis, matchings, costs, 1.4)
    assert stages[first] == 16 and stages[second] > 16
    assert budget_pass.relative_flops(analysis, costs, stages, matchings) <= 1.4 + 1e-9


def test_least_squares_recovers_a_linear_map_from_the_warm_start():
    torch.manual_seed(0)
    x = torch.randn(200, 4, dtype=torch.float64)
    w_true = torch.randn(3, 4, dtype=torch.float64)
    inputs = torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], 1)[None]
    w0 = torch.zeros(1, 3, 5, dtype=torch.float64)
    residual = (x @ w_true.T)[None] - inputs @ w0.transpose(1, 2)
    problem = Problem(layer=None, target=None, name="toy", w0=w0, xx=inputs.transpose(1, 2) @ inputs,
                      rx=residual.transpose(1, 2) @ inputs, count=200, tt=float((residual ** 2).sum()),
                      rr=float((residual ** 2).sum()))
    w, rel = ridge_fit(problem, ridge=1e-10, has_bias=True)
    assert torch.allclose(w[0, :, :4], w_true, atol=1e-6) and rel < 1e-10


def _accumulated(inputs: torch.Tensor, target: torch.Tensor, w0: torch.Tensor, batches: int = 3) -> Problem:
    """A toy problem whose moments ``_accumulate`` summed over ``batches`` batches of rows."""
    problem = Problem(layer=_toy_layer(), target=None, name="toy", w0=w0, xx=inputs.transpose(1, 2) @ inputs)
    for x, t in zip(inputs.chunk(batches, dim=1), target.chunk(batches, dim=1)):
        _accumulate(problem, x, t, x @ w0.to(x).transpose(1, 2))
    return problem


def test_accumulated_moments_are_the_residuals_own():
    """R·Xᵀ, ‖R‖² (R = T − W0·X) and ‖T‖² summed batch by batch equal the whole data's."""
    torch.manual_seed(0)
    inputs = torch.cat([torch.randn(2, 300, 6, dtype=torch.float64), torch.ones(2, 300, 1, dtype=torch.float64)], 2)
    target = torch.randn(2, 300, 3, dtype=torch.float64)
    w0 = torch.randn(2, 3, 7, dtype=torch.float64)
    problem = _accumulated(inputs, target, w0)
    residual = target - inputs @ w0.transpose(1, 2)
    assert torch.allclose(problem.rx, residual.transpose(1, 2) @ inputs, rtol=1e-10, atol=1e-10)
    assert problem.rr == pytest.approx(float((residual ** 2).sum()), rel=1e-10)
    assert problem.tt == pytest.approx(float((target ** 2).sum()), rel=1e-10) and problem.count == 300


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalization_moments_are_those_of_its_rows(channels_last):
    """A normalization's Gram and residual moments, summed per channel on its (N, C, P) values as read (in
    either layout), equal those of its (C, N·P, 2) rows [x, 1] through the general products."""
    from pleascc.passes.layers import _norm_gram

    torch.manual_seed(0)
    maps = torch.randn(3, 5, 4, 6) * 3 + 1, torch.randn(3, 5, 4, 6)
    if channels_last:
        maps = tuple(m.contiguous(memory_format=torch.channels_last) for m in maps)
    x, target = (m.reshape(3, 5, 24) for m in maps)
    w0 = torch.randn(5, 1, 2)
    per_channel = x.permute(1, 0, 2).reshape(5, 72, 1)
    rows = torch.cat([per_channel, torch.ones_like(per_channel)], dim=2)
    by_rows = Problem(layer=_toy_layer(), target=None, name="rows", w0=w0)
    _accumulate(by_rows, rows, target.permute(1, 0, 2).reshape(5, 72, 1), rows @ w0.transpose(1, 2))
    by_sums = Problem(layer=_toy_layer(NormLayer), target=None, name="sums", w0=w0)
    _accumulate(by_sums, x, target, by_sums.layer.predict(x, w0))
    assert torch.allclose(_norm_gram(x), rows.transpose(1, 2) @ rows, rtol=1e-5, atol=1e-3)
    assert torch.allclose(by_sums.rx, by_rows.rx, rtol=1e-5, atol=1e-3) and by_sums.count == by_rows.count == 72
    assert by_sums.rr == pytest.approx(by_rows.rr, rel=1e-5) and by_sums.tt == pytest.approx(by_rows.tt, rel=1e-5)


@pytest.mark.parametrize("rows", [None, [0, 2, 3]])
def test_a_fused_norms_moments_are_those_of_its_own_pass(rows):
    """A norm's moments derived from its convolution's Gram, its fitted weights and the norm's sums at the warm
    starts (``FusedNorm``) equal those summed on the fitted convolution's outputs (``_accumulate``), for
    a block of the convolution's channels too."""
    from pleascc.passes.fused_norms import FusedNorm
    from pleascc.passes.layers import _norm_gram

    torch.manual_seed(0)
    groups, out, n = 2, 3, 240  # 6 channels: (groups, out per group)
    inputs = torch.cat([torch.randn(groups, n, 4, dtype=torch.float64) + 0.5,
                        torch.ones(groups, n, 1, dtype=torch.float64)], 2)
    w0 = torch.randn(groups, out, 5, dtype=torch.float64)
    w = w0 + 0.1 * torch.randn_like(w0)
    channels = groups * out if rows is None else 8
    norm = Problem(layer=None, target=None, name="norm", w0=torch.randn(channels, 1, 2, dtype=torch.float64))
    target = torch.randn(groups, n, out, dtype=torch.float64)
    fused = FusedNorm(norm, None if rows is None else torch.tensor(rows + [5, 6, 7]))
    for x, t in zip(inputs.chunk(3, dim=1), target.chunk(3, dim=1)):
        fused.add(x, x @ w0.transpose(1, 2), t)
    fused.finish(Problem(layer=None, target=None, name="conv", w0=w0, xx=inputs.transpose(1, 2) @ inputs, w=w))
    as_read = (inputs @ w.transpose(1, 2)).permute(1, 0, 2).reshape(1, n, -1).permute(0, 2, 1)  # (1, C, n)
    at = slice(None) if rows is None else fused.rows
    own = Problem(layer=_toy_layer(NormLayer), target=None, name="own", w0=norm.w0[at])
    _accumulate(own, as_read, target.permute(1, 0, 2).reshape(1, n, -1).permute(0, 2, 1),
                own.layer.predict(as_read, own.w0))
    assert torch.allclose(norm.xx[at], _norm_gram(as_read), rtol=1e-10)
    assert torch.allclose(norm.rx[at], own.rx, rtol=1e-10)
    assert norm.rr == pytest.approx(own.rr, rel=1e-10) and norm.tt == pytest.approx(own.tt, rel=1e-10)
    assert norm.count == own.count == n


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_least_squares_reports_the_fits_own_residual(ridge):
    """The reported residual, derived without a product by the Gram, is ‖T − W·X‖²/‖T‖² of the weights it
    returns.  Without a ridge, an input no sample excites leaves the Gram singular: the fit still comes
    out, with that input's weights at the warm start."""
    torch.manual_seed(1)
    x = torch.randn(50, 4, dtype=torch.float64)
    x[:, 2] = 0  # a dead unit
    inputs = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], 1)[None]
    target = torch.randn(1, 50, 3, dtype=torch.float64)
    w0 = torch.randn(1, 3, 5, dtype=torch.float64)
    problem = _accumulated(inputs, target, w0)
    w, rel = ridge_fit(problem, ridge=ridge, has_bias=True)
    want = float(((target - inputs @ w.transpose(1, 2)) ** 2).sum()) / problem.tt
    assert rel == pytest.approx(want, rel=1e-6)
    assert torch.allclose(w[0, :, 2], w0[0, :, 2])


def test_feature_moments_of_a_model_and_its_twin():
    model = _mlp(0)
    gm = trace(model)
    analysis = analyze(gm, (torch.randn(2, 4),))
    (root,) = analysis.free_roots()
    corr = feature_moments((gm, trace(model)), analysis, torch.randn(300, 4), progress=False)[root]
    live = corr.diagonal() != 0
    assert torch.allclose(corr.diagonal()[live], torch.ones(int(live.sum()), dtype=torch.float64))


def test_functional_layers_merge_at_a_partial_budget(tmp_path):
    """F.linear on parameters (get_attr): bound, refit, emitted dense, exported."""
    import torch.nn.functional as F

    import pleascc

    class Functional(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.w1, self.b1 = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.zeros(8))
            self.w2 = nn.Parameter(torch.randn(3, 8))

        def forward(self, x):
            return F.linear(F.relu(F.linear(x, self.w1, self.b1)), self.w2)

    x = torch.randn(200, 4)
    result = pleascc.merge(Functional(0), Functional(1), x, budget=1.5, progress=False)
    assert 1.0 < result.report["relative_flops"] <= 1.5
    assert result.analysis.params["w1"].roles == ["out", "in"]
    pleascc.export_onnx(result.model, x[:4], str(tmp_path / "functional.onnx"))


def _attention(norm_head_dim: bool) -> nn.Module:
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
            self.norm = nn.LayerNorm(4) if norm_head_dim else nn.Identity()

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(self.norm(q), self.norm(k), v)
            return self.proj(out.transpose(1, 2).reshape(x.shape))

    torch.manual_seed(0)
    return Attention().eval()


def test_head_dims_permute_per_head_unless_a_parameter_ties_the_heads():
    """q·k's and v's head dims may differ per head; a LayerNorm over the head dim (qk-norm) shares one."""
    x = torch.randn(2, 5, 8)
    free = analyze(trace(_attention(False)), (x,))
    assert len(free.per_head) == 1 and free.root_size(next(iter(free.per_head))) == 4  # q, k, v: one fused head dim
    assert analyze(trace(_attention(True)), (x,)).per_head == {}


def test_heads_then_dims_within_each_pair_of_heads():
    """match_heads finds which heads pair, and a different head-dim permutation inside each pair."""
    heads, dim = 3, 4
    x = torch.randn(400, heads, dim)
    head_perm, within = torch.tensor([2, 0, 1]), torch.stack([torch.randperm(dim) for _ in range(heads)])
    y = x[:, head_perm][:, torch.arange(heads)[:, None], within]  # B's head h: A's head head_perm[h], dims by within[h]
    moments = CrossMoments(heads * dim)
    moments.add(x.reshape(400, -1), y.reshape(400, -1))
    outer, (inner,) = match_heads([moments.correlation()], heads)
    partner = outer.pairs_b[torch.argsort(outer.pairs_a)]  # B's head for each of A's
    assert torch.equal(head_perm[partner], torch.arange(heads))
    for a in range(heads):
        assert torch.equal(within[partner[a]][inner.within[a]], torch.arange(dim))
    assert torch.allclose(outer.corr, torch.ones(heads, dtype=torch.float64))


class _ConvBodyHead(nn.Module):
    """Conv2d(3, 6, 1), then ``body`` (the ops under test, ending at (N, 6)), then Linear(6, 4)."""

    def __init__(self, body):
        super().__init__()
        self.a, self.b, self.body = nn.Conv2d(3, 6, 1), nn.Linear(6, 4), body

    def forward(self, x):
        return self.b(self.body(self.a(x)))


def _assert_one_free_group_permutes(body, shape) -> None:
    from pleascc.verify import permutation_invariance

    torch.manual_seed(0)
    result = permutation_invariance(_ConvBodyHead(body).eval(), torch.randn(2, *shape))
    assert result["unsupported"] == [] and result["relative_diff"] < 1e-4 and result["free_groups"] == 1


def _gate_then_windows(y):
    y = y * torch.sigmoid(y.mean((2, 3), keepdim=True)).expand_as(y)
    return y.unfold(2, 2, 2).unfold(3, 2, 2).amax((-1, -2)).mean((2, 3))  # windows: N, C, H/2, W/2, 2, 2


@pytest.mark.parametrize("flip", [lambda y: torch.flip(y, dims=(2,)).mean((2, 3)),
                                  lambda y: y.flip(2, 3).amax((2, 3))])
def test_flips_along_positions_keep_channels_permutable(flip):
    """``torch.flip`` / ``Tensor.flip`` (test-time augmentation): flipped axes fixed, channels still one group."""
    _assert_one_free_group_permutes(flip, (3, 8, 8))


def test_sliding_windows_and_expand_as_gates_keep_channels_permutable():
    """Tensor.unfold over positions (halo attention) and a gate expanded with expand_as (ECA)."""
    _assert_one_free_group_permutes(_gate_then_windows, (3, 8, 8))


def _zigzag_then_norm(y):
    y = y.flatten(2)[:, :, [3, 0, 2, 1]]
    return (y / y.norm(p=2, dim=1, keepdim=True)).mean(2)


def test_position_lists_and_vector_norms():
    """x[:, :, [positions]] reorders positions (a fixed axis); .norm over channels ignores their order."""
    _assert_one_free_group_permutes(_zigzag_then_norm, (3, 2, 2))


@torch.fx.wrap
def _position_code(shape) -> torch.Tensor:
    """A constant made from sizes alone (as position encodings are)."""
    return torch.arange(shape[2] * shape[3], dtype=torch.float32).view(1, 1, shape[2], shape[3]) / 10


class _PaddedNormalized(nn.Module):
    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d(1)

    def forward(self, y):
        y = self.pad(y)
        y = F.normalize(y, dim=1) + _position_code(y.shape).sin().cos()
        return y.mean((2, 3))


def test_padding_modules_normalize_and_constants_of_sizes():
    """nn.ZeroPad2d pads positions; F.normalize over channels ignores their order; a function of sizes is a constant."""
    _assert_one_free_group_permutes(_PaddedNormalized(), (3, 4, 4))


def _repeated(y):
    n, c, h, w = y.shape
    y = y.repeat_interleave(2, dim=1).view(n, c, 2, h, w).amax(2)  # channels (units × 2): blocks move together
    return y.repeat_interleave(n // y.shape[0], dim=0).mean((2, 3))  # repeats known at run time: a batch axis


def test_repeat_interleave_keeps_repeated_units_together():
    _assert_one_free_group_permutes(_repeated, (3, 2, 2))


def test_clamp_with_a_per_channel_bound_is_elementwise():
    _assert_one_free_group_permutes(lambda y: torch.clamp(y, max=y.mean((2, 3), keepdim=True)).mean((2, 3)), (3, 2, 2))


class _WindowsAndTiles(nn.Module):
    def __init__(self):
        super().__init__()
        self.unfold = nn.Unfold(2, stride=2)

    def forward(self, y):
        n, c = y.shape[:2]
        windows = self.unfold(y).view(n, c, 4, -1).amax(2)  # im2col: (channels × window, positions)
        tiled = y.mean((2, 3)).tile(1, 2).view(n, 2, c).mean(1)  # (copies × channels)
        repeated = y.mean((2, 3), keepdim=True).repeat(1, 1, 2, 2).mean((2, 3))
        folded = F.fold(self.unfold(y), y.shape[2:], 2, stride=2).max(dim=3)[0].amax(2)  # col2im undoes im2col
        return windows.mean(2) + tiled + repeated + folded


def test_im2col_col2im_tile_repeat_and_max_keep_channels_permutable():
    _assert_one_free_group_permutes(_WindowsAndTiles(), (3, 4, 4))


def _upsampler() -> nn.Module:
    """Conv, then a dense and a depthwise transposed conv (learned upsampling), pooled into a Linear."""
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1),
                         nn.ReLU(), nn.ConvTranspose2d(4, 4, 3, padding=1, groups=4), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def test_transposed_convs_permute_and_merge_by_their_permuted_average():
    import pleascc
    from pleascc.verify import permutation_invariance, permuted_copy

    torch.manual_seed(0)
    model, x = _upsampler().eval(), torch.randn(64, 3, 6, 6)
    result = permutation_invariance(model, x[:2])
    assert result["unsupported"] == [] and result["relative_diff"] < 1e-4 and result["free_groups"] == 2
    for budget in (1.0, 1.5, 2.0):  # a permuted copy merged back: exact at any width
        merged = pleascc.merge(model, permuted_copy(model, x), x, method="permute", budget=budget, reset_bn=False,
                               progress=False)
        with torch.no_grad():
            assert (merged.model(x) - model(x)).abs().max() < 1e-4 * model(x).abs().max()


class _MetaPositionBias(nn.Module):
    """A small MLP over a non-persistent buffer of coordinates (SwinV2's continuous position bias)."""

    def __init__(self):
        super().__init__()
        self.meta = nn.Linear(2, 6)
        self.register_buffer("coordinates", torch.randn(5, 2), persistent=False)

    def forward(self, y):
        return y.mean((2, 3)) + self.meta(self.coordinates).mean(0)


def test_a_buffer_outside_the_state_dict_is_a_constant():
    """Coordinates the model computes for itself are an input: their axis, and so meta's input, stay fixed.

    Averaging A's x column with B's y column would mix two different inputs.
    """
    _assert_one_free_group_permutes(_MetaPositionBias(), (3, 2, 2))


def _joint(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    moments = CrossMoments(a.shape[1], within=True)
    moments.add(a, b)
    return moments.correlation()


def test_zipit_pairs_twins_first_and_caps_merges_within_a_model():
    """A permuted copy zips into its twin pairs; units duplicated inside A merge only up to the beta cap."""
    x = torch.randn(500, 6)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    clusters, values = zip_units(_joint(x, x[:, perm]), width=6)
    assert sorted(sorted(c) for c in clusters) == sorted([int(perm[j]), 6 + j] for j in range(6))
    assert values == pytest.approx([1.0] * 6)
    p_a, p_b = selections_from_clusters(6, clusters)
    assert torch.equal(p_a.sum(1), torch.ones(6)) and torch.equal(p_b.sum(1), torch.ones(6))

    a = torch.cat([x[:, :3], x[:, :3] + 1e-3 * torch.randn(500, 3)], dim=1)  # A's units 3..5 copy 0..2
    b = torch.randn(500, 6)  # unrelated to A
    for beta, within_a in ((0.0, 0), (1.0, 3)):
        clusters, _ = zip_units(_joint(a, b), width=6, beta=beta)  # 6 merges: at most 3 × beta inside a model
        assert sum(sum(u < 6 for u in c) - 1 for c in clusters if any(u < 6 for u in c)) == within_a


def test_blur_pool_filter_is_widened_with_its_channels():
    """A depthwise F.conv2d on a fixed filter buffer (BlurPool): at 2.0 the merged model is the two side by side."""
    import pleascc

    class Blurred(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 4)
            self.register_buffer("filt", torch.tensor([1.0, 2.0, 1.0]).outer(torch.tensor([1.0, 2.0, 1.0]))
                                 .div(16).expand(6, 1, 3, 3).clone())

        def forward(self, x):
            y = F.conv2d(torch.relu(self.conv(x)), self.filt, stride=2, padding=1, groups=6)
            return self.head(y.mean((2, 3)))

    torch.manual_seed(0)
    a, b = Blurred().eval(), Blurred().eval()
    x = torch.randn(64, 3, 8, 8)
    result = pleascc.merge(a, b, x, budget=2.0, labels="separate", method="permute", reset_bn=False, progress=False)
    with torch.no_grad():
        got_a, got_b = result.model(x)
        assert torch.allclose(got_a, a(x), atol=1e-5) and torch.allclose(got_b, b(x), atol=1e-5)


@pytest.mark.parametrize("shape, dtype", [((1, 500, 300), torch.float32), ((1, 400, 200), torch.float64),
                                          ((3, 50, 300), torch.float32), ((1, 500, 20), torch.float32)])
def test_gram_sum_is_the_matrix_product(shape, dtype, monkeypatch):
    """One wide float32 group goes to BLAS ssyrk (one triangle, summed in place in float32, flushed into
    float64 every few batches), the rest to a batched product: summed over five batches, across a flush
    and a partial sum left at the end, and made whole, the same Gram."""
    monkeypatch.setattr("pleascc.passes.gram.FLUSH_ROWS", 2 * shape[1])
    torch.manual_seed(0)
    batches = [torch.randn(shape, dtype=dtype) for _ in range(5)]
    gram = GramSum()
    for rows in batches:
        gram.add(rows)
    got = mirror_upper(gram.result())
    want = sum((rows.double().transpose(1, 2) @ rows.double()) for rows in batches)
    assert got.dtype == torch.float64 and torch.equal(got, got.transpose(1, 2))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("conv, shape", [
    (dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1)), (2, 3, 9, 11)),
    (dict(kernel_size=(3, 2), stride=(2, 1), padding=(0, 1), dilation=(2, 1)), (2, 3, 12, 7)),
    (dict(kernel_size=(3,), stride=(2,), padding=(1,), dilation=(1,)), (2, 4, 30)),
])
def test_patches_at_sampled_positions_are_im2col_columns(conv, shape):
    """Gathering only the sampled patches gives those columns of the full im2col."""
    from pleascc.passes.reads import im2col_patches, sampled_positions

    x = torch.randn(shape)
    full = im2col_patches(x, conv, None)
    keep = sampled_positions(full.shape[2], 5)
    assert keep is not None and torch.equal(im2col_patches(x, conv, 5), full[:, :, keep])


class _SeqFirst(nn.Module):
    """Tokens in, a linear layer on (tokens, samples, features) in the middle, pooled over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):  # (samples, tokens, 4)
        return self.head(F.relu(self.mix(self.embed(x).transpose(0, 1))).mean(0))


def test_batch_axis_follows_the_samples():
    """Tokens are read in a subset only where the samples' axis is known: a seq-first layer has it at 1."""
    analysis = analyze(trace(_SeqFirst()), (torch.randn(2, 7, 4),))
    assert {layer.node: layer.batch_axis for layer in analysis.layers} == {"embed": 0, "mix": 1, "head": 0}


def test_tokens_read_are_the_same_however_samples_are_batched():
    """A fixed subset of each sample's tokens: one batch, or two shards of it, read the same rows."""
    from pleascc.passes.reads import at_tokens, sampled_positions

    x = torch.randn(7, 5, 3)  # (tokens, samples, features)
    whole = at_tokens(x, 1, (-1,), 4)
    shards = torch.cat([at_tokens(x[:, :2], 1, (-1,), 4), at_tokens(x[:, 2:], 1, (-1,), 4)])
    assert whole.shape == (5, 4, 3) and torch.equal(whole, shards)
    assert torch.equal(whole[1], x[sampled_positions(7, 4), 1])
    heads = torch.randn(2, 3, 9, 4)  # (samples, heads, tokens, head dim): units on two axes
    assert torch.equal(at_tokens(heads, 0, (1, 3), 5), heads.transpose(1, 2)[:, sampled_positions(9, 5)])


class _Residual(nn.Module):
    """A branch and a skip: the skip's value must live until the add, the branch's only until its next op."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.branch = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        return self.head((y + self.branch(y)).mean((2, 3)))


def test_lockstep_yields_each_models_values_and_frees_the_rest():
    """Reads are each model's eager values, yielded in graph order; the models stop after the last read,
    and a read keeps a value alive past its last user."""
    from pleascc.passes.executor import lockstep

    torch.manual_seed(0)
    models = [_Residual().eval() for _ in range(2)]
    gms = tuple(trace(m) for m in models)
    x = torch.randn(2, 3, 6, 6)
    reads = {"branch": ("stem", "branch"), "relu": ("relu",)}
    got = list(lockstep(gms, x, reads))
    assert [name for name, _ in got] == ["relu", "branch"]
    for model, k in zip(models, range(2)):
        stem = model.stem(x)
        assert torch.equal(got[1][1]["stem"][k], stem) and torch.equal(got[0][1]["relu"][k], torch.relu(stem))
        assert torch.equal(got[1][1]["branch"][k], model.branch(torch.relu(stem)))


class _Aliases(nn.Module):
    """Ops that could run in place, on values that share memory with live ones, or are read, or not."""

    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()

    def forward(self, x):
        a = self.conv(x)
        same = torch.relu(a.contiguous())  # a.contiguous() is a itself, read again below: not in place
        flat = torch.sigmoid(a.flatten(1)).reshape(a.shape)  # a view of a: not in place
        b = self.act(self.conv(x)) + a  # the conv's output is read by nothing else: ReLU in place, then the add
        return torch.tanh(b * 2) + same + flat  # b * 2 is read by tanh alone: in place


class _InPlaceCalls(TorchFunctionMode):
    """Records the torch ops run in place under it: those named with a trailing underscore, or given inplace=True."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if kwargs.get("inplace") is True or (name.endswith("_") and not name.startswith("_")):
            self.names.append(name)
        return func(*args, **kwargs)


def test_lockstep_runs_ops_in_place_only_on_values_nothing_else_holds():
    """Where a value's only reader is an op with an in-place twin and no read follows, lockstep overwrites it;
    values another live value shares, or that a read still needs, are left alone: the same values as eager."""
    from pleascc.passes.executor import lockstep

    torch.manual_seed(0)
    model = _Aliases().eval()
    gms = (trace(model),)
    x = torch.randn(2, 3, 5, 5)
    kept = x.clone()
    last = [n for n in gms[0].graph.nodes if n.op != "output"][-1].name
    with torch.no_grad():
        with _InPlaceCalls() as calls:
            (_, values), = list(lockstep(gms, x, {last: (last,)}))
        # act (the ReLU module), then the add, the mul, tanh and both last adds; not relu(a.contiguous()) nor the
        # sigmoid of a's view
        assert calls.names == ["relu", "add_", "mul_", "tanh_", "add_", "add_"]
        assert torch.allclose(values[last][0], model(x), atol=1e-6) and torch.equal(x, kept)
        read_conv = {"add": ("conv_1",)}  # the second conv's output read where the add runs: no ReLU in place
        with _InPlaceCalls() as calls:
            (_, values), = list(lockstep(gms, x, read_conv))
        assert calls.names == ["add_"]  # the ReLU's input is read: out of place; the add (the last node run) in place
        assert torch.equal(values["conv_1"][0], model.conv(x))


def test_a_nan_weight_is_named_before_any_pass():
    import pleascc
    from pleascc.passes.errors import PleasccError

    models = [_Residual().eval() for _ in range(2)]
    with torch.no_grad():
        models[1].branch.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(PleasccError, match="model B's branch.weight holds NaN or Inf"):
        pleascc.merge(*models, torch.randn(4, 3, 6, 6), progress=False)


@pytest.mark.parametrize("method, least_squares", [("pleas", "one-pass"), ("pleas", "sequential"),
                                                   ("regmean", "one-pass")])
@pytest.mark.parametrize("overflow_from", [0, 1])  # 0: in matching's samples; 1: only in least squares' (or RegMean's)
def test_values_that_overflow_are_named_where_a_pass_reads_them(method, least_squares, overflow_from):
    """Finite weights and data, but activations that overflow to Inf: the pass that reads them names the model
    and the node it read (the stem's output as its fit's target, or its ReLU as the branch reads it; A comes
    first)."""
    import pleascc
    from pleascc.passes.errors import PleasccError

    torch.manual_seed(0)
    models = [_Residual().eval() for _ in range(2)]
    for model in models:
        model.stem.weight.data.fill_(1.0)  # 27 inputs of 3e38 each: Inf at every output
    x = torch.randn(4, 3, 6, 6)
    x[overflow_from:] = 3e38
    with pytest.raises(PleasccError, match=r"model A produces NaN or Inf at (stem|relu) on the calibration data"):
        pleascc.merge(*models, x, method=method, least_squares=least_squares, match_samples=1, progress=False)


def test_passes_start_with_a_small_batch_and_then_read_every_sample_once():
    """A pass's first batch is small (its long-lived sums then do not pin a full batch's freed blocks); the
    others are full, and every sample comes exactly once, in order. BatchNorm's reset asks for full batches."""
    x = torch.arange(11.0)[:, None]
    read = list(batches(x, 4, "", progress=False))
    assert [len(b) for b in read] == [FIRST_BATCH, 4, 4, 11 - FIRST_BATCH - 8]
    assert torch.equal(torch.cat(read), x)
    assert [len(b) for b in batches(x, 4, "", progress=False, small_first=False)] == [4, 4, 3]
    assert [len(b) for b in batches(x[:1], 4, "", progress=False)] == [1]
    assert list(batches(x[:0], 4, "", progress=False)) == []


def test_batches_hold_a_forwards_live_values_and_one_layers_rows():
    """The passes stream: a batch holds a forward's live values (at most a few of the largest activations)
    and one layer's rows, so reading all positions (bigger rows) takes a smaller batch."""
    import torchvision

    from pleascc.passes.batching import MAX_BATCH, batch_size_for
    from pleascc.passes.executor import peak_live_bytes

    gm = trace(torchvision.models.resnet18(num_classes=10).eval())
    analysis = analyze(gm, (torch.randn(2, 3, 224, 224),))
    largest = max(4 * torch.Size(s).numel() for n, s in analysis.shapes.items() if s and not n.startswith("fc"))
    assert largest <= peak_live_bytes(gm.graph, analysis.shapes) <= 4 * largest
    limit = 2**28  # below MAX_BATCH either way
    streamed = batch_size_for(analysis, gm.graph, 64, limit)
    assert 1 < streamed < MAX_BATCH
    assert batch_size_for(analysis, gm.graph, None, limit) < streamed


def _imported_modules(path, package: str):
    """Every module a source file imports (at any depth: in functions, under TYPE_CHECKING), relative ones
    resolved against ``package``; ``from M import n`` counts as ``M.n`` (n may be a module)."""
    import ast

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield from (f"{module}.{alias.name}" for alias in node.names)


def test_passes_import_nothing_from_the_driver():
    """The compiler core (``pleascc.passes``) stands alone: no module under passes/ imports a driver module
    (anything in ``pleascc`` outside ``pleascc.passes``); the driver imports the passes, never the reverse."""
    from pathlib import Path

    import pleascc.passes

    root = Path(pleascc.passes.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 10
    found = []
    for path in files:
        package = ".".join(["pleascc", "passes", *path.relative_to(root).parent.parts])
        for module in _imported_modules(path, package):
            parts = module.split(".")
            if parts[0] == "pleascc" and (len(parts) == 1 or parts[1] != "passes"):
                found.append(f"{path.relative_to(root)}: {module}")
    assert found == []


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_a_viewwise_norm_gives_each_unit_the_mean_of_its_models_norms(kind):
    """Units fed by any set of three models (a merged tuple, clusters of two, units of one): each model normalizes
    the units it feeds as its own model would, and a unit is the mean over the models that feed it."""
    fed = [torch.tensor(f, dtype=torch.bool) for f in ([1, 1, 1, 0, 0, 1], [1, 1, 0, 1, 0, 0], [1, 0, 1, 0, 1, 0])]
    torch.manual_seed(0)
    x, weight, bias = torch.randn(5, 6), torch.randn(6), torch.randn(6)
    want = torch.zeros(5, 6)
    for f in fed:
        view = f.nonzero().flatten()
        if kind == "rms":
            own = F.rms_norm(x[:, view], (len(view),), weight[view], 1e-5)
        else:
            own = F.layer_norm(x[:, view], (len(view),), weight[view], bias[view], 1e-5)
        want[:, view] += own / sum(g.float() for g in fed)[view]
    got = ViewwiseNorm(kind, 1e-5, fed)(x, weight, None if kind == "rms" else bias)
    torch.testing.assert_close(got, want)
