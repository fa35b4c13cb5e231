"""Shared pytest fixtures for dinov3geo.

Real data lives in ``../shared/data`` beside the checkout (CI lays it there). Set ``DINOV3GEO_SHARED_DATA``
to point elsewhere. Tests that need it skip with a clear message when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    env = os.environ.get("DINOV3GEO_SHARED_DATA")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "data"


SHARED_DATA = _shared_data_dir()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared real-data folder (``../shared/data``); skips the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set DINOV3GEO_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _torch_threads():
    """Keep torch to the machine's 2 cores and deterministic per test."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.manual_seed(0)
    yield
