"""Small ``torch.distributed`` helpers used by the SSL losses.

Mirrors the parts of the official ``dinov3/distributed/torch_distributed_wrapper.py`` that the losses use
(``is_distributed_enabled``, ``get_rank``, ``get_world_size``, ``get_process_subgroup``,
``get_subgroup_size``). Every helper is a no-op (or the identity) when ``torch.distributed`` is unavailable or
no process group has been initialised, so the losses run unchanged in a single process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = [
    "all_gather",
    "all_gather_autograd",
    "all_reduce",
    "get_process_subgroup",
    "get_rank",
    "get_subgroup_rank",
    "get_subgroup_size",
    "get_world_size",
    "is_enabled",
    "is_main_process",
    "set_process_subgroup",
]

_PROCESS_SUBGROUP: ProcessGroup | None = None


def is_enabled() -> bool:
    """Return True when ``torch.distributed`` is available and a process group is initialised.

    Mirrors ``is_distributed_enabled`` in the official ``dinov3/distributed/torch_distributed_wrapper.py``.
    """
    return dist.is_available() and dist.is_initialized()


def get_rank(group: ProcessGroup | None = None) -> int:
    """Rank of this process in ``group`` (the default group when None); 0 when not distributed."""
    if not is_enabled():
        return 0
    return dist.get_rank(group=group)


def get_world_size(group: ProcessGroup | None = None) -> int:
    """Number of processes in ``group`` (the default group when None); 1 when not distributed."""
    if not is_enabled():
        return 1
    return dist.get_world_size(group=group)


def is_main_process(group: ProcessGroup | None = None) -> bool:
    """True on rank 0 of ``group`` (always True when not distributed)."""
    return get_rank(group) == 0


def set_process_subgroup(group: ProcessGroup | None) -> None:
    """Set the process subgroup the losses reduce over (None restores the default, world, group).

    The official code creates it with ``new_subgroups``; here the caller creates it with
    ``torch.distributed.new_group`` and registers it.
    """
    global _PROCESS_SUBGROUP
    _PROCESS_SUBGROUP = group


def get_process_subgroup() -> ProcessGroup | None:
    """Process subgroup used by the losses' reductions; None means the default (world) group.

    Mirrors ``get_process_subgroup`` in the official ``torch_distributed_wrapper.py``.
    """
    return _PROCESS_SUBGROUP


def get_subgroup_size() -> int:
    """World size of :func:`get_process_subgroup` (1 when not distributed)."""
    return get_world_size(group=get_process_subgroup())


def get_subgroup_rank() -> int:
    """Rank of this process within :func:`get_process_subgroup` (0 when not distributed)."""
    return get_rank(group=get_process_subgroup())


def all_reduce(
    tensor: torch.Tensor,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
    group: ProcessGroup | None = None,
) -> torch.Tensor:
    """In-place ``all_reduce`` of ``tensor`` over ``group``; returns ``tensor``.

    A no-op when not distributed. Not differentiable (like ``torch.distributed.all_reduce``).
    """
    if is_enabled():
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather(tensor: torch.Tensor, group: ProcessGroup | None = None) -> list[torch.Tensor]:
    """Gather ``tensor`` from every rank of ``group`` (no autograd); ``[tensor]`` when not distributed.

    Every rank must pass a tensor of the same shape.
    """
    if not is_enabled():
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(get_world_size(group))]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums each copy's gradient over ranks and returns this rank's share."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: ProcessGroup | None) -> tuple[torch.Tensor, ...]:
        ctx.group = group
        ctx.rank = get_rank(group)
        return tuple(all_gather(tensor, group=group))

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor, None]:
        grads = torch.stack([g.contiguous() for g in grad_outputs])
        all_reduce(grads, group=ctx.group)
        return grads[ctx.rank], None


def all_gather_autograd(tensor: torch.Tensor, group: ProcessGroup | None = None) -> list[torch.Tensor]:
    """Differentiable all-gather; ``[tensor]`` when not distributed.

    Same semantics as ``torch.distributed.nn.all_gather`` used by the official ``KoLeoLossDistributed``
    (``dinov3/loss/koleo_loss.py``): the gradient a rank receives for its tensor is the sum over all ranks of
    the gradients flowing into that rank's gathered copy. Implemented with ``all_gather`` + ``all_reduce``
    (supported by gloo and NCCL) because ``torch.distributed.nn.all_gather`` is deprecated.
    """
    if not is_enabled():
        return [tensor]
    return list(_AllGatherWithGrad.apply(tensor, group))
