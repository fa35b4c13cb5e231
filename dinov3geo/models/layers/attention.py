"""Multi-head self-attention with a fused qkv projection and RoPE on the patch tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3geo.models.layers.utils import cat_keep_shapes, uncat_with_shapes

RopeTables = tuple[Tensor, Tensor]


class LinearKMaskedBias(nn.Linear):
    """``nn.Linear`` whose bias is multiplied by a persistent ``bias_mask`` buffer.

    The mask is ``[1]*D, [0]*D, [1]*D`` for a fused qkv projection (set at construction and by
    ``init_weights``), so q and v have a bias and k has none. The buffer is saved in and loaded from
    checkpoints, like in Meta's code. Without a bias there is no ``bias_mask``.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if out_features % 3 != 0:
            raise ValueError(f"out_features ({out_features}) must be divisible by 3")
        if self.bias is not None:
            self.register_buffer("bias_mask", torch.empty_like(self.bias))
            self.reset_bias_mask()
        else:
            self.bias_mask = None

    def reset_bias_mask(self) -> None:
        """Set the mask to ones for q and v, zeros for k."""
        if self.bias_mask is not None:
            o = self.out_features
            with torch.no_grad():
                self.bias_mask.fill_(1)
                self.bias_mask[o // 3 : 2 * o // 3].fill_(0)

    def forward(self, input: Tensor) -> Tensor:
        masked_bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return F.linear(input, self.weight, masked_bias)


class _RopePrefix(torch.autograd.Function):
    """RoPE on the tokens after a prefix, with the official floats forward *and* backward and nothing saved
    but the tables: the backward of ``cast(cat(prefix, x*cos + rotate_half(x)*sin))`` written out
    (``g*cos + rotate_half^T(g*sin)`` in the table dtype, one rounding to the input dtype), instead of
    autograd's graph of slices, concatenations and casts over q and k of every block."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(sin, cos)
        ctx.x_dtype = x.dtype
        with torch.no_grad():
            return _rope_prefix(x, sin, cos)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        sin, cos = ctx.saved_tensors
        n_prefix = g.shape[-2] - sin.shape[-2]
        gw = g.to(sin.dtype)  # the backward of the official cast to the input dtype
        gp = gw[..., n_prefix:, :]
        half = gp.shape[-1] // 2
        out = torch.empty(g.shape, dtype=sin.dtype, device=g.device)
        out[..., :n_prefix, :] = gw[..., :n_prefix, :]
        res = torch.mul(gp, cos, out=out[..., n_prefix:, :])
        # rotate_half^T([w1, w2]) = [w2, -w1] with w = g*sin; a + (-b) == a - b exactly
        res[..., :half] += gp[..., half:] * sin[..., half:]
        res[..., half:] -= gp[..., :half] * sin[..., :half]
        return out.to(ctx.x_dtype), None, None


def apply_rope_prefix(x: Tensor, rope: RopeTables) -> Tensor:
    """Apply RoPE to the last ``sin.shape[-2]`` tokens of ``x`` (``[..., N, Dh]``); the prefix is not rotated.

    Same floats as the official ``apply_rope`` (q/k cast to the table dtype, ``x*cos + rotate_half(x)*sin``,
    cast back), computed with fewer passes: the two halves are updated in place (``x1*c1 - x2*s1``,
    ``x2*c2 + x1*s2``) instead of building ``rotate_half``, and when the table dtype is the wider one the
    explicit upcast is left to type promotion (the prefix round trip is then the identity).
    """
    sin, cos = rope
    if x.shape[-2] < sin.shape[-2]:
        raise ValueError(
            f"RoPE table has {sin.shape[-2]} positions but the sequence has only {x.shape[-2]} tokens"
        )
    if torch.is_grad_enabled() and x.requires_grad and not (sin.requires_grad or cos.requires_grad):
        return _RopePrefix.apply(x, sin, cos)
    return _rope_prefix(x, sin, cos)


def _rope_prefix(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    n_prefix = x.shape[-2] - sin.shape[-2]
    x_dtype = x.dtype
    if torch.promote_types(x_dtype, sin.dtype) != sin.dtype:
        # e.g. fp32 activations with a bf16 table: the official code rounds all of q/k (prefix included)
        x = x.to(sin.dtype)
    # otherwise (e.g. bf16 activations, fp32 table) type promotion inside the products upcasts exactly and
    # the prefix round trip through the table dtype is the identity
    patches = x[..., n_prefix:, :]
    half = patches.shape[-1] // 2
    if x.dtype == sin.dtype and not (torch.is_grad_enabled() and x.requires_grad):
        # write straight into the output (no concatenation pass); same floats
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        out[..., :n_prefix, :] = x[..., :n_prefix, :]
        rotated = torch.mul(patches, cos, out=out[..., n_prefix:, :])
    else:
        out = None
        rotated = patches * cos
    rotated[..., :half] -= patches[..., half:] * sin[..., :half]
    rotated[..., half:] += patches[..., :half] * sin[..., half:]
    if out is not None:
        return out.to(x_dtype)
    return torch.cat((x[..., :n_prefix, :], rotated.to(x.dtype)), dim=-2).to(x_dtype)


class SelfAttention(nn.Module):
    """Fused-qkv attention; RoPE on q and k of the patch tokens; ``F.scaled_dot_product_attention``."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        mask_k_bias: bool = False,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        linear = LinearKMaskedBias if mask_k_bias else nn.Linear
        self.qkv = linear(dim, dim * 3, bias=qkv_bias, device=device)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device)

    def compute_attention(self, qkv: Tensor, rope: RopeTables | None = None) -> Tensor:
        """Attention output ``[B, N, D]`` (before ``proj``) from the fused ``qkv`` activations."""
        B, N, C3 = qkv.shape
        C = C3 // 3
        qkv = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            # q and k are rotated together (one set of element-wise ops), bit-identical to doing them apart
            q, k = apply_rope_prefix(qkv[:2], rope).unbind(0)
        else:
            q, k = qkv[0], qkv[1]
        x = F.scaled_dot_product_attention(q, k, qkv[2])
        return x.transpose(1, 2).reshape(B, N, C)

    def forward(self, x: Tensor, rope: RopeTables | None = None) -> Tensor:
        return self.proj(self.compute_attention(self.qkv(x), rope=rope))

    def forward_list(self, x_list: Sequence[Tensor], rope_list: Sequence[RopeTables | None]) -> list[Tensor]:
        """Shared qkv/proj matmuls over all crop sets, attention run per crop set."""
        flat, shapes, num_tokens = cat_keep_shapes(x_list)
        return uncat_with_shapes(self.forward_flat(flat, shapes, num_tokens, rope_list), shapes, num_tokens)

    def forward_flat(self, flat: Tensor, shapes: Sequence[torch.Size], num_tokens: Sequence[int],
                     rope_list: Sequence[RopeTables | None]) -> Tensor:
        """:meth:`forward_list` on tokens already concatenated by ``cat_keep_shapes``; returns them flat."""
        if len(shapes) != len(rope_list):
            raise ValueError("x_list and rope_list must have the same length")
        qkv_list = uncat_with_shapes(self.qkv(flat), shapes, num_tokens)
        out = [self.compute_attention(qkv, rope=rope) for qkv, rope in zip(qkv_list, rope_list, strict=True)]
        return self.proj(cat_keep_shapes(out)[0])


def init_linear_(module: nn.Linear, std: float = 0.02) -> None:
    """Official Linear init: truncated normal(0.02) weight, zero bias, qkv ``bias_mask`` reset."""
    nn.init.trunc_normal_(module.weight, std=std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, LinearKMaskedBias):
        module.reset_bias_mask()
