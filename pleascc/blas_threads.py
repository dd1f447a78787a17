"""Put scipy's OpenBLAS threads to sleep right after each call: spinning, they take the cores the next torch op needs.

Least squares sums each convolution's Gram with scipy's dsyrk (OpenBLAS, its
own pthreads) between torch's ops (MKL and oneDNN, on OpenMP threads).  By
default an idle OpenBLAS thread spins for 2^28 cycles, about 0.1 s, before it
sleeps, so every torch op right after a syrk shares the cores with it: a
one-pass ResNet-50 merge took 6.47 forward floors, and 5.07 with this setting
(``benchmarks/bench_scale.py breakdown``; the README's performance section).

OpenBLAS reads ``OPENBLAS_THREAD_TIMEOUT`` (log2 of the spin, in cycles,
4 to 30) once, when the library loads, so ``import pleascc`` sets it before
anything of pleascc loads scipy.  A user's own setting is kept; where scipy's
BLAS was loaded before pleascc, its threads keep their spin.
"""

from __future__ import annotations

import os

SPIN_LOG2_CYCLES = "16"  # ~25 µs: back-to-back BLAS calls keep their threads awake, torch's next op does not wait


def sleep_idle_blas_threads() -> None:
    """Set OpenBLAS's idle spin for libraries loaded from now on, unless the user has set one."""
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", SPIN_LOG2_CYCLES)
