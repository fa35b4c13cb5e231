"""Tiling a raster grid into fixed-size windows that cover every pixel.

Windows are always ``size x size``. Where the raster does not divide evenly, the last row/column of windows
either reaches past the edge (``edge="pad"``: the outside part is read as padding and masked invalid; windows
stay aligned to a ``stride`` lattice, which keeps tile stores grid-aligned) or is shifted back inside the
raster (``edge="shift"``: only possible when the raster is at least one window large; used by sliding-window
inference). Rasters smaller than a window get one padded window: small areas are never dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from rasterio.windows import Window

EdgeMode = Literal["pad", "shift"]


def _starts(length: int, size: int, stride: int, edge: EdgeMode) -> list[int]:
    if length <= 0:
        raise ValueError(f"raster side must be positive, got {length}")
    if length <= size:
        return [0]
    n = math.ceil((length - size) / stride) + 1
    starts = [i * stride for i in range(n)]
    if edge == "shift":
        starts[-1] = length - size
        # the shifted last window may now duplicate the one before it
        if len(starts) > 1 and starts[-1] == starts[-2]:
            starts.pop()
    return starts


def tile_windows(
    height: int,
    width: int,
    size: int,
    stride: int | None = None,
    *,
    overlap: int = 0,
    edge: EdgeMode = "pad",
) -> list[Window]:
    """All ``size x size`` windows covering a ``height x width`` raster, row-major.

    Args:
        height, width: raster shape in pixels.
        size: window side in pixels.
        stride: step between window origins; defaults to ``size - overlap``.
        overlap: pixels shared by neighbouring windows (ignored when ``stride`` is given).
        edge: ``"pad"`` keeps windows on the stride lattice and lets the last ones reach past the raster;
            ``"shift"`` moves the last window back so it ends at the raster edge.

    Returns:
        Windows (col_off, row_off, size, size); together they cover every pixel.
    """
    if size <= 0:
        raise ValueError(f"window size must be positive, got {size}")
    if stride is None:
        if not 0 <= overlap < size:
            raise ValueError(f"overlap must be in [0, size), got {overlap} for size {size}")
        stride = size - overlap
    if stride <= 0 or stride > size:
        raise ValueError(f"stride must be in (0, size], got {stride} for size {size}")
    rows = _starts(height, size, stride, edge)
    cols = _starts(width, size, stride, edge)
    return [Window(c, r, size, size) for r in rows for c in cols]


@dataclass(frozen=True)
class ClippedWindow:
    """The part of a (possibly boundless) window that lies inside a raster.

    Attributes:
        inner: the window clipped to the raster (what to actually read); ``None`` when fully outside.
        rows, cols: slices of the full window's array that ``inner`` fills.
    """

    inner: Window | None
    rows: slice
    cols: slice


def clip_window(window: Window, height: int, width: int) -> ClippedWindow:
    """Intersect ``window`` with a ``height x width`` raster; give where the data lands in the full window."""
    c0, r0 = int(window.col_off), int(window.row_off)
    w, h = int(window.width), int(window.height)
    ic0, ir0 = max(c0, 0), max(r0, 0)
    ic1, ir1 = min(c0 + w, width), min(r0 + h, height)
    if ic1 <= ic0 or ir1 <= ir0:
        return ClippedWindow(None, slice(0, 0), slice(0, 0))
    return ClippedWindow(
        Window(ic0, ir0, ic1 - ic0, ir1 - ir0),
        slice(ir0 - r0, ir1 - r0),
        slice(ic0 - c0, ic1 - c0),
    )
