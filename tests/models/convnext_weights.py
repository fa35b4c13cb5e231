"""Random but real ``convnext_tiny_test`` weights for the task tests, saved as a user would get them.

Meta's init sets the layer scales to 1e-6, which makes every block a near-identity: a test on such weights
would pass whatever the blocks compute. Here every ``gamma`` is drawn from U(0.1, 1) and the weights are saved
as a plain state dict in Meta's key layout (what ``dinov3_convnext_*_pretrain_lvd1689m-*.pth`` holds), so
the tests pass a file path exactly as a user passes Meta's file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dinov3geo.models import ConvNeXt, build_backbone


def convnext_test_backbone(seed: int = 0, in_chans: int = 3) -> ConvNeXt:
    """``convnext_tiny_test`` with Meta's random init and layer scales in U(0.1, 1) (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_backbone("convnext_tiny_test", in_chans=in_chans)
    with torch.no_grad():
        for stage in model.stages:
            for block in stage:
                block.gamma.copy_(torch.rand(block.gamma.shape, generator=g) * 0.9 + 0.1)
    return model.eval()  # type: ignore[return-value]


def save_convnext_test_weights(path: Path, seed: int = 0, in_chans: int = 3) -> Path:
    """Write :func:`convnext_test_backbone` as a Meta-format ``.pth`` (plain state dict) at ``path``."""
    torch.save(convnext_test_backbone(seed, in_chans).state_dict(), path)
    return path
