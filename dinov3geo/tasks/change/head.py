"""A trained bi-temporal change head on frozen DINOv3 features, its checkpoint format and raster model.

Architecture (:class:`ChangeHead`), for each date the patch maps of ``L`` blocks (default 4 evenly spaced; a
ConvNeXt's four stages, whose widths ``D_i`` differ):

1. **Fusion per block**: ``[f1, f2, |f1 - f2|]`` (``3D_i`` channels) -> 1x1 conv -> ``hidden`` (GroupNorm, GELU).
2. **Mixing** of the ``L`` fused maps: concat -> two 3x3 convs at the patch grid.
3. **Learned upsampling** to input resolution: ``log2(s)`` stages of a stride-2 transposed conv + 3x3 conv
   (``s = patch / upscale`` input pixels per patch), halving channels down to 16.
4. Optional **detail branch** (``detail_channels > 0``): two 3x3 convs on ``[x1, x2, |x1 - x2|]`` at input
   resolution, concatenated before the last conv, so edges finer than a patch can be placed (the role of
   ChangeViT's detail-capture CNN, much smaller). Then a 1x1 conv -> one change logit per pixel.

:class:`ChangeModel` = frozen backbone (eval mode, no gradients) + head; ``forward`` takes the normalised
stacked pair ``[B, 2C, H, W]`` (any size; padded to the patch stride internally) and returns logits.

Memory at region scale (``benchmarks/head_memory.py``): the two dates run through the backbone one after the
other, and without gradients the head's full-resolution part (steps 3-4 and the output conv) runs one sample at
a time (:attr:`ChangeHead.per_sample`; the logits equal the batched ones up to float32 rounding), so only the
backbone's activations grow with the batch; :meth:`ChangeModel.memory_estimate` gives the working memory of a
batch, from which :func:`dinov3geo.inference.batching.choose_batch_size` picks the default batch size.
:class:`ChangeRasterModel` adds the normalisation and a sigmoid: a :class:`~dinov3geo.inference.RasterModel`
giving ``[B, 1, H, W]`` change probability, carrying the validation-chosen ``threshold``.

Checkpoints (:func:`save_change_model` / :func:`load_change_model`) are ``torch.save`` of a plain dict of
tensors and primitives (``format: dinov3geo.change_head``), read with ``torch.load(weights_only=True)``:
bands, normalisation, layers, upscale, head config + weights, backbone identity (arch, config, metadata,
SHA-1 of its weights, source path) and by default the backbone weights themselves, threshold, training info.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dinov3geo.inference.models import RasterModel, _Normalise
from dinov3geo.models.layers import per_sample
from dinov3geo.models.taps import edge_margin, inference_alignment, is_convnext, tap_widths
from dinov3geo.tasks.change.zeroshot import _stride, date_features, pad_to, per_date_stats, resolve_layers

__all__ = [
    "FORMAT",
    "ChangeHead",
    "ChangeModel",
    "ChangeRasterModel",
    "backbone_fingerprint",
    "load_change_model",
    "save_change_model",
]

FORMAT = "dinov3geo.change_head"
VERSION = 1


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if c % 8 == 0 else 1, c)


def _conv_block(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), _gn(cout), nn.GELU())


class ChangeHead(nn.Module):
    """The decoder described in the module docstring.

    Args:
        embed_dim: backbone feature dimension ``D``, or one per fused block when they differ (a ConvNeXt's
            stages, e.g. ``[96, 192, 384, 768]``); stored in ``config`` as given.
        n_layers: number of blocks ``L`` whose maps are fused.
        stride: input pixels per patch ``s`` (a power of two: ``patch / upscale``).
        bands_per_date: ``C`` (for the detail branch).
        hidden: channels after fusion.
        detail_channels: channels of the full-resolution detail branch (0: none).
    """

    def __init__(self, embed_dim: int | Sequence[int], n_layers: int, stride: int, bands_per_date: int,
                 hidden: int = 64, detail_channels: int = 16) -> None:
        super().__init__()
        if stride < 1 or stride & (stride - 1):
            raise ValueError(f"the patch stride must be a power of two for learned x2 upsampling, got {stride}")
        if isinstance(embed_dim, int | float):
            widths = [int(embed_dim)] * int(n_layers)
            dim: int | list[int] = int(embed_dim)
        else:
            widths = [int(d) for d in embed_dim]
            if len(widths) != int(n_layers):
                raise ValueError(f"embed_dim gives {len(widths)} widths {widths} for {n_layers} layers")
            dim = widths[0] if len(set(widths)) == 1 else widths
        #: per-layer feature widths
        self.widths = widths
        self.config = {"embed_dim": dim, "n_layers": int(n_layers), "stride": int(stride),
                       "bands_per_date": int(bands_per_date), "hidden": int(hidden),
                       "detail_channels": int(detail_channels)}
        self.fuse = nn.ModuleList(_conv_block(3 * d, hidden, 1) for d in widths)
        self.mix = nn.Sequential(_conv_block(hidden * n_layers, hidden), _conv_block(hidden, hidden))
        ups: list[nn.Module] = []
        c = hidden
        for _ in range(int(math.log2(stride))):
            c2 = max(16, c // 2)
            ups.append(nn.Sequential(nn.ConvTranspose2d(c, c2, 2, stride=2, bias=False), _gn(c2), nn.GELU(),
                                     _conv_block(c2, c2)))
            c = c2
        self.up = nn.Sequential(*ups)
        self.detail = (nn.Sequential(_conv_block(3 * bands_per_date, detail_channels),
                                     _conv_block(detail_channels, detail_channels))
                       if detail_channels > 0 else None)
        self.out = nn.Sequential(_conv_block(c + max(detail_channels, 0), c), nn.Conv2d(c, 1, 1))

    #: without gradients, run the upsampling stages, the detail branch and the output conv one sample at a time
    #: (their maps at input resolution are then not batch-sized; GroupNorm is per sample, so the result is the
    #: batched one up to float rounding). Training (gradients recorded) always runs the whole batch.
    per_sample: bool = True

    def forward(self, f1: Sequence[Tensor], f2: Sequence[Tensor], x1: Tensor | None = None,
                x2: Tensor | None = None) -> Tensor:
        """Per-block maps of both dates (``[B, D, h, w]`` each) and, for the detail branch, the normalised
        dates ``[B, C, h*s, w*s]`` -> logits ``[B, 1, h*s, w*s]``."""
        if self.detail is not None and (x1 is None or x2 is None):
            raise ValueError("this head has a detail branch: pass the two dates x1, x2")
        fused = [m(torch.cat([a, b, (a - b).abs()], dim=1)) for m, a, b in zip(self.fuse, f1, f2, strict=True)]
        y = self.mix(torch.cat(fused, dim=1))
        if self.per_sample:
            return per_sample(self._full_resolution, y, x1, x2)
        return self._full_resolution(y, x1, x2)

    def _full_resolution(self, y: Tensor, x1: Tensor | None, x2: Tensor | None) -> Tensor:
        """Upsampling stages, detail branch and output conv: mixed patch-grid maps -> logits (``x1``, ``x2``
        checked by :meth:`forward`)."""
        y = self.up(y)
        if self.detail is not None:
            assert x1 is not None and x2 is not None
            y = torch.cat([y, self.detail(torch.cat([x1, x2, (x1 - x2).abs()], dim=1))], dim=1)
        return self.out(y)


class ChangeModel(nn.Module):
    """Frozen backbone + :class:`ChangeHead` (see the module docstring).

    Args:
        backbone: a DINOv3 backbone taking ``bands_per_date`` channels (frozen here).
        head: the head (``head.config`` must match the backbone and settings).
        layers: 0-based block indices fed to the head.
        upscale: input upsampling before the backbone (divides the patch size).
    """

    def __init__(self, backbone: nn.Module, head: ChangeHead, layers: Sequence[int], upscale: int = 1) -> None:
        super().__init__()
        self.backbone = backbone
        for prm in self.backbone.parameters():
            prm.requires_grad_(False)
        self.head = head
        self.layers = resolve_layers(backbone, list(layers))
        self.upscale = int(upscale)
        self.stride = _stride(backbone, self.upscale)
        self.bands_per_date = int(head.config["bands_per_date"])
        if head.config["stride"] != self.stride or head.config["n_layers"] != len(self.layers):
            raise ValueError(f"head config {head.config} does not fit stride {self.stride} / {len(self.layers)} layers")
        want = tap_widths(backbone, self.layers)
        if head.widths != want:
            raise ValueError(f"head expects D={head.config['embed_dim']}, the backbone's layers {self.layers} give "
                             f"{want[0] if len(set(want)) == 1 else want}")
        self.backbone.eval()

    def train(self, mode: bool = True) -> ChangeModel:
        """Train mode for the head only; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Frozen features ``(f1, f2)`` of a normalised ``[B, 2C, H, W]`` pair whose sides are multiples of
        :attr:`stride` (cacheable: they do not depend on the head)."""
        c = self.bands_per_date
        # one date at a time: the backbone's activations are those of B windows, not 2B
        return (date_features(self.backbone, x[:, :c], self.layers, self.upscale),
                date_features(self.backbone, x[:, c:], self.layers, self.upscale))

    def head_forward(self, f1: Sequence[Tensor], f2: Sequence[Tensor], x: Tensor) -> Tensor:
        """Head logits from (cached) features and the normalised pair ``x`` (sides multiples of the stride)."""
        c = self.bands_per_date
        return self.head(f1, f2, x[:, :c], x[:, c:])

    def memory_estimate(self, window: int, batch: int = 1, itemsize: int | None = None) -> int:
        """Estimated peak working memory (bytes, weights excluded) of one inference call on ``batch`` windows.

        For ``window`` x ``window`` px pairs padded to the stride: per window the input (raw, normalised,
        padded: ``3 x 2C`` maps), the backbone's activations for one date
        (:func:`~dinov3geo.inference.batching.backbone_window_elements`; the dates run one after the other) and
        the first date's tapped maps, the fusion at the patch grid and the output (probability, crop); and the
        full-resolution part of the head (upsampling stages, detail branch, output conv: about
        ``2 x (c + detail_channels) + 3C`` maps, ``c`` the last stage's channels) once when it runs per sample
        (:attr:`ChangeHead.per_sample`), else per window. ``itemsize`` defaults to the head's.
        Checked against measured peak RSS growth by ``benchmarks/head_memory.py``.
        """
        from dinov3geo.inference.batching import backbone_window_elements
        from dinov3geo.models.taps import input_multiple

        if window < 1 or batch < 1:
            raise ValueError(f"window and batch must be positive, got {window}, {batch}")
        item = int(itemsize or next(self.head.parameters()).element_size())
        side = -(-int(window) // self.stride) * self.stride
        px = side * side
        m = input_multiple(self.backbone)
        bb_side = -(-side * self.upscale // m) * m
        grid = (side // self.stride) ** 2
        c = self.bands_per_date
        widths = self.head.widths
        hidden = int(self.head.config["hidden"])
        per_window = 6 * c * px + (c * px * self.upscale**2 if self.upscale != 1 else 0)
        per_window += backbone_window_elements(self.backbone, bb_side, self.layers) + sum(widths) * grid
        per_window += (3 * max(widths) + (len(widths) + 2) * hidden) * grid + 3 * px
        last = int(self.head.out[-1].in_channels)
        detail = int(self.head.config["detail_channels"])
        full = (2 * (last + max(detail, 0)) + (3 * c if detail > 0 else 0)) * px
        once = 0
        if self.head.per_sample:
            once = full
        else:
            per_window += full
        return int((per_window * batch + once) * item)

    def forward(self, x: Tensor) -> Tensor:
        """Normalised ``[B, 2C, H, W]`` -> change logits ``[B, 1, H, W]``."""
        h, w = x.shape[-2:]
        xp = pad_to(x, self.stride)
        f1, f2 = self.features(xp)
        return self.head_forward(f1, f2, xp)[..., :h, :w]


class ChangeRasterModel(RasterModel):
    """A :class:`ChangeModel` with its input normalisation as a :class:`~dinov3geo.inference.RasterModel`:
    raw ``[B, 2C, H, W]`` -> change probability ``[B, 1, H, W]`` (``scale`` 1).

    Attributes:
        threshold: probability at or above which a pixel is called changed (chosen on validation data;
            None when the checkpoint has none).
        bands: band names of one date, in input order.
        info: the rest of the checkpoint's descriptive fields (training settings, backbone identity).
    """

    out_bands = 1
    band_names = ("change_probability",)
    scale = 1

    def __init__(self, model: ChangeModel, *, value_scale: float = 1.0, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, threshold: float | None = None,
                 bands: Sequence[str] | None = None, receptive_margin: int | None = None,
                 info: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        c = model.bands_per_date
        self.in_bands = 2 * c
        self.bands = list(bands) if bands is not None else None
        self._norm = _Normalise(value_scale, per_date_stats(mean, c, "mean"), per_date_stats(std, c, "std"))
        self.threshold = threshold
        if receptive_margin is None:  # two feature cells (a ConvNeXt's: two 32 px stage-3 cells)
            receptive_margin = edge_margin(model.backbone) if is_convnext(model.backbone) else 2 * model.stride
        self.receptive_margin = int(receptive_margin)
        self.window_align, self.edge_fill = inference_alignment(model.backbone)
        self.global_context = True  # features of a ViT backbone: each depends on the whole window
        self.info = dict(info or {})

    def preprocess(self, x: Tensor, valid: Tensor) -> Tensor:
        if x.shape[1] != self.in_bands:
            raise ValueError(f"expected {self.in_bands} stacked bands (2 dates x {self.in_bands // 2}"
                             f"{': ' + ', '.join(self.bands) if self.bands else ''}), got {x.shape[1]}")
        return self._norm(x)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        return torch.sigmoid(self.model(x).float())

    def to(self, device: torch.device | str) -> ChangeRasterModel:
        self.model.to(device)
        return self

    def eval(self) -> ChangeRasterModel:
        self.model.eval()
        return self

    def _state_tensors(self) -> list[Tensor]:
        return list(self.model.state_dict().values())


# ------------------------------------------------------------------------------------------ checkpoints
def backbone_fingerprint(backbone: nn.Module) -> str:
    """SHA-1 of a backbone's state dict (names, shapes, dtypes and bytes), its identity in change checkpoints."""
    h = hashlib.sha1()
    for k, v in sorted(backbone.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _plain(obj: Any) -> Any:
    """Primitive-only copy (weights_only-safe): tuples -> lists, unknown objects -> str."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str | Tensor):
        return obj
    if isinstance(obj, os.PathLike):
        return str(obj)
    return str(obj)


def save_change_model(
    model: ChangeModel,
    path: str | os.PathLike[str],
    *,
    bands: Sequence[str],
    value_scale: float,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    threshold: float | None,
    backbone_source: str | os.PathLike[str] | None = None,
    backbone_bands: Sequence[str] | None = None,
    include_backbone: bool = True,
    train_info: Mapping[str, Any] | None = None,
) -> Path:
    """Write a change-head checkpoint atomically (see the module docstring).

    Args:
        model: the trained model.
        path: output file.
        bands: names of the ``C`` bands of one date (input order).
        value_scale, mean, std: the input normalisation used in training (``C`` or ``2C`` values).
        threshold: the validation-chosen probability threshold.
        backbone_source: the file the backbone was loaded from (identity; used when not embedded).
        backbone_bands: band names the backbone was widened to from RGB, if it was.
        include_backbone: embed the backbone weights (self-contained file; large for big backbones).
        train_info: primitive-typed training settings and history.
    """
    from dinov3geo.models.registry import arch_name
    from dinov3geo.utils.atomic import atomic_path

    bb = model.backbone
    meta = getattr(bb, "metadata", None)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "bands": [str(b) for b in bands],
        "bands_per_date": model.bands_per_date,
        "normalization": {"value_scale": float(value_scale),
                          "mean": None if mean is None else [float(v) for v in mean],
                          "std": None if std is None else [float(v) for v in std]},
        "layers": list(model.layers),
        "upscale": model.upscale,
        "threshold": None if threshold is None else float(threshold),
        "head": {"config": dict(model.head.config),
                 "state_dict": {k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()}},
        "backbone": {
            "arch": getattr(bb, "arch_name", None) or arch_name(bb.config),
            "config": _plain(bb.config.to_dict()),
            "metadata": _plain(meta.to_dict()) if meta is not None else None,
            "fingerprint": backbone_fingerprint(bb),
            "source": None if backbone_source is None else str(Path(backbone_source).absolute()),
            "widened_to": None if backbone_bands is None else [str(b) for b in backbone_bands],
            "state_dict": ({k: v.detach().cpu().clone() for k, v in bb.state_dict().items()}
                           if include_backbone else None),
        },
        "train": _plain(dict(train_info or {})),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_change_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint dict (``torch.load(weights_only=True)``), checked to be a change-head file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"change model {p} does not exist")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not our file"
        from dinov3geo.models.checkpoint import describe_load_error

        raise ValueError(f"not a readable change-head checkpoint: {describe_load_error(p, e)}") from e
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ValueError(f"{p} is not a dinov3geo change-head checkpoint (format {FORMAT!r}); "
                         "train one with `dinov3geo change train CONFIG`")
    if int(ck.get("version", 0)) > VERSION:
        raise ValueError(f"{p} has checkpoint version {ck['version']}; this dinov3geo reads up to {VERSION}")
    return ck


def _backbone_from(ck: dict[str, Any], path: Path, backbone: Any) -> nn.Module:
    from dinov3geo.models import load_backbone

    info = ck["backbone"]
    if backbone is None and info.get("state_dict") is not None:
        return load_backbone({"format": "dinov3geo.backbone", "version": 1, "arch": info["config"],
                              "config": info["config"], "state_dict": info["state_dict"],
                              "metadata": info.get("metadata")})
    src = backbone if backbone is not None else info.get("source")
    if src is None:
        raise ValueError(f"{path} does not embed its backbone and records no source; pass backbone=PATH")
    if isinstance(src, nn.Module):
        bb = src
    else:
        if not Path(src).exists():
            raise FileNotFoundError(f"{path} needs its backbone {src}, which does not exist; pass backbone=PATH")
        widened = info.get("widened_to")
        bb = load_backbone(src, bands=widened) if widened else load_backbone(src)
    fp = backbone_fingerprint(bb)
    if fp != info.get("fingerprint"):
        raise ValueError(f"the backbone given for {path} is not the one it was trained with "
                         f"(weights SHA-1 {fp[:12]} != {str(info.get('fingerprint'))[:12]})")
    return bb


def load_change_model(path: str | os.PathLike[str], backbone: Any = None,
                      device: str | torch.device = "cpu") -> ChangeRasterModel:
    """Load a change-head checkpoint as a :class:`ChangeRasterModel` (probability output, eval mode).

    Args:
        path: a file written by :func:`save_change_model` / ``dinov3geo change train``.
        backbone: the backbone (module or file) when the checkpoint does not embed it (default: the recorded
            source path); its weights must match the recorded SHA-1.
        device: where the model lives.
    """
    p = Path(path)
    ck = read_change_checkpoint(p)
    bb = _backbone_from(ck, p, backbone)
    cfg = ck["head"]["config"]
    head = ChangeHead(**cfg)
    head.load_state_dict(ck["head"]["state_dict"], strict=True)
    model = ChangeModel(bb, head, ck["layers"], ck["upscale"]).to(device)
    norm = ck["normalization"]
    info = {k: ck[k] for k in ("train", "layers", "upscale") if k in ck}
    info["backbone"] = {k: v for k, v in ck["backbone"].items() if k != "state_dict"}
    return ChangeRasterModel(model, value_scale=norm["value_scale"], mean=norm["mean"], std=norm["std"],
                             threshold=ck.get("threshold"), bands=ck.get("bands"), info=info).eval()
