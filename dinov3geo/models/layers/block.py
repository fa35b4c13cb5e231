"""Pre-norm transformer block with LayerScale and DINOv3's batch-subset stochastic depth."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from dinov3geo.models.layers.attention import RopeTables, SelfAttention
from dinov3geo.models.layers.drop_path import draw_subset_indices, residual_scale
from dinov3geo.models.layers.ffn import Mlp
from dinov3geo.models.layers.layer_scale import LayerScale
from dinov3geo.models.layers.utils import cat_keep_shapes, uncat_with_shapes


class SelfAttentionBlock(nn.Module):
    """``x = x + ls1(attn(norm1(x), rope)); x = x + ls2(mlp(norm2(x)))``.

    Accepts one tensor or a list of tensors (crop sets of different sizes). In training with
    ``drop_path > 0`` each residual branch is computed on a random subset of the batch (per crop set)
    and added back with ``index_add`` scaled by ``B / subset``; the tokens of all crop sets are then
    concatenated for the norm / linear / MLP ops, attention runs per crop set. Otherwise each crop set
    goes through the plain residual path.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        ffn_layer: Callable[..., nn.Module] = Mlp,
        mask_k_bias: bool = False,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = SelfAttention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            mask_k_bias=mask_k_bias,
            device=device,
        )
        self.ls1 = LayerScale(dim, init_values=init_values, device=device) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(
            in_features=dim,
            hidden_features=int(dim * ffn_ratio),
            act_layer=act_layer,
            bias=ffn_bias,
            device=device,
        )
        self.ls2 = LayerScale(dim, init_values=init_values, device=device) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path

    @staticmethod
    def _maybe_index_rope(rope: RopeTables | None, indices: Tensor) -> RopeTables | None:
        if rope is None:
            return None
        sin, cos = rope
        if sin.ndim == 4:  # per-sample tables
            return sin[indices], cos[indices]
        return sin, cos

    @staticmethod
    def _scale(ls: nn.Module, y: Tensor) -> Tensor:
        """``ls(y)``; without autograd the LayerScale multiply runs in place on the fresh branch output
        when that keeps the dtype (same values, one large allocation less)."""
        if (
            isinstance(ls, LayerScale)
            and not torch.is_grad_enabled()
            and torch.promote_types(y.dtype, ls.gamma.dtype) == y.dtype
        ):
            return y.mul_(ls.gamma)
        return ls(y)

    @staticmethod
    def _residual(x: Tensor, branch: Tensor) -> Tensor:
        """``x + branch``; without autograd the sum is written into the fresh ``branch`` tensor when the
        dtypes allow it (IEEE addition is commutative, so the floats are the same)."""
        if not torch.is_grad_enabled() and branch.dtype == torch.promote_types(x.dtype, branch.dtype):
            return branch.add_(x)
        return x + branch

    def _forward_plain(self, x: Tensor, rope: RopeTables | None) -> Tensor:
        x = self._residual(x, self._scale(self.ls1, self.attn(self.norm1(x), rope=rope)))
        return self._residual(x, self._scale(self.ls2, self.mlp(self.norm2(x))))

    def _forward_list(self, x_list: Sequence[Tensor], rope_list: Sequence[RopeTables | None]) -> list[Tensor]:
        if not self._stochastic_depth():
            if len(x_list) == 1:
                return [self._forward_plain(x_list[0], rope_list[0])]
            # several crop sets (e.g. global + local crops): as the official block, one set of norm / linear /
            # MLP ops over the concatenated tokens, attention per crop set (fewer, larger matmuls)
            flat, shapes, num_tokens = cat_keep_shapes(x_list)
            return uncat_with_shapes(self.forward_flat(flat, shapes, num_tokens, rope_list), shapes, num_tokens)

        p = self.sample_drop_ratio
        scales = [residual_scale(x.shape[0], p) for x in x_list]
        idx1 = [draw_subset_indices(x.shape[0], p, device=x.device) for x in x_list]
        sub1 = [x[i] for x, i in zip(x_list, idx1, strict=True)]
        ropes = [self._maybe_index_rope(r, i) for r, i in zip(rope_list, idx1, strict=True)]
        flat, shapes, num_tokens = cat_keep_shapes(sub1)
        norm1 = uncat_with_shapes(self.norm1(flat), shapes, num_tokens)
        res1 = self.attn.forward_list(norm1, rope_list=ropes)
        x_attn = [
            torch.index_add(x, dim=0, source=self.ls1(r).to(x.dtype), index=i, alpha=s)
            for x, r, i, s in zip(x_list, res1, idx1, scales, strict=True)
        ]
        idx2 = [draw_subset_indices(x.shape[0], p, device=x.device) for x in x_list]
        sub2 = [x[i] for x, i in zip(x_attn, idx2, strict=True)]
        flat, shapes, num_tokens = cat_keep_shapes(sub2)
        norm2 = uncat_with_shapes(self.norm2(flat), shapes, num_tokens)
        res2 = self.mlp.forward_list(norm2)
        return [
            torch.index_add(x, dim=0, source=self.ls2(r).to(x.dtype), index=i, alpha=s)
            for x, r, i, s in zip(x_attn, res2, idx2, scales, strict=True)
        ]

    def _stochastic_depth(self) -> bool:
        """Whether residual branches are dropped per sample (training with a drop-path rate)."""
        return self.training and self.sample_drop_ratio > 0.0

    @property
    def flat_capable(self) -> bool:
        """Whether :meth:`forward_flat` applies (no stochastic depth in the current mode)."""
        return not self._stochastic_depth()

    def forward_flat(self, flat: Tensor, shapes: Sequence[torch.Size], num_tokens: Sequence[int],
                     rope_list: Sequence[RopeTables | None]) -> Tensor:
        """The block on several crop sets kept concatenated (``flat`` ``[tokens, D]`` from
        :func:`cat_keep_shapes`): norms, linears and MLP over all tokens, attention per crop set. A model
        passes ``flat`` from block to block without splitting and re-concatenating the crop sets in between
        (same floats as :meth:`forward` on the list). Not for stochastic depth (see :attr:`flat_capable`)."""
        if self._stochastic_depth():
            raise RuntimeError("forward_flat does not implement stochastic depth; use forward on the list")
        y = self.attn.forward_flat(self.norm1(flat), shapes, num_tokens, rope_list)
        flat = self._residual(flat, self._scale(self.ls1, y))
        return self._residual(flat, self._scale(self.ls2, self.mlp(self.norm2(flat))))

    def forward(
        self,
        x_or_x_list: Tensor | list[Tensor],
        rope_or_rope_list: RopeTables | None | list[RopeTables | None] = None,
    ) -> Tensor | list[Tensor]:
        if isinstance(x_or_x_list, Tensor):
            return self._forward_list([x_or_x_list], [rope_or_rope_list])[0]  # type: ignore[list-item]
        if isinstance(x_or_x_list, list):
            ropes = rope_or_rope_list if rope_or_rope_list is not None else [None] * len(x_or_x_list)
            return self._forward_list(x_or_x_list, ropes)  # type: ignore[arg-type]
        raise TypeError(f"expected a Tensor or a list of Tensors, got {type(x_or_x_list).__name__}")
