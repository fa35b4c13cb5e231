"""Spatially separated train/validation/test splits of one raster grid.

Random pixel or tile splits leak: neighbouring pixels share crowns, and texture features or a ViT's receptive
field see across tile edges. :func:`block_split` cuts the grid into square ``block x block`` pixel blocks,
assigns whole blocks to splits (a seeded shuffle, split sizes from ``fractions``), and drops a **buffer** of
pixels wherever blocks of different splits meet.

Buffer guarantee: each side of a boundary between splits loses ``ceil(buffer / 2)`` pixels, so every pixel of
one split is more than ``buffer`` pixels away (Chebyshev distance, i.e. counting diagonal steps as one) from
every pixel of any other split: at least ``buffer`` dropped pixels lie between them in every row, column
and diagonal. Pixels at the grid edge lose nothing.

Masks can be computed for a window only (:meth:`SpatialSplit.mask` with ``window``), so a split of a large
region never needs a whole-raster array.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from rasterio.windows import Window
from scipy import ndimage

__all__ = ["SpatialSplit", "block_split"]


@dataclass(frozen=True)
class SpatialSplit:
    """Assignment of square pixel blocks of a ``height x width`` grid to named splits.

    Attributes:
        height, width: grid shape in pixels.
        block: block side in pixels.
        buffer: minimum gap in pixels between different splits (see the module docstring).
        names: split names; ``assignment`` holds indices into it.
        assignment: ``[n_block_rows, n_block_cols]`` int array, the split of each block.
        seed: the seed used for the assignment.
    """

    height: int
    width: int
    block: int
    buffer: int
    names: tuple[str, ...]
    assignment: np.ndarray
    seed: int = 0

    @property
    def margin(self) -> int:
        """Pixels dropped on each side of a boundary between splits: ``ceil(buffer / 2)``."""
        return math.ceil(self.buffer / 2)

    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown split {name!r}; the splits are {list(self.names)}") from None

    def labels(self, window: Window | None = None) -> np.ndarray:
        """Block split index of every pixel of ``window`` (whole grid by default); -1 outside the grid."""
        r0, c0, h, w = self._win(window)
        rows = np.arange(r0, r0 + h)
        cols = np.arange(c0, c0 + w)
        br = np.clip(rows // self.block, 0, self.assignment.shape[0] - 1)
        bc = np.clip(cols // self.block, 0, self.assignment.shape[1] - 1)
        lab = self.assignment[br[:, None], bc[None, :]].astype(np.int32)
        outside = ((rows < 0) | (rows >= self.height))[:, None] | ((cols < 0) | (cols >= self.width))[None, :]
        lab[outside] = -1
        return lab

    def _win(self, window: Window | None) -> tuple[int, int, int, int]:
        if window is None:
            return 0, 0, self.height, self.width
        return int(window.row_off), int(window.col_off), int(window.height), int(window.width)

    def mask(self, name: str, window: Window | None = None) -> np.ndarray:
        """Bool mask of the pixels of split ``name`` (buffer removed) over ``window`` (default whole grid)."""
        k = self._index(name)
        r0, c0, h, w = self._win(window)
        m = self.margin
        lab = self.labels(Window(c0 - m, r0 - m, w + 2 * m, h + 2 * m))
        mine = lab == k
        if m > 0:
            other = (lab != k) & (lab >= 0)
            near_other = ndimage.binary_dilation(other, structure=np.ones((2 * m + 1, 2 * m + 1), bool))
            mine &= ~near_other
        return mine[m : m + h, m : m + w]

    def masks(self, window: Window | None = None) -> dict[str, np.ndarray]:
        """``{name: mask}`` for every split."""
        return {n: self.mask(n, window) for n in self.names}

    def tiles(self, name: str, size: int, stride: int | None = None) -> list[Window]:
        """``size x size`` windows on a ``stride`` lattice (default ``size``) lying fully inside split ``name``."""
        if size < 1:
            raise ValueError(f"tile size must be >= 1, got {size}")
        stride = size if stride is None else int(stride)
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if size > self.height or size > self.width:
            return []
        mask = self.mask(name).astype(np.int64)
        integral = np.zeros((self.height + 1, self.width + 1), dtype=np.int64)
        integral[1:, 1:] = mask.cumsum(0).cumsum(1)
        out = []
        for r in range(0, self.height - size + 1, stride):
            for c in range(0, self.width - size + 1, stride):
                s = integral[r + size, c + size] - integral[r, c + size] - integral[r + size, c] + integral[r, c]
                if s == size * size:
                    out.append(Window(c, r, size, size))
        return out

    def counts(self) -> dict[str, int]:
        """Pixels per split (after the buffer)."""
        return {n: int(self.mask(n).sum()) for n in self.names}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (to record which split a benchmark used)."""
        return {
            "height": self.height,
            "width": self.width,
            "block": self.block,
            "buffer": self.buffer,
            "seed": self.seed,
            "names": list(self.names),
            "assignment": self.assignment.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpatialSplit:
        """Inverse of :meth:`to_dict`."""
        return cls(
            int(d["height"]), int(d["width"]), int(d["block"]), int(d["buffer"]), tuple(d["names"]),
            np.asarray(d["assignment"], dtype=np.int32), int(d.get("seed", 0)),
        )


def block_split(
    shape: tuple[int, int],
    *,
    block: int,
    fractions: Mapping[str, float] | None = None,
    buffer: int = 0,
    seed: int = 0,
) -> SpatialSplit:
    """Assign ``block x block`` pixel blocks of a ``shape = (height, width)`` grid to splits.

    Args:
        shape: grid (height, width) in pixels.
        block: block side in pixels (edge blocks may be smaller).
        fractions: ``{name: share of blocks}`` (normalised to sum 1), default ``{"train": 2/3, "test": 1/3}``.
            Block counts are rounded by largest remainder; every split with a positive fraction gets at least
            one block when there are enough blocks.
        buffer: minimum pixel gap between splits (see the module docstring).
        seed: seed of the block shuffle (same seed, shape and settings: same split).

    Returns:
        a :class:`SpatialSplit`.
    """
    height, width = (int(v) for v in shape)
    if height < 1 or width < 1:
        raise ValueError(f"grid shape must be positive, got {shape}")
    if block < 1:
        raise ValueError(f"block must be >= 1 pixel, got {block}")
    if buffer < 0:
        raise ValueError(f"buffer must be >= 0 pixels, got {buffer}")
    fractions = dict(fractions) if fractions is not None else {"train": 2 / 3, "test": 1 / 3}
    if not fractions or any(v < 0 for v in fractions.values()) or sum(fractions.values()) <= 0:
        raise ValueError(f"fractions must be non-negative and not all zero, got {fractions}")
    names = tuple(fractions)
    share = np.asarray([fractions[n] for n in names], dtype=np.float64)
    share = share / share.sum()
    nby, nbx = math.ceil(height / block), math.ceil(width / block)
    n = nby * nbx
    raw = share * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    # every split with a positive share gets a block when possible (taken from the largest)
    for i in np.flatnonzero((counts == 0) & (share > 0)):
        j = int(np.argmax(counts))
        if counts[j] > 1:
            counts[j] -= 1
            counts[i] += 1
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    flat = np.empty(n, dtype=np.int32)
    flat[order] = np.repeat(np.arange(len(names), dtype=np.int32), counts)
    return SpatialSplit(height, width, int(block), int(buffer), names, flat.reshape(nby, nbx), int(seed))
