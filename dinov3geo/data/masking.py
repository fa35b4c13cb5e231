"""iBOT block masking, mirroring the official ``dinov3/data/masking.py`` and the mask part of
``collate_data_and_cast`` in ``dinov3/data/collate.py``.

Randomness: the official code draws from the global ``random`` module (rectangles, shuffling) and the global
``numpy.random`` (top-up). Here the generators can be passed in (``random.Random`` and
``numpy.random.Generator``/``RandomState``) or built from a seed; when none is given the global modules are
used, which reproduces the official draws exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from types import ModuleType
from typing import TypedDict

import numpy as np
import torch

__all__ = ["IBOTMasks", "MaskingGenerator", "collate_ibot_masks"]

PyRng = random.Random | ModuleType
NpRng = np.random.Generator | np.random.RandomState | ModuleType


class IBOTMasks(TypedDict):
    """Mask entries of the official collate output (``dinov3/data/collate.py``)."""

    collated_masks: torch.Tensor  # [n_images, N] bool
    mask_indices_list: torch.Tensor  # [M] long, flat indices into collated_masks
    masks_weight: torch.Tensor  # [M] float, 1 / (#masked in the token's image)
    upperbound: int  # sum of the requested masked counts
    n_masked_patches: torch.Tensor  # [1] long, M


class MaskingGenerator:
    """Block-wise mask generator (BEiT/iBOT style), official ``MaskingGenerator``.

    ``__call__(n)`` returns an ``[H, W]`` bool mask with exactly ``n`` True entries: rectangles of area
    ``U(min_num_patches, min(remaining, max_num_patches))`` and log-uniform aspect ratio in
    ``[min_aspect, max_aspect]`` are added (10 tries each) until no try adds a patch, then random patches top
    the mask up to ``n``. DINOv3 uses ``max_num_patches = 0.5 * H * W``.

    Args:
        input_size: Grid size ``(H, W)`` or ``S`` for ``(S, S)``.
        num_masking_patches: Default for ``max_num_patches`` when that is None (as official).
        min_num_patches: Minimum rectangle area.
        max_num_patches: Maximum rectangle area.
        min_aspect: Minimum aspect ratio; the maximum defaults to ``1 / min_aspect``.
        max_aspect: Maximum aspect ratio.
        rng: Source of the rectangle draws (``random.Random``); the ``random`` module when None.
        np_rng: Source of the top-up draw (``numpy.random.Generator`` or ``RandomState``); the global
            ``numpy.random`` when None.
        seed: Convenience: when given (and ``rng``/``np_rng`` are None) builds ``random.Random(seed)`` and
            ``numpy.random.default_rng(seed)``.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        *,
        rng: random.Random | None = None,
        np_rng: np.random.Generator | np.random.RandomState | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.height, self.width = input_size

        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches

        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches

        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

        if seed is not None:
            rng = rng if rng is not None else random.Random(seed)
            np_rng = np_rng if np_rng is not None else np.random.default_rng(seed)
        self.rng: PyRng = rng if rng is not None else random
        self.np_rng: NpRng = np_rng if np_rng is not None else np.random

    def __repr__(self) -> str:
        return "Generator(%d, %d -> [%d ~ %d], max = %d, %.3f ~ %.3f)" % (  # noqa: UP031 - official format
            self.height,
            self.width,
            self.min_num_patches,
            self.max_num_patches,
            self.num_masking_patches,
            self.log_aspect_ratio[0],
            self.log_aspect_ratio[1],
        )

    def get_shape(self) -> tuple[int, int]:
        """Grid shape ``(H, W)``."""
        return self.height, self.width

    def _mask(self, mask: np.ndarray, max_mask_patches: float) -> int:
        """Try (up to 10 times) to add one rectangle to ``mask`` in place; return the number of new patches.

        A rectangle is kept only if it adds between 1 and ``max_mask_patches`` new patches, so the result
        never exceeds the requested count.
        """
        delta = 0
        for _ in range(10):
            target_area = self.rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.rng.randint(0, self.height - h)
                left = self.rng.randint(0, self.width - w)

                num_masked = mask[top : top + h, left : left + w].sum()
                # Overlap
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1

                if delta > 0:
                    break
        return delta

    def block_mask(self, num_masking_patches: int = 0) -> np.ndarray:
        """The rectangle phase of :meth:`__call__`: a union of rectangles with at most the requested count."""
        mask = np.zeros(shape=self.get_shape(), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = num_masking_patches - mask_count
            max_mask_patches = min(max_mask_patches, self.max_num_patches)

            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return mask

    def __call__(self, num_masking_patches: int = 0) -> np.ndarray:
        """Return an ``[H, W]`` bool mask with exactly ``num_masking_patches`` True entries."""
        mask = self.block_mask(num_masking_patches)
        return self.complete_mask_randomly(mask, num_masking_patches)

    def complete_mask_randomly(self, mask: np.ndarray, num_masking_patches: int) -> np.ndarray:
        """Set random unmasked patches until ``mask`` has exactly ``num_masking_patches`` True entries."""
        shape = mask.shape
        m2 = mask.flatten()
        to_add = self.np_rng.choice(np.where(~m2)[0], size=num_masking_patches - m2.sum(), replace=False)
        m2[to_add] = True
        return m2.reshape(shape)


def collate_ibot_masks(
    n_images: int,
    n_tokens: int,
    mask_generator: MaskingGenerator,
    mask_ratio_tuple: Sequence[float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    random_circular_shift: bool = False,
    rng: random.Random | None = None,
) -> IBOTMasks:
    """Build the iBOT masks of a batch exactly as the official ``collate_data_and_cast`` does.

    ``n_masked = int(n_images * mask_probability)`` images get masks; the i-th has
    ``int(N * probs[i + 1])`` masked patches with ``probs = torch.linspace(*mask_ratio_tuple, n_masked + 1)``
    (float32, so the count is ``int(float32(N) * float32(ratio))`` -- e.g. 29, not 30, for N=100 and ratio
    0.3 from a 7-point linspace). The other images get empty masks and the list is shuffled.

    Args:
        n_images: Number of student global images (``n_global_crops * B``).
        n_tokens: Patch tokens per image N (``H * W`` of ``mask_generator``).
        mask_generator: Block-mask generator for the patch grid.
        mask_ratio_tuple: ``(min, max)`` masking ratio; ratios are spread over ``(min, max]``.
        mask_probability: Fraction of images that get a mask.
        random_circular_shift: Roll each non-empty mask by a random offset (official option, off in DINOv3).
        rng: Source of the shuffle and shifts; the ``random`` module when None (official behaviour).

    Returns:
        The official mask keys: ``collated_masks`` ``[n_images, N]`` bool, ``mask_indices_list`` (flat
        indices of the masked tokens), ``masks_weight`` (``1 / #masked`` of each masked token's image),
        ``upperbound`` (total requested count) and ``n_masked_patches`` (``[1]`` long).
    """
    py_rng: PyRng = rng if rng is not None else random
    h, w = mask_generator.get_shape()
    if h * w != n_tokens:
        raise ValueError(f"mask generator grid {h}x{w} does not have n_tokens={n_tokens} patches")
    n_samples_masked = int(n_images * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)
    upperbound = 0
    masks_list: list[torch.Tensor] = []
    for i in range(n_samples_masked):
        prob_max = probs[i + 1]
        n_masked = int(n_tokens * prob_max)
        mask = torch.from_numpy(mask_generator(n_masked)).bool()
        if random_circular_shift:
            shift_x, shift_y = (
                py_rng.randint(0, mask.shape[0] - 1),
                py_rng.randint(0, mask.shape[1] - 1),
            )
            mask = torch.roll(mask, (shift_x, shift_y), (0, 1))
        masks_list.append(mask)
        upperbound += n_masked
    for _ in range(n_samples_masked, n_images):
        masks_list.append(torch.from_numpy(mask_generator(0)).bool())

    py_rng.shuffle(masks_list)

    collated_masks = torch.stack(masks_list).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    masks_weight = (
        (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    )
    return IBOTMasks(
        collated_masks=collated_masks,
        mask_indices_list=mask_indices_list,
        masks_weight=masks_weight,
        upperbound=upperbound,
        n_masked_patches=torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    )
