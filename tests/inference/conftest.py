"""Fixtures and helper models for the inference tests."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from dinov3geo.inference import MeanFilter


def smooth_field(h: int, w: int, bands: int = 1, seed: int = 0) -> np.ndarray:
    """A smooth synthetic image ``[bands, h, w]`` (float32, values ~1000-3000)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = []
    for _ in range(bands):
        a, b, c = rng.uniform(20, 60, 3)
        out.append(2000 + 600 * np.sin(yy / a) * np.cos(xx / b) + 300 * np.sin((xx + yy) / c))
    return np.stack(out).astype(np.float32)


class CountingMeanFilter(MeanFilter):
    """A mean filter that counts windows and can fail after a number of model calls (simulated crash)."""

    def __init__(self, size: int = 3, bands: int = 1, fail_after: int | None = None, delay: float = 0.0) -> None:
        super().__init__(size, bands)
        self.delay = delay
        self.calls = 0
        self.windows = 0
        self.fail_after = fail_after

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        self.windows += x.shape[0]
        return super().forward(x, valid)


class ConvNet(torch.nn.Module):
    """Two 3x3 convs with a nonlinearity: receptive radius 2 px."""

    def __init__(self, bands: int = 2) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(bands, 4, 3, padding=1)
        self.c2 = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.c2(torch.tanh(self.c1(x)))
