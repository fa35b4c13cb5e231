"""Centre padding to a multiple of the patch size (Meta's eval ``CenterPadding``)."""

from __future__ import annotations

import itertools
import math

import torch.nn.functional as F
from torch import Tensor, nn


def _pad_amounts(size: int, multiple: int) -> tuple[int, int]:
    new_size = math.ceil(size / multiple) * multiple
    pad = new_size - size
    left = pad // 2
    return left, pad - left


def pad_to_patch_multiple(x: Tensor, multiple: int = 16, value: float = 0.0) -> Tensor:
    """Zero-pad the spatial sides of ``x`` (``[..., H, W]``) symmetrically up to a multiple of ``multiple``.

    This is ``dinov3/eval/depth/models/embed.py::CenterPadding``: the extra row/column of an odd amount
    goes to the bottom/right. A tensor whose sides already fit is returned unchanged.
    """
    pads = list(itertools.chain.from_iterable(_pad_amounts(m, multiple) for m in x.shape[:1:-1]))
    if not any(pads):
        return x
    return F.pad(x, pads, value=value)


class CenterPadding(nn.Module):
    """Module form of :func:`pad_to_patch_multiple`."""

    def __init__(self, multiple: int = 16) -> None:
        super().__init__()
        self.multiple = multiple

    def forward(self, x: Tensor) -> Tensor:
        return pad_to_patch_multiple(x, self.multiple)
