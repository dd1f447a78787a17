"""Shared fixtures: make examples/ importable and locate the read-only shared data."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data next to the repository; skips the test where it is absent."""
    root = REPO.parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    return root
