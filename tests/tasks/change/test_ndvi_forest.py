"""NDVI forest mask of date 1 (ndvi_forest_mask) on a real crop of the Pucallpa Landsat composite."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from dinov3geo.io.cog import validate_cog
from dinov3geo.tasks.change.deforestation import ndvi, ndvi_forest_mask

PUC = "change_pairs/pucallpa_landsat_timeseries/pucallpa_2000.tif"
NAMES = ["swir16", "nir", "red", "green"]


@pytest.fixture
def crop(shared_data, tmp_path):
    """Rows 100-179, cols 250-369 (forest, river and farmland) with a nodata corner."""
    with rasterio.open(shared_data / PUC) as ds:
        win = Window(250, 100, 120, 80)
        arr, crs, tr = ds.read(window=win), ds.crs, ds.window_transform(win)
    arr[:, :10, :10] = 0
    path = tmp_path / "p2000.tif"
    # MINISBLACK: a plain 4-band GeoTIFF would be read as RGB + alpha, as the band names would say
    with rasterio.open(path, "w", driver="GTiff", width=120, height=80, count=4, dtype="uint8", crs=crs,
                       transform=tr, nodata=0, photometric="MINISBLACK") as dst:
        dst.write(arr)
    return path, arr


def test_ndvi_values():
    out = ndvi(np.array([10.0, 0.0, 30.0, np.nan]), np.array([30.0, 0.0, 10.0, 5.0]))
    np.testing.assert_allclose(out[[0, 2]], [0.5, -0.5])
    assert np.isnan(out[1]) and np.isnan(out[3])


def test_forest_mask_matches_ndvi_rule(crop, tmp_path):
    path, arr = crop
    r = ndvi_forest_mask(path, tmp_path / "forest.tif", threshold=0.78, band_names=NAMES)
    red, nir = arr[2].astype(np.float64), arr[1].astype(np.float64)
    valid = (arr[[1, 2]] != 0).all(0)  # red and NIR valid (nodata 0)
    with np.errstate(invalid="ignore"):
        expect = valid & ((nir - red) / (nir + red) >= 0.78)
    np.testing.assert_array_equal(r.forest, expect)
    np.testing.assert_array_equal(r.valid, valid)
    assert 0.2 < r.forest_fraction < 0.95  # the crop holds forest and non-forest
    assert validate_cog(r.path)[0]
    with rasterio.open(r.path) as ds:
        m = ds.read(1)
        assert ds.nodata == 255 and ds.crs.to_epsg() == 4326 and ds.descriptions == ("forest",)
    assert (m[:10, :10] == 255).all()
    np.testing.assert_array_equal(m == 1, expect)
    # band positions instead of names give the same mask
    r2 = ndvi_forest_mask(path, threshold=0.78, red=3, nir=2)
    np.testing.assert_array_equal(r2.forest, expect)
    assert r2.path is None


def test_forest_mask_errors(crop):
    path, _ = crop
    with pytest.raises(ValueError, match=r"red band 'red'.*\['b1', 'b2', 'b3', 'b4'\].*band_names"):
        ndvi_forest_mask(path)
    with pytest.raises(ValueError, match="NDVI threshold must lie in"):
        ndvi_forest_mask(path, threshold=78, band_names=NAMES)
