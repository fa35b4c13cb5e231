"""The engine's region-scale buffers (issue 21): automatic block size bounded by the accumulators' bytes, tiles
written in strips of COG block rows, many-band COGs staged band-interleaved. Outputs must not change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from dinov3geo.inference import MeanFilter, predict_raster
from dinov3geo.inference.engine import BLOCK_BYTES, DEFAULT_BLOCK_SIZE, _TileWriter, make_layout
from dinov3geo.io.cog import COGWriter, validate_cog
from dinov3geo.io.grid import GridSpec
from tests.conftest import write_raster
from tests.inference.conftest import smooth_field

TRANSFORM = from_origin(500000.0, 4000000.0, 10.0, 10.0)


class _Bands(MeanFilter):
    """A mean filter declaring ``k`` output bands and a ViT's global context (half-window default overlap)."""

    global_context = True

    def __init__(self, k: int) -> None:
        super().__init__(3, bands=k)


def _bytes_read() -> int | None:
    """Bytes this process has read through system calls (Linux ``/proc/self/io``), else None."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except (OSError, StopIteration, ValueError):
        return None


def _accumulator_bytes(layout, k: int) -> int:
    r0, r1, c0, c1 = max((layout.block_extent(*b) for b in layout.blocks()),
                         key=lambda e: (e[1] - e[0]) * (e[3] - e[2]))
    return (k + 1) * 4 * (r1 - r0) * (c1 - c0)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_automatic_blocks_keep_the_accumulators_bounded(k: int) -> None:
    lay = make_layout(_Bands(k), 9000, 9000, window=512)
    assert _accumulator_bytes(lay, k) <= BLOCK_BYTES
    if k <= 2:  # maps of a band or two keep the 2048 px blocks
        assert lay.block_windows * lay.stride == DEFAULT_BLOCK_SIZE
    else:  # many bands: smaller blocks, but no smaller than needed
        assert lay.block_windows * lay.stride < DEFAULT_BLOCK_SIZE
        bigger = make_layout(_Bands(k), 9000, 9000, window=512, block_size=(lay.block_windows + 1) * lay.stride)
        assert _accumulator_bytes(bigger, k) > BLOCK_BYTES
    # an explicit block size is used as given, even when its accumulators are larger
    assert make_layout(_Bands(k), 9000, 9000, window=512, block_size=4096).block_windows == 4096 // lay.stride


def test_invalid_block_size_is_refused() -> None:
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="block_size must be a positive int"):
            make_layout(_Bands(2), 1000, 1000, window=512, block_size=bad)  # type: ignore[arg-type]


def test_tiles_written_in_strips_equal_whole_tiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tile is summed and written in strips of COG block rows: the same bytes as one tile at a time."""
    img = smooth_field(600, 700, bands=3)
    src = write_raster(tmp_path / "in.tif", img, transform=TRANSFORM)
    run = dict(window=64, overlap=16, block_size=256, blocksize=64, progress=False)
    writes: list[int] = []
    real_write = COGWriter.write

    def counting(self: COGWriter, array: np.ndarray, window: Window) -> None:
        writes.append(int(window.height))
        real_write(self, array, window)

    monkeypatch.setattr(COGWriter, "write", counting)
    monkeypatch.setattr(_TileWriter, "STRIP_ELEMENTS", 1 << 40)  # one strip per tile
    whole = predict_raster(MeanFilter(5, bands=3), src, tmp_path / "whole.tif", **run)
    n_tiles, whole_rows = len(writes), max(writes)
    writes.clear()
    monkeypatch.setattr(_TileWriter, "STRIP_ELEMENTS", 1)  # one COG block row per strip
    strips = predict_raster(MeanFilter(5, bands=3), src, tmp_path / "strips.tif", **run)
    assert len(writes) > n_tiles and max(writes) == 64 < whole_rows
    with rasterio.open(whole) as a, rasterio.open(strips) as b:
        assert np.array_equal(a.read(), b.read(), equal_nan=True)
        np.testing.assert_allclose(a.read(), MeanFilter(5, bands=3).whole_image(img), rtol=2e-6, atol=0)


def test_many_band_cog_with_overviews(tmp_path: Path) -> None:
    """Eight float32 bands with overviews (land-cover probabilities): staged band-interleaved (GDAL builds
    overviews of a pixel-interleaved staging file with many bands by re-reading it: 12-36 GiB read for a 4096^2 x 8
    raster, benchmarks/README), the COG is pixel-interleaved, valid, and holds exactly what was written."""
    k, n = 8, 1024
    grid = GridSpec(crs="EPSG:32633", transform=TRANSFORM, width=n, height=n)
    rng = np.random.default_rng(0)
    data = rng.random((k, n, n), dtype=np.float32)
    data[:, :100, :36] = np.nan  # (on the 4 px overview grid: GDAL weighs partly-nodata cells its own way)
    w = COGWriter(tmp_path / "p.tif", grid, k, "float32", nodata=float("nan"), blocksize=256, gdal_cachemax_mb=32)
    with w:
        for r in range(0, n, 512):
            for c in range(0, n, 512):
                w.write(data[:, r : r + 512, c : c + 512], Window(c, r, 512, 512))
        before = _bytes_read()
    after = _bytes_read()
    if before is not None and after is not None:  # measured: 4x the raster's bytes (21x when pixel-interleaved)
        assert after - before < 8 * data.nbytes
    ok, errors, _ = validate_cog(tmp_path / "p.tif")
    assert ok, errors
    with rasterio.open(tmp_path / "p.tif") as ds:
        assert ds.count == k and ds.interleaving.value.lower() == "pixel"
        assert ds.overviews(1) == [2, 4]
        assert np.array_equal(ds.read(), data, equal_nan=True)
        lo = ds.read(out_shape=(k, n // 4, n // 4))
    expect = np.nanmean(data.reshape(k, n // 4, 4, n // 4, 4), axis=(2, 4))
    np.testing.assert_allclose(lo, expect, rtol=1e-5, atol=1e-6)
