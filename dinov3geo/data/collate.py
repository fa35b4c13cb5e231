"""Batch collation of multi-crop samples with iBOT masks, mirroring ``collate_data_and_cast`` of the
official ``dinov3/data/collate.py``.

Crops are stacked crop-major, as upstream: ``collated_global_crops`` is ``[crop0 of every sample, crop1
of every sample]`` (``[n_global * B, C, g, g]``), likewise the local and Gram-teacher crops. The iBOT
masks come from :func:`dinov3geo.data.masking.collate_ibot_masks` over the ``n_global * B`` student global
crops (``n_tokens = (g / patch) ** 2``, half of the images masked with ratios spread over (0.1, 0.5]).

Additions for nodata-aware training: the crops' valid masks are stacked the same way
(``collated_*_valid``), and ``collated_*_patch_valid`` gives the valid fraction of every patch token
(``[n_crops * B, N]``), so the SSL step can drop or zero-weight patches (and images) with no valid pixels.

Mixed-resolution batches (the high-resolution stage, one loader per size triple upstream) work as long as
every sample of a batch has the same crop sizes; the mask generator is built for each batch's grid.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinov3geo.data.masking import MaskingGenerator, collate_ibot_masks

__all__ = ["MultiCropCollator", "collate_data_and_cast", "patch_valid_fraction"]


def patch_valid_fraction(valid: torch.Tensor, patch_size: int = 16) -> torch.Tensor:
    """Fraction of valid pixels of every patch token: ``[..., H, W]`` bool -> ``[..., (H/p) * (W/p)]``.

    Patches are laid out row-major as the backbone's patch tokens; incomplete border patches are dropped
    (the patch-embed conv floors, as upstream).
    """
    lead = valid.shape[:-2]
    h, w = valid.shape[-2:]
    x = valid.reshape(-1, 1, h, w).to(torch.float32)
    frac = F.avg_pool2d(x, kernel_size=patch_size, stride=patch_size)
    return frac.reshape(*lead, -1)


def _crops(sample: Any) -> Mapping[str, Any]:
    """The augmentation output of one sample: a dict, or the first item of an ``(output, target)`` pair."""
    if isinstance(sample, Mapping):
        return sample
    if isinstance(sample, (tuple, list)) and sample and isinstance(sample[0], Mapping):
        return sample[0]
    raise TypeError(
        f"a sample must be a dict of crops or an (output, target) pair, got {type(sample).__name__}"
    )


def _stack(samples: Sequence[Mapping[str, Any]], key: str, n: int) -> torch.Tensor:
    """Crop-major stack: ``[s[key][i] for i in range(n) for s in samples]``."""
    try:
        return torch.stack([s[key][i] for i in range(n) for s in samples])
    except RuntimeError as err:
        shapes = sorted({tuple(s[key][i].shape) for i in range(n) for s in samples})
        raise ValueError(
            f"cannot stack {key!r}: crop shapes differ within the batch {shapes}; a batch must have a single "
            "crop size (mix resolutions across batches, not within one)"
        ) from err


def collate_data_and_cast(
    samples_list: Sequence[Any],
    mask_ratio_tuple: Sequence[float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    dtype: torch.dtype | None = None,
    n_tokens: int | None = None,
    mask_generator: MaskingGenerator | None = None,
    random_circular_shift: bool = False,
    local_batch_size: int | None = None,
    *,
    patch_size: int = 16,
    rng: random.Random | None = None,
    np_rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Collate multi-crop samples into one batch (official ``collate_data_and_cast``).

    Args:
        samples_list: Outputs of :class:`~dinov3geo.data.augmentations.MultiCropAugmentation` (dicts, or
            ``(output, target)`` pairs as from an upstream-style dataset).
        mask_ratio_tuple: iBOT ``mask_ratio_min_max`` ((0.1, 0.5)).
        mask_probability: iBOT ``mask_sample_probability`` (0.5).
        dtype: Cast of the image tensors (``compute_precision.param_dtype``); None keeps float32.
        n_tokens: Patch tokens per global crop; default ``(g // patch_size) ** 2``.
        mask_generator: Block-mask generator; default ``MaskingGenerator(g // patch_size,
            max_num_patches=0.5 * N)`` as upstream's ``build_data_loader_from_cfg``.
        random_circular_shift: ``ibot.mask_random_circular_shift`` (False).
        local_batch_size: Multi-distillation: the masks cover ``n_global * local_batch_size`` images.
        patch_size: Patch size of the student (16).
        rng: Python RNG of the mask rectangles and the shuffle (global ``random`` when None, as upstream).
        np_rng: NumPy RNG of the mask top-up (global ``numpy.random`` when None, as upstream).

    Returns:
        ``collated_global_crops``, ``collated_local_crops``, ``collated_masks``, ``mask_indices_list``,
        ``masks_weight``, ``upperbound``, ``n_masked_patches`` (the upstream keys), plus
        ``collated_gram_teacher_crops`` when the samples have Gram crops, and the nodata keys
        ``collated_{global,local,gram_teacher}_crops_valid`` (bool ``[n*B, s, s]``) and
        ``collated_{global,local}_patch_valid`` (float ``[n*B, N]``) when the samples carry masks;
        ``global_crops_size``/``local_crops_size``; ``indices`` (long ``[B]``) when samples have an ``index``.
    """
    samples = [_crops(s) for s in samples_list]
    if not samples:
        raise ValueError("empty batch")
    n_global = len(samples[0]["global_crops"])
    n_local = len(samples[0]["local_crops"])
    out: dict[str, Any] = {}
    global_crops = _stack(samples, "global_crops", n_global)
    local_crops = _stack(samples, "local_crops", n_local) if n_local else torch.empty(0)
    g = int(global_crops.shape[-1])
    grid = (int(global_crops.shape[-2]) // patch_size, g // patch_size)
    if n_tokens is None:
        n_tokens = grid[0] * grid[1]
    if mask_generator is None:
        mask_generator = MaskingGenerator(
            grid, max_num_patches=0.5 * grid[0] * grid[1], rng=rng, np_rng=np_rng
        )
    n_images = n_global * local_batch_size if local_batch_size is not None else len(global_crops)
    masks = collate_ibot_masks(
        n_images,
        n_tokens,
        mask_generator,
        mask_ratio_tuple=mask_ratio_tuple,
        mask_probability=mask_probability,
        random_circular_shift=random_circular_shift,
        rng=rng,
    )
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    out["collated_global_crops"] = cast(global_crops)
    out["collated_local_crops"] = cast(local_crops)
    out.update(masks)
    if "gram_teacher_crops" in samples[0]:
        out["collated_gram_teacher_crops"] = cast(_stack(samples, "gram_teacher_crops", n_global))

    if "global_crops_valid" in samples[0]:
        gv = _stack(samples, "global_crops_valid", n_global)
        out["collated_global_crops_valid"] = gv
        out["collated_global_patch_valid"] = patch_valid_fraction(gv, patch_size)
    if "local_crops_valid" in samples[0] and n_local:
        lv = _stack(samples, "local_crops_valid", n_local)
        out["collated_local_crops_valid"] = lv
        out["collated_local_patch_valid"] = patch_valid_fraction(lv, patch_size)
    if "gram_teacher_crops_valid" in samples[0]:
        out["collated_gram_teacher_crops_valid"] = _stack(samples, "gram_teacher_crops_valid", n_global)
    out["global_crops_size"] = g
    out["local_crops_size"] = int(local_crops.shape[-1]) if n_local else 0
    if all("index" in s for s in samples):
        out["indices"] = torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)
    return out


class MultiCropCollator:
    """Picklable ``collate_fn`` for a DataLoader (``functools.partial(collate_data_and_cast, ...)`` upstream).

    With ``seed=None`` the masks draw from the global ``random``/``numpy.random`` (seeded per worker by the
    DataLoader, as upstream). With a seed, each batch's masks are drawn from RNGs seeded by ``(seed, sample
    indices)`` when every sample has an ``index`` (reproducible whatever the worker count, and after a
    resume), else by ``(seed, call counter)``.
    """

    def __init__(
        self,
        patch_size: int = 16,
        mask_ratio_tuple: Sequence[float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        dtype: torch.dtype | None = None,
        random_circular_shift: bool = False,
        local_batch_size: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.patch_size = patch_size
        self.mask_ratio_tuple = tuple(mask_ratio_tuple)
        self.mask_probability = mask_probability
        self.dtype = dtype
        self.random_circular_shift = random_circular_shift
        self.local_batch_size = local_batch_size
        self.seed = seed
        self._calls = 0

    def _rngs(
        self, samples: Sequence[Mapping[str, Any]]
    ) -> tuple[random.Random | None, np.random.Generator | None]:
        if self.seed is None:
            return None, None
        if all("index" in s for s in samples):
            key = "/".join([str(self.seed), *(str(int(s["index"])) for s in samples)])
        else:
            key = f"{self.seed}/call{self._calls}"
        self._calls += 1
        value = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
        return random.Random(value), np.random.default_rng(value)

    def __call__(self, samples_list: Sequence[Any]) -> dict[str, Any]:
        samples = [_crops(s) for s in samples_list]
        rng, np_rng = self._rngs(samples)
        return collate_data_and_cast(
            samples,
            mask_ratio_tuple=self.mask_ratio_tuple,
            mask_probability=self.mask_probability,
            dtype=self.dtype,
            random_circular_shift=self.random_circular_shift,
            local_batch_size=self.local_batch_size,
            patch_size=self.patch_size,
            rng=rng,
            np_rng=np_rng,
        )
