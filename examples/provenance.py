"""Where a benchmark row comes from: the commit and the CPU it was computed on, and its process's peak memory.

Its own module so that scripts needing only these (training, benchmarks) do
not import what the timm zoo check needs (timm, ONNX export).
"""

from __future__ import annotations

import contextlib
import platform
import resource
import subprocess
from pathlib import Path


def code_version() -> str:
    """The commit the rows are computed with (``+`` when the working tree differs from it)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True).stdout.strip()

    # ":/" roots the paths at the repository's top: git reads plain ones from cwd (examples/), matching nothing
    return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain", ":/pleascc", ":/passes") else "")


def cpu_name() -> str:
    """The CPU rows are measured on: timings, and float64 statistics against float32 forwards, differ by machine."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB, from the OS.

    Linux's ``ru_maxrss`` survives ``exec``: a worker spawned by a parent
    that holds 10 GB reports at least 10 GB whatever it did itself.  VmHWM
    is the peak of the process's own memory map, new at ``exec``, so a
    spawned worker's VmHWM is its own.  Elsewhere, ``ru_maxrss``.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if platform.system() == "Linux" else 2**20)
