"""Train a land-cover head on frozen DINOv3 features from an image and sparse labels (polygons or a raster).

One run (:func:`train_landcover`, CLI ``dinov3geo landcover train CONFIG`` or ``--image --labels``):

1. **Data.** The image (``data.bands`` selected, optionally renamed with ``data.band_names``; resampled to
   ``data.target_res`` when given: bilinear when finer, e.g. 30 m Landsat at 7.5 m so that a 16 px patch covers
   120 m rather than 480 m, average when coarser) is read whole;
   the labels are put onto its grid (:func:`~dinov3geo.tasks.landcover.labels.load_labels`: any CRS, polygons
   or a class raster; classes without a pixel in the image are dropped with a warning; fewer than two classes
   is an error). Pixels where the image is nodata are unlabelled.
2. **Split.** The grid is cut into ``split.block`` pixel blocks assigned to ``train``/``val``/``test``
   (:func:`~dinov3geo.tasks.canopy.splits.block_split`); each polygon goes whole to the split of the block
   holding most of its pixels and pixels within ``split.buffer`` of another split are dropped
   (:func:`~dinov3geo.tasks.landcover.labels.split_by_polygon`): polygons never straddle splits. Written to
   ``split.json``.
3. **Features.** Tiles of ``train.tile`` pixels holding labelled pixels of a split are cut from the image;
   the frozen backbone's tapped features of every tile (and of its 8 flips/rotations with ``train.augment``)
   are computed once and cached (``train.cache_dtype``). A tile's loss and scores use only the labelled
   pixels of its split: the image around them is context shared by every split (a map uses the whole image
   too), labels never are.
4. **Head.** ``linear`` (DINOv3 linear protocol) or ``dense`` (4 taps, learned upsampling, optional
   full-resolution image detail: ``model.image_detail``, reported as "uses full-resolution image pixels"),
   trained with class-weighted cross-entropy over labelled pixels (``train.class_weights``:
   ``inverse_sqrt`` (default), ``inverse``, ``none`` or ``{class name: weight}``), AdamW at a constant
   learning rate. ``model.pt`` is the epoch with the best **validation macro-F1**
   (:func:`~dinov3geo.tasks.landcover.heads.save_landcover_model`: class table, bands, normalisation, GSD,
   backbone weights and sha256, head config); ``last.pt`` after every epoch lets a killed run resume where it
   stopped (same result as an uninterrupted run); ``history.json``.
5. **Test and baseline.** With a ``test`` split the best model maps the image through the inference engine
   (``map.tif``, coloured class COG) and is scored on the test pixels (``eval_test/``: metrics.json,
   confusion.csv/png). With ``baseline.enabled`` a per-pixel random forest on bands + spectral indices is
   trained on the same train pixels and scored on the same test pixels (``baseline_test/``). ``summary.json``
   holds both.

The run's folder is guarded (never an input's folder, never a folder dinov3geo did not create), locked
against a second process, and marked as a ``landcover-train`` folder. The whole run follows the free cores
(:func:`~dinov3geo.utils.threads.fair_threads`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dinov3geo.inference.engine import resolve_amp, resolve_device
from dinov3geo.io.grid import GridSpec
from dinov3geo.io.sources import open_scene
from dinov3geo.models import load_backbone
from dinov3geo.models.registry import build_backbone
from dinov3geo.tasks.canopy.splits import block_split
from dinov3geo.tasks.landcover.classes import NODATA, ClassTable
from dinov3geo.tasks.landcover.heads import (
    DenseHead,
    LandcoverModel,
    LinearHead,
    default_taps,
    level_channels,
    save_landcover_model,
)
from dinov3geo.tasks.landcover.labels import LabelRaster, PolygonSplit, load_labels, split_by_polygon
from dinov3geo.tasks.landcover.metrics import ConfusionAccumulator, classification_metrics, confusion_matrix
from dinov3geo.utils.atomic import atomic_path
from dinov3geo.utils.config import ConfigError, apply_overrides, from_dict, load_yaml
from dinov3geo.utils.locks import output_lock
from dinov3geo.utils.outputs import guard_output, make_output_folder
from dinov3geo.utils.progress import progress_bar
from dinov3geo.utils.threads import fair_threads, tick_threads

log = logging.getLogger("dinov3geo.landcover")

__all__ = [
    "LANDCOVER_TRAIN_KIND",
    "LandcoverTrainConfig",
    "TrainResult",
    "class_weights",
    "landcover_loss",
    "load_landcover_config",
    "train_landcover",
]

#: the dinov3geo folder kind of a land-cover training run
LANDCOVER_TRAIN_KIND = "landcover-train"
HEADS = ("linear", "dense")
WEIGHTINGS = ("inverse_sqrt", "inverse", "none")


# ----------------------------------------------------------------------------- config
@dataclass
class DataConfig:
    image: str = ""  #: image raster (file, band folder, STAC item)
    labels: str = ""  #: polygons (.gpkg/.shp/.geojson/.parquet/.fgb) or a class raster
    column: str | None = None  #: class column of a polygon file (default: guessed)
    layer: str | None = None  #: layer of a multi-layer polygon file
    ignore: list[int] | None = None  #: class-raster values meaning unlabelled (besides its nodata and 255)
    classes: list[dict[str, Any]] | None = None  #: class table [{code, name, color}] the labels must use
    bands: list[Any] | None = None  #: image bands (names or 1-based positions); None: all
    band_names: list[str] | None = None  #: names for the selected bands (e.g. blue, green, red, nir...)
    assume_crs: str | None = None  #: CRS of an image / label file that declares none
    target_res: float | None = None  #: working resolution in image-CRS units (None: the image grid); maps follow it
    value_scale: float | None = None  #: raw -> model units (default: backbone metadata, else 1)
    mean: list[float] | None = None  #: per band after value_scale (default: backbone metadata, else the image's)
    std: list[float] | None = None


@dataclass
class SplitConfig:
    block: int = 64  #: block side in pixels
    buffer: int = 8  #: pixels dropped between splits
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.6, "val": 0.2, "test": 0.2})
    seed: int = 0


@dataclass
class ModelConfig:
    backbone: str = ""  #: backbone file for load_backbone, or "random:<arch>" (a control without pretraining)
    head: str = "linear"  #: "linear" (DINOv3 linear protocol) or "dense" (4 taps, learned upsampling)
    layers: list[int] | None = None  #: tapped levels (default: last / 4 evenly spaced)
    hidden: int = 64  #: dense head width
    image_detail: bool = False  #: dense head: add the full-resolution image branch
    detail_channels: int = 16


@dataclass
class TrainConfig:
    tile: int = 128  #: tile side in pixels
    stride: int = 64  #: stride of training tiles
    batch_size: int = 8
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    class_weights: Any = "inverse_sqrt"  #: inverse_sqrt | inverse | none | {class name: weight}
    augment: bool = True  #: the 8 flips/rotations of training tiles (nadir imagery)
    cache_dtype: str = "float16"
    device: str = "auto"
    amp: str | None = "auto"
    seed: int = 0
    eval_window: int = 256  #: inference window of the test map


@dataclass
class BaselineConfig:
    enabled: bool = True  #: also train the random-forest baseline on the same split
    n_estimators: int = 200
    max_depth: int | None = None
    class_weight: str = "balanced"  #: balanced | none
    seed: int = 0


@dataclass
class LandcoverTrainConfig:
    """``dinov3geo landcover train`` configuration (sections data, split, model, train, baseline)."""

    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    out: str = "outputs/landcover"
    resume: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes the trained head (not out/resume/device/epochs/baseline)."""
        d = self.to_dict()
        for k in ("out", "resume", "baseline"):
            d.pop(k)
        d["train"].pop("device"), d["train"].pop("epochs"), d["train"].pop("eval_window")
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_landcover_config(source: str | os.PathLike[str] | dict[str, Any],
                          overrides: Sequence[str] | None = None) -> LandcoverTrainConfig:
    """Read a YAML file (safe loading) or dict; ``overrides`` like ``["train.epochs=5"]``; unknown keys error."""
    if isinstance(source, dict):
        raw = json.loads(json.dumps(source))
        what = "<dict>"
    else:
        what = os.fspath(source)
        raw = load_yaml(what, "land-cover config") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: a land-cover config must be a mapping of sections, got {type(raw).__name__}")
    apply_overrides(raw, overrides or [])
    try:
        cfg = from_dict(LandcoverTrainConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None
    _validate(cfg, what)
    return cfg


def _validate(cfg: LandcoverTrainConfig, what: str) -> None:
    if not cfg.data.image or not cfg.data.labels:
        raise ConfigError(f"{what}: data.image and data.labels are required")
    if not cfg.model.backbone:
        raise ConfigError(f"{what}: model.backbone is required (a backbone file, or random:<arch> as a control)")
    if cfg.model.head not in HEADS:
        raise ConfigError(f"{what}: model.head must be one of {HEADS}, got {cfg.model.head!r}")
    if cfg.model.image_detail and cfg.model.head != "dense":
        raise ConfigError(f"{what}: model.image_detail needs model.head: dense")
    cw = cfg.train.class_weights
    if not (isinstance(cw, dict) or cw in WEIGHTINGS):
        raise ConfigError(f"{what}: train.class_weights must be one of {WEIGHTINGS} or a mapping "
                          f"{{class name: weight}}, got {cw!r}")
    if "train" not in cfg.split.fractions:
        raise ConfigError(f"{what}: split.fractions needs a 'train' share, got {cfg.split.fractions}")
    for key, v in (("train.tile", cfg.train.tile), ("train.stride", cfg.train.stride),
                   ("train.batch_size", cfg.train.batch_size), ("split.block", cfg.split.block)):
        if v < 1:
            raise ConfigError(f"{what}: {key} must be positive, got {v}")
    if cfg.train.epochs < 0 or cfg.split.buffer < 0:
        raise ConfigError(f"{what}: train.epochs and split.buffer must be >= 0")
    if cfg.train.cache_dtype not in ("float16", "float32"):
        raise ConfigError(f"{what}: train.cache_dtype must be float16 or float32")
    if cfg.baseline.class_weight not in ("balanced", "none"):
        raise ConfigError(f"{what}: baseline.class_weight must be balanced or none")
    if cfg.data.target_res is not None and not cfg.data.target_res > 0:
        raise ConfigError(f"{what}: data.target_res must be positive, got {cfg.data.target_res}")
    if cfg.data.band_names is not None and cfg.data.bands is not None and len(cfg.data.band_names) != len(cfg.data.bands):
        raise ConfigError(f"{what}: data.band_names has {len(cfg.data.band_names)} names for "
                          f"{len(cfg.data.bands)} data.bands")


# ----------------------------------------------------------------------------- loss and weights
def class_weights(counts: Sequence[int], how: Any = "inverse_sqrt", names: Sequence[str] | None = None) -> Tensor:
    """Per-class loss weights from training pixel counts.

    ``inverse_sqrt``: ``1 / sqrt(n_k)``; ``inverse``: ``1 / n_k``; ``none``: 1; a mapping ``{name: weight}``
    (classes not named: 1). Weights are scaled so that the mean weight over the training *pixels* is 1 (the
    loss keeps the scale of the unweighted one); classes without training pixels get 0.
    """
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    if isinstance(how, dict):
        if names is None:
            raise ValueError("class weights by name need the class names")
        low = {str(k).lower(): float(v) for k, v in how.items()}
        unknown = sorted(set(low) - {x.lower() for x in names})
        if unknown:
            raise ValueError(f"train.class_weights names unknown classes {unknown}; the classes are {list(names)}")
        w = torch.tensor([low.get(x.lower(), 1.0) for x in names], dtype=torch.float64)
    elif how == "inverse_sqrt":
        w = torch.where(n > 0, 1 / n.clamp_min(1).sqrt(), torch.zeros_like(n))
    elif how == "inverse":
        w = torch.where(n > 0, 1 / n.clamp_min(1), torch.zeros_like(n))
    elif how == "none":
        w = torch.ones_like(n)
    else:
        raise ValueError(f"unknown class weighting {how!r}; choose from {WEIGHTINGS} or give a mapping")
    w = torch.where(n > 0, w, torch.zeros_like(w))
    total = float((w * n).sum())
    if total > 0:
        w = w * float(n.sum()) / total
    return w.float()


def landcover_loss(logits: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Class-weighted cross-entropy over labelled pixels (``target`` 255 ignored):
    ``sum_i w[y_i] * -log p_i(y_i) / sum_i w[y_i]``; 0 when no pixel is labelled."""
    valid = target != NODATA
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target.long(), weight=None if weights is None else weights.to(logits.device),
                           ignore_index=NODATA)


# ----------------------------------------------------------------------------- tiles
def _positions(n: int, tile: int, stride: int) -> list[int]:
    last = max(n - tile, 0)
    return sorted({*range(0, last + 1, stride), last})


def _dihedral(x: Tensor, k: int) -> Tensor:
    """The ``k``-th of the 8 flips/rotations of the last two dims."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


@dataclass
class _Tiles:
    images: Tensor  # [N, C, T, T] normalised
    targets: Tensor  # [N, T, T] uint8 (255 = not this split / unlabelled)
    corners: list[tuple[int, int]]
    views: int = 1
    features: list[Tensor] | None = None  # per level [N * views, C, h, w] (view-major)
    view_images: Tensor | None = None  # [N * views, C, T, T] when the head uses the image


def _cut_tiles(img: Tensor, index: np.ndarray, mask: np.ndarray, tile: int, stride: int) -> _Tiles | None:
    h, w = mask.shape
    t = min(tile, h, w)
    imgs, tg, corners = [], [], []
    for r in _positions(h, t, stride):
        for c in _positions(w, t, stride):
            m = mask[r:r + t, c:c + t]
            if not m.any():
                continue
            imgs.append(img[:, r:r + t, c:c + t])
            tg.append(torch.from_numpy(np.where(m, index[r:r + t, c:c + t], NODATA).astype(np.uint8)))
            corners.append((r, c))
    if not imgs:
        return None
    return _Tiles(torch.stack(imgs), torch.stack(tg), corners)


@torch.no_grad()
def _cache(model: LandcoverModel, tiles: _Tiles, views: int, batch: int, device: torch.device,
           amp: torch.dtype | None, dtype: torch.dtype, desc: str, progress: bool) -> None:
    per_level: list[list[Tensor]] | None = None
    vimgs: list[Tensor] = []
    n = tiles.images.shape[0]
    bar = progress_bar(total=n * views, desc=desc, leave=False, disable=not progress)
    for k in range(views):
        for s in range(0, n, batch):
            tick_threads()
            x = _dihedral(tiles.images[s:s + batch], k).to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                feats = model.forward_features(x)
            if per_level is None:
                per_level = [[] for _ in feats]
            for i, f in enumerate(feats):
                per_level[i].append(f.to("cpu", dtype))
            if model.uses_image:
                vimgs.append(x.to("cpu"))
            bar.update(x.shape[0])
    bar.close()
    tiles.features = [torch.cat(f) for f in per_level] if per_level else None
    tiles.view_images = torch.cat(vimgs) if vimgs else None
    tiles.views = views


def _batch(tiles: _Tiles, idx: Tensor, device: torch.device) -> tuple[list[Tensor], Tensor, Tensor | None]:
    """Cached features, targets and (for image heads) images of the (view-major) item indices ``idx``."""
    n = tiles.images.shape[0]
    tile_i, view = idx % n, idx // n
    tg = torch.stack([_dihedral(tiles.targets[t], int(k)) for t, k in zip(tile_i.tolist(), view.tolist(), strict=True)])
    assert tiles.features is not None
    feats = [f[idx].to(device) for f in tiles.features]
    imgs = tiles.view_images[idx].to(device) if tiles.view_images is not None else None
    return feats, tg.to(device), imgs


# ----------------------------------------------------------------------------- result
@dataclass
class TrainResult:
    """What :func:`train_landcover` produced."""

    model_path: Path
    out_dir: Path
    best_epoch: int
    best_val: dict[str, Any] | None
    test: dict[str, Any] | None
    baseline: dict[str, Any] | None
    history: list[dict[str, Any]]
    summary: dict[str, Any]


def train_landcover(config: LandcoverTrainConfig | str | os.PathLike[str] | dict[str, Any],
                    overrides: Sequence[str] | None = None, *, progress: bool = True,
                    on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train a land-cover head (see the module docstring).

    Args:
        config: a config object, a YAML file or a dict.
        overrides: ``["section.key=value", ...]``.
        progress: show progress bars.
        on_epoch: called with each epoch's history row once its ``last.pt`` is saved (e.g. to stop a run:
            an exception raised there ends the run as a kill would, and a re-run resumes).
    """
    cfg = config if isinstance(config, LandcoverTrainConfig) else load_landcover_config(config, overrides)
    inputs: list[Any] = [cfg.data.image, cfg.data.labels]
    if not str(cfg.model.backbone).startswith("random:"):
        inputs.append(cfg.model.backbone)
    if isinstance(config, str | os.PathLike):
        inputs.append(config)
    files = ("model.pt", "last.pt", "history.json", "summary.json", "split.json", "map.tif", "map.tif.aux.xml",
             "map.qml")
    out = guard_output(cfg.out, inputs, folder=True, kind=LANDCOVER_TRAIN_KIND, role="out", adopt=("last.pt",),
                       replaces=False)
    for f in files:
        guard_output(out / f, inputs, role="out")
    with output_lock(out, what="landcover train"), fair_threads():
        return _train(cfg, out, inputs, files, progress=progress, on_epoch=on_epoch)


def _read_image(cfg: LandcoverTrainConfig) -> tuple[np.ndarray, np.ndarray, GridSpec, list[str], list[list[str]],
                                                    list[str], str]:
    scene = open_scene(cfg.data.image, crs=cfg.data.assume_crs)
    source_bands = list(scene.band_names)
    if cfg.data.target_res is not None:
        from dinov3geo.io.scene import target_grid

        coarser = cfg.data.target_res > 1.01 * min(scene.grid.res)
        scene = scene.with_grid(target_grid(scene.grid, res=cfg.data.target_res), "average" if coarser else "bilinear")
    if cfg.data.bands is not None:
        scene = scene.select(list(cfg.data.bands))
    names = list(scene.band_names)
    aliases = [[b.name, *b.aliases] for b in scene.bands]
    if cfg.data.band_names is not None:
        if len(cfg.data.band_names) != len(names):
            raise ConfigError(f"data.band_names has {len(cfg.data.band_names)} names for the {len(names)} bands "
                              f"{names} of {cfg.data.image!r}")
        names = [str(n) for n in cfg.data.band_names]
    chip = scene.read()
    return (chip.data.astype(np.float32, copy=False), chip.valid, scene.grid, names, aliases, source_bands,
            str(scene.dtype))


def _load_backbone(cfg: LandcoverTrainConfig, names: Sequence[str]) -> torch.nn.Module:
    src = cfg.model.backbone
    if src.startswith("random:"):
        return build_backbone(src.split(":", 1)[1], in_chans=len(names)).eval()
    if not Path(src).exists():
        raise FileNotFoundError(f"model.backbone {src!r} does not exist (a backbone file, or random:<arch>)")
    bb = load_backbone(src)
    if int(bb.config.in_chans) == len(names):
        return bb
    return load_backbone(src, bands=list(names))  # e.g. RGB weights widened to the image's bands


def _normalisation(cfg: LandcoverTrainConfig, backbone: Any, img: np.ndarray, valid: np.ndarray, dtype: str
                   ) -> tuple[float, list[float] | None, list[float] | None, str]:
    from dinov3geo.tasks.features import normalisation_for

    vs, mean, std = normalisation_for(backbone, dtype)
    how = "backbone metadata" if mean is not None else "none"
    n = img.shape[0]
    if mean is not None and len(mean) != n:
        vs, mean, std, how = 1.0, None, None, "none"
    if cfg.data.value_scale is not None:
        vs = float(cfg.data.value_scale)
    if cfg.data.mean is not None:
        mean, how = [float(v) for v in cfg.data.mean], "config"
    if cfg.data.std is not None:
        std = [float(v) for v in cfg.data.std]
    if mean is None or std is None:  # no metadata: the image's own statistics over its valid pixels
        vals = img[:, valid].astype(np.float64) * vs
        if vals.shape[1] == 0:
            raise ValueError(f"{cfg.data.image!r} has no valid pixel")
        mean = mean if mean is not None else vals.mean(axis=1).tolist()
        std = std if std is not None else np.maximum(vals.std(axis=1), 1e-6).tolist()
        how = "image statistics"
    return vs, mean, std, how


def build_head_for(cfg: LandcoverTrainConfig, backbone: torch.nn.Module, n_classes: int, in_bands: int
                   ) -> tuple[torch.nn.Module, list[int]]:
    """The configured head and the tapped layers."""
    m = cfg.model
    depth = len(backbone.blocks)
    if m.head == "linear":
        layers = [int(i) % depth for i in (m.layers or [depth - 1])]
        head: torch.nn.Module = LinearHead(level_channels(backbone, layers), n_classes, n_levels=len(layers),
                                           patch_size=int(backbone.patch_size))
    else:
        layers = [int(i) % depth for i in (m.layers or default_taps(backbone, 4))]
        head = DenseHead(level_channels(backbone, layers), n_classes, n_levels=len(layers), hidden=m.hidden,
                         patch_size=int(backbone.patch_size), image_detail=m.image_detail, in_bands=in_bands,
                         detail_channels=m.detail_channels)
    return head, layers


def _write_json(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _tmp(p: Path) -> Path:
    return p.with_name(p.name + ".tmp")


def _val_metrics(model: LandcoverModel, tiles: _Tiles | None, mask: np.ndarray | None, index: np.ndarray,
                 batch: int, device: torch.device) -> dict[str, Any] | None:
    """Metrics of the validation pixels (each scored once: tiles are pasted into one prediction grid)."""
    if tiles is None or mask is None:
        return None
    pred = np.full(index.shape, NODATA, dtype=np.uint8)
    model.eval()
    n = tiles.images.shape[0]
    t = tiles.images.shape[-1]
    with torch.no_grad():
        for s in range(0, n, batch):
            idx = torch.arange(s, min(s + batch, n))
            feats, _tg, imgs = _batch(tiles, idx, device)
            logits = model.forward_head(feats, (t, t), imgs)
            p = logits.argmax(dim=1).to("cpu", torch.uint8).numpy()
            for k, (r, c) in enumerate(tiles.corners[s:s + len(idx)]):
                pred[r:r + t, c:c + t] = p[k]
    cm = confusion_matrix(index, pred, len(model.table), mask)
    return classification_metrics(cm, model.table.names)


def _train(cfg: LandcoverTrainConfig, out: Path, inputs: list[Any], files: Sequence[str], *, progress: bool,
           on_epoch: Callable[[dict[str, Any]], None] | None) -> TrainResult:
    tc = cfg.train
    torch.manual_seed(tc.seed)
    device = resolve_device(tc.device)
    amp = resolve_amp(tc.amp, device)
    cache_dtype = {"float16": torch.float16, "float32": torch.float32}[tc.cache_dtype]

    # ---- data and labels (before the output folder is created: bad inputs leave nothing behind)
    img_raw, valid, grid, names, aliases, source_bands, dtype = _read_image(cfg)
    given = ClassTable.from_json(cfg.data.classes) if cfg.data.classes else None
    labels = load_labels(cfg.data.labels, grid, column=cfg.data.column, table=given, ignore=cfg.data.ignore,
                         layer=cfg.data.layer, assume_crs=cfg.data.assume_crs, min_classes=2,
                         what=f"the image {cfg.data.image!r}")
    n_nodata = int((labels.labelled & ~valid).sum())
    if n_nodata:
        warnings.warn(f"{n_nodata} labelled pixel(s) lie on image nodata and were left out", stacklevel=2)
        labels.index[~valid] = NODATA
    table = labels.table
    split = block_split(grid.shape, block=cfg.split.block, fractions=cfg.split.fractions, buffer=cfg.split.buffer,
                        seed=cfg.split.seed)
    psplit = split_by_polygon(labels, split)
    train_mask = psplit.masks["train"]
    if not train_mask.any():
        raise ValueError(f"no labelled pixel falls in the train split (block {cfg.split.block}, buffer "
                         f"{cfg.split.buffer}, fractions {cfg.split.fractions}); use smaller blocks or another seed")
    counts = np.bincount(labels.index[train_mask].ravel(), minlength=len(table))
    missing = [table[i].name for i in range(len(table)) if counts[i] == 0]
    if missing:
        warnings.warn(f"class(es) {missing} have no pixel in the train split: the model cannot learn them "
                      "(use smaller split blocks or another split.seed)", stacklevel=2)
    backbone = _load_backbone(cfg, names)
    head, layers = build_head_for(cfg, backbone, len(table), len(names))
    model = LandcoverModel(backbone, head, table, layers).to(device)
    vs, mean, std, norm_how = _normalisation(cfg, backbone, img_raw, valid, dtype)

    make_output_folder(out, inputs, kind=LANDCOVER_TRAIN_KIND, role="out", adopt=("last.pt",), files=files)
    _write_json({"block_split": split.to_dict(), "polygon_split": psplit.to_dict(),
                 "labels": labels.info, "classes": table.to_dict()}, out / "split.json")

    # ---- tiles and cached features
    x = torch.from_numpy(img_raw) * vs
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    x[:, ~torch.from_numpy(valid)] = 0.0
    train = _cut_tiles(x, labels.index, train_mask, tc.tile, tc.stride)
    assert train is not None
    val_mask = psplit.masks.get("val")
    val = None
    if val_mask is not None and val_mask.any():
        val = _cut_tiles(x, labels.index, val_mask, tc.tile, tc.tile)
    views = 8 if tc.augment else 1
    log.info("land-cover training: %d train tiles (x%d views), %d val tiles of %d px; classes %s; bands %s",
             train.images.shape[0], views, 0 if val is None else val.images.shape[0], train.images.shape[-1],
             table.names, names)
    _cache(model, train, views, tc.batch_size, device, amp, cache_dtype, "caching train features", progress)
    if val is not None:
        _cache(model, val, 1, tc.batch_size, device, amp, cache_dtype, "caching val features", progress)
    weights = class_weights(counts.tolist(), tc.class_weights, table.names).to(device)

    # ---- optimiser, resume
    params = [p for p in model.head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    n_items = train.images.shape[0] * views
    steps = max(1, math.ceil(n_items / tc.batch_size))
    history: list[dict[str, Any]] = []
    start, best_score, best_epoch, best_val = 0, -math.inf, -1, None
    last = out / "last.pt"
    fp = cfg.fingerprint()
    if cfg.resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        if state.get("fingerprint") == fp:
            model.head.load_state_dict(state["head"])
            opt.load_state_dict(state["optimizer"])
            start, history = int(state["epoch"]) + 1, json.loads(state["history"])
            best_score, best_epoch = float(state["best_score"]), int(state["best_epoch"])
            best_val = json.loads(state["best_val"]) if state.get("best_val") else None
            log.info("resuming land-cover training at epoch %d from %s", start, last)
        else:
            log.warning("%s belongs to a different configuration; starting afresh", last)
    gen = torch.Generator().manual_seed(tc.seed)
    for _ in range(start):  # the shuffles of a resumed run are those of an uninterrupted one
        torch.randperm(n_items, generator=gen)
    extra = {"band_keys": list(cfg.data.bands) if cfg.data.bands is not None else None,
             "source_bands": source_bands, "class_weights": weights.tolist(), "labels": os.fspath(cfg.data.labels),
             "image": os.fspath(cfg.data.image),
             "notes": f"dinov3geo landcover train; config {fp}; head {cfg.model.head}; normalisation {norm_how}"}
    gsd = float(min(grid.res)) if grid.crs.is_projected else None
    t_size = train.images.shape[-1]
    bar = progress_bar(total=tc.epochs, desc=f"landcover {cfg.model.head} head", disable=not progress, initial=start)
    for epoch in range(start, tc.epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n_items, generator=gen)
        total, count = 0.0, 0
        for s in range(steps):
            tick_threads()
            idx = perm[s * tc.batch_size:(s + 1) * tc.batch_size]
            feats, tg, imgs = _batch(train, idx, device)
            logits = model.forward_head(feats, (t_size, t_size), imgs)
            loss = landcover_loss(logits, tg, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        vm = _val_metrics(model, val, val_mask, labels.index, tc.batch_size, device)
        row: dict[str, Any] = {"epoch": epoch, "loss": total / max(count, 1),
                               "seconds": round(time.perf_counter() - t0, 3)}
        if vm is not None:
            row |= {"val_macro_f1": vm["macro_f1"], "val_oa": vm["overall_accuracy"], "val_kappa": vm["kappa"]}
        history.append(row)
        score = vm["macro_f1"] if vm is not None and vm["macro_f1"] is not None else -row["loss"]
        if score > best_score:
            best_score, best_epoch, best_val = score, epoch, vm
            save_landcover_model(out / "model.pt", model, bands=names, mean=mean, std=std, value_scale=vs, gsd=gsd,
                                 backbone_source=cfg.model.backbone, extra=extra)
        torch.save({"fingerprint": fp, "epoch": epoch, "head": model.head.state_dict(),
                    "optimizer": opt.state_dict(), "history": json.dumps(history), "best_score": best_score,
                    "best_epoch": best_epoch, "best_val": json.dumps(best_val) if best_val else ""}, _tmp(last))
        os.replace(_tmp(last), last)
        _write_json(history, out / "history.json")
        bar.set_postfix(loss=f"{row['loss']:.3f}", val_f1=f"{row.get('val_macro_f1') or float('nan'):.3f}")
        bar.update(1)
        if on_epoch is not None:
            on_epoch(row)
    bar.close()
    if not (out / "model.pt").exists():
        if tc.epochs == 0:
            save_landcover_model(out / "model.pt", model, bands=names, mean=mean, std=std, value_scale=vs, gsd=gsd,
                                 backbone_source=cfg.model.backbone, extra=extra)
        else:
            raise RuntimeError(f"{out}: training finished earlier but model.pt is missing; delete last.pt and re-run")

    # ---- test map and scores, baseline
    test_name = "test" if "test" in psplit.masks and psplit.masks["test"].any() else None
    test = base = None
    if test_name is not None:
        test = _evaluate_head(out, cfg, labels, psplit, test_name, progress=progress)
    if cfg.baseline.enabled:
        score_on = test_name or ("val" if val_mask is not None and val_mask.any() else None)
        if score_on is not None:
            base = _evaluate_baseline(out, cfg, img_raw, valid, names, aliases, labels, psplit, score_on)
    summary = {
        "best_epoch": best_epoch, "best_val": best_val, "test": test, "baseline": base,
        "head": cfg.model.head, "uses_image_pixels": model.uses_image, "backbone": cfg.model.backbone,
        "classes": table.to_dict(), "train_pixels_per_class": {table[i].name: int(counts[i]) for i in range(len(table))},
        "split_pixels": psplit.counts(), "normalisation": norm_how, "config": cfg.to_dict(),
    }
    _write_json(summary, out / "summary.json")
    return TrainResult(out / "model.pt", out, best_epoch, best_val, test, base, history, summary)


def _evaluate_head(out: Path, cfg: LandcoverTrainConfig, labels: LabelRaster, psplit: PolygonSplit, name: str, *,
                   progress: bool) -> dict[str, Any]:
    """Map the image with the best model through the engine and score it on split ``name``."""
    import rasterio

    from dinov3geo.tasks.landcover.evaluate import EVAL_KIND, write_outputs
    from dinov3geo.tasks.landcover.predict import predict_landcover

    map_path = predict_landcover(out / "model.pt", cfg.data.image, out / "map.tif", window=cfg.train.eval_window,
                                 assume_crs=cfg.data.assume_crs, device=cfg.train.device, progress=progress,
                                 batch_size=2, sidecars=False)  # the test map; pipelines describe it
    with rasterio.open(map_path) as ds:
        pred = labels.table.index_lut()[ds.read(1)]
    acc = ConfusionAccumulator(labels.table.names)
    acc.update(labels.index, pred, psplit.masks[name])
    m = acc.compute()
    m.update({"split": name, "map": str(map_path), "uses_image_pixels": bool(_uses_image(out / "model.pt")),
              "n_map_missing": int((psplit.masks[name] & (pred == NODATA)).sum())})
    folder = make_output_folder(out / f"eval_{name}", [cfg.data.image, cfg.data.labels], kind=EVAL_KIND)
    write_outputs(m, folder, f"{cfg.model.head} head on frozen features: {name} polygons")
    return m


def _uses_image(model_path: Path) -> bool:
    from dinov3geo.models import read_checkpoint

    return bool(read_checkpoint(model_path)["metadata"].get("uses_image_pixels"))


def _evaluate_baseline(out: Path, cfg: LandcoverTrainConfig, img: np.ndarray, valid: np.ndarray, names: list[str],
                       aliases: list[list[str]], labels: LabelRaster, psplit: PolygonSplit, name: str
                       ) -> dict[str, Any]:
    """The random-forest baseline trained on the train pixels, scored on split ``name``."""
    from dinov3geo.tasks.landcover.baseline import run_baseline
    from dinov3geo.tasks.landcover.evaluate import EVAL_KIND, write_outputs

    b = cfg.baseline
    res = run_baseline(img, names, labels.index, psplit.masks["train"] & valid, aliases=aliases,
                       n_estimators=b.n_estimators, max_depth=b.max_depth, class_weight=b.class_weight, seed=b.seed)
    sel = psplit.masks[name] & valid
    rows, cols = np.nonzero(sel)
    pred = np.full(labels.index.shape, NODATA, dtype=np.uint8)
    if rows.size:
        pred[rows, cols] = res.predict(img[:, rows, cols], names, aliases)
    acc = ConfusionAccumulator(labels.table.names)
    acc.update(labels.index, pred, sel)
    m = acc.compute()
    m.update({"split": name, "baseline": res.info})
    folder = make_output_folder(out / f"baseline_{name}", [cfg.data.image, cfg.data.labels], kind=EVAL_KIND)
    write_outputs(m, folder, f"random forest (bands + indices): {name} polygons")
    return m
