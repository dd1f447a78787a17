"""The activation store and the frontier of sequential least squares: results do not depend on where values
are kept, and spill files never outlive a merge."""

import time

import pytest
import torch
import torch.nn as nn

import pleascc
import pleascc.api
import pleascc.least_squares
from conftest import raises
from pleascc.passes.frontier import Frontier
from pleascc.passes import store as store_module
from pleascc.passes.store import BLOCK, ActivationStore
from resnet20 import resnet20


def test_values_come_back_bit_for_bit_from_memory_and_from_disk(tmp_path):
    values = {
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "transposed": torch.randn(6, 7).t(),
        "bfloat16": torch.randn(3, 5).bfloat16(),
        "int64": torch.arange(10),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.5),
        "tuple": (torch.randn(3), 7, [torch.ones(2, 2), None]),
    }
    for limit in (float("inf"), 0):
        with ActivationStore(limit, tmp_path) as store:
            for key, value in values.items():
                store.put(key, value)
            for key, value in values.items():
                _assert_same(store.get(key), value)
            assert (store.disk_bytes > 0) == (limit == 0)
        assert list(tmp_path.iterdir()) == []


def _assert_same(got, want):
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
        assert torch.equal(got, want)
    elif isinstance(want, (tuple, list)):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same(g, w)
    else:
        assert got == want


def test_memory_holds_up_to_the_limit_and_the_rest_spills(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "QUEUED_BYTES", 100)
    monkeypatch.setattr(store_module, "AHEAD_BYTES", 100)
    with ActivationStore(1000, tmp_path) as store:
        store.put("a", torch.zeros(150))  # 600 bytes: in memory
        store.put("b", torch.zeros(200))  # would pass 1000: on disk
        assert (store.memory_bytes, store.disk_bytes) == (600, 800)
        (spill,) = store.directory.iterdir()
        store.drop("b")
        assert store.disk_bytes == 0
        assert _eventually(lambda: spill.stat().st_blocks == 0)  # its blocks freed, once written
        store.put("c", torch.zeros(50))  # fits within the limit less the spill file's buffers (800)
        store.put("d", torch.zeros(1))  # would pass it: on disk
        assert (store.memory_bytes, store.disk_bytes, store.peak_disk_bytes) == (800, 4, 800)
        store.drop("a")
        view = torch.zeros(1000)[:10]
        store.put("view", view)  # a view is kept as its own bytes, not its base's
        assert store.get("view").untyped_storage().nbytes() == 40


def test_values_read_back_take_room_from_the_limit(tmp_path, monkeypatch):
    """A pass holds what it reads back from disk beside the store's memory: once it says so (``reserve``),
    values kept from then on leave that much room, so all of it stays within the limit."""
    monkeypatch.setattr(store_module, "QUEUED_BYTES", 100)
    monkeypatch.setattr(store_module, "AHEAD_BYTES", 100)
    with ActivationStore(1000, tmp_path) as store:
        store.put("a", torch.zeros(100))  # 400 bytes: in memory
        store.put("b", torch.zeros(200))  # 800: on disk
        store.reserve(["a", "b", "missing"])  # only b is read back from disk
        assert store.reserved == 800
        store.put("c", torch.zeros(1))  # 400 + 4 would fit 1000 less the buffers, not less b read back too
        assert (store.memory_bytes, store.disk_bytes) == (400, 804)
        store.reserve(["a"])  # the most asked for stays reserved
        assert store.reserved == 800


def _eventually(condition, seconds: float = 5.0) -> bool:
    """Whether ``condition`` holds within ``seconds`` (the spill file is written by a thread of its own)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_reads_ahead_stay_within_their_bound(tmp_path, monkeypatch):
    """Values past ``AHEAD_BYTES`` of reads ahead are read when asked for, and come back the same."""
    monkeypatch.setattr(store_module, "AHEAD_BYTES", 2 * BLOCK)
    values = {k: torch.full((BLOCK // 4,), float(k)) for k in range(4)}  # a block each
    with ActivationStore(0, tmp_path) as store:
        for k, v in values.items():
            store.put(k, v)
        assert _eventually(lambda: not store._file.queued)  # written, so reads go to the file
        store.read_ahead(list(values))
        assert len(store._file.ahead) == 2 and store._file.ahead_bytes == 2 * BLOCK
        for k, v in values.items():
            assert torch.equal(store.get(k), v)
        assert store._file.ahead_bytes == 0


def test_the_spill_directory_goes_on_error(tmp_path):
    with pytest.raises(RuntimeError), ActivationStore(0, tmp_path) as store:
        store.put("a", torch.zeros(10))
        assert store.directory.exists()
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return resnet20(num_classes=5).eval(), resnet20(num_classes=5).eval(), torch.randn(96, 3, 32, 32)


def test_a_merge_gives_the_same_weights_in_memory_and_spilled(pair, tmp_path):
    """Everything kept in memory, and everything on disk: the same sequential merge, to 1e-5 (in fact
    bit for bit), and the spill directory gone afterwards."""
    a, b, x = pair
    in_memory = pleascc.merge(a, b, x, cache_gb=10, work_dir=str(tmp_path), progress=False)
    spilled = pleascc.merge(a, b, x, cache_gb=0, work_dir=str(tmp_path), progress=False)
    assert in_memory.report["least_squares_disk_peak_mb"] == 0 < in_memory.report["least_squares_memory_peak_mb"]
    assert spilled.report["least_squares_memory_peak_mb"] == 0 < spilled.report["least_squares_spilled_mb"]
    want, got = _weights(in_memory.model), _weights(spilled.model)
    assert (want - got).norm() <= 1e-5 * want.norm()
    assert list(tmp_path.iterdir()) == []


def test_outputs_that_do_not_fit_the_disk_are_recorded_a_run_of_levels_at_a_time(pair, tmp_path, monkeypatch):
    """With room for a third of A's and B's recorded outputs, they are recorded in runs of levels, each by a
    pass of its own: more passes, the same weights."""
    from pleascc.passes.frontier import frontier_bytes, level_output_bytes
    from pleascc.passes.groups import analyze
    from pleascc.passes.solve import layer_levels
    from pleascc.trace import trace

    a, b, x = pair
    whole = pleascc.merge(a, b, x, cache_gb=0, work_dir=str(tmp_path), progress=False)
    gm = trace(a)
    analysis = analyze(gm, (x[:2],))
    levels = layer_levels(gm, analysis)
    outputs = sum(level_output_bytes(analysis, levels, len(x), 64).values())
    free = (frontier_bytes(gm, analysis, len(x)) + outputs / 3) / pleascc.least_squares.SPILL_SHARE
    monkeypatch.setattr(pleascc.least_squares.shutil, "disk_usage",
                        lambda path: type("Usage", (), {"free": free})())
    runs = pleascc.merge(a, b, x, cache_gb=0, work_dir=str(tmp_path), progress=False)
    assert runs.report["least_squares_passes"] >= whole.report["least_squares_passes"] + 2
    assert torch.equal(_weights(whole.model), _weights(runs.model))
    assert list(tmp_path.iterdir()) == []


def test_one_pass_reads_what_the_matching_pass_recorded_in_memory_spilled_or_runs_again(pair, tmp_path,
                                                                                        monkeypatch):
    """One-pass least squares reads the layers' inputs and outputs the matching pass recorded, in memory or on
    disk, and runs no model; where they would not fit the disk, it runs A and B again.  The same weights bit
    for bit, and the spill directory gone."""
    a, b, x = pair
    options = dict(least_squares="one-pass", work_dir=str(tmp_path), progress=False)
    in_memory = pleascc.merge(a, b, x, cache_gb=10, **options)
    spilled = pleascc.merge(a, b, x, cache_gb=0, **options)
    assert in_memory.report["least_squares_passes"] == spilled.report["least_squares_passes"] == 0
    assert in_memory.report["least_squares_disk_peak_mb"] == 0 < in_memory.report["least_squares_memory_peak_mb"]
    assert spilled.report["least_squares_memory_peak_mb"] == 0 < spilled.report["least_squares_spilled_mb"]
    monkeypatch.setattr(pleascc.least_squares.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 0})())
    again = pleascc.merge(a, b, x, cache_gb=0, **options)
    assert again.report["least_squares_passes"] == 1 and again.report["least_squares_spilled_mb"] == 0
    for result in (spilled, again):
        assert torch.equal(_weights(in_memory.model), _weights(result.model))
    assert list(tmp_path.iterdir()) == []


def test_the_spill_directory_goes_when_a_merge_fails_or_is_interrupted(pair, tmp_path, monkeypatch):
    a, b, x = pair
    for error in (RuntimeError, KeyboardInterrupt):
        calls = []

        def fail_on_the_third_pass(*args, original=pleascc.least_squares.layer_moments, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                assert any(tmp_path.iterdir())  # the store had spilled by then
                raise error
            return original(*args, **kwargs)

        monkeypatch.setattr(pleascc.least_squares, "layer_moments", fail_on_the_third_pass)
        with pytest.raises(error):
            pleascc.merge(a, b, x, cache_gb=0, work_dir=str(tmp_path), progress=False)
        assert list(tmp_path.iterdir()) == []


def test_an_unwritable_work_dir_is_refused_before_any_pass(pair, tmp_path, monkeypatch):
    a, b, x = pair
    monkeypatch.setattr(pleascc.api, "feature_moments", lambda *args, **kwargs: pytest.fail("ran a pass"))
    msg = raises("cannot be written", pleascc.merge, a, b, x, cache_gb=0, work_dir=str(tmp_path / "missing"),
                 progress=False)
    assert "--work-dir" in msg and "--cache-gb" in msg


def test_too_little_room_is_refused_before_any_pass(pair, tmp_path, monkeypatch):
    a, b, x = pair
    monkeypatch.setattr(pleascc.api, "feature_moments", lambda *args, **kwargs: pytest.fail("ran a pass"))
    monkeypatch.setattr(pleascc.least_squares.shutil, "disk_usage",
                        lambda path: type("Usage", (), {"free": 1000})())
    msg = raises("GB free", pleascc.merge, a, b, x, cache_gb=0, work_dir=str(tmp_path), progress=False)
    assert str(tmp_path) in msg and "--work-dir" in msg


class ConvChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def test_the_frontier_keeps_a_convolutions_output_once_and_recomputes_its_norm_and_activation(tmp_path):
    """Passes for bn1's level, then conv2's: after the second, conv1's output is kept (read again through
    bn1 and relu next pass), not bn1's or relu's; the values read are those of a plain forward."""
    model = torch.fx.symbolic_trace(ConvChain().eval())
    x = torch.randn(4, 3, 8, 8)
    with ActivationStore(float("inf"), tmp_path) as store:
        frontier = Frontier(store)
        for names in (["conv1"], ["relu"], ["conv2"]):
            frontier.start(model, names)
            got = frontier.run(0, x)
            frontier.finish()
            kept = {key[2] for key in store.keys()}
            if names == ["relu"]:
                assert kept == {"conv1"}
        assert kept == {"conv2"}
        assert torch.equal(got["conv2"], model.conv2(torch.relu(model.bn1(model.conv1(x)))))
