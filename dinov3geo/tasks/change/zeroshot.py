"""Zero-shot change: per-patch cosine distance between frozen DINOv3 features of two dates.

:class:`ZeroShotChange` is a :class:`~dinov3geo.inference.RasterModel` over the two dates stacked along the
band axis (``[B, 2C, H, W]``: the ``C`` bands of date 1 then the ``C`` bands of date 2, as
:class:`~dinov3geo.inference.StackSource` produces). Each date is normalised, run through the frozen backbone,
and the **patch tokens only** of the chosen blocks are compared:
``get_intermediate_layers`` drops the cls token and the ``n_storage_tokens`` register tokens (DINOv3 has 4;
torchgeo's ``ChangeViT`` takes tokens ``1..N`` and so mixes them into its patch grid). With several blocks
the per-block cosines are averaged (the cosine of the concatenated unit-normalised features). The distance
``(1 - cos) / 2`` lies in ``[0, 1]`` (0 = identical features), is bilinearly upsampled to the input
resolution (``scale = 1``) so that the engine blends overlapping windows, and can be thresholded with
:func:`~dinov3geo.tasks.change.thresholds.otsu_threshold`.

``upscale`` resizes the input (bilinear) before the backbone so that a 16 px patch covers ``16 / upscale``
input pixels, useful for 10-30 m imagery where a native 16-px patch (160-480 m) is coarser than most changes.

A ConvNeXt backbone works the same way: its stages are the "blocks" (``layers=4``: all four; ``-1``: the last),
their maps resized to the 16 px grid; a ConvNeXt has no cls or register tokens to drop.

The helpers :func:`resolve_layers`, :func:`check_bands` and :func:`date_features` are shared with the
trained head (:mod:`dinov3geo.tasks.change.head`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3geo.inference.models import RasterModel, _Normalise
from dinov3geo.models.taps import (
    default_normalization,
    edge_margin,
    inference_alignment,
    is_convnext,
    n_taps,
    tap_maps,
)

__all__ = ["ZeroShotChange", "check_bands", "date_features", "per_date_stats", "resolve_layers"]


def resolve_layers(backbone: nn.Module, layers: int | Sequence[int]) -> list[int]:
    """0-based block indices: an int ``n`` takes ``n`` evenly spaced blocks ending at the last one (4 of 12 ->
    ``[2, 5, 8, 11]``, as DPT-style heads do); a sequence is taken as block indices (negative from the end).
    A ConvNeXt's tap points are its 4 stages (``4`` -> ``[0, 1, 2, 3]``)."""
    depth = n_taps(backbone)
    if isinstance(layers, int) and not isinstance(layers, bool):
        if not 1 <= layers <= depth:
            what = "stages" if is_convnext(backbone) else "blocks"
            raise ValueError(f"layers={layers}: the backbone has {depth} {what}")
        return sorted({depth - 1 - round(k * depth / layers) for k in range(layers)})
    out = []
    for i in layers:
        j = int(i)
        if not -depth <= j < depth:
            raise ValueError(f"block index {j} is out of range for a {depth}-block backbone")
        out.append(j % depth)
    if not out:
        raise ValueError("layers is empty")
    return out


def _in_chans(backbone: nn.Module) -> int:
    return int(backbone.patch_embed.proj.in_channels)


def check_bands(backbone: nn.Module, bands_per_date: int, band_names: Sequence[str] | None = None) -> nn.Module:
    """Return a backbone taking ``bands_per_date`` channels: ``backbone`` itself when it does, a widened copy
    (:func:`dinov3geo.models.widen_patch_embed`) when it is an RGB backbone and ``band_names`` are given,
    else a ``ValueError`` saying what to do."""
    n = _in_chans(backbone)
    if n == bands_per_date:
        return backbone
    if band_names is not None and n == 3 and len(band_names) == bands_per_date:
        from dinov3geo.models import widen_patch_embed

        meta = getattr(backbone, "metadata", None)
        rgb = list(meta.bands) if meta is not None and meta.bands and len(meta.bands) == 3 else None
        widened = copy.deepcopy(backbone)
        widen_patch_embed(widened, list(band_names), **({"rgb_bands": rgb} if rgb else {}))
        if meta is not None:  # mean/std described the RGB input only; keep provenance, drop them
            from dinov3geo.models import BackboneMetadata

            prov = dict(meta.provenance, widened_from=list(meta.bands or ["red", "green", "blue"]))
            widened.metadata = BackboneMetadata(bands=list(band_names), gsd=meta.gsd, provenance=prov)
        return widened
    raise ValueError(
        f"the backbone takes {n} input bands but each date has {bands_per_date}; select {n} bands, or widen an RGB "
        "backbone: pass band_names=[...] (one name per band), or load it with "
        "dinov3geo.models.load_backbone(path, bands=[...]) / widen_patch_embed(backbone, [...])"
    )


def date_features(backbone: nn.Module, x: Tensor, layers: Sequence[int], upscale: int = 1) -> list[Tensor]:
    """Normed patch-token maps ``[B, D_i, H / s, W / s]`` (``s = patch / upscale``) of the given blocks.

    ``x`` (``[B, C, H, W]``, normalised) must have sides that are multiples of ``s``; it is upscaled
    (bilinear) by ``upscale`` first. Only patch tokens are returned (no cls/storage tokens). A ConvNeXt's
    stage maps (``D_i = embed_dims[i]``) come on the same grid: the (upscaled) input is padded to a multiple of
    32 and the maps cropped back (:func:`dinov3geo.models.taps.tap_maps`).
    """
    if upscale != 1:
        x = F.interpolate(x, scale_factor=upscale, mode="bilinear", align_corners=False)
    p = int(backbone.patch_size)
    if x.shape[-2] % p or x.shape[-1] % p:
        raise ValueError(f"input {tuple(x.shape[-2:])} x upscale is not a multiple of the patch size {p}")
    return tap_maps(backbone, x, list(layers))


def _stride(backbone: nn.Module, upscale: int) -> int:
    p = int(backbone.patch_size)
    if upscale < 1 or p % upscale:
        raise ValueError(f"upscale must divide the patch size {p}, got {upscale}")
    return p // upscale


def pad_to(x: Tensor, stride: int) -> Tensor:
    """Replicate-pad the bottom/right of ``[B, C, H, W]`` to multiples of ``stride``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % stride, (-w) % stride
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def per_date_stats(values: Sequence[float] | None, bands_per_date: int, what: str) -> list[float] | None:
    """A per-band list for the stacked input: ``C`` values are repeated for both dates, ``2C`` kept."""
    if values is None:
        return None
    v = [float(x) for x in values]
    if len(v) == bands_per_date:
        return v + v
    if len(v) == 2 * bands_per_date:
        return v
    raise ValueError(f"{what} has {len(v)} values; give one per band ({bands_per_date}) or per stacked band "
                     f"({2 * bands_per_date})")


class ZeroShotChange(RasterModel):
    """Cosine distance of frozen patch features of two dates (see the module docstring).

    Args:
        backbone: a :class:`~dinov3geo.models.DinoVisionTransformer` or :class:`~dinov3geo.models.ConvNeXt`
            (kept frozen, in eval mode).
        bands_per_date: ``C`` (default: the backbone's input channels).
        value_scale: factor taking raw values to the scale ``mean``/``std`` refer to (e.g. ``1/255``).
        mean, std: per-band normalisation (``C`` values for both dates, or ``2C``); default: the backbone
            metadata's when it describes ``C`` bands, for an RGB backbone without metadata SAT-493M (ViT) or
            LVD-1689M (ConvNeXt), else none.
        layers: blocks to compare (an int ``n``: ``n`` evenly spaced blocks ending at the last; or indices).
        upscale: input upsampling factor before the backbone (must divide the patch size).
        band_names: names of the ``C`` bands, used to widen an RGB backbone when ``C != 3``.
        receptive_margin: engine edge margin in input pixels (default: 2 patches).
    """

    out_bands = 1
    band_names = ("change_distance",)
    scale = 1

    def __init__(
        self,
        backbone: nn.Module,
        bands_per_date: int | None = None,
        *,
        value_scale: float = 1.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        layers: int | Sequence[int] = (-1,),
        upscale: int = 1,
        band_names: Sequence[str] | None = None,
        receptive_margin: int | None = None,
    ) -> None:
        c = int(bands_per_date) if bands_per_date is not None else _in_chans(backbone)
        self.backbone = check_bands(backbone, c, band_names).eval()
        for prm in self.backbone.parameters():
            prm.requires_grad_(False)
        self.bands_per_date = c
        self.in_bands = 2 * c
        meta = getattr(self.backbone, "metadata", None)
        if mean is None and std is None:
            if meta is not None and meta.mean and len(meta.mean) == c:
                mean, std = meta.mean, meta.std
            elif meta is None and c == 3:  # Meta's RGB weights: SAT-493M (ViT) / LVD-1689M (ConvNeXt) statistics
                norm = default_normalization(self.backbone)
                mean, std = norm.mean, norm.std
        self._norm = _Normalise(value_scale, per_date_stats(mean, c, "mean"), per_date_stats(std, c, "std"))
        self.layers = resolve_layers(self.backbone, layers)
        self.upscale = int(upscale)
        self.stride = _stride(self.backbone, self.upscale)
        if receptive_margin is None:  # two feature cells (a ConvNeXt's: two 32 px stage-3 cells)
            receptive_margin = edge_margin(self.backbone) if is_convnext(self.backbone) else 2 * self.stride
        self.receptive_margin = int(receptive_margin)
        self.window_align, self.edge_fill = inference_alignment(self.backbone)
        self.global_context = True  # features of a ViT backbone: each depends on the whole window

    def preprocess(self, x: Tensor, valid: Tensor) -> Tensor:
        if x.shape[1] != self.in_bands:
            raise ValueError(f"expected {self.in_bands} stacked bands (2 dates x {self.bands_per_date}), "
                             f"got {x.shape[1]}")
        return self._norm(x)

    def patch_distance(self, x: Tensor) -> Tensor:
        """``[B, 1, H / s, W / s]`` distances on the patch grid of a normalised, padded ``[B, 2C, H, W]``."""
        c = self.bands_per_date
        feats = date_features(self.backbone, torch.cat([x[:, :c], x[:, c:]], dim=0), self.layers, self.upscale)
        b = x.shape[0]
        cos = torch.stack([F.cosine_similarity(f[:b].float(), f[b:].float(), dim=1, eps=1e-8) for f in feats])
        return ((1.0 - cos.mean(0)) * 0.5).clamp(0.0, 1.0).unsqueeze(1)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        xp = pad_to(x, self.stride)
        d = self.patch_distance(xp)
        d = F.interpolate(d, size=xp.shape[-2:], mode="bilinear", align_corners=False)
        return d[..., :h, :w]

    def to(self, device: torch.device | str) -> ZeroShotChange:
        self.backbone.to(device)
        return self

    def eval(self) -> ZeroShotChange:
        self.backbone.eval()
        return self

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha1(super().fingerprint().encode())
        h.update(repr((self.layers, self.upscale, self._norm.value_scale,
                       None if self._norm.mean is None else self._norm.mean.flatten().tolist(),
                       None if self._norm.std is None else self._norm.std.flatten().tolist())).encode())
        return h.hexdigest()

    def _state_tensors(self) -> list[Tensor]:
        return list(self.backbone.state_dict().values())

    def describe(self) -> dict[str, Any]:
        """Settings as a JSON-friendly dict (for reports)."""
        return {"layers": self.layers, "upscale": self.upscale, "bands_per_date": self.bands_per_date,
                "value_scale": self._norm.value_scale, "receptive_margin": self.receptive_margin}
