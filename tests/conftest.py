"""Shared fixtures: the real data beside the repository, and CPU-friendly torch settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Real slides and labelled data live beside the repository (``../shared/data``).
SHARED_DATA = Path(os.environ.get("HISTOLENS_SHARED_DATA", REPO.parent / "shared" / "data"))

# Tests share a 2-core machine; keep BLAS/torch from oversubscribing it.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``, or skip: the real files are not part of this repository."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"real data folder {SHARED_DATA} is absent (it sits beside the repo as ../shared/data)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def wsi_dir(shared_data: Path) -> Path:
    path = shared_data / "wsi"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path
