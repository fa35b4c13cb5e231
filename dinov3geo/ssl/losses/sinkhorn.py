"""Sinkhorn-Knopp centring of teacher logits, shared by the DINO and iBOT losses.

Mirrors ``sinkhorn_knopp_teacher`` of the official ``dino_clstoken_loss.py`` / ``ibot_patch_loss.py`` (the two
official copies differ only in how the number of samples ``B`` is obtained). Runs in float32; the sums over
prototypes and the global normaliser are all-reduced over the process subgroup when ``torch.distributed``
is initialised, so a multi-process run equals one process on the concatenated batch.
"""

from __future__ import annotations

import torch

from dinov3geo.ssl import distributed


def sinkhorn_knopp(teacher_output: torch.Tensor, teacher_temp: float, n_samples: torch.Tensor | float,
                   n_iterations: int = 3) -> torch.Tensor:
    """``[B_local, K]`` teacher logits -> assignment probabilities (each row sums to 1).

    Args:
        teacher_output: teacher logits of the local samples.
        teacher_temp: teacher temperature.
        n_samples: total number of samples across ranks (``B`` of the official code).
        n_iterations: Sinkhorn iterations (3 in every DINOv3 config).
    """
    group = distributed.get_process_subgroup()
    # exp(float(logits) / temp) computed in one float32 buffer (same floats as out-of-place; the input is
    # never modified: a float32 input is copied)
    q = teacher_output.to(torch.float32, copy=True)
    q.div_(teacher_temp).exp_()
    q = q.t()  # K x B_local
    b = n_samples
    k = q.shape[0]  # number of prototypes
    sum_q = torch.sum(q)  # make the matrix sum to 1
    distributed.all_reduce(sum_q, group=group)
    q /= sum_q
    for _ in range(n_iterations):
        # rows: total weight per prototype must be 1/K
        sum_of_rows = torch.sum(q, dim=1, keepdim=True)
        distributed.all_reduce(sum_of_rows, group=group)
        q /= sum_of_rows
        q /= k
        # columns: total weight per sample must be 1/B
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b  # the columns must sum to 1 so that Q is an assignment
    return q.t()
