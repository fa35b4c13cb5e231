"""iBOT masked-patch loss, mirroring the official ``dinov3/loss/ibot_patch_loss.py``."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dinov3geo.ssl import distributed
from dinov3geo.ssl.losses.sinkhorn import sinkhorn_knopp

__all__ = ["SinkhornKnoppTeacher", "iBOTPatchLoss", "lossfunc"]


def lossfunc(t: torch.Tensor, s: torch.Tensor, temp: float) -> torch.Tensor:
    """Per-token ``sum_k t_k * log_softmax(s / temp)_k`` in float32 (the *negative* cross-entropy).

    Mirrors ``lossfunc`` in the official ``dinov3/loss/ibot_patch_loss.py``.
    """
    return torch.sum(t.float() * F.log_softmax(s.float() / temp, dim=-1), dim=-1)


class SinkhornKnoppTeacher(nn.Module):
    """Sinkhorn-Knopp for the masked patch tokens (official ``SinkhornKnoppTeacher`` module).

    The number of samples B is the all-reduced number of masked patches rather than
    ``local rows * world size``, so ranks may hold different numbers of masked patches.
    """

    @torch.no_grad()
    def forward(
        self,
        teacher_output: torch.Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: torch.Tensor | int,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Return ``[n_masked_local, K]`` float32 assignments of the teacher's masked patch logits.

        Args:
            teacher_output: ``[n_masked_local, K]`` teacher iBOT-head logits.
            teacher_temp: Teacher temperature.
            n_masked_patches_tensor: This rank's number of masked patches (a 1-element long tensor, as in
                the collate output ``n_masked_patches``); summed over the process subgroup to give B.
            n_iterations: Number of row/column normalisation rounds.
        """
        teacher_output = teacher_output.float()
        # Official code all-reduces the caller's tensor in place; reduce a copy instead.
        b = torch.as_tensor(n_masked_patches_tensor, device=teacher_output.device).clone()
        distributed.all_reduce(b, group=distributed.get_process_subgroup())
        return sinkhorn_knopp(teacher_output, teacher_temp, b, n_iterations)


class iBOTPatchLoss(nn.Module):  # noqa: N801 - official name
    """Cross-entropy between teacher and student predictions on the masked patch tokens.

    Mirrors ``iBOTPatchLoss`` in the official ``dinov3/loss/ibot_patch_loss.py``. Teacher targets come from
    :attr:`sinkhorn_knopp_teacher` (a :class:`SinkhornKnoppTeacher`); the DINOv2 softmax-centering path is
    kept for parity.

    Args:
        patch_out_dim: Number of iBOT prototypes K.
        student_temp: Student softmax temperature (0.1 in DINOv3).
        center_momentum: EMA momentum of the ``center`` buffer (softmax-centering path only).
    """

    center: torch.Tensor

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.full((1, 1, patch_out_dim), math.nan))
        self.updated = True
        self.reduce_handle: dist.Work | None = None
        self.len_teacher_patch_tokens: int | None = None
        self.async_batch_center: torch.Tensor | None = None
        self.sinkhorn_knopp_teacher = SinkhornKnoppTeacher()

    def init_weights(self) -> None:
        """Zero the ``center`` buffer (official ``init_weights``)."""
        self.center.zero_()

    @torch.no_grad()
    def softmax_center_teacher(
        self, teacher_patch_tokens: torch.Tensor, teacher_temp: float, update_centers: bool = True
    ) -> torch.Tensor:
        """DINOv2-style teacher targets: ``softmax((t - center) / teacher_temp)`` over the last dim."""
        if update_centers:
            self.apply_center_update()
        return F.softmax((teacher_patch_tokens - self.center) / teacher_temp, dim=-1)

    def forward(
        self,
        student_patch_tokens: torch.Tensor,
        teacher_patch_tokens: torch.Tensor,
        student_masks_flat: torch.Tensor,
    ) -> torch.Tensor:
        """Loss on dense tokens: per-image mean CE over masked tokens, averaged over images.

        Args:
            student_patch_tokens: ``[B, N, K]`` student logits.
            teacher_patch_tokens: ``[B, N, K]`` teacher probabilities.
            student_masks_flat: ``[B, N]`` bool mask of the tokens that count.
        """
        loss = lossfunc(teacher_patch_tokens, student_patch_tokens, self.student_temp)
        loss = torch.sum(loss * student_masks_flat.float(), dim=-1) / student_masks_flat.sum(dim=-1).clamp(
            min=1.0
        )
        return -loss.mean()

    def forward_masked(
        self,
        student_patch_tokens_masked: torch.Tensor,
        teacher_patch_tokens_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        n_masked_patches: int | None = None,
        masks_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss on the gathered masked tokens, as used in DINOv3 pretraining.

        Each masked token's CE is weighted by ``1 / #masked tokens of its image`` (``masks_weight``), summed,
        and divided by the number of images ``student_masks_flat.shape[0]`` (unmasked images included).

        Args:
            student_patch_tokens_masked: ``[M, K]`` student logits of the masked tokens (in
                ``student_masks_flat`` order, i.e. ``mask_indices_list`` order).
            teacher_patch_tokens_masked: ``[M, K]`` teacher probabilities of the same tokens.
            student_masks_flat: ``[n_images, N]`` bool masks.
            n_masked_patches: If given, only the first ``n_masked_patches`` rows are used.
            masks_weight: ``[M]`` per-token weights; computed from ``student_masks_flat`` when None.
        """
        loss = lossfunc(teacher_patch_tokens_masked, student_patch_tokens_masked, self.student_temp)
        if masks_weight is None:
            masks_weight = (
                (1 / student_masks_flat.sum(-1).clamp(min=1.0))
                .unsqueeze(-1)
                .expand_as(student_masks_flat)[student_masks_flat]
            )
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        loss = loss * masks_weight
        return -loss.sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: torch.Tensor) -> None:
        """Start the (possibly asynchronous) reduction of the batch center for softmax centering."""
        self.reduce_center_update(teacher_patch_tokens)

    @torch.no_grad()
    def reduce_center_update(self, teacher_patch_tokens: torch.Tensor) -> None:
        """Sum the per-image token means over the batch and all-reduce asynchronously (official)."""
        self.updated = False
        self.len_teacher_patch_tokens = len(teacher_patch_tokens)
        self.async_batch_center = torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True)
        if distributed.is_enabled():
            self.reduce_handle = dist.all_reduce(
                self.async_batch_center, async_op=True, group=distributed.get_process_subgroup()
            )

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Apply the pending EMA update ``center = m * center + (1 - m) * batch_mean``."""
        if self.updated is False:
            assert self.async_batch_center is not None and self.len_teacher_patch_tokens is not None
            world_size = distributed.get_subgroup_size()
            if self.reduce_handle is not None:
                self.reduce_handle.wait()
            batch_center = self.async_batch_center / (self.len_teacher_patch_tokens * world_size)
            self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
            self.updated = True
