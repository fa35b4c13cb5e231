"""Evaluate a predicted canopy-height raster against a reference CHM, window by window.

:func:`evaluate_rasters` reads the prediction (band ``band``, metres) window by window on its own grid, reads
the reference CHM onto each window with :class:`~dinov3geo.tasks.canopy.labels.CHMAligner` (any CRS or
resolution; bilinear when the prediction grid is finer than the CHM, average when coarser), optionally
restricts to AOI polygons and/or a split mask, accumulates every metric of
:mod:`dinov3geo.tasks.canopy.metrics` and writes ``metrics.json``, ``pred_vs_true.png`` and
``error_by_bin.png`` into ``out_dir`` (each atomically).

Each window is one tile for the block R² (``window`` = 256 px by default, the tile size of Tolan et al.).
Predictions are used as they are (no clipping of negative predicted heights); pixels where the prediction is
nodata but the label is valid are excluded and counted in ``n_pred_missing``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from dinov3geo.io.errors import MissingCRSError
from dinov3geo.io.grid import GridSpec
from dinov3geo.io.scene import GDAL_ENV, open_raster
from dinov3geo.io.vector import aoi_geometry, aoi_mask
from dinov3geo.io.windows import clip_window, tile_windows
from dinov3geo.tasks.canopy.labels import CHMAligner, NegativePolicy
from dinov3geo.tasks.canopy.metrics import DEFAULT_BINS, CanopyMetricAccumulator
from dinov3geo.tasks.canopy.plots import plot_error_by_bin, plot_pred_vs_true
from dinov3geo.utils.atomic import atomic_path, check_writable
from dinov3geo.utils.outputs import make_output_folder
from dinov3geo.utils.progress import progress_bar

__all__ = ["evaluate_rasters", "write_json"]


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as indented JSON, atomically (NaN/inf are refused: use None)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    return Path(path)


def _read_pred(ds: Any, band: int, window: Window) -> np.ndarray:
    """Prediction heights of a (possibly boundless) window as float32, NaN where nodata/outside."""
    h, w = int(window.height), int(window.width)
    out = np.full((h, w), np.nan, dtype=np.float32)
    cw = clip_window(window, ds.height, ds.width)
    if cw.inner is None:
        return out
    arr = ds.read(band, window=cw.inner, masked=True)
    vals = np.ma.filled(arr.astype(np.float32), np.nan)
    out[cw.rows, cw.cols] = vals
    return out


def evaluate_rasters(
    pred_path: str | os.PathLike[str],
    truth_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    aoi: Any = None,
    split_mask: np.ndarray | str | os.PathLike[str] | None = None,
    band: int = 1,
    truth_band: int = 1,
    window: int = 256,
    bins: Sequence[float] = DEFAULT_BINS,
    block: int = 50,
    border: int = 3,
    cover_thresholds: Sequence[float] = (2, 5),
    negative: NegativePolicy = "clip",
    truth_resampling: str | None = None,
    truth_crs: Any = None,
    title: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Compare a predicted CHM raster with a reference CHM; write ``metrics.json`` and two plots.

    Args:
        pred_path: predicted canopy height raster (e.g. a COG from ``dinov3geo``), heights in ``band``.
        truth_path: reference CHM (lidar/photogrammetric), any CRS and resolution.
        out_dir: output folder (created).
        aoi: restrict to polygons: a vector file, GeoDataFrame or shapely geometry with a CRS (see
            :func:`dinov3geo.io.vector.aoi_geometry`); pixels whose centre is inside count.
        split_mask: restrict to a split, e.g. the test area of a
            :class:`~dinov3geo.tasks.canopy.splits.SpatialSplit`: a bool ``[H, W]`` array on the prediction
            grid, or a raster (non-zero = evaluate), reprojected onto the prediction grid with nearest.
        band: 1-based band of the heights in ``pred_path``.
        truth_band: 1-based band of the heights in ``truth_path``.
        window: window side in pixels (one tile for the block R²).
        bins, block, border, cover_thresholds: see :class:`CanopyMetricAccumulator`.
        negative: what to do with negative reference heights (``"clip"`` to 0, ``"invalid"``, ``"keep"``).
        truth_resampling: force the reference resampling (default: bilinear/average by resolution).
        truth_crs: CRS to assume for a reference without one.
        title: plot title (default: the prediction file name).
        progress: show a progress bar.

    Returns:
        the metrics dict (as in ``metrics.json``), with ``inputs`` and ``outputs`` sections added.
    """
    pred_path, truth_path = os.fspath(pred_path), os.fspath(truth_path)
    inputs = [pred_path, truth_path, *(x for x in (aoi, split_mask) if isinstance(x, str | os.PathLike))]
    out = make_output_folder(out_dir, inputs, kind="canopy-eval", role="--out",
                             files=("metrics.json", "pred_vs_true.png", "error_by_bin.png"))
    check_writable(out / "metrics.json")
    if window < 1:
        raise ValueError(f"window must be >= 1 pixel, got {window}")
    acc = CanopyMetricAccumulator(bins=bins, block=block, border=border, cover_thresholds=cover_thresholds)
    with rasterio.Env(**GDAL_ENV):
        pds = open_raster(pred_path)
        with pds:
            if not 1 <= band <= pds.count:
                raise ValueError(
                    f"band {band} not found in the prediction {pred_path!r} ({pds.count} band(s)); "
                    "pass the 1-based index of the height band (CLI: --band)"
                )
            if pds.crs is None:
                raise MissingCRSError(pred_path, hint="The prediction must be georeferenced to align the reference.")
            grid = GridSpec.from_dataset(pds)
            geom = aoi_geometry(aoi, grid.crs) if aoi is not None else None
            smask, svrt, sds = _open_split_mask(split_mask, grid)
            try:
                with CHMAligner(
                    truth_path, band=truth_band, negative=negative, resampling=truth_resampling, assume_crs=truth_crs
                ) as al:
                    al.check_overlap(grid, what=f"the prediction {pred_path!r}")
                    truth_rs = al.resampling or None
                    wins = tile_windows(grid.height, grid.width, window, edge="pad")
                    with progress_bar(len(wins), desc="evaluate", disable=not progress) as bar:
                        for win in wins:
                            wgrid = grid.window_grid(win)
                            keep = np.ones(wgrid.shape, dtype=bool)
                            if geom is not None:
                                if not geom.intersects(_box(wgrid)):
                                    bar.update(1)
                                    continue
                                keep &= aoi_mask(geom, wgrid)
                            if smask is not None or svrt is not None:
                                keep &= _split_window(smask, svrt, win)
                            if not keep.any():
                                bar.update(1)
                                continue
                            lab = al.read(wgrid)
                            truth_rs = lab.resampling
                            pred = _read_pred(pds, band, win)
                            acc.update(pred, lab.heights, lab.valid & keep)
                            bar.update(1)
            finally:
                if svrt is not None:
                    svrt.close()
                if sds is not None:
                    sds.close()
    metrics = acc.compute()
    if metrics["n"] == 0:
        raise ValueError(
            f"no pixel to evaluate: the prediction {pred_path!r} and reference {truth_path!r} have no valid pixel in "
            "common" + (" inside the AOI" if aoi is not None else "") + (" inside the split mask" if split_mask is not None else "")
        )
    name = title or Path(pred_path).name
    png1 = plot_pred_vs_true(acc.hist2d, acc.hist_edges, metrics, out / "pred_vs_true.png", title=name)
    png2 = plot_error_by_bin(metrics, out / "error_by_bin.png", title=f"{name}: error by reference height")
    metrics["inputs"] = {
        "pred": pred_path,
        "truth": truth_path,
        "band": band,
        "truth_band": truth_band,
        "aoi": None if aoi is None else (os.fspath(aoi) if isinstance(aoi, str | os.PathLike) else type(aoi).__name__),
        "split_mask": None if split_mask is None else (
            os.fspath(split_mask) if isinstance(split_mask, str | os.PathLike) else "array"),
        "grid": {"crs": grid.crs.to_string(), "res": list(grid.res), "width": grid.width, "height": grid.height},
        "window": window,
        "truth_resampling": truth_rs,
        "negative_truth": negative,
    }
    metrics["outputs"] = {"metrics": str(out / "metrics.json"), "pred_vs_true": str(png1), "error_by_bin": str(png2)}
    write_json(metrics, out / "metrics.json")
    return metrics


def _box(grid: GridSpec) -> Any:
    import shapely

    return shapely.box(*grid.bounds)


def _open_split_mask(split_mask: Any, grid: GridSpec) -> tuple[np.ndarray | None, Any, Any]:
    """(array, warped dataset, raw dataset) for a split mask given as an array or a raster path."""
    if split_mask is None:
        return None, None, None
    if isinstance(split_mask, str | os.PathLike):
        path = os.fspath(split_mask)
        ds = open_raster(path)
        if ds.crs is None:
            ds.close()
            raise MissingCRSError(path, hint="The split mask raster must be georeferenced.")
        vrt = WarpedVRT(ds, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                        resampling=Resampling.nearest, nodata=0)
        return None, vrt, ds
    arr = np.asarray(split_mask, dtype=bool)
    if arr.shape != grid.shape:
        raise ValueError(f"split_mask has shape {arr.shape} but the prediction grid is {grid.shape} (rows, cols)")
    return arr, None, None


def _split_window(arr: np.ndarray | None, vrt: Any, win: Window) -> np.ndarray:
    h, w = int(win.height), int(win.width)
    out = np.zeros((h, w), dtype=bool)
    src_h, src_w = (arr.shape if arr is not None else (vrt.height, vrt.width))
    cw = clip_window(win, src_h, src_w)
    if cw.inner is None:
        return out
    if arr is not None:
        r0, c0 = int(cw.inner.row_off), int(cw.inner.col_off)
        out[cw.rows, cw.cols] = arr[r0 : r0 + int(cw.inner.height), c0 : c0 + int(cw.inner.width)]
    else:
        out[cw.rows, cw.cols] = vrt.read(1, window=cw.inner) != 0
    return out
