"""Map canopy height over a region: a canopy model through the inference engine -> COG (+ per-AOI summary).

:func:`predict_canopy` runs a trained dinov3geo canopy model (``dinov3geo canopy train``) or Meta's CHMv2
(:func:`~dinov3geo.tasks.canopy.chmv2.load_chmv2`) over any raster the engine reads (file, mosaic, STAC item,
tile store) with blended sliding windows, and writes a float32 COG in metres with two bands, ``height`` and
``height_std`` (per-pixel standard deviation of the bin distribution: the uncertainty), nodata NaN, the CRS of
the input, overviews. Pixels that are nodata in the input or outside the AOI are nodata in the output.

Resolution matters more than any numeric detail (``chmv2-spec.md`` §12): when the model records the GSD it was
trained at and the image differs from it by more than ``gsd_tolerance``, the image is read on a grid of the
model's GSD (``resample_to_model_gsd=True``, the default) and the map comes out at that GSD. The check applies to
every input the engine reads: single rasters, mosaics (their common grid), STAC items and tile stores, in
projected CRSs (any linear unit) and geographic ones (pixel size in metres measured geodesically at the centre;
the map then stays in the geographic CRS, at the degree spacing that matches the model's GSD there).

Batch size (``batch_size=None``, the default): :func:`choose_batch_size` picks it from the model's
:meth:`~dinov3geo.tasks.canopy.model.CanopyHeightModel.memory_estimate` and the memory there is. On CUDA: the most
windows (up to :data:`MAX_AUTO_BATCH`) whose estimate fits in :data:`CUDA_MEMORY_FRACTION` of the free device
memory. On CPU, batching saves a little CPU time (up to 10 % with ViT-L, ``benchmarks/canopy_memory.py``) but
costs memory, so windows are added up to :data:`CPU_PIXELS_PER_CALL` pixels per call (4 windows of 512 px), and
only while the estimate plus the engine's own region-scale buffers
(:func:`~dinov3geo.inference.batching.region_reserve`) stays within :data:`CPU_MEMORY_BUDGET` and a quarter of the
available memory (ViT-L layout: 2 windows of 512 px). An explicit ``batch_size`` is used as given; a resumed run
keeps the batch size it was started with.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from dinov3geo.inference import predict_raster
from dinov3geo.inference.batching import (
    CPU_MEMORY_BUDGET,
    CPU_PIXELS_PER_CALL,
    CUDA_MEMORY_FRACTION,
    MAX_AUTO_BATCH,
    available_memory,
    choose_batch_size,
    resolve_batch_size,
)
from dinov3geo.inference.sources import RasterSource
from dinov3geo.io.grid import GridSpec
from dinov3geo.io.scene import target_grid
from dinov3geo.io.sidecars import sidecar_properties, write_sidecars
from dinov3geo.tasks.canopy.model import CanopyRasterModel

log = logging.getLogger("dinov3geo.canopy")

__all__ = [
    "CPU_MEMORY_BUDGET",
    "CPU_PIXELS_PER_CALL",
    "CUDA_MEMORY_FRACTION",
    "MAX_AUTO_BATCH",
    "available_memory",
    "canopy_raster_model",
    "choose_batch_size",
    "predict_canopy",
]

#: CPU: windows are added to a call while it holds fewer pixels than this (4 windows of 512^2 px). Measured
#: with the fused readout on 2 cores (``benchmarks/canopy_memory.py``, 1024^2 NEON crop, window 512): batches of
#: 2 and 4 took 9-10 % less CPU time than single windows with the ViT-L layout (143-145 s vs 159-166 s) and
#: 2-4 % less with the tiny one, for 150-200 MiB more peak RSS with ViT-L (later measurements: batch sizes equal
#: within noise). CPU_MEMORY_BUDGET holds the model's estimate and the engine's own buffers: 2 windows of 512^2 px
#: with the ViT-L layout (539 + 352 MiB; measured peak RSS growth 884 MiB at 4096^2). These constants, and
#: :func:`available_memory` / :func:`choose_batch_size`, live in :mod:`dinov3geo.inference.batching` (shared
#: with change detection and land cover) and are re-exported here.


def canopy_raster_model(
    model: str | os.PathLike[str] | CanopyRasterModel | None = None,
    *,
    chmv2_backbone: Any = None,
    chmv2_head: Any = None,
    device: str = "cpu",
) -> tuple[CanopyRasterModel, float | None]:
    """A :class:`CanopyRasterModel` and its training GSD (metres, or None when unknown).

    Give either ``model`` (a dinov3geo canopy checkpoint or a ready model) or Meta's two CHMv2 files
    (``chmv2_backbone`` = ``dinov3_vitl16_pretrain_sat493m-*.pth``, ``chmv2_head`` = the DPT head file).
    """
    if isinstance(model, CanopyRasterModel):
        return model, None
    if model is not None:
        if chmv2_backbone is not None or chmv2_head is not None:
            raise ValueError("give either a dinov3geo canopy model or the two CHMv2 files, not both")
        rm = CanopyRasterModel.from_checkpoint(model, device=device)
        return rm, rm.model.metadata.get("gsd") if hasattr(rm.model, "metadata") else None
    if chmv2_backbone is None or chmv2_head is None:
        raise ValueError("no canopy model: give --model (dinov3geo canopy model) or both CHMv2 files "
                         "(--chmv2-backbone and --chmv2-head)")
    from dinov3geo.tasks.canopy.chmv2 import load_chmv2

    return CanopyRasterModel.from_chmv2(load_chmv2(chmv2_backbone, chmv2_head, device=device)), None


def pixel_size_xy_m(grid: GridSpec) -> tuple[float, float]:
    """Width and height of a pixel of ``grid`` in metres.

    Projected CRSs: the resolution times the CRS's linear unit (feet count as 0.3048 m, US survey feet as
    1200/3937 m). Geographic CRSs: the geodesic width and height of the pixel at the centre of the grid on the
    CRS's ellipsoid (a 1e-4 degree pixel is ~11 m tall everywhere and half as wide at 60 degrees latitude).
    """
    rx, ry = grid.res
    crs = grid.crs
    if crs.is_projected:
        factor = 1.0
        with contextlib.suppress(Exception):  # a CRS without unit information: metres
            factor = float(crs.linear_units_factor[1])
        return rx * factor, ry * factor
    from pyproj import CRS as PCRS
    from pyproj import Geod

    left, bottom, right, top = grid.bounds
    lon, lat = (left + right) / 2, (bottom + top) / 2
    try:
        geod = PCRS.from_user_input(crs.to_wkt()).get_geod() or Geod(ellps="WGS84")
    except Exception:  # noqa: BLE001
        geod = Geod(ellps="WGS84")
    _, _, w = geod.inv(lon - rx / 2, lat, lon + rx / 2, lat)
    _, _, h = geod.inv(lon, lat - ry / 2, lon, lat + ry / 2)
    return float(abs(w)), float(abs(h))


def pixel_size_m(grid: GridSpec) -> float:
    """The smaller side of a pixel of ``grid`` in metres (see :func:`pixel_size_xy_m`)."""
    return min(pixel_size_xy_m(grid))


def _name(image: Any) -> str:
    if isinstance(image, list | tuple):
        return f"the mosaic of {len(image)} scenes ({_name(image[0])}, ...)" if len(image) > 1 else _name(image[0])
    if isinstance(image, str | os.PathLike):
        return str(image)
    return type(image).__name__


def predict_canopy(
    model: str | os.PathLike[str] | CanopyRasterModel | None,
    image: Any,
    out: str | os.PathLike[str],
    *,
    aoi: Any = None,
    summary: str | os.PathLike[str] | None = None,
    chmv2_backbone: Any = None,
    chmv2_head: Any = None,
    bands: list[str] | None = None,
    window: int = 512,
    overlap: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    amp: str | bool | None = "auto",
    resample_to_model_gsd: bool = True,
    gsd_tolerance: float = 0.1,
    max_resample_factor: float = 4.0,
    grid: GridSpec | None = None,
    resume: bool = True,
    progress: bool = True,
    sidecars: bool | dict[str, Any] = True,
    **engine_kwargs: Any,
) -> Path:
    """Map canopy height of ``image`` into the COG ``out`` (bands ``height``, ``height_std``; metres).

    Args:
        model: dinov3geo canopy model file (or a :class:`CanopyRasterModel`); None with the CHMv2 files.
        image: anything :func:`~dinov3geo.inference.predict_raster` reads (raster, mosaic list, STAC item,
            tile store).
        out: output COG path (written atomically; resumable after a kill).
        aoi: polygons (file/GeoDataFrame/geometry, any CRS): only pixels inside are mapped.
        summary: with ``aoi``, also write a per-polygon summary here (``.gpkg``; a ``.csv`` next to it):
            mean and p95 height, canopy cover share >= 5 m, valid share, area in ha.
        chmv2_backbone, chmv2_head: Meta's CHMv2 files (instead of ``model``); RGB uint8 input.
        bands: input bands (default: the model's bands when the image names them, else all).
        window, overlap, device, amp, resume, progress, engine_kwargs: see ``predict_raster``.
        batch_size: windows per model call; None (default): :func:`choose_batch_size` (see the module docstring).
        resample_to_model_gsd: read the image at the model's training GSD when it differs by more than
            ``gsd_tolerance`` (relative); upsampling a coarser image by more than ``max_resample_factor`` is an error (downsampling a finer one,
            by averaging, is always allowed).
        grid: explicit grid to read the image on (overrides the GSD logic).
        sidecars: writes ``<out>.stac.json`` (STAC Item: footprint, projection, bands, checksum, the image, AOI
            and model files) and, for the raster, a QGIS ``.qml`` style + GDAL statistics; with ``summary``, the
            summary GeoPackage gets an Item too (:func:`dinov3geo.io.sidecars.write_sidecars`; never fails the
            map). ``sidecars=False`` to skip; a dict adds its entries to the Items' properties.

    Returns:
        the output path.
    """
    from dinov3geo.inference.engine import resolve_device
    from dinov3geo.utils.outputs import guard_output

    # refuse an output that would replace the image, the model or the AOI before loading anything
    protect = [image, model if isinstance(model, str | os.PathLike) else None, chmv2_backbone, chmv2_head,
               aoi if isinstance(aoi, str | os.PathLike) else None]
    guard_output(out, protect, role="--out")
    if summary is not None:
        if aoi is None:
            raise ValueError("a per-AOI summary needs an aoi")
        s = Path(summary)
        for p in (s.with_suffix(".gpkg"), s.with_suffix(".csv")):
            guard_output(p, [*protect, out], role="--summary")
    dev = resolve_device(device)
    rm, gsd = canopy_raster_model(model, chmv2_backbone=chmv2_backbone, chmv2_head=chmv2_head, device=str(dev))
    batch_size = resolve_batch_size(rm, window, dev, batch_size, out=out if resume else None)
    meta = getattr(rm.model, "metadata", {}) or {}
    src = None
    if grid is None or bands is None:
        from dinov3geo.inference.sources import TileStoreSource, as_source

        # the input as the engine will read it (a raster, a mosaic list, a STAC item or a tile store)
        src = image if isinstance(image, RasterSource) else as_source(image)
        if (bands is None and meta.get("bands") and set(meta["bands"]) <= set(src.band_names)
                and not isinstance(src, TileStoreSource)):
            bands = list(meta["bands"])
    if src is not None and grid is None and resample_to_model_gsd and gsd:
        w_m, h_m = pixel_size_xy_m(src.grid)
        if max(abs(w_m - gsd), abs(h_m - gsd)) > gsd_tolerance * gsd:
            res_m = max(w_m, h_m)
            if res_m / gsd > max_resample_factor:
                raise ValueError(
                    f"{_name(image)} has {res_m:.3g} m pixels but the model was trained at {gsd:.3g} m: upsampling "
                    f"by {res_m / gsd:.3g}x would invent detail the image does not have. Use imagery near "
                    f"{gsd:.3g} m, or map at the image's own resolution anyway with resample_to_model_gsd=False "
                    "(--keep-resolution)"
                )
            if isinstance(src, TileStoreSource) or (isinstance(image, list | tuple) and len(image) > 1):
                kind = "tile store" if isinstance(src, TileStoreSource) else "mosaic"
            else:
                kind = "image"
            rx, ry = src.grid.res
            res = (rx * gsd / w_m, ry * gsd / h_m)  # square pixels of the model's GSD, in the input's CRS units
            log.warning("%s (%s) has %.3g x %.3g m pixels; the model was trained at %.3g m: reading it at %.3g m%s",
                        _name(image), kind, w_m, h_m, gsd, gsd,
                        "" if src.grid.crs.is_projected else f" ({res[0]:.3g} x {res[1]:.3g} degrees)")
            grid = target_grid(src.grid, res=res)
    path = predict_raster(
        rm, image, out, window=window, overlap=overlap, batch_size=batch_size, bands=bands, aoi=aoi,
        out_grid=grid, device=dev, amp=amp, resume=resume, progress=progress, protect=protect,
        tags={"UNITS": "metre", "PRODUCT": "canopy height (dinov3geo)", "MODEL": str(model or chmv2_head)},
        **engine_kwargs,
    )
    if summary is not None:
        from dinov3geo.tasks.canopy.summary import summarise_heights

        s = Path(summary)
        summarise_heights(path, aoi, s.with_suffix(".gpkg"), s.with_suffix(".csv"))
    props = sidecar_properties(sidecars, "dinov3geo.tasks.canopy.predict.predict_canopy")
    if props is not None:
        write_sidecars([path, Path(summary).with_suffix(".gpkg") if summary is not None else None],
                       inputs=[image, aoi if isinstance(aoi, str | os.PathLike) else None],
                       model=[model, chmv2_backbone, chmv2_head], extra_properties=props)
    return Path(path)
