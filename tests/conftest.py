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


#: set to 1 to run the ``cuda``-marked tests on the CPU (to check the tests themselves where there is no GPU)
CUDA_TESTS_ON_CPU = "DINOV3GEO_CUDA_TESTS_ON_CPU"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``cuda``-marked tests when torch sees no CUDA GPU (unless ``DINOV3GEO_CUDA_TESTS_ON_CPU=1``)."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked or os.environ.get(CUDA_TESTS_ON_CPU) == "1":
        return
    import torch

    if torch.cuda.is_available():
        return
    why = (f"needs a CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is False); run them "
           f"on a GPU machine (`make gpu-check`), or with {CUDA_TESTS_ON_CPU}=1 on the CPU")
    for item in marked:
        item.add_marker(pytest.mark.skip(reason=why))


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


def write_raster(
    path: Path,
    array,
    crs="EPSG:32633",
    transform=None,
    nodata=None,
    descriptions=None,
    tiled: bool = False,
    compress: str | None = None,
    tags: dict | None = None,
) -> Path:
    """Write a small GeoTIFF for tests (``array`` is [bands, h, w] or [h, w])."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[None]
    if transform is None:
        transform = from_origin(500000.0, 4000000.0, 10.0, 10.0)
    profile = dict(driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                   dtype=arr.dtype, crs=crs, transform=transform, nodata=nodata)
    if tiled:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    if compress:
        profile.update(compress=compress)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(arr)
        if descriptions:
            for i, d in enumerate(descriptions, start=1):
                ds.set_band_description(i, d)
        if tags:
            ds.update_tags(**tags)
    return Path(path)


@pytest.fixture
def make_raster(tmp_path):
    """Factory fixture: ``make_raster(name, array, **kw)`` writes a GeoTIFF under tmp_path."""

    def _make(name: str, array, **kw) -> Path:
        return write_raster(tmp_path / name, array, **kw)

    return _make
