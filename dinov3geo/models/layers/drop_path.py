"""Stochastic depth as DINOv3 does it: residuals are computed for a random *subset of the batch*.

Unlike timm's ``DropPath`` (a per-sample Bernoulli mask on a residual computed for the whole batch),
Meta's ``SelfAttentionBlock`` evaluates each residual branch only on ``max(int(B * (1 - p)), 1)`` randomly
chosen samples and adds it back with ``index_add`` scaled by ``B / subset``. The helpers below hold that
arithmetic; :class:`~dinov3geo.models.layers.block.SelfAttentionBlock` uses them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def subset_size(batch_size: int, drop_rate: float) -> int:
    """Number of samples whose residual is computed: ``max(int(B * (1 - p)), 1)``."""
    return max(int(batch_size * (1 - drop_rate)), 1)


def residual_scale(batch_size: int, drop_rate: float) -> float:
    """Scale applied to the kept residuals so the expectation is unchanged: ``B / subset``."""
    return batch_size / subset_size(batch_size, drop_rate)


def draw_subset_indices(batch_size: int, drop_rate: float, device: torch.device | None = None) -> Tensor:
    """Random sample indices whose residual is kept (``randperm(B)[:subset]``, like the official code)."""
    return torch.randperm(batch_size, device=device)[: subset_size(batch_size, drop_rate)]
