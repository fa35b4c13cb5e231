"""Widen an RGB patch embedding to more (or other) input bands.

Following the DINOv3 paper's RGB+NIR experiments, a band with an RGB counterpart keeps that kernel and every
other band starts from the **mean of the three RGB kernels**. The FINO branch
(``dinov3/utils/expand_patch_embed.py``) additionally multiplies the whole weight by ``3 / N`` so that an
input whose bands are all equal produces the same embedding as before; that rescale is available with
``rescale=True`` and is **off by default** (then RGB bands keep producing exactly the original response).
The conv bias is unchanged.

The same applies to the DINOv3 ConvNeXt stem (``downsample_layers.0.0``, a 4x4 / stride-4 conv followed by a
LayerNorm over its output channels): widening only its input channels leaves the stem's output, and hence
every later layer, unchanged for RGB bands (extra bands at zero), so the rules above carry over. A ConvNeXt
model exposes the stem conv as ``model.patch_embed.proj`` for this purpose.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

PATCH_WEIGHT_KEY = "patch_embed.proj.weight"
#: The ConvNeXt stem conv weight (``dinov3geo.models.convnext.STEM_WEIGHT_KEY``).
CONVNEXT_STEM_KEY = "downsample_layers.0.0.weight"

#: Aliases recognised for the RGB bands (case-insensitive). ``B02/B03/B04`` follow the Sentinel-2 naming;
#: other sensors' numbered bands are ambiguous, so map them with ``band_map``.
RGB_ALIASES: dict[str, str] = {
    "r": "red",
    "red": "red",
    "g": "green",
    "green": "green",
    "b": "blue",
    "blue": "blue",
    "b04": "red",
    "b03": "green",
    "b02": "blue",
}


def _canonical(name: str, band_map: Mapping[str, str]) -> str:
    lower = {k.lower(): v for k, v in band_map.items()}
    key = name.lower()
    if key in lower:
        return lower[key].lower()
    return RGB_ALIASES.get(key, key)


def widen_patch_weight(
    weight: Tensor,
    target_bands: Sequence[str],
    rgb_bands: Sequence[str] = ("red", "green", "blue"),
    band_map: Mapping[str, str] | None = None,
    rescale: bool = False,
) -> Tensor:
    """New conv weight ``[D, len(target_bands), p, p]`` from an RGB weight ``[D, 3, p, p]``.

    Args:
        weight: the RGB patch-embedding weight; channel ``i`` is band ``rgb_bands[i]``.
        target_bands: band names of the new input, in channel order.
        rgb_bands: names of the source channels (``"red"``, ``"green"``, ``"blue"`` order by default).
        band_map: explicit ``target name -> source band name`` mapping (overrides the built-in aliases).
        rescale: multiply the result by ``3 / N`` (FINO's variant).
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a conv weight [D, C, p, p], got shape {tuple(weight.shape)}")
    if weight.shape[1] != len(rgb_bands):
        raise ValueError(
            f"weight has {weight.shape[1]} input channels but rgb_bands has {len(rgb_bands)} names"
        )
    if not target_bands:
        raise ValueError("target_bands is empty")
    if len(set(b.lower() for b in target_bands)) != len(target_bands):
        raise ValueError(f"duplicate target band names in {list(target_bands)}")
    band_map = band_map or {}
    src_index = {_canonical(b, {}): i for i, b in enumerate(rgb_bands)}
    mean_kernel = weight.mean(dim=1)
    channels = []
    for band in target_bands:
        src = _canonical(band, band_map)
        channels.append(weight[:, src_index[src]] if src in src_index else mean_kernel)
    out = torch.stack(channels, dim=1)
    if rescale:
        out = out * (weight.shape[1] / len(target_bands))
    return out.contiguous()


def widen_patch_embed(
    state_dict_or_model: Mapping[str, Tensor] | nn.Module,
    target_bands: Sequence[str],
    rgb_bands: Sequence[str] = ("red", "green", "blue"),
    band_map: Mapping[str, str] | None = None,
    rescale: bool = False,
) -> dict[str, Tensor] | nn.Module:
    """Widen the patch embedding of a state dict (returns a new dict) or a model (modified in place).

    For a model the ``patch_embed.proj`` conv is replaced (for a ConvNeXt: the stem conv
    ``downsample_layers.0.0``), ``patch_embed.in_chans`` and ``model.config.in_chans`` are updated. A state
    dict is widened at ``patch_embed.proj.weight`` (ViT) or ``downsample_layers.0.0.weight`` (ConvNeXt).
    See :func:`widen_patch_weight` for the arguments.
    """
    if isinstance(state_dict_or_model, nn.Module):
        model = state_dict_or_model
        proj = model.patch_embed.proj  # type: ignore[union-attr]
        new_w = widen_patch_weight(proj.weight.detach(), target_bands, rgb_bands, band_map, rescale)
        conv = nn.Conv2d(
            len(target_bands),
            proj.out_channels,
            kernel_size=proj.kernel_size,
            stride=proj.stride,
            bias=proj.bias is not None,
            device=proj.weight.device,
            dtype=proj.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(new_w)
            if proj.bias is not None:
                conv.bias.copy_(proj.bias)
        conv.weight.requires_grad_(proj.weight.requires_grad)
        model.patch_embed.proj = conv  # type: ignore[union-attr]
        model.patch_embed.in_chans = len(target_bands)  # type: ignore[union-attr]
        if hasattr(model, "config"):
            model.config = model.config.replace(in_chans=len(target_bands))
        return model
    sd = dict(state_dict_or_model)
    key = PATCH_WEIGHT_KEY if PATCH_WEIGHT_KEY in sd or CONVNEXT_STEM_KEY not in sd else CONVNEXT_STEM_KEY
    if key not in sd:
        raise KeyError(f"state dict has no {PATCH_WEIGHT_KEY!r} (ViT) or {CONVNEXT_STEM_KEY!r} (ConvNeXt)")
    sd[key] = widen_patch_weight(sd[key], target_bands, rgb_bands, band_map, rescale)
    return sd
