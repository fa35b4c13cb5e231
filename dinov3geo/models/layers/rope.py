"""Axial 2-D rotary position embedding of DINOv3 (``dinov3/layers/rope_position_encoding.py``).

* ``periods`` (``Dh/4`` entries) is a **persistent buffer**: released checkpoints store bf16-rounded values
  and the model uses whatever the checkpoint holds.
* Coordinates are patch centres ``(arange(0.5, H)/H, arange(0.5, W)/W)`` (``normalize_coords="separate"``),
  mapped to ``[-1, 1]``; the angles are ``2*pi*coord/period`` with the y block before the x block, tiled
  twice (half-split rotation, not interleaved).
* Train-time box jittering (``shift_coords``, ``jitter_coords``, ``rescale_coords``) is drawn on every call
  in training mode only. The model calls this module once per block, so each block gets its own draw, as in
  the official code. In eval mode (or with no augmentation configured) the table is deterministic and is
  cached per ``(H, W, device, inference-mode)``; the cache is dropped whenever the buffer is reloaded or
  moved.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

_MAX_CACHE = 16


def rope_rotate_half(x: Tensor) -> Tensor:
    """``[a, b] -> [-b, a]`` over the last dimension (half split)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_apply(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate ``x`` by the tables: ``x * cos + rotate_half(x) * sin``."""
    return (x * cos) + (rope_rotate_half(x) * sin)


def compute_periods(
    head_dim: int,
    base: float | None = 100.0,
    min_period: float | None = None,
    max_period: float | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The ``Dh/4`` RoPE periods, computed in ``dtype`` exactly as the official ``_init_weights``.

    From ``base``: ``base ** (2 i / (Dh/2))``; from min/max: ``min * (max/min) ** linspace(0, 1, Dh/4)``.
    """
    n = head_dim // 4
    if base is not None:
        return base ** (2 * torch.arange(n, device=device, dtype=dtype) / (head_dim // 2))
    if min_period is None or max_period is None:
        raise ValueError("either `base` or both `min_period` and `max_period` must be given")
    ratio = max_period / min_period
    periods = ratio ** torch.linspace(0, 1, n, device=device, dtype=dtype)
    return periods / ratio * max_period


class RopePositionEmbedding(nn.Module):
    """Returns ``(sin, cos)`` tables of shape ``[H*W, Dh]`` for a patch grid of ``H x W``."""

    def __init__(
        self,
        embed_dim: int,
        *,
        num_heads: int,
        base: float | None = 100.0,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize_coords: Literal["min", "max", "separate"] = "separate",
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rescale_coords: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if embed_dim % (4 * num_heads) != 0:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 * num_heads ({4 * num_heads})")
        both = min_period is not None and max_period is not None
        if (base is None and not both) or (base is not None and both):
            raise ValueError("Either `base` or `min_period`+`max_period` must be provided.")
        if normalize_coords not in ("min", "max", "separate"):
            raise ValueError(f"unknown normalize_coords {normalize_coords!r}")
        self.base = base
        self.min_period = min_period
        self.max_period = max_period
        self.D_head = embed_dim // num_heads
        self.normalize_coords = normalize_coords
        self.shift_coords = shift_coords
        self.jitter_coords = jitter_coords
        self.rescale_coords = rescale_coords
        self.dtype = dtype
        self.register_buffer(
            "periods", torch.empty(self.D_head // 4, device=device, dtype=dtype), persistent=True
        )
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._init_weights()

    @property
    def augmentation_active(self) -> bool:
        """True when a forward call draws random box jittering (training mode and some aug configured)."""
        return self.training and any(
            v is not None for v in (self.shift_coords, self.jitter_coords, self.rescale_coords)
        )

    def _init_weights(self) -> None:
        """(Re)compute ``periods`` from ``base`` or min/max period, in the RoPE dtype."""
        periods = compute_periods(
            self.D_head,
            self.base,
            self.min_period,
            self.max_period,
            dtype=self.dtype,
            device=self.periods.device,
        )
        self.periods.data = periods
        self.clear_cache()

    def clear_cache(self) -> None:
        """Forget the cached eval-mode tables."""
        self._cache.clear()

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def _coords(self, H: int, W: int) -> Tensor:
        dd = {"device": self.periods.device, "dtype": self.dtype}
        if self.normalize_coords == "max":
            denom_h = denom_w = max(H, W)
        elif self.normalize_coords == "min":
            denom_h = denom_w = min(H, W)
        else:
            denom_h, denom_w = H, W
        coords_h = torch.arange(0.5, H, **dd) / denom_h
        coords_w = torch.arange(0.5, W, **dd) / denom_w
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        if self.training:
            if self.shift_coords is not None:
                shift_hw = torch.empty(2, **dd).uniform_(-self.shift_coords, self.shift_coords)
                coords = coords + shift_hw[None, :]
            if self.jitter_coords is not None:
                jmax = math.log(self.jitter_coords)
                jitter_hw = torch.empty(2, **dd).uniform_(-jmax, jmax).exp()
                coords = coords * jitter_hw[None, :]
            if self.rescale_coords is not None:
                rmax = math.log(self.rescale_coords)
                rescale_hw = torch.empty(1, **dd).uniform_(-rmax, rmax).exp()
                coords = coords * rescale_hw
        return coords

    def _tables(self, H: int, W: int) -> tuple[Tensor, Tensor]:
        coords = self._coords(H, W)
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return torch.sin(angles), torch.cos(angles)

    def forward(self, *, H: int, W: int) -> tuple[Tensor, Tensor]:
        if self.augmentation_active:
            return self._tables(H, W)
        key = (H, W, self.periods.device, torch.is_inference_mode_enabled())
        out = self._cache.get(key)
        if out is None:
            with torch.no_grad():
                out = self._tables(H, W)
            if len(self._cache) >= _MAX_CACHE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = out
        return out
