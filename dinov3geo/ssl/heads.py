"""DINO / iBOT projection head, mirroring the official ``dinov3/layers/dino_head.py``."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.init import trunc_normal_

__all__ = ["DINOHead"]


class DINOHead(nn.Module):
    """MLP projection head with an L2-normalised bottleneck and a plain linear prototype layer.

    Mirrors ``DINOHead`` in the official ``dinov3/layers/dino_head.py``. With the defaults it is
    ``Linear(in, hidden) -> GELU -> Linear(hidden, hidden) -> GELU -> Linear(hidden, bottleneck)``, then
    ``F.normalize`` (eps 1e-6 for float16 inputs, else 1e-12), then ``last_layer = Linear(bottleneck, out,
    bias=False)``. Unlike DINOv2 the last layer has **no** weight-norm.

    Weights are initialised with :meth:`init_weights` (trunc_normal std 0.02, zero bias) at construction;
    the official code calls ``init_weights`` explicitly after building the model on the meta device.

    Args:
        in_dim: Input (backbone embedding) dimension.
        out_dim: Number of prototypes K.
        use_bn: Insert ``BatchNorm1d`` after each hidden linear layer (False in DINOv3).
        nlayers: Number of linear layers in the MLP (at least 1).
        hidden_dim: Hidden width.
        bottleneck_dim: Bottleneck width.
        mlp_bias: Use biases in the MLP layers.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        self.mlp = _build_mlp(
            nlayers, in_dim, bottleneck_dim, hidden_dim=hidden_dim, use_bn=use_bn, bias=mlp_bias
        )
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """trunc_normal(std=0.02) on every ``nn.Linear`` weight and zero biases (official)."""
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(
        self, x: torch.Tensor, no_last_layer: bool = False, only_last_layer: bool = False
    ) -> torch.Tensor:
        """Project ``x`` ``[..., in_dim]`` to prototype logits ``[..., out_dim]``.

        Args:
            x: Input features.
            no_last_layer: Return the L2-normalised bottleneck ``[..., bottleneck_dim]`` instead.
            only_last_layer: Treat ``x`` as a bottleneck and apply only ``last_layer``.
        """
        if not only_last_layer:
            x = self.mlp(x)
            eps = 1e-6 if x.dtype == torch.float16 else 1e-12
            x = nn.functional.normalize(x, dim=-1, p=2, eps=eps)
        if not no_last_layer:
            x = self.last_layer(x)
        return x


def _build_mlp(
    nlayers: int,
    in_dim: int,
    bottleneck_dim: int,
    hidden_dim: int | None = None,
    use_bn: bool = False,
    bias: bool = True,
) -> nn.Module:
    """Build the head MLP as in the official ``_build_mlp``."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    assert hidden_dim is not None
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias)]
    if use_bn:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers.append(nn.GELU())
    for _ in range(nlayers - 2):
        layers.append(nn.Linear(hidden_dim, hidden_dim, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)
