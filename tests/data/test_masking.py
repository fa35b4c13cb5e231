"""Tests of iBOT block masking and the collate-time mask construction."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dinov3geo.data.masking import MaskingGenerator, collate_ibot_masks


def _generator(h: int, w: int, seed: int = 0) -> MaskingGenerator:
    return MaskingGenerator((h, w), max_num_patches=0.5 * h * w, seed=seed)


def test_collate_counts_ratios_and_half_masked() -> None:
    n_images, n = 12, 100
    out = collate_ibot_masks(n_images, n, _generator(10, 10), rng=random.Random(0))
    masks = out["collated_masks"]
    assert masks.shape == (n_images, n) and masks.dtype == torch.bool
    counts = masks.sum(-1)
    # int(12 * 0.5) = 6 masked images, ratios linspace(0.1, 0.5, 7)[1:] in float32. Official quirk: the
    # third ratio is 0.29999998 in float32, so int(100 * r) = 29, not 30 as float64 arithmetic would give.
    assert sorted(counts[counts > 0].tolist()) == [16, 23, 29, 36, 43, 50]
    assert int((counts == 0).sum()) == n_images - 6
    ratios = counts[counts > 0].float() / n
    assert bool((ratios > 0.1).all()) and bool((ratios <= 0.5).all())
    assert out["upperbound"] == 16 + 23 + 29 + 36 + 43 + 50
    assert out["n_masked_patches"].tolist() == [int(counts.sum())]
    assert out["n_masked_patches"].dtype == torch.long


def test_collate_indices_and_weights() -> None:
    out = collate_ibot_masks(8, 64, _generator(8, 8), rng=random.Random(1))
    masks = out["collated_masks"]
    flat = [i * 64 + j for i in range(8) for j in range(64) if masks[i, j]]
    assert out["mask_indices_list"].tolist() == flat
    expected_w = [1.0 / int(masks[i].sum()) for i in range(8) for j in range(64) if masks[i, j]]
    np.testing.assert_allclose(out["masks_weight"].numpy(), expected_w, rtol=1e-6)
    # Summing the weights gives one unit per masked image.
    assert out["masks_weight"].sum().item() == pytest.approx(int((masks.sum(-1) > 0).sum()))


def test_collate_odd_batch_and_probability() -> None:
    out = collate_ibot_masks(5, 16, _generator(4, 4), mask_probability=0.5, rng=random.Random(0))
    assert int((out["collated_masks"].sum(-1) > 0).sum()) == 2  # int(5 * 0.5)
    none = collate_ibot_masks(4, 16, _generator(4, 4), mask_probability=0.0, rng=random.Random(0))
    assert int(none["collated_masks"].sum()) == 0 and none["mask_indices_list"].numel() == 0
    with pytest.raises(ValueError):
        collate_ibot_masks(4, 15, _generator(4, 4))


def test_reproducible_with_seed_and_shuffled() -> None:
    def run(seed: int) -> torch.Tensor:
        gen = _generator(14, 14, seed=seed)
        return collate_ibot_masks(16, 196, gen, rng=random.Random(seed))["collated_masks"]

    torch.testing.assert_close(run(3), run(3), rtol=0, atol=0)
    assert not torch.equal(run(3), run(4))
    # The masked images are shuffled into the batch, not always the first half.
    layouts = {tuple((run(s).sum(-1) > 0).tolist()) for s in range(6)}
    assert len(layouts) > 1


def test_default_global_rngs_match_explicit_generators() -> None:
    """Without generators the global ``random``/``numpy.random`` are used, as in the official code."""
    random.seed(7)
    np.random.seed(7)  # noqa: NPY002 - the official code draws from the legacy global numpy RNG
    official_style = collate_ibot_masks(6, 36, MaskingGenerator((6, 6), max_num_patches=18))

    py_rng = random.Random(7)
    explicit = collate_ibot_masks(
        6,
        36,
        MaskingGenerator((6, 6), max_num_patches=18, rng=py_rng, np_rng=np.random.RandomState(7)),
        rng=py_rng,
    )
    torch.testing.assert_close(official_style["collated_masks"], explicit["collated_masks"], rtol=0, atol=0)
    assert int(explicit["collated_masks"].sum()) > 0


def test_circular_shift_keeps_counts() -> None:
    out = collate_ibot_masks(8, 64, _generator(8, 8), random_circular_shift=True, rng=random.Random(2))
    counts = sorted(out["collated_masks"].sum(-1).tolist())
    expected = sorted([0] * 4 + [int(64 * p) for p in torch.linspace(0.1, 0.5, 5)[1:]])
    assert counts == expected


class _RecordingGenerator(MaskingGenerator):
    """Records what each rectangle step added, to check it is a rectangle."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.steps: list[tuple[np.ndarray, np.ndarray, int, float]] = []

    def _mask(self, mask: np.ndarray, max_mask_patches: float) -> int:
        before = mask.copy()
        delta = super()._mask(mask, max_mask_patches)
        self.steps.append((before, mask.copy(), delta, max_mask_patches))
        return delta


def test_block_masks_are_rectangles_plus_top_up() -> None:
    h, w = 14, 14
    for seed in range(5):
        gen = _RecordingGenerator((h, w), max_num_patches=0.5 * h * w, seed=seed)
        target = 70
        block = gen.block_mask(target)
        assert gen.steps, "at least one rectangle attempt"
        for before, after, delta, max_new in gen.steps:
            new = after & ~before
            assert int(new.sum()) == delta <= max_new
            assert bool((after >= before).all())
            if delta:
                rows, cols = np.nonzero(new)
                r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
                # The new patches lie in one rectangle that is fully masked afterwards.
                assert bool(after[r0:r1, c0:c1].all())
                assert r1 - r0 < h and c1 - c0 < w
        assert int(block.sum()) <= target
        assert int(block.sum()) > 0
        # __call__ = the same rectangles, then a random top-up to the exact count.
        gen2 = MaskingGenerator((h, w), max_num_patches=0.5 * h * w, seed=seed)
        full = gen2(target)
        assert int(full.sum()) == target
        assert bool((full >= block).all())


def test_small_grid_uses_top_up_only() -> None:
    # Rectangles need h < H and w < W, so a 1 x N grid is filled by the random top-up alone.
    gen = MaskingGenerator((1, 9), max_num_patches=4.5, seed=0)
    assert not gen.block_mask(4).any()
    assert int(gen(4).sum()) == 4


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 20),
    w=st.integers(1, 20),
    ratio=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_generator_count_is_exact(h: int, w: int, ratio: float, seed: int) -> None:
    n = h * w
    count = int(n * ratio)
    mask = MaskingGenerator((h, w), max_num_patches=0.5 * n, seed=seed)(count)
    assert mask.shape == (h, w) and mask.dtype == bool
    assert int(mask.sum()) == count


@settings(max_examples=40, deadline=None)
@given(
    side=st.integers(2, 16),
    n_images=st.integers(1, 16),
    lo=st.floats(0.0, 0.5),
    width=st.floats(0.01, 0.5),
    prob=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_collate_counts_follow_float32_linspace(
    side: int, n_images: int, lo: float, width: float, prob: float, seed: int
) -> None:
    n = side * side
    hi = lo + width
    out = collate_ibot_masks(
        n_images, n, _generator(side, side, seed), (lo, hi), prob, rng=random.Random(seed)
    )
    n_masked = int(n_images * prob)
    ratios = torch.linspace(lo, hi, n_masked + 1).numpy()[1:]
    # Official count: int(N * r) evaluated in float32.
    expected = [int(np.float32(n) * np.float32(r)) for r in ratios] + [0] * (n_images - n_masked)
    assert sorted(out["collated_masks"].sum(-1).tolist()) == sorted(expected)
    assert out["upperbound"] == sum(expected)
    assert int(out["n_masked_patches"]) == sum(expected)
