"""Map land cover over a region: a land-cover model through the inference engine -> a coloured class COG.

:func:`predict_landcover` runs in two passes:

1. **Probabilities.** :class:`LandcoverRasterModel` gives the softmax class probabilities of each window;
   :func:`dinov3geo.inference.predict_raster` blends them across overlapping windows (raised-cosine weights,
   so there are no seams), honours the AOI and input nodata, and is resumable after a kill. They go to a
   float32 COG: ``probabilities`` when given (kept), else a hidden sibling of the output
   (``.<name>.probabilities.tif``, removed at the end). A finished probability file of the same job (model,
   image, bands, AOI, window settings: its ``DINOV3GEO_JOB`` tag) is reused by a re-run, so a run killed
   during the second pass does not repeat the first.
2. **Classes.** The probabilities are read tile by tile; the most probable class becomes the pixel's class
   **code** (uint8; 255 where the input is nodata or outside the AOI), written with
   :class:`~dinov3geo.tasks.landcover.classes.ClassRasterWriter`: a COG with the colour table, the class
   table tag, category names (``.aux.xml``) and a QGIS style (``.qml``), so it opens coloured and labelled.
   With ``confidence=True`` a second band ``confidence`` holds the maximum class probability as uint8
   **percent** (0..100; 255 = no data). (A uint8 band keeps the file one data type; 1 % steps are finer than
   any calibration these probabilities have.)

Batch size (``batch_size=None``, the default): the windows per model call are chosen from the model's
:meth:`~dinov3geo.tasks.landcover.heads.LandcoverModel.memory_estimate` and the memory there is
(:func:`~dinov3geo.inference.batching.resolve_batch_size`; measured in ``benchmarks/head_memory.py``): on
CUDA the most windows whose estimate fits in half the free device memory; on CPU up to 4 x 512^2 pixels per
call (4 windows of 512 px), within 1 GiB with the engine's own buffers and a quarter of the available
memory. An explicit ``batch_size``
is used as given; a resumed run keeps the batch size it was started with (it is part of the engine's resume
fingerprint).

Bands: the model records the band names it was trained on (and, when those came from positions or renamed
bands, the selection keys and the band names of the training image). The image's bands are chosen by name
when it has them all; else by the training selection when the image has the same band layout as the
training image; else the run is refused with a message naming both band lists (choose with ``bands``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from torch import Tensor

from dinov3geo.inference import predict_raster
from dinov3geo.inference.batching import check_batch_size, resolve_batch_size
from dinov3geo.inference.models import RasterModel, _Normalise
from dinov3geo.io.sources import open_scene
from dinov3geo.models.taps import edge_margin, inference_alignment
from dinov3geo.tasks.landcover.classes import NODATA, ClassRasterWriter, confidence_percent
from dinov3geo.tasks.landcover.heads import LandcoverModel, load_landcover_model
from dinov3geo.utils.atomic import remove_quietly
from dinov3geo.utils.locks import output_lock
from dinov3geo.utils.outputs import guard_output

log = logging.getLogger("dinov3geo.landcover")

__all__ = ["FALLBACK_BATCH_SIZE", "BandMismatchError", "JOB_TAG", "LandcoverRasterModel", "predict_landcover",
           "select_bands"]

#: tag of the probability COG identifying the job that wrote it
JOB_TAG = "DINOV3GEO_JOB"
#: windows per model call when ``batch_size`` is None and the model has no memory estimate
FALLBACK_BATCH_SIZE = 4


class BandMismatchError(ValueError):
    """The image does not have the bands the model was trained on."""


class LandcoverRasterModel(RasterModel):
    """A :class:`~dinov3geo.tasks.landcover.heads.LandcoverModel` as a :class:`~dinov3geo.inference.RasterModel`:
    one float32 band of class probability per class (``p_<name>``), nodata NaN.

    Args:
        model: the land-cover model.
        value_scale, mean, std: input normalisation ``(x * value_scale - mean) / std`` per band.
        receptive_margin: window-edge margin (input pixels) given zero blend weight (ViTs see the whole window;
            default :func:`dinov3geo.models.taps.edge_margin`: 32 px for a ViT, 64 px for a ConvNeXt).
    """

    out_dtype = "float32"
    nodata = math.nan
    scale = 1

    def __init__(self, model: LandcoverModel, *, value_scale: float = 1.0, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, receptive_margin: int | None = None) -> None:
        self.model = model.eval()
        self.table = model.table
        self.out_bands = len(model.table)
        self.band_names = tuple(f"p_{n}" for n in model.table.names)
        self.in_bands = int(model.backbone.config.in_chans)
        self.receptive_margin = int(edge_margin(model.backbone) if receptive_margin is None else receptive_margin)
        self.global_context = True
        self.window_multiple = int(model.patch_size)
        self.window_align, self.edge_fill = inference_alignment(model.backbone)
        self.value_scale = float(value_scale)
        self._norm = _Normalise(value_scale, mean, std)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], *, device: torch.device | str = "cpu"
                        ) -> tuple[LandcoverRasterModel, dict[str, Any]]:
        """Load a land-cover model file: ``(raster model, checkpoint info)``."""
        model, info = load_landcover_model(path, device=device)
        return cls(model, value_scale=info.get("value_scale", 1.0), mean=info.get("mean"), std=info.get("std")), info

    def preprocess(self, x: Tensor, valid: Tensor) -> Tensor:
        return self._norm(x)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        p = self.model.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"window {tuple(x.shape[-2:])} is not a multiple of {p}")
        return torch.softmax(self.model(x).float(), dim=1)

    def to(self, device: torch.device | str) -> LandcoverRasterModel:
        self.model.to(device)
        return self

    def eval(self) -> LandcoverRasterModel:
        self.model.eval()
        return self

    def _state_tensors(self) -> list[Tensor]:
        norm = [torch.tensor([self.value_scale])]
        norm += [t.flatten() for t in (self._norm.mean, self._norm.std) if t is not None]
        return list(self.model.state_dict().values()) + norm


def _generic(names: Sequence[str]) -> bool:
    return all(n.lower() == f"b{i}" for i, n in enumerate(names, start=1))


def select_bands(meta: dict[str, Any], image_bands: Sequence[str], image: Any = "the image") -> list[str | int]:
    """The bands of the image to feed a model trained with ``meta`` (see the module docstring).

    Raises:
        BandMismatchError: naming the model's and the image's bands.
    """
    want = [str(b) for b in meta.get("bands") or []]
    have = [str(b) for b in image_bands]
    low = {h.lower() for h in have}
    if want and not _generic(want) and all(w.lower() in low for w in want):
        return list(want)
    source = [str(b) for b in meta.get("source_bands") or []]
    keys = meta.get("band_keys")
    if source and [s.lower() for s in source] == [h.lower() for h in have]:
        return list(keys) if keys else list(range(1, len(have) + 1))
    if not source and want and _generic(want) and len(have) == len(want):
        return list(range(1, len(have) + 1))
    raise BandMismatchError(
        f"the model was trained on {len(want)} band(s) {want}"
        + (f" (selected from an image with bands {source})" if source else "")
        + f", but {os.fspath(image) if isinstance(image, str | os.PathLike) else image!r} has {len(have)} band(s) "
        f"{have}. Choose the matching bands in the model's order with --bands (e.g. --bands "
        f"{','.join(str(i) for i in range(1, len(want) + 1))})")


def _job_key(rm: LandcoverRasterModel, image: Any, bands: Any, aoi: Any, window: int, overlap: int | None,
             grid: Any) -> str:
    aoi_id: Any = None
    if isinstance(aoi, str | os.PathLike) and Path(aoi).exists():
        st = Path(aoi).stat()
        aoi_id = [os.fspath(Path(aoi).absolute()), st.st_size, st.st_mtime_ns]
    elif aoi is not None:
        aoi_id = repr(aoi)[:2000]
    img = os.fspath(Path(image).absolute()) if isinstance(image, str | os.PathLike) else repr(image)[:2000]
    doc = {"model": rm.fingerprint(), "image": img, "bands": [str(b) for b in bands] if bands else None,
           "aoi": aoi_id, "window": window, "overlap": overlap, "grid": grid.to_dict() if grid is not None else None}
    return hashlib.sha1(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _job_of(path: Path) -> str | None:
    try:
        with rasterio.open(path) as ds:
            return ds.tags().get(JOB_TAG)
    except (rasterio.errors.RasterioIOError, OSError):
        return None


def predict_landcover(
    model: str | os.PathLike[str] | LandcoverRasterModel,
    image: Any,
    out: str | os.PathLike[str],
    *,
    aoi: Any = None,
    confidence: bool = False,
    probabilities: str | os.PathLike[str] | None = None,
    bands: Sequence[str | int] | None = None,
    assume_crs: Any = None,
    window: int = 512,
    overlap: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    amp: str | bool | None = "auto",
    grid: Any = None,
    resample_to_model_gsd: bool = True,
    resume: bool = True,
    progress: bool = True,
    sidecars: bool | dict[str, Any] = True,
    **engine_kwargs: Any,
) -> Path:
    """Map the land cover of ``image`` into the class COG ``out`` (see the module docstring).

    Args:
        model: a land-cover model file (``landcover train``'s ``model.pt``) or a :class:`LandcoverRasterModel`.
        image: a raster file, band folder or STAC item (or a list: a mosaic).
        out: output COG (class codes, uint8, 255 = no data).
        aoi: polygons (file or geometries, any CRS): only pixels inside are mapped.
        confidence: add band 2, the maximum class probability in percent.
        probabilities: also keep the blended class probabilities (float32 COG, one band per class) here.
        bands: input bands (names or 1-based positions) in the model's order; default: chosen as described.
        assume_crs: CRS of an image that declares none.
        window, overlap, device, amp, resume, progress, engine_kwargs: see
            :func:`~dinov3geo.inference.predict_raster`.
        batch_size: windows per model call; None (default): chosen from the model's memory estimate and the
            memory available, or the batch size of the interrupted run being resumed (see the module docstring;
            ``benchmarks/head_memory.py``).
        grid: read the image on this grid (the map comes out on it).
        resample_to_model_gsd: read the image at the model's training GSD when its pixels differ from it by
            more than 10 % (the map then comes out at that GSD, as the model was trained; average when
            downsampling, bilinear when upsampling).
        sidecars: writes ``<out>.stac.json`` (STAC Item with the image, AOI and model file) and, when kept,
            ``<probabilities>.stac.json``; the rasters get a QGIS ``.qml`` style (the class map keeps the
            palette style its writer gives it) + GDAL statistics (:func:`dinov3geo.io.sidecars.write_sidecars`;
            never fails the map). ``sidecars=False`` to skip; a dict adds its entries to the Items' properties.

    Returns:
        the output path.

    Raises:
        OutputConflictError: ``out`` (or ``probabilities``) would replace the image, the model or the AOI.
        BandMismatchError: the image lacks the model's bands.
    """
    protect = [image, model if isinstance(model, str | os.PathLike) else None,
               aoi if isinstance(aoi, str | os.PathLike) else None]
    o = guard_output(out, protect, role="--out")
    guard_output(Path(f"{o}.aux.xml"), protect, role="--out")
    guard_output(o.with_suffix(".qml"), protect, role="--out")
    check_batch_size(batch_size)  # before any work
    keep = probabilities is not None
    probs = Path(probabilities).expanduser().absolute() if keep else o.with_name(f".{o.name}.probabilities.tif")
    if keep:
        guard_output(probs, [*protect, o], role="--probabilities")
        if probs == o:
            raise ValueError("--probabilities must differ from --out")
    with output_lock(o, what="landcover predict"):
        from dinov3geo.inference.engine import resolve_device

        dev = resolve_device(device)
        if isinstance(model, LandcoverRasterModel):
            rm, meta = model, dict(model.model.metadata)
        else:
            rm, meta = LandcoverRasterModel.from_checkpoint(model, device=str(dev))
        src: Any = image
        if isinstance(image, str | os.PathLike):
            scene = open_scene(image, crs=assume_crs)
            chosen = list(bands) if bands is not None else select_bands(meta, scene.band_names, image)
            src = scene.select(chosen)
            gsd = meta.get("gsd")
            res = min(scene.grid.res)
            if grid is None and resample_to_model_gsd and gsd and scene.grid.crs.is_projected \
                    and abs(res - gsd) > 0.1 * gsd:
                from dinov3geo.io.scene import target_grid

                log.info("%s has %.3g m pixels; the model was trained at %.3g m: reading it at %.3g m",
                         image, res, gsd, gsd)
                grid = target_grid(scene.grid, res=gsd)
                src = src.with_grid(grid, "average" if gsd > res else "bilinear")
        elif bands is not None:
            chosen = list(bands)
        else:
            chosen = None
        job = _job_key(rm, image, chosen, aoi, window, overlap, grid)
        if not (resume and probs.exists() and _job_of(probs) == job):
            # the engine resumes an interrupted run into probs: keep its batch size (part of the fingerprint)
            batch = resolve_batch_size(rm, window, dev, batch_size, out=probs if resume else None,
                                       fallback=FALLBACK_BATCH_SIZE)
            if not keep:  # an intermediate read once by the second pass: no overviews, no conversion pass, fast
                # ZSTD (tiny model at 4096^2: 28 s, 50 s user, 2.3 s system instead of 34 s, 59 s and 3.2 s with the
                # probabilities kept as a COG; benchmarks/head_memory.py)
                engine_kwargs = {"overviews": False, "compress": "zstd", "compress_level": 1, **engine_kwargs}
            predict_raster(rm, src, probs, window=window, overlap=overlap, batch_size=batch,
                           bands=chosen if not isinstance(image, str | os.PathLike) else None, aoi=aoi,
                           out_grid=grid, device=dev, amp=amp, resume=resume, progress=progress,
                           protect=[*protect, o], tags={JOB_TAG: job, "PRODUCT": "land-cover class probabilities"},
                           **engine_kwargs)
        else:
            log.info("reusing the finished class probabilities %s", probs)
        _classes_from_probabilities(probs, o, rm, confidence=confidence, model_name=os.fspath(model)
                                    if isinstance(model, str | os.PathLike) else type(model).__name__,
                                    uses_image=bool(meta.get("uses_image_pixels")))
        if not keep:
            remove_quietly(probs)
        from dinov3geo.io.sidecars import sidecar_properties, write_sidecars

        props = sidecar_properties(sidecars, "dinov3geo.tasks.landcover.predict.predict_landcover")
        if props is not None:  # under the lock: no other run replaces the map while it is described
            write_sidecars([o, probs if keep else None],
                           inputs=[image, aoi if isinstance(aoi, str | os.PathLike) else None], model=model,
                           extra_properties=props)
    return o


def _classes_from_probabilities(probs: Path, out: Path, rm: LandcoverRasterModel, *, confidence: bool,
                                model_name: str, uses_image: bool) -> Path:
    """Second pass: argmax of the probability COG -> class COG (tile by tile)."""
    from dinov3geo.io.grid import GridSpec

    table = rm.table
    lut = table.code_lut()
    tags = {"PRODUCT": "land cover (dinov3geo)", "MODEL": model_name,
            "USES_IMAGE_PIXELS": "yes" if uses_image else "no",
            "CONFIDENCE": "band 2: maximum class probability, percent (255 = no data)" if confidence else "none"}
    with rasterio.open(probs) as ds:
        if ds.count != len(table):
            raise ValueError(f"{probs} has {ds.count} bands but the model {len(table)} classes")
        grid = GridSpec.from_dataset(ds)
        with ClassRasterWriter(out, grid, table, confidence=confidence, tags=tags) as w:
            step = w.blocksize
            for r in range(0, grid.height, step):
                for c in range(0, grid.width, step):
                    win = Window(c, r, min(step, grid.width - c), min(step, grid.height - r))
                    p = ds.read(window=win).astype(np.float32)
                    ok = np.isfinite(p).all(axis=0)
                    idx = np.argmax(np.where(np.isfinite(p), p, -1.0), axis=0)
                    codes = np.where(ok, lut[idx], NODATA).astype(np.uint8)
                    if confidence:
                        conf = np.where(ok, np.max(np.where(np.isfinite(p), p, 0.0), axis=0), np.nan)
                        w.write(np.stack([codes, confidence_percent(conf, ~ok)]), win)
                    else:
                        w.write(codes[None], win)
    return out
