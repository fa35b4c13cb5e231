"""DINO loss on the CLS token, mirroring the official ``dinov3/loss/dino_clstoken_loss.py``."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dinov3geo.ssl import distributed
from dinov3geo.ssl.losses.sinkhorn import sinkhorn_knopp

__all__ = ["DINOLoss"]


class DINOLoss(nn.Module):
    """Cross-entropy between teacher targets and student CLS-token predictions.

    Mirrors ``DINOLoss`` in the official ``dinov3/loss/dino_clstoken_loss.py``: teacher targets are made with
    :meth:`sinkhorn_knopp_teacher` (the only centering DINOv3 allows); the DINOv2 softmax-centering path
    (:meth:`softmax_center_teacher` with an EMA ``center`` buffer) is kept for parity.

    Args:
        out_dim: Number of prototypes K.
        student_temp: Student softmax temperature (0.1 in DINOv3).
        center_momentum: EMA momentum of the ``center`` buffer (softmax-centering path only).
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        # NaN until init_weights(), as official (forces explicit initialisation).
        self.register_buffer("center", torch.full((1, out_dim), math.nan))
        self.updated = True
        self.reduce_handle: dist.Work | None = None
        self.len_teacher_output: int | None = None
        self.async_batch_center: torch.Tensor | None = None

    def init_weights(self) -> None:
        """Zero the ``center`` buffer (official ``init_weights``)."""
        self.center.zero_()

    @torch.no_grad()
    def softmax_center_teacher(
        self, teacher_output: torch.Tensor, teacher_temp: float, update_centers: bool = True
    ) -> torch.Tensor:
        """DINOv2-style teacher targets: ``softmax((t - center) / teacher_temp)`` over the last dim."""
        if update_centers:
            self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Sinkhorn-Knopp teacher targets, computed in float32.

        Args:
            teacher_output: Teacher head logits ``[B_local, K]`` (all teacher crops flattened into the batch).
            teacher_temp: Teacher temperature.
            n_iterations: Number of row/column normalisation rounds.

        Returns:
            ``[B_local, K]`` float32 assignments; each row sums to 1 and, over the global batch of
            ``B = B_local * world_size`` samples, each prototype column sums to about ``B / K``.
            Sums over prototypes and the global normaliser are all-reduced over the process subgroup when
            ``torch.distributed`` is initialised.
        """
        b = teacher_output.shape[0] * distributed.get_subgroup_size()  # number of samples to assign
        return sinkhorn_knopp(teacher_output, teacher_temp, b, n_iterations)

    def forward(
        self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, ignore_diagonal: bool = False
    ) -> torch.Tensor:
        """Mean cross-entropy between teacher probabilities and student softmax over all crop pairs.

        Args:
            student_logits: ``[n_student_crops, B, K]`` student head logits.
            teacher_probs: ``[n_teacher_crops, B, K]`` teacher probabilities (sum to 1 over K).
            ignore_diagonal: Skip the pairs with the same crop index ``s == t`` (for global-vs-global);
                the normaliser is then ``B * (S * T - min(S, T))``.

        Returns:
            Scalar loss: ``sum_{s,t,b} -<teacher_probs[t,b], log_softmax(student_logits[s,b] / temp)>``
            divided by the number of (s, t, b) terms used.
        """
        student_crops, b, _ = student_logits.shape
        teacher_crops = teacher_probs.shape[0]
        student_logp = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        if not ignore_diagonal:
            loss = -torch.einsum("sbk,tbk->", student_logp, teacher_probs)
            return loss / (b * student_crops * teacher_crops)
        loss = -torch.einsum("sbk,tbk->st", student_logp, teacher_probs)
        min_st = min(student_crops, teacher_crops)
        loss = torch.diagonal_scatter(loss, loss.new_zeros(min_st))
        return loss.sum() / (b * student_crops * teacher_crops - b * min_st)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """Start the (possibly asynchronous) reduction of the batch center for softmax centering."""
        self.reduce_center_update(teacher_output)

    @torch.no_grad()
    def reduce_center_update(self, teacher_output: torch.Tensor) -> None:
        """Sum ``teacher_output`` over the batch and all-reduce it asynchronously (official behaviour)."""
        self.updated = False
        self.len_teacher_output = len(teacher_output)
        self.async_batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        if distributed.is_enabled():
            self.reduce_handle = dist.all_reduce(
                self.async_batch_center, async_op=True, group=distributed.get_process_subgroup()
            )

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Apply the pending EMA update ``center = m * center + (1 - m) * batch_mean``."""
        if self.updated is False:
            assert self.async_batch_center is not None and self.len_teacher_output is not None
            world_size = distributed.get_subgroup_size()
            if self.reduce_handle is not None:
                self.reduce_handle.wait()
            batch_center = self.async_batch_center / (self.len_teacher_output * world_size)
            self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
            self.updated = True
