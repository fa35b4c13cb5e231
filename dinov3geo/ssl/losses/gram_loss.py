"""Gram anchoring loss, mirroring the official ``dinov3/loss/gram_loss.py``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GramLoss"]


class GramLoss(nn.Module):
    """MSE between the patch-similarity (Gram) matrices of student and Gram-teacher features.

    Mirrors ``GramLoss`` in the official ``dinov3/loss/gram_loss.py``.

    Args:
        apply_norm: L2-normalise features over the last dim before the Gram matrices (``gram.normalized``).
        remove_neg: Clip negative similarities of both Gram matrices to 0.
        remove_only_teacher_neg: Clip negative teacher similarities to 0, and student similarities to 0 only
            where both are negative.

    Raises:
        ValueError: If both ``remove_neg`` and ``remove_only_teacher_neg`` are set.
    """

    def __init__(
        self, apply_norm: bool = True, remove_neg: bool = False, remove_only_teacher_neg: bool = False
    ) -> None:
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("remove_neg and remove_only_teacher_neg are mutually exclusive")
        self.mse_loss = nn.MSELoss()
        self.apply_norm = apply_norm
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg

    def forward(
        self, output_feats: torch.Tensor, target_feats: torch.Tensor, img_level: bool = True
    ) -> torch.Tensor:
        """Return ``mean((S S^T - T T^T)^2)`` (float32).

        Args:
            output_feats: Student features ``[B, N, D]``, or ``[M, D]`` when ``img_level`` is False.
            target_feats: Teacher features, same shape as ``output_feats``.
            img_level: One ``[N, N]`` Gram matrix per image (True) or one ``[B*N, B*N]`` Gram matrix over the
                flattened batch (False; ``[B, N, D]`` inputs are flattened).
        """
        if img_level and (target_feats.dim() != 3 or output_feats.dim() != 3):
            raise ValueError("img_level=True needs [B, N, D] features")

        output_feats = output_feats.float()
        target_feats = target_feats.float()

        if self.apply_norm:
            target_feats = F.normalize(target_feats, dim=-1)
        if not img_level and target_feats.dim() == 3:
            target_feats = target_feats.flatten(0, 1)
        target_sim = torch.matmul(target_feats, target_feats.transpose(-1, -2))

        if self.apply_norm:
            output_feats = F.normalize(output_feats, dim=-1)
        if not img_level and output_feats.dim() == 3:
            output_feats = output_feats.flatten(0, 1)
        student_sim = torch.matmul(output_feats, output_feats.transpose(-1, -2))

        if self.remove_neg:
            target_sim[target_sim < 0] = 0.0
            student_sim[student_sim < 0] = 0.0
        elif self.remove_only_teacher_neg:
            student_sim[(student_sim < 0) & (target_sim < 0)] = 0.0
            target_sim[target_sim < 0] = 0.0

        return self.mse_loss(student_sim, target_sim)
