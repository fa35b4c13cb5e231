"""Property tests of the window lattice, blend weights, blocks and tiles (dinov3geo.inference.layout)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinov3geo.inference.layout import Layout, blend_weights_1d


def _weight_sum(lay: Layout) -> np.ndarray:
    """Sum of the raw blend weights of every window on the output grid (the engine's denominator)."""
    total = np.zeros((lay.out_height, lay.out_width))
    for i in range(lay.n_rows):
        for j in range(lay.n_cols):
            r, c = lay.output_origin(i, j)
            wy, wx = lay.weights(i, j)
            h = min(lay.window_out, lay.out_height - r)
            w = min(lay.window_out, lay.out_width - c)
            total[r : r + h, c : c + w] += np.outer(wy[:h], wx[:w])
    return total


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    scale = draw(st.sampled_from([1, 1, 2, 4]))
    win_out = draw(st.integers(4, 40))
    overlap_out = draw(st.integers(0, win_out - 1))
    margin = draw(st.integers(0, overlap_out // 2))
    height = draw(st.integers(1, 5 * win_out * scale))
    width = draw(st.integers(1, 5 * win_out * scale))
    stride_out = win_out - overlap_out
    bw = draw(st.integers(1, 4))
    align = draw(st.sampled_from([1, 2, 4, 8]))
    bw = max(bw, -(-(overlap_out + align) // stride_out))
    return Layout(height, width, win_out * scale, overlap_out * scale, scale, margin, bw, align=align)


@settings(max_examples=250, deadline=None)
@given(layouts())
def test_every_pixel_covered_and_normalised_weights_sum_to_one(lay: Layout) -> None:
    total = _weight_sum(lay)
    assert (total > 0).all(), "a pixel has no window with positive weight"
    # normalised weights of all windows covering a pixel sum to one
    norm = np.zeros_like(total)
    for i in range(lay.n_rows):
        for j in range(lay.n_cols):
            r, c = lay.output_origin(i, j)
            wy, wx = lay.weights(i, j)
            h = min(lay.window_out, lay.out_height - r)
            w = min(lay.window_out, lay.out_width - c)
            norm[r : r + h, c : c + w] += np.outer(wy[:h], wx[:w]) / total[r : r + h, c : c + w]
    np.testing.assert_allclose(norm, 1.0, rtol=0, atol=1e-12)
    # with at most two windows overlapping, the raw weights already form a partition of unity (up to where
    # the last, shifted window starts)
    if 2 * lay.overlap_out <= lay.window_out:
        r_end = lay.output_origin(lay.n_rows - 1, 0)[0] if lay.n_rows > 1 else lay.out_height
        c_end = lay.output_origin(0, lay.n_cols - 1)[1] if lay.n_cols > 1 else lay.out_width
        np.testing.assert_allclose(total[:r_end, :c_end], 1.0, rtol=0, atol=1e-12)


@settings(max_examples=250, deadline=None)
@given(layouts())
def test_margin_pixels_get_zero_weight_inside_the_grid(lay: Layout) -> None:
    """The edge margin (receptive field) of a window never contributes, except on the grid border."""
    if lay.n_rows < 2 or lay.margin == 0:
        return
    wy, _ = lay.weights(1, 0)  # a window with a neighbour above
    assert (wy[: lay.margin] == 0).all()
    wy0, _ = lay.weights(0, 0)  # first row: the grid border is not tapered
    assert wy0[0] == 1.0


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_tiles_partition_the_output_and_blocks_partition_the_windows(lay: Layout) -> None:
    seen = np.zeros((lay.out_height, lay.out_width), dtype=int)
    for b in lay.blocks():
        r0, r1, c0, c1 = lay.tile_rect(*b)
        seen[r0:r1, c0:c1] += 1
        if r1 < lay.out_height:
            assert r1 % lay.align == 0
    assert (seen == 1).all()
    cells = [c for b in lay.blocks() for c in lay.block_cells(*b)]
    assert sorted(cells) == [(i, j) for i in range(lay.n_rows) for j in range(lay.n_cols)]
    # every block whose extent reaches into a tile is one of its dependencies
    for t in lay.blocks():
        tr = lay.tile_rect(*t)
        deps = set(lay.tile_deps(*t))
        assert t in deps or lay.tile_rect(*t)[0] == lay.tile_rect(*t)[1]
        for b in lay.blocks():
            e = lay.block_extent(*b)
            touches = max(tr[0], e[0]) < min(tr[1], e[1]) and max(tr[2], e[2]) < min(tr[3], e[3])
            assert touches == (b in deps)


def test_blend_ramp_is_a_raised_cosine_with_flat_centre() -> None:
    w = blend_weights_1d(16, margin=2, ramp=4, taper_start=True, taper_end=True)
    assert list(w[:2]) == [0, 0] and list(w[-2:]) == [0, 0]
    assert (w[6:10] == 1).all()
    assert np.all(np.diff(w[2:6]) > 0) and w[2] > 0
    np.testing.assert_allclose(w[2:6] + w[2:6][::-1], 1.0)


def test_invalid_layouts_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="receptive margin"):
        Layout(100, 100, 32, 4, 1, 3, 4)  # overlap < 2 * margin
    with pytest.raises(ValueError, match="multiple of the model scale"):
        Layout(100, 100, 40, 16, 16, 0, 4)
    with pytest.raises(ValueError, match="overlap"):
        Layout(100, 100, 32, 32, 1, 0, 4)
