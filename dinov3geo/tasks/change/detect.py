"""End-to-end change and deforestation detection between two dates: :func:`detect_change`.

Steps:

1. co-register the dates (:func:`~dinov3geo.tasks.change.coregister.coregister`): date 2 on the date-1 grid (or
   a user grid), overlap and residual misregistration reported;
2. mask nodata of either date, plus clouds/shadows from Sentinel-2 SCL rasters or a brightness test
   (:mod:`~dinov3geo.tasks.change.masking`); the AOI, when given, limits everything;
3. score change window by window with the inference engine (:func:`dinov3geo.inference.predict_raster`) over
   the stacked two-date source, with one of

   * ``"classic"``: CVA (default) or NDVI differencing (:mod:`~dinov3geo.tasks.change.classic`),
   * ``"zeroshot"``: cosine distance of frozen DINOv3 patch features (``ZeroShotChange``),
   * ``"head"``: a trained bi-temporal change head (``load_change_model``);

   the windows per model call (``batch_size=None``, the default): for a head, chosen from its
   :meth:`~dinov3geo.tasks.change.head.ChangeModel.memory_estimate` and the memory there is
   (:func:`~dinov3geo.inference.batching.resolve_batch_size`; measured in ``benchmarks/head_memory.py``);
   4 for the classic scores and zero-shot distances, which have no estimate; a resumed run keeps the batch
   size it was started with (it is part of the engine's resume fingerprint);

4. threshold: the given one, else the trained head's own, else Otsu on the valid pixels;
5. forest loss when forest information is given (:mod:`~dinov3geo.tasks.change.deforestation`), MMU;
6. polygons with ``area_ha``, dates, confidence and height-drop statistics (:mod:`~dinov3geo.tasks.change.
   polygons`), a per-AOI summary and ``summary.json``.

Outputs in ``out_dir`` (all written atomically; rasters are COGs on the common grid, with its CRS):

* ``change_prob.tif``: float32 change probability in ``[0, 1]``, NaN = nodata. For ``"classic"`` it is the
  score rescaled to 0.5 at the threshold (not calibrated; see :func:`~dinov3geo.tasks.change.classic.
  score_to_probability`) and the raw score is kept in ``change_score.tif``;
* ``change.tif``: uint8, 1 = change, 0 = no change, 255 = nodata (clouds, nodata, outside the AOI); no MMU;
* ``forest_loss.tif`` (with forest information): uint8, 1 = loss (MMU applied), 0 = no loss, 255 = nodata;
* ``loss_polygons.gpkg``: polygons of forest loss (or of change when there is no forest information), MMU
  applied;
* ``aoi_summary.csv`` (with an AOI): hectares of loss per AOI feature and in total;
* ``summary.json``: inputs, grid, dates, overlap, misregistration, threshold, hectares, outputs.

Memory is bounded by the window and tile sizes, not by the grid: the model runs window by window, and the
post-processing reads the score back tile by tile (``post_tile`` pixels a side, default 2048) in a few
passes over the tiles:

1. the range and count of the valid scores (and the valid / AOI hectares);
2. with Otsu, the histogram of the valid scores over that range (the threshold equals Otsu's on the whole
   array, see :mod:`~dinov3geo.tasks.change.thresholds`);
3. probability, change and forest-loss rules per pixel; ``change_prob.tif`` and ``change.tif`` written tile
   by tile (:class:`~dinov3geo.io.cog.COGWriter`); the regions of the loss (or change) mask labelled per
   tile and joined across tile edges (:class:`~dinov3geo.tasks.change.windowed.RegionScan`), so the MMU is
   decided on whole regions;
4. the MMU applied, ``forest_loss.tif`` written tile by tile, polygons and zonal statistics per tile with
   regions cut by tile edges dissolved (:class:`~dinov3geo.tasks.change.windowed.PolygonBuilder`).

The results are those of the in-memory reference (:func:`~dinov3geo.tasks.change.deforestation.forest_loss`,
:func:`~dinov3geo.tasks.change.polygons.change_polygons`) whatever the tile size; the polygon table itself
grows with the number of polygons. When every valid score is equal (e.g. two identical images) Otsu has
nothing to separate: the score threshold is infinite, nothing is change, and a warning says so.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from dinov3geo.inference import predict_raster
from dinov3geo.inference.batching import check_batch_size, resolve_batch_size
from dinov3geo.inference.engine import resolve_device
from dinov3geo.io.cog import COGWriter
from dinov3geo.io.grid import GridSpec
from dinov3geo.io.sidecars import sidecar_properties, write_sidecars
from dinov3geo.io.stac import parse_date
from dinov3geo.io.vector import aoi_geometry, aoi_mask
from dinov3geo.tasks.change.classic import CVAModel, NDVIDiffModel, band_stats, score_to_probability
from dinov3geo.tasks.change.coregister import ArrayPair, CoregisteredPair, coregister
from dinov3geo.tasks.change.deforestation import ForestLoss, GridReader, forest_loss
from dinov3geo.tasks.change.masking import MaskedSource, masker_from
from dinov3geo.tasks.change.polygons import aoi_summary, pixel_area_ha, write_polygons, write_summary
from dinov3geo.tasks.change.thresholds import ScoreHistogram, ValueRange
from dinov3geo.tasks.change.windowed import DEFAULT_TILE, PolygonBuilder, RegionScan, tile_windows
from dinov3geo.utils.atomic import atomic_path
from dinov3geo.utils.outputs import guard_output, make_output_folder, writes_output_folder

__all__ = ["FALLBACK_BATCH_SIZE", "METHODS", "ChangeResult", "detect_change"]

log = logging.getLogger(__name__)
_GDAL_CACHE_MB = 64  # GDAL block cache while post-processing (reading the score back, writing the maps)

METHODS = ("classic", "zeroshot", "head")
DISCLAIMER = ("Pixel counts of a classified map are biased estimates of area; use a sampling-based accuracy "
              "assessment (e.g. Olofsson et al. 2014) before reporting areas.")


@dataclass
class ChangeResult:
    """What :func:`detect_change` wrote and measured.

    Attributes:
        out_dir: the output folder.
        paths: output name -> path (``change_prob``, ``change``, ``change_score``, ``forest_loss``, ``polygons``,
            ``aoi_summary``, ``summary``), only those written.
        threshold: threshold on ``change_prob`` (classic: 0.5 by construction; see ``score_threshold``).
        score_threshold: threshold on the raw score (the same as ``threshold`` except for ``"classic"``).
        threshold_source: ``"given"``, ``"model"`` (the head's validation threshold) or ``"otsu"``.
        change_ha: hectares of change (pixels, no MMU).
        loss_ha: hectares of forest loss (after the MMU) or None without forest information.
        polygons_ha: hectares of the written polygons.
        n_polygons: number of polygons.
        pair: the co-registered pair (grid, dates, overlap, misregistration).
        summary: the content of ``summary.json``.
        timings: wall seconds of the steps (``coregister``, ``model``, ``range``, ``histogram``, ``maps``,
            ``polygons``, ``write``), for benchmarks and logs.
    """

    out_dir: Path
    paths: dict[str, Path]
    threshold: float
    score_threshold: float
    threshold_source: str
    change_ha: float
    loss_ha: float | None
    polygons_ha: float
    n_polygons: int
    pair: CoregisteredPair
    summary: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _sample_source(src: Any, pair: CoregisteredPair, max_pixels: int = 1_000_000) -> ArrayPair:
    """Both dates with every mask (clouds included) when the grid is small, else the coarse pair sample."""
    g = pair.grid
    if g.width * g.height > max_pixels:
        return pair.sample(max_pixels)
    # an outer GDAL environment: the stacked readers' own environments then nest in any closing order
    with rasterio.Env(), src.reader() as r:
        data, valid = r.read(Window(0, 0, g.width, g.height))
    c = len(pair.band_names)
    return ArrayPair(data[:c].astype(np.float32), data[c:].astype(np.float32), valid, pair.band_names, g)


def _build_model(method: str, pair: CoregisteredPair, src: Any, *, classic_method: str, ndvi_direction: str,
                 model: Any, backbone: Any, value_scale: float | None, mean: Sequence[float] | None,
                 std: Sequence[float] | None, layers: Any, device: str) -> tuple[Any, dict[str, Any]]:
    info: dict[str, Any] = {"method": method}
    if method == "classic":
        info["classic_method"] = classic_method
        if classic_method == "cva":
            smp = _sample_source(src, pair)
            stats = band_stats(smp.before, smp.after, smp.valid)
            return CVAModel(stats), info
        if classic_method == "ndvi":
            info["ndvi_direction"] = ndvi_direction
            return NDVIDiffModel(pair.band_names, ndvi_direction), info
        raise ValueError(f"classic_method must be 'cva' or 'ndvi', got {classic_method!r}")
    if method == "zeroshot":
        from dinov3geo.models import load_backbone
        from dinov3geo.tasks.change.zeroshot import ZeroShotChange
        from dinov3geo.tasks.features import normalisation_for

        if backbone is None:
            raise ValueError("method='zeroshot' needs a backbone (weights file or module; CLI --backbone)")
        bb = load_backbone(backbone) if isinstance(backbone, str | os.PathLike) else backbone
        vs, m, s = normalisation_for(bb, pair.before.dtype)
        c = len(pair.band_names)
        if bb.patch_embed.proj.in_channels != c and mean is None:
            m = s = None
        kw: dict[str, Any] = {"layers": layers} if layers is not None else {}
        zs = ZeroShotChange(bb, bands_per_date=c, value_scale=vs if value_scale is None else value_scale,
                            mean=mean if mean is not None else m, std=std if std is not None else s,
                            band_names=list(pair.band_names), **kw)
        info["backbone"] = os.fspath(backbone) if isinstance(backbone, str | os.PathLike) else type(bb).__name__
        return zs, info
    if method == "head":
        from dinov3geo.tasks.change.head import load_change_model

        if model is None:
            raise ValueError("method='head' needs a trained change model (CLI --model), see `dinov3geo change train`")
        rm = load_change_model(model, backbone=backbone) if isinstance(model, str | os.PathLike) else model
        want = getattr(rm, "bands", None)
        if want and [b.lower() for b in want] != [b.lower() for b in pair.band_names]:
            raise ValueError(f"the change model {os.fspath(model) if isinstance(model, str | os.PathLike) else ''!s} "
                             f"was trained on bands {list(want)} but the images give {list(pair.band_names)}; "
                             f"pass bands={list(want)} (CLI --bands) or band_names to match")
        info["model"] = os.fspath(model) if isinstance(model, str | os.PathLike) else type(rm).__name__
        return rm, info
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _uint8_map(mask: np.ndarray, valid: np.ndarray) -> np.ndarray:
    out = np.full(mask.shape, 255, dtype=np.uint8)
    out[valid] = mask[valid].astype(np.uint8)
    return out


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass
class _Tile:
    """The per-pixel maps of one post-processing tile."""

    valid: np.ndarray
    prob: np.ndarray
    change: np.ndarray
    hb: np.ndarray | None
    ha: np.ndarray | None
    loss: ForestLoss | None

    @property
    def target(self) -> np.ndarray:
        """The mask whose regions get the MMU and become polygons: forest loss when known, else change."""
        return self.loss.loss_raw if self.loss is not None else self.change


#: windows per model call of the methods without a memory estimate (classic scores, zero-shot distances) when
#: ``batch_size`` is None
FALLBACK_BATCH_SIZE = 4

#: the dinov3geo folder kind of a change-detection output folder
CHANGE_KIND = "change"


def _change_inputs(a: dict[str, Any]) -> list[Any]:
    """Everything :func:`detect_change` reads (for the output guard)."""
    keys = ("before", "after", "aoi", "canopy_before", "canopy_after", "forest_mask", "scl_before", "scl_after",
            "model", "backbone")
    return [a.get(k) for k in keys if isinstance(a.get(k), str | os.PathLike | list | tuple)]


@writes_output_folder("out_dir", kind=CHANGE_KIND, inputs=_change_inputs, what="change detect",
                      files=("change_prob.tif", "change.tif", "change_score.tif", "forest_loss.tif",
                             "loss_polygons.gpkg", "aoi_summary.csv", "summary.json"))
def detect_change(
    before: Any,
    after: Any,
    out_dir: str | os.PathLike[str],
    *,
    method: str = "classic",
    classic_method: str = "cva",
    ndvi_direction: str = "decrease",
    aoi: Any = None,
    threshold: float | None = None,
    canopy_before: Any = None,
    canopy_after: Any = None,
    forest_mask: Any = None,
    min_height: float = 5.0,
    drop_threshold: float = 5.0,
    loss_evidence: str = "auto",
    combine: str = "and",
    mmu_ha: float = 0.1,
    connectivity: int = 8,
    dates: Sequence[Any] | None = None,
    bands: Sequence[str | int] | None = None,
    band_names: Sequence[str] | None = None,
    grid: GridSpec | None = None,
    resampling: str = "bilinear",
    nodata: float | None = None,
    assume_crs: Any = None,
    scl_before: Any = None,
    scl_after: Any = None,
    cloud_test: bool = False,
    model: Any = None,
    backbone: Any = None,
    value_scale: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    layers: Any = None,
    misregistration_threshold_px: float = 0.5,
    polygons_name: str = "loss_polygons.gpkg",
    window: int = 512,
    batch_size: int | None = None,
    device: str = "auto",
    progress: bool = True,
    post_tile: int = DEFAULT_TILE,
    sidecars: bool | dict[str, Any] = True,
) -> ChangeResult:
    """Detect change (and forest loss) between two dates and write maps, polygons and a summary.

    Args:
        before, after: the two dates: raster files, band folders, lists of band files, STAC items or scenes.
        out_dir: output folder (created).
        method: ``"classic"``, ``"zeroshot"`` or ``"head"`` (see the module docstring).
        classic_method: ``"cva"`` or ``"ndvi"`` (needs red and nir bands).
        ndvi_direction: NDVI score direction: ``"decrease"`` (vegetation loss), ``"increase"``, ``"both"``.
        aoi: area of interest (vector file, GeoDataFrame); outside it everything is nodata. Each AOI feature
            gets a line in ``aoi_summary.csv``.
        threshold: threshold on the change score (classic: the raw CVA/NDVI score; zeroshot: the cosine
            distance; head: the probability). Default: the head's own threshold, else Otsu.
        canopy_before, canopy_after: canopy-height rasters (m) of the two dates (any grid/CRS; read bilinearly
            on the common grid).
        forest_mask: a forest mask of date 1 (non-zero = forest), read with nearest resampling.
        min_height: forest height threshold (m).
        drop_threshold: canopy-height drop counted as loss (m).
        loss_evidence: ``"auto"`` (height drop when both heights are known, and the change probability, combined
            with ``combine``), ``"height"`` (height drop only) or ``"prob"`` (change probability only).
        combine: ``"and"`` or ``"or"`` for the two kinds of evidence.
        mmu_ha: minimum mapping unit (hectares) of loss regions and polygons.
        connectivity: 4 or 8 for regions/polygons.
        dates: ``(date_before, date_after)`` overriding detected dates (ISO strings or dates).
        bands, band_names, grid, resampling, nodata, assume_crs: see
            :func:`~dinov3geo.tasks.change.coregister.coregister`.
        scl_before, scl_after: Sentinel-2 SCL rasters of each date (clouds, shadows, cirrus masked).
        cloud_test: also mask bright white pixels (crude cloud test for imagery without a cloud mask).
        model: a trained change model (file or RasterModel) for ``method="head"``.
        backbone: backbone weights (file or module) for ``"zeroshot"`` (and for a head whose checkpoint does
            not embed it).
        value_scale, mean, std, layers: normalisation / blocks for ``"zeroshot"`` (default from the backbone).
        misregistration_threshold_px: warning threshold of the residual shift.
        polygons_name: polygons file name; the suffix picks the format (``.gpkg``, ``.parquet``, ``.geojson``).
        window, device, progress: inference-engine settings (:func:`~dinov3geo.inference.predict_raster`).
        batch_size: windows per model call. None (default): for ``method="head"`` chosen from the model's
            :meth:`~dinov3geo.tasks.change.head.ChangeModel.memory_estimate` and the memory available
            (:func:`~dinov3geo.inference.batching.choose_batch_size`: on CPU up to 4 x 512^2 pixels per call
            within 1 GiB with the engine's own buffers, on CUDA what fits in half the free memory; ``benchmarks/head_memory.py`` measures it); 4
            (:data:`FALLBACK_BATCH_SIZE`) for ``"classic"`` and ``"zeroshot"``; the batch size of the
            interrupted run being resumed, whatever the method. An explicit positive int is used as given.
        post_tile: tile size (pixels) of the windowed post-processing; memory grows with its square (about
            100-150 MB at 2048), never with the grid. The outputs do not depend on it.
        sidecars: writes ``<product>.stac.json`` (STAC Item spanning the pair's dates, with the images, AOI,
            canopy/forest/cloud-mask inputs and model files) for the rasters and the polygons and, for the
            rasters, a QGIS ``.qml`` style + GDAL statistics (:func:`dinov3geo.io.sidecars.write_sidecars`; never
            fails the detection). ``sidecars=False`` to skip; a dict adds its entries to the Items' properties.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if loss_evidence not in ("auto", "height", "prob"):
        raise ValueError(f"loss_evidence must be 'auto', 'height' or 'prob', got {loss_evidence!r}")
    if (canopy_before is None) != (canopy_after is None) and forest_mask is None and canopy_before is None:
        raise ValueError("canopy_after without canopy_before: forest at date 1 needs canopy_before or forest_mask")
    use_forest = canopy_before is not None or forest_mask is not None
    use_h = loss_evidence in ("auto", "height") and canopy_before is not None and canopy_after is not None
    use_p = loss_evidence in ("auto", "prob")
    if use_forest and loss_evidence == "height" and not use_h:
        raise ValueError("loss_evidence='height' needs canopy_before and canopy_after")
    if int(post_tile) < 1:
        raise ValueError(f"post_tile must be >= 1 pixel, got {post_tile}")
    check_batch_size(batch_size)  # before any work
    out = Path(out_dir)  # guarded and locked (writes_output_folder); created once the model has loaded
    guard_output(out / polygons_name, _change_inputs(locals()), role="polygons_name")
    caught: list[str] = []
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[name] = round(now - t0, 3)
        t0 = now

    with warnings.catch_warnings(record=True) as wlist:
        warnings.simplefilter("always")
        pair = coregister(before, after, grid=grid, resampling=resampling, bands=bands, band_names=band_names,
                          nodata=nodata, assume_crs=assume_crs, dates=dates,
                          misregistration_threshold_px=misregistration_threshold_px)
    for w in wlist:
        caught.append(str(w.message))
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    g = pair.grid
    lap("coregister")
    mb = masker_from(scl_before, cloud_test, assume_crs=assume_crs)
    ma = masker_from(scl_after, cloud_test, assume_crs=assume_crs)
    src = pair.source(masks=(mb, ma)) if (mb or ma) else pair.source()
    rmodel, info = _build_model(method, pair, src, classic_method=classic_method, ndvi_direction=ndvi_direction,
                                model=model, backbone=backbone, value_scale=value_scale, mean=mean, std=std,
                                layers=layers, device=device)
    make_output_folder(out, kind=CHANGE_KIND, role="out_dir")

    paths: dict[str, Path] = {}
    score_name = "change_score.tif" if method == "classic" else "change_prob.tif"
    score_path = out / score_name
    tags = {"dinov3geo_task": "change", "date_before": pair.date_before or "", "date_after": pair.date_after or "",
            "method": method}
    # the engine resumes an interrupted run into score_path: keep its batch size (part of the fingerprint)
    batch = resolve_batch_size(rmodel, window, resolve_device(device), batch_size, out=score_path,
                               fallback=FALLBACK_BATCH_SIZE)
    log.info("change scores (%s): window %d px, batch size %d", method, window, batch)
    predict_raster(rmodel, src, score_path, aoi=aoi, window=window, batch_size=batch, device=device,
                   progress=progress, tags=tags)
    lap("model")
    paths["change_score" if method == "classic" else "change_prob"] = score_path

    windows = tile_windows(g.height, g.width, int(post_tile))
    row_area = pixel_area_ha(g)[:, 0]

    def hectares(mask: np.ndarray, win: Window) -> float:
        r0 = int(win.row_off)
        return float((mask.sum(axis=1, dtype=np.float64) * row_area[r0 : r0 + int(win.height)]).sum())

    with ExitStack() as stack:
        # an outer GDAL environment (the readers' own environments then nest in any closing order) with a
        # small block cache: GDAL's default (5 % of the RAM) would fill up with the score's tiles as the passes
        # go over a large grid, so memory would grow with the grid up to that cap
        stack.enter_context(rasterio.Env(GDAL_CACHEMAX=_GDAL_CACHE_MB))
        sds = stack.enter_context(rasterio.open(score_path))

        def read_score(win: Window) -> np.ndarray:
            return sds.read(1, window=win, out_dtype="float32")

        # -------------------------------------------------------------- pass 1: valid pixels, score range
        rng = ValueRange()
        n_valid, valid_ha = 0, 0.0
        aoi_ha: float | None = None
        aoi_geom = aoi_geometry(aoi, g.crs) if aoi is not None else None
        for win in windows:
            sc = read_score(win)
            v = np.isfinite(sc)
            rng.add(sc, v)
            n_valid += int(v.sum())
            valid_ha += hectares(v, win)
            if aoi_geom is not None:
                aoi_ha = (aoi_ha or 0.0) + hectares(aoi_mask(aoi_geom, g.window_grid(win)), win)
        if n_valid == 0:
            raise ValueError(f"no valid pixel to detect change in (both dates valid, cloud-free"
                             f"{', inside the AOI' if aoi is not None else ''}); check the inputs and masks")
        lap("range")

        # -------------------------------------------------------------- pass 2 (Otsu): histogram, threshold
        if threshold is not None:
            score_thr, thr_src = float(threshold), "given"
        elif method == "head" and getattr(rmodel, "threshold", None) is not None:
            score_thr, thr_src = float(rmodel.threshold), "model"
        elif rng.constant:
            score_thr, thr_src = math.inf, "otsu"
            msg = (f"all {n_valid} valid change scores equal {rng.lo:g}: Otsu has nothing to separate, so nothing "
                   "is change (threshold set to infinity)")
            caught.append(msg)
            log.warning(msg)
        else:
            hist = ScoreHistogram(rng.lo, rng.hi)
            for win in windows:
                sc = read_score(win)
                hist.add(sc, np.isfinite(sc))
            score_thr, thr_src = hist.otsu(), "otsu"
        prob_thr = 0.5 if method == "classic" else score_thr
        lap("histogram")

        hb_r = (stack.enter_context(GridReader(canopy_before, g, assume_crs=assume_crs))
                if canopy_before is not None else None)
        ha_r = (stack.enter_context(GridReader(canopy_after, g, assume_crs=assume_crs))
                if canopy_after is not None else None)
        fm_r = (stack.enter_context(GridReader(forest_mask, g, resampling="nearest", assume_crs=assume_crs))
                if forest_mask is not None else None)

        def tile_maps(win: Window) -> _Tile:
            sc = read_score(win)
            valid = np.isfinite(sc)
            if method == "classic":
                prob = np.where(valid, score_to_probability(sc, score_thr), np.nan).astype(np.float32)
            else:
                prob = sc
            change = valid & (prob >= prob_thr)
            hb = hb_r.read(win) if hb_r is not None else None
            ha = ha_r.read(win) if ha_r is not None else None
            fl = None
            if use_forest:
                fm = fm_r.read(win) if fm_r is not None else None
                fl = forest_loss(height_before=hb, height_after=ha if use_h else None,
                                 forest=None if fm is None else np.where(np.isfinite(fm), fm, 0),
                                 prob=prob if use_p else None, prob_threshold=prob_thr if use_p else None,
                                 valid=valid, min_height=min_height, drop_threshold=drop_threshold, combine=combine,
                                 mmu_ha=0, connectivity=connectivity)
            return _Tile(valid, prob, change, hb, ha, fl)

        # -------------------------------------------------------------- pass 3: maps, regions across tiles
        scan = RegionScan(g, int(post_tile), connectivity=connectivity, mmu_ha=mmu_ha, pixel_area=row_area)
        change_ha = forest_ha = raw_ha = 0.0
        evidence = ""
        with ExitStack() as writers:
            wprob = None
            if method == "classic":
                wprob = writers.enter_context(COGWriter(
                    out / "change_prob.tif", g, 1, "float32", nodata=float("nan"), band_names=["change_prob"],
                    tags={**tags, "threshold_on_score": score_thr}, gdal_cachemax_mb=_GDAL_CACHE_MB))
            wchange = writers.enter_context(COGWriter(
                out / "change.tif", g, 1, "uint8", nodata=255, band_names=["change"],
                tags={**tags, "threshold": prob_thr}, overview_resampling="nearest", gdal_cachemax_mb=_GDAL_CACHE_MB))
            for win in windows:
                t = tile_maps(win)
                if wprob is not None:
                    wprob.write(t.prob, win)
                wchange.write(_uint8_map(t.change, t.valid), win)
                change_ha += hectares(t.change, win)
                if t.loss is not None:
                    forest_ha += hectares(t.loss.forest, win)
                    raw_ha += hectares(t.loss.loss_raw, win)
                    evidence = t.loss.evidence
                scan.add(win, t.target)
        if method == "classic":
            paths["change_prob"] = out / "change_prob.tif"
        paths["change"] = out / "change.tif"
        plan = scan.finish()
        lap("maps")

        # -------------------------------------------------------------- pass 4: MMU, forest loss, polygons
        pb = PolygonBuilder(g, connectivity=connectivity, date_before=pair.date_before, date_after=pair.date_after,
                            with_prob=True, with_heights=hb_r is not None and ha_r is not None)
        loss_ha = 0.0
        with ExitStack() as writers:
            wloss = None
            if use_forest:
                wloss = writers.enter_context(COGWriter(
                    out / "forest_loss.tif", g, 1, "uint8", nodata=255, band_names=["forest_loss"],
                    overview_resampling="nearest", gdal_cachemax_mb=_GDAL_CACHE_MB,
                    tags={**tags, "evidence": evidence, "mmu_ha": mmu_ha, "min_height_m": min_height,
                          "drop_threshold_m": drop_threshold}))
            for win in windows:
                t = tile_maps(win)
                tr = plan.resolve(win, t.target)
                if wloss is not None and t.loss is not None:
                    kept = tr.kept()
                    wloss.write(_uint8_map(kept, t.loss.valid), win)
                    loss_ha += hectares(kept, win)
                pb.add(tr, prob=t.prob, height_before=t.hb, height_after=t.ha)
        if use_forest:
            paths["forest_loss"] = out / "forest_loss.tif"
    loss_info: dict[str, Any] | None = None
    if use_forest:
        loss_info = {"evidence": evidence, "forest_ha": forest_ha, "loss_ha_before_mmu": raw_ha, "loss_ha": loss_ha,
                     "min_height_m": min_height, "drop_threshold_m": drop_threshold, "combine": combine}

    # ------------------------------------------------------------------ polygons and summaries
    polys = pb.result(mmu_ha)
    lap("polygons")
    paths["polygons"] = write_polygons(polys, out / polygons_name, layer="loss" if use_forest else "change")
    table = aoi_summary(polys, aoi) if aoi is not None else aoi_summary(polys)
    if aoi is not None:
        paths["aoi_summary"] = write_summary(table, out / "aoi_summary.csv")
    polygons_ha = float(polys["area_ha"].sum()) if len(polys) else 0.0
    summary = {
        "format": "dinov3geo.change.summary", "version": 1, **info,
        **pair.summary(),
        "aoi": os.fspath(aoi) if isinstance(aoi, str | os.PathLike) else (None if aoi is None else "given"),
        "aoi_ha": aoi_ha,
        "threshold": {"value": _finite_or_none(prob_thr), "on": "change_prob",
                      "score_value": _finite_or_none(score_thr), "source": thr_src},
        "masks": {"scl_before": os.fspath(scl_before) if scl_before is not None else None,
                  "scl_after": os.fspath(scl_after) if scl_after is not None else None, "cloud_test": cloud_test,
                  "masked_pixels": sum(s.masked_pixels for s in getattr(src, "sources", [])
                                       if isinstance(s, MaskedSource))},
        "valid_ha": valid_ha, "valid_fraction": n_valid / (g.width * g.height),
        "change_ha": change_ha, "change_fraction_of_valid": change_ha / valid_ha if valid_ha else math.nan,
        "forest_loss": loss_info,
        "polygons": {"what": "forest_loss" if use_forest else "change", "n": len(polys), "area_ha": polygons_ha,
                     "mmu_ha": mmu_ha, "connectivity": connectivity},
        "per_aoi": json.loads(table.to_json(orient="records")),
        "warnings": caught,
        "outputs": {k: p.name for k, p in paths.items()},
        "note": DISCLAIMER,
    }
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=str))
    paths["summary"] = out / "summary.json"
    lap("write")
    log.info("change detection steps (s): %s; %d tiles of %d px, %d regions across tile edges", timings,
             len(windows), int(post_tile), plan.n_components)
    props = sidecar_properties(sidecars, "dinov3geo.tasks.change.detect.detect_change")
    if props is not None:
        try:
            dated: tuple[Any, Any] | None = (parse_date(pair.date_before, "date_before"),
                                             parse_date(pair.date_after, "date_after"))
        except (TypeError, ValueError):
            dated = None  # the Items take dates from the products' tags or their creation time
        write_sidecars(paths.values(), inputs=[before, after, aoi if isinstance(aoi, str | os.PathLike) else None,
                                               canopy_before, canopy_after, forest_mask, scl_before, scl_after],
                       model=[model, backbone], datetime=dated, extra_properties=props)
    return ChangeResult(out, paths, float(prob_thr), float(score_thr), thr_src, change_ha,
                        loss_info["loss_ha"] if loss_info else None, polygons_ha, len(polys), pair, summary,
                        timings)
