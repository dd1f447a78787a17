"""Sharded calibration: two processes on loopback (gloo) give the single-process merge."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from pleascc.demo import digits_cnn
from pleascc.export import onnx_predict

pytestmark = pytest.mark.slow  # two processes over loopback

ARCH = ["--arch", "pleascc.demo:digits_cnn", "--arch-kwargs", '{"width": 8}']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method, extra", [("pleas", []), ("zipit", ["--no-reset-bn"]), ("regmean", []),
                                           ("pleas", ["--match-samples", "151"])])  # odd: unequal matching shards
def test_two_processes_give_the_single_process_merge(tmp_path, method, extra):
    torch.manual_seed(0)
    for name in "ab":
        torch.save(digits_cnn(5, width=8).state_dict(), tmp_path / f"{name}.pt")
    x = np.random.default_rng(0).standard_normal((301, 1, 8, 8)).astype(np.float32)  # odd: unequal shards
    np.savez(tmp_path / "calib.npz", x=x)
    argv = ["merge", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), *ARCH, "--data", str(tmp_path / "calib.npz"),
            "--budget", "1.5", "--labels", "separate", "--method", method, "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "pleascc", *argv, "-o", str(tmp_path / "single.onnx")], check=True,
                   env=env, capture_output=True)
    port = _free_port()
    ranks = [subprocess.Popen([sys.executable, "-m", "pleascc", *argv, "--distributed", "-o",
                               str(tmp_path / "sharded.onnx")],
                              env={**env, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(2)]
    for p in ranks:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    test = torch.from_numpy(x[:64])
    single = onnx_predict(str(tmp_path / "single.onnx"), test)
    sharded = onnx_predict(str(tmp_path / "sharded.onnx"), test)
    for s, d in zip(single, sharded):
        assert np.abs(s - d).max() / np.abs(s).max() < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt", "calib.npz", "sharded.onnx", "single.onnx"]
