"""Land-cover heads on a frozen DINOv3 backbone, the model that joins them, and its checkpoint.

Heads take the tapped backbone levels as patch maps ``[B, C_l, h, w]`` (``get_intermediate_layers(...,
reshape=True, norm=True)``, so a ConvNeXt with ``patch_size=16`` works as well as a ViT) and return class
logits ``[B, K, 16 h, 16 w]`` (input resolution):

* ``"linear"`` (:class:`LinearHead`): the DINOv3 paper's linear segmentation protocol: patch features of the
  last layer, bilinearly upsampled to the label resolution, one linear classifier per pixel, no BatchNorm. The
  classifier is applied at patch resolution and its logits are upsampled: bilinear interpolation is linear with
  weights summing to one, so this equals upsampling the features first (a test checks it) at 1/256 of the cost.
* ``"dense"`` (:class:`DenseHead`): a light dense head: 4 tapped layers, a 1x1 projection of each, their sum,
  ``log2(patch)`` learned x2 upsampling stages (transposed conv + 3x3 conv) to input resolution, and optionally
  a full-resolution **image detail** branch (two 3x3 convs on the normalised image pixels, concatenated
  before the classifier). With ``image_detail=True`` the head **uses full-resolution image pixels** directly,
  not only DINOv3 features; this is recorded in the checkpoint and printed in reports.

:class:`LandcoverModel` = frozen backbone + head + class table: it centre-pads inputs to a multiple of the patch
size and crops the logits back, so outputs are at input size (:meth:`LandcoverModel.forward_features` /
:meth:`LandcoverModel.forward_head` split backbone and head so training can cache features).
Without gradients the dense head's full-resolution part (upsampling stages, image detail, classifier) runs one
sample at a time (:attr:`DenseHead.per_sample`; the logits equal the batched ones up to float32 rounding);
:meth:`LandcoverModel.memory_estimate` gives the working memory of a batch of windows, from which
:func:`dinov3geo.inference.batching.choose_batch_size` picks the default batch size (``benchmarks/head_memory.py``).

:func:`save_landcover_model` / :func:`load_landcover_model` write/read one ``torch.load(weights_only=True)``
file::

    {"format": "dinov3geo.landcover", "version": 1,
     "head": {"kind": "linear" | "dense", ...config, "state_dict": {...}},
     "layers": [tapped levels], "classes": [{"code", "name", "color"}, ...],
     "backbone": {"arch", "family", "config", "sha256", "source", "state_dict"},
     "metadata": {"bands", "band_keys", "source_bands", "mean", "std", "value_scale", "gsd",
                  "uses_image_pixels", "notes", ...}}
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3geo.models import CheckpointError, load_backbone, read_checkpoint
from dinov3geo.models.layers import per_sample
from dinov3geo.models.padding import pad_to_patch_multiple
from dinov3geo.models.registry import config_from_dict
from dinov3geo.models.taps import input_multiple
from dinov3geo.tasks.canopy.chmv2 import crop_padding, default_layers
from dinov3geo.tasks.canopy.heads import _groups, _UpStage
from dinov3geo.tasks.canopy.model import backbone_sha256
from dinov3geo.tasks.landcover.classes import ClassTable
from dinov3geo.utils.atomic import atomic_path

__all__ = [
    "FORMAT",
    "HEAD_KINDS",
    "DenseHead",
    "LandcoverModel",
    "LinearHead",
    "build_head",
    "level_channels",
    "load_landcover_model",
    "save_landcover_model",
]

FORMAT = "dinov3geo.landcover"
VERSION = 1


def _as_list(in_channels: int | Sequence[int], n: int) -> list[int]:
    if isinstance(in_channels, int):
        return [int(in_channels)] * n
    ch = [int(c) for c in in_channels]
    if len(ch) != n:
        raise ValueError(f"{len(ch)} channel counts for {n} levels")
    return ch


class LinearHead(nn.Module):
    """Per-pixel linear classifier on the last ``n_levels`` patch maps (DINOv3 linear protocol, no BatchNorm).

    Args:
        in_channels: channels of each used level (an int: the same for all).
        n_classes: number of classes ``K``.
        n_levels: how many of the last levels to concatenate (1 = last layer only, the paper's protocol).
        patch_size: input pixels per patch (the upsampling factor).
    """

    uses_image = False

    def __init__(self, in_channels: int | Sequence[int], n_classes: int, n_levels: int = 1,
                 patch_size: int = 16) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
        self.n_levels = int(n_levels)
        self.in_channels = _as_list(in_channels, self.n_levels)
        self.n_classes = int(n_classes)
        self.patch_size = int(patch_size)
        self.classifier = nn.Conv2d(sum(self.in_channels), self.n_classes, 1)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (primitive types), for checkpoints."""
        return {"in_channels": list(self.in_channels), "n_classes": self.n_classes, "n_levels": self.n_levels,
                "patch_size": self.patch_size}

    def forward(self, features: Sequence[Tensor], image: Tensor | None = None) -> Tensor:
        """``[B, K, patch h, patch w]`` logits (``image`` is not used)."""
        maps = list(features[-self.n_levels:])
        x = maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)
        y = self.classifier(x)
        h, w = y.shape[-2:]
        return F.interpolate(y, size=(h * self.patch_size, w * self.patch_size), mode="bilinear",
                             align_corners=False)


class DenseHead(nn.Module):
    """Light dense head: multi-layer taps, 1x1 projections, learned upsampling, optional image detail.

    Args:
        in_channels: channels of each level (an int: the same for all, as in a ViT).
        n_classes: number of classes ``K``.
        n_levels: tapped levels used (the last ``n_levels`` given).
        hidden: channels after the projections (halved per upsampling stage, not below ``min_channels``).
        patch_size: upsampling factor (a power of two).
        image_detail: add the full-resolution image branch (the head then uses image pixels directly).
        in_bands: image bands (needed with ``image_detail``).
        detail_channels: channels of the image branch.
        min_channels: floor of the stage widths.
    """

    def __init__(self, in_channels: int | Sequence[int], n_classes: int, n_levels: int = 4, hidden: int = 64,
                 patch_size: int = 16, image_detail: bool = False, in_bands: int | None = None,
                 detail_channels: int = 16, min_channels: int = 16) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
        stages = math.log2(patch_size)
        if patch_size < 1 or not stages.is_integer():
            raise ValueError(f"patch_size must be a power of two, got {patch_size}")
        if image_detail and not in_bands:
            raise ValueError("image_detail needs in_bands (the number of image bands)")
        self.n_levels = int(n_levels)
        self.in_channels = _as_list(in_channels, self.n_levels)
        self.n_classes = int(n_classes)
        self.hidden = int(hidden)
        self.patch_size = int(patch_size)
        self.image_detail = bool(image_detail)
        self.in_bands = int(in_bands) if in_bands else None
        self.detail_channels = int(detail_channels)
        self.min_channels = int(min_channels)
        self.project = nn.ModuleList(nn.Conv2d(c, self.hidden, 1) for c in self.in_channels)
        self.norm = nn.GroupNorm(_groups(self.hidden), self.hidden)
        ups, c = [], self.hidden
        for _ in range(int(stages)):
            c_out = max(c // 2, self.min_channels)
            ups.append(_UpStage(c, c_out))
            c = c_out
        self.upsample = nn.Sequential(*ups)
        if self.image_detail:
            d = self.detail_channels
            self.detail = nn.Sequential(nn.Conv2d(int(self.in_bands or 0), d, 3, padding=1), nn.GELU(),
                                        nn.Conv2d(d, d, 3, padding=1), nn.GELU())
            self.fuse = nn.Sequential(nn.Conv2d(c + d, c, 3, padding=1), nn.GELU())
        self.classifier = nn.Conv2d(c, self.n_classes, 1)

    @property
    def uses_image(self) -> bool:
        """Whether the head reads full-resolution image pixels (the detail branch)."""
        return self.image_detail

    def config(self) -> dict[str, Any]:
        """Constructor arguments (primitive types), for checkpoints."""
        return {"in_channels": list(self.in_channels), "n_classes": self.n_classes, "n_levels": self.n_levels,
                "hidden": self.hidden, "patch_size": self.patch_size, "image_detail": self.image_detail,
                "in_bands": self.in_bands, "detail_channels": self.detail_channels,
                "min_channels": self.min_channels}

    #: without gradients, run the upsampling stages, the image branch and the classifier one sample at a time
    #: (their maps at input resolution are then not batch-sized; GroupNorm is per sample, so the result is the
    #: batched one up to float rounding). Training (gradients recorded) always runs the whole batch.
    per_sample: bool = True

    def forward(self, features: Sequence[Tensor], image: Tensor | None = None) -> Tensor:
        """``[B, K, patch h, patch w]`` logits; ``image`` (normalised, padded to the feature grid) is needed
        with ``image_detail``."""
        maps = list(features[-self.n_levels:])
        x = F.gelu(self.norm(sum(p(m) for p, m in zip(self.project, maps, strict=True))))
        if self.image_detail:
            if image is None:
                raise ValueError("this dense head uses the image (image_detail=True): pass it")
            up = (x.shape[-2] * self.patch_size, x.shape[-1] * self.patch_size)
            if tuple(image.shape[-2:]) != up:
                raise ValueError(f"image {tuple(image.shape[-2:])} does not match the upsampled grid {up}")
        if self.per_sample:
            return per_sample(self._full_resolution, x, image)
        return self._full_resolution(x, image)

    def _full_resolution(self, x: Tensor, image: Tensor | None) -> Tensor:
        """Upsampling stages, image branch and classifier: projected patch-grid maps -> logits (``image`` checked
        by :meth:`forward`)."""
        x = self.upsample(x)
        if self.image_detail:
            assert image is not None
            x = self.fuse(torch.cat([x, self.detail(image.to(x.dtype))], dim=1))
        return self.classifier(x)

    def full_resolution_maps(self) -> int:
        """About how many single-channel input-resolution maps one sample's upsampling, image branch and
        classifier keep alive at their peak (for memory estimates)."""
        c = self.upsample[-1].conv.out_channels if len(self.upsample) else self.hidden
        d = self.detail_channels if self.image_detail else 0
        return 2 * (c + d) + (3 * int(self.in_bands or 0) if self.image_detail else 0) + 2 * self.n_classes


HEAD_KINDS: dict[str, type[nn.Module]] = {"linear": LinearHead, "dense": DenseHead}


def head_kind(head: nn.Module) -> str:
    """``"linear"`` or ``"dense"``."""
    for name, cls in HEAD_KINDS.items():
        if isinstance(head, cls):
            return name
    raise TypeError(f"unknown head type {type(head).__name__}; expected one of {sorted(HEAD_KINDS)}")


def build_head(kind: str, **config: Any) -> nn.Module:
    """A head of ``kind`` from its ``config()`` arguments (unknown arguments: ``ValueError`` naming them)."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; choose one of {sorted(HEAD_KINDS)}")
    cls = HEAD_KINDS[kind]
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    bad = sorted(set(config) - params)
    if bad:
        raise ValueError(f"unknown {kind} head option(s) {bad}; known: {sorted(params)}")
    return cls(**config)


def level_channels(backbone: nn.Module, layers: Sequence[int]) -> list[int]:
    """Channels of the tapped ``layers`` (a ViT: ``embed_dim`` each; a ConvNeXt: its stage widths)."""
    dims = getattr(backbone, "embed_dims", None)
    if dims is not None:
        return [int(dims[i]) for i in layers]
    return [int(backbone.embed_dim)] * len(layers)


def default_taps(backbone: nn.Module, n: int) -> list[int]:
    """``n`` evenly spaced tapped levels ending at the last (repeats for shallow backbones)."""
    depth = len(backbone.blocks)
    if depth >= n:
        return default_layers(depth, n)
    return [round(i * (depth - 1) / max(n - 1, 1)) for i in range(n)]


class LandcoverModel(nn.Module):
    """Frozen backbone + land-cover head + class table.

    Args:
        backbone: a DINOv3 ViT or ConvNeXt (``get_intermediate_layers``; ``patch_size`` set).
        head: a :class:`LinearHead` or :class:`DenseHead` (``n_classes == len(table)``).
        table: the classes (output index ``i`` = ``table[i]``).
        layers: tapped levels (default: the last for a linear head, 4 evenly spaced for a dense head).
        metadata: bands, normalisation... (see the module docstring).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, table: ClassTable,
                 layers: Sequence[int] | None = None, metadata: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.table = table
        if int(head.n_classes) != len(table):
            raise ValueError(f"the head has {head.n_classes} outputs but the class table {len(table)} classes")
        n = int(head.n_levels)
        depth = len(backbone.blocks)
        if layers is None:
            layers = [depth - 1] if n == 1 else default_taps(backbone, n)
        self.layers = [int(i) % depth for i in layers]
        if len(self.layers) < n:
            raise ValueError(f"the head takes {n} levels but only layers {self.layers} are tapped")
        if level_channels(backbone, self.layers)[-n:] != list(head.in_channels):
            raise ValueError(f"head takes channels {head.in_channels}, the tapped layers give "
                             f"{level_channels(backbone, self.layers)[-n:]}")
        ps = getattr(backbone, "patch_size", None)
        if not ps:
            raise ValueError("the backbone has no patch_size (a ConvNeXt needs patch_size=16)")
        self.patch_size = int(ps)
        # sides are padded to a multiple at which the feature grid is exact: the patch for a ViT, 32 (the total
        # stride) for a ConvNeXt, whose stage grids are otherwise truncated and stretched
        self.multiple = input_multiple(backbone)
        backbone.requires_grad_(False)
        backbone.eval()
        self.metadata: dict[str, Any] = dict(metadata or {})

    def train(self, mode: bool = True) -> LandcoverModel:
        """Train mode for the head; the frozen backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the head's weights."""
        return next(self.head.parameters()).dtype

    @property
    def uses_image(self) -> bool:
        """Whether the head reads the image pixels directly (dense head with image detail)."""
        return bool(getattr(self.head, "uses_image", False))

    def pad(self, x: Tensor) -> Tensor:
        """Centre-pad ``x`` to a multiple of :attr:`multiple` (patch size; 32 for a ConvNeXt)."""
        return pad_to_patch_multiple(x, self.multiple)

    @torch.no_grad()
    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Pad and run the frozen backbone: one ``[B, C, h, w]`` patch map per tapped layer."""
        x = self.pad(x)
        unique = sorted(set(self.layers))
        out = self.backbone.get_intermediate_layers(x, n=unique, reshape=True, norm=True)
        by_layer = dict(zip(unique, out, strict=True))
        return [by_layer[i] for i in self.layers]

    def forward_head(self, features: Sequence[Tensor], out_hw: tuple[int, int], image: Tensor | None = None) -> Tensor:
        """Logits ``[B, K, H, W]`` at input size from (cached) features of an ``out_hw`` input.

        ``image``: the normalised (unpadded) input, needed when the head uses image pixels.
        """
        feats = [f.to(self.dtype) for f in features]
        img = self.pad(image.to(self.dtype)) if (image is not None and self.uses_image) else None
        y = self.head(feats, img)
        return crop_padding(y, (int(out_hw[0]), int(out_hw[1])), self.multiple)

    def memory_estimate(self, window: int, batch: int = 1, itemsize: int | None = None) -> int:
        """Estimated peak working memory (bytes, weights excluded) of one inference call on ``batch`` windows.

        For ``window`` x ``window`` px inputs padded to :attr:`multiple`: per window the input (raw,
        normalised, padded: ``3 x C`` maps), the backbone's activations
        (:func:`~dinov3geo.inference.batching.backbone_window_elements`), the head's maps at the patch grid and
        ``3 x K`` class maps (logits, their crop, the probabilities); a dense head's maps at input resolution
        (:meth:`DenseHead.full_resolution_maps`) once when it runs per sample (:attr:`DenseHead.per_sample`),
        else per window. ``itemsize`` defaults to the head's.
        Checked against measured peak RSS growth by ``benchmarks/head_memory.py``.
        """
        from dinov3geo.inference.batching import backbone_window_elements

        if window < 1 or batch < 1:
            raise ValueError(f"window and batch must be positive, got {window}, {batch}")
        item = int(itemsize or torch.empty((), dtype=self.dtype).element_size())
        side = -(-int(window) // self.multiple) * self.multiple
        px = side * side
        grid = px // self.patch_size**2
        head = self.head
        k = int(head.n_classes)
        per_window = 3 * int(self.backbone.config.in_chans) * px + 3 * k * px
        per_window += backbone_window_elements(self.backbone, side, self.layers)
        per_window += (sum(head.in_channels) + 2 * int(getattr(head, "hidden", k))) * grid
        once = 0
        if isinstance(head, DenseHead):
            full = head.full_resolution_maps() * px
            if head.per_sample:
                once = full
            else:
                per_window += full
        return int((per_window * batch + once) * item)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[B, K, H, W]`` of normalised images ``[B, C, H, W]``."""
        if x.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got {tuple(x.shape)}")
        return self.forward_head(self.forward_features(x), (x.shape[-2], x.shape[-1]), x)


# ---------------------------------------------------------------------------------------------- checkpoints
_META_KEYS = {"bands", "band_keys", "source_bands", "mean", "std", "value_scale", "gsd", "uses_image_pixels",
              "notes", "class_weights", "labels", "image", "trained"}


def save_landcover_model(path: str | os.PathLike[str], model: LandcoverModel, *, bands: Sequence[str],
                         mean: Sequence[float] | None, std: Sequence[float] | None, value_scale: float = 1.0,
                         gsd: float | None = None, backbone_source: str | None = None,
                         extra: Mapping[str, Any] | None = None) -> Path:
    """Write a land-cover model checkpoint atomically (layout in the module docstring).

    Args:
        path: output file.
        model: the model.
        bands: input band names in channel order.
        mean, std, value_scale: normalisation ``(x * value_scale - mean) / std``.
        gsd: ground sample distance of the training image (metres), when known.
        backbone_source: where the backbone came from (a file, ``random:<arch>``).
        extra: more metadata (``band_keys``, ``source_bands``, ``notes``, ``class_weights``...).
    """
    cfg = model.backbone.config
    if len(bands) != int(cfg.in_chans):
        raise ValueError(f"{len(bands)} band names {list(bands)} for a backbone with {cfg.in_chans} input channels")
    meta: dict[str, Any] = {"bands": [str(b) for b in bands],
                            "mean": None if mean is None else [float(v) for v in mean],
                            "std": None if std is None else [float(v) for v in std],
                            "value_scale": float(value_scale), "gsd": None if gsd is None else float(gsd),
                            "uses_image_pixels": model.uses_image}
    for k, v in (extra or {}).items():
        if k not in _META_KEYS:
            raise ValueError(f"unknown metadata key {k!r}; known: {sorted(_META_KEYS)}")
        meta[k] = v

    def plain(m: nn.Module) -> dict[str, Tensor]:
        return {k: v.detach().cpu().contiguous().clone() for k, v in m.state_dict().items()}

    payload = {
        "format": FORMAT,
        "version": VERSION,
        "head": {"kind": head_kind(model.head), **model.head.config(), "state_dict": plain(model.head)},
        "layers": [int(i) for i in model.layers],
        "classes": model.table.to_dict(),
        "backbone": {"arch": getattr(model.backbone, "arch_name", None), "config": cfg.to_dict(),
                     "family": getattr(cfg, "family", "vit"), "sha256": backbone_sha256(model.backbone),
                     "source": backbone_source, "state_dict": plain(model.backbone)},
        "metadata": meta,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_landcover_model(path: str | os.PathLike[str], *, device: torch.device | str = "cpu"
                         ) -> tuple[LandcoverModel, dict[str, Any]]:
    """Read a :func:`save_landcover_model` file (``torch.load(weights_only=True)``): ``(model in eval mode,
    info)`` where ``info`` is the metadata plus ``head``, ``layers``, ``classes``, ``backbone``.

    Raises:
        CheckpointError: not a land-cover model, unsupported version, incomplete or inconsistent file.
    """
    what = os.fspath(path)
    obj = read_checkpoint(path)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{what} is not a dinov3geo land-cover model (format {FORMAT!r}); train one with "
                              "`dinov3geo landcover train`")
    if not isinstance(obj.get("version"), int) or obj["version"] > VERSION:
        raise CheckpointError(f"{what}: unsupported land-cover checkpoint version {obj.get('version')!r} "
                              f"(this is v{VERSION})")
    missing = [k for k in ("head", "layers", "classes", "backbone", "metadata") if k not in obj]
    if missing:
        raise CheckpointError(f"{what}: incomplete land-cover checkpoint", missing=missing)
    b = obj["backbone"]
    if b.get("state_dict") is None:
        raise CheckpointError(f"{what}: the file holds no backbone weights")
    cfg = config_from_dict(dict(b["config"]))
    bb = load_backbone(b["state_dict"], arch=cfg)
    if backbone_sha256(bb) != b.get("sha256"):
        raise CheckpointError(f"{what}: the backbone weights do not match their recorded sha256 (damaged file?)")
    hmeta = dict(obj["head"])
    h_sd = hmeta.pop("state_dict", None)
    kind = hmeta.pop("kind", None)
    if not isinstance(h_sd, Mapping) or kind is None:
        raise CheckpointError(f"{what}: head entry without kind/state_dict", missing=["head.kind", "head.state_dict"])
    try:
        head = build_head(kind, **hmeta)
        head.load_state_dict(dict(h_sd), strict=True)
        table = ClassTable.from_json(list(obj["classes"]))
        model = LandcoverModel(bb, head, table, obj["layers"], metadata=dict(obj["metadata"]))
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{what}: {e}") from e
    model = model.to(device).eval()
    info = {**dict(obj["metadata"]), "head": {"kind": kind, **hmeta}, "layers": list(obj["layers"]),
            "classes": list(obj["classes"]), "backbone": {k: b.get(k) for k in ("arch", "family", "sha256", "source")}}
    return model, info
