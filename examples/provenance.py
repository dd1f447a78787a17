"""Where a benchmark row comes from: the commit and the CPU it was computed on.

Its own module so that scripts needing only these (training, benchmarks) do
not import what the timm zoo check needs (timm, ONNX export).
"""

from __future__ import annotations

import contextlib
import platform
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
