"""Canopy-height model = frozen DINOv3 backbone + head (+ height bins) + metadata; checkpoints; raster adapter.

:class:`CanopyHeightModel` takes normalised images ``[B, C, H, W]`` of any size, centre-pads them (zeros, as
Meta's ``CenterPadding``) to a multiple of 32 for the DPT head or of the patch size (16) for the light head so
that the head's output grid equals the padded input pixel for pixel, and crops the padding back off: outputs
are at input size and georeferenced like the input. :meth:`CanopyHeightModel.forward_features` /
:meth:`CanopyHeightModel.forward_head` split the frozen backbone from the head so features can be cached.

:func:`save_canopy_model` / :func:`load_canopy_model` write/read one ``torch.load(weights_only=True)`` file::

    {"format": "dinov3geo.canopy", "version": 1,
     "head": {"kind": "dpt" | "light", "config": {...}, "state_dict": {...}},
     "bins": HeightBins config or None (direct regression),
     "layers": [tapped 0-based blocks],
     "backbone": {"arch": name or None, "config": BackboneConfig or ConvNeXtConfig dict, "sha256": weights hash,
                  "source": path or None, "state_dict": Meta-layout tensors or None},
     "metadata": {"bands", "mean", "std", "value_scale", "gsd", "normalization", "notes"}}

:class:`CanopyRasterModel` runs a model through :func:`dinov3geo.inference.predict_raster`, writing two float32
bands ``height`` and ``height_std`` (metres; ``height_std`` is NaN for regression heads).

Inference memory: when no gradient is needed and no logits are asked for, binned heads are read out with their
``forward_binned`` (one sample at a time, full-resolution tensors one row block at a time; see
:mod:`dinov3geo.tasks.canopy.dpt`) instead of building ``[B, n_bins, H, W]`` logits and five to seven temporaries of
that size: same heights and stds up to float32 rounding. ``CanopyHeightModel.fused_readout = False`` restores the
reference path. :meth:`CanopyHeightModel.memory_estimate` gives the peak working memory of a batch of windows, from
which :func:`dinov3geo.tasks.canopy.predict.choose_batch_size` picks the default batch size.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3geo.inference.models import RasterModel, _Normalise
from dinov3geo.models import (
    SAT493M_CHMV2,
    Backbone,
    CheckpointError,
    ConvNeXt,
    DinoVisionTransformer,
    config_from_dict,
    load_backbone,
    read_checkpoint,
)
from dinov3geo.models.padding import pad_to_patch_multiple
from dinov3geo.models.taps import (
    edge_margin,
    inference_alignment,
    input_multiple,
    is_convnext,
    n_taps,
    tap_widths,
)
from dinov3geo.tasks.canopy.bins import HeightBins, chunk_bytes_for
from dinov3geo.tasks.canopy.chmv2 import CHMv2, crop_padding, default_layers, needs_grad
from dinov3geo.tasks.canopy.dpt import DPTHead
from dinov3geo.tasks.canopy.heads import LightHead, build_head, head_config
from dinov3geo.utils.atomic import atomic_path

__all__ = [
    "FORMAT",
    "CanopyHeightModel",
    "CanopyRasterModel",
    "backbone_sha256",
    "load_canopy_model",
    "save_canopy_model",
]

FORMAT = "dinov3geo.canopy"
VERSION = 1
_META_KEYS = {"bands", "mean", "std", "value_scale", "gsd", "normalization", "notes"}


class CanopyHeightModel(nn.Module):
    """Frozen backbone + canopy head (+ :class:`HeightBins` for binned heads).

    Args:
        backbone: a :class:`~dinov3geo.models.DinoVisionTransformer` or a :class:`~dinov3geo.models.ConvNeXt`
            (its four stages are the tap points; the head then takes one width per level, e.g. a DPT head with
            ``in_channels=[96, 192, 384, 768]`` on ConvNeXt-T, and inputs are centre-padded to a multiple of 32,
            the ConvNeXt's total stride, whatever the head).
        head: a :class:`~dinov3geo.tasks.canopy.heads.LightHead` or
            :class:`~dinov3geo.tasks.canopy.dpt.DPTHead`.
        bins: required when the head outputs bin logits (DPT head, light head with ``output="bins"``); must be
            ``None`` for a regression head.
        layers: tapped 0-based blocks (default: 4 evenly spaced, ending at the last block; ConvNeXt: the four
            stages ``[0, 1, 2, 3]``).
        freeze_backbone: keep the backbone frozen (no gradients, always in eval mode).
        metadata: free-form dict (bands, normalisation, GSD...), set by :func:`load_canopy_model`.

    Attributes:
        fused_readout: read binned heads out with their ``forward_binned`` when nothing needs gradients and no
            logits are requested, and with :meth:`HeightBins.mean_and_std_chunked` when logits are requested
            without gradients (default True; False: always the reference path, the head's full logits and
            :meth:`HeightBins.mean_and_std`, as before the fused readout existed).
        chunk_bytes: row-block size of that readout (None: :func:`~dinov3geo.tasks.canopy.bins.chunk_bytes_for`
            the device).
    """

    fused_readout: bool = True
    chunk_bytes: int | None = None

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        bins: HeightBins | None = None,
        layers: Sequence[int] | None = None,
        *,
        freeze_backbone: bool = True,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.bins = bins
        n_out = int(getattr(head, "n_bins", 1))
        binned = isinstance(head, DPTHead) or getattr(head, "output", "bins") == "bins"
        if binned and (bins is None or bins.n_bins != n_out):
            raise ValueError(f"the head outputs {n_out} bin logits: give HeightBins(n_bins={n_out})")
        if not binned and bins is not None:
            raise ValueError("a regression head outputs metres directly: bins must be None")
        n_levels = int(getattr(head, "n_levels", 4))
        depth = n_taps(backbone)
        if layers is not None:
            self.layers = [int(i) for i in layers]
        elif depth >= n_levels:
            self.layers = default_layers(depth, n_levels)
        else:  # shallow backbones: evenly spaced taps with repeats (each block runs once, see forward_features)
            self.layers = [round(i * (depth - 1) / max(n_levels - 1, 1)) for i in range(n_levels)]
        if len(self.layers) < n_levels:
            raise ValueError(f"the head takes {n_levels} levels but only layers {self.layers} are tapped")
        bad = [i for i in self.layers if not -depth <= i < depth]
        if bad:
            raise ValueError(f"layers {bad} out of range for a backbone with {depth} tap points "
                             f"({'stages' if is_convnext(backbone) else 'blocks'})")
        if hasattr(head, "in_channels"):  # the head's per-level widths must be those of the tapped levels
            want = tap_widths(backbone, self.layers[-n_levels:])
            got = list(getattr(head, "level_channels", None) or [int(head.in_channels)] * n_levels)
            if got != want:
                raise ValueError(f"the head takes {head.in_channels} channels per level but the backbone's "
                                 f"layers {self.layers[-n_levels:]} give {want[0] if len(set(want)) == 1 else want}")
        self.patch_size = int(backbone.patch_size)
        multiple = 2 * self.patch_size if isinstance(head, DPTHead) else self.patch_size
        #: inputs are centre-padded to this (32 for the DPT head and for any ConvNeXt backbone)
        self.pad_multiple = math.lcm(multiple, input_multiple(backbone))
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            backbone.requires_grad_(False)
            backbone.eval()
        self.metadata: dict[str, Any] = dict(metadata or {})

    @classmethod
    def from_chmv2(cls, model: CHMv2) -> CanopyHeightModel:
        """The same modules as a :class:`CanopyHeightModel` (pads to 32: CHMv2's ``output="aligned"``)."""
        return cls(model.backbone, model.head, model.bins, model.layers, freeze_backbone=True)

    def train(self, mode: bool = True) -> CanopyHeightModel:
        """Set train mode on the head; a frozen backbone stays in eval mode."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the head's weights."""
        return next(self.head.parameters()).dtype

    def padded_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Size an ``hw`` input is centre-padded to."""
        m = self.pad_multiple
        return -(-hw[0] // m) * m, -(-hw[1] // m) * m

    def forward_features(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Pad and run the backbone: one ``(patch_map [B, D, h, w], cls [B, D])`` per tapped layer."""
        x = pad_to_patch_multiple(x.to(self.dtype), self.pad_multiple)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            unique = sorted(set(self.layers))
            out = self.backbone.get_intermediate_layers(x, n=unique, reshape=True, return_class_token=True, norm=True)
        by_layer = dict(zip(unique, out, strict=True))
        return [by_layer[i] for i in self.layers]

    def forward_head(
        self, features: Sequence[tuple[Tensor, Tensor]], out_hw: tuple[int, int], return_logits: bool = False
    ) -> dict[str, Tensor | None]:
        """Head on (cached) features of an ``out_hw`` input: ``height``/``std`` ``[B, 1, H, W]`` at input size.

        ``std`` is ``None`` for regression heads; ``logits`` (cropped, ``[B, n_bins, H, W]``) only with
        ``return_logits``.
        """
        out_hw = (int(out_hw[0]), int(out_hw[1]))
        padded = self.padded_size(out_hw)
        grid = tuple(features[0][0].shape[-2:])
        if (grid[0] * self.patch_size, grid[1] * self.patch_size) != padded:
            raise ValueError(
                f"features of a {grid[0]}x{grid[1]} patch grid do not belong to a {out_hw[0]}x{out_hw[1]} input "
                f"(padded to {padded[0]}x{padded[1]})"
            )
        if not return_logits and self._fused(features, grid, padded):
            height, std = self.head.forward_binned(  # type: ignore[operator]
                features, self.bins, chunk_bytes=self.chunk_bytes
            )
            return {"height": crop_padding(height, out_hw, self.pad_multiple),
                    "std": crop_padding(std, out_hw, self.pad_multiple), "logits": None}
        y = self.head(features)
        if tuple(y.shape[-2:]) != padded:  # never for the built-in heads; keeps custom heads usable
            y = F.interpolate(y, size=padded, mode="bilinear", align_corners=False)
        y = crop_padding(y, out_hw, self.pad_multiple)
        if self.bins is None:
            return {"height": y, "std": None, "logits": None}
        if return_logits and self.fused_readout and not needs_grad(self.head, features):
            height, std = self.bins.mean_and_std_chunked(y, chunk_bytes=self.chunk_bytes)
        else:
            height, std = self.bins.mean_and_std(y)
        return {"height": height, "std": std, "logits": y if return_logits else None}

    def _fused(self, features: Sequence[tuple[Tensor, Tensor]], grid: tuple[int, ...], padded: tuple[int, int]) -> bool:
        """Whether :meth:`forward_head` reads the head out with its ``forward_binned``."""
        if not self.fused_readout or self.bins is None or not hasattr(self.head, "forward_binned"):
            return False
        if getattr(self.head, "output", "bins") != "bins" or needs_grad(self.head, features):
            return False
        size = getattr(self.head, "output_size", None)
        return size is not None and tuple(size(int(grid[0]), int(grid[1]))) == tuple(padded)

    def memory_estimate(self, window: int, batch: int = 1, itemsize: int | None = None) -> int:
        """Estimated peak working memory (bytes, weights excluded) of one inference call on ``batch`` windows.

        A model of the activations alive at the peak of each stage, for ``window`` x ``window`` px inputs
        padded to :attr:`pad_multiple`: the backbone's (per window: tokens x (8 width + 2 MLP width) for the
        block being computed, the tapped levels twice; attention through ``scaled_dot_product_attention``, no
        tokens^2 matrix), the input and output windows, and the head's: with the fused readout the DPT head runs
        one window at a time (about 4 maps of ``channels`` at half resolution, plus 4 row blocks), otherwise
        per window 4 maps of ``n_bins`` and 2 of ``n_hidden_channels`` at full resolution (the logits and the
        reference readout's temporaries alive at once). ``itemsize`` defaults to the model's.
        Checked against measured peak RSS growth by ``benchmarks/canopy_memory.py``.
        """
        if window < 1 or batch < 1:
            raise ValueError(f"window and batch must be positive, got {window}, {batch}")
        item = int(itemsize or torch.empty((), dtype=self.dtype).element_size())
        side = -(-int(window) // self.pad_multiple) * self.pad_multiple
        px = side * side
        cfg = self.backbone.config
        if isinstance(self.backbone, ConvNeXt):
            # the widest stage's block (input, dwconv, norm, 4x hidden, output, residual: ~10 maps of its width)
            # and the tapped maps resized to the grid, twice (normed)
            grid = (side // self.patch_size) ** 2
            strides = [4 * 2**i for i in range(len(cfg.dims))]
            per_window = max(10 * int(c) * px // (s * s) for c, s in zip(cfg.dims, strides, strict=True))
            per_window += 2 * sum(tap_widths(self.backbone, self.layers)) * grid
        else:
            tokens = (side // self.patch_size) ** 2 + 1 + int(cfg.n_storage_tokens)
            width, mlp = int(cfg.embed_dim), int(cfg.ffn_hidden_dim)
            per_window = tokens * (8 * width + 2 * mlp) + 2 * len(self.layers) * tokens * width
        per_window += 3 * int(cfg.in_chans) * px + 4 * px  # input (as float, normalised, padded), height + std
        head = self.head
        n_out = int(getattr(head, "n_bins", 1))
        chunk = self.chunk_bytes or chunk_bytes_for(next(self.parameters()).device)
        fused = self.fused_readout and self.bins is not None and hasattr(head, "forward_binned")
        once = 0
        if isinstance(head, DPTHead):
            trunk = 4 * head.channels * px // 4  # fused map, its upsampling and projection, at half resolution
            if fused:  # one window at a time: the trunk's maps and 4 row blocks are not batch-sized
                once = trunk * item + 4 * chunk
            else:
                per_window += trunk + 2 * head.n_hidden_channels * px + 4 * n_out * px
        elif isinstance(head, LightHead):
            stages = [head.hidden * px // head.patch_size**2]
            c, f = head.hidden, 1
            for _ in head.upsample:
                c, f = max(c // 2, head.min_channels), 2 * f
                stages.append(c * px * f * f // head.patch_size**2)
            per_window += 3 * max(stages)
            if n_out > 1:
                if fused:
                    once = 3 * chunk
                else:
                    per_window += 4 * n_out * px
            else:
                per_window += 2 * px
        else:  # custom heads: their logits and the reference readout
            per_window += 4 * n_out * px
        return int(per_window * batch * item + once)

    def forward(self, x: Tensor, return_logits: bool = False) -> dict[str, Tensor | None]:
        """``dict(height=[B,1,H,W] metres, std=[B,1,H,W] or None, logits=None or [B,N,H,W])`` at input size."""
        if x.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got {tuple(x.shape)}")
        return self.forward_head(self.forward_features(x), (x.shape[-2], x.shape[-1]), return_logits)


# ----------------------------------------------------------------------------- checkpoints
def backbone_sha256(backbone: nn.Module) -> str:
    """SHA-256 of a backbone's weights: key names, dtypes, shapes and bytes in key order (file-format independent)."""
    h = hashlib.sha256()
    for k, v in sorted(backbone.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check_metadata(meta: Mapping[str, Any], what: str) -> dict[str, Any]:
    bad = sorted(set(meta) - _META_KEYS)
    if bad:
        raise ValueError(f"{what}: unknown metadata key(s) {bad}; known: {sorted(_META_KEYS)}")
    out = dict(meta)
    bands = out.get("bands")
    if bands is not None:
        out["bands"] = [str(b) for b in bands]
    for key in ("mean", "std"):
        if out.get(key) is not None:
            out[key] = [float(v) for v in out[key]]
            if bands is not None and len(out[key]) != len(bands):
                raise ValueError(f"{what}: {key} has {len(out[key])} values but there are {len(bands)} bands {bands}")
    if out.get("std") is not None and any(not v > 0 for v in out["std"]):
        raise ValueError(f"{what}: std must be positive, got {out['std']}")
    vs = float(out.get("value_scale", 1.0))
    if not (vs > 0 and math.isfinite(vs)):
        raise ValueError(f"{what}: value_scale must be positive, got {vs}")
    out["value_scale"] = vs
    if out.get("gsd") is not None:
        out["gsd"] = float(out["gsd"])
        if not out["gsd"] > 0:
            raise ValueError(f"{what}: gsd (metres) must be positive, got {out['gsd']}")
    return out


def save_canopy_model(
    path: str | os.PathLike[str],
    model: CanopyHeightModel | CHMv2,
    *,
    bands: Sequence[str],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    value_scale: float = 1.0,
    gsd: float | None = None,
    normalization: str | None = None,
    backbone_source: str | os.PathLike[str] | None = None,
    include_backbone: bool = True,
    notes: str | None = None,
) -> Path:
    """Write a canopy model checkpoint (atomically). See the module docstring for the layout.

    Args:
        path: output file.
        model: the model (a :class:`CHMv2` is stored as its :class:`CanopyHeightModel` form).
        bands: input band names in channel order (must match the backbone's input channels).
        mean, std: per-band normalisation after ``value_scale`` (``(x * value_scale - mean) / std``).
        value_scale: factor taking raw raster values to the range ``mean``/``std`` refer to (1/255 for uint8).
        gsd: ground sample distance (metres) of the imagery the head was trained on.
        normalization: optional name of the normalisation (e.g. ``"sat493m_chmv2"``).
        backbone_source: where the backbone weights came from (recorded; not read).
        include_backbone: store the backbone weights (else only its identity; loading then needs the backbone).
        notes: free text.
    """
    if isinstance(model, CHMv2):
        model = CanopyHeightModel.from_chmv2(model)
    cfg = model.backbone.config  # a BackboneConfig or a ConvNeXtConfig (its dict says "family": "convnext")
    if len(bands) != cfg.in_chans:
        raise ValueError(f"{len(bands)} band names {list(bands)} for a backbone with {cfg.in_chans} input channels")
    meta = _check_metadata(
        {"bands": list(bands), "mean": None if mean is None else list(mean), "std": None if std is None else list(std),
         "value_scale": value_scale, "gsd": gsd, "normalization": normalization, "notes": notes},
        str(path),
    )
    def plain(m: nn.Module) -> dict[str, Tensor]:
        return {k: v.detach().cpu().contiguous().clone() for k, v in m.state_dict().items()}

    payload = {
        "format": FORMAT,
        "version": VERSION,
        "head": {**head_config(model.head), "state_dict": plain(model.head)},
        "bins": model.bins.config() if model.bins is not None else None,
        "layers": [int(i) for i in model.layers],
        "backbone": {
            "arch": getattr(model.backbone, "arch_name", None),
            "config": cfg.to_dict(),
            "sha256": backbone_sha256(model.backbone),
            "source": str(backbone_source) if backbone_source is not None else None,
            "state_dict": plain(model.backbone) if include_backbone else None,
        },
        "metadata": meta,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_canopy_model(
    path: str | os.PathLike[str],
    *,
    backbone: str | os.PathLike[str] | Mapping[str, Any] | Backbone | None = None,
    check_backbone: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[CanopyHeightModel, dict[str, Any]]:
    """Read a :func:`save_canopy_model` file: ``(model in eval mode, metadata)``.

    ``metadata`` holds the saved metadata plus ``head`` (kind and config), ``bins``, ``layers`` and
    ``backbone`` (arch, sha256, source). When the file has no backbone weights, give ``backbone`` (a module, a
    state dict or a file for :func:`~dinov3geo.models.load_backbone`); its weights hash must match the recorded
    one unless ``check_backbone=False``.
    """
    what = str(path)
    obj = read_checkpoint(path)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{what} is not a dinov3geo canopy model (format {FORMAT!r}); for Meta's CHMv2 files use load_chmv2"
        )
    if not isinstance(obj.get("version"), int) or obj["version"] > VERSION:
        raise CheckpointError(f"{what}: unsupported canopy checkpoint version {obj.get('version')!r} (this is v{VERSION})")
    missing = [k for k in ("head", "bins", "layers", "backbone", "metadata") if k not in obj]
    if missing:
        raise CheckpointError(f"{what}: incomplete canopy checkpoint", missing=missing)
    bmeta = obj["backbone"]
    try:  # a ViT's BackboneConfig, or a ConvNeXtConfig ("family": "convnext")
        cfg = config_from_dict(dict(bmeta["config"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what}: the recorded backbone config is not valid: {e}") from e
    if bmeta.get("state_dict") is not None:
        bb = load_backbone(bmeta["state_dict"], arch=cfg)
    elif backbone is None:
        raise CheckpointError(
            f"{what} was saved without backbone weights ({bmeta.get('arch') or 'custom arch'}, sha256 "
            f"{bmeta.get('sha256')}, source {bmeta.get('source')}); pass backbone=<weights file or module>"
        )
    else:
        bb = backbone if isinstance(backbone, DinoVisionTransformer | ConvNeXt) else load_backbone(backbone, arch=cfg)
        if check_backbone and backbone_sha256(bb) != bmeta.get("sha256"):
            raise CheckpointError(
                f"{what}: the given backbone's weights (sha256 {backbone_sha256(bb)}) differ from those the head "
                f"was trained on (sha256 {bmeta.get('sha256')}, source {bmeta.get('source')}); "
                "pass the same backbone or check_backbone=False"
            )
    hmeta = dict(obj["head"])
    h_sd = hmeta.pop("state_dict", None)
    kind = hmeta.pop("kind", None)
    if not isinstance(h_sd, Mapping) or kind is None:
        raise CheckpointError(f"{what}: head entry without kind/state_dict", missing=["head.kind", "head.state_dict"])
    try:
        head = build_head(kind, **hmeta)
    except ValueError as e:
        raise CheckpointError(f"{what}: {e}") from e
    try:
        head.load_state_dict(dict(h_sd), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{what}: head weights do not fit the recorded {kind} config: {e}") from e
    bins = HeightBins.from_config(dict(obj["bins"])) if obj["bins"] is not None else None
    meta = _check_metadata(dict(obj["metadata"]), what)
    model = CanopyHeightModel(bb, head, bins, obj["layers"], metadata=meta).to(device).eval()
    info = {
        **meta,
        "head": {"kind": kind, **hmeta},
        "bins": obj["bins"],
        "layers": list(obj["layers"]),
        "backbone": {k: bmeta.get(k) for k in ("arch", "sha256", "source")},
    }
    return model, info


# ----------------------------------------------------------------------------- raster adapter
class CanopyRasterModel(RasterModel):
    """A canopy model as a :class:`~dinov3geo.inference.RasterModel`: bands ``height`` and ``height_std`` (metres).

    Args:
        model: a :class:`CanopyHeightModel` (or a :class:`CHMv2`, converted with
            :meth:`CanopyHeightModel.from_chmv2`).
        value_scale, mean, std: ``(x * value_scale - mean) / std`` per band before the model.
        receptive_margin: edge margin (input pixels) given zero blend weight (>= 32; default
            :func:`dinov3geo.models.taps.edge_margin`: 32 for a ViT, 64 for a ConvNeXt; ViTs see the whole window,
            so this is where window-edge padding matters most).

    Windows may have any size that is a multiple of 16 (the model pads to its multiple and crops back);
    nodata is NaN; regression heads give a NaN ``height_std``.
    """

    band_names = ("height", "height_std")
    out_bands = 2
    out_dtype = "float32"
    nodata = math.nan
    scale = 1

    def __init__(
        self,
        model: CanopyHeightModel | CHMv2,
        *,
        value_scale: float = 1.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        receptive_margin: int | None = None,
    ) -> None:
        if isinstance(model, CHMv2):
            model = CanopyHeightModel.from_chmv2(model)
        if receptive_margin is None:
            receptive_margin = edge_margin(model.backbone)
        if receptive_margin < 32:
            raise ValueError(f"receptive_margin must be at least 32 px, got {receptive_margin}")
        self.model = model.eval()
        self.in_bands = int(model.backbone.config.in_chans)
        self.receptive_margin = int(receptive_margin)
        self.global_context = True  # a ViT backbone: every output pixel depends on the whole window
        self.window_multiple = 16  # windows are cut into 16 px patches
        self.window_align, self.edge_fill = inference_alignment(model.backbone)
        self._norm = _Normalise(value_scale, mean, std)
        self.value_scale = float(value_scale)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], *, device: torch.device | str = "cpu", **kwargs: Any
    ) -> CanopyRasterModel:
        """Load a :func:`save_canopy_model` file; normalisation from its metadata (``kwargs`` go to
        :func:`load_canopy_model`)."""
        model, meta = load_canopy_model(path, device=device, **kwargs)
        return cls(model, value_scale=meta["value_scale"], mean=meta.get("mean"), std=meta.get("std"))

    @classmethod
    def from_chmv2(cls, model: CHMv2, *, receptive_margin: int = 32) -> CanopyRasterModel:
        """Meta CHMv2 on uint8 RGB: ``value_scale=1/255`` and the CHMv2 mean/std (red mean 0.420)."""
        return cls(model, value_scale=1 / 255, mean=SAT493M_CHMV2.mean, std=SAT493M_CHMV2.std,
                   receptive_margin=receptive_margin)

    def preprocess(self, x: Tensor, valid: Tensor) -> Tensor:
        return self._norm(x)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % 16 or w % 16:
            raise ValueError(f"window {h}x{w} is not a multiple of 16")
        out = self.model(x)
        height = out["height"].float()
        std = out["std"]
        std = std.float() if std is not None else torch.full_like(height, math.nan)
        return torch.cat([height, std], dim=1)

    def to(self, device: torch.device | str) -> CanopyRasterModel:
        self.model.to(device)
        return self

    def eval(self) -> CanopyRasterModel:
        self.model.eval()
        return self

    def _state_tensors(self) -> list[Tensor]:
        norm = [torch.tensor([self.value_scale])]
        norm += [t.flatten() for t in (self._norm.mean, self._norm.std) if t is not None]
        return list(self.model.state_dict().values()) + norm  # resume refuses a different normalisation
