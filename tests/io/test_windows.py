"""Windowing: every pixel covered, windows on the grid, edges padded (never dropped)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinov3geo.io.windows import clip_window, tile_windows

sizes = st.integers(min_value=1, max_value=300)


@settings(max_examples=150, deadline=None)
@given(h=sizes, w=sizes, size=st.integers(1, 64), overlap_frac=st.floats(0, 0.9), edge=st.sampled_from(["pad", "shift"]))
def test_windows_cover_every_pixel(h, w, size, overlap_frac, edge):
    overlap = min(size - 1, int(size * overlap_frac))
    wins = tile_windows(h, w, size, overlap=overlap, edge=edge)
    cover = np.zeros((h, w), np.int32)
    stride = size - overlap
    for win in wins:
        assert (win.width, win.height) == (size, size)
        c = clip_window(win, h, w)
        assert c.inner is not None, "a window lies entirely outside the raster"
        cover[c.inner.row_off : c.inner.row_off + c.inner.height, c.inner.col_off : c.inner.col_off + c.inner.width] += 1
        if edge == "pad":
            assert win.col_off % stride == 0 and win.row_off % stride == 0  # on the lattice
        else:
            # shifted windows stay inside whenever the raster is at least a window large
            if w >= size:
                assert 0 <= win.col_off <= w - size
            if h >= size:
                assert 0 <= win.row_off <= h - size
    assert cover.min() >= 1
    # no two windows are identical
    assert len({(x.col_off, x.row_off) for x in wins}) == len(wins)


@settings(max_examples=100, deadline=None)
@given(h=sizes, w=sizes, size=st.integers(1, 64), r0=st.integers(-80, 300), c0=st.integers(-80, 300))
def test_clip_window_places_data(h, w, size, r0, c0):
    from rasterio.windows import Window

    src = np.arange(h * w).reshape(h, w)
    win = Window(c0, r0, size, size)
    c = clip_window(win, h, w)
    out = np.full((size, size), -1)
    if c.inner is not None:
        out[c.rows, c.cols] = src[c.inner.row_off : c.inner.row_off + c.inner.height,
                                  c.inner.col_off : c.inner.col_off + c.inner.width]
    # reference: pixel by pixel
    for i in range(size):
        for j in range(size):
            r, cc = r0 + i, c0 + j
            expect = src[r, cc] if 0 <= r < h and 0 <= cc < w else -1
            assert out[i, j] == expect


def test_small_raster_gets_one_padded_window():
    wins = tile_windows(10, 7, 256)
    assert len(wins) == 1 and (wins[0].width, wins[0].height) == (256, 256)


@pytest.mark.parametrize("kw", [dict(size=0), dict(size=8, overlap=8), dict(size=8, stride=9)])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        tile_windows(10, 10, **kw)
