"""predict_canopy reads every kind of input at the model's GSD: geographic CRSs, feet, mosaics, tile stores.

The model of these tests is trained at 1 m on the NEON BART pair; the inputs are the 10 cm NEON image in other
shapes. Each map must come out with ~1 m pixels (a 10x finer map would be a silent 100x cost and a model applied
out of its scale), measured in metres whatever the CRS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.warp import Resampling, calculate_default_transform, reproject
from rasterio.windows import Window

from dinov3geo.io.grid import GridSpec
from dinov3geo.tasks.canopy.predict import pixel_size_m, pixel_size_xy_m, predict_canopy
from dinov3geo.tasks.canopy.train import train_canopy

from .test_train_predict import NEON, RGB, _config


@pytest.fixture(scope="module")
def model_1m(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gsd") / "run"
    cfg = _config(shared_data, out, epochs=1)
    cfg["split"] = {"block": 40, "buffer": 4, "fractions": {"train": 0.8, "val": 0.2}, "seed": 1}
    train_canopy(cfg, progress=False)
    return out / "model.pt"


def _warp(src_path: Path, dst: Path, crs: str, crop: int = 400) -> Path:
    """The top-left ``crop`` pixels of ``src_path`` warped to ``crs`` at the equivalent resolution."""
    with rasterio.open(src_path) as src:
        win = Window(0, 0, crop, crop)
        data = src.read(window=win)
        tr = src.window_transform(win)
        transform, w, h = calculate_default_transform(src.crs, crs, crop, crop,
                                                      *rasterio.windows.bounds(win, src.transform))
        prof = src.profile | {"crs": crs, "transform": transform, "width": w, "height": h, "nodata": 0,
                              "driver": "GTiff", "tiled": False}
        prof.pop("blockxsize", None)
        prof.pop("blockysize", None)
        out = np.zeros((src.count, h, w), dtype=data.dtype)
        reproject(data, out, src_transform=tr, src_crs=src.crs, dst_transform=transform, dst_crs=crs,
                  resampling=Resampling.bilinear, src_nodata=None, dst_nodata=0)
    with rasterio.open(dst, "w", **prof) as d:
        d.write(out)
    return dst


def _out_pixel_m(path: Path) -> float:
    """The larger side of the map's pixels in metres (both sides must be the model's GSD)."""
    with rasterio.open(path) as ds:
        w, h = pixel_size_xy_m(GridSpec(ds.crs, ds.transform, ds.width, ds.height))
    assert w == pytest.approx(h, rel=0.02), (w, h)  # square in metres, also in degrees at 44 N
    return max(w, h)


def test_pixel_size_in_metres() -> None:
    from affine import Affine

    equator = GridSpec(CRS.from_epsg(4326), Affine(1e-4, 0, -0.05, 0, -1e-4, 0.05), 1000, 1000)
    assert pixel_size_m(equator) == pytest.approx(11.06, abs=0.02)  # a 1e-4 degree meridian arc
    north = GridSpec(CRS.from_epsg(4326), Affine(1e-4, 0, 10.0, 0, -1e-4, 60.05), 1000, 1000)
    assert pixel_size_m(north) == pytest.approx(11.13 * 0.5, rel=0.01)  # the parallel is half as long at 60 N
    feet = GridSpec(CRS.from_epsg(2263), Affine(10, 0, 1e6, 0, -10, 2e5), 100, 100)  # NY, US survey feet
    assert pixel_size_m(feet) == pytest.approx(3.048, rel=1e-5)
    utm = GridSpec(CRS.from_epsg(32619), Affine(0.1, 0, 320000, 0, -0.1, 4881000), 10, 10)
    assert pixel_size_m(utm) == pytest.approx(0.1)


@pytest.mark.parametrize("crs", ["EPSG:4326", "EPSG:3437"])  # geographic; NH state plane in US feet
def test_geographic_and_feet_inputs_are_read_at_the_model_gsd(shared_data: Path, model_1m: Path, tmp_path: Path,
                                                              crs: str, caplog: pytest.LogCaptureFixture) -> None:
    img = _warp(shared_data / NEON / RGB, tmp_path / "in.tif", crs)
    with rasterio.open(img) as ds:
        assert 0.07 < pixel_size_m(GridSpec(ds.crs, ds.transform, ds.width, ds.height)) < 0.13
    with caplog.at_level("WARNING", logger="dinov3geo.canopy"):
        out = predict_canopy(model_1m, img, tmp_path / "map.tif", window=128, progress=False)
    assert "reading it at 1 m" in caplog.text
    assert _out_pixel_m(out) == pytest.approx(1.0, rel=0.02)
    with rasterio.open(out) as ds:
        assert ds.crs == CRS.from_user_input(crs)  # the map stays in the input's CRS
        assert np.isfinite(ds.read(1)).mean() > 0.5


def test_mosaics_and_tile_stores_are_read_at_the_model_gsd(shared_data: Path, model_1m: Path,
                                                           tmp_path: Path) -> None:
    from dinov3geo.ingest import ingest

    # two halves of the image as a mosaic
    halves = []
    with rasterio.open(shared_data / NEON / RGB) as src:
        for i, win in enumerate([Window(0, 0, 300, 400), Window(300, 0, 300, 400)]):
            prof = src.profile | {"width": 300, "height": 400, "transform": src.window_transform(win),
                                  "tiled": False}
            prof.pop("blockxsize", None)
            prof.pop("blockysize", None)
            p = tmp_path / f"half{i}.tif"
            with rasterio.open(p, "w", **prof) as d:
                d.write(src.read(window=win))
            halves.append(str(p))
    out = predict_canopy(model_1m, halves, tmp_path / "mosaic.tif", window=128, progress=False)
    assert _out_pixel_m(out) == pytest.approx(1.0, rel=0.02)
    with rasterio.open(out) as ds:
        assert ds.width in (60, 61) and ds.height in (40, 41)  # 60 x 40 m (the grid covers partial pixels)
    # a tile store of the 10 cm image
    store = tmp_path / "tiles.zarr"
    ingest([halves[0]], store, tile_size=100, progress=False)
    out = predict_canopy(model_1m, str(store), tmp_path / "store.tif", window=128, progress=False)
    assert _out_pixel_m(out) == pytest.approx(1.0, rel=0.02)


def test_keep_resolution_maps_at_the_input_grid(shared_data: Path, model_1m: Path, tmp_path: Path) -> None:
    img = _warp(shared_data / NEON / RGB, tmp_path / "in.tif", "EPSG:4326", crop=160)
    out = predict_canopy(model_1m, img, tmp_path / "map.tif", window=128, progress=False,
                         resample_to_model_gsd=False)
    with rasterio.open(img) as a, rasterio.open(out) as b:
        assert (a.width, a.height) == (b.width, b.height) and a.transform == b.transform

