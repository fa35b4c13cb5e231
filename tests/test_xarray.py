"""dinov3geo.xarray: lazy maps of xarray/dask rasters equal to the raster engine's, bit for bit.

Every equality test runs :func:`dinov3geo.inference.predict_raster` (or the task's own writer) on a real GeoTIFF
crop and the xarray path on the same file opened with ``rioxarray.open_rasterio``, with small blocks
(``block_size``/``blocksize``) so that the raster spans several engine blocks and several output chunks.
Models are tiny random ViTs whose blocks matter (LayerScale gammas in [0.1, 1]: every output depends on the
whole window, so a window placed or blended differently would show).
"""

from __future__ import annotations

import hashlib
import math
import pickle
import threading
import warnings
from pathlib import Path

import dask
import dask.array as dsa
import numpy as np
import pytest
import rasterio
import rioxarray
import torch
import xarray as xr
from rasterio.windows import Window

import dinov3geo.xarray as dx
from dinov3geo.inference import MeanFilter, StackSource, make_layout, predict_raster
from dinov3geo.models import build_backbone, save_backbone
from tests.conftest import REPO_ROOT

NEON = REPO_ROOT / "data" / "neon_bart_2019" / "2019_BART_5_320000_4881000_image_crop.tif"
LANDSAT = REPO_ROOT / "data" / "landsat" / "rasterio_RGB.byte.tif"  # nodata 0 collar (a third of the frame)
PUCALLPA = [REPO_ROOT / "data" / "pucallpa" / f"pucallpa_{y}.tif" for y in (2000, 2020)]  # EPSG:4326, nodata 0
#: small engine blocks (input px) and tile alignment (output px): several blocks on a few hundred pixels
SMALL = {"block_size": 256}


def _crop(src: Path, dst: Path, win: Window) -> Path:
    with rasterio.open(src) as s:
        prof = s.profile | {"width": int(win.width), "height": int(win.height), "transform": s.window_transform(win),
                            "tiled": False}
        prof.pop("blockxsize", None)
        prof.pop("blockysize", None)
        with rasterio.open(dst, "w", **prof) as d:
            d.write(s.read(window=win))
    return dst


def _tiny_backbone(in_chans: int = 3, seed: int = 0, depth: int = 2):
    """``vit_tiny_test`` with LayerScale gammas U(0.1, 1): attention mixes the whole window into every token."""
    torch.manual_seed(seed)
    bb = build_backbone("vit_tiny_test", in_chans=in_chans, depth=depth, num_heads=4).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in bb.named_parameters():
            if name.endswith((".ls1.gamma", ".ls2.gamma")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.9 + 0.1)
    return bb


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("xarray")
    return {
        "neon": _crop(NEON, d / "neon.tif", Window(300, 250, 600, 520)),
        "landsat": _crop(LANDSAT, d / "landsat.tif", Window(0, 0, 300, 280)),  # a corner: collar and scene
        "before": _crop(PUCALLPA[0], d / "before.tif", Window(100, 60, 300, 260)),
        "after": _crop(PUCALLPA[1], d / "after.tif", Window(100, 60, 300, 260)),
        "weights": save_backbone(_tiny_backbone(), d / "tiny.pt"),
        "weights4": save_backbone(_tiny_backbone(4, seed=3), d / "tiny4.pt"),
        "dir": d,
    }


# ---------------------------------------------------------------------------------------------- features
@pytest.fixture(scope="module")
def features_reference(files: dict[str, Path]) -> tuple[np.ndarray, Path]:
    from dinov3geo.models import load_backbone
    from dinov3geo.tasks.features import MultiLayerFeatures, normalisation_for

    bb = load_backbone(files["weights"]).eval()
    vs, m, s = normalisation_for(bb, "uint8")
    model = MultiLayerFeatures(bb, [0, -1], value_scale=vs, mean=m, std=s)
    lay = make_layout(model, 520, 600, window=128, blocksize=16, **SMALL)
    assert lay.n_blocks_total >= 4, "the test must span several engine blocks"
    out = predict_raster(model, files["neon"], files["dir"] / "features_ref.tif", window=128, batch_size=3,
                         blocksize=16, progress=False, **SMALL)
    return _read(out), out


@pytest.mark.parametrize("chunks", [{"x": 64, "y": 64}, {"x": 97, "y": 131}, None],
                         ids=["aligned-with-windows", "misaligned", "not-dask"])
def test_features_equal_the_engine_bit_for_bit(files, features_reference, chunks) -> None:
    ref, ref_path = features_reference
    before = _sha(files["neon"])
    da = rioxarray.open_rasterio(files["neon"], chunks=chunks) if chunks else rioxarray.open_rasterio(files["neon"])
    res = dx.features(da, files["weights"], layers=[0, -1], window=128, batch_size=3, blocksize=16, **SMALL)
    assert isinstance(res.data, dsa.Array) and res.dims == ("band", "y", "x")
    assert len(res.chunks[1]) > 1 and len(res.chunks[2]) > 1  # several output chunks
    got = res.values
    np.testing.assert_array_equal(got, ref)
    with rasterio.open(ref_path) as ds:  # the patch grid: the input transform scaled by 16, band names
        assert res.rio.crs == ds.crs
        assert res.rio.transform().almost_equals(ds.transform, precision=1e-6)
        assert list(res.band.values) == list(ds.descriptions)
        np.testing.assert_allclose(res.x.values, ds.transform.c + (np.arange(ds.width) + 0.5) * ds.transform.a)
        np.testing.assert_allclose(res.y.values, ds.transform.f + (np.arange(ds.height) + 0.5) * ds.transform.e)
    assert _sha(files["neon"]) == before


def test_accessor_equals_the_function_and_features_equal_extract_features(files, features_reference) -> None:
    from dinov3geo.tasks.features import extract_features

    da = rioxarray.open_rasterio(files["neon"], chunks={"x": 256, "y": 256})
    res = da.dinov3geo.features(files["weights"], layers=[0, -1], window=128, batch_size=3, blocksize=16, **SMALL)
    np.testing.assert_array_equal(res.values, features_reference[0])
    # the task's own writer (default blocks): the same values as the xarray wrapper with default blocks
    out = extract_features(files["neon"], files["dir"] / "f.zarr", weights=files["weights"], layers=[0, -1],
                           window=128, batch_size=3, pca=False, progress=False)
    z = xr.open_zarr(out.zarr, consolidated=False)["features"]
    np.testing.assert_array_equal(dx.features(da, files["weights"], layers=[0, -1], window=128,
                                              batch_size=3).values, z.values)


# ---------------------------------------------------------------------------------------------- canopy
@pytest.fixture(scope="module")
def canopy_model(files: dict[str, Path]) -> Path:
    from dinov3geo.tasks.canopy.bins import HeightBins
    from dinov3geo.tasks.canopy.heads import LightHead
    from dinov3geo.tasks.canopy.model import CanopyHeightModel, save_canopy_model

    torch.manual_seed(5)
    model = CanopyHeightModel(_tiny_backbone(depth=4), LightHead(64, n_levels=2, hidden=16, output="bins",
                                                                  n_bins=12),
                              HeightBins(12, "linear", "softmax", 0.5, 40.0))
    return save_canopy_model(files["dir"] / "canopy.pt", model, bands=["red", "green", "blue"],
                             mean=[0.4, 0.4, 0.3], std=[0.2, 0.15, 0.14], value_scale=1 / 255, gsd=0.1)


def test_canopy_height_rioxarray_round_trip_equals_predict_canopy(files, canopy_model, tmp_path) -> None:
    from dinov3geo.tasks.canopy.predict import predict_canopy

    # one intra-op thread in both: this model's CPU kernels round differently with 1 and 2 threads (measured
    # 6e-6 m), and the engine's thread tuner switches between them during a run
    kw = {"window": 128, "batch_size": 2, "blocksize": 64, "model_threads": 1, **SMALL}
    ref_path = predict_canopy(canopy_model, files["neon"], tmp_path / "ref.tif", progress=False, **kw)
    ref = _read(ref_path)
    inputs = {p: _sha(p) for p in (files["neon"], canopy_model)}
    da = rioxarray.open_rasterio(files["neon"], chunks={"x": 200, "y": 150})
    chm = dx.canopy_height(da, canopy_model, **kw)
    assert list(chm.band.values) == ["height", "height_std"] and chm.name == "canopy_height"
    assert chm.x.equals(da.x) and chm.y.equals(da.y)  # scale 1: the input's own coordinates
    # write with rioxarray (windowed, through dask) and read back
    out = tmp_path / "chm.tif"
    chm.rio.to_raster(out, tiled=True, lock=threading.Lock())
    np.testing.assert_array_equal(_read(out), ref)
    with rasterio.open(out) as a, rasterio.open(ref_path) as b:
        assert a.crs == b.crs and a.transform.almost_equals(b.transform, precision=1e-9)
        assert a.descriptions == ("height", "height_std") and math.isnan(a.nodata)
    # and to Zarr: values, CRS and band names come back
    chm.to_zarr(tmp_path / "chm.zarr", consolidated=False)
    z = xr.open_zarr(tmp_path / "chm.zarr", consolidated=False, decode_coords="all")["canopy_height"]
    np.testing.assert_array_equal(z.values, ref)
    assert z.rio.crs == chm.rio.crs and list(z.band.values) == ["height", "height_std"]
    assert np.isfinite(ref).all() and ref[0].std() > 0  # a real map, not a constant
    assert {p: _sha(p) for p in inputs} == inputs
    # default threads on both sides: equal up to float32 rounding
    auto = dx.canopy_height(da, canopy_model, **(kw | {"model_threads": "auto"})).values
    np.testing.assert_allclose(auto, ref, rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------- change
def test_zero_shot_change_equals_the_engine_on_stacked_dates_with_nodata(files) -> None:
    from dinov3geo.models import load_backbone
    from dinov3geo.tasks.change.zeroshot import ZeroShotChange
    from dinov3geo.tasks.features import normalisation_for

    b = rioxarray.open_rasterio(files["before"], chunks={"x": 100, "y": 100})
    a = rioxarray.open_rasterio(files["after"], chunks={"x": 128, "y": 77})
    # a nodata hole in one date only: the pair is nodata there, the other date's values stay as they are
    a = a.copy(data=a.data.map_blocks(_hole, dtype=a.dtype, block_info=True))
    hole = files["dir"] / "after_hole.tif"
    a.rio.to_raster(hole)
    assert (_read(hole) == 0).all(axis=0).sum() >= 1000
    kw = {"window": 128, "batch_size": 4, "blocksize": 16, "block_size": 128}
    res = dx.change_probability(b, a, files["weights4"], layers=[0, 1], **kw)
    bb = load_backbone(files["weights4"])
    vs, m, s = normalisation_for(bb, "uint8")
    model = ZeroShotChange(bb, bands_per_date=4, value_scale=vs, mean=m, std=s, layers=[0, 1],
                           band_names=[f"band_{k}" for k in range(1, 5)])
    assert make_layout(model, 260, 300, window=128, blocksize=16, block_size=128).n_blocks_total >= 4
    ref = _read(predict_raster(model, StackSource([files["before"], hole]), files["dir"] / "change_ref.tif",
                               progress=False, **kw))
    got = res.values
    np.testing.assert_array_equal(got, ref)
    assert res.name == "change_distance" and list(res.band.values) == ["change_distance"]
    assert np.isnan(got[0, 130:160, 100:140]).all()  # inside the hole: no valid pair
    assert np.isfinite(got).mean() > 0.9 and np.nanstd(got) > 0


def _hole(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
    (r0, r1), (c0, c1) = block_info[0]["array-location"][1:]
    out = block.copy()
    rows = slice(max(120, r0) - r0, max(min(170, r1) - r0, 0))
    cols = slice(max(90, c0) - c0, max(min(150, c1) - c0, 0))
    out[:, rows, cols] = 0
    return out


def test_misaligned_dates_are_refused_with_a_fix(files) -> None:
    b = rioxarray.open_rasterio(files["before"], chunks=128)
    a = rioxarray.open_rasterio(files["after"], chunks=128).isel(x=slice(1, None))
    with pytest.raises(ValueError, match=r"after is not on the grid of before.*reproject_match"):
        dx.change_probability(b, a, files["weights4"], window=128)


# ---------------------------------------------------------------------------------------------- nodata
@pytest.mark.parametrize("masked", [False, True])
def test_nodata_collar_and_masked_arrays_equal_the_engine(files, masked) -> None:
    """Landsat with a nodata collar: nodata where the input is nodata; ``masked=True`` (float, NaN) gives the
    numbers of the uint8 file (normalisation from the stored dtype), and an integer model output is rounded
    and filled like the engine's."""
    kw = {"window": 64, "batch_size": 5, "blocksize": 16, "block_size": 128}
    da = rioxarray.open_rasterio(files["landsat"], chunks={"x": 90, "y": 70}, masked=masked)
    assert (da.dtype == np.uint8) != masked
    feats = dx.features(da, files["weights"], window=128, batch_size=3, blocksize=16, block_size=128)
    ref = _read(predict_raster(feats_model(files), files["landsat"], files["dir"] / f"lf{masked}.tif", window=128,
                               batch_size=3, blocksize=16, block_size=128, progress=False))
    np.testing.assert_array_equal(feats.values, ref)
    assert np.isnan(ref).any() and np.isfinite(ref).any()
    model = IntMean()
    got = dx.predict(model, da, **kw)
    ref = _read(predict_raster(model, files["landsat"], files["dir"] / f"li{masked}.tif", progress=False, **kw))
    np.testing.assert_array_equal(got.values, ref)
    nod = (_read(files["landsat"]) == 0).any(axis=0)  # nodata: any band equals the file's nodata value
    assert (ref[:, nod] == -1).all() and (ref[:, ~nod] >= 0).all() and got.rio.nodata == -1


def feats_model(files: dict[str, Path]):
    from dinov3geo.models import load_backbone
    from dinov3geo.tasks.features import MultiLayerFeatures, normalisation_for

    bb = load_backbone(files["weights"]).eval()
    vs, m, s = normalisation_for(bb, "uint8")
    return MultiLayerFeatures(bb, [-1], value_scale=vs, mean=m, std=s)


class IntMean(MeanFilter):
    """A 5x5 mean times 3 as int16 (nodata -1): exercises the integer rounding of the blend."""

    out_dtype = "int16"
    nodata = -1

    def __init__(self) -> None:
        super().__init__(5, 3, fn=lambda y: y * 3.3)


# ---------------------------------------------------------------------------------------------- laziness
class _Counter:
    def __init__(self) -> None:
        self.reads = 0
        self.lock = threading.Lock()


def _counting_array(counter: _Counter, data: np.ndarray, chunk: int) -> xr.DataArray:
    """``data`` as a dask array whose chunks count their reads (and can be told to fail)."""
    c, h, w = data.shape
    rows = []
    for r in range(0, h, chunk):
        row = []
        for col in range(0, w, chunk):
            piece = data[:, r : r + chunk, col : col + chunk]

            def read(piece=piece) -> np.ndarray:
                with counter.lock:
                    counter.reads += 1
                return piece.copy()

            row.append(dsa.from_delayed(dask.delayed(read, pure=False)(), shape=piece.shape, dtype=data.dtype))
        rows.append(row)
    arr = dsa.block([[rows[i][j] for j in range(len(rows[0]))] for i in range(len(rows))])
    from affine import Affine

    tr = Affine(10.0, 0, 500000.0, 0, -10.0, 4000000.0)
    da = xr.DataArray(arr, dims=("band", "y", "x"),
                      coords={"band": [1, 2, 3], "y": tr.f + (np.arange(h) + 0.5) * tr.e,
                              "x": tr.c + (np.arange(w) + 0.5) * tr.a})
    return da.rio.write_crs("EPSG:32633").rio.write_transform(tr)


class CountingMean(MeanFilter):
    def __init__(self) -> None:
        super().__init__(3, 3)
        self.windows = 0

    def forward(self, x, valid):
        self.windows += x.shape[0]
        return super().forward(x, valid)


@pytest.mark.parametrize("reads", ["per-block", "shared"])
def test_lazy_until_computed_and_each_window_runs_once(files, canopy_model, reads) -> None:
    data = _read(files["neon"])[:, :300, :330]
    counter = _Counter()
    da = _counting_array(counter, data, 60)
    model = CountingMean()
    kw = {"window": 64, "batch_size": 4, "blocksize": 16, "block_size": 128}
    res = dx.predict(model, da, reads=reads, **kw)
    feats = da.dinov3geo.features(files["weights"], window=128, reads=reads)
    with pytest.warns(UserWarning, match=r"10 x 10 m pixels but the canopy model was trained at 0.1 m"):
        chm = dx.canopy_height(da, canopy_model, window=128, reads=reads)
    change = dx.change_probability(da, da, weights=files["weights"], window=128, reads=reads)
    assert counter.reads == 0 and model.windows == 0  # nothing read, no model call
    assert feats.shape[0] == 64 and chm.shape == (2, 300, 330) and change.shape == (1, 300, 330)
    with dask.config.set(scheduler="threads", num_workers=2):
        got = res.values
    lay = make_layout(model, 300, 330, **{k: kw[k] for k in ("window", "blocksize", "block_size")})
    assert lay.n_blocks_total >= 4 and model.windows == lay.n_windows  # each window once: no duplicate compute
    if reads == "shared":  # every input chunk read once, shared by the blocks reading it
        assert counter.reads == math.ceil(300 / 60) * math.ceil(330 / 60)
    else:  # each block reads the chunks under its own input window
        def spans(a: int, b: int) -> int:
            return len(range(max(a, 0) // 60, (b - 1) // 60 + 1))

        wins = [lay.block_input_window(*b) for b in lay.blocks()]
        assert counter.reads == sum(spans(int(w.row_off), min(int(w.row_off + w.height), 300))
                                    * spans(int(w.col_off), min(int(w.col_off + w.width), 330)) for w in wins)
    stats: dict = {}
    tif = files["dir"] / f"counting_{reads}.tif"
    with rasterio.open(files["neon"]) as src:
        prof = src.profile | {"width": 330, "height": 300, "transform": da.rio.transform(), "crs": "EPSG:32633"}
    with rasterio.open(tif, "w", **prof) as dst:
        dst.write(data)
    ref = _read(predict_raster(CountingMean(), tif, files["dir"] / f"counting_ref_{reads}.tif", progress=False,
                               stats=stats, **kw))
    np.testing.assert_array_equal(got, ref)
    assert stats["windows_run"] == model.windows


def test_errors_name_the_problem_and_the_fix(files) -> None:
    da = rioxarray.open_rasterio(files["neon"], chunks=256)
    with pytest.raises(ValueError, match=r"expects 1 bands but the DataArray has 3 \(band_1, band_2, band_3\).*"
                                         r"da\.sel\(band="):
        dx.predict(MeanFilter(3, 1), da)
    with pytest.raises(ValueError, match=r"dims \('time', 'band', 'y', 'x'\).*da\.isel\(time=0\)"):
        dx.predict(MeanFilter(3, 3), da.expand_dims(time=2))
    with pytest.raises(TypeError, match="Dataset.*to_array"):
        dx.predict(MeanFilter(3, 3), da.to_dataset(name="img"))
    with pytest.raises(ValueError, match="window 16 is too small.*at least 112 px"):
        dx.features(da, files["weights"], window=16)
    with pytest.raises(TypeError, match=r"unexpected option\(s\) \['aoi'\]"):
        dx.features(da, files["weights"], aoi="x.gpkg")
    one = dx.predict(MeanFilter(3, 1), da.isel(band=0))  # a (y, x) array is one band
    assert one.shape == (1, 520, 600)


# ---------------------------------------------------------------------------------------------- land cover
def test_landcover_classes_equal_predict_landcover(files, tmp_path) -> None:
    from dinov3geo.tasks.landcover.classes import ClassTable, LandClass
    from dinov3geo.tasks.landcover.heads import LandcoverModel, LinearHead, save_landcover_model
    from dinov3geo.tasks.landcover.predict import predict_landcover

    torch.manual_seed(2)
    table = ClassTable([LandClass(1, "forest", "#1b7837"), LandClass(4, "water", "#2166ac"),
                        LandClass(7, "bare soil", "#bf812d")])
    head = LinearHead(64, 3)
    with torch.no_grad():
        head.classifier.weight.mul_(20)  # decisive enough that every class wins somewhere
    model = LandcoverModel(_tiny_backbone(), head, table)
    path = save_landcover_model(tmp_path / "lc.pt", model, bands=["b1", "b2", "b3"], mean=[0.4] * 3,
                                std=[0.2] * 3, value_scale=1 / 255)
    kw = {"window": 96, "batch_size": 4, "blocksize": 16, "block_size": 128}
    ref_path = predict_landcover(path, files["landsat"], tmp_path / "lc.tif", confidence=True, progress=False, **kw)
    da = rioxarray.open_rasterio(files["landsat"], chunks={"x": 100, "y": 100})
    res = dx.landcover(da, path, **kw)
    ref = _read(ref_path)
    got = res.values
    np.testing.assert_array_equal(got, ref)
    assert got.dtype == np.uint8 and list(res.band.values) == ["class", "confidence"] and res.rio.nodata == 255
    assert set(np.unique(ref[0])) >= {255} and len(set(np.unique(ref[0])) - {255}) >= 2
    assert ClassTable.from_json(res.attrs["classes"]) == table
    assert res.attrs["flag_values"] == [1, 4, 7] and res.attrs["flag_meanings"] == "forest water bare_soil"


# ---------------------------------------------------------------------------------------------- distributed
def test_job_pickles_without_weights_when_loaded_from_a_file(files) -> None:
    """What a dask.distributed worker receives: the weight file's path, not the weights; it loads the model
    once and computes the same block."""
    da = rioxarray.open_rasterio(files["neon"], chunks=256)
    res = dx.features(da, files["weights"], window=128, batch_size=3)
    graph = dict(res.data.__dask_graph__())
    [job] = [getattr(v, "value", v) for v in graph.values() if isinstance(getattr(v, "value", v), dx._Job)]
    blob = pickle.dumps(job)
    assert len(blob) < 200_000 < sum(t.numel() * 4 for t in job.model.backbone.state_dict().values())
    clone = pickle.loads(blob)
    assert clone.model is None and clone.token == job.token
    dx._LOADED.pop(job.token, None)
    with dask.config.set(scheduler="sync"):
        expected = res.values
    # the same graph with the unpickled job in place of the original
    for k, v in graph.items():
        if getattr(v, "value", v) is job:
            graph[k] = type(v)(k, clone) if hasattr(v, "value") else clone
    arr = dsa.Array(graph, res.data.name, res.data.chunks, res.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(arr.compute(scheduler="sync"), expected)
    assert job.token in dx._LOADED


@pytest.mark.distributed
def test_local_cluster_gives_identical_output(files) -> None:
    from distributed import Client, LocalCluster

    da = rioxarray.open_rasterio(files["neon"], chunks=256)
    res = dx.features(da, files["weights"], window=128, batch_size=3, blocksize=16, **SMALL)
    local = res.compute(scheduler="threads")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster):
        dist = res.compute()
    np.testing.assert_array_equal(dist.values, local.values)
