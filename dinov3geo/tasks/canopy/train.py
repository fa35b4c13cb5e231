"""Train a canopy-height head on frozen DINOv3 features from image + CHM label rasters.

One run (:func:`train_canopy`, CLI ``dinov3geo canopy train CONFIG``):

1. **Data.** Every ``data.pairs`` entry (an image and its canopy-height model of any CRS/resolution) is read
   onto one working grid (``data.target_res``; see :func:`~dinov3geo.tasks.canopy.labels.load_image_and_chm`),
   and the grid is cut into square blocks assigned to ``train`` / ``val`` (/ ``test``) with a pixel buffer
   between splits (:func:`~dinov3geo.tasks.canopy.splits.block_split`); training tiles lie fully inside train
   blocks, validation tiles inside val blocks, so neighbouring tiles never leak.
2. **Model.** The backbone (any :func:`~dinov3geo.models.load_backbone` file, or ``random:<arch>`` as a
   control) is frozen; the head is a :class:`~dinov3geo.tasks.canopy.heads.LightHead` or a
   :class:`~dinov3geo.tasks.canopy.dpt.DPTHead` (binned output: linear, log or CHMv2 mixed-log bins).
   With ``train.cache_features`` the tapped backbone features of every tile (and of its flips/rotations when
   ``train.augment``) are computed once and kept in memory (``float16`` with ``train.cache_dtype``), so an
   epoch costs only the head.
3. **Loss** ``l1`` / ``silog`` / ``bin_ce`` (a list sums them) over valid label pixels only.
4. **Checkpoints.** ``last.pt`` after every epoch (head, optimiser, schedule, history; resume with
   ``resume=True`` continues where a killed run stopped), ``model.pt`` = the epoch with the best validation MAE
   (:func:`~dinov3geo.tasks.canopy.model.save_canopy_model`: bands, normalisation, GSD, backbone identity),
   ``history.json``, ``split_<pair>.json``. With a ``test`` split, the best model is run over each image by the
   inference engine and evaluated on the test blocks (``eval_<pair>/metrics.json`` + plots).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dinov3geo.inference.engine import resolve_amp, resolve_device
from dinov3geo.io.errors import MissingCRSError
from dinov3geo.models import load_backbone
from dinov3geo.models.normalization import normalize
from dinov3geo.models.registry import build_backbone
from dinov3geo.models.taps import n_taps, tap_widths
from dinov3geo.tasks.canopy.bins import HeightBins
from dinov3geo.tasks.canopy.chmv2 import default_layers
from dinov3geo.tasks.canopy.dpt import DPTHead
from dinov3geo.tasks.canopy.heads import LightHead
from dinov3geo.tasks.canopy.labels import ImageCHMPair, load_image_and_chm
from dinov3geo.tasks.canopy.metrics import CanopyMetricAccumulator
from dinov3geo.tasks.canopy.model import CanopyHeightModel, save_canopy_model
from dinov3geo.tasks.canopy.splits import SpatialSplit, block_split
from dinov3geo.utils.atomic import atomic_path
from dinov3geo.utils.config import ConfigError, apply_overrides, from_dict, load_yaml
from dinov3geo.utils.locks import output_lock
from dinov3geo.utils.outputs import guard_output, make_output_folder
from dinov3geo.utils.progress import progress_bar
from dinov3geo.utils.threads import fair_threads, tick_threads

log = logging.getLogger("dinov3geo.canopy")

__all__ = [
    "CanopyTrainConfig",
    "TrainResult",
    "canopy_loss",
    "load_canopy_config",
    "train_canopy",
]

LOSSES = ("l1", "silog", "bin_ce")


# ----------------------------------------------------------------------------- config
@dataclass
class PairConfig:
    """One image and its canopy-height labels."""

    image: str = ""  #: image raster (anything dinov3geo.io.open_scene opens)
    chm: str = ""  #: canopy-height model raster (metres; any CRS/resolution)
    name: str | None = None  #: short name (default: the image file stem)
    assume_crs: str | None = None  #: CRS of the image and CHM when the files have none (e.g. EPSG:31982)


@dataclass
class DataConfig:
    pairs: list[dict[str, Any]] = field(default_factory=list)  #: [{image, chm, name}]
    bands: list[str] | None = None  #: image bands to use (names or 1-based indices); None: all
    target_res: float | None = None  #: working resolution in image-CRS units (None: the image grid)
    value_scale: float | None = None  #: raw -> [0, 1] factor; None: from the backbone metadata / dtype
    mean: list[float] | None = None  #: per-band mean after value_scale (None: backbone metadata or SAT-493M)
    std: list[float] | None = None  #: per-band std after value_scale


@dataclass
class SplitConfig:
    block: int = 64  #: block side in working-grid pixels
    buffer: int = 16  #: gap in pixels between blocks of different splits
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.6, "val": 0.2, "test": 0.2})
    seed: int = 0


@dataclass
class ModelConfig:
    backbone: str = ""  #: backbone file for load_backbone (ViT or ConvNeXt), or "random:<arch>" (a control)
    head: str = "dpt"  #: "dpt" (4 layers, binned) or "light" (patch-resolution head, learned upsampling)
    output: str = "bins"  #: light head only: "bins" or "regression"
    bins: str = "chmv2_mixlog"  #: bin strategy: linear | log | chmv2_mixlog
    bin_norm: str = "softmax"  #: softmax | chmv2_mixlog (Meta's ReLU-linear normalisation)
    n_bins: int = 64
    max_height: float = 96.0
    hidden: int = 64  #: light head width / DPT fusion channels
    post_process_channels: list[int] | None = None  #: DPT per-level channels (default: embed_dim/8..embed_dim)
    layers: list[int] | None = None  #: tapped blocks (default: 4 evenly spaced ending at the last; ConvNeXt: its 4 stages)


@dataclass
class TrainConfig:
    loss: list[str] = field(default_factory=lambda: ["bin_ce", "l1"])  #: summed losses
    silog_lambda: float = 0.85
    tile: int = 128  #: training tile side (pixels; a multiple of 32 for the DPT head)
    stride: int = 64  #: tile stride inside the split areas
    batch_size: int = 8
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    augment: bool = True  #: dihedral flips/rotations (nadir imagery)
    cache_features: bool = True
    cache_dtype: str = "float16"  #: float16 | float32
    min_valid: float = 0.5  #: tiles with fewer valid label pixels are skipped
    device: str = "auto"
    amp: str | None = "auto"  #: autocast for the backbone: auto (bf16 on CUDA) | bf16 | none
    seed: int = 0
    prior_init: bool = True  #: start the output layer at the training-label distribution (see init_output_prior)
    eval_window: int = 256  #: inference-engine window for the final test evaluation


@dataclass
class CanopyTrainConfig:
    """``dinov3geo canopy train`` configuration (YAML sections ``data``, ``split``, ``model``, ``train``)."""

    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "outputs/canopy"  #: output folder
    resume: bool = True  #: continue from out/last.pt when the config matches

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes the result (not ``out``/``resume``/``device``)."""
        d = self.to_dict()
        d.pop("out"), d.pop("resume")
        d["train"].pop("device"), d["train"].pop("epochs")
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_canopy_config(
    source: str | os.PathLike[str] | dict[str, Any], overrides: Sequence[str] | None = None
) -> CanopyTrainConfig:
    """Read a YAML file (safe loading) or dict; ``overrides`` like ``["train.epochs=5"]``; unknown keys error."""
    if isinstance(source, dict):
        raw = json.loads(json.dumps(source))
        what = "<dict>"
    else:
        what = os.fspath(source)
        raw = load_yaml(what, "canopy config") or {}  # errors name the file (and the line of a YAML error)
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: a canopy config must be a mapping of sections, got {type(raw).__name__}")
    apply_overrides(raw, overrides or [])
    try:
        cfg = from_dict(CanopyTrainConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None
    _validate(cfg, what)
    return cfg


def _validate(cfg: CanopyTrainConfig, what: str) -> None:
    if not cfg.data.pairs:
        raise ConfigError(f"{what}: data.pairs is empty; give at least one {{image: ..., chm: ...}}")
    for i, p in enumerate(cfg.data.pairs):
        pc = from_dict(PairConfig, p, f"data.pairs[{i}].")
        if not pc.image or not pc.chm:
            raise ConfigError(f"{what}: data.pairs[{i}] needs both 'image' and 'chm'")
    if not cfg.model.backbone:
        raise ConfigError(f"{what}: model.backbone is required (a backbone file, or random:<arch> as a control)")
    if cfg.model.head not in ("dpt", "light"):
        raise ConfigError(f"{what}: model.head must be 'dpt' or 'light', got {cfg.model.head!r}")
    losses = [cfg.train.loss] if isinstance(cfg.train.loss, str) else list(cfg.train.loss)
    bad = [x for x in losses if x not in LOSSES]
    if bad or not losses:
        raise ConfigError(f"{what}: train.loss {bad or losses} unknown; choose from {LOSSES}")
    regression = cfg.model.head == "light" and cfg.model.output == "regression"
    if regression and "bin_ce" in losses:
        raise ConfigError(f"{what}: train.loss bin_ce needs a binned head (model.output: bins)")
    if "train" not in cfg.split.fractions:
        raise ConfigError(f"{what}: split.fractions needs a 'train' share, got {cfg.split.fractions}")
    mult = 32 if cfg.model.head == "dpt" else 16
    if cfg.train.tile % mult:
        raise ConfigError(f"{what}: train.tile={cfg.train.tile} must be a multiple of {mult} for the {cfg.model.head} head")


# ----------------------------------------------------------------------------- losses
def canopy_loss(
    out: dict[str, Tensor | None],
    target: Tensor,
    valid: Tensor,
    losses: Sequence[str],
    bins: HeightBins | None = None,
    silog_lambda: float = 0.85,
) -> Tensor:
    """Sum of the named losses over valid pixels; ``target``/``valid`` are ``[B, H, W]``.

    * ``l1``: mean absolute error of the predicted height (metres);
    * ``silog``: scale-invariant log error (Eigen et al.) on ``log(1 + h)`` (heights can be 0):
      ``sqrt(mean(d²) - λ mean(d)²)``;
    * ``bin_ce``: cross-entropy of the bin distribution against the two-hot encoded target (binned heads).
    """
    height = out["height"][:, 0]
    v = valid & torch.isfinite(target)
    n = v.sum()
    if int(n) == 0:
        return height.sum() * 0.0
    t = torch.where(v, target, torch.zeros_like(target))
    total = height.new_zeros(())
    for name in losses:
        if name == "l1":
            total = total + (height - t).abs()[v].mean()
        elif name == "silog":
            d = (torch.log1p(height.clamp_min(0)) - torch.log1p(t.clamp_min(0)))[v]
            total = total + torch.sqrt((d.pow(2).mean() - silog_lambda * d.mean().pow(2)).clamp_min(1e-8))
        elif name == "bin_ce":
            if bins is None or out.get("logits") is None:
                raise ValueError("bin_ce needs a binned head and its logits")
            total = total + bins.cross_entropy(out["logits"], t[:, None], v[:, None])
        else:
            raise ValueError(f"unknown loss {name!r}; choose from {LOSSES}")
    return total


# ----------------------------------------------------------------------------- data
@dataclass
class _Tiles:
    """Tiles of one split: normalised images (or cached features), targets and valid masks."""

    images: Tensor  # [N, C, T, T] normalised (float32)
    heights: Tensor  # [N, T, T] (NaN invalid)
    valid: Tensor  # [N, T, T] bool
    features: list[list[Tensor]] | None = None  # per level: [N, D, h, w] patch maps and [N, D] cls
    views: int = 1


def _dihedral(x: Tensor, k: int) -> Tensor:
    """The ``k``-th of the 8 flips/rotations of the last two dims."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def _pair_name(p: dict[str, Any]) -> str:
    return str(p.get("name") or Path(str(p["image"])).stem)


def _normalise(img: np.ndarray, value_scale: float, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """``(img * value_scale - mean) / std`` as a float32 tensor (mean/std optional, e.g. no metadata)."""
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)) * float(value_scale)
    if mean is None and std is None:
        return x
    n = x.shape[0]
    return normalize(x, list(mean) if mean is not None else [0.0] * n, list(std) if std is not None else [1.0] * n)


def train_windows(split: SpatialSplit, name: str, tile: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of ``tile`` windows lying fully inside split ``name``.

    The global ``stride`` lattice (:meth:`SpatialSplit.tiles`) plus, for every block of the split, a lattice
    anchored at the block's own top-left corner (after the buffer margin), so every block whose interior holds
    a tile contributes tiles even when the global lattice misses it.
    """
    mask = split.mask(name)
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)

    def inside(r: int, c: int) -> bool:
        if r < 0 or c < 0 or r + tile > h or c + tile > w:
            return False
        s = integral[r + tile, c + tile] - integral[r, c + tile] - integral[r + tile, c] + integral[r, c]
        return bool(s == tile * tile)

    out = {(int(t.row_off), int(t.col_off)) for t in split.tiles(name, tile, stride)}
    k = split.names.index(name)
    for bi, bj in zip(*np.nonzero(split.assignment == k), strict=True):
        r0, c0 = int(bi) * split.block, int(bj) * split.block
        r1, c1 = min(r0 + split.block, h), min(c0 + split.block, w)
        rows = np.flatnonzero(mask[r0:r1, c0:c1].any(axis=1))
        cols = np.flatnonzero(mask[r0:r1, c0:c1].any(axis=0))
        if rows.size == 0 or cols.size == 0:
            continue
        for r in range(r0 + int(rows[0]), r1, stride):
            for c in range(c0 + int(cols[0]), c1, stride):
                if inside(r, c):
                    out.add((r, c))
    return sorted(out)


def _cut_tiles(
    pair: ImageCHMPair, img: Tensor, split: SpatialSplit, name: str, tile: int, stride: int, min_valid: float,
) -> _Tiles | None:
    """Tiles of split ``name``.

    Training tiles lie fully inside the train area (no pixel of another split enters a training input).
    Validation tiles only need ``min_valid`` of their pixels labelled *and* in the split; their labels are
    restricted to the split's pixels (they are used for model selection only, never for gradients), so small
    validation blocks still give tiles.
    """
    if name not in split.names:
        return None
    if name == "train":
        windows = train_windows(split, name, tile, stride)
        area = None
    else:
        area = split.mask(name)
        h, w = pair.grid.shape
        rows = sorted({*range(0, max(h - tile, 0) + 1, stride), max(h - tile, 0)})
        cols = sorted({*range(0, max(w - tile, 0) + 1, stride), max(w - tile, 0)})
        windows = [(r, c) for r in rows for c in cols]
    imgs, hs, vs = [], [], []
    for r, c in windows:
        valid = pair.valid[r:r + tile, c:c + tile]
        if area is not None:
            valid = valid & area[r:r + tile, c:c + tile]
        if valid.shape != (tile, tile) or valid.mean() < min_valid:
            continue
        imgs.append(img[:, r:r + tile, c:c + tile])
        hs.append(torch.from_numpy(np.where(valid, pair.heights[r:r + tile, c:c + tile], np.nan).astype(np.float32)))
        vs.append(torch.from_numpy(valid.copy()))
    if not imgs:
        return None
    return _Tiles(torch.stack(imgs), torch.stack(hs), torch.stack(vs))


# ----------------------------------------------------------------------------- model
def _load_backbone_for(cfg: CanopyTrainConfig, bands: Sequence[str]) -> torch.nn.Module:
    src = cfg.model.backbone
    if src.startswith("random:"):
        arch = src.split(":", 1)[1]
        return build_backbone(arch, in_chans=len(bands)).eval()
    if not Path(src).exists():
        raise FileNotFoundError(f"model.backbone {src!r} does not exist (a backbone file, or random:<arch>)")
    return load_backbone(src, bands=list(bands))


def build_model(cfg: CanopyTrainConfig, backbone: torch.nn.Module) -> CanopyHeightModel:
    """Frozen ``backbone`` + the configured head (and bins).

    The head takes the tapped layers' widths: ``embed_dim`` for every ViT block, one width per stage for a
    ConvNeXt (whose default taps are its four stages, the DPT head's four levels).
    """
    m = cfg.model
    d = int(backbone.embed_dim)
    depth = n_taps(backbone)
    bins = None
    if m.head == "dpt":
        layers = list(m.layers) if m.layers else (default_layers(depth, 4) if depth >= 4 else None)
        widths: int | list[int] = tap_widths(backbone, layers) if layers is not None else d
        ppc = m.post_process_channels or [max(d // 8, 16), max(d // 4, 16), max(d // 2, 16), d]
        head = DPTHead(in_channels=widths, post_process_channels=list(ppc), channels=m.hidden,
                       n_hidden_channels=max(m.hidden // 2, 8), n_bins=m.n_bins)
        bins = HeightBins(m.n_bins, strategy=m.bins, norm=m.bin_norm, max_height=m.max_height)
    else:
        n_levels = len(m.layers) if m.layers else min(4, depth)
        layers = list(m.layers) if m.layers else (default_layers(depth, n_levels) if depth >= n_levels else None)
        widths = tap_widths(backbone, layers[-n_levels:]) if layers is not None else d
        head = LightHead(widths, n_levels=n_levels, hidden=m.hidden, output=m.output, n_bins=m.n_bins,
                         patch_size=int(backbone.patch_size))
        if m.output == "bins":
            bins = HeightBins(m.n_bins, strategy=m.bins, norm=m.bin_norm, max_height=m.max_height)
    return CanopyHeightModel(backbone, head, bins, m.layers)


def _output_layer(head: torch.nn.Module) -> torch.nn.Conv2d | None:
    if isinstance(head, DPTHead):
        return head.conv_depth.head[-1]
    return getattr(head, "out", None)


@torch.no_grad()
def init_output_prior(model: CanopyHeightModel, heights: Tensor, valid: Tensor) -> None:
    """Start the head at the training-label distribution instead of a uniform one.

    Binned heads: the output bias becomes ``log`` of the mean two-hot encoding of the training heights (softmax
    normalisation) and the output weights are scaled down, so the first prediction is the label prior and the
    features only have to explain deviations from it; regression heads: the bias gives the mean height.
    Without this, a 64-bin softmax over 0-96 m starts at ~30 m everywhere and small heads need many epochs to
    come down.
    """
    layer = _output_layer(model.head)
    h = heights[valid & torch.isfinite(heights)]
    if layer is None or layer.bias is None or h.numel() == 0:
        return
    layer.weight.mul_(0.1)
    if model.bins is None:
        scale = float(getattr(model.head, "height_scale", 1.0))
        mean = max(float(h.mean()) / scale, 1e-3)
        layer.bias.fill_(math.log(math.expm1(mean)))  # inverse softplus
        return
    prior = model.bins.encode(h[None, None, :]).reshape(model.bins.n_bins, -1).mean(dim=1)
    prior = (prior + 1e-4) / (prior + 1e-4).sum()
    if model.bins.norm == "softmax":
        layer.bias.copy_(prior.log().to(layer.bias))
    else:  # ReLU-linear normalisation: probabilities proportional to the (positive) logits
        layer.bias.copy_((prior * model.bins.n_bins).to(layer.bias))


@torch.no_grad()
def _cache(model: CanopyHeightModel, tiles: _Tiles, views: int, batch: int, device: torch.device,
           amp: torch.dtype | None, dtype: torch.dtype, desc: str, progress: bool = True) -> None:
    n = tiles.images.shape[0]
    per_level: list[list[Tensor]] | None = None
    bar = progress_bar(total=n * views, desc=desc, leave=False, disable=not progress)
    for k in range(views):
        for s in range(0, n, batch):
            tick_threads()
            x = _dihedral(tiles.images[s:s + batch], k).to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                feats = model.forward_features(x)
            if per_level is None:
                per_level = [[] for _ in range(2 * len(feats))]
            for i, (p, c) in enumerate(feats):
                per_level[2 * i].append(p.to("cpu", dtype))
                per_level[2 * i + 1].append(c.to("cpu", dtype))
            bar.update(x.shape[0])
    bar.close()
    tiles.features = [torch.cat(f) for f in per_level] if per_level else None
    tiles.views = views


def _batch(tiles: _Tiles, idx: Tensor, device: torch.device, dtype: torch.dtype,
           model: CanopyHeightModel, amp: torch.dtype | None) -> tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor]:
    """Features (cached or computed), targets and masks of the (tile, view) indices ``idx``."""
    tick_threads()
    n = tiles.images.shape[0]
    tile_i, view = idx % n, idx // n
    hs = torch.stack([_dihedral(tiles.heights[t], int(k)) for t, k in zip(tile_i.tolist(), view.tolist(), strict=True)])
    vs = torch.stack([_dihedral(tiles.valid[t], int(k)) for t, k in zip(tile_i.tolist(), view.tolist(), strict=True)])
    if tiles.features is not None:
        f = [t[idx].to(device, dtype) for t in tiles.features]
        feats = [(f[2 * i], f[2 * i + 1]) for i in range(len(f) // 2)]
    else:
        x = torch.stack([_dihedral(tiles.images[t], int(k)) for t, k in zip(tile_i.tolist(), view.tolist(), strict=True)])
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            feats = model.forward_features(x.to(device))
        feats = [(p.to(dtype), c.to(dtype)) for p, c in feats]
    return feats, hs.to(device), vs.to(device)


# ----------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    """What :func:`train_canopy` produced."""

    model_path: Path
    out_dir: Path
    best_epoch: int
    best_val: dict[str, Any] | None
    test: dict[str, dict[str, Any]]
    history: list[dict[str, Any]]


def _val_metrics(model: CanopyHeightModel, tiles: _Tiles | None, batch: int, device: torch.device,
                 amp: torch.dtype | None) -> dict[str, Any] | None:
    if tiles is None:
        return None
    acc = CanopyMetricAccumulator(block=max(1, tiles.images.shape[-1] // 2), border=0)
    model.eval()
    n = tiles.images.shape[0]
    with torch.no_grad():
        for s in range(0, n, batch):
            idx = torch.arange(s, min(s + batch, n))
            feats, hs, vs = _batch(tiles, idx, device, model.dtype, model, amp)
            out = model.forward_head(feats, tuple(hs.shape[-2:]))
            pred = out["height"][:, 0].float().cpu().numpy()
            for p, h, v in zip(pred, hs.cpu().numpy(), vs.cpu().numpy(), strict=True):
                acc.update(p, h, v)
    return acc.compute()


def _lr_at(step: float, total: float, warmup: float, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / max(warmup, 1)
    t = (step - warmup) / max(total - warmup, 1)
    return base * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def train_canopy(config: CanopyTrainConfig | str | os.PathLike[str] | dict[str, Any],
                 overrides: Sequence[str] | None = None, *, progress: bool = True) -> TrainResult:
    """Train a canopy-height head (see the module docstring); returns where the model and metrics are."""
    cfg = config if isinstance(config, CanopyTrainConfig) else load_canopy_config(config, overrides)
    inputs = [v for p in cfg.data.pairs for k, v in p.items() if k in ("image", "chm")]
    if cfg.model.backbone and not str(cfg.model.backbone).startswith("random:"):
        inputs.append(cfg.model.backbone)
    if isinstance(config, str | os.PathLike):
        inputs.append(config)
    out = guard_output(cfg.out, inputs, folder=True, kind=CANOPY_TRAIN_KIND, role="out", adopt=("last.pt",),
                       replaces=False)
    with output_lock(out, what="canopy train"):
        make_output_folder(out, inputs, kind=CANOPY_TRAIN_KIND, role="out", adopt=("last.pt",),
                           files=("model.pt", "last.pt", "history.json", "summary.json"))
        with fair_threads():
            return _train_canopy(cfg, out, progress=progress)


#: the dinov3geo folder kind of a canopy training run
CANOPY_TRAIN_KIND = "canopy-train"


def _train_canopy(cfg: CanopyTrainConfig, out: Path, *, progress: bool) -> TrainResult:
    """:func:`train_canopy` once the output folder is checked, locked and created."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    device = resolve_device(tc.device)
    amp = resolve_amp(tc.amp, device)
    losses = [tc.loss] if isinstance(tc.loss, str) else list(tc.loss)
    cache_dtype = {"float16": torch.float16, "float32": torch.float32}[tc.cache_dtype]

    # ---- data
    pairs: list[tuple[str, dict[str, Any], ImageCHMPair, SpatialSplit]] = []
    for i, p in enumerate(cfg.data.pairs):
        name = _pair_name(p)
        try:
            pair = load_image_and_chm(p["image"], p["chm"], target_res=cfg.data.target_res, bands=cfg.data.bands,
                                      assume_crs=p.get("assume_crs"))
        except MissingCRSError as e:  # the reader's hint names CLI options that `canopy train` does not have
            raise MissingCRSError(e.path, hint=(
                f"If you know its CRS, set `assume_crs: EPSG:xxxx` in data.pairs[{i}] of the config (it applies "
                "to that pair's image and CHM), or assign one with `gdal_edit.py -a_srs EPSG:xxxx`.")) from None
        split = block_split(pair.grid.shape, block=cfg.split.block, fractions=cfg.split.fractions,
                            buffer=cfg.split.buffer, seed=cfg.split.seed)
        _write_json(split.to_dict() | {"pair": p, "grid": pair.info}, out / f"split_{name}.json")
        pairs.append((name, p, pair, split))
    bands = list(pairs[0][2].band_names)
    for name, _, pair, _ in pairs[1:]:
        if list(pair.band_names) != bands and len(pair.band_names) != len(bands):
            raise ValueError(f"pair {name!r} has bands {list(pair.band_names)}, the first pair {bands}")
    backbone = _load_backbone_for(cfg, bands).to(device)
    model = build_model(cfg, backbone).to(device)
    value_scale, mean, std = _normalisation(cfg, backbone, pairs[0][1]["image"])
    norm = (value_scale, mean, std)

    train_parts, val_parts = [], []
    for _name, _, pair, split in pairs:
        img = _normalise(pair.image, *norm)  # once per pair; the tiles are views into it
        t = _cut_tiles(pair, img, split, "train", tc.tile, tc.stride, tc.min_valid)
        v = _cut_tiles(pair, img, split, "val", tc.tile, tc.stride, tc.min_valid / 2)
        train_parts += [t] if t is not None else []
        val_parts += [v] if v is not None else []
    if not train_parts:
        raise ValueError(
            f"no training tiles of {tc.tile} px fit inside the train blocks (block {cfg.split.block}, buffer "
            f"{cfg.split.buffer}): use a smaller train.tile or a larger split.block"
        )
    train = _concat(train_parts)
    val = _concat(val_parts) if val_parts else None
    if val is None:
        log.warning("no validation tiles (split.fractions has no 'val' share, or its blocks hold no %d px tile "
                    "with %.0f %% labelled pixels): model.pt is the epoch with the lowest training loss",
                    tc.tile, 50 * tc.min_valid)
    views = 8 if tc.augment else 1
    log.info("canopy training: %d train tiles (x%d views), %d val tiles of %d px; bands %s",
             train.images.shape[0], views, 0 if val is None else val.images.shape[0], tc.tile, bands)
    if tc.cache_features:
        _cache(model, train, views, tc.batch_size, device, amp, cache_dtype, "caching train features", progress)
        if val is not None:
            _cache(model, val, 1, tc.batch_size, device, amp, cache_dtype, "caching val features", progress)
    train.views = views
    if tc.prior_init:
        init_output_prior(model, train.heights, train.valid)

    # ---- optimiser, resume
    params = [p for p in model.head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    n_items = train.images.shape[0] * views
    steps_per_epoch = max(1, math.ceil(n_items / tc.batch_size))
    total_steps = steps_per_epoch * tc.epochs
    history: list[dict[str, Any]] = []
    start_epoch, best_mae, best_epoch, best_val = 0, math.inf, -1, None
    last = out / "last.pt"
    fp = cfg.fingerprint()
    if cfg.resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        if state.get("fingerprint") == fp:
            model.head.load_state_dict(state["head"])
            opt.load_state_dict(state["optimizer"])
            start_epoch, history = int(state["epoch"]) + 1, json.loads(state["history"])
            best_mae, best_epoch = float(state["best_mae"]), int(state["best_epoch"])
            best_val = json.loads(state["best_val"]) if state.get("best_val") else None
            log.info("resuming canopy training at epoch %d from %s", start_epoch, last)
        else:
            log.warning("%s belongs to a different configuration; starting afresh", last)

    gen = torch.Generator().manual_seed(tc.seed)
    for _ in range(start_epoch):  # keep the shuffles of a resumed run identical
        torch.randperm(n_items, generator=gen)
    bar = progress_bar(total=tc.epochs, desc="canopy head", disable=not progress, initial=start_epoch)
    for epoch in range(start_epoch, tc.epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n_items, generator=gen)
        total, count = 0.0, 0
        for s in range(steps_per_epoch):
            step = epoch * steps_per_epoch + s
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total_steps, tc.warmup_epochs * steps_per_epoch, tc.lr)
            idx = perm[s * tc.batch_size:(s + 1) * tc.batch_size]
            feats, hs, vs = _batch(train, idx, device, model.dtype, model, amp)
            o = model.forward_head(feats, tuple(hs.shape[-2:]), return_logits="bin_ce" in losses)
            loss = canopy_loss(o, hs, vs, losses, model.bins, tc.silog_lambda)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        vm = _val_metrics(model, val, tc.batch_size, device, amp)
        row = {"epoch": epoch, "loss": total / max(count, 1), "lr": opt.param_groups[0]["lr"],
               "seconds": round(time.perf_counter() - t0, 3)}
        if vm is not None:
            row |= {"val_mae": vm["mae"], "val_rmse": vm["rmse"], "val_r2": vm["r2"], "val_bias": vm["bias"]}
        history.append(row)
        score = vm["mae"] if vm is not None and vm["mae"] is not None else row["loss"]
        if score < best_mae:
            best_mae, best_epoch, best_val = score, epoch, vm
            _save_model(out / "model.pt", model, cfg, bands, norm, pairs[0][2], fp)
        torch.save({"fingerprint": fp, "epoch": epoch, "head": model.head.state_dict(),
                    "optimizer": opt.state_dict(), "history": json.dumps(history), "best_mae": best_mae,
                    "best_epoch": best_epoch, "best_val": json.dumps(best_val) if best_val else ""},
                   _tmp(last))
        os.replace(_tmp(last), last)
        _write_json(history, out / "history.json")
        bar.set_postfix(loss=f"{row['loss']:.3f}", val_mae=f"{row.get('val_mae') or float('nan'):.2f}")
        bar.update(1)
    bar.close()
    if not (out / "model.pt").exists():  # resumed after the last epoch: nothing left to train
        raise RuntimeError(f"{out}: training finished earlier but model.pt is missing; delete last.pt and re-run")

    test: dict[str, dict[str, Any]] = {}
    if "test" in cfg.split.fractions:
        for name, _p, pair, split in pairs:
            test[name] = evaluate_on_split(out / "model.pt", pair, split, "test", out / f"eval_{name}",
                                           window=tc.eval_window, device=device, progress=progress)
    summary = {"best_epoch": best_epoch, "best_val": best_val, "test": test, "config": cfg.to_dict()}
    _write_json(summary, out / "summary.json")
    return TrainResult(out / "model.pt", out, best_epoch, best_val, test, history)


def _concat(parts: list[_Tiles]) -> _Tiles:
    return _Tiles(torch.cat([p.images for p in parts]), torch.cat([p.heights for p in parts]),
                  torch.cat([p.valid for p in parts]))


def _tmp(p: Path) -> Path:
    return p.with_name(p.name + ".tmp")


def _write_json(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, default=str))


def _normalisation(cfg: CanopyTrainConfig, backbone: Any, image: str) -> tuple[float, list[float] | None, list[float] | None]:
    from dinov3geo.io import open_scene
    from dinov3geo.tasks.features import normalisation_for

    dtype = open_scene(image, bands=cfg.data.bands).dtype
    vs, mean, std = normalisation_for(backbone, str(dtype))
    if cfg.data.value_scale is not None:
        vs = float(cfg.data.value_scale)
    if cfg.data.mean is not None:
        mean = list(cfg.data.mean)
    if cfg.data.std is not None:
        std = list(cfg.data.std)
    return vs, mean, std


def _save_model(path: Path, model: CanopyHeightModel, cfg: CanopyTrainConfig, bands: Sequence[str],
                norm: tuple[float, Any, Any], pair: ImageCHMPair, fp: str) -> None:
    save_canopy_model(
        path, model, bands=list(bands), mean=norm[1], std=norm[2], value_scale=norm[0],
        gsd=float(min(pair.grid.res)) if pair.grid.crs.is_projected else None,
        backbone_source=cfg.model.backbone,
        notes=f"dinov3geo canopy train; config {fp}; head {cfg.model.head}; loss {cfg.train.loss}",
    )


def evaluate_on_split(
    model_path: str | os.PathLike[str], pair: ImageCHMPair, split: SpatialSplit, name: str,
    out_dir: str | os.PathLike[str], *, window: int = 256, device: Any = "auto", progress: bool = True,
) -> dict[str, Any]:
    """Map the pair's image with the inference engine and evaluate on split ``name`` (metrics.json + plots).

    The working-grid image is written as a GeoTIFF, :func:`~dinov3geo.tasks.canopy.predict.predict_canopy`
    maps it (blended windows, height + uncertainty COG), and :func:`~dinov3geo.tasks.canopy.evaluate.evaluate_rasters`
    compares it with the labels on the split's pixels (50 px blocks after a 3 px border for the block R²).
    """
    import rasterio

    from dinov3geo.tasks.canopy.evaluate import evaluate_rasters
    from dinov3geo.tasks.canopy.predict import predict_canopy

    out = make_output_folder(out_dir, [model_path], kind="canopy-eval",
                             files=("image.tif", "labels.tif", "chm_pred.tif"))
    g = pair.grid
    profile = {"driver": "GTiff", "height": g.height, "width": g.width, "crs": g.crs, "transform": g.transform,
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    img_path, chm_path = out / "image.tif", out / "labels.tif"
    with rasterio.open(img_path, "w", count=pair.image.shape[0], dtype="float32", **profile) as ds:
        ds.write(pair.image.astype(np.float32))
        ds.descriptions = tuple(pair.band_names)
    with rasterio.open(chm_path, "w", count=1, dtype="float32", nodata=np.nan, **profile) as ds:
        ds.write(np.where(pair.valid, pair.heights, np.nan).astype(np.float32)[None])
    pred = predict_canopy(model_path, img_path, out / "chm_pred.tif", window=window, device=device,
                          progress=progress, sidecars=False)  # an evaluation map, not a product
    return evaluate_rasters(pred, chm_path, out, split_mask=split.mask(name), progress=progress,
                            title=f"{Path(out).name}: {name} blocks")
