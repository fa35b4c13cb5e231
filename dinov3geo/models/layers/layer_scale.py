"""LayerScale: a learnable per-channel scale on each residual branch (``dinov3/layers/layer_scale.py``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerScale(nn.Module):
    """``x * gamma`` with ``gamma`` initialised to ``init_values`` (1e-5 in every DINOv3 release)."""

    def __init__(
        self, dim: int, init_values: float = 1e-5, inplace: bool = False, device: torch.device | None = None
    ):
        super().__init__()
        self.inplace = inplace
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.empty(dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fill ``gamma`` with ``init_values``."""
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma
