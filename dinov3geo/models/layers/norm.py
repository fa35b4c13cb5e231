"""Normalisation layers and the name -> layer table of ``DinoVisionTransformer`` (``norm_layer_dict``)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learnable scale (``dinov3/layers/rms_norm.py``), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5, device: torch.device | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def reset_parameters(self) -> None:
        """Reset the scale to ones."""
        nn.init.constant_(self.weight, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


#: Default eps of each named norm. ``layernormbf16`` (eps 1e-5) is what every released checkpoint uses.
NORM_LAYERS: dict[str, float] = {"layernorm": 1e-6, "layernormbf16": 1e-5, "rmsnorm": 1e-5}


def make_norm_layer(name: str, eps: float | None = None) -> Callable[..., nn.Module]:
    """Return a constructor ``f(dim)`` for the norm called ``name``; ``eps`` overrides its default eps."""
    if name not in NORM_LAYERS:
        raise ValueError(f"unknown norm_layer {name!r}; choose one of {sorted(NORM_LAYERS)}")
    eps = NORM_LAYERS[name] if eps is None else float(eps)
    if name == "rmsnorm":
        return partial(RMSNorm, eps=eps)
    return partial(nn.LayerNorm, eps=eps)
