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
        weights: backbone weights file (Meta, timm or dinov3geo format) or a loaded backbone module (put in eval
            mode); None builds ``arch`` with random weights (only useful for testing).
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
            pca_png, pca_tif = _pca_outputs(out, grid)
    finally:
        tmp_tif.unlink(missing_ok=True)
    return FeatureResult(out, pca_png, pca_tif, grid, model.out_bands)


def feature_chunk_side(n_features: int) -> int:
    """Side (feature pixels) of the square chunks of a feature store with ``n_features`` float32 bands: the tile
    side of the engine's feature GeoTIFF (:func:`~dinov3geo.inference.engine.cog_blocksize`, tiles of at most
    32 MiB), so that each chunk, and each block the PCA reads, is one tile decoded once: 256 for 64 features,
    128 for ViT-S (384), 64 for ViT-L (1024), 32 for four ViT-L layers (4096). (512 x 512 feature pixels were
    1 GiB of ViT-L features per chunk.)"""
    from dinov3geo.inference.engine import cog_blocksize

    if n_features < 1:
        raise ValueError(f"n_features must be positive, got {n_features}")
    return cog_blocksize(n_features, np.float32)


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
        # each GeoTIFF tile is read once, as one chunk: GDAL's block cache (5 % of RAM by default) would only keep
        # what was read (ViT-S x 3 layers at 4096^2: 532 MiB of growth for a 302 MiB array, 250 MiB under 32 MB;
        # benchmarks/README.md, head_memory.py section)
        with rasterio.Env(GDAL_CACHEMAX=32):
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


#: Bytes (float32) of the pixel sample a PCA is fitted on at most: ``n_fit`` pixels, fewer for many features
#: (20000 samples of four ViT-S layers' 4608 features were 368 MiB, 737 MiB in float64, and their full SVD 39 s).
PCA_SAMPLE_BYTES = 32 * 2**20


def pca_sample_size(n_features: int, n_fit: int = 20000) -> int:
    """Pixels a PCA of ``n_features`` features is fitted on: ``n_fit``, at most :data:`PCA_SAMPLE_BYTES` of
    float32 (at least 1000): 20000 up to 419 features, 8192 for ViT-L (1024), 1820 for 4608."""
    return int(max(min(1000, n_fit), min(n_fit, PCA_SAMPLE_BYTES // (4 * max(1, int(n_features))))))


def top_components(x: np.ndarray, k: int = 3, iters: int = 8, oversample: int = 10, seed: int = 0) -> np.ndarray:
    """The ``k`` leading right singular vectors (``[k, d]``) of the centred ``x [n, d]`` (float64), each with its
    largest-magnitude entry positive (a fixed sign: the same colours every run).

    An exact SVD when ``min(n, d) <= 256``; else randomised subspace iteration (Halko, Martinsson & Tropp 2011,
    algorithm 4.4: ``k + oversample`` directions, ``iters`` power iterations, seeded: deterministic), which costs
    ``O(n d (k + oversample) iters)`` instead of the full SVD's ``O(n d min(n, d))``.
    """
    n, d = x.shape
    if min(n, d) <= 256:
        vt = np.linalg.svd(x, full_matrices=False)[2][:k]
    else:
        q = np.random.default_rng(seed).standard_normal((d, min(d, k + oversample)))
        q = np.linalg.qr(q)[0]
        for _ in range(iters):
            q = np.linalg.qr(x.T @ np.linalg.qr(x @ q)[0])[0]
        vt = np.linalg.svd(x @ q, full_matrices=False)[2][:k] @ q.T
    idx = np.argmax(np.abs(vt), axis=1)
    return vt * np.sign(vt[np.arange(len(vt)), idx])[:, None]


class PCA3:
    """The first 3 principal components of feature vectors and a 2-98 % stretch to uint8 (1..255; 0 = nodata)."""

    def __init__(self, sample: np.ndarray) -> None:
        if sample.shape[0] < 3:
            raise ValueError("not enough valid feature pixels for a PCA")
        fit = sample.astype(np.float64)
        self.mu = fit.mean(0)
        fit -= self.mu
        self.vt = top_components(fit, 3)
        proj = fit @ self.vt.T
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
    n = min(pca_sample_size(features.shape[0], n_fit), x.shape[0])
    pca = PCA3(x[rng.choice(x.shape[0], n, replace=False)] if x.shape[0] else x)
    return pca.render(features, valid)


def _pca_outputs(store: Path, grid: GridSpec, n_fit: int = 20000) -> tuple[Path, Path]:
    """``<store stem>_pca.tif`` and ``_pca.png``: fitted on a sample of valid pixels read chunk by chunk from the
    feature store ``store`` (one Zarr chunk, all features of a :func:`feature_chunk_side` square, at a time:
    bounded memory), then rendered chunk by chunk.

    The Zarr chunks, not the engine's GeoTIFF: GDAL reads a window of a many-band GeoTIFF band by band (0.8 s
    for a 32 x 32 window of 4608 bands, cached), Zarr decodes the chunk at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import zarr
    from rasterio.windows import Window

    from dinov3geo.io.cog import COGWriter

    rng = np.random.default_rng(0)
    arr = zarr.open_group(str(store), mode="r")["features"]  # (feature, y, x), float32, NaN = no data
    count, height, width = (int(v) for v in arr.shape)
    block = int(arr.chunks[1])

    def read(w: Window) -> np.ndarray:
        r0, c0 = int(w.row_off), int(w.col_off)
        return np.asarray(arr[:, r0 : r0 + int(w.height), c0 : c0 + int(w.width)], dtype=np.float32)

    wins = [Window(c, r, min(block, width - c), min(block, height - r))
            for r in range(0, height, block) for c in range(0, width, block)]
    per = max(1, pca_sample_size(count, n_fit) // len(wins))
    samples = []
    for w in wins:
        f = read(w)
        x = f.reshape(f.shape[0], -1).T
        x = x[np.isfinite(x).all(1)]
        if len(x):
            samples.append(x[rng.choice(len(x), min(per, len(x)), replace=False)])
        del f, x
    sample = np.concatenate(samples) if samples else np.empty((0, count), np.float32)
    del samples
    pca = PCA3(sample)
    del sample
    stem = store.with_suffix("")
    png, tif_out = Path(f"{stem}_pca.png"), Path(f"{stem}_pca.tif")
    preview_step = max(1, int(np.ceil(max(width, height) / 4096)))  # PNG at most ~4096 px
    preview = np.zeros((3, -(-height // preview_step), -(-width // preview_step)), np.uint8)
    with COGWriter(tif_out, grid, 3, "uint8", nodata=0, band_names=["pc1", "pc2", "pc3"],
                   tags={"DESCRIPTION": "PCA (3 components) of DINOv3 patch features"}) as wr:
        for w in wins:
            f = read(w)
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
