"""Classic baseline: CVA and NDVI differencing with Otsu, on arrays and window by window through the engine."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from dinov3geo.inference import predict_raster
from dinov3geo.tasks.change.classic import (
    CVAModel,
    NDVIDiffModel,
    band_stats,
    classic_change,
    cva_score,
    ndvi,
    ndvi_difference,
    score_to_probability,
)
from dinov3geo.tasks.change.coregister import coregister
from tests.conftest import write_raster

PUC = "change_pairs/pucallpa_landsat_timeseries"
NAMES = ["swir16", "nir", "red", "green"]


@pytest.fixture
def puc_pair(shared_data, tmp_path):
    paths = {}
    for year in (2000, 2020):
        with rasterio.open(shared_data / PUC / f"pucallpa_{year}.tif") as ds:
            win = Window(250, 80, 200, 150)
            paths[year] = write_raster(tmp_path / f"pucallpa_{year}.tif", ds.read(window=win), crs=ds.crs,
                                       transform=ds.window_transform(win), nodata=0)
    return paths


def test_cva_hand_values():
    b = np.array([[[0.0, 2.0]], [[1.0, 1.0]]], np.float32)  # 2 bands, 1 x 2 px
    a = np.array([[[2.0, 2.0]], [[1.0, 5.0]]], np.float32)
    from dinov3geo.tasks.change.classic import BandStats

    st = BandStats((0.0, 1.0), (1.0, 2.0), (0.0, 1.0), (1.0, 2.0))
    # z differences: band1 (2-0)/1 = 2, (2-2)/1 = 0; band2 (1-1)/2 = 0, (5-1)/2 = 2 -> sqrt(4 / 2)
    np.testing.assert_allclose(cva_score(b, a, st), [[np.sqrt(2), np.sqrt(2)]], rtol=1e-6)
    assert cva_score(b, b, band_stats(b, b, np.ones((1, 2), bool))).max() == 0


def test_cva_finds_a_real_planted_change(shared_data):
    with rasterio.open(shared_data / PUC / "pucallpa_2000.tif") as ds:
        before = ds.read(window=Window(300, 100, 120, 120)).astype(np.float32)
        other = ds.read(window=Window(50, 250, 30, 30)).astype(np.float32)  # real pixels from elsewhere
    after = before.copy()
    after[:, 40:70, 50:80] = other
    truth = np.zeros((120, 120), bool)
    truth[40:70, 50:80] = np.any(other != before[:, 40:70, 50:80], axis=0)
    res = classic_change(before, after, method="cva")
    assert res.threshold_source == "otsu"
    tp = (res.change & truth).sum()
    precision, recall = tp / res.change.sum(), tp / truth.sum()
    assert precision == 1.0 and recall > 0.6  # no false alarm outside the block, most of it found
    given = classic_change(before, after, method="cva", threshold=res.threshold)
    assert given.threshold_source == "given"
    np.testing.assert_array_equal(given.change, res.change)
    higher = classic_change(before, after, method="cva", threshold=2 * res.threshold).change
    assert higher.sum() < res.change.sum() and not (higher & ~res.change).any()


def test_ndvi_and_missing_bands():
    d = np.array([[[10.0]], [[30.0]], [[0.0]]], np.float32)  # red, nir, swir
    names = ["red", "nir", "swir16"]
    assert ndvi(d, names)[0, 0] == pytest.approx(0.5)
    d2 = d.copy()
    d2[1] = 10.0  # NDVI 0 after: a decrease of 0.5
    assert ndvi_difference(d, d2, names)[0, 0] == pytest.approx(0.5)
    assert ndvi_difference(d, d2, names, "increase")[0, 0] == 0
    assert ndvi_difference(d2, d, names, "both")[0, 0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"'red' band but the bands are \['b1', 'b2', 'b3'\]"):
        ndvi(d, ["b1", "b2", "b3"])
    with pytest.raises(ValueError, match="red"):
        NDVIDiffModel(["b1", "nir"])


def test_score_to_probability():
    p = score_to_probability(np.array([0.0, 1.0, 2.0, -1.0]), 1.0)
    np.testing.assert_allclose(p, [0, 0.5, 0.8, 0])


@pytest.mark.parametrize("kind", ["cva", "ndvi"])
def test_windowed_model_equals_arrays(puc_pair, tmp_path, kind):
    pair = coregister(puc_pair[2000], puc_pair[2020], band_names=NAMES, misregistration=False)
    arr = pair.read()
    if kind == "cva":
        st = band_stats(arr.before, arr.after, arr.valid)
        model, ref = CVAModel(st), cva_score(arr.before, arr.after, st)
    else:
        model, ref = NDVIDiffModel(NAMES), ndvi_difference(arr.before, arr.after, NAMES)
    out = predict_raster(model, pair.source(), tmp_path / f"{kind}.tif", window=64, progress=False, device="cpu")
    with rasterio.open(out) as ds:
        got = ds.read(1)
        assert ds.crs == pair.grid.crs and ds.transform == pair.grid.transform
    ok = arr.valid & np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(got), ok)
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-5, atol=1e-6)
