"""Dense DINOv3 features of a whole raster as a georeferenced Zarr, plus the PCA picture DINOv3 is known for.

``extract_features`` runs a backbone over the image window by window through the inference engine
(:func:`dinov3geo.inference.predict_raster`: overlapping, blended, resumable, memory bounded by the window
and batch size), producing patch features on the image grid coarsened by 16 (the feature grid's transform
is the image transform scaled by 16). The result is written as an xarray ``Dataset`` in Zarr v3 with
variable ``features (feature, y, x)``, CRS and transform (``spatial_ref``, rioxarray conventions), and
nodata as NaN. A 3-component PCA of the features (fitted on valid pixels) is rendered to a PNG and a
georeferenced RGB GeoTIFF (COG).

Normalisation follows the backbone's metadata (dinov3geo checkpoints carry band names, mean/std and the
value scale they were trained with); Meta's weights without metadata use their family's constants on
``[0, 1]`` values (uint8 inputs are divided by 255): SAT-493M for the ViTs, LVD-1689M (ImageNet mean/std)
for the ConvNeXts, which Meta distilled on web images.

**ConvNeXt backbones** (``dinov3_convnext_*`` files, or a ConvNeXt distilled by ``dinov3geo pretrain``): the
same command, ``layers`` naming stages (0-3, ``-1`` the last). Several layers are concatenated: the feature
count is the sum of their widths (ConvNeXt-T: 96, 192, 384, 768 for stages 0-3). Windows are padded to a
multiple of 32 inside the model wrapper (reflection, bottom/right) and cropped back
(:class:`~dinov3geo.inference.BackboneFeatures`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from torch import Tensor

from dinov3geo.inference import BackboneFeatures, predict_raster
from dinov3geo.inference.batching import check_batch_size, resolve_batch_size
from dinov3geo.inference.engine import resolve_device
from dinov3geo.io.grid import GridSpec
from dinov3geo.io.sidecars import sidecar_properties, write_sidecars
from dinov3geo.models import build_backbone, load_backbone
from dinov3geo.utils.atomic import check_writable
from dinov3geo.utils.locks import output_lock
from dinov3geo.utils.outputs import folder_kind, guard_output, mark_folder, remove_owned

#: the dinov3geo folder kind of a features Zarr, and the ``format`` attribute that marks it
FEATURES_KIND = "features"
FEATURES_FORMAT = "dinov3geo.features"


@dataclass
class FeatureResult:
    """Outputs of :func:`extract_features`."""

    zarr: Path
    pca_png: Path | None
    pca_tif: Path | None
    grid: GridSpec
    n_features: int


class MultiLayerFeatures(BackboneFeatures):
    """:class:`BackboneFeatures` over several blocks (ConvNeXt: stages), concatenated along the feature axis.

    Band count: the sum of the tapped layers' widths, ``len(layers) * embed_dim`` for a ViT and
    ``sum(embed_dims[i] for i in layers)`` for a ConvNeXt (ConvNeXt-T stages 0-3: 96 + 192 + 384 + 768), bands
    named ``l<layer>_f<k>`` in layer order. Duplicate layers are refused (a ConvNeXt taps each stage once).
    A ConvNeXt's stages 0-2 come out un-normalised, as in Meta's ``get_intermediate_layers`` (only the last
    stage has a LayerNorm), so their scales differ from the last stage's.
    """

    def __init__(self, backbone: torch.nn.Module, layers: Sequence[int], **kw: Any) -> None:
        from dinov3geo.models.taps import n_taps, tap_widths

        depth = n_taps(backbone)
        if not layers:
            raise ValueError("layers is empty: give at least one block index, e.g. -1 (CLI: --layers)")
        bad = [int(x) for x in layers if not -depth <= int(x) < depth]
        if bad:
            what = "stages (0-3, or -1 for the last)" if depth == 4 and hasattr(backbone, "embed_dims") else "blocks"
            raise ValueError(f"layers {bad} out of range: the backbone has {depth} {what} (CLI: --layers)")
        resolved = [int(x) % depth for x in layers]
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"layers {list(layers)} name the same block twice ({resolved}); give each once "
                             "(CLI: --layers)")
        super().__init__(backbone, layer=resolved[-1], **kw)
        self.layers = resolved
        widths = tap_widths(backbone, self.layers)
        self.out_bands = sum(widths)
        self.band_names = tuple(f"l{li:02d}_f{k:03d}" for li, d in zip(self.layers, widths, strict=True)
                                for k in range(d))

    def _tapped_layers(self) -> list[int]:
        return list(self.layers)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        from dinov3geo.models.taps import tap_maps

        return torch.cat(tap_maps(self.backbone, x, self.layers), dim=1)


def normalisation_for(backbone: Any, dtype: str) -> tuple[float, list[float] | None, list[float] | None]:
    """(value_scale, mean, std) to feed ``backbone`` with raw pixels of ``dtype``.

    The backbone's metadata when it has mean/std (dinov3geo checkpoints); else, for 3 input channels, the
    family's RGB constants on ``[0, 1]`` values (uint8 divided by 255): SAT-493M for a ViT, LVD-1689M
    (ImageNet) for a ConvNeXt, Meta's ConvNeXts being web-image models
    (:func:`dinov3geo.models.taps.default_normalization`); else none.
    """
    from dinov3geo.models.taps import default_normalization

    meta = getattr(backbone, "metadata", None)
    int8 = np.dtype(dtype) == np.uint8
    if meta is not None and meta.mean is not None and meta.std is not None:
        units = str(meta.provenance.get("normalization_units", "[0, 1]"))
        if units.startswith("[0, 1]"):
            hi = units.split("raw /")[-1].rstrip(")").strip() if "raw /" in units else ("255" if int8 else "1")
            return 1.0 / float(hi), list(meta.mean), list(meta.std)
        return 1.0, list(meta.mean), list(meta.std)
    if backbone.patch_embed.proj.in_channels == 3:
        norm = default_normalization(backbone)
        return (1 / 255 if int8 else 1.0), list(norm.mean), list(norm.std)
    return 1.0, None, None


def extract_features(
    image: Any,
    out: str | os.PathLike,
    *,
    weights: str | os.PathLike | torch.nn.Module | None = None,
    arch: str = "vits16",
    layers: Sequence[int] = (-1,),
    bands: Sequence[str | int] | None = None,
    window: int = 512,
    overlap: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    amp: str | None = "auto",
    pca: bool = True,
    progress: bool = True,
    value_scale: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    sidecars: bool | dict[str, Any] = True,
) -> FeatureResult:
    """Dense features of ``image`` into the Zarr ``out`` (see module docstring).

    Args:
        image: raster path, band folder, STAC item or scene (anything the inference engine reads).
        out: output ``.zarr`` path (replaced atomically).
        weights: backbone weights file (Meta, timm or dinov3geo format) or a loaded backbone module; None builds
            ``arch`` with random weights (only useful for testing).
        layers: block indices (ConvNeXt: stage indices 0-3; negative from the end) whose normed patch tokens
            are concatenated (see :class:`MultiLayerFeatures` for the band count).
        bands: input bands by name or index (default all; must match the backbone's channels).
        batch_size: windows per model call; None (default): chosen from the model's memory estimate and the
            memory available (:func:`~dinov3geo.inference.batching.resolve_batch_size`: ViT-L at window 512 on
            CPU gets 4, the tapped layers' maps counted; a resumed run keeps its own).
        window, overlap, device, amp: inference-engine settings.
        pca: also write ``<out stem>_pca.png`` and ``<out stem>_pca.tif``.
        value_scale, mean, std: override the input normalisation.
        sidecars: writes ``<out>.stac.json`` (STAC Item of the feature store: grid, projection, one band per
            feature, the image and the weights file) and, with ``pca``, ``<out stem>_pca.tif.stac.json`` plus
            GDAL statistics for the PCA COG (an RGB composite: QGIS draws it without a ``.qml`` style)
            (:func:`dinov3geo.io.sidecars.write_sidecars`; never fails the extraction). ``sidecars=False`` to
            skip; a dict adds its entries to the Items' properties.

    ``out`` may be a new path, an empty folder or an earlier features output; anything else (an input, a
    folder holding an input, a folder dinov3geo did not create, a tile store) is refused before any work
    (:func:`dinov3geo.utils.outputs.guard_output`), and one process at a time writes it.
    """
    check_batch_size(batch_size)  # before any work
    wfile = weights if isinstance(weights, str | os.PathLike) else None
    out = guard_output(out, [image, wfile], folder=True, kind=FEATURES_KIND, role="features output")
    stem = out.with_suffix("")
    pca_paths = [Path(f"{stem}_pca.png"), Path(f"{stem}_pca.tif")] if pca else []
    for extra in pca_paths:
        guard_output(extra, [image, wfile], role="PCA output")
    with output_lock(out, what="features"):
        res = _extract_features(image, out, weights=weights, arch=arch, layers=layers, bands=bands,
                                window=window, overlap=overlap, batch_size=batch_size, device=device, amp=amp,
                                pca=pca, progress=progress, value_scale=value_scale, mean=mean, std=std)
        props = sidecar_properties(sidecars, "dinov3geo.tasks.features.extract_features")
        if props is not None:  # under the lock: no other run replaces the store while it is described
            write_sidecars([res.zarr, res.pca_tif], inputs=[image], model=wfile, extra_properties=props)
        return res


def _extract_features(image: Any, out: Path, *, weights: str | os.PathLike | torch.nn.Module | None, arch: str,
                      layers: Sequence[int], bands: Sequence[str | int] | None, window: int, overlap: int | None,
                      batch_size: int | None, device: str, amp: str | None, pca: bool, progress: bool,
                      value_scale: float | None, mean: Sequence[float] | None,
                      std: Sequence[float] | None) -> FeatureResult:
    """:func:`extract_features` once the output is checked and locked."""
    from dinov3geo.inference.sources import as_source

    tmp_tif = out.parent / f".{out.name}.features.tif"
    check_writable(tmp_tif)  # the output folder is writable: fail now, not after the extraction
    if isinstance(weights, torch.nn.Module):
        backbone = weights
    else:
        backbone = load_backbone(weights) if weights is not None else build_backbone(arch)
    backbone.eval()
    src = as_source(image, bands=bands)
    vs, m, s = normalisation_for(backbone, src.dtype if hasattr(src, "dtype") else "float32")
    model = MultiLayerFeatures(backbone, layers, value_scale=value_scale if value_scale is not None else vs,
                               mean=mean if mean is not None else m, std=std if std is not None else s)
    dev = resolve_device(device)
    # an interrupted run resumes into tmp_tif: keep its batch size (part of the engine's fingerprint)
    batch = resolve_batch_size(model, window, dev, batch_size, out=tmp_tif, fallback=4)
    predict_raster(model, image, tmp_tif, window=window, overlap=overlap, batch_size=batch, bands=bands,
                   device=dev, amp=amp, progress=progress, overviews=False)
    try:
        grid = _to_zarr(tmp_tif, out, model.band_names, layers=model.layers,
                        weights=weights if not isinstance(weights, torch.nn.Module)
                        else f"in-memory {type(weights).__name__}")
        pca_png = pca_tif = None
        if pca:
            pca_png, pca_tif = _pca_outputs(tmp_tif, out, grid)
    finally:
        tmp_tif.unlink(missing_ok=True)
    return FeatureResult(out, pca_png, pca_tif, grid, model.out_bands)


#: Bytes (float32) of one chunk of the feature store, all features of a square of feature pixels: also the
#: block the PCA rendering reads. 512 x 512 feature pixels were 1 GiB of ViT-L features (4 GiB for four
#: layers), read whole by the PCA and by a user's ``ds.features[:, y, x]``; see :func:`feature_chunk_side`.
CHUNK_BYTES = 32 * 2**20


def feature_chunk_side(n_features: int, itemsize: int = 4, target: int | None = None, multiple: int = 16,
                       cap: int = 512) -> int:
    """Side (feature pixels, a multiple of ``multiple``, at most ``cap``) of the square chunks of a feature store
    with ``n_features`` bands, so that one chunk holds about ``target`` bytes: 352 for 64 features, 144 for
    ViT-S (384), 80 for ViT-L (1024), 32 for four ViT-L layers (4096). ``target`` defaults to
    :data:`CHUNK_BYTES`."""
    if n_features < 1:
        raise ValueError(f"n_features must be positive, got {n_features}")
    side = int(((CHUNK_BYTES if target is None else target) / (n_features * itemsize)) ** 0.5)
    return max(multiple, min(cap, side // multiple * multiple))


def _to_zarr(tif: Path, out: Path, names: Sequence[str], **attrs: Any) -> GridSpec:
    """Copy the feature COG into a Zarr v3 xarray Dataset (chunked, lazy), replacing ``out`` atomically."""
    import rioxarray  # noqa: F401 - registers .rio
    import xarray as xr

    side = feature_chunk_side(len(names))
    da = xr.open_dataarray(tif, engine="rasterio", chunks={"band": -1, "x": side, "y": side}, mask_and_scale=True)
    da = da.rename({"band": "feature"}).assign_coords(feature=list(names))
    ds = xr.Dataset({"features": da.astype("float32")})
    ds["features"].attrs = {"long_name": "DINOv3 patch features", "nodata": "NaN"}
    ds.attrs.update({k: (str(v) if not isinstance(v, list | int | float) else v) for k, v in attrs.items()})
    ds.attrs["format"] = FEATURES_FORMAT  # how dinov3geo knows the store as its own (utils.outputs.folder_kind)
    ds = ds.rio.write_crs(da.rio.crs).rio.write_transform(da.rio.transform())
    ds = ds.set_coords("spatial_ref")
    ds["features"].encoding.pop("grid_mapping", None)
    ds["features"].attrs["grid_mapping"] = "spatial_ref"
    ds = ds.assign_coords(feature=np.asarray(list(names), dtype=object))
    for v in ds.variables.values():
        v.encoding.pop("chunks", None)
        v.encoding.pop("preferred_chunks", None)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False)
        if out.exists():  # an earlier features output (guard_output let nothing else through): moved aside
            if out.is_dir() and folder_kind(out) is None:
                mark_folder(out, FEATURES_KIND)  # empty folder: ours to replace
            os.replace(out, old)
        os.replace(tmp, out)
        remove_owned(old, kinds=[FEATURES_KIND])
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    with rasterio.open(tif) as src:
        return GridSpec(src.crs, src.transform, src.width, src.height)


class PCA3:
    """The first 3 principal components of feature vectors and a 2-98 % stretch to uint8 (1..255; 0 = nodata)."""

    def __init__(self, sample: np.ndarray) -> None:
        if sample.shape[0] < 3:
            raise ValueError("not enough valid feature pixels for a PCA")
        fit = sample.astype(np.float64)
        self.mu = fit.mean(0)
        _, _, vt = np.linalg.svd(fit - self.mu, full_matrices=False)
        self.vt = vt[:3]
        proj = (fit - self.mu) @ self.vt.T
        self.lo, self.hi = np.percentile(proj, 2, axis=0), np.percentile(proj, 98, axis=0)

    def render(self, features: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """``features [C, h, w]`` -> ``[3, h, w]`` uint8."""
        c, h, w = features.shape
        x = features.reshape(c, -1).T[valid.ravel()].astype(np.float64)
        rgb = np.clip(((x - self.mu) @ self.vt.T - self.lo) / np.maximum(self.hi - self.lo, 1e-12), 0, 1)
        out = np.zeros((h * w, 3), np.uint8)
        out[valid.ravel()] = np.round(rgb * 254 + 1).astype(np.uint8)
        return out.T.reshape(3, h, w)


def pca_rgb(features: np.ndarray, valid: np.ndarray, n_fit: int = 20000, seed: int = 0) -> np.ndarray:
    """In-memory convenience: :class:`PCA3` fitted on (a sample of) ``features`` and rendered."""
    x = features.reshape(features.shape[0], -1).T[valid.ravel()]
    rng = np.random.default_rng(seed)
    pca = PCA3(x[rng.choice(x.shape[0], min(n_fit, x.shape[0]), replace=False)] if x.shape[0] else x)
    return pca.render(features, valid)


def _pca_outputs(tif: Path, out: Path, grid: GridSpec, n_fit: int = 20000,
                 block: int | None = None) -> tuple[Path, Path]:
    """Fit on a sample of valid pixels read window by window, then render window by window (bounded memory:
    ``block`` x ``block`` feature pixels at a time, default :func:`feature_chunk_side`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rasterio.windows import Window

    from dinov3geo.io.cog import COGWriter

    rng = np.random.default_rng(0)
    with rasterio.open(tif) as src:
        block = block or feature_chunk_side(src.count)
        wins = [Window(c, r, min(block, src.width - c), min(block, src.height - r))
                for r in range(0, src.height, block) for c in range(0, src.width, block)]
        per = max(1, n_fit // len(wins))
        samples = []
        for w in wins:
            f = src.read(window=w, out_dtype="float32")
            x = f.reshape(f.shape[0], -1).T
            x = x[np.isfinite(x).all(1)]
            if len(x):
                samples.append(x[rng.choice(len(x), min(per, len(x)), replace=False)])
        pca = PCA3(np.concatenate(samples) if samples else np.empty((0, src.count)))
        stem = out.with_suffix("")
        png, tif_out = Path(f"{stem}_pca.png"), Path(f"{stem}_pca.tif")
        preview_step = max(1, int(np.ceil(max(src.width, src.height) / 4096)))  # PNG at most ~4096 px
        preview = np.zeros((3, -(-src.height // preview_step), -(-src.width // preview_step)), np.uint8)
        with COGWriter(tif_out, grid, 3, "uint8", nodata=0, band_names=["pc1", "pc2", "pc3"],
                       tags={"DESCRIPTION": "PCA (3 components) of DINOv3 patch features"}) as wr:
            for w in wins:
                f = src.read(window=w, out_dtype="float32")
                valid = np.isfinite(f).all(0)
                rgb = pca.render(np.nan_to_num(f), valid)
                wr.write(rgb, w)
                r0, c0 = int(w.row_off), int(w.col_off)
                sub = rgb[:, (-r0) % preview_step :: preview_step, (-c0) % preview_step :: preview_step]
                pr, pc = -(-r0 // preview_step), -(-c0 // preview_step)
                preview[:, pr : pr + sub.shape[1], pc : pc + sub.shape[2]] = sub
    tmp_png = png.parent / f".{png.name}.tmp.png"
    plt.imsave(tmp_png, np.moveaxis(preview, 0, -1))
    os.replace(tmp_png, png)
    return png, tif_out
