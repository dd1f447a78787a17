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


def _valid_files() -> dict[str, bytes]:
    torch.manual_seed(0)
    state = digits_cnn(5, width=8).state_dict()
    pt = io.BytesIO()
    torch.save(state, pt)
    npz = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(npz, x=rng.standard_normal((40, 1, 8, 8)).astype(np.float32), y=np.arange(40) % 5)
    tensors = io.BytesIO()
    torch.save({"x": torch.randn(40, 1, 8, 8)}, tensors)
    return {".pt": pt.getvalue(), ".safetensors": save_safetensors({k: v.contiguous() for k, v in state.items()}),
            ".npz": npz.getvalue(), ".data.pt": tensors.getvalue()}


VALID = _valid_files()


@st.composite
def corrupted(draw):
    """A valid file of one kind, truncated, with bytes overwritten, or both."""
    suffix = draw(st.sampled_from(sorted(VALID)))
    data = bytearray(VALID[suffix])
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data) - 1))]
    for _ in range(draw(st.integers(0, 8))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return suffix, bytes(data)


def _load(path: str, suffix: str):
    if suffix in (".pt", ".safetensors"):
        return load_model(path, ARCH[0], ARCH[1])
    return load_data(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=corrupted())
def test_corrupted_files_are_one_line_errors_or_load(tmp_path, case):
    """Either the file still loads (a flipped byte inside a tensor) or the loader says why, in one line."""
    suffix, data = case
    path = tmp_path / ("f" + (".pt" if suffix == ".data.pt" else suffix))
    path.write_bytes(data)
    try:
        _load(str(path), suffix)
    except PleasccError as err:
        assert "\n" not in str(err) and str(path) in str(err)


@pytest.mark.parametrize("suffix", sorted(VALID))
def test_the_uncorrupted_files_load(tmp_path, suffix):
    path = tmp_path / ("f" + (".pt" if suffix == ".data.pt" else suffix))
    path.write_bytes(VALID[suffix])
    assert _load(str(path), suffix) is not None
