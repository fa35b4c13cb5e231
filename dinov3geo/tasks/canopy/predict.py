"""Map canopy height over a region: a canopy model through the inference engine -> COG (+ per-AOI summary).

:func:`predict_canopy` runs a trained dinov3geo canopy model (``dinov3geo canopy train``) or Meta's CHMv2
(:func:`~dinov3geo.tasks.canopy.chmv2.load_chmv2`) over any raster the engine reads (file, mosaic, STAC item,
tile store) with blended sliding windows, and writes a float32 COG in metres with two bands, ``height`` and
``height_std`` (per-pixel standard deviation of the bin distribution: the uncertainty), nodata NaN, the CRS of
the input, overviews. Pixels that are nodata in the input or outside the AOI are nodata in the output.

Resolution matters more than any numeric detail (``chmv2-spec.md`` §12): when the model records the GSD it was
trained at and the image differs from it by more than ``gsd_tolerance``, the image is read on a grid of the
model's GSD (``resample_to_model_gsd=True``, the default) and the map comes out at that GSD.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from dinov3geo.inference import predict_raster
from dinov3geo.io.grid import GridSpec
from dinov3geo.io.scene import target_grid
from dinov3geo.io.sources import open_scene
from dinov3geo.tasks.canopy.model import CanopyRasterModel

log = logging.getLogger("dinov3geo.canopy")

__all__ = ["canopy_raster_model", "predict_canopy"]


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
    batch_size: int = 4,
    device: str = "auto",
    amp: str | bool | None = "auto",
    resample_to_model_gsd: bool = True,
    gsd_tolerance: float = 0.1,
    max_resample_factor: float = 4.0,
    grid: GridSpec | None = None,
    resume: bool = True,
    progress: bool = True,
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
        window, overlap, batch_size, device, amp, resume, progress, engine_kwargs: see ``predict_raster``.
        resample_to_model_gsd: read the image at the model's training GSD when it differs by more than
            ``gsd_tolerance`` (relative); upsampling a coarser image by more than ``max_resample_factor`` is an error (downsampling a finer one,
            by averaging, is always allowed).
        grid: explicit grid to read the image on (overrides the GSD logic).

    Returns:
        the output path.
    """
    from dinov3geo.inference.engine import resolve_device

    dev = resolve_device(device)
    rm, gsd = canopy_raster_model(model, chmv2_backbone=chmv2_backbone, chmv2_head=chmv2_head, device=str(dev))
    meta = getattr(rm.model, "metadata", {}) or {}
    scene = open_scene(image) if isinstance(image, str | os.PathLike) else None
    if scene is not None and bands is None and meta.get("bands") and set(meta["bands"]) <= set(scene.band_names):
        bands = list(meta["bands"])
    if scene is not None and grid is None and resample_to_model_gsd and gsd:
        res = min(scene.grid.res)
        if scene.grid.crs.is_projected and abs(res - gsd) > gsd_tolerance * gsd:
            if res / gsd > max_resample_factor:
                raise ValueError(
                    f"{image} has {res:.3g} m pixels but the model was trained at {gsd:.3g} m: upsampling by "
                    f"{res / gsd:.3g}x would invent detail the image does not have. Use imagery near {gsd:.3g} m, or "
                    "map at the image's own resolution anyway with resample_to_model_gsd=False (--keep-resolution)"
                )
            log.warning("%s has %.3g m pixels; the model was trained at %.3g m: reading it at %.3g m",
                        image, res, gsd, gsd)
            grid = target_grid(scene.grid, res=gsd)
    path = predict_raster(
        rm, image, out, window=window, overlap=overlap, batch_size=batch_size, bands=bands, aoi=aoi,
        out_grid=grid, device=dev, amp=amp, resume=resume, progress=progress,
        tags={"UNITS": "metre", "PRODUCT": "canopy height (dinov3geo)", "MODEL": str(model or chmv2_head)},
        **engine_kwargs,
    )
    if summary is not None:
        if aoi is None:
            raise ValueError("a per-AOI summary needs an aoi")
        from dinov3geo.tasks.canopy.summary import summarise_heights

        s = Path(summary)
        summarise_heights(path, aoi, s.with_suffix(".gpkg"), s.with_suffix(".csv"))
    return Path(path)
