"""Patch embedding: a stride-16 convolution, no norm, no absolute position embedding."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


class PatchEmbed(nn.Module):
    """``Conv2d(in_chans, D, k=p, s=p)``; returns ``[B, H/p, W/p, D]`` (``flatten_embedding=False``).

    Sides that are not multiples of the patch size are *floored* by the convolution (the trailing
    rows/columns are ignored), exactly as in the official model. Use
    :func:`dinov3geo.models.padding.pad_to_patch_multiple` to centre-pad instead, as Meta's eval wrappers do.
    ``img_size`` is informational only: any input size works.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        flatten_embedding: bool = False,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten_embedding = flatten_embedding
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, device=device
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # B D h w
        if self.flatten_embedding:
            return x.flatten(2).transpose(1, 2)
        return x.permute(0, 2, 3, 1)

    def reset_parameters(self) -> None:
        """PyTorch's default conv init: ``U(+-1/sqrt(in_chans * p * p))`` for weight and bias."""
        bound = math.sqrt(1 / (self.in_chans * self.patch_size[0] * self.patch_size[1]))
        nn.init.uniform_(self.proj.weight, -bound, bound)
        if self.proj.bias is not None:
            nn.init.uniform_(self.proj.bias, -bound, bound)
