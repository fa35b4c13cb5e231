"""Opening scenes from real files: band naming, nodata, CRS handling, windows, reprojection, STAC."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from dinov3geo.io import BandNotFoundError, MissingCRSError, RasterReadError, open_scene
from dinov3geo.io.sources import datetime_from_name, gdal_path


def test_rgb_byte_nodata_collar(shared_data):
    sc = open_scene(shared_data / "landsat/rasterio_RGB.byte.tif")
    assert sc.band_names == ("red", "green", "blue")
    assert sc.dtype == "uint8" and sc.grid.crs.to_epsg() == 32618
    chip = sc.read()
    with rasterio.open(shared_data / "landsat/rasterio_RGB.byte.tif") as ds:
        ref = ds.read()
        per_band = ds.read_masks() > 0
    # a pixel is valid where every band is valid (GDAL's dataset mask is the looser "any band")
    ref_valid = per_band.all(axis=0)
    np.testing.assert_array_equal(chip.valid, ref_valid)
    assert 0.6 < chip.valid_fraction < 0.7  # the README says about 33 % is collar
    np.testing.assert_array_equal(chip.data[:, chip.valid], ref[:, ref_valid])


def test_boundless_window_pads_and_masks(shared_data):
    sc = open_scene(shared_data / "landsat/rasterio_RGB.byte.tif", bands=["green"])
    h, w = sc.grid.shape
    win = Window(w - 100, h - 50, 256, 256)
    chip = sc.read(win)
    assert chip.data.shape == (1, 256, 256)
    assert not chip.valid[50:, :].any() and not chip.valid[:, 100:].any()
    with rasterio.open(shared_data / "landsat/rasterio_RGB.byte.tif") as ds:
        ref = ds.read(2, window=Window(w - 100, h - 50, 100, 50))
    np.testing.assert_array_equal(chip.data[0, :50, :100][chip.valid[:50, :100]], ref[chip.valid[:50, :100]])
    # the chip's transform is the grid transform shifted by the window offset
    assert chip.grid.transform == sc.grid.transform @ rasterio.Affine.translation(w - 100, h - 50)
    # a window entirely outside is all invalid, not an error
    assert not sc.read(Window(-300, -300, 64, 64)).valid.any()


def test_landsat_folder_with_mtl(shared_data):
    sc = open_scene(shared_data / "landsat/rstoolbox_LT05_224063_1988")
    assert sc.band_names == ("blue", "green", "red", "nir", "swir16", "lwir", "swir22")
    assert sc.datetime == datetime(1988, 8, 14, 13, 0, 47, 375019, tzinfo=UTC)
    assert sc.metadata["sensor"] == "TM"
    nir = sc.select(["B4", "red"])  # by sensor band id and by common name
    assert nir.band_names == ("nir", "red")
    chip = nir.read(Window(0, 0, 64, 64))
    with rasterio.open(shared_data / "landsat/rstoolbox_LT05_224063_1988/LT52240631988227CUB02_B4.TIF") as ds:
        np.testing.assert_array_equal(chip.data[0], ds.read(1, window=Window(0, 0, 64, 64)))
    with pytest.raises(BandNotFoundError, match="pan"):
        sc.select(["pan"])


def test_sentinel2_mixed_resolution_folder(shared_data):
    folder = shared_data / "change_pairs/oscd/bercy/imgs_2"
    sc = open_scene(folder)
    assert sc.band_names[:4] == ("coastal", "blue", "green", "red") and "nir08" in sc.band_names
    assert len(sc.band_names) == 13
    b02 = next(folder.glob("*_B02.tif"))
    with rasterio.open(b02) as ds:
        assert sc.grid.shape == ds.shape  # the 10 m grid
        ref10 = ds.read(1)
    assert sc.datetime == datetime(2017, 8, 29, 10, 50, 19, tzinfo=UTC)
    chip = sc.read()
    np.testing.assert_array_equal(chip.data[1], ref10)  # 10 m band unchanged
    # the 60 m band is resampled onto the 10 m grid; its mean is preserved to within a few percent
    b01 = next(folder.glob("*_B01.tif"))
    with rasterio.open(b01) as ds:
        m60 = ds.read(1).astype(float).mean()
    assert abs(chip.data[0].astype(float).mean() - m60) / m60 < 0.05
    assert chip.valid.mean() > 0.97  # no nodata declared; edges of the coarse bands may fall outside


def test_missing_crs_refused_unless_given(shared_data):
    f = shared_data / "change_pairs/forestgapr_cauaxi_als_chm/ALS_CHM_CAU_2012.tif"
    with pytest.raises(MissingCRSError, match="ALS_CHM_CAU_2012"):
        open_scene(f)
    sc = open_scene(f, crs="EPSG:31982")
    assert sc.grid.crs.to_epsg() == 31982
    assert sc.read().valid.all()
    # reprojecting the CRS-less file works through the assumed CRS
    ll = sc.reproject("EPSG:4326")
    chip = ll.read()
    assert ll.grid.crs.to_epsg() == 4326 and chip.valid.mean() > 0.9


@pytest.mark.parametrize(
    ("rel", "nodata", "dtype"),
    [
        ("aerial_rgb_chm/kootenay_drone_2016/kootenayCHM.tif", -1.7e308, "float64"),
        ("aerial_rgb_chm/neon_bart_2019/NEON_D01_BART_DP3_320000_4881000_CHM_crop.tif", -9999, "float32"),
        ("landsat/rstoolbox_LT05_224063_1988/LT52240631988227CUB02_B1.TIF", 255, "uint8"),
    ],
)
def test_odd_nodata_values(shared_data, rel, nodata, dtype):
    sc = open_scene(shared_data / rel)
    chip = sc.read()
    with rasterio.open(shared_data / rel) as ds:
        raw = ds.read(1)
        assert ds.nodata == pytest.approx(nodata)
    expect_valid = raw != np.asarray(nodata, raw.dtype)
    assert sc.dtype == dtype
    np.testing.assert_array_equal(chip.valid, expect_valid)
    assert np.isfinite(chip.data[0][chip.valid]).all()


def test_kootenay_nodata_count(shared_data):
    chip = open_scene(shared_data / "aerial_rgb_chm/kootenay_drone_2016/kootenayCHM.tif").read()
    assert int((~chip.valid).sum()) == 6814  # stated in the data README


def test_user_nodata_override(make_raster):
    arr = np.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]]], np.uint16)
    p = make_raster("a.tif", arr)  # no nodata declared
    assert open_scene(p).read().valid.all()
    chip = open_scene(p, nodata=2).read()
    np.testing.assert_array_equal(chip.valid, [[True, False], [True, True]])
    assert chip.data[0, 0, 1] == 0  # invalid pixels are filled


def test_nan_nodata_and_internal_mask(tmp_path):
    arr = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    arr[0, 0, 0] = np.nan
    p = tmp_path / "m.tif"
    with rasterio.open(p, "w", driver="GTiff", width=4, height=4, count=1, dtype="float32", crs="EPSG:3857",
                       transform=from_origin(1000, 2000, 1, 1)) as ds:
        ds.write(arr)
        m = np.full((4, 4), 255, np.uint8)
        m[3, 3] = 0
        ds.write_mask(m)
    chip = open_scene(p).read()
    assert not chip.valid[0, 0] and not chip.valid[3, 3] and chip.valid.sum() == 14


def test_band_names_and_selection(make_raster):
    p = make_raster("x.tif", np.zeros((4, 8, 8), np.uint8))
    sc = open_scene(p, band_names=["red", "green", "blue", "nir"])
    assert sc.select(["nir", "b1"]).band_names == ("nir", "red")
    assert sc.select(["4", 2, " 1"]).band_names == ("nir", "green", "red")   # digit strings from a CLI
    with pytest.raises(BandNotFoundError, match="'5'"):
        sc.select(["5"])
    with pytest.raises(BandNotFoundError, match="swir16"):
        open_scene(p, bands=["swir16"])
    with pytest.raises(ValueError, match="band_names"):
        open_scene(p, band_names=["a", "b"])


def test_descriptions_become_names(shared_data):
    sc = open_scene(shared_data / "sentinel2/rstoolbox_sen2_amazon/sen2_L2A_12band_dn.tif")
    assert sc.band_names[:4] == ("coastal", "blue", "green", "red")
    assert sc.band("B8A").name == "nir08" and sc.band("b9").name == "nir08"


def test_reproject_to_target_grid(shared_data):
    sc = open_scene(shared_data / "landsat/rasterio_RGB.byte.tif", target_crs="EPSG:4326")
    assert sc.grid.crs.to_epsg() == 4326
    chip = sc.read()
    # the nodata collar stays masked after reprojection; valid share similar to the source
    assert 0.55 < chip.valid_fraction < 0.75
    coarse = open_scene(shared_data / "landsat/rasterio_RGB.byte.tif", res=600)
    assert coarse.grid.res == (600, 600) and coarse.grid.width == 396


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00not really a tiff")
    with pytest.raises(RasterReadError, match="broken.tif"):
        open_scene(bad)
    with pytest.raises(RasterReadError, match="nope.tif"):
        open_scene(tmp_path / "nope.tif")


def test_stac_item_local_assets(tmp_path, make_raster):
    tr = from_origin(600000, 5000000, 10, 10)
    make_raster("B04.tif", np.full((16, 16), 4, np.uint16), crs="EPSG:32632", transform=tr)
    make_raster("B08.tif", np.full((16, 16), 8, np.uint16), crs="EPSG:32632", transform=tr)
    item = {
        "type": "Feature", "stac_version": "1.0.0", "id": "S2_TEST_ITEM",
        "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json"],
        "geometry": {"type": "Polygon", "coordinates": [[[9, 45], [9.1, 45], [9.1, 45.1], [9, 45.1], [9, 45]]]},
        "bbox": [9, 45, 9.1, 45.1],
        "properties": {"datetime": "2021-06-01T10:20:30Z"},
        "links": [],
        "assets": {
            "red": {"href": "./B04.tif", "type": "image/tiff; application=geotiff", "roles": ["data"],
                    "eo:bands": [{"name": "B04", "common_name": "red"}]},
            "nir": {"href": "./B08.tif", "type": "image/tiff; application=geotiff", "roles": ["data"],
                    "eo:bands": [{"name": "B08", "common_name": "nir"}]},
            "thumbnail": {"href": "./thumb.png", "type": "image/png", "roles": ["thumbnail"]},
        },
    }
    path = tmp_path / "item.json"
    path.write_text(json.dumps(item))
    sc = open_scene(path)
    assert sc.id == "S2_TEST_ITEM" and sc.band_names == ("red", "nir")
    assert sc.datetime == datetime(2021, 6, 1, 10, 20, 30, tzinfo=UTC)
    chip = sc.read()
    assert (chip.data[0] == 4).all() and (chip.data[1] == 8).all()
    assert sc.select(["B08"]).band_names == ("nir",)
    # an unreadable asset is reported by its asset key
    item["assets"]["nir"]["href"] = "./missing_B08.tif"
    path.write_text(json.dumps(item))
    with pytest.raises(RasterReadError, match="'nir'"):
        open_scene(path)


def test_remote_hrefs_use_vsicurl():
    assert gdal_path("https://example.com/a.tif") == "/vsicurl/https://example.com/a.tif"
    assert gdal_path("s3://bucket/key.tif") == "/vsis3/bucket/key.tif"
    assert gdal_path("/data/x.tif") == "/data/x.tif"


def test_datetime_from_names():
    assert datetime_from_name("m_4709963_se_14_1_20200831.tif") == datetime(2020, 8, 31, tzinfo=UTC)
    assert datetime_from_name("taizhou_2003-02-06_L7ETM.tif") == datetime(2003, 2, 6, tzinfo=UTC)
    assert datetime_from_name("T31UDQ_20170829T105019_B02.tif") == datetime(2017, 8, 29, 10, 50, 19, tzinfo=UTC)
    assert datetime_from_name("pucallpa_2020.tif") is None
    assert datetime_from_name("tile_99999999.tif") is None


def test_no_geotransform_refused(shared_data):
    with pytest.raises(RasterReadError, match="no geotransform"):
        open_scene(shared_data / "change_pairs/oscd/bercy/cm/bercy-cm.tif", crs="EPSG:4326")


def test_vrt_and_naip_four_band(shared_data, tmp_path):
    from rasterio.shutil import copy as rio_copy

    src = shared_data / "aerial_timeseries/naip_m_4709963_se_14/m_4709963_se_14_1_20090818.tif"
    vrt = tmp_path / "naip.vrt"
    rio_copy(str(src), str(vrt), driver="VRT")
    a = open_scene(src, band_names=["red", "green", "blue", "nir"])
    b = open_scene(vrt, band_names=["red", "green", "blue", "nir"])
    assert a.grid.same_as(b.grid) and a.datetime == datetime(2009, 8, 18, tzinfo=UTC)
    win = Window(100, 200, 128, 96)
    ca, cb = a.select(["nir", "red"]).read(win), b.select(["nir", "red"]).read(win)
    np.testing.assert_array_equal(ca.data, cb.data)
    np.testing.assert_array_equal(ca.valid, cb.valid)
    with rasterio.open(src) as ds:
        np.testing.assert_array_equal(ca.data[0], ds.read(4, window=win))


def test_list_of_single_band_files_on_one_grid(shared_data):
    folder = shared_data / "change_pairs/oscd/aguasclaras/imgs_1"
    files = sorted(folder.glob("*_B0[2348].tif"))
    sc = open_scene(files)
    assert sc.band_names == ("blue", "green", "red", "nir")
    assert sc.read().data.shape == (4, 471, 525)


def test_naip_dates_differ_in_grid_and_align_on_request(shared_data):
    d = shared_data / "aerial_timeseries/naip_m_4709963_se_14"
    a = open_scene(d / "m_4709963_se_14_1_20090818.tif")
    b = open_scene(d / "m_4709963_se_14_1_20200831.tif")
    assert not a.grid.same_as(b.grid)
    b_on_a = b.with_grid(a.grid, resampling="nearest")
    chip = b_on_a.read()
    assert chip.data.shape == (4, a.grid.height, a.grid.width)
    # the 2020 grid is offset by 1 m (0.2 px) in x and y: nearest resampling keeps the pixel indices
    assert b.grid.transform.c == a.grid.transform.c - 1 and b.grid.transform.f == a.grid.transform.f - 1
    with rasterio.open(d / "m_4709963_se_14_1_20200831.tif") as ds:
        raw = ds.read(1)
    np.testing.assert_array_equal(chip.data[0, :700, :900], raw[:700, :900])
    assert not chip.valid[723:].any()  # the 2020 raster has one row fewer: the last row is outside


def test_file_covering_part_of_a_larger_grid(make_raster):
    """A file on the grid's lattice but smaller than the grid: only its footprint is valid (no crash)."""
    from dinov3geo.io import GridSpec

    p = make_raster("small.tif", np.full((1, 50, 40), 7, np.uint16))
    sc = open_scene(p)
    big = GridSpec(sc.grid.crs, sc.grid.transform, 200, 120)
    chip = sc.with_grid(big).read(Window(30, 0, 64, 64))
    assert chip.valid.sum() == 10 * 50 and (chip.data[0][chip.valid] == 7).all()
    assert (chip.data[0][~chip.valid] == 0).all()
    assert not sc.with_grid(big).read(Window(96, 0, 64, 64)).valid.any()
    # reprojected onto a grid with another origin: outside the footprint is invalid too
    shifted = GridSpec.from_bounds(*(np.array(sc.grid.bounds) + [-300, -300, 300, 300]), res=10, crs=sc.grid.crs)
    c2 = sc.with_grid(shifted).read()
    assert c2.valid.sum() == 50 * 40


@pytest.mark.parametrize("bands", [None, ["blue", "red"]])
def test_inner_windows_equal_boundless_reads(shared_data, bands):
    """Windows inside the grid (decoded straight into the output) give the same pixels, masks and fill as the
    same pixels cut out of a window that reaches past the grid (the general path)."""
    sc = open_scene(shared_data / "landsat/rasterio_RGB.byte.tif", bands=bands)
    h, w = sc.grid.shape
    big = sc.read(Window(-7, h - 300, 400, 320), fill=0)  # past the left and bottom edges
    inner = Window(10, h - 290, 300, 250)  # inside the grid, crossing the nodata collar
    for fill in (0, 17):
        chip = sc.read(inner, fill=fill)
        ref = sc.read(Window(-7, h - 300, 400, 320), fill=fill)
        sl = (slice(10, 260), slice(17, 317))
        np.testing.assert_array_equal(chip.valid, ref.valid[sl])
        np.testing.assert_array_equal(chip.data, ref.data[(slice(None), *sl)])
        assert 0 < chip.valid.mean() < 1 and (chip.data[:, ~chip.valid] == fill).all()
    assert big.data.dtype == chip.data.dtype == np.uint8
