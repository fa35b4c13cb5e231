"""End-to-end tests of predict_raster: seams, masking, georeferencing, COG output, resume, inputs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import torch
from rasterio.transform import from_origin

from dinov3geo.inference import (
    BackboneFeatures,
    MeanFilter,
    TorchRasterModel,
    parts_dir,
    predict_raster,
)
from dinov3geo.io.cog import validate_cog
from dinov3geo.io.grid import GridSpec
from tests.conftest import write_raster
from tests.inference.conftest import ConvNet, CountingMeanFilter, smooth_field

TRANSFORM = from_origin(500000.0, 4000000.0, 10.0, 10.0)
RUN = dict(window=64, overlap=16, block_size=96, blocksize=128, progress=False)


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


# ---------------------------------------------------------------------------------------------- seams
@pytest.mark.parametrize("shape", [(300, 430), (193, 257)])
def test_blended_output_equals_whole_image_result(tmp_path: Path, shape: tuple[int, int]) -> None:
    """No seams: with margins >= the receptive field, tiled inference equals whole-image inference."""
    img = smooth_field(*shape, bands=2)
    src = write_raster(tmp_path / "in.tif", img, transform=TRANSFORM)
    model = MeanFilter(5, bands=2)
    out = predict_raster(model, src, tmp_path / "out.tif", **RUN)
    got = _read(out)
    ref = model.whole_image(img)
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=0)
    # the seam check proper: the jump across every window border is the same as in the reference
    for c in range(48, shape[1] - 1, 48):
        np.testing.assert_allclose(np.diff(got[:, :, c - 1 : c + 2]), np.diff(ref[:, :, c - 1 : c + 2]), atol=2e-2)


def test_nonlinear_conv_model_matches_whole_image(tmp_path: Path) -> None:
    img = smooth_field(150, 170, bands=2) / 1000
    src = write_raster(tmp_path / "in.tif", img, transform=TRANSFORM)
    net = ConvNet(2).eval()
    model = TorchRasterModel(net, 1, ["y"], receptive_margin=2, in_bands=2)
    out = predict_raster(model, src, tmp_path / "out.tif", window=48, overlap=12, block_size=64, progress=False)
    with torch.no_grad():
        ref = net(torch.from_numpy(img)[None])[0].numpy()
    np.testing.assert_allclose(_read(out), ref, atol=1e-5)


def test_margin_smaller_than_receptive_field_is_refused(tmp_path: Path) -> None:
    src = write_raster(tmp_path / "in.tif", smooth_field(100, 100), transform=TRANSFORM)
    with pytest.raises(ValueError, match="receptive margin"):
        predict_raster(MeanFilter(9), src, tmp_path / "o.tif", window=64, overlap=4, progress=False)


# ---------------------------------------------------------------------------------------------- output
def test_cog_keeps_crs_transform_nodata_and_band_names(tmp_path: Path) -> None:
    tr = from_origin(300000.0, 5100000.0, 2.5, 2.5)
    src = write_raster(tmp_path / "in.tif", smooth_field(210, 180, bands=3), crs="EPSG:32618", transform=tr)
    out = predict_raster(MeanFilter(3, bands=3), src, tmp_path / "sub" / "out.tif", **RUN)
    ok, errors, _ = validate_cog(out)
    assert ok, errors
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 32618
        assert ds.transform == tr
        assert (ds.height, ds.width, ds.count) == (210, 180, 3)
        assert math.isnan(ds.nodata)
        assert ds.descriptions == ("mean3_1", "mean3_2", "mean3_3")
        assert ds.tags()["dinov3geo_window"] == "64"
        assert ds.overviews(1) == [2]  # 210 px > one 128 px COG tile
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.tif"]  # no parts or staging leftovers


def test_raster_smaller_than_one_window_is_padded_not_dropped(tmp_path: Path) -> None:
    img = smooth_field(23, 37)
    src = write_raster(tmp_path / "tiny.tif", img, transform=TRANSFORM)
    model = MeanFilter(3)
    out = predict_raster(model, src, tmp_path / "out.tif", window=64, overlap=16, progress=False)
    got = _read(out)
    assert got.shape == (1, 23, 37)
    np.testing.assert_allclose(got, model.whole_image(img), rtol=1e-6)


def test_input_nodata_is_output_nodata_and_empty_windows_are_skipped(tmp_path: Path) -> None:
    img = smooth_field(256, 256)
    img[:, :, :140] = -9999  # left part nodata: several windows hold no valid pixel
    img[:, 200:210, 200:210] = -9999  # a hole
    src = write_raster(tmp_path / "in.tif", img, transform=TRANSFORM, nodata=-9999)
    model = CountingMeanFilter()
    out = predict_raster(model, src, tmp_path / "out.tif", batch_size=3, **RUN)
    got = _read(out)[0]
    invalid = img[0] == -9999
    assert np.isnan(got[invalid]).all()
    assert np.isfinite(got[~invalid]).all()
    n_all = math.ceil((256 - 64) / 48 + 1) ** 2
    windows_with_data = 5 * 3  # columns starting at 96, 144, 192 (of 5) hold valid pixels
    assert model.windows == windows_with_data < n_all


def test_aoi_in_another_crs_masks_output_and_skips_windows(tmp_path: Path) -> None:
    img = smooth_field(240, 240)
    src = write_raster(tmp_path / "in.tif", img, transform=TRANSFORM, crs="EPSG:32633")
    grid = GridSpec("EPSG:32633", TRANSFORM, 240, 240)
    # a circle in the raster's upper-left quarter, written as GeoJSON in EPSG:4326
    cx, cy = TRANSFORM * (60, 60)
    circle = shapely.Point(cx, cy).buffer(450)
    aoi_file = tmp_path / "aoi.geojson"
    gpd.GeoDataFrame(geometry=[circle], crs="EPSG:32633").to_crs("EPSG:4326").to_file(aoi_file)
    model = CountingMeanFilter()
    out = predict_raster(model, src, tmp_path / "out.tif", aoi=aoi_file, **RUN)
    got = _read(out)[0]
    from dinov3geo.io.vector import aoi_geometry, aoi_mask

    inside = aoi_mask(aoi_geometry(aoi_file, grid.crs), grid)
    assert 6000 < inside.sum() < 6700  # ~pi * 45^2 pixels
    assert np.isnan(got[~inside]).all()
    ref = model.whole_image(img)[0]
    np.testing.assert_allclose(got[inside], ref[inside], rtol=2e-6)
    assert model.windows == 9  # of 25: windows away from the circle are never read

    far = tmp_path / "far.geojson"   # an AOI elsewhere on Earth is an error, not an empty map
    gpd.GeoDataFrame(geometry=[shapely.Point(10.0, 46.0).buffer(0.01)], crs="EPSG:4326").to_file(far)
    with pytest.raises(ValueError, match="does not overlap the input"):
        predict_raster(model, src, tmp_path / "out_far.tif", aoi=far, **RUN)
    assert not (tmp_path / "out_far.tif").exists()


# ---------------------------------------------------------------------------------------------- resume
def test_crash_then_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    img = smooth_field(330, 300, bands=2)
    src = write_raster(tmp_path / "in.tif", img, transform=TRANSFORM)
    ref = predict_raster(MeanFilter(3, 2), src, tmp_path / "ref.tif", batch_size=2, **RUN)

    out = tmp_path / "out.tif"
    crashing = CountingMeanFilter(3, 2, fail_after=9)
    with pytest.raises(RuntimeError, match="simulated crash"):
        predict_raster(crashing, src, out, batch_size=2, **RUN)
    assert not out.exists()  # nothing half-written at the final path
    manifest = json.loads((parts_dir(out) / "manifest.json").read_text())
    n_done = len(manifest["done"])
    assert 0 < n_done < 16

    resumed = CountingMeanFilter(3, 2)
    predict_raster(resumed, src, out, batch_size=2, **RUN)
    total = CountingMeanFilter(3, 2)
    predict_raster(total, src, tmp_path / "again.tif", batch_size=2, **RUN)
    assert 0 < resumed.windows < total.windows  # finished blocks were not recomputed
    np.testing.assert_array_equal(_read(out), _read(ref))
    assert not parts_dir(out).exists()


def test_changed_settings_do_not_reuse_parts(tmp_path: Path) -> None:
    src = write_raster(tmp_path / "in.tif", smooth_field(200, 200), transform=TRANSFORM)
    out = tmp_path / "out.tif"
    with pytest.raises(RuntimeError):
        predict_raster(CountingMeanFilter(fail_after=4), src, out, **RUN)
    other = CountingMeanFilter(5)  # another model: its parts must not be mixed in
    predict_raster(other, src, out, **RUN)
    np.testing.assert_allclose(_read(out), MeanFilter(5).whole_image(smooth_field(200, 200)), rtol=2e-6)


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    img = smooth_field(320, 320)
    src = write_raster(tmp_path / "in.tif", img, transform=TRANSFORM)
    out = tmp_path / "out.tif"
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        from dinov3geo.inference import predict_raster
        from tests.inference.conftest import CountingMeanFilter

        predict_raster(CountingMeanFilter(3, delay=0.15), {str(src)!r}, {str(out)!r}, window=64, overlap=16, block_size=96,
                       blocksize=128, batch_size=2, progress=False)
    """))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    manifest = parts_dir(out) / "manifest.json"
    deadline = time.time() + 60
    n_done = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if manifest.exists():
                n_done = len(json.loads(manifest.read_text())["done"])
                if n_done >= 2:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert 2 <= n_done < 25
    model = CountingMeanFilter(3)
    predict_raster(model, src, out, batch_size=2, **RUN)
    full = 49  # 7 x 7 windows
    assert model.windows < full
    np.testing.assert_allclose(_read(out), MeanFilter(3).whole_image(img), rtol=2e-6)
    ref = predict_raster(MeanFilter(3), src, tmp_path / "ref.tif", batch_size=2, **RUN)
    np.testing.assert_array_equal(_read(out), _read(ref))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_single_thread_mode_gives_identical_output(tmp_path: Path) -> None:
    src = write_raster(tmp_path / "in.tif", smooth_field(200, 260, bands=2), transform=TRANSFORM)
    a = predict_raster(MeanFilter(3, 2), src, tmp_path / "a.tif", **RUN)
    b = predict_raster(MeanFilter(3, 2), src, tmp_path / "b.tif", threads=False, read_threads=1, **RUN)
    c = predict_raster(MeanFilter(3, 2), src, tmp_path / "c.tif", read_threads=3, **RUN)
    np.testing.assert_array_equal(_read(a), _read(b))
    np.testing.assert_array_equal(_read(a), _read(c))


def test_strip_reads_equal_window_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows cut from one strip read (the default) give the same output as one read per window, with an
    AOI cutting through windows and uint16 input that reaches the model as float32."""
    from dinov3geo.inference import engine

    field = smooth_field(230, 300, bands=2)
    img = ((field - field.min()) * 1000 + 500).astype(np.uint16)
    src = write_raster(tmp_path / "in.tif", img, transform=TRANSFORM)
    cx, cy = TRANSFORM * (150, 115)
    aoi = shapely.Point(cx, cy).buffer(900)
    sizes: list[int] = []
    read_strip = engine._read_strip

    def counting(cfg, reader, cells, *rest):  # noqa: ANN001, ANN002, ANN202
        sizes.append(len(cells))
        return read_strip(cfg, reader, cells, *rest)

    monkeypatch.setattr(engine, "_read_strip", counting)
    a = predict_raster(MeanFilter(3, 2), src, tmp_path / "a.tif", aoi=aoi, aoi_crs="EPSG:32633", **RUN)
    assert max(sizes) > 1
    sizes.clear()
    monkeypatch.setattr(engine, "_STRIP_BYTES", 1)  # every strip holds one window
    b = predict_raster(MeanFilter(3, 2), src, tmp_path / "b.tif", aoi=aoi, aoi_crs="EPSG:32633", **RUN)
    assert set(sizes) == {1}
    got = _read(a)
    np.testing.assert_array_equal(got, _read(b))
    assert np.isfinite(got).any() and np.isnan(got).any()  # the AOI cut through the raster
    whole = predict_raster(MeanFilter(3, 2), src, tmp_path / "c.tif", **RUN)  # uint16 in, no AOI
    np.testing.assert_allclose(_read(whole), MeanFilter(3, 2).whole_image(img.astype(np.float32)), rtol=2e-6)


# ---------------------------------------------------------------------------------------------- inputs
def test_mosaic_of_scenes_in_two_crs(tmp_path: Path) -> None:
    img = smooth_field(120, 200)
    left = write_raster(tmp_path / "left.tif", img[:, :, :110], transform=TRANSFORM)
    right_tr = from_origin(500000.0 + 100 * 10, 4000000.0, 10.0, 10.0)
    right = write_raster(tmp_path / "right.tif", img[:, :, 100:], transform=right_tr)
    model = MeanFilter(3)
    out = predict_raster(model, [left, right], tmp_path / "out.tif", **RUN)
    with rasterio.open(out) as ds:
        assert (ds.width, ds.height) == (200, 120) and ds.transform == TRANSFORM
        got = ds.read()
    np.testing.assert_allclose(got, model.whole_image(img), rtol=2e-6)


def test_tile_store_input(tmp_path: Path) -> None:
    from dinov3geo.ingest.ingest import ingest

    img = (smooth_field(200, 200, bands=3) / 20).astype(np.uint16)
    src = write_raster(tmp_path / "in.tif", img, transform=TRANSFORM, nodata=0)
    store = tmp_path / "tiles.zarr"
    ingest([src], store, tile_size=64, progress=False, min_valid=0.01)
    model = MeanFilter(3, 3)
    out = predict_raster(model, store, tmp_path / "out.tif", **RUN)
    got = _read(out)
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 32633
        col, row = ~ds.transform * (TRANSFORM.c, TRANSFORM.f)
    r0, c0 = round(row), round(col)
    assert r0 >= 0 and c0 >= 0
    sub = got[:, r0 : r0 + 200, c0 : c0 + 200]
    ref = model.whole_image(img.astype(np.float32))
    np.testing.assert_allclose(sub[:, 2:-2, 2:-2], ref[:, 2:-2, 2:-2], rtol=1e-5)


def test_backbone_features_at_patch_resolution(tmp_path: Path) -> None:
    from dinov3geo.models import build_backbone

    torch.manual_seed(0)
    bb = build_backbone("vit_tiny_test", in_chans=4).eval()
    model = BackboneFeatures(bb, value_scale=1e-4)
    img = (smooth_field(100, 130, bands=4)).astype(np.uint16)
    src = write_raster(tmp_path / "in.tif", img, transform=TRANSFORM)
    out = predict_raster(model, src, tmp_path / "feat.tif", window=128, overlap=64, block_size=128,
                         progress=False)
    with rasterio.open(out) as ds:
        assert ds.count == 64 and ds.descriptions[0] == "feat_000"
        assert (ds.height, ds.width) == (7, 9)  # ceil(100 / 16), ceil(130 / 16)
        assert ds.transform == TRANSFORM * rasterio.Affine.scale(16)
        feats = ds.read()
    assert np.isfinite(feats).all()
    # the top-left patch is dominated by the first window: compare with the model on that window alone
    x = torch.from_numpy(img[:, :64, :64].astype(np.float32))[None]
    with torch.inference_mode():
        direct = model(x, torch.ones(1, 64, 64, dtype=torch.bool))[0].numpy()
    np.testing.assert_allclose(feats[:, 0, 0], direct[:, 0, 0], rtol=1e-4, atol=1e-4)


def test_bf16_autocast_on_cpu_runs(tmp_path: Path) -> None:
    img = smooth_field(100, 100, bands=2) / 1000
    src = write_raster(tmp_path / "in.tif", img, transform=TRANSFORM)
    net = ConvNet(2).eval()
    model = TorchRasterModel(net, 1, receptive_margin=2)
    a = _read(predict_raster(model, src, tmp_path / "a.tif", amp="bf16", **RUN))
    b = _read(predict_raster(model, src, tmp_path / "b.tif", amp=None, **RUN))
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(a, b, atol=0.05)


@pytest.mark.distributed
def test_dask_local_cluster_gives_identical_output(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    src = write_raster(tmp_path / "in.tif", smooth_field(260, 250, bands=2), transform=TRANSFORM)
    local = predict_raster(MeanFilter(3, 2), src, tmp_path / "local.tif", **RUN)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        out = predict_raster(MeanFilter(3, 2), src, tmp_path / "dask.tif", scheduler=client, **RUN)
    np.testing.assert_array_equal(_read(out), _read(local))
    assert validate_cog(out)[0]


def test_user_grid_and_shapely_aoi_with_crs(tmp_path: Path) -> None:
    img = smooth_field(200, 200)
    src = write_raster(tmp_path / "in.tif", img, transform=TRANSFORM)
    grid = GridSpec("EPSG:32633", from_origin(500200.0, 3999800.0, 20.0, 20.0), 70, 60)  # coarser, offset
    lon_lat_box = gpd.GeoSeries([shapely.box(*grid.bounds)], crs=grid.crs).to_crs("EPSG:4326").iloc[0]
    aoi = lon_lat_box.buffer(-0.001)  # inside the grid, in degrees
    out = predict_raster(MeanFilter(3), src, tmp_path / "out.tif", out_grid=grid, aoi=aoi, aoi_crs="EPSG:4326",
                         **RUN)
    with rasterio.open(out) as ds:
        assert GridSpec.from_dataset(ds).same_as(grid)
        got = ds.read(1)
    assert np.isnan(got[0]).all() and np.isnan(got[:, 0]).all()  # outside the shrunken AOI
    # grid columns 90+ (x >= 501999 m) lie past the input raster's right edge: nodata
    assert np.isnan(got[:, -1]).all()
    assert np.isfinite(got[10:40, 10:60]).all()


def test_default_overlap_respects_the_receptive_margin() -> None:
    from dinov3geo.inference import make_layout

    lay = make_layout(MeanFilter(41), 1000, 1000, window=64)
    assert lay.overlap >= 2 * 20 and lay.ramp >= 2
    with pytest.raises(ValueError, match="receptive margin"):
        make_layout(MeanFilter(41), 1000, 1000, window=64, overlap=16)


def test_two_dates_stacked_for_a_change_model(tmp_path: Path) -> None:
    from dinov3geo.inference import StackSource

    t0, t1 = smooth_field(150, 160, seed=1), smooth_field(150, 160, seed=2)
    t1[:, :20, :] = -1  # nodata in the second date only
    a = write_raster(tmp_path / "t0.tif", t0, transform=TRANSFORM)
    b = write_raster(tmp_path / "t1.tif", t1, transform=TRANSFORM, nodata=-1)

    class Difference(MeanFilter):
        def __init__(self) -> None:
            super().__init__(3, bands=2)
            self.out_bands, self.band_names = 1, ("delta",)

        def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            y = super().forward(x, valid)
            return y[:, 1:2] - y[:, 0:1]

    stack = StackSource([a, b])
    assert stack.count == 2 and stack.band_names[0].startswith("t0_") and stack.band_names[1].startswith("t1_")
    out = predict_raster(Difference(), stack, tmp_path / "delta.tif", **RUN)
    got = _read(out)[0]
    assert np.isnan(got[:20]).all()
    ref = MeanFilter(3).whole_image(t1)[0] - MeanFilter(3).whole_image(t0)[0]
    np.testing.assert_allclose(got[21:], ref[21:], atol=1e-3)


# ---------------------------------------------------------------------------------------------- arrays
def test_predict_array_equals_predict_raster(tmp_path: Path) -> None:
    """In-memory arrays go through the same windows and blending as rasters: identical values, nodata
    where the input is invalid (NaN or the mask), and the COG-free result has the model's output shape."""
    from dinov3geo.inference import ArraySource, predict_array

    img = smooth_field(150, 210, bands=2)
    img[:, 10:20, 30:45] = np.nan
    src = write_raster(tmp_path / "in.tif", img, transform=TRANSFORM, nodata=float("nan"))
    run = {k: v for k, v in RUN.items() if k in ("window", "overlap")}
    ref = _read(predict_raster(MeanFilter(3, 2), src, tmp_path / "out.tif", progress=False, **run))
    got = predict_array(MeanFilter(3, 2), img, **run)
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)
    assert np.isnan(got[:, 12, 35]).all()
    mask = np.ones(img.shape[1:], bool)
    mask[100:, :] = False
    part = predict_array(MeanFilter(3, 2), np.nan_to_num(img), mask, threads=False, **run)
    assert np.isnan(part[:, 100:]).all() and np.isfinite(part[:, :90][:, ~np.isnan(img[0, :90])]).all()
    from dinov3geo.models import build_backbone

    torch.manual_seed(0)
    feats = predict_array(BackboneFeatures(build_backbone("vit_tiny_test", in_chans=2).eval()), ArraySource(img),
                          window=128, overlap=64)
    assert feats.shape == (64, math.ceil(150 / 16), math.ceil(210 / 16))
    assert np.isfinite(feats).all()  # every patch holds some valid pixel
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        predict_array(MeanFilter(3, 2), img[0], **run)


def _tiled_raster(path: Path, img: np.ndarray, block: int, nodata: float | None = None) -> Path:
    profile = dict(driver="GTiff", width=img.shape[2], height=img.shape[1], count=img.shape[0], dtype=img.dtype,
                   crs="EPSG:32633", transform=TRANSFORM, nodata=nodata, tiled=True, blockxsize=block,
                   blockysize=block, compress="deflate")
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(img)
    return path


def test_aligned_row_bands_equal_direct_reads(tmp_path: Path) -> None:
    """Strips assembled from the file's tiles (read in tile-aligned runs, shared by reader threads) equal direct
    reads of the strip: inside the grid, across its edges and corners, over nodata; untiled files are read
    directly."""
    from dinov3geo.inference.engine import _TileCache
    from dinov3geo.inference.sources import as_source

    rng = np.random.default_rng(0)
    img = rng.integers(1, 5000, size=(3, 150, 170)).astype(np.uint16)
    img[:, 40:70, 20:90] = 0  # nodata
    src = as_source(_tiled_raster(tmp_path / "t.tif", img, 32, nodata=0))
    rows = _TileCache(max_bytes=1, min_entries=2)  # evicts as early as allowed
    with src.reader() as reader:
        assert reader.block_shape() == (32, 32)
        for _ in range(60):
            r0, c0 = int(rng.integers(-40, 160)), int(rng.integers(-40, 180))
            h, w = int(rng.integers(1, 90)), int(rng.integers(1, 90))
            win = rasterio.windows.Window(c0, r0, w, h)
            d, v = rows.read(reader, win)
            de, ve = reader.read(win)
            np.testing.assert_array_equal(v, ve)
            np.testing.assert_array_equal(d, de)
        assert len(rows._entries) >= 2 and rows._bytes > 0
    untiled = as_source(write_raster(tmp_path / "u.tif", img, transform=TRANSFORM, nodata=0))
    with untiled.reader() as reader:
        assert reader.block_shape() is None


def test_engine_with_aligned_row_bands_equals_direct_strips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's output with strips cut from aligned row bands equals the output with direct strip reads
    (tiled uint16 raster with nodata, an AOI, two reader threads)."""
    from dinov3geo.inference import engine

    field = smooth_field(230, 300, bands=2)
    img = ((field - field.min()) * 1000 + 500).astype(np.uint16)
    img[:, 100:140, 30:200] = 0
    src = _tiled_raster(tmp_path / "in.tif", img, 32, nodata=0)
    cx, cy = TRANSFORM * (150, 115)
    aoi = shapely.Point(cx, cy).buffer(1000)
    calls = {"n": 0}
    tiles = engine._TileCache._tiles

    def counted(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls["n"] += 1
        return tiles(self, *a, **k)

    monkeypatch.setattr(engine._TileCache, "_tiles", counted)
    a = predict_raster(MeanFilter(3, 2), src, tmp_path / "a.tif", aoi=aoi, aoi_crs="EPSG:32633", read_threads=2,
                       **RUN)
    assert calls["n"] > 0
    monkeypatch.setattr(engine._TileCache, "read", lambda self, reader, window: reader.read(window))
    b = predict_raster(MeanFilter(3, 2), src, tmp_path / "b.tif", aoi=aoi, aoi_crs="EPSG:32633", read_threads=2,
                       **RUN)
    got = _read(a)
    np.testing.assert_array_equal(got, _read(b))
    assert np.isfinite(got).any() and np.isnan(got).any()


def test_aligned_tiles_failed_read_releases_waiters() -> None:
    """A failing tile read fails every thread that waits for those tiles (each reads and fails itself) and
    leaves nothing behind in the cache: no thread hangs."""
    import threading as th

    from dinov3geo.inference.engine import _TileCache
    from dinov3geo.inference.sources import WindowReader

    gate = th.Event()

    class Failing(WindowReader):
        def block_shape(self) -> tuple[int, int]:
            return (8, 8)

        def read(self, window):  # noqa: ANN001, ANN202
            gate.wait(5)
            raise OSError(f"cannot read {window}")

    rows = _TileCache()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            rows.read(Failing(), rasterio.windows.Window(3, 3, 20, 10))
        except OSError as e:
            errors.append(e)

    threads = [th.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 3 and not rows._entries
