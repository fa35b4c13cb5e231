"""Built-in input normalisation constants of the DINOv3 releases (spec section 1.4).

All values apply to images scaled to ``[0, 1]`` (``ToDtype(float32, scale=True)``), then
``(x - mean) / std`` per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std for RGB inputs in ``[0, 1]``."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str = ""

    def apply(self, x: Tensor) -> Tensor:
        """Normalise ``x`` (``[..., 3, H, W]``, values in ``[0, 1]``)."""
        return normalize(x, self.mean, self.std)


#: Web models (LVD-1689M): ImageNet statistics.
LVD1689M = Normalization(
    "lvd1689m", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "web LVD-1689M models (ImageNet mean/std)"
)
#: Satellite models (SAT-493M), as in the DINOv3 README and timm's ``*.sat493m`` configs.
SAT493M = Normalization(
    "sat493m", (0.430, 0.411, 0.296), (0.213, 0.156, 0.143), "satellite SAT-493M models (DINOv3 README)"
)
#: Variant used by Meta's CHMv2 notebook and HF ``CHMv2ImageProcessor``: red mean 0.420 instead of 0.430.
SAT493M_CHMV2 = Normalization(
    "sat493m_chmv2",
    (0.420, 0.411, 0.296),
    (0.213, 0.156, 0.143),
    "CHMv2 canopy-height inference (notebooks/chmv2_inference.ipynb); differs from SAT-493M in the red mean",
)

NORMALIZATIONS: dict[str, Normalization] = {n.name: n for n in (LVD1689M, SAT493M, SAT493M_CHMV2)}
NORMALIZATIONS["imagenet"] = LVD1689M


def get_normalization(name: str) -> Normalization:
    """Look up ``lvd1689m`` (alias ``imagenet``), ``sat493m`` or ``sat493m_chmv2``."""
    key = name.lower().replace("-", "").replace("_", "")
    for k, v in NORMALIZATIONS.items():
        if k.replace("_", "") == key:
            return v
    raise KeyError(f"unknown normalization {name!r}; known: {sorted(NORMALIZATIONS)}")


def normalize(
    x: Tensor, mean: tuple[float, ...] | list[float], std: tuple[float, ...] | list[float]
) -> Tensor:
    """``(x - mean) / std`` over the channel dimension ``-3`` of ``x``."""
    if x.shape[-3] != len(mean) or len(mean) != len(std):
        raise ValueError(f"input has {x.shape[-3]} channels but mean/std have {len(mean)}/{len(std)} entries")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    m = torch.as_tensor(mean, dtype=dtype, device=x.device)[:, None, None]
    s = torch.as_tensor(std, dtype=dtype, device=x.device)[:, None, None]
    return (x.to(dtype) - m) / s
