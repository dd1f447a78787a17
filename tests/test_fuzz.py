"""Fuzzing the loaders: corrupted or truncated checkpoints and data files give one clear error, never a traceback."""

import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

from pleascc.data import load_data
from pleascc.demo import digits_cnn
from pleascc.load import load_model
from pleascc.passes.errors import PleasccError

ARCH = ("pleascc.demo:digits_cnn", {"width": 8})


def _originals() -> dict[str, dict[str, torch.Tensor]]:
    """What each valid file holds: the model's state, or the data's arrays."""
    torch.manual_seed(0)
    state = digits_cnn(5, width=8).state_dict()
    rng = np.random.default_rng(0)
    npz = {"x": torch.from_numpy(rng.standard_normal((40, 1, 8, 8)).astype(np.float32)),
           "y": torch.arange(40) % 5}
    return {".pt": state, ".safetensors": state, ".npz": npz, ".data.pt": {"x": torch.randn(40, 1, 8, 8)}}


ORIGINALS = _originals()


def _valid_files() -> dict[str, bytes]:
    pt, npz, tensors = io.BytesIO(), io.BytesIO(), io.BytesIO()
    torch.save(ORIGINALS[".pt"], pt)
    np.savez(npz, x=ORIGINALS[".npz"]["x"].numpy(), y=ORIGINALS[".npz"]["y"].numpy())
    torch.save(ORIGINALS[".data.pt"], tensors)
    state = {k: v.contiguous() for k, v in ORIGINALS[".safetensors"].items()}
    return {".pt": pt.getvalue(), ".safetensors": save_safetensors(state), ".npz": npz.getvalue(),
            ".data.pt": tensors.getvalue()}


VALID = _valid_files()


@st.composite
def corrupted(draw):
    """A valid file of one kind, truncated, with bytes overwritten, or both; and how many bytes were overwritten."""
    suffix = draw(st.sampled_from(sorted(VALID)))
    data = bytearray(VALID[suffix])
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data) - 1))]
    overwritten = draw(st.integers(0, 8)) if data else 0
    for _ in range(overwritten):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return suffix, bytes(data), overwritten


def _load(path: str, suffix: str):
    if suffix in (".pt", ".safetensors"):
        return load_model(path, ARCH[0], ARCH[1])
    return load_data(path)


def _loaded_tensors(loaded, suffix: str) -> dict[str, torch.Tensor]:
    if suffix in (".pt", ".safetensors"):
        return loaded.state_dict()
    return {name: getattr(loaded, name) for name in ORIGINALS[suffix]}


def _changed_elements(loaded: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> int:
    """Elements that differ from the original, every name, shape and dtype being the same (asserted)."""
    assert loaded.keys() == original.keys()
    changed = 0
    for name, value in original.items():
        got = torch.as_tensor(loaded[name])
        assert got.shape == value.shape and got.dtype == value.dtype, name
        same = (got == value) | (got.isnan() & value.isnan()) if value.is_floating_point() else got == value
        changed += int((~same).sum())
    return changed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=corrupted())
def test_corrupted_files_are_one_line_errors_or_load(tmp_path, case):
    """Either the loader says why, in one line, or what it loads is the file's content: every tensor of the
    original, each element intact but where an overwritten byte fell (one byte changes one element at most)."""
    suffix, data, overwritten = case
    path = tmp_path / ("f" + (".pt" if suffix == ".data.pt" else suffix))
    path.write_bytes(data)
    try:
        loaded = _load(str(path), suffix)
    except PleasccError as err:
        assert "\n" not in str(err) and str(path) in str(err)
        return
    assert _changed_elements(_loaded_tensors(loaded, suffix), ORIGINALS[suffix]) <= overwritten


@pytest.mark.parametrize("suffix", sorted(VALID))
def test_the_uncorrupted_files_load(tmp_path, suffix):
    path = tmp_path / ("f" + (".pt" if suffix == ".data.pt" else suffix))
    path.write_bytes(VALID[suffix])
    assert _changed_elements(_loaded_tensors(_load(str(path), suffix), suffix), ORIGINALS[suffix]) == 0


def test_a_damaged_stride_is_refused_by_its_checksum(tmp_path):
    """One byte turns 0.weight's strides (9, 9, 3, 1) into (9, 9, 0, 1) (or x's (64, 64, 8, 1) into (64, 64, 0, 1)):
    torch.load takes it and repeats rows; the archive's CRC-32 does not match, so the loader refuses the file."""
    stride = b"K\tK\tK\x03K\x01t"
    assert VALID[".pt"].count(stride) == 1
    path = tmp_path / "f.pt"
    path.write_bytes(VALID[".pt"].replace(stride, stride.replace(b"\x03", b"\x00")))
    with pytest.raises(PleasccError, match=r"f\.pt is corrupted: .*data\.pkl does not match its checksum"):
        load_model(str(path), *ARCH)
    data, stride = tmp_path / "x.pt", b"K@K@K\x08K\x01t"
    assert VALID[".data.pt"].count(stride) == 1
    data.write_bytes(VALID[".data.pt"].replace(stride, stride.replace(b"\x08", b"\x00")))
    with pytest.raises(PleasccError, match=r"x\.pt is corrupted"):
        load_data(str(data))


@pytest.mark.parametrize("suffix", [".pt", ".data.pt"])
def test_overlapping_strides_are_refused_without_a_checksum(tmp_path, suffix):
    """The legacy format has no checksums: a tensor whose strides repeat elements is named instead."""
    path = tmp_path / "f.pt"
    repeated = torch.zeros(8, 1, 3, 1).expand(8, 1, 3, 3)
    if suffix == ".pt":
        torch.save({**ORIGINALS[".pt"], "0.weight": repeated}, path, _use_new_zipfile_serialization=False)
        load = lambda: load_model(str(path), *ARCH)  # noqa: E731
    else:
        torch.save({"x": repeated}, path, _use_new_zipfile_serialization=False)
        load = lambda: load_data(str(path))  # noqa: E731
    with pytest.raises(PleasccError, match=r"is corrupted: (0\.weight|x)'s strides \(3, 3, 1, 0\) repeat elements"):
        load()
