"""Tile ingestion: real scenes, statistics, skipping, resumption after a crash, dask clusters (kill -9, Ctrl-C,
concurrent runs, truncated files and a full disk: test_hostile_ingest.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from rasterio.transform import from_origin

from dinov3geo.ingest import TileStore, ingest
from dinov3geo.io import OutputError, Scene, open_scene
from dinov3geo.io.windows import tile_windows

ingest_module = sys.modules["dinov3geo.ingest.ingest"]


def _store_arrays(path: Path) -> dict[str, np.ndarray]:
    ts = TileStore.open(path)
    n = ts.n_tiles
    return {k: ts.group[k][:n] for k in ("tiles", "valid", "scene_id", "transform", "valid_fraction", "row_off",
                                          "col_off", "datetime")}


def test_ingest_landsat_folder_tiles_and_stats(shared_data, tmp_path):
    src = shared_data / "landsat/rstoolbox_LT05_224063_1988"
    out = tmp_path / "l5.zarr"
    rep = ingest([src], out, tile_size=64, bands=["red", "nir", "swir16"], progress=False)
    assert rep.ingested == ["LT52240631988227CUB02"] and not rep.skipped
    ts = TileStore.open(out)
    sc = open_scene(src, bands=["red", "nir", "swir16"])
    full = sc.read()
    # 310 x 287 px in 64 px tiles: 5 x 5 candidates, the last row/column partly padding
    wins = tile_windows(310, 287, 64)
    fractions = []
    for w in wins:
        chip = sc.read(w)
        fractions.append(chip.valid.mean())
    kept = [w for w, f in zip(wins, fractions, strict=True) if f >= 0.5]
    assert ts.n_tiles == len(kept) == rep.tiles_written
    assert rep.tiles_below_min_valid == len(wins) - len(kept)
    arr = _store_arrays(out)
    for i, w in enumerate(kept):
        chip = sc.read(w)
        np.testing.assert_array_equal(arr["tiles"][i], chip.data)
        np.testing.assert_array_equal(arr["valid"][i], chip.valid)
        assert (arr["row_off"][i], arr["col_off"][i]) == (w.row_off, w.col_off)
        assert tuple(arr["transform"][i]) == tuple(chip.grid.transform)[:6]
    assert str(arr["datetime"][0]).startswith("1988-08-14T13:00:47")
    assert set(arr["scene_id"]) == {"LT52240631988227CUB02"}
    # statistics: exact mean/std over the valid pixels of the stored tiles
    vals = np.concatenate([arr["tiles"][i][:, arr["valid"][i]] for i in range(ts.n_tiles)], axis=1).astype(float)
    st = ts.stats
    np.testing.assert_allclose(st["mean"], vals.mean(axis=1), rtol=1e-10)
    np.testing.assert_allclose(st["std"], vals.std(axis=1), rtol=1e-9)
    np.testing.assert_allclose(st["min"], vals.min(axis=1))
    assert st["bands"] == ["red", "nir", "swir16"]
    # percentiles are sampled: within one grey level of the exact ones for this uint8 scene
    np.testing.assert_allclose(st["percentiles"]["p50"], np.percentile(vals, 50, axis=1), atol=1.0)
    # nodata (255) pixels never enter the store's valid pixels
    assert not (arr["tiles"][arr["valid"][:, None].repeat(3, 1)] == 255).any()
    assert full.valid.mean() > 0.99
    # xarray opens the store with its coordinates
    ds = xr.open_zarr(out, consolidated=False)
    assert ds["tiles"].dims == ("tile", "band", "y", "x")
    assert list(ds["band"].values) == ["red", "nir", "swir16"]
    assert ds["tiles"].encoding["chunks"] == (1, 3, 64, 64)


def test_rerun_skips_and_appends_without_duplicates(shared_data, tmp_path):
    out = tmp_path / "s.zarr"
    a = shared_data / "change_pairs/landsat_taizhou/taizhou_2000-03-17_L7ETM.tif"
    b = shared_data / "change_pairs/landsat_taizhou/taizhou_2003-02-06_L7ETM.tif"
    r1 = ingest([a], out, tile_size=128, progress=False)
    n1 = TileStore.open(out).n_tiles
    r2 = ingest([a, b], out, tile_size=128, progress=False)
    assert r1.ingested == ["taizhou_2000-03-17_L7ETM"]
    assert r2.already == ["taizhou_2000-03-17_L7ETM"] and r2.ingested == ["taizhou_2003-02-06_L7ETM"]
    ts = TileStore.open(out)
    assert ts.n_tiles == 2 * n1 == 2 * 9  # 400 px: 3 full tiles per side, the 16 px edge ones < 50 % valid
    ids = TileStore.open(out).group["scene_id"][:]
    assert list(ids).count("taizhou_2000-03-17_L7ETM") == n1
    r3 = ingest([a, b], out, tile_size=128, progress=False)
    assert r3.ingested == [] and TileStore.open(out).n_tiles == 18
    with pytest.raises(ValueError, match="tile"):
        ingest([a], out, tile_size=64, progress=False)


def test_bad_inputs_are_reported_and_skipped(shared_data, tmp_path, make_raster):
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00garbage" * 10)
    notes = tmp_path / "notes.tif"
    notes.write_text("this is not a raster")
    three = make_raster("three_bands.tif", np.ones((3, 40, 40), np.uint8), descriptions=["red", "green", "blue"])
    rgbn = make_raster("four_bands.tif", np.ones((4, 40, 40), np.uint8),
                       descriptions=["red", "green", "blue", "nir"])
    out = tmp_path / "store.zarr"
    rep = ingest([rgbn, empty, corrupt, notes, three], out, tile_size=32, bands=["red", "nir"], progress=False)
    assert rep.ingested == ["four_bands"]
    reasons = dict(rep.skipped)
    assert set(reasons) == {str(empty), str(corrupt), str(notes), str(three)}
    assert "nir" in reasons[str(three)] and "three_bands" in reasons[str(three)]
    assert "empty.tif" in reasons[str(empty)]
    summary = rep.summary()
    assert "skipped: 4" in summary and "corrupt.tif" in summary
    assert len(TileStore.open(out).group.attrs["skipped"]) == 4


def test_unwritable_output_fails_before_work(shared_data, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: use a path under a file instead
            blocker = tmp_path / "afile"
            blocker.write_text("x")
            target = blocker / "store.zarr"
        else:
            target = ro / "store.zarr"
        with pytest.raises(OutputError, match="store.zarr"):
            ingest([shared_data / "landsat/rasterio_RGB.byte.tif"], target, progress=False)
    finally:
        ro.chmod(0o700)


def _scene_raster(path: Path, seed: int, h: int = 300, w: int = 420) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(1, 4000, size=(4, h, w), dtype=np.uint16)
    arr[:, :40, :60] = 0  # a nodata corner
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=4, dtype="uint16", nodata=0,
                       crs="EPSG:32633", transform=from_origin(400000, 5000000, 10, 10), tiled=True,
                       blockxsize=128, blockysize=128) as ds:
        ds.write(arr)
    return path


def test_crash_midway_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    scenes = [_scene_raster(tmp_path / f"scene_{i}.tif", i) for i in range(3)]
    ref = tmp_path / "ref.zarr"
    ingest(scenes, ref, tile_size=64, progress=False, workers=2)

    out = tmp_path / "crash.zarr"
    real = ingest_module._strip_write
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 9:  # in the middle of the second scene (5 strips per scene)
            raise RuntimeError("simulated crash")
        return real(*args, **kw)

    monkeypatch.setattr(ingest_module, "_strip_write", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest(scenes, out, tile_size=64, progress=False, workers=1)
    monkeypatch.setattr(ingest_module, "_strip_write", real)
    ts = TileStore.open(out)
    assert len(ts.scenes) == 1 and ts.group.attrs["pending"]["id"] == "scene_1"
    # the store is readable in this state: only the committed scene counts
    from dinov3geo.data.tiles import TileDataset

    assert len(TileDataset(out)) == ts.n_tiles > 0
    rep = ingest(scenes, out, tile_size=64, progress=False, workers=2)
    assert rep.recovered == "scene_1" and rep.already == ["scene_0"] and rep.ingested == ["scene_1", "scene_2"]
    a, b = _store_arrays(ref), _store_arrays(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    sa, sb = TileStore.open(ref).stats, TileStore.open(out).stats
    np.testing.assert_allclose(sa["mean"], sb["mean"], rtol=1e-12)
    np.testing.assert_allclose(sa["std"], sb["std"], rtol=1e-12)


@pytest.mark.distributed
def test_dask_localcluster_equals_threads(tmp_path):
    from distributed import Client, LocalCluster

    scenes = [_scene_raster(tmp_path / f"c_{i}.tif", 20 + i) for i in range(2)]
    ingest(scenes, tmp_path / "threads.zarr", tile_size=64, progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        rep = ingest(scenes, tmp_path / "cluster.zarr", tile_size=64, progress=False, scheduler=client.scheduler.address)
    assert rep.ingested == ["c_0", "c_1"]
    a, b = _store_arrays(tmp_path / "threads.zarr"), _store_arrays(tmp_path / "cluster.zarr")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_reprojected_ingest_and_mixed_crs(shared_data, tmp_path):
    out = tmp_path / "utm.zarr"
    rep = ingest([shared_data / "change_pairs/oscd/bercy/imgs_1"], out, tile_size=64, crs="EPSG:32631", res=10.0,
                 bands=["blue", "green", "red", "nir"], progress=False)
    assert rep.ingested and not rep.skipped
    ts = TileStore.open(out)
    assert set(ts.group["crs"][: ts.n_tiles]) == {"EPSG:32631"}
    tr = ts.group["transform"][0]
    assert tr[0] == pytest.approx(10.0) and tr[4] == pytest.approx(-10.0)


def test_single_read_blocks_compact_into_consecutive_slots(tmp_path, monkeypatch):
    """Blocks of 2 x 2 tiles: tiles below min_valid leave gaps in each block's reserved slot range, which are
    closed by moving chunk files (masks included); every stored tile equals a direct read of its window and
    each block's window is read exactly once."""
    monkeypatch.setattr(ingest_module, "SEGMENT_PX", 128)  # 2 tile columns per block
    monkeypatch.setattr(ingest_module, "MAX_TASK_ROWS_PX", 128)  # 2 tile rows per block (file blocks 128)
    rng = np.random.default_rng(3)
    arr = rng.integers(1, 4000, size=(2, 256, 320), dtype=np.uint16)
    arr[:, :64, :64] = 0  # tile (0, 0) empty: skipped
    arr[:, 64:128, 200:256] = 0  # tile (64, 192): 8 of 64 columns valid -> skipped at min_valid 0.5
    arr[:, 130:150, 10:30] = 0  # tile (128, 0): a hole, kept with a mask
    path = tmp_path / "gaps.tif"
    with rasterio.open(path, "w", driver="GTiff", width=320, height=256, count=2, dtype="uint16", nodata=0,
                       crs="EPSG:32633", transform=from_origin(400000, 5000000, 10, 10), tiled=True,
                       blockxsize=128, blockysize=128) as ds:
        ds.write(arr)
    reads = []
    real_reader = Scene.reader

    def counting_reader(self):  # noqa: ANN001, ANN202
        reads.append(1)
        return real_reader(self)

    monkeypatch.setattr(Scene, "reader", counting_reader)
    ingest([path], tmp_path / "s.zarr", tile_size=64, progress=False, workers=2)
    monkeypatch.setattr(Scene, "reader", real_reader)
    ts = TileStore.open(tmp_path / "s.zarr")
    sc = open_scene(path)
    kept = [(r, c) for r in range(0, 256, 64) for c in range(0, 320, 64) if (r, c) not in ((0, 0), (64, 192))]
    assert ts.n_tiles == len(kept) == 18
    assert len(reads) == 2 * 3  # one read per block (2 block rows x 3 block columns), no counting pass
    a = _store_arrays(tmp_path / "s.zarr")
    got = sorted(zip(a["row_off"].tolist(), a["col_off"].tolist(), range(ts.n_tiles), strict=True))
    assert [(r, c) for r, c, _ in got] == sorted(kept)
    for r, c, i in got:
        chip = sc.read(rasterio.windows.Window(c, r, 64, 64))
        np.testing.assert_array_equal(a["tiles"][i], chip.data)
        np.testing.assert_array_equal(a["valid"][i], chip.valid)
    hole = next(i for r, c, i in got if (r, c) == (128, 0))
    assert not a["valid"][hole].all()  # a mask chunk that had to move with its tile
    chunks = sorted(p.name for p in (tmp_path / "s.zarr" / "tiles").iterdir() if p.name != "zarr.json")
    assert chunks == sorted(f"c.{k}.0.0.0" for k in range(18))  # nothing left in the slots given back
