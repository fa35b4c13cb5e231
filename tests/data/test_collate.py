"""Tests of the multi-crop collate (crop-major stacking, nodata masks, iBOT masks)."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from dinov3geo.data.augmentations import MultiCropAugmentation
from dinov3geo.data.collate import MultiCropCollator, collate_data_and_cast, patch_valid_fraction


def _sample(
    sid: int, g: int = 64, loc: int = 32, n_local: int = 3, gram: int | None = None, c: int = 2
) -> dict:
    """Crops filled with ``100 * sample + crop`` so the stacking order is visible."""
    out = {
        "global_crops": [torch.full((c, g, g), 100.0 * sid + i) for i in range(2)],
        "global_crops_valid": [torch.ones(g, g, dtype=torch.bool) for _ in range(2)],
        "local_crops": [torch.full((c, loc, loc), 100.0 * sid + 10 + i) for i in range(n_local)],
        "local_crops_valid": [torch.ones(loc, loc, dtype=torch.bool) for _ in range(n_local)],
        "index": sid,
    }
    if gram:
        out["gram_teacher_crops"] = [torch.full((c, gram, gram), 100.0 * sid + 50 + i) for i in range(2)]
        out["gram_teacher_crops_valid"] = [torch.ones(gram, gram, dtype=torch.bool) for _ in range(2)]
    return out


def test_shapes_and_crop_major_ordering() -> None:
    b = 4
    samples = [_sample(s, gram=96) for s in range(b)]
    out = collate_data_and_cast(samples, rng=random.Random(0), np_rng=np.random.default_rng(0))
    gc, lc, gr = out["collated_global_crops"], out["collated_local_crops"], out["collated_gram_teacher_crops"]
    assert (
        gc.shape == (2 * b, 2, 64, 64) and lc.shape == (3 * b, 2, 32, 32) and gr.shape == (2 * b, 2, 96, 96)
    )
    # upstream order: all samples' crop 0, then all samples' crop 1
    assert gc[:, 0, 0, 0].tolist() == [100.0 * s + i for i in range(2) for s in range(b)]
    assert lc[:, 0, 0, 0].tolist() == [100.0 * s + 10 + i for i in range(3) for s in range(b)]
    assert gr[:, 0, 0, 0].tolist() == [100.0 * s + 50 + i for i in range(2) for s in range(b)]
    assert out["collated_global_crops_valid"].shape == (2 * b, 64, 64)
    assert out["collated_local_crops_valid"].shape == (3 * b, 32, 32)
    assert out["collated_gram_teacher_crops_valid"].shape == (2 * b, 96, 96)
    assert out["collated_global_patch_valid"].shape == (2 * b, 16)
    assert out["collated_local_patch_valid"].shape == (3 * b, 4)
    assert out["indices"].tolist() == list(range(b))
    assert (out["global_crops_size"], out["local_crops_size"]) == (64, 32)


def test_ibot_mask_counts() -> None:
    b = 6
    out = collate_data_and_cast([_sample(s, g=128) for s in range(b)], rng=random.Random(1))
    masks = out["collated_masks"]
    n = 64  # (128 / 16) ** 2
    assert masks.shape == (2 * b, n) and masks.dtype == torch.bool
    counts = masks.sum(-1)
    n_masked = int(2 * b * 0.5)
    probs = torch.linspace(0.1, 0.5, n_masked + 1)
    expected = sorted(int(n * p) for p in probs[1:])
    assert sorted(counts[counts > 0].tolist()) == expected
    assert int((counts == 0).sum()) == 2 * b - n_masked
    assert out["upperbound"] == sum(expected)
    assert int(out["n_masked_patches"]) == int(counts.sum()) == out["mask_indices_list"].numel()
    torch.testing.assert_close(out["masks_weight"].sum(), torch.tensor(float(n_masked)))
    assert torch.equal(masks.flatten().nonzero().flatten(), out["mask_indices_list"])


def test_dtype_cast_tuple_samples_and_local_batch_size() -> None:
    samples = [(_sample(s), ()) for s in range(2)]  # upstream-style (output, target) pairs
    out = collate_data_and_cast(samples, dtype=torch.bfloat16, local_batch_size=4)
    assert out["collated_global_crops"].dtype == torch.bfloat16
    assert out["collated_local_crops"].dtype == torch.bfloat16
    assert out["collated_global_crops_valid"].dtype == torch.bool
    assert out["collated_masks"].shape == (8, 16)  # masks cover n_global * local_batch_size images


def test_single_size_per_batch_and_mixed_resolution_batches() -> None:
    with pytest.raises(ValueError, match="single crop size"):
        collate_data_and_cast([_sample(0, g=64), _sample(1, g=96)])
    for g in (64, 96, 128):  # each batch gets the mask grid of its own global size
        out = collate_data_and_cast([_sample(s, g=g) for s in range(2)])
        assert out["collated_masks"].shape == (4, (g // 16) ** 2)
    with pytest.raises(ValueError, match="n_tokens"):
        collate_data_and_cast([_sample(0)], n_tokens=10)


def test_patch_valid_fraction() -> None:
    v = torch.zeros(2, 32, 48, dtype=torch.bool)
    v[0, :16, :16] = True  # first patch fully valid
    v[1, 16:, 40:] = True  # half of the last patch valid
    f = patch_valid_fraction(v, 16)
    assert f.shape == (2, 6)
    assert f[0].tolist() == [1.0, 0, 0, 0, 0, 0]
    assert f[1].tolist() == [0, 0, 0, 0, 0, 0.5]


def test_end_to_end_with_augmentation_and_nodata() -> None:
    aug = MultiCropAugmentation(32, 16, 2, mean=[0.0] * 3, std=[1.0] * 3)
    valid = torch.ones(48, 48, dtype=torch.bool)
    valid[:, 24:] = False
    samples = [
        aug(torch.rand(3, 48, 48), valid, generator=torch.Generator().manual_seed(s)) for s in range(3)
    ]
    out = MultiCropCollator(seed=0)(samples)
    x, v = out["collated_global_crops"], out["collated_global_crops_valid"]
    assert x.shape == (6, 3, 32, 32) and v.shape == (6, 32, 32)
    assert bool((x.permute(1, 0, 2, 3)[:, ~v] == 0).all())
    frac = out["collated_global_patch_valid"]
    torch.testing.assert_close(frac.mean(-1), v.float().mean((-2, -1)))
    assert bool((frac < 1).any())


def test_collator_seeded_masks_are_reproducible_and_picklable() -> None:
    samples = [_sample(s, g=128) for s in range(4)]
    c1 = MultiCropCollator(seed=3)
    c2 = pickle.loads(pickle.dumps(c1))
    a, b = c1(samples), c2(samples)
    assert torch.equal(a["collated_masks"], b["collated_masks"])
    other = MultiCropCollator(seed=3)([_sample(s, g=128) for s in range(4, 8)])
    assert not torch.equal(a["collated_masks"], other["collated_masks"])
