"""The NDVI forest mask written window by window equals the in-memory one (region scale: no whole grid held)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio

from dinov3geo.tasks.change.deforestation import ndvi_forest_mask

PUC = Path(__file__).resolve().parents[3] / "data" / "pucallpa" / "pucallpa_2000.tif"
NAMES = ["swir16", "nir", "red", "green"]


def test_windowed_forest_mask_equals_in_memory(tmp_path):
    ref = ndvi_forest_mask(PUC, tmp_path / "ref.tif", threshold=0.78, band_names=NAMES, keep_arrays=True)
    win = ndvi_forest_mask(PUC, tmp_path / "win.tif", threshold=0.78, band_names=NAMES, keep_arrays=False,
                           window=97)  # windows that do not divide the grid
    assert win.forest is None and win.valid is None and win.ndvi is None
    with rasterio.open(ref.path) as a, rasterio.open(win.path) as b:
        assert np.array_equal(a.read(), b.read()) and a.transform == b.transform and a.crs == b.crs
        assert b.nodata == 255
    assert win.n_valid == int(ref.valid.sum()) and win.n_forest == int(ref.forest.sum())
    assert win.forest_fraction == ref.forest_fraction and 0 < win.forest_fraction < 1
