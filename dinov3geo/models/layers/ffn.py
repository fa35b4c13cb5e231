"""Feed-forward layers: GELU MLP and SwiGLU (``dinov3/layers/ffn_layers.py``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3geo.models.layers.utils import cat_keep_shapes, uncat_with_shapes


class _ListForwardMixin:
    def forward_list(self, x_list: Sequence[Tensor]) -> list[Tensor]:
        """Run the layer once on the concatenated tokens of every tensor in ``x_list``."""
        flat, shapes, num_tokens = cat_keep_shapes(x_list)
        return uncat_with_shapes(self(flat), shapes, num_tokens)  # type: ignore[operator]


class Mlp(_ListForwardMixin, nn.Module):
    """``fc2(GELU(fc1(x)))`` with exact (erf) GELU; hidden width ``int(D * ffn_ratio)``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        bias: bool = True,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, device=device)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_features(hidden_features: int, align_to: int = 8) -> int:
    """SwiGLU width: ``d = int(hidden * 2/3)`` rounded up to a multiple of ``align_to``."""
    d = int(hidden_features * 2 / 3)
    return d + (-d % align_to)


class SwiGLUFFN(_ListForwardMixin, nn.Module):
    """``w3(silu(w1 x) * w2 x)``; hidden width :func:`swiglu_hidden_features` of ``int(D * ffn_ratio)``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] | None = None,
        bias: bool = True,
        align_to: int = 8,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        del act_layer  # always SiLU, the argument exists for signature compatibility
        out_features = out_features or in_features
        hidden = swiglu_hidden_features(hidden_features or in_features, align_to)
        self.w1 = nn.Linear(in_features, hidden, bias=bias, device=device)
        self.w2 = nn.Linear(in_features, hidden, bias=bias, device=device)
        self.w3 = nn.Linear(hidden, out_features, bias=bias, device=device)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():  # same values, computed in place on the fresh w1 output
            return self.w3(F.silu(self.w1(x), inplace=True).mul_(self.w2(x)))
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


#: ``ffn_layer`` names -> SwiGLU alignment (``None`` for the GELU MLP).
FFN_LAYERS: dict[str, int | None] = {
    "mlp": None,
    "swiglu": 8,
    "swiglu32": 32,
    "swiglu64": 64,
    "swiglu128": 128,
}


def make_ffn_layer(name: str) -> Callable[..., nn.Module]:
    """Constructor for the FFN called ``name`` (``mlp``, ``swiglu``, ``swiglu32``, ``swiglu64``, ``swiglu128``)."""
    if name not in FFN_LAYERS:
        raise ValueError(f"unknown ffn_layer {name!r}; choose one of {sorted(FFN_LAYERS)}")
    align = FFN_LAYERS[name]
    return Mlp if align is None else partial(SwiGLUFFN, align_to=align)


def ffn_hidden_features(name: str, embed_dim: int, ffn_ratio: float) -> int:
    """Actual hidden width of the FFN ``name`` for ``embed_dim`` and ``ffn_ratio``."""
    if name not in FFN_LAYERS:
        raise ValueError(f"unknown ffn_layer {name!r}; choose one of {sorted(FFN_LAYERS)}")
    hidden = int(embed_dim * ffn_ratio)
    align = FFN_LAYERS[name]
    return hidden if align is None else swiglu_hidden_features(hidden, align)
