"""Co-registration: pairs in different CRSs, overlap checks, phase-correlation misregistration, dates, arrays."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.warp import Resampling, calculate_default_transform, reproject
from rasterio.windows import Window
from scipy import ndimage

from dinov3geo.tasks.change.coregister import (
    MisregistrationWarning,
    coregister,
    coregister_arrays,
    date_of,
    normalise_date,
    phase_correlation,
    read_image_pair,
)
from tests.conftest import write_raster

PUC = "change_pairs/pucallpa_landsat_timeseries"
NAMES = ["swir16", "nir", "red", "green"]


def _crop(path, win):
    with rasterio.open(path) as ds:
        return ds.read(window=win), ds.window_transform(win), ds.crs, ds.nodata


@pytest.fixture
def puc_crops(shared_data, tmp_path):
    """Real 160x160 crops of the Pucallpa 2000 and 2020 composites (EPSG:4326, nodata 0)."""
    win = Window(300, 100, 160, 160)
    out = {}
    for year in (2000, 2020):
        arr, tr, crs, nd = _crop(shared_data / PUC / f"pucallpa_{year}.tif", win)
        out[year] = write_raster(tmp_path / f"pucallpa_{year}.tif", arr, crs=crs, transform=tr, nodata=nd)
    return out


def test_phase_correlation_recovers_subpixel_shifts():
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.normal(size=(128, 128)), 2)
    for d in [(1.3, -0.7), (-2.25, 0.4), (0.0, 0.0)]:
        b = ndimage.shift(a, d, order=1, mode="reflect")  # bilinear, as reprojection does
        dy, dx, peak = phase_correlation(a, b)
        assert dy == pytest.approx(d[0], abs=0.06) and dx == pytest.approx(d[1], abs=0.06)
        assert peak > 0.9
    _, _, peak = phase_correlation(a, rng.normal(size=a.shape))
    assert peak < 0.3


def test_pair_in_different_crs_is_reprojected_onto_date1(puc_crops, tmp_path):
    # date 2 written in UTM 18S: coregister must bring it back onto the EPSG:4326 date-1 grid
    with rasterio.open(puc_crops[2020]) as ds:
        src, crs, tr = ds.read(), ds.crs, ds.transform
        dtr, w, h = calculate_default_transform(crs, "EPSG:32718", ds.width, ds.height, *ds.bounds)
    utm = np.zeros((src.shape[0], h, w), dtype=src.dtype)
    reproject(src, utm, src_transform=tr, src_crs=crs, dst_transform=dtr, dst_crs="EPSG:32718",
              resampling=Resampling.cubic, src_nodata=0, dst_nodata=0)
    after = write_raster(tmp_path / "after_utm_2020.tif", utm, crs="EPSG:32718", transform=dtr, nodata=0)

    pair = coregister(puc_crops[2000], after, band_names=NAMES)
    assert pair.grid.crs.to_epsg() == 4326 and pair.grid.shape == (160, 160)
    assert pair.after.grid.same_as(pair.grid)
    assert pair.overlap.fraction > 0.97 and pair.overlap.valid_fraction > 0.9
    # 160 x 160 px of 0.000808 deg (~89.5 m) near 8.4 S: about 160^2 * 0.80 ha
    assert pair.overlap.area_ha == pytest.approx(160 * 160 * 0.80, rel=0.03)
    assert (pair.date_before, pair.date_after) == ("2000", "2020")
    assert pair.misregistration is not None and pair.misregistration.shift_px < 0.3
    arr = pair.read()
    inner = arr.valid.copy()
    inner[:5], inner[-5:], inner[:, :5], inner[:, -5:] = False, False, False, False
    for k in range(4):  # a UTM round trip of the real 2020 image matches the original on the date-1 grid
        r = np.corrcoef(arr.after[k][inner], src[k].astype(np.float32)[inner])[0, 1]
        assert r > 0.9


def test_known_offset_is_measured_and_warned(puc_crops, tmp_path):
    arr, tr, crs, nd = _crop(puc_crops[2000], Window(0, 0, 160, 160))
    res = tr.a
    shifted = rasterio.Affine(tr.a, 0, tr.c + 1.5 * res, 0, tr.e, tr.f + 0.5 * tr.e)  # 1.5 px east, 0.5 px south
    after = write_raster(tmp_path / "shifted.tif", arr, crs=crs, transform=shifted, nodata=nd)
    with pytest.warns(MisregistrationWarning, match="exceeds 0.5 px"):
        pair = coregister(puc_crops[2000], after, band_names=NAMES, dates=("2000-01-01", None))
    m = pair.misregistration
    assert m.dx_px == pytest.approx(1.5, abs=0.1) and m.dy_px == pytest.approx(0.5, abs=0.1)
    assert m.shift_m == pytest.approx(np.hypot(1.5, 0.5) * 89.0, rel=0.05)
    assert pair.overlap.fraction == pytest.approx((160 - 1.5) * (160 - 0.5) / 160**2, rel=1e-3)
    assert (pair.date_before, pair.date_after) == ("2000-01-01", None)
    assert pair.date_sources == ("user", "unknown")


def test_no_overlap_names_both_files(puc_crops, tmp_path):
    arr, tr, crs, nd = _crop(puc_crops[2020], Window(0, 0, 160, 160))
    far = rasterio.Affine(tr.a, 0, tr.c + 5.0, 0, tr.e, tr.f)
    after = write_raster(tmp_path / "elsewhere_2020.tif", arr, crs=crs, transform=far, nodata=nd)
    with pytest.raises(ValueError, match="do not overlap") as e:
        coregister(puc_crops[2000], after)
    assert "pucallpa_2000.tif" in str(e.value) and "elsewhere_2020.tif" in str(e.value)


def test_bands_without_common_names_error(puc_crops, tmp_path):
    arr, tr, crs, nd = _crop(puc_crops[2020], Window(0, 0, 160, 160))
    after = write_raster(tmp_path / "two_2020.tif", arr[:2], crs=crs, transform=tr, nodata=nd,
                         descriptions=["foo", "bar"])
    with pytest.raises(ValueError, match="no band in common"):
        coregister(puc_crops[2000], after)


def test_naip_pair_on_grids_one_pixel_apart(shared_data):
    d = shared_data / "aerial_timeseries/naip_m_4709963_se_14"
    a, b = sorted(d.glob("*.tif"))
    pair = coregister(a, b, misregistration=False)
    assert pair.grid.shape == (724, 934) and pair.after.grid.same_as(pair.grid)
    assert pair.overlap.fraction == pytest.approx(0.9984, abs=2e-4)  # 1 px row and column short
    assert (pair.date_before, pair.date_after) == ("2009-08-18", "2020-08-31")
    # windowed reads through the inference source equal the in-memory read
    src = pair.source()
    win = Window(100, 200, 64, 48)
    with rasterio.Env(), src.reader() as r:
        data, valid = r.read(win)
    mem = pair.read(win)
    np.testing.assert_array_equal(valid, mem.valid)
    np.testing.assert_array_equal(data, np.concatenate([mem.before, mem.after]))


def test_dates_from_names_and_user():
    assert normalise_date("20170829") == "2017-08-29"
    assert normalise_date("2017-08-29T10:50:19Z") == "2017-08-29"
    assert normalise_date("2000") == "2000"
    with pytest.raises(ValueError, match="cannot read date"):
        normalise_date("last summer")
    with pytest.raises(ValueError):
        normalise_date("2017-13-01")


def test_date_of_scene(shared_data):
    from dinov3geo.io import open_scene

    s = open_scene(shared_data / PUC / "pucallpa_1985.tif")
    assert date_of(s) == ("1985", "file name")
    s = open_scene(shared_data / "change_pairs/oscd/bercy/imgs_2")
    assert date_of(s) == ("2017-08-29", "metadata")


def test_array_pairs_and_levir_png(shared_data):
    d = shared_data / "change_pairs/levir_cd_samples"
    name = sorted((d / "A").glob("*.png"))[0].name
    pair = read_image_pair(d / "A" / name, d / "B" / name)
    assert pair.before.shape == (3, 256, 256) and pair.grid is None and pair.valid.all()
    assert pair.band_names == ("red", "green", "blue") and pair.stacked.shape == (6, 256, 256)
    b = np.ones((2, 4, 5), np.float32)
    a = b.copy()
    a[0, 1, 1] = np.nan
    b[1, 2, 3] = -9
    p = coregister_arrays(b, a, nodata=-9)
    assert not p.valid[1, 1] and not p.valid[2, 3] and p.valid.sum() == 18 and np.isfinite(p.after).all()
    with pytest.raises(ValueError, match="same"):
        coregister_arrays(b, a[:, :3])
