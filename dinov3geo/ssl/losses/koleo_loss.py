"""KoLeo regulariser, mirroring the official ``dinov3/loss/koleo_loss.py``.

Kozachenko-Leonenko entropy estimator from Sablayrolles et al. (2018), "Spreading vectors for similarity
search": ``-mean_i log(||x_i - x_nn(i)||)`` on L2-normalised features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinov3geo.ssl import distributed

__all__ = ["KoLeoLoss", "KoLeoLossDistributed"]


class KoLeoLoss(nn.Module):
    """KoLeo loss over the local batch (official ``KoLeoLoss``).

    ``x`` is L2-normalised, each sample's nearest neighbour is the other sample with the largest dot product,
    and the loss is ``-mean(log(pdist(x, x_nn) + eps))`` with ``pdist = nn.PairwiseDistance(2, eps=1e-8)``
    (which computes ``||x - y + 1e-8||``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    def pairwise_NNs_inner(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 - official name
        """Index of each row's nearest neighbour (max inner product, itself excluded) for normalised rows."""
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)  # diagonal -> -1
        _, indices = torch.max(dots, dim=1)  # max inner product -> min distance
        return indices

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """Return the scalar KoLeo loss of ``student_output`` ``[B, D]`` (B >= 2)."""
        with torch.autocast(student_output.device.type, enabled=False):
            student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
            indices = self.pairwise_NNs_inner(student_output)
            distances = self.pdist(student_output, student_output[indices])  # B
            loss = -torch.log(distances + eps).mean()
        return loss


class KoLeoLossDistributed(nn.Module):
    """KoLeo loss whose nearest-neighbour set spans several ranks (official ``KoLeoLossDistributed``).

    The normalised features of all ranks are all-gathered (differentiably), the global batch is split into
    consecutive groups of ``loss_group_size`` samples, and each rank searches the ``topk`` nearest neighbours
    of its own samples within the group its rank falls into (itself excluded). The loss is
    ``-mean(log(pdist + eps))`` over this rank's ``local_B * topk`` (sample, neighbour) pairs.

    Args:
        topk: Number of nearest neighbours per sample.
        loss_group_size: Size of the neighbour set; None uses the global batch. Must be a multiple of the
            local batch size and divide the global batch size.
    """

    def __init__(self, topk: int = 1, loss_group_size: int | None = None) -> None:
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)
        self.topk = topk
        self.loss_group_size = loss_group_size

    def pairwise_NNs_inner(  # noqa: N802 - official name
        self, x: torch.Tensor, all_x: torch.Tensor, rank: int
    ) -> torch.Tensor:
        """``[local_B, topk]`` indices into ``all_x`` of each local row's nearest neighbours.

        ``rank`` is the rank within the loss group: local row ``i`` is ``all_x[rank * local_B + i]``.
        """
        dots = torch.mm(x, all_x.t())  # local_B x group_B
        local_b, group_b = dots.shape
        dots.view(-1)[rank * local_b :: (group_b + 1)].fill_(-1)  # own entries -> -1
        _, indices = torch.topk(dots, dim=1, k=self.topk)  # max inner product -> min distance
        return indices

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """Return this rank's scalar loss for ``student_output`` ``[local_B, D]``.

        Raises:
            ValueError: If the group size is not a multiple of the local batch size or does not divide the
                global batch size.
        """
        with torch.autocast(student_output.device.type, enabled=False):
            student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)  # local_B x D

            if distributed.is_enabled():
                all_student_outputs = torch.cat(distributed.all_gather_autograd(student_output), dim=0)
                world_size = distributed.get_world_size()
                rank = distributed.get_rank()
            else:
                all_student_outputs = student_output
                world_size = 1
                rank = 0

            local_b = len(student_output)
            global_b = len(all_student_outputs)
            loss_group_size = self.loss_group_size if self.loss_group_size is not None else global_b
            if loss_group_size % local_b != 0:
                raise ValueError(
                    f"Loss group size size {loss_group_size} must be a multiple of local batch size {local_b}."
                )
            if global_b % loss_group_size != 0:
                raise ValueError(
                    f"Global batch size {global_b} must be divisible by loss group size {loss_group_size}."
                )
            n_groups = global_b // loss_group_size
            ranks_per_group = world_size // n_groups
            rank_in_group = rank % ranks_per_group
            group = rank // ranks_per_group
            all_student_outputs = all_student_outputs.view(n_groups, loss_group_size, student_output.shape[1])
            all_student_outputs = all_student_outputs[group]  # loss_group_size x D

            with torch.no_grad():
                indices = self.pairwise_NNs_inner(student_output, all_student_outputs, rank_in_group)

            student_output_expanded = student_output.unsqueeze(1).repeat(1, self.topk, 1).flatten(0, 1)
            distances = self.pdist(student_output_expanded, all_student_outputs[indices].flatten(0, 1))
            loss = -torch.log(distances.float() + eps).mean()
        return loss
