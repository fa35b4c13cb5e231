"""Spatial block splits: disjoint, buffered, deterministic; tiles inside their split."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.windows import Window
from scipy import ndimage

from dinov3geo.tasks.canopy.splits import SpatialSplit, block_split


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 70),
    w=st.integers(1, 70),
    block=st.integers(1, 25),
    buffer=st.integers(0, 7),
    seed=st.integers(0, 1000),
    f_val=st.floats(0.1, 0.6),
)
def test_split_properties(h, w, block, buffer, seed, f_val):
    sp = block_split((h, w), block=block, fractions={"train": 1 - f_val, "val": f_val}, buffer=buffer, seed=seed)
    train, val = sp.mask("train"), sp.mask("val")
    assert train.shape == val.shape == (h, w)
    assert not (train & val).any()
    # every train pixel is more than `buffer` pixels (Chebyshev) from every val pixel
    if buffer > 0 and train.any():
        near_train = ndimage.binary_dilation(train, structure=np.ones((2 * buffer + 1,) * 2, bool))
        assert not (near_train & val).any()
    # pixels away from split boundaries are kept: labels without the buffer cover the grid
    lab = sp.labels()
    assert set(np.unique(lab)) <= {0, 1} and (lab >= 0).all()
    assert (train <= (lab == 0)).all() and (val <= (lab == 1)).all()
    # windowed masks equal crops of the whole mask
    win = Window(w // 3, h // 4, max(1, w // 2), max(1, h // 2))
    r, c = int(win.row_off), int(win.col_off)
    np.testing.assert_array_equal(sp.mask("val", win), val[r : r + int(win.height), c : c + int(win.width)])
    # tiles lie inside their split
    size = max(1, min(h, w) // 3)
    for name, m in (("train", train), ("val", val)):
        for t in sp.tiles(name, size, stride=max(1, size // 2)):
            r, c = int(t.row_off), int(t.col_off)
            assert t.width == t.height == size and m[r : r + size, c : c + size].all()


def test_deterministic_fractions_and_serialisation():
    a = block_split((100, 100), block=10, fractions={"train": 0.6, "val": 0.2, "test": 0.2}, buffer=4, seed=3)
    b = block_split((100, 100), block=10, fractions={"train": 0.6, "val": 0.2, "test": 0.2}, buffer=4, seed=3)
    c = block_split((100, 100), block=10, fractions={"train": 0.6, "val": 0.2, "test": 0.2}, buffer=4, seed=4)
    np.testing.assert_array_equal(a.assignment, b.assignment)
    assert not np.array_equal(a.assignment, c.assignment)
    assert np.bincount(a.assignment.ravel()).tolist() == [60, 20, 20]
    assert a.margin == 2
    r = SpatialSplit.from_dict(a.to_dict())
    np.testing.assert_array_equal(r.mask("val"), a.mask("val"))
    with pytest.raises(KeyError, match="unknown split 'tset'"):
        a.mask("tset")


def test_buffer_width_by_hand():
    # two blocks side by side: train | test; buffer 4 -> 2 columns dropped on each side of the boundary
    sp = SpatialSplit(4, 8, 4, 4, ("train", "test"), np.array([[0, 1]], dtype=np.int32))
    assert sp.mask("train")[0].tolist() == [True, True, False, False, False, False, False, False]
    assert sp.mask("test")[0].tolist() == [False] * 6 + [True, True]
    # buffer 0 drops nothing
    sp0 = SpatialSplit(4, 8, 4, 0, ("train", "test"), np.array([[0, 1]], dtype=np.int32))
    assert sp0.mask("train").sum() + sp0.mask("test").sum() == 32
    assert sp0.tiles("train", 4) == [Window(0, 0, 4, 4)] and sp0.tiles("test", 5) == []


def test_every_split_gets_a_block_and_bad_arguments():
    sp = block_split((30, 30), block=10, fractions={"train": 0.95, "test": 0.05})
    assert np.bincount(sp.assignment.ravel()).tolist() == [8, 1]
    with pytest.raises(ValueError, match="block"):
        block_split((10, 10), block=0)
    with pytest.raises(ValueError, match="fractions"):
        block_split((10, 10), block=2, fractions={"a": -1, "b": 0.5})
