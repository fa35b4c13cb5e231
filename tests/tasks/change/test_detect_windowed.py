"""`detect_change` post-processes tile by tile: tiny tiles (regions cut everywhere) give the one-tile result, which
is the in-memory reference's (Otsu, forest loss with MMU, polygons); identical dates give no change."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin

from dinov3geo.io.vector import read_vector
from dinov3geo.tasks.change.deforestation import forest_loss
from dinov3geo.tasks.change.detect import detect_change
from dinov3geo.tasks.change.polygons import change_polygons
from dinov3geo.tasks.change.thresholds import otsu_threshold
from tests.conftest import write_raster
from tests.tasks.change.test_windowed import assert_same_polygons

NAMES = ["blue", "green", "red", "nir"]
H, W = 64, 72


def _scene(tmp_path, crs: str, transform, seed: int = 0):
    """Two dates with loss patches (red up, nir down, canopy gone), a forest mask and canopy heights."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    base = np.stack([300 + 80 * np.sin(xx / 9.0 + k) * np.cos(yy / 7.0) for k in range(4)])
    before = base + rng.normal(0, 12, base.shape)
    after = base + rng.normal(0, 12, base.shape)
    loss = np.zeros((H, W), bool)
    for _ in range(18):  # patches of 2..48 px, around the 0.1 ha MMU (10 px), many across 7-px tiles
        r, c = rng.integers(0, H - 6), rng.integers(0, W - 8)
        loss[r : r + rng.integers(1, 7), c : c + rng.integers(2, 9)] = True
    after[2][loss] += 900  # red
    after[3][loss] -= 250  # nir
    hb = np.where(xx < W - 10, 25.0, 2.0) + rng.normal(0, 1, (H, W))  # forest except a strip in the east
    ha = np.where(loss, 1.0, hb + rng.normal(0, 1, (H, W)))
    forest = (yy > 3).astype(np.uint8)  # the first rows are not forest
    kw = dict(crs=crs, transform=transform)
    b = write_raster(tmp_path / "s2_20190601.tif", np.clip(before, 1, 4000).astype(np.uint16), nodata=0, **kw)
    a = write_raster(tmp_path / "s2_20210601.tif", np.clip(after, 1, 4000).astype(np.uint16), nodata=0, **kw)
    chb = write_raster(tmp_path / "chm_2019.tif", hb.astype(np.float32), **kw)
    cha = write_raster(tmp_path / "chm_2021.tif", ha.astype(np.float32), **kw)
    fm = write_raster(tmp_path / "forest.tif", forest, **kw)
    x0, y0 = transform * (10, 50)
    x1, y1 = transform * (60, 5)
    aoi = gpd.GeoDataFrame({"name": ["west", "east"]}, geometry=[
        shapely.box(x0, y0, (x0 + x1) / 2, y1), shapely.box((x0 + x1) / 2, y0, x1, y1)], crs=crs)
    return b, a, chb, cha, fm, aoi


def _band(path):
    with rasterio.open(path) as ds:
        return ds.read(1)


GRIDS = {"utm": ("EPSG:32633", from_origin(500000.0, 4000000.0, 10.0, 10.0)),
         "wgs84": ("EPSG:4326", from_origin(-54.3, -3.1, 0.0001, 0.0001))}


@pytest.mark.parametrize("where", ["utm", "wgs84"])
def test_small_tiles_equal_one_tile_and_reference(tmp_path, where):
    crs, transform = GRIDS[where]
    b, a, chb, cha, fm, aoi = _scene(tmp_path, crs, transform)
    mmu = 0.1 if where == "utm" else 0.12
    kw = dict(band_names=NAMES, canopy_before=chb, canopy_after=cha, forest_mask=fm, aoi=aoi, mmu_ha=mmu,
              progress=False, device="cpu", window=64, misregistration_threshold_px=20)
    small = detect_change(b, a, tmp_path / "small", post_tile=7, **kw)
    big = detect_change(b, a, tmp_path / "big", post_tile=4096, **kw)
    for k in ("change_prob", "change", "change_score", "forest_loss"):
        np.testing.assert_array_equal(_band(small.paths[k]), _band(big.paths[k]), err_msg=k)
    ps, pb = read_vector(small.paths["polygons"]), read_vector(big.paths["polygons"])
    assert len(pb) >= 4 and small.n_polygons == len(ps)
    assert_same_polygons(pb, ps)
    assert small.score_threshold == big.score_threshold and small.threshold_source == "otsu"
    ss, sb = small.summary, big.summary
    for k in ("change_ha", "valid_ha", "valid_fraction", "aoi_ha"):
        assert ss[k] == pytest.approx(sb[k], rel=1e-12), k
    for k in ("forest_ha", "loss_ha_before_mmu", "loss_ha"):
        assert ss["forest_loss"][k] == pytest.approx(sb["forest_loss"][k], rel=1e-12), k
    for x, y in zip(ss["per_aoi"], sb["per_aoi"], strict=True):
        assert x["aoi"] == y["aoi"] and x["n_polygons"] == y["n_polygons"]
        assert x["loss_ha"] == pytest.approx(y["loss_ha"], rel=1e-9)
    assert json.loads(small.paths["summary"].read_text())["threshold"]["score_value"] == small.score_threshold

    # the in-memory reference, from the score the model wrote
    score = _band(big.paths["change_score"])
    valid = np.isfinite(score)
    assert otsu_threshold(score, valid) == big.score_threshold  # exactly
    prob = _band(big.paths["change_prob"])
    hb, ha = _band(chb), _band(cha)
    fl = forest_loss(height_before=hb, height_after=ha, forest=_band(fm), prob=prob, prob_threshold=0.5,
                     valid=valid, grid=big.pair.grid, mmu_ha=mmu)
    lossmap = _band(small.paths["forest_loss"])
    np.testing.assert_array_equal(lossmap == 1, fl.loss)
    np.testing.assert_array_equal(lossmap == 255, ~fl.valid)
    assert fl.loss.sum() < fl.loss_raw.sum()  # the MMU removed something
    ref = change_polygons(fl.loss, big.pair.grid, mmu_ha=mmu, connectivity=8, date_before="2019-06-01",
                          date_after="2021-06-01", prob=prob, height_before=hb, height_after=ha)
    assert_same_polygons(ref, ps, rel=1e-6)  # written and read back: GeoPackage coordinates
    assert small.loss_ha == pytest.approx(float(ref["area_ha"].sum()), rel=1e-6)


def test_identical_dates_give_no_change(tmp_path):
    crs, transform = GRIDS["utm"]
    b, _, chb, _, fm, _ = _scene(tmp_path, crs, transform)
    same = tmp_path / "copy_20210601.tif"
    same.write_bytes(b.read_bytes())
    for cm in ("cva", "ndvi"):
        r = detect_change(b, same, tmp_path / cm, classic_method=cm, band_names=NAMES, forest_mask=fm,
                          progress=False, device="cpu", post_tile=16)
        assert r.change_ha == 0 and r.loss_ha == 0 and r.n_polygons == 0 and r.polygons_ha == 0
        assert set(np.unique(_band(r.paths["change"]))) <= {0, 255} and (_band(r.paths["change"]) == 0).any()
        assert not (_band(r.paths["forest_loss"]) == 1).any()
        s = json.loads(r.paths["summary"].read_text())
        assert s["threshold"]["source"] == "otsu" and s["threshold"]["score_value"] is None
        assert any("nothing to separate" in w for w in s["warnings"])
        assert len(read_vector(r.paths["polygons"], allow_empty=True)) == 0
