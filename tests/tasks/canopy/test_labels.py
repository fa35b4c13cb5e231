"""Aligning canopy-height rasters onto image grids through the georeferencing."""

from __future__ import annotations

import numpy as np
import pytest
from rasterio.transform import from_origin

from dinov3geo.io.errors import MissingCRSError
from dinov3geo.io.grid import GridSpec
from dinov3geo.tasks.canopy.labels import NoOverlapError, align_chm, chm_resampling, load_image_and_chm

UTM = "EPSG:32633"


def _ramp_chm(make_raster, name="chm.tif", nodata=-9999.0):
    # 1 m CHM whose height equals the x distance (m) of the pixel centre from x0 = 500000
    x = np.arange(20) + 0.5
    arr = np.tile(x, (20, 1)).astype(np.float32)
    return make_raster(name, arr, crs=UTM, transform=from_origin(500000, 4000020, 1, 1), nodata=nodata)


def test_upsampling_uses_transforms_not_indices(make_raster):
    chm = _ramp_chm(make_raster)
    # a 0.5 m grid whose origin is off the CHM lattice by decimetres (as NEON BART)
    grid = GridSpec(UTM, from_origin(500002.3, 4000017.7, 0.5, 0.5), 10, 10)
    lab = align_chm(chm, grid)
    assert lab.resampling == "bilinear" and lab.valid.all()
    expected = 2.3 + 0.25 + 0.5 * np.arange(10)  # x of the target pixel centres; bilinear is exact on a ramp
    np.testing.assert_allclose(lab.heights, np.tile(expected, (10, 1)), atol=1e-3)
    assert lab.heights.dtype == np.float32


def test_downsampling_averages_and_skips_nodata(make_raster):
    rng = np.random.default_rng(0)
    arr = rng.uniform(0, 30, (8, 8)).astype(np.float32)
    arr[0, 0] = -9999.0  # one nodata cell in the first 2x2 block
    arr[4:6, 4:6] = -9999.0  # a whole block of nodata
    chm = make_raster("c.tif", arr, crs=UTM, transform=from_origin(500000, 4000008, 0.5, 0.5), nodata=-9999.0)
    grid = GridSpec(UTM, from_origin(500000, 4000008, 1.0, 1.0), 4, 4)
    assert chm_resampling(0.5, 1.0) == "average" and chm_resampling(1.0, 0.5) == "bilinear"
    lab = align_chm(chm, grid)
    assert lab.resampling == "average"
    blocks = arr.reshape(4, 2, 4, 2).astype(np.float64)
    means = np.where(blocks == -9999, np.nan, blocks)
    exp = np.array([[np.nanmean(means[i, :, j, :]) if np.isfinite(means[i, :, j, :]).any() else np.nan
                     for j in range(4)] for i in range(4)])
    assert not lab.valid[2, 2] and np.isnan(lab.heights[2, 2])
    np.testing.assert_allclose(lab.heights[lab.valid], exp[lab.valid], rtol=1e-5)
    assert lab.heights[0, 0] == pytest.approx(np.mean(arr[:2, :2].ravel()[1:]), rel=1e-5)  # nodata not averaged


def test_float64_huge_nodata_nan_and_negative_heights(make_raster):
    arr = np.full((6, 6), 3.0)
    arr[0, :] = -1.7e308  # Kootenay's float64 nodata (not representable in float32)
    arr[1, 0] = np.nan
    arr[2, 1] = -0.4
    path = make_raster("k.tif", arr, crs=UTM, transform=from_origin(500000, 4000006, 1, 1), nodata=-1.7e308)
    grid = GridSpec(UTM, from_origin(500000, 4000006, 1, 1), 6, 6)
    lab = align_chm(path, grid, resampling="nearest")
    assert lab.valid.sum() == 36 - 6 - 1
    assert not lab.valid[0].any() and not lab.valid[1, 0]
    assert lab.heights[2, 1] == 0.0 and np.nanmax(lab.heights) == 3.0  # clipped to 0
    flagged = align_chm(path, grid, resampling="nearest", negative="invalid")
    assert not flagged.valid[2, 1] and flagged.valid.sum() == 36 - 8
    kept = align_chm(path, grid, resampling="nearest", negative="keep")
    assert kept.heights[2, 1] == pytest.approx(-0.4)


def test_other_crs_and_partial_overlap(make_raster):
    chm = make_raster("c.tif", np.full((40, 40), 7.0, np.float32), crs=UTM,
                      transform=from_origin(500000, 4000040, 1, 1), nodata=-9999.0)
    # a geographic grid over the CHM's west half and beyond it to the west
    from rasterio.warp import transform_bounds

    w, s, e, n = transform_bounds(UTM, "EPSG:4326", 499980, 4000000, 500020, 4000040)
    grid = GridSpec.from_bounds(w, s, e, n, res=(e - w) / 20, crs="EPSG:4326")
    lab = align_chm(chm, grid)
    assert 0.2 < lab.valid.mean() < 0.8  # the western half is outside the CHM
    np.testing.assert_allclose(lab.heights[lab.valid], 7.0, rtol=1e-6)
    assert lab.valid[2:-2, -3].all() and not lab.valid[:, 0].any()


def test_clear_errors(make_raster, tmp_path):
    chm = _ramp_chm(make_raster)
    far = GridSpec(UTM, from_origin(600000, 4100000, 1, 1), 10, 10)
    with pytest.raises(NoOverlapError) as e:
        align_chm(chm, far)
    msg = str(e.value)
    assert "chm.tif" in msg and "500000" in msg and "600000" in msg and "does not overlap" in msg
    nocrs = make_raster("nocrs.tif", np.ones((4, 4), np.float32), crs=None, transform=from_origin(0, 4, 1, 1))
    with pytest.raises(MissingCRSError, match="nocrs.tif"):
        align_chm(nocrs, far)
    with pytest.raises(ValueError, match="band 2"):
        align_chm(chm, far, band=2)


def test_load_image_and_chm_target_res(make_raster):
    img = np.stack([np.full((40, 40), v, np.uint8) for v in (10, 20, 30)])
    image = make_raster("img.tif", img, crs=UTM, transform=from_origin(500000.2, 4000019.8, 0.25, 0.25))
    chm = _ramp_chm(make_raster)
    pair = load_image_and_chm(image, chm, target_res=0.5)
    assert pair.grid.res == (0.5, 0.5) and pair.image.shape == (3, 20, 20) and pair.heights.shape == (20, 20)
    assert pair.info["image_resampling"] == "average" and pair.info["chm_resampling"] == "bilinear"
    np.testing.assert_allclose(pair.image[:, 5, 5], [10, 20, 30])
    xc = 0.2 + 0.25 + 0.5 * np.arange(20)
    inner = pair.valid[:, 2:-2]
    np.testing.assert_allclose(pair.heights[:, 2:-2][inner], np.tile(xc[2:-2], (20, 1))[inner], atol=1e-3)
    own = load_image_and_chm(image, chm)  # image grid (0.25 m)
    assert own.grid.res == (0.25, 0.25) and own.info["image_resampling"] is None


def test_real_pairs(shared_data):
    d = shared_data / "aerial_rgb_chm"
    bart = load_image_and_chm(d / "neon_bart_2019/2019_BART_5_320000_4881000_image_crop.tif",
                              d / "neon_bart_2019/NEON_D01_BART_DP3_320000_4881000_CHM_crop.tif", target_res=1.0)
    assert bart.grid.shape == (111, 122) and bart.valid.mean() > 0.95
    # the 1 m grid starts 0.8 m east / 0.5 m south of the CHM lattice: aligned heights are interpolated
    assert abs(float(np.nanmean(bart.heights)) - 6.5) < 0.3
    koot = load_image_and_chm(d / "kootenay_drone_2016/kootenayOrtho.tif", d / "kootenay_drone_2016/kootenayCHM.tif")
    assert koot.info["n_valid"] == int(koot.valid.sum()) == 287 * 218 - 6814  # the ortho is valid everywhere
    assert koot.info["n_label_valid"] == 287 * 218 - 6814
    assert np.nanmin(koot.heights) >= 0 and np.nanmax(koot.heights) == pytest.approx(13.49, abs=0.01)
