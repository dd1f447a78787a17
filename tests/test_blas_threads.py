"""OpenBLAS's idle spin, set by ``import pleascc`` before scipy loads the library."""

import os
import subprocess
import sys

SCRIPT = "import os, pleascc, scipy.linalg; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"


def _timeout_after_import(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_import_sets_a_short_spin_before_scipy_loads_openblas():
    from pleascc.blas_threads import SPIN_LOG2_CYCLES

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    assert _timeout_after_import(env) == SPIN_LOG2_CYCLES


def test_a_users_own_setting_is_kept():
    assert _timeout_after_import({**os.environ, "OPENBLAS_THREAD_TIMEOUT": "8"}) == "8"
