"""Tests for dinov3geo.io.cog (COGWriter, write_cog, validate_cog)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from dinov3geo.io import cog as cogmod
from dinov3geo.io.cog import COGWriter, assert_valid_cog, validate_cog, write_cog
from dinov3geo.io.errors import InvalidCOGError, OutputError
from dinov3geo.io.grid import GridSpec

GRID = GridSpec("EPSG:32632", Affine(10.0, 0.0, 580000.0, 0.0, -10.0, 5102000.0), 1100, 900)


def _irregular_windows(grid: GridSpec, bw: int, bh: int, seed: int = 0) -> list[Window]:
    """Windows of an awkward size (not aligned with the tiles), shuffled."""
    wins = [
        Window(c, r, min(bw, grid.width - c), min(bh, grid.height - r))
        for r in range(0, grid.height, bh)
        for c in range(0, grid.width, bw)
    ]
    order = np.random.default_rng(seed).permutation(len(wins))
    return [wins[i] for i in order]


def _block(arr: np.ndarray, win: Window) -> np.ndarray:
    r, c, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
    return arr[:, r : r + h, c : c + w]


def test_blockwise_cog_equals_source_and_keeps_metadata(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    src = rng.integers(1, 60000, size=(3, GRID.height, GRID.width), dtype=np.uint16)
    src[:, :37, :] = 0  # a nodata collar
    out = tmp_path / "out" / "stack.tif"
    windows = _irregular_windows(GRID, 203, 171)
    assert len(windows) > 30
    with COGWriter(
        out,
        GRID,
        count=3,
        dtype="uint16",
        nodata=0,
        band_names=["B04", "B03", "B02"],
        tags={"sensor": "S2A", "scale": 1e-4},
        band_tags=[{"wavelength_nm": 665}, {"wavelength_nm": 560}, {"wavelength_nm": 490}],
        blocksize=256,
    ) as w:
        for win in windows:
            w.write(_block(src, win), win)
        assert not out.exists()  # appears only when finished
    assert sorted(p.name for p in out.parent.iterdir()) == ["stack.tif"]  # no staging/temp leftovers

    ok, errors, warnings = validate_cog(out)
    assert ok and errors == [] and warnings == []
    with rasterio.open(out) as ds:
        assert np.array_equal(ds.read(), src)
        assert ds.crs == GRID.crs
        assert ds.transform == GRID.transform
        assert (ds.width, ds.height, ds.count) == (GRID.width, GRID.height, 3)
        assert ds.nodata == 0
        assert ds.descriptions == ("B04", "B03", "B02")
        assert ds.tags()["sensor"] == "S2A" and float(ds.tags()["scale"]) == 1e-4
        assert ds.tags(2)["wavelength_nm"] == "560"
        assert ds.overviews(1) == [2, 4, 8]  # until the coarsest level fits one 256 px tile (1100/8 < 256)
        assert ds.block_shapes[0] == (256, 256)
        assert ds.compression is not None and ds.compression.name.lower() == "deflate"
        assert ds.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "2"
        # the average overview ignores the nodata collar: no zeros bleed into the valid area below it
        ov = ds.read(1, out_shape=(GRID.height // 4, GRID.width // 4))
        assert (ov[10:] > 0).all()
    assert GridSpec.from_dataset(rasterio.open(out)).same_as(GRID)


def test_nan_nodata_float_cog(tmp_path: Path) -> None:
    grid = GridSpec("EPSG:32611", Affine(0.5, 0, 439689.0, 0, -0.5, 5526562.5), 700, 530)
    rng = np.random.default_rng(2)
    arr = rng.normal(15, 5, size=grid.shape).astype(np.float32)
    arr[:100, :] = np.nan
    arr[200:260, 300:420] = np.nan
    out = write_cog(tmp_path / "chm.tif", arr, grid, band_names=["canopy_height_m"], blocksize=256)
    assert_valid_cog(out, allow_warnings=False)
    with rasterio.open(out) as ds:
        assert ds.dtypes[0] == "float32" and math.isnan(ds.nodata)
        assert ds.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "3"
        data = ds.read(1)
        assert np.array_equal(data, arr, equal_nan=True)
        assert ds.overviews(1) == [2, 4]
        ov = ds.read(1, out_shape=(265, 350))
        assert np.isnan(ov[:45]).all() and np.isfinite(ov[60:95]).all()  # NaN ignored by the average


def test_nan_written_as_explicit_float_nodata(tmp_path: Path) -> None:
    grid = GRID.window_grid(Window(0, 0, 64, 48))
    arr = np.full((1, 48, 64), 3.5, dtype=np.float64)
    arr[0, 5, 7] = np.nan
    out = write_cog(tmp_path / "x.tif", arr, grid, nodata=-9999.0, dtype="float32")
    with rasterio.open(out) as ds:
        data = ds.read(1)
        assert ds.nodata == -9999.0 and data[5, 7] == -9999.0 and data.dtype == np.float32
        assert np.count_nonzero(data == 3.5) == 48 * 64 - 1


def test_unwritten_area_reads_as_nodata(tmp_path: Path) -> None:
    out = tmp_path / "partial.tif"
    with COGWriter(out, GRID, 1, "int16", nodata=-1, blocksize=256) as w:
        w.write(
            np.full((1, 100, 120), 7, dtype=np.int64), Window(300, 200, 120, 100)
        )  # int64 values fit int16
    with rasterio.open(out) as ds:
        data = ds.read(1)
    assert np.count_nonzero(data == 7) == 12000 and np.count_nonzero(data == -1) == data.size - 12000


def test_exception_inside_writer_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "never.tif"
    with pytest.raises(RuntimeError, match="model crashed"), COGWriter(out, GRID, 1, "uint8") as w:
        w.write(np.ones((1, 512, 512), np.uint8), Window(0, 0, 512, 512))
        raise RuntimeError("model crashed")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_is_atomic_and_failed_write_keeps_old_file(tmp_path: Path, monkeypatch) -> None:
    grid = GRID.window_grid(Window(0, 0, 300, 200))
    out = tmp_path / "map.tif"
    write_cog(out, np.full((200, 300), 1, np.uint8), grid)
    write_cog(out, np.full((200, 300), 2, np.uint8), grid)  # replaces the existing file
    with rasterio.open(out) as ds:
        assert (ds.read(1) == 2).all()
    before = out.read_bytes()

    # 1) failure while the caller is writing blocks
    with pytest.raises(ValueError), COGWriter(out, grid, 1, "uint8") as w:
        w.write(np.full((1, 200, 300), 3, np.uint8), Window(0, 0, 300, 200))
        w.write(np.zeros((1, 10, 10), np.float32), Window(0, 0, 10, 10))  # float into uint8: refused
    assert out.read_bytes() == before

    # 2) failure while building the COG (e.g. disk full during the final copy)
    def broken_copy(src, dst, **kw):
        Path(dst).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cogmod.rasterio.shutil, "copy", broken_copy)
    with pytest.raises(OutputError, match="No space left") as info:  # a raster with overviews: converted
        write_cog(out, np.full((GRID.height, GRID.width), 4, np.uint8), GRID)
    assert str(out) in str(info.value)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["map.tif"]

    # 3) failure of a raster written in its final form (no overviews, whole tiles: no conversion pass)
    from dinov3geo.inference.engine import _FeatureCOGWriter

    monkeypatch.undo()
    monkeypatch.setattr(cogmod, "validate_cog", lambda path: (False, ["broken on purpose"], []))
    with pytest.raises(InvalidCOGError, match="broken on purpose"), \
            _FeatureCOGWriter(out, grid, 1, "uint8", overviews=False) as w:
        assert w._direct
        w.write(np.full((1, 200, 300), 5, np.uint8), Window(0, 0, 300, 200))
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["map.tif"]


def test_unwritable_output_fails_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    out = blocker / "cogs" / "x.tif"
    with pytest.raises(OutputError) as info:
        COGWriter(out, GRID, 1, "uint8")
    assert str(out) in str(info.value)


@pytest.mark.parametrize(
    ("array", "window", "message"),
    [
        (np.zeros((1, 10, 10), np.uint8), Window(1095, 0, 10, 10), "outside"),
        (np.zeros((1, 10, 10), np.uint8), Window(0, 0, 10, 12), "window is 12x10"),
        (np.zeros((2, 10, 10), np.uint8), Window(0, 0, 10, 10), "shape"),
        (np.zeros((1, 10, 10), np.float32), Window(0, 0, 10, 10), "without loss"),
        (np.full((1, 10, 10), 300, np.int32), Window(0, 0, 10, 10), "do not fit"),
        (np.zeros((1, 10, 10), np.uint8), Window(0.5, 0, 10, 10), "integer"),
    ],
)
def test_write_rejects_bad_blocks(tmp_path: Path, array: np.ndarray, window: Window, message: str) -> None:
    with pytest.raises(ValueError, match=message), COGWriter(tmp_path / "x.tif", GRID, 1, "uint8") as w:
        w.write(array, window)
    assert list(tmp_path.iterdir()) == []


def test_constructor_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside the range"):
        COGWriter(tmp_path / "a.tif", GRID, 1, "uint8", nodata=-1)
    with pytest.raises(ValueError, match="NaN needs a float"):
        COGWriter(tmp_path / "a.tif", GRID, 1, "uint16", nodata=float("nan"))
    with pytest.raises(ValueError, match="band_names"):
        COGWriter(tmp_path / "a.tif", GRID, 2, "uint8", band_names=["only one"])
    with pytest.raises(ValueError, match="cannot be written"):
        COGWriter(tmp_path / "a.tif", GRID, 1, bool)
    with pytest.raises(ValueError, match="overview_resampling"):
        COGWriter(tmp_path / "a.tif", GRID, 1, "uint8", overview_resampling="smooth")


def test_validate_cog_rejects_plain_striped_geotiff(tmp_path: Path) -> None:
    plain = tmp_path / "plain.tif"
    with rasterio.open(
        plain,
        "w",
        driver="GTiff",
        width=1100,
        height=900,
        count=1,
        dtype="uint8",
        crs=GRID.crs,
        transform=GRID.transform,
    ) as dst:
        dst.write(np.ones((1, 900, 1100), np.uint8))
    ok, errors, _ = validate_cog(plain)
    assert not ok and errors
    with pytest.raises(InvalidCOGError, match="not a valid Cloud Optimized GeoTIFF"):
        assert_valid_cog(plain)


def test_real_landsat_rewritten_block_by_block(shared_data: Path, tmp_path: Path) -> None:
    path = shared_data / "landsat" / "rasterio_RGB.byte.tif"
    out = tmp_path / "rgb_cog.tif"
    with rasterio.open(path) as src:
        grid = GridSpec.from_dataset(src)
        with COGWriter(
            out, grid, src.count, src.dtypes[0], nodata=src.nodata, overview_resampling="nearest"
        ) as w:
            for _, win in src.block_windows(1):
                w.write(src.read(window=win), win)
        expected = src.read()
    assert_valid_cog(out)
    with rasterio.open(out) as ds:
        assert np.array_equal(ds.read(), expected)
        assert ds.crs == grid.crs and ds.transform == grid.transform and ds.nodata == 0
        assert ds.overviews(1) == [2]


def test_real_chm_float64_extreme_nodata(shared_data: Path, tmp_path: Path) -> None:
    path = shared_data / "aerial_rgb_chm" / "kootenay_drone_2016" / "kootenayCHM.tif"
    with rasterio.open(path) as src:
        arr, grid, nodata = src.read(1), GridSpec.from_dataset(src), src.nodata
    out = write_cog(tmp_path / "chm.tif", arr, grid, nodata=nodata, blocksize=128, tags={"units": "m"})
    assert_valid_cog(out, allow_warnings=False)
    with rasterio.open(out) as ds:
        assert ds.nodata == nodata and ds.dtypes[0] == "float64" and ds.tags()["units"] == "m"
        assert np.array_equal(ds.read(1), arr)
        assert ds.overviews(1) == [2, 4]


def test_staging_compression_does_not_change_the_cog(tmp_path: Path, monkeypatch) -> None:
    """Uncompressed and ZSTD staging give the same COG pixels and overviews; ``auto`` stages uncompressed when
    the raw raster fits a quarter of the free disk space and compressed when it does not."""
    rng = np.random.default_rng(4)
    src = rng.normal(size=(2, GRID.height, GRID.width)).astype(np.float32)
    src[:, :20] = np.nan
    outs = {}
    created: list[dict] = []
    real_open = rasterio.open

    def recording_open(path, mode="r", **kw):  # noqa: ANN001, ANN202
        if mode == "w":
            created.append(kw)
        return real_open(path, mode, **kw)

    monkeypatch.setattr(cogmod.rasterio, "open", recording_open)
    for mode in ("none", "zstd"):
        outs[mode] = tmp_path / f"{mode}.tif"
        with COGWriter(outs[mode], GRID, count=2, dtype="float32", nodata=float("nan"), blocksize=256,
                       staging_compress=mode) as w:
            assert w._staging_codec() == mode
            assert created[-1].get("compress", "none") == mode  # the staging file's creation options
            for win in _irregular_windows(GRID, 300, 250):
                w.write(_block(src, win), win)
        assert validate_cog(outs[mode])[0]
    monkeypatch.undo()
    with rasterio.open(outs["none"]) as a, rasterio.open(outs["zstd"]) as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert a.overviews(1) == b.overviews(1) == [2, 4, 8]
        np.testing.assert_array_equal(a.read(1, out_shape=(225, 275)), b.read(1, out_shape=(225, 275)))
        assert a.compression.name.lower() == "deflate"  # the final COG's codec is the user's either way

    assert COGWriter(tmp_path / "a.tif", GRID, count=2, dtype="float32")._staging_codec() == "none"
    monkeypatch.setattr(cogmod.shutil, "disk_usage", lambda p: type("U", (), {"free": 10_000_000})())
    assert COGWriter(tmp_path / "b.tif", GRID, count=2, dtype="float32")._staging_codec() == "zstd"
    with pytest.raises(ValueError, match="staging_compress"):
        COGWriter(tmp_path / "c.tif", GRID, count=1, dtype="uint8", staging_compress="lz4")


def test_raster_without_overviews_is_written_in_final_form(tmp_path: Path, monkeypatch) -> None:
    """No overview levels and whole tiles (``whole_blocks``, as the region engine writes): the file is created
    with the COG's options and only renamed at the end (no conversion pass); it validates, keeps compression,
    predictor, nodata, names and tags, never-written tiles read as nodata, and it equals what the conversion
    path produces. Windows off the tile grid are refused in that mode."""
    grid = GRID.window_grid(Window(0, 0, 500, 380))
    rng = np.random.default_rng(7)
    src = rng.normal(size=(20, 380, 500)).astype(np.float32)
    copies: list = []
    real_copy = cogmod.rasterio.shutil.copy
    monkeypatch.setattr(cogmod.rasterio.shutil, "copy", lambda *a, **k: copies.append(a) or real_copy(*a, **k))
    tiles = [Window(c, r, min(128, 500 - c), min(128, 380 - r)) for r in range(0, 380, 128) for c in range(0, 500, 128)]
    order = np.random.default_rng(1).permutation(len(tiles))

    def write(path: Path, whole_blocks: bool) -> Path:
        from dinov3geo.inference.engine import _FeatureCOGWriter  # a COGWriter without overviews

        with _FeatureCOGWriter(path, grid, 20, "float32", nodata=float("nan"), blocksize=128, compress="zstd",
                               level=1, band_names=[f"f{i}" for i in range(20)], tags={"model": "x"},
                               whole_blocks=whole_blocks, overviews=False) as w:
            for i in order:
                if (tiles[i].col_off, tiles[i].row_off) == (128, 0):
                    continue  # one tile never written
                w.write(_block(src, tiles[i]), tiles[i])
            if whole_blocks:
                with pytest.raises(ValueError, match="whole 128 x 128 tiles"):
                    w.write(_block(src, Window(10, 0, 128, 128)), Window(10, 0, 128, 128))
        return path

    direct = write(tmp_path / "direct.tif", whole_blocks=True)
    assert copies == []  # renamed, not converted
    assert validate_cog(direct) == (True, [], [])
    converted = write(tmp_path / "converted.tif", whole_blocks=False)
    assert len(copies) == 1
    with rasterio.open(direct) as a, rasterio.open(converted) as b:
        got, ref = a.read(), b.read()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        np.testing.assert_array_equal(got[~np.isnan(got)], ref[~np.isnan(ref)])
        assert np.isnan(got[:, :128, 128:256]).all() and not np.isnan(got[:, :128, :128]).any()
        assert a.overviews(1) == [] and a.compression.name.lower() == "zstd"
        assert a.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "3" and math.isnan(a.nodata)
        assert a.descriptions[3] == "f3" and a.tags()["model"] == "x" and a.block_shapes[0] == (128, 128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted.tif", "direct.tif"]
