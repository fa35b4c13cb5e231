"""Dense-feature health: numbers that make the collapse of local (patch) features visible in the logs.

Over long SSL training, patch features of DINO-style models drift towards the CLS feature and become
similar to each other, which degrades dense tasks; Gram anchoring is the DINOv3 fix. Two cheap probes:

* **patch similarity spread**: within each image, the standard deviation (and mean) of the pairwise cosine
  similarities between L2-normalised patch features. Healthy features have a wide spread; collapse drives
  the mean towards 1 and the spread towards 0.
* **effective rank** (Roy & Vetterli, 2007): ``exp(entropy(s / sum(s)))`` of the singular values ``s`` of the
  centred patch-feature matrix of a batch — the number of directions the features really use.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def patch_similarity_stats(patches: Tensor) -> tuple[float, float]:
    """(mean, std) of pairwise cosine similarity between distinct patches of each image, averaged over images.

    Args:
        patches: ``[..., P, D]`` patch features (leading dims are images).
    """
    x = patches.float().reshape(-1, patches.shape[-2], patches.shape[-1])
    x = torch.nn.functional.normalize(x, dim=-1)
    sim = x @ x.transpose(-1, -2)  # [B, P, P]
    p = sim.shape[-1]
    off = ~torch.eye(p, dtype=torch.bool, device=sim.device)
    vals = sim[:, off]  # [B, P*(P-1)]
    return float(vals.mean()), float(vals.std(dim=-1).mean())


@torch.no_grad()
def effective_rank(patches: Tensor, max_tokens: int = 4096) -> float:
    """Effective rank of the centred ``[N, D]`` matrix of (at most ``max_tokens``) patch features."""
    x = patches.float().reshape(-1, patches.shape[-1])
    if x.shape[0] > max_tokens:
        x = x[torch.linspace(0, x.shape[0] - 1, max_tokens, device=x.device).long()]
    x = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(x)
    s = s[s > s.max() * 1e-7] if s.numel() else s
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def feature_health(patches: Tensor) -> dict[str, float]:
    """All health numbers for a batch of patch features ``[..., P, D]``."""
    mean, spread = patch_similarity_stats(patches)
    return {"health/patch_sim_mean": mean, "health/patch_sim_std": spread,
            "health/effective_rank": effective_rank(patches)}
