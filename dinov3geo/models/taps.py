"""What task code needs to know of a backbone, whichever the family (ViT or ConvNeXt).

Every task (features, canopy heads, change, land cover) taps a backbone through ``get_intermediate_layers``
on a grid of ``patch_size`` (16) input pixels. The two families differ in ways these helpers hide:

* **tap points** (:func:`n_taps`): a ViT's blocks (12-40), a ConvNeXt's four stages (``len(backbone.blocks)``
  is 4: :attr:`~dinov3geo.models.ConvNeXt.blocks` views the stages);
* **widths** (:func:`tap_widths`): every ViT block gives ``embed_dim`` channels; ConvNeXt stage ``i`` gives
  ``embed_dims[i]`` (ConvNeXt-T: 96, 192, 384, 768; only the last equals ``embed_dim``), so heads on several
  taps take one width per tap;
* **input sizes** (:func:`input_multiple`): a ViT/16 takes any multiple of 16; a ConvNeXt's stage grids are
  exact only for multiples of its total stride, 32 (a 528 px side would lose a row at every stride-2 stage and
  its stage maps would not line up with the 16 px grid). :func:`tap_maps` pads the **bottom/right** of a
  ConvNeXt input by **reflection** up to a multiple of 32 and crops the maps back to the input's 16 px grid.
  Bottom/right padding keeps the grid anchored at the input's top-left pixel (so windows whose origins are
  multiples of 32 give the same features where they overlap); reflection continues the image texture into
  the padding rather than adding an artificial edge (the padded strip, under 32 px, only influences the
  outputs next to it, which the inference engine's edge margins discard between windows);
* **default normalisation** (:func:`default_normalization`): Meta's ConvNeXts are the web LVD-1689M
  distillations (ImageNet mean/std, :data:`~dinov3geo.models.LVD1689M`); the satellite ViT (SAT-493M) and
  the ViTs without metadata keep the SAT-493M constants they always had. A backbone's own metadata (band
  names, mean/std of a dinov3geo checkpoint) always wins over these defaults.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from dinov3geo.models.convnext import TOTAL_STRIDE, ConvNeXt
from dinov3geo.models.normalization import LVD1689M, SAT493M, Normalization

__all__ = [
    "default_normalization",
    "family",
    "grid_stride",
    "input_multiple",
    "edge_margin",
    "inference_alignment",
    "is_convnext",
    "n_taps",
    "pad_bottom_right",
    "receptive_radius",
    "tap_maps",
    "tap_widths",
]


def is_convnext(backbone: Any) -> bool:
    """True for a :class:`~dinov3geo.models.ConvNeXt` (also when wrapped in nothing else)."""
    return isinstance(backbone, ConvNeXt)


def family(backbone: Any) -> str:
    """``"convnext"`` or ``"vit"``."""
    return "convnext" if is_convnext(backbone) else "vit"


def n_taps(backbone: nn.Module) -> int:
    """Number of tap points of ``get_intermediate_layers``: ViT blocks, or the 4 ConvNeXt stages."""
    return len(backbone.blocks)  # type: ignore[arg-type]


def tap_widths(backbone: nn.Module, layers: Sequence[int]) -> list[int]:
    """Channels of each tapped layer (0-based, negative from the end): ``embed_dim`` for every ViT block,
    ``embed_dims[i]`` for ConvNeXt stage ``i``."""
    n = n_taps(backbone)
    if is_convnext(backbone):
        dims = list(backbone.embed_dims)  # type: ignore[union-attr]
        return [int(dims[int(i) % n]) for i in layers]
    return [int(backbone.embed_dim)] * len(layers)  # type: ignore[arg-type]


def grid_stride(backbone: nn.Module) -> int:
    """Input pixels per feature pixel of ``get_intermediate_layers``: the patch size (16; 32 for a ConvNeXt
    built with ``patch_size=None``)."""
    p = getattr(backbone, "patch_size", None)
    return int(p) if p is not None else TOTAL_STRIDE


def input_multiple(backbone: nn.Module) -> int:
    """The side multiple at which the backbone's feature grid is exact: the patch size for a ViT,
    ``lcm(32, patch size)`` for a ConvNeXt (its total stride)."""
    p = grid_stride(backbone)
    return math.lcm(TOTAL_STRIDE, p) if is_convnext(backbone) else p


def inference_alignment(backbone: nn.Module) -> tuple[int, str]:
    """``(window_align, edge_fill)`` for the inference engine's windows over this backbone (see
    :func:`dinov3geo.inference.make_layout`): a ConvNeXt's stage-3 cells are 32 px, so window origins go on
    multiples of :func:`input_multiple` and the last windows see the grid mirrored past its edge, as a whole
    image is padded (:func:`pad_bottom_right`); a ViT needs neither: ``(1, "zeros")``."""
    if is_convnext(backbone):
        return input_multiple(backbone), "reflect"
    return 1, "zeros"


def edge_margin(backbone: nn.Module) -> int:
    """Default window-edge margin (input pixels, zero blend weight) of the inference adapters: two feature
    cells of the backbone's coarsest grid, 32 px for a ViT/16 and 64 px for a ConvNeXt (two stage-3 cells).

    Measured on a 1000 x 1000 px crop of the bundled NEON image, window 512, half-window overlap (aligned, mirrored
    edges), tiled features against one window over the whole raster: the ``convnext_tiny_test`` weights of the
    tests give a mean / max absolute difference of 0.0015 / 0.079 at a 32 px margin, 0.0006 / 0.038 at 64 px and
    0.0002 / 0.012 at 96 px (LayerNorm-ed features, sd 1); ConvNeXt-T with random weights (layer scales 0.1-1)
    0.015 / 0.33 at 32 px and 0.012 / 0.31 at 64 px. Before windows were aligned and mirrored both were
    about 0.4 / 6."""
    return 2 * (input_multiple(backbone) if is_convnext(backbone) else grid_stride(backbone))


def default_normalization(backbone: nn.Module) -> Normalization:
    """The RGB normalisation to use when the backbone's metadata gives none: LVD-1689M (ImageNet) for a
    ConvNeXt (Meta's ConvNeXts are web LVD-1689M models), SAT-493M for a ViT (see the module docstring)."""
    return LVD1689M if is_convnext(backbone) else SAT493M


def pad_bottom_right(x: Tensor, multiple: int, mode: str = "reflect") -> Tensor:
    """Pad the bottom/right of ``x`` (``[B, C, H, W]``) up to multiples of ``multiple``.

    ``mode`` ``"reflect"`` (falls back to ``"replicate"`` where a side is too short to reflect) or
    ``"constant"`` (zeros, i.e. the normalisation mean).
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return x
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"
    if mode == "constant":
        return F.pad(x, (0, pw, 0, ph))
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def tap_maps(
    backbone: nn.Module,
    x: Tensor,
    layers: Sequence[int],
    *,
    return_class_token: bool = False,
    norm: bool = True,
    pad_mode: str = "reflect",
) -> list[Any]:
    """``get_intermediate_layers(x, n=layers, reshape=True, ...)`` of any backbone, maps ``[B, C_i, h, w]``
    on the input's grid (``h = H // grid_stride``); ``layers`` are 0-based, negative from the end.

    A ConvNeXt input is first padded at the bottom/right to a multiple of 32 (:func:`pad_bottom_right`, see the
    module docstring) and the maps cropped back; a ViT input is passed unchanged (its sides must already be
    multiples of the patch size). With ``return_class_token`` each entry is ``(map, class token)``; a
    ConvNeXt's "class token" is the global average of the (padded) stage map.
    """
    n = n_taps(backbone)
    bad = [int(i) for i in layers if not -n <= int(i) < n]
    if bad:
        raise ValueError(f"layers {bad} out of range for a backbone with {n} tap points")
    layers = [int(i) % n for i in layers]
    h, w = int(x.shape[-2]), int(x.shape[-1])
    s = grid_stride(backbone)
    if is_convnext(backbone):
        x = pad_bottom_right(x, input_multiple(backbone), pad_mode)
    out = backbone.get_intermediate_layers(  # type: ignore[operator]
        x, n=list(layers), reshape=True, return_class_token=return_class_token, norm=norm
    )
    gh, gw = h // s, w // s
    result: list[Any] = []
    for item in out:
        if return_class_token:
            m, c = item
            result.append((m[..., :gh, :gw], c))
        else:
            result.append(item[..., :gh, :gw])
    return result


def receptive_radius(backbone: nn.Module, layers: Sequence[int] | None = None) -> int | None:
    """Half-width (input pixels) of the theoretical receptive field of a ConvNeXt's tapped maps, resize to
    the patch grid included (``None`` for a ViT: global attention has no finite one).

    Stem 4x4/4, then per stage a 2x2/2 downsampling (stages 1-3) and ``depths[i]`` 7x7 depthwise convs at the
    stage's stride, then the bilinear resize to the grid (one stage cell, or one grid cell when
    downsampling). ConvNeXt-T's last stage: 876 px; the tiny test config's: 276 px (the gradient of one of its
    outputs reaches 268 px). The *effective* field is much narrower (the weights decay away from the centre),
    which is why the inference adapters use a practical edge margin instead
    (:class:`~dinov3geo.inference.BackboneFeatures`).
    """
    if not is_convnext(backbone):
        return None
    depths = list(backbone.config.depths)  # type: ignore[union-attr]
    n = len(depths)
    last = max(int(i) % n for i in layers) if layers else n - 1
    rf, jump = 4, 4
    for i in range(last + 1):
        if i > 0:
            rf += jump
            jump *= 2
        rf += depths[i] * 6 * jump
    p = grid_stride(backbone)
    return math.ceil(rf / 2) + max(jump, p)
