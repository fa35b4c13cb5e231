"""Canopy-height heads trained by us on frozen DINOv3 features.

Two kinds, both taking the backbone's tapped levels as ``[(patch_map [B, D, h, w], cls [B, D]), ...]``:

* ``"light"`` (:class:`LightHead`): the last ``n_levels`` patch maps concatenated, a 1x1 projection, then
  ``log2(patch_size)`` *learned* x2 upsampling stages (transposed conv + 3x3 conv) up to input resolution
  ``(16 h, 16 w)`` and a 1x1 output conv. Output: direct regression (metres, ``softplus * height_scale``) or
  bin logits (read with :class:`~dinov3geo.tasks.canopy.bins.HeightBins`). About 0.1-0.5 M parameters.
  :meth:`LightHead.forward_binned` reads binned outputs out without building the full-resolution logits (the
  last stage has only ``min_channels`` channels; the ``n_bins`` logits are made and read out per row block).
* ``"dpt"`` (:class:`~dinov3geo.tasks.canopy.dpt.DPTHead`): Meta's CHMv2 head, always binned (linear, log or
  chmv2_mixlog bins); output side ``32 * ceil(h / 2)``.

:func:`build_head` / :func:`head_kind` / :func:`head_config` make heads round-trip through checkpoints.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3geo.tasks.canopy.bins import HeightBins, chunk_bytes_for, chunk_rows, readout_dtype, sum_dtype
from dinov3geo.tasks.canopy.dpt import DPTHead

__all__ = ["HEAD_KINDS", "LightHead", "build_head", "head_config", "head_kind"]

OUTPUTS = ("regression", "bins")


class _UpStage(nn.Module):
    """Learned x2 upsampling: ``GELU(conv3x3(GELU(GroupNorm(convT2x2(x)))))``."""

    def __init__(self, c_in: int, c_out: int, device: Any = None) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2, device=device)
        self.norm = nn.GroupNorm(_groups(c_out), c_out, device=device)
        self.conv = nn.Conv2d(c_out, c_out, 3, padding=1, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.conv(F.gelu(self.norm(self.up(x)))))


def _groups(c: int) -> int:
    for g in (8, 4, 2):
        if c % g == 0:
            return g
    return 1


class LightHead(nn.Module):
    """Patch-resolution head with learned upsampling to input resolution.

    Args:
        in_channels: backbone width ``D``, or one width per used level (the last ``n_levels``) when they
            differ, e.g. a ConvNeXt's stages ``[96, 192, 384, 768]``.
        n_levels: how many of the given feature levels to use (the last ``n_levels``; 1 = last layer only).
        hidden: channels after the 1x1 projection; halved at each upsampling stage (not below ``min_channels``).
        output: ``"regression"`` (1 channel, metres) or ``"bins"`` (``n_bins`` logits).
        n_bins: number of bin logits for ``output="bins"``.
        patch_size: upsampling factor (a power of two; 16 for DINOv3).
        height_scale: regression output is ``softplus(raw) * height_scale`` metres (keeps raw values ~1).
        min_channels: floor of the stage widths.
        device: where to allocate.
    """

    def __init__(
        self,
        in_channels: int | Sequence[int],
        n_levels: int = 4,
        hidden: int = 128,
        output: str = "regression",
        n_bins: int = 64,
        patch_size: int = 16,
        height_scale: float = 10.0,
        min_channels: int = 16,
        device: Any = None,
    ) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}; choose one of {OUTPUTS}")
        stages = math.log2(patch_size)
        if patch_size < 1 or not stages.is_integer():
            raise ValueError(f"patch_size must be a power of two, got {patch_size}")
        if n_levels < 1:
            raise ValueError(f"n_levels must be >= 1, got {n_levels}")
        self.n_levels = int(n_levels)
        if isinstance(in_channels, int | float):
            widths = [int(in_channels)] * self.n_levels
        else:
            widths = [int(c) for c in in_channels]
            if len(widths) != self.n_levels:
                raise ValueError(f"in_channels gives {len(widths)} widths {widths} for {self.n_levels} levels")
        #: per-level input widths; ``in_channels`` is their common value, or the list when they differ
        self.level_channels = widths
        self.in_channels: int | list[int] = widths[0] if len(set(widths)) == 1 else list(widths)
        self.hidden = int(hidden)
        self.output = output
        self.n_bins = int(n_bins) if output == "bins" else 1
        self.patch_size = int(patch_size)
        self.height_scale = float(height_scale)
        self.min_channels = int(min_channels)
        self.project = nn.Sequential(
            nn.Conv2d(sum(widths), self.hidden, 1, device=device),
            nn.GroupNorm(_groups(self.hidden), self.hidden, device=device),
            nn.GELU(),
        )
        ups = []
        c = self.hidden
        for _ in range(int(stages)):
            c_out = max(c // 2, self.min_channels)
            ups.append(_UpStage(c, c_out, device))
            c = c_out
        self.upsample = nn.Sequential(*ups)
        self.out = nn.Conv2d(c, self.n_bins, 1, device=device)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (primitive types), for checkpoints."""
        return {
            "in_channels": self.in_channels if isinstance(self.in_channels, int) else list(self.in_channels),
            "n_levels": self.n_levels,
            "hidden": self.hidden,
            "output": self.output,
            "n_bins": self.n_bins,
            "patch_size": self.patch_size,
            "height_scale": self.height_scale,
            "min_channels": self.min_channels,
        }

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Output side for an ``h x w`` patch grid: ``(patch h, patch w)``."""
        return self.patch_size * h, self.patch_size * w

    def _trunk(self, features: Sequence[tuple[Tensor, Tensor] | Tensor]) -> Tensor:
        """Projection and upsampling stages: ``[B, c, 16h, 16w]`` before the output conv."""
        if len(features) < self.n_levels:
            raise ValueError(f"the head takes {self.n_levels} feature levels, got {len(features)}")
        maps = [f[0] if isinstance(f, (tuple, list)) else f for f in features[-self.n_levels :]]
        return self.upsample(self.project(maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)))

    def forward(self, features: Sequence[tuple[Tensor, Tensor] | Tensor]) -> Tensor:
        """``[B, 1, 16h, 16w]`` metres (regression) or ``[B, n_bins, 16h, 16w]`` logits."""
        x = self.out(self._trunk(features))
        if self.output == "regression":
            x = F.softplus(x) * self.height_scale
        return x

    def forward_binned(
        self,
        features: Sequence[tuple[Tensor, Tensor] | Tensor],
        bins: HeightBins,
        with_std: bool = True,
        chunk_bytes: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``(height, std or None)`` ``[B, 1, 16h, 16w]`` (metres) of a ``output="bins"`` head, for inference.

        Equals ``bins.mean_and_std(self(features))`` up to float32 rounding. The stages run on the whole batch
        (GroupNorm needs whole maps; the last one has only ``min_channels`` channels); the 1x1 output conv and
        :meth:`~dinov3geo.tasks.canopy.bins.HeightBins.readout_` run per sample over row blocks of about
        ``chunk_bytes`` (default :func:`~dinov3geo.tasks.canopy.bins.chunk_bytes_for` the device); half-precision
        logits are read out in float32.
        """
        if self.output != "bins":
            raise ValueError("forward_binned needs a head with output='bins'")
        if bins.n_bins != self.n_bins:
            raise ValueError(f"head has {self.n_bins} outputs but the bins {bins.n_bins}")
        x = self._trunk(features)
        n, _, h, w = x.shape
        out_dtype = readout_dtype(x.dtype)
        height = x.new_empty((n, 1, h, w), dtype=out_dtype)
        std = x.new_empty((n, 1, h, w), dtype=out_dtype) if with_std else None
        rows = chunk_rows(self.n_bins, w, x.element_size(), chunk_bytes or chunk_bytes_for(x.device), h)
        scratch = x.new_empty(self.n_bins * rows * w, dtype=sum_dtype(x.device))  # the readout's block, reused
        for i in range(n):
            for r0 in range(0, h, rows):
                r1 = min(h, r0 + rows)
                m, s = bins.readout_(self.out(x[i : i + 1, :, r0:r1]).to(out_dtype), with_std, scratch)
                height[i : i + 1, :, r0:r1] = m
                if std is not None:
                    std[i : i + 1, :, r0:r1] = s
        return height, std


HEAD_KINDS: dict[str, type[nn.Module]] = {"light": LightHead, "dpt": DPTHead}


def head_kind(head: nn.Module) -> str:
    """``"light"`` or ``"dpt"`` for a head instance."""
    for name, cls in HEAD_KINDS.items():
        if isinstance(head, cls):
            return name
    raise TypeError(f"unknown head type {type(head).__name__}; expected one of {sorted(HEAD_KINDS)}")


def head_config(head: nn.Module) -> dict[str, Any]:
    """``{"kind": ..., **constructor arguments}`` of a head."""
    return {"kind": head_kind(head), **head.config()}  # type: ignore[operator]


def build_head(kind: str, **config: Any) -> nn.Module:
    """Build a head of ``kind`` (``"light"`` / ``"dpt"``) from its :func:`head_config` arguments.

    Unknown arguments raise ``ValueError`` naming them.
    """
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; choose one of {sorted(HEAD_KINDS)}")
    cls = HEAD_KINDS[kind]
    params = set(inspect.signature(cls.__init__).parameters) - {"self", "device"}
    bad = sorted(set(config) - params)
    if bad:
        raise ValueError(f"unknown {kind} head option(s) {bad}; known: {sorted(params)}")
    return cls(**config)
