"""Train the bi-temporal change head on a frozen backbone: ``train_change_head(config) -> checkpoint path``.

One run:

1. **Data**: every ``data.train`` entry is loaded into a :class:`~dinov3geo.tasks.change.datasets.ChangePair`;
   the validation pairs are ``data.val`` or, when that is empty, the bottom ``data.val_fraction`` of the rows of
   each training pair (a spatial hold-out; those rows are removed from training).
2. **Normalisation** (``backbone.normalization``): ``backbone`` uses the backbone metadata's mean/std on
   ``value_scale``-scaled values; ``data`` standardises each band with the mean/std of the training pixels of
   both dates; ``auto`` picks ``backbone`` when the metadata describes the pair's bands and the data fit in
   8 bits, else ``data``; or an explicit ``{value_scale, mean, std}`` mapping.
3. **Training**: random ``train.crop_size`` crops (D4 flips/rotations applied identically to both dates and the
   label; a ``train.positive_fraction`` of them placed around a random change pixel so that rare change is
   seen), BCE + Dice on labelled pixels only, AdamW, head only (the backbone is frozen). With
   ``train.cache_features`` a fixed set of ``train.crops`` augmented crops is drawn once and its backbone
   features computed once (the backbone is then never run again during training); otherwise fresh crops are
   drawn every epoch.
4. **Threshold**: the probability threshold maximising F1 on the validation pairs (whole-pair blended
   prediction), stored in the checkpoint with the validation metrics at that threshold.

The state after each epoch is written atomically to ``<output>.state.pt`` (``train.resume: true`` continues
from it); the final checkpoint (:func:`~dinov3geo.tasks.change.head.save_change_model`) is written atomically
to ``output``. Configs are YAML (``yaml.safe_load``); unknown keys are errors naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dinov3geo.models.taps import tap_widths
from dinov3geo.tasks.change.datasets import (
    ChangePair,
    ChangeSample,
    load_levir,
    load_oscd_city,
    load_raster_pair,
    load_taizhou,
    predict_pair,
    random_crops,
)
from dinov3geo.tasks.change.head import ChangeHead, ChangeModel, ChangeRasterModel, save_change_model
from dinov3geo.tasks.change.metrics import ConfusionMatrix, ThresholdSearch
from dinov3geo.tasks.change.zeroshot import check_bands, resolve_layers
from dinov3geo.utils.config import apply_overrides, from_dict
from dinov3geo.utils.threads import fair_threads, tick_threads

log = logging.getLogger("dinov3geo.change")

__all__ = ["ChangeTrainConfig", "load_change_config", "load_pairs", "train_change_head"]

DATASET_KINDS = ("oscd", "levir", "taizhou", "rasters")


# ------------------------------------------------------------------------------------------ config
@dataclass
class DataConfig:
    """``data`` section. ``train``/``val``: lists of dataset entries, each a mapping with ``kind`` (one of
    ``oscd`` {path, bands}, ``levir`` {path, names}, ``taizhou`` {path}, ``rasters`` {before, after, label,
    label_encoding, bands, nodata})."""

    train: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    val_fraction: float = 0.2
    bands: list[str] | None = None


@dataclass
class BackboneSection:
    """``backbone`` section: ``weights`` (any :func:`~dinov3geo.models.load_backbone` file; None builds ``arch``
    with random weights, for tests and controls), ``layers`` (int n or block indices), ``upscale``,
    ``normalization`` (auto | backbone | data | {value_scale, mean, std}), ``value_scale`` (for ``backbone``;
    default 1/255 for 8-bit data), ``include_in_checkpoint`` (embed the backbone weights)."""

    weights: str | None = None
    arch: str = "vit_tiny_test"
    layers: int | list[int] = 4
    upscale: int = 1
    normalization: str | dict[str, Any] = "auto"
    value_scale: float | None = None
    include_in_checkpoint: bool = True


@dataclass
class HeadSection:
    """``head`` section: ``hidden`` channels after fusion, ``detail_channels`` of the full-resolution branch."""

    hidden: int = 64
    detail_channels: int = 16


@dataclass
class TrainSection:
    """``train`` section (see the module docstring)."""

    crop_size: int = 128
    crops: int = 256
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    pos_weight: float | None = None
    cache_features: bool = True
    augment: bool = True
    min_valid: float = 0.25
    positive_fraction: float = 0.5
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    progress_bar: bool = True
    resume: bool = False
    val_window: int = 256
    val_overlap: int | None = None


@dataclass
class ChangeTrainConfig:
    """The whole config: ``output`` (checkpoint path) and the sections above."""

    output: str = "change_head.pt"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneSection = field(default_factory=BackboneSection)
    head: HeadSection = field(default_factory=HeadSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        """Primitive-typed dict of the config."""
        return dataclasses.asdict(self)


_ENTRY_KEYS = {
    "oscd": {"kind", "path", "bands", "name"},
    "levir": {"kind", "path", "names"},
    "taizhou": {"kind", "path"},
    "rasters": {"kind", "before", "after", "label", "label_encoding", "bands", "nodata", "name"},
}


def _check_entries(entries: Any, where: str) -> list[dict[str, Any]]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ValueError(f"config key {where!r} must be a list of dataset entries")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping) or "kind" not in e:
            raise ValueError(f"{where}[{i}] must be a mapping with a 'kind' ({', '.join(DATASET_KINDS)})")
        kind = e["kind"]
        if kind not in _ENTRY_KEYS:
            raise ValueError(f"{where}[{i}].kind {kind!r} is unknown; use one of {list(DATASET_KINDS)}")
        bad = set(e) - _ENTRY_KEYS[kind]
        if bad:
            raise ValueError(f"unknown config key {where}[{i}].{sorted(bad)[0]!r} for kind {kind!r}; "
                             f"known: {sorted(_ENTRY_KEYS[kind])}")
        out.append(dict(e))
    return out


def load_change_config(source: str | os.PathLike[str] | Mapping[str, Any] | ChangeTrainConfig,
                       overrides: Sequence[str] = ()) -> ChangeTrainConfig:
    """Config from a YAML file, a dict or a config object; ``overrides`` are ``section.key=value`` strings
    (the value parsed as YAML). Unknown keys raise ``ValueError`` naming the key."""
    if isinstance(source, ChangeTrainConfig):
        raw: Any = source.to_dict()
        base = None
    elif isinstance(source, Mapping):
        raw, base = dict(source), None
    else:
        base = Path(source)
        if not base.is_file():
            raise FileNotFoundError(f"change-training config {base} does not exist")
        from dinov3geo.utils.config import load_yaml

        raw = load_yaml(base, "change-training config") or {}
        if not isinstance(raw, Mapping):
            raise ValueError(f"{base}: the config must be a YAML mapping")
    raw = apply_overrides(copy.deepcopy(dict(raw)), overrides)
    try:
        cfg = from_dict(ChangeTrainConfig, raw)
    except ValueError as e:
        raise ValueError(f"{base}: {e}" if base else str(e)) from None
    cfg.data.train = _check_entries(cfg.data.train, "data.train")
    cfg.data.val = _check_entries(cfg.data.val, "data.val")
    if not cfg.data.train:
        raise ValueError("config key 'data.train' is empty: give at least one training dataset")
    if base is not None:  # relative paths are relative to the config file
        root = base.parent
        for e in cfg.data.train + cfg.data.val:
            for k in ("path", "before", "after", "label"):
                if isinstance(e.get(k), str) and not os.path.isabs(e[k]):
                    e[k] = str(root / e[k])
        if cfg.backbone.weights and not os.path.isabs(cfg.backbone.weights):
            cfg.backbone.weights = str(root / cfg.backbone.weights)
        if not os.path.isabs(cfg.output):
            cfg.output = str(root / cfg.output)
    t = cfg.train
    if t.crop_size <= 0 or t.crops <= 0 or t.epochs <= 0 or t.batch_size <= 0:
        raise ValueError("train.crop_size, train.crops, train.epochs and train.batch_size must be positive")
    if not 0 < cfg.data.val_fraction < 1:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    return cfg


# ------------------------------------------------------------------------------------------ data
def load_pairs(entries: Sequence[Mapping[str, Any]], bands: Sequence[str] | None = None) -> list[ChangePair]:
    """Load the dataset entries of a config (see :class:`DataConfig`)."""
    pairs: list[ChangePair] = []
    for e in entries:
        kind = e["kind"]
        sel = e.get("bands", bands)
        if kind == "oscd":
            pairs.append(load_oscd_city(e["path"], bands=sel))
        elif kind == "levir":
            pairs.extend(load_levir(e["path"], e.get("names")))
        elif kind == "taizhou":
            pairs.append(load_taizhou(e["path"]))
        else:
            pairs.append(load_raster_pair(e["before"], e["after"], e.get("label"),
                                          label_encoding=e.get("label_encoding", "auto"), bands=sel,
                                          nodata=e.get("nodata"), name=e.get("name")))
    names = {p.band_names for p in pairs}
    if len({len(n) for n in names}) > 1:
        raise ValueError(f"the datasets have different band counts: {sorted(names)}; select common bands "
                         "(data.bands)")
    return pairs


def _normalisation(cfg: ChangeTrainConfig, backbone: Any, pairs: Sequence[ChangePair]
                   ) -> tuple[float, list[float] | None, list[float] | None, str]:
    norm = cfg.backbone.normalization
    c = pairs[0].before.shape[0]
    if isinstance(norm, Mapping):
        bad = set(norm) - {"value_scale", "mean", "std"}
        if bad:
            raise ValueError(f"unknown config key 'backbone.normalization.{sorted(bad)[0]}'")
        return float(norm.get("value_scale", 1.0)), norm.get("mean"), norm.get("std"), "explicit"
    if norm not in ("auto", "backbone", "data"):
        raise ValueError(f"backbone.normalization must be auto, backbone, data or a mapping, got {norm!r}")
    meta = getattr(backbone, "metadata", None)
    has_meta = meta is not None and meta.mean is not None and len(meta.mean) == c
    eight_bit = max(float(max(p.before.max(), p.after.max())) for p in pairs) <= 255.0
    if norm == "backbone" or (norm == "auto" and has_meta and eight_bit):
        if not has_meta:
            raise ValueError(f"backbone.normalization is 'backbone' but the backbone metadata has no mean/std "
                             f"for {c} bands; use 'data'")
        vs = cfg.backbone.value_scale if cfg.backbone.value_scale is not None else (1 / 255 if eight_bit else 1.0)
        return vs, list(meta.mean), list(meta.std), "backbone"
    vs = cfg.backbone.value_scale if cfg.backbone.value_scale is not None else 1.0
    s = np.zeros(c, np.float64)
    s2 = np.zeros(c, np.float64)
    n = 0
    for p in pairs:
        m = p.image_valid
        for img in (p.before, p.after):
            v = img[:, m].astype(np.float64) * vs
            s += v.sum(1)
            s2 += (v * v).sum(1)
            n += v.shape[1]
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean**2, 1e-12))
    return vs, mean.tolist(), np.maximum(std, 1e-6).tolist(), "data"


def _to_tensor(samples: Sequence[ChangeSample], vs: float, mean: Tensor | None, std: Tensor | None
               ) -> tuple[Tensor, Tensor, Tensor]:
    x = torch.from_numpy(np.stack([np.concatenate([s.before, s.after]) for s in samples])) * vs
    if mean is not None:
        x = x - mean
    if std is not None:
        x = x / std
    y = torch.from_numpy(np.stack([s.label for s in samples])).float().unsqueeze(1)
    v = torch.from_numpy(np.stack([s.valid for s in samples])).unsqueeze(1)
    return x.float(), y, v


def bce_dice_loss(logits: Tensor, target: Tensor, valid: Tensor, bce_weight: float = 1.0, dice_weight: float = 1.0,
                  pos_weight: float | None = None) -> Tensor:
    """BCE (mean over labelled pixels) + soft Dice of the change class (over the batch's labelled pixels)."""
    v = valid.float()
    n = v.sum().clamp_min(1.0)
    pw = None if pos_weight is None else torch.tensor(float(pos_weight), device=logits.device)
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pw) * v).sum() / n
    p = torch.sigmoid(logits) * v
    t = target * v
    dice = 1.0 - (2.0 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0)
    return bce_weight * bce + dice_weight * dice


# ------------------------------------------------------------------------------------------ training
def _build_backbone(cfg: ChangeTrainConfig, bands: Sequence[str]) -> tuple[Any, list[str] | None]:
    from dinov3geo.models import build_backbone, load_backbone

    c = len(bands)
    if cfg.backbone.weights:
        bb = load_backbone(cfg.backbone.weights)
    else:
        log.warning("backbone.weights is not set: using a randomly initialised %s (only for tests/controls)",
                    cfg.backbone.arch)
        bb = build_backbone(cfg.backbone.arch, in_chans=c).eval()
    widened = None
    if int(bb.patch_embed.proj.in_channels) != c:
        bb = check_bands(bb, c, list(bands))
        widened = list(bands)
    return bb.eval(), widened


def _state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state.pt")


def train_change_head(config: str | os.PathLike[str] | Mapping[str, Any] | ChangeTrainConfig,
                      overrides: Sequence[str] = ()) -> Path:
    """Train a change head (see the module docstring) and return the checkpoint path."""
    from dinov3geo.utils.atomic import check_writable
    from dinov3geo.utils.locks import output_lock
    from dinov3geo.utils.outputs import guard_output

    cfg = load_change_config(config, overrides)
    inputs: list[Any] = [v for p in [*cfg.data.train, *cfg.data.val] for v in p.values()
                         if isinstance(v, str | os.PathLike)]
    if cfg.backbone.weights:
        inputs.append(cfg.backbone.weights)
    if isinstance(config, str | os.PathLike):
        inputs.append(config)
    out = guard_output(cfg.output, inputs, role="output")
    guard_output(_state_path(out), inputs, role="training state")
    with output_lock(out, what="change train"), fair_threads(fixed=cfg.train.threads or None):
        return _train_change_head(cfg, check_writable(out))


def _train_change_head(cfg: ChangeTrainConfig, out: Path) -> Path:
    """:func:`train_change_head` once the output is checked and locked."""
    from dinov3geo.utils.atomic import atomic_path
    from dinov3geo.utils.progress import progress_bar

    t = cfg.train
    torch.manual_seed(t.seed)
    device = torch.device(t.device)
    t0 = time.perf_counter()

    pairs = load_pairs(cfg.data.train, cfg.data.bands)
    if cfg.data.val:
        train_pairs, val_pairs = pairs, load_pairs(cfg.data.val, cfg.data.bands)
    else:
        split = [p.split_rows(cfg.data.val_fraction) for p in pairs]
        train_pairs, val_pairs = [s[0] for s in split], [s[1] for s in split]
    bands = list(train_pairs[0].band_names)
    c = len(bands)
    backbone, widened = _build_backbone(cfg, bands)
    layers = resolve_layers(backbone, cfg.backbone.layers)
    stride = int(backbone.patch_size) // int(cfg.backbone.upscale)
    if t.crop_size % stride:
        raise ValueError(f"train.crop_size {t.crop_size} must be a multiple of the patch stride {stride} "
                         f"(patch {backbone.patch_size} / upscale {cfg.backbone.upscale})")
    widths = tap_widths(backbone, layers)  # embed_dim per ViT block; one width per ConvNeXt stage
    head = ChangeHead(widths[0] if len(set(widths)) == 1 else widths, len(layers), stride, c, cfg.head.hidden,
                      cfg.head.detail_channels)
    model = ChangeModel(backbone, head, layers, cfg.backbone.upscale).to(device)
    vs, mean, std, norm_kind = _normalisation(cfg, backbone, train_pairs)
    mean_t = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1).repeat(1, 2, 1, 1)
    std_t = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1).repeat(1, 2, 1, 1)
    log.info("change head: %d train / %d val pairs, %d bands, layers %s, stride %d, normalisation %s",
             len(train_pairs), len(val_pairs), c, layers, stride, norm_kind)

    opt = torch.optim.AdamW(head.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    steps_per_epoch = math.ceil(t.crops / t.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t.lr, total_steps=steps_per_epoch * t.epochs,
                                                pct_start=0.1, anneal_strategy="cos")
    history: list[float] = []
    start_epoch = 0
    state_file = _state_path(out)
    if t.resume and state_file.exists():
        try:
            st = torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds
            from dinov3geo.models.checkpoint import describe_load_error

            raise ValueError(f"cannot resume the change-head training: {describe_load_error(state_file, e)}; "
                             "delete it (or set train.resume: false) to start over") from e
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        history = [float(v) for v in st["history"]]
        start_epoch = int(st["epoch"])
        log.info("resumed from %s at epoch %d", state_file, start_epoch)

    cache: list[tuple[list[Tensor], list[Tensor], Tensor, Tensor, Tensor]] | None = None
    t_feat = 0.0

    def batches(samples: list[ChangeSample]) -> list[tuple[Tensor, Tensor, Tensor]]:
        return [_to_tensor(samples[i:i + t.batch_size], vs, mean_t, std_t) for i in range(0, len(samples), t.batch_size)]

    if t.cache_features and start_epoch < t.epochs:
        tf = time.perf_counter()
        fixed = random_crops(train_pairs, t.crop_size, t.crops, np.random.default_rng(t.seed), augment=t.augment,
                             min_valid=t.min_valid, positive_fraction=t.positive_fraction)
        cache = []
        for x, y, v in batches(fixed):
            tick_threads()
            x = x.to(device)
            f1, f2 = model.features(x)
            for i in range(x.shape[0]):
                cache.append(([f[i:i + 1] for f in f1], [f[i:i + 1] for f in f2], x[i:i + 1], y[i:i + 1].to(device),
                              v[i:i + 1].to(device)))
        t_feat = time.perf_counter() - tf
        log.info("cached backbone features of %d crops in %.1f s", len(cache), t_feat)

    bar = progress_bar(total=(t.epochs - start_epoch) * steps_per_epoch, desc="change head",
                       disable=not t.progress_bar)
    model.train()
    for epoch in range(start_epoch, t.epochs):
        rng = np.random.default_rng([t.seed, epoch])
        losses = []
        if cache is not None:
            order = rng.permutation(len(cache))
            groups = [order[i:i + t.batch_size] for i in range(0, len(order), t.batch_size)]
            iterator: Any = (
                ([torch.cat([cache[j][0][k] for j in g]) for k in range(len(layers))],
                 [torch.cat([cache[j][1][k] for j in g]) for k in range(len(layers))],
                 torch.cat([cache[j][2] for j in g]), torch.cat([cache[j][3] for j in g]),
                 torch.cat([cache[j][4] for j in g]))
                for g in groups)
        else:
            fresh = random_crops(train_pairs, t.crop_size, t.crops, rng, augment=t.augment, min_valid=t.min_valid,
                                 positive_fraction=t.positive_fraction)

            def _gen(fresh: list[ChangeSample] = fresh) -> Any:
                for x, y, v in batches(fresh):
                    x = x.to(device)
                    f1, f2 = model.features(x)
                    yield f1, f2, x, y.to(device), v.to(device)

            iterator = _gen()
        for f1, f2, x, y, v in iterator:
            tick_threads()
            logits = model.head_forward(f1, f2, x)
            loss = bce_dice_loss(logits, y, v, t.bce_weight, t.dice_weight, t.pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
        history.append(float(np.mean(losses)) if losses else float("nan"))
        log.info("epoch %d/%d: loss %.4f", epoch + 1, t.epochs, history[-1])
        state = {"head": head.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "history": history, "epoch": epoch + 1}
        with atomic_path(state_file) as tmp:
            torch.save(state, tmp)
    bar.close()
    model.eval()
    t_train = time.perf_counter() - t0

    # threshold on validation
    rmodel = ChangeRasterModel(model, value_scale=vs, mean=mean, std=std, bands=bands)
    search = ThresholdSearch(1000)
    probs = []
    for p in val_pairs:
        prob = predict_pair(rmodel, p, window=t.val_window, overlap=t.val_overlap, device=str(device))
        probs.append(prob)
        search.update(prob, p.label, p.valid & np.isfinite(prob))
    val_info: dict[str, Any] = {"pairs": [p.name for p in val_pairs]}
    try:
        threshold, best_f1 = search.best("f1")
        cm = ConfusionMatrix()
        for p, prob in zip(val_pairs, probs, strict=True):
            ok = p.valid & np.isfinite(prob)
            cm.update(np.nan_to_num(prob) >= threshold, p.label, ok)
        val_info.update({"f1_search": best_f1, **cm.compute()})
    except ValueError as e:
        threshold = 0.5
        log.warning("%s: using threshold 0.5", e)
        val_info["note"] = str(e)
    train_info = {
        "config": cfg.to_dict(), "loss_history": history, "normalization_kind": norm_kind,
        "train_pairs": [p.name for p in train_pairs], "validation": val_info,
        "seconds": {"total_training": t_train, "feature_cache": t_feat}, "dinov3geo_version": _version(),
    }
    save_change_model(model, out, bands=bands, value_scale=vs, mean=mean, std=std, threshold=threshold,
                      backbone_source=cfg.backbone.weights, backbone_bands=widened,
                      include_backbone=cfg.backbone.include_in_checkpoint or not cfg.backbone.weights,
                      train_info=train_info)
    state_file.unlink(missing_ok=True)
    log.info("saved %s (threshold %.3f, validation %s)", out, threshold, val_info)
    return out


def _version() -> str:
    from dinov3geo import __version__

    return str(__version__)


# ------------------------------------------------------------------------------------------ CLI
