"""Where windows go, how they are weighted, and how the region is cut into independent blocks.

Geometry of a run (all sizes in pixels):

* Windows of ``window x window`` *input* pixels sit on a lattice with step ``stride = window - overlap``
  starting at the grid origin; the last row/column of windows is shifted back to end at the grid edge, so
  every window holds real pixels and the model pads the grid border as it would pad a whole image. A grid
  smaller than a window gets one window padded past the edge (masked): nothing is dropped.
* A model whose features sit on a coarser grid than its output (a ConvNeXt: stride 32) declares
  ``start_align``: every window origin, the shifted last ones included, is a multiple of it, so every window
  puts its stage cells on the same pixels and overlapping windows compute the same features away from their
  edges. The last window then ends up to ``start_align - 1`` pixels past the grid edge; with ``edge_fill =
  "reflect"`` the engine fills those pixels by mirroring the grid at its edge (they stay invalid), which is
  exactly the reflection padding the model applies to a whole image.
* The model turns a window into ``window / scale`` *output* pixels per side (``scale`` 1 for dense heads, 16
  for ViT patch features). Blending happens on the output grid.
* :func:`blend_weights_1d` gives each window a separable weight: zero on an edge ``margin`` (at least the
  model's receptive field, so pixels that saw the window's padding never count), a raised-cosine ramp of
  ``ramp = overlap - 2 * margin`` pixels and a flat centre of 1. A window's ramp down and its neighbour's
  ramp up are ``cos^2`` and ``sin^2`` of the same angle, so the weights of neighbouring lattice windows add
  up to exactly one (a partition of unity) wherever at most two windows overlap (``overlap <= window / 2``);
  elsewhere (more overlap, the shifted last window) the final division by the summed weights normalises
  them. Sides of a window that lie on the
  grid border are not tapered (there is no neighbour there).
* Windows are grouped into *blocks* of ``block_windows x block_windows`` lattice cells. A block's windows are
  processed together and their weighted sums ``sum(w * y)`` and ``sum(w)`` over the block's *extent* (the
  union of its windows on the output grid) are the block's partial result, which is independent of every
  other block: blocks can be skipped on resume or farmed out to dask workers.
* The output grid is cut into *tiles*, one per block, on the block boundaries snapped down to the COG block
  size (so tile writes never re-encode a partial COG block). A tile's final values are the sum of the
  partial results of the (at most four) blocks whose extents reach into it, divided by the summed weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from rasterio.windows import Window

__all__ = ["Layout", "blend_weights_1d", "default_overlap", "finalise_blend", "lattice_starts", "min_window",
           "nearest_multiples", "round_up"]

Rect = tuple[int, int, int, int]  # (row0, row1, col0, col1), half-open


def lattice_starts(length: int, window: int, stride: int) -> int:
    """Number of lattice windows (origins ``0, stride, 2*stride, ...``) needed to cover ``length`` pixels."""
    if length <= 0:
        raise ValueError(f"grid side must be positive, got {length}")
    if length <= window:
        return 1
    return math.ceil((length - window) / stride) + 1


def blend_weights_1d(length: int, margin: int, ramp: int, taper_start: bool, taper_end: bool) -> np.ndarray:
    """Weights along one side of a window (``float64``, ``length`` values).

    Args:
        length: window side in output pixels.
        margin: pixels at a tapered edge that get weight 0 (the model's receptive field).
        ramp: length of the raised-cosine ramp after the margin (0: hard crop).
        taper_start, taper_end: whether the low / high side is tapered (False on the grid border).

    The ramp values are ``sin^2(pi/2 * (k + 0.5) / ramp)``, ``k = 0..ramp-1``: strictly positive, and the
    mirrored ramp of the neighbouring window is ``1 -`` this, so the two sum to one.
    """
    if margin < 0 or ramp < 0:
        raise ValueError(f"margin and ramp must be >= 0, got {margin}, {ramp}")
    if (taper_start or taper_end) and 2 * margin >= length:
        raise ValueError(f"edge margin {margin} leaves nothing of a {length} px window")
    k = np.arange(ramp, dtype=np.float64)
    up = np.sin(0.5 * np.pi * (k + 0.5) / ramp) ** 2 if ramp else k
    w = np.ones(length, dtype=np.float64)
    if taper_start:
        lo = np.ones(length, dtype=np.float64)
        lo[:margin] = 0.0
        n = min(ramp, length - margin)
        lo[margin : margin + n] = up[:n]
        w *= lo
    if taper_end:
        hi = np.ones(length, dtype=np.float64)
        if margin:
            hi[length - margin :] = 0.0
        n = min(ramp, length - margin)
        hi[length - margin - n : length - margin] = up[:n][::-1]
        w *= hi
    return w


def round_up(value: int, multiple: int) -> int:
    """The smallest positive multiple of ``multiple`` that is ``>= value``."""
    return max(multiple, -(-int(value) // multiple) * multiple)


def nearest_multiples(value: int, multiple: int) -> str:
    """``"128 or 144"``: the valid sizes around ``value`` (only the upper one when the lower is not positive),
    for messages that refuse a size that is not a multiple."""
    down, up = int(value) // multiple * multiple, round_up(value, multiple)
    return f"{down} or {up}" if 0 < down < up else f"{up}"


def default_overlap(window: int, scale: int, receptive_margin: int, context: bool = False) -> int:
    """The overlap a run uses when none is given: a quarter window (half a window for ``context`` models), and
    at least twice the receptive margin (in whole output pixels) plus a two-output-pixel ramp; a multiple of
    ``scale``.

    ``context``: the model's output depends on the whole window (a ViT's global attention), so neighbouring
    windows disagree everywhere, not only near their borders; half-window overlap gives their blend a ramp of
    ``window / 2 - 2 * margin`` pixels, wide enough to hide that disagreement (a quarter window left the
    demo's canopy model, window 256 and margin 32, a 2 px ramp: a visible step at every window border).
    """
    margin_out = math.ceil(receptive_margin / scale)
    want = max(window // (2 if context else 4), 2 * margin_out * scale + 2 * scale)
    return math.ceil(want / scale) * scale


def min_window(scale: int, receptive_margin: int, multiple: int = 1, overlap: int | None = None,
               context: bool = False, start_align: int = 1) -> int:
    """The smallest window that works for a model: a multiple of both ``scale`` and ``multiple`` (the model's
    own window constraint, e.g. 16 for a ViT) that is larger than its overlap (``overlap``, or the default
    one, see :func:`default_overlap`) by at least the window-origin step ``lcm(scale, start_align)`` (a
    ConvNeXt: 32). Messages advising a window size give this (or more), never a value the model refuses."""
    step = math.lcm(int(scale), int(multiple))
    a = math.lcm(int(scale), int(start_align))
    w = step
    while w - (default_overlap(w, scale, receptive_margin, context) if overlap is None else overlap) < a:
        w += step
    return w


@dataclass(frozen=True)
class Layout:
    """Window lattice, blend weights, blocks and tiles of one run (see the module docstring).

    Attributes:
        height, width: input grid shape.
        window: window side in input pixels (a multiple of ``scale``).
        overlap: overlap of neighbouring windows in input pixels (a multiple of ``scale``).
        scale: input pixels per output pixel.
        margin: edge margin in output pixels (weight 0).
        block_windows: lattice cells per block side.
        align: tile boundaries are snapped to multiples of this (the COG block size), in output pixels.
        start_align: window origins are multiples of this (and of ``scale``), in input pixels.
        edge_fill: what a window sees past the grid edge: ``"zeros"`` or ``"reflect"`` (the grid mirrored at
            its edge, as ``numpy.pad(mode="reflect")``); those pixels are invalid either way.
    """

    height: int
    width: int
    window: int
    overlap: int
    scale: int
    margin: int
    block_windows: int
    align: int = 1
    start_align: int = 1
    edge_fill: str = "zeros"

    def __post_init__(self) -> None:
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        if self.window <= 0 or self.window % self.scale:
            raise ValueError(f"window {self.window} must be a positive multiple of the model scale {self.scale}: "
                             f"use {nearest_multiples(self.window, self.scale)}")
        if self.overlap < 0 or self.overlap >= self.window or self.overlap % self.scale:
            raise ValueError(
                f"overlap {self.overlap} must be in [0, window) and a multiple of the model scale {self.scale}"
            )
        if self.ramp < 0:
            raise ValueError(
                f"overlap {self.overlap} px is too small for the model's edge margin of {self.margin * self.scale}"
                f" px on each side; use overlap >= {2 * self.margin * self.scale} (2 x receptive margin)"
            )
        if self.block_windows < 1:
            raise ValueError(f"block_windows must be >= 1, got {self.block_windows}")
        if self.start_align < 1:
            raise ValueError(f"start_align must be >= 1, got {self.start_align}")
        if self.edge_fill not in ("zeros", "reflect"):
            raise ValueError(f"edge_fill must be 'zeros' or 'reflect', got {self.edge_fill!r}")
        a = self.origin_multiple
        if self.stride % a and (self.n_rows > 1 or self.n_cols > 1):  # (one window: no lattice to align)
            lo, hi = self.window - (self.stride // a + 1) * a, self.window - (self.stride // a) * a
            ok = " or ".join(str(v) for v in (lo, hi) if 0 <= v < self.window)
            raise ValueError(
                f"overlap {self.overlap} puts windows {self.stride} px apart, off the model's {a} px feature grid: "
                f"use an overlap with window - overlap a multiple of {a}" + (f", e.g. {ok}" if ok else "")
            )
        if self.block_windows * self.stride_out < self.overlap_out + self.align and self.n_blocks_total > 1:
            raise ValueError(
                f"blocks of {self.block_windows} windows are too small for overlap {self.overlap} and tile "
                f"alignment {self.align}; use larger blocks"
            )

    # ------------------------------------------------------------------ sizes
    @property
    def stride(self) -> int:
        """Lattice step in input pixels."""
        return self.window - self.overlap

    @property
    def origin_multiple(self) -> int:
        """Window origins are multiples of this (input pixels): ``lcm(scale, start_align)``."""
        return math.lcm(self.scale, self.start_align)

    @property
    def window_out(self) -> int:
        return self.window // self.scale

    @property
    def stride_out(self) -> int:
        return self.stride // self.scale

    @property
    def overlap_out(self) -> int:
        return self.overlap // self.scale

    @property
    def ramp(self) -> int:
        """Raised-cosine ramp length in output pixels (overlap minus both margins)."""
        return self.overlap_out - 2 * self.margin

    @property
    def out_height(self) -> int:
        return math.ceil(self.height / self.scale)

    @property
    def out_width(self) -> int:
        return math.ceil(self.width / self.scale)

    @cached_property
    def n_rows(self) -> int:
        """Window rows of the lattice."""
        return lattice_starts(self.height, self.window, self.stride)

    @cached_property
    def n_cols(self) -> int:
        return lattice_starts(self.width, self.window, self.stride)

    @property
    def n_windows(self) -> int:
        return self.n_rows * self.n_cols

    @property
    def n_block_rows(self) -> int:
        return math.ceil(self.n_rows / self.block_windows)

    @property
    def n_block_cols(self) -> int:
        return math.ceil(self.n_cols / self.block_windows)

    @property
    def n_blocks_total(self) -> int:
        return self.n_block_rows * self.n_block_cols

    # ------------------------------------------------------------------ windows
    def _start(self, k: int, n: int, length: int) -> int:
        """Input-pixel origin of the ``k``-th of ``n`` windows along a side of ``length`` pixels.

        The last window is shifted back to end at the grid edge (origin rounded up to a multiple of
        :attr:`origin_multiple`, so it may overhang by less than that) when the grid is at least a window long:
        the model sees real pixels and applies its own padding at the grid border as on a whole image. Smaller
        grids get one window padded past the edge.
        """
        start = k * self.stride
        if k == n - 1 and k > 0 and length >= self.window:
            a = self.origin_multiple
            start = min(start, -(-(length - self.window) // a) * a)
        return start

    def input_window(self, i: int, j: int) -> Window:
        """Input-pixel window of lattice cell ``(i, j)`` (may reach past the grid when it is small)."""
        return Window(
            self._start(j, self.n_cols, self.width), self._start(i, self.n_rows, self.height), self.window, self.window
        )

    def output_origin(self, i: int, j: int) -> tuple[int, int]:
        """(row, col) of the window's first output pixel."""
        return (
            self._start(i, self.n_rows, self.height) // self.scale,
            self._start(j, self.n_cols, self.width) // self.scale,
        )

    @cached_property
    def _weights_cache(self) -> dict[tuple[bool, bool], np.ndarray]:
        L, m, r = self.window_out, self.margin, self.ramp
        return {(a, b): blend_weights_1d(L, m, r, a, b) for a in (False, True) for b in (False, True)}

    def weights(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Separable blend weights ``(wy, wx)`` of window ``(i, j)`` on the output grid."""
        wy = self._weights_cache[(i > 0, i < self.n_rows - 1)]
        wx = self._weights_cache[(j > 0, j < self.n_cols - 1)]
        return wy, wx

    # ------------------------------------------------------------------ blocks
    def blocks(self) -> list[tuple[int, int]]:
        """All block indices, row-major."""
        return [(bi, bj) for bi in range(self.n_block_rows) for bj in range(self.n_block_cols)]

    def block_cells(self, bi: int, bj: int) -> list[tuple[int, int]]:
        """Lattice cells ``(i, j)`` of a block, row-major."""
        b = self.block_windows
        return [
            (i, j)
            for i in range(bi * b, min((bi + 1) * b, self.n_rows))
            for j in range(bj * b, min((bj + 1) * b, self.n_cols))
        ]

    def _block_span(self, bk: int, n: int, length: int) -> tuple[int, int]:
        """Input-pixel [start, end) of the windows of block ``bk`` along one side."""
        b = self.block_windows
        k0, k1 = bk * b, min((bk + 1) * b, n) - 1
        return self._start(k0, n, length), self._start(k1, n, length) + self.window

    def block_extent(self, bi: int, bj: int) -> Rect:
        """Output-pixel rectangle covered by a block's windows (clipped to the output grid)."""
        r0, r1 = self._block_span(bi, self.n_rows, self.height)
        c0, c1 = self._block_span(bj, self.n_cols, self.width)
        s = self.scale
        return (r0 // s, min(r1 // s, self.out_height), c0 // s, min(c1 // s, self.out_width))

    def block_input_window(self, bi: int, bj: int) -> Window:
        """Input-pixel window covered by a block's windows (may reach past the grid)."""
        r0, r1 = self._block_span(bi, self.n_rows, self.height)
        c0, c1 = self._block_span(bj, self.n_cols, self.width)
        return Window(c0, r0, c1 - c0, r1 - r0)

    # ------------------------------------------------------------------ tiles
    def _tile_edges(self, n_blocks: int, out_len: int) -> list[int]:
        step = self.block_windows * self.stride_out
        edges = [0] + [(k * step // self.align) * self.align for k in range(1, n_blocks)] + [out_len]
        return [min(e, out_len) for e in edges]

    @cached_property
    def _row_edges(self) -> list[int]:
        return self._tile_edges(self.n_block_rows, self.out_height)

    @cached_property
    def _col_edges(self) -> list[int]:
        return self._tile_edges(self.n_block_cols, self.out_width)

    def tile_rect(self, bi: int, bj: int) -> Rect:
        """Output-pixel rectangle of tile ``(bi, bj)``; the tiles partition the output grid."""
        return (self._row_edges[bi], self._row_edges[bi + 1], self._col_edges[bj], self._col_edges[bj + 1])

    def tile_deps(self, bi: int, bj: int) -> list[tuple[int, int]]:
        """Blocks whose extents reach into tile ``(bi, bj)`` (row-major; the block itself included)."""
        t = self.tile_rect(bi, bj)
        deps = []
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                ni, nj = bi + di, bj + dj
                inside = 0 <= ni < self.n_block_rows and 0 <= nj < self.n_block_cols
                if inside and _intersect(t, self.block_extent(ni, nj)) is not None:
                    deps.append((ni, nj))
        return deps


def finalise_blend(total: np.ndarray, dtype: np.dtype | str, nodata: float | None) -> np.ndarray:
    """Blended outputs from summed windows: ``total`` is ``[K + 1, h, w]`` float32, ``sum(w * y)`` in bands
    ``0..K-1`` and ``sum(w)`` in band ``K`` (the engine's accumulators of the windows reaching a region).

    Returns ``sum(w * y) / sum(w)`` as ``[K, h, w]`` in ``dtype`` (rounded and clipped for integer types);
    ``nodata`` (0 when None) where ``sum(w)`` is 0, i.e. no valid input pixel contributed. The first ``K``
    bands of ``total`` are overwritten (no temporaries of the region's size); for float32 the result is a
    view of them. The same steps as :func:`dinov3geo.inference.predict_raster` finalising a tile.
    """
    k = total.shape[0] - 1
    dtype = np.dtype(dtype)
    den = total[k]
    has = den > 0
    out = total[:k]
    np.divide(out, den, out=out, where=has)
    fill = nodata if nodata is not None else 0
    empty = ~has if not has.all() else None
    if empty is not None:
        out[:, empty] = 0  # the sums there may hold NaN (a model's NaN times weight 0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        np.rint(out, out=out)
        np.clip(out, info.min, info.max, out=out)
    out = out.astype(dtype, copy=False)
    if empty is not None:
        out[:, empty] = fill
    return out


def _intersect(a: Rect, b: Rect) -> Rect | None:
    r0, r1 = max(a[0], b[0]), min(a[1], b[1])
    c0, c1 = max(a[2], b[2]), min(a[3], b[3])
    if r1 <= r0 or c1 <= c0:
        return None
    return (r0, r1, c0, c1)
