"""``dinov3geo canopy evaluate`` / ``summarise`` and the evaluate_rasters API on real GeoTIFFs."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import shapely
from rasterio.transform import from_origin

from dinov3geo.cli import main
from dinov3geo.tasks.canopy.evaluate import evaluate_rasters
from dinov3geo.tasks.canopy.labels import NoOverlapError

UTM = "EPSG:32633"
X0, Y0 = 500000.0, 4000300.0
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def truth(make_raster):
    rng = np.random.default_rng(0)
    arr = rng.gamma(2.0, 5.0, (300, 300)).astype(np.float32)
    arr[:5, :] = -9999.0
    return make_raster("truth.tif", arr, crs=UTM, transform=from_origin(X0, Y0, 1, 1), nodata=-9999.0), arr


def test_evaluate_same_grid_with_aoi_and_split(truth, make_raster, tmp_path):
    tpath, arr = truth
    pred = np.where(arr == -9999.0, np.nan, arr + 1.0).astype(np.float32)
    ppath = make_raster("pred.tif", pred, crs=UTM, transform=from_origin(X0, Y0, 1, 1), nodata=float("nan"))
    m = evaluate_rasters(ppath, tpath, tmp_path / "all", progress=False)
    assert m["n"] == 295 * 300 and m["mae"] == pytest.approx(1.0) and m["bias"] == pytest.approx(1.0)
    assert m["rmse"] == pytest.approx(1.0) and m["n_tiles"] == 4 and m["n_blocks"] > 0
    saved = json.loads((tmp_path / "all/metrics.json").read_text())
    assert saved["n"] == m["n"] and saved["inputs"]["truth_resampling"] == "bilinear"
    for png in ("pred_vs_true.png", "error_by_bin.png"):
        assert (tmp_path / "all" / png).read_bytes()[:8] == PNG
    # AOI (in another CRS) over the western half, and a split mask of the northern half
    aoi = gpd.GeoDataFrame(geometry=[shapely.box(X0, Y0 - 300, X0 + 150, Y0)], crs=UTM).to_crs("EPSG:4326")
    split = np.zeros((300, 300), bool)
    split[:150] = True
    m2 = evaluate_rasters(ppath, tpath, tmp_path / "part", aoi=aoi, split_mask=split, progress=False)
    assert abs(m2["n"] - 145 * 150) <= 300  # the reprojected box edge may gain/lose a column
    with pytest.raises(ValueError, match="split_mask has shape"):
        evaluate_rasters(ppath, tpath, tmp_path / "bad", split_mask=split[:10], progress=False)


def test_evaluate_coarser_prediction_averages_the_truth(make_raster, tmp_path):
    rng = np.random.default_rng(1)
    fine = rng.uniform(0, 30, (200, 200)).astype(np.float32)  # 0.5 m truth
    tpath = make_raster("t.tif", fine, crs=UTM, transform=from_origin(X0, Y0, 0.5, 0.5), nodata=-1.0)
    coarse = fine.reshape(100, 2, 100, 2).mean(axis=(1, 3))  # exactly what a 1 m sensor would see
    ppath = make_raster("p.tif", coarse, crs=UTM, transform=from_origin(X0, Y0, 1, 1))
    m = evaluate_rasters(ppath, tpath, tmp_path / "o", window=64, progress=False)
    assert m["inputs"]["truth_resampling"] == "average"
    assert m["n"] == 100 * 100 and m["mae"] < 1e-4 and m["r2"] == pytest.approx(1.0)


def test_cli_evaluate_and_errors(truth, make_raster, tmp_path, capsys):
    tpath, arr = truth
    ppath = make_raster("pred.tif", np.clip(arr, 0, None) * 0.9, crs=UTM, transform=from_origin(X0, Y0, 1, 1))
    aoi = tmp_path / "aoi.gpkg"
    gpd.GeoDataFrame({"name": ["stand"]}, geometry=[shapely.box(X0 + 10, Y0 - 200, X0 + 200, Y0 - 10)],
                     crs=UTM).to_file(aoi)
    rc = main(["-q", "canopy", "evaluate", "--pred", str(ppath), "--truth", str(tpath), "--aoi", str(aoi),
               "--out", str(tmp_path / "ev"), "--bins", "0,5,20"])
    assert rc == 0
    m = json.loads((tmp_path / "ev/metrics.json").read_text())
    assert m["n"] == 190 * 190 and m["bias"] < 0 and [b["bin"] for b in m["bins"]] == ["[0, 5)", "[5, 20)", "[20, inf)"]
    assert m["inputs"]["aoi"].endswith("aoi.gpkg")
    far = make_raster("far.tif", np.ones((10, 10), np.float32), crs=UTM, transform=from_origin(0, 10, 1, 1))
    capsys.readouterr()
    assert main(["canopy", "evaluate", "--pred", str(far), "--truth", str(tpath), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "does not overlap" in err and "truth.tif" in err and "Traceback" not in err
    with pytest.raises(NoOverlapError):
        evaluate_rasters(far, tpath, tmp_path / "y", progress=False)
    assert main(["canopy", "evaluate", "--pred", str(ppath), "--truth", str(tpath), "--out", str(tmp_path / "z"),
                 "--band", "3"]) == 1
    assert "band 3" in capsys.readouterr().err


def test_cli_help_and_summarise(truth, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["canopy", "--help"])
    out = capsys.readouterr().out
    assert "evaluate" in out and "summarise" in out
    assert main(["canopy"]) == 2
    tpath, _ = truth
    aoi = tmp_path / "aoi.geojson"
    gpd.GeoDataFrame({"name": ["a"]}, geometry=[shapely.box(X0 + 10, Y0 - 100, X0 + 60, Y0 - 50)],
                     crs=UTM).to_crs("EPSG:4326").to_file(aoi)
    assert main(["-q", "canopy", "summarise", str(tpath), "--aoi", str(aoi), "--out-csv", str(tmp_path / "s.csv"),
                 "--out-gpkg", str(tmp_path / "s.gpkg")]) == 0
    assert (tmp_path / "s.csv").read_text().splitlines()[0].startswith("name,area_ha,n_pixels,valid_share")
    assert (tmp_path / "s.gpkg").exists()
