"""``DinoVisionTransformer``: the DINOv3 ViT backbone, same structure, keys and forward API as Meta's.

Token layout: ``[cls, storage_0 .. storage_{R-1}, patches (row-major)]``; no absolute position embedding,
axial RoPE on the patch tokens. Outputs of :meth:`DinoVisionTransformer.forward_features`:
``x_norm_clstoken [B, D]``, ``x_storage_tokens [B, R, D]`` (normed), ``x_norm_patchtokens [B, N, D]``,
``x_prenorm [B, 1+R+N, D]`` and ``masks``.

Inputs whose sides are not multiples of the patch size are *floored* by the patch convolution in
``forward_features`` (trailing pixels are ignored), exactly like the official model. Meta's dense eval
wrappers centre-pad instead; use :func:`~dinov3geo.models.padding.pad_to_patch_multiple` or
``get_intermediate_layers(..., pad_to_multiple=True)`` for that.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from dinov3geo.models.config import BackboneConfig
from dinov3geo.models.layers.attention import RopeTables, init_linear_
from dinov3geo.models.layers.block import SelfAttentionBlock
from dinov3geo.models.layers.ffn import make_ffn_layer
from dinov3geo.models.layers.layer_scale import LayerScale
from dinov3geo.models.layers.norm import RMSNorm, make_norm_layer
from dinov3geo.models.layers.patch_embed import PatchEmbed
from dinov3geo.models.layers.rope import RopePositionEmbedding
from dinov3geo.models.layers.utils import cat_keep_shapes, named_apply, uncat_with_shapes
from dinov3geo.models.padding import pad_to_patch_multiple

logger = logging.getLogger(__name__)

ROPE_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def init_weights_vit(module: nn.Module, name: str = "") -> None:
    """Official per-module init (``init_weights_vit``)."""
    del name
    if isinstance(module, nn.Linear):
        init_linear_(module)
    if isinstance(module, (nn.LayerNorm, LayerScale, PatchEmbed, RMSNorm)):
        module.reset_parameters()


class DinoVisionTransformer(nn.Module):
    """The DINOv3 ViT. Build it with :func:`dinov3geo.models.build_backbone` or from a :class:`BackboneConfig`.

    ``DinoVisionTransformer(config)`` or Meta-style keyword arguments
    (``DinoVisionTransformer(embed_dim=384, depth=12, num_heads=6, ...)``, any :class:`BackboneConfig` field,
    applied on top of ``config``). Parameters are created uninitialised (``torch.empty``, as in Meta's code);
    call :meth:`init_weights` (``build_backbone`` does) or load a checkpoint. ``periods`` and the qkv ``bias_mask`` are filled at
    construction and are persistent buffers that checkpoints overwrite.
    """

    def __init__(
        self, config: BackboneConfig | None = None, *, device: Any | None = None, **kwargs: Any
    ) -> None:
        super().__init__()
        cfg = (config or BackboneConfig()).replace(**kwargs) if kwargs else (config or BackboneConfig())
        self.config = cfg
        norm_layer = partial(make_norm_layer(cfg.norm_layer, cfg.norm_eps), device=device)

        self.num_features = self.embed_dim = cfg.embed_dim
        self.n_blocks = cfg.depth
        self.num_heads = cfg.num_heads
        self.patch_size = cfg.patch_size
        self.n_storage_tokens = cfg.n_storage_tokens

        self.patch_embed = PatchEmbed(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            embed_dim=cfg.embed_dim,
            flatten_embedding=False,
            device=device,
        )
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.embed_dim, device=device))
        if cfg.n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(
                torch.empty(1, cfg.n_storage_tokens, cfg.embed_dim, device=device)
            )
        else:
            self.storage_tokens = None
        self.rope_embed = RopePositionEmbedding(
            embed_dim=cfg.embed_dim,
            num_heads=cfg.num_heads,
            base=cfg.pos_embed_rope_base,
            min_period=cfg.pos_embed_rope_min_period,
            max_period=cfg.pos_embed_rope_max_period,
            normalize_coords=cfg.pos_embed_rope_normalize_coords,  # type: ignore[arg-type]
            shift_coords=cfg.pos_embed_rope_shift_coords,
            jitter_coords=cfg.pos_embed_rope_jitter_coords,
            rescale_coords=cfg.pos_embed_rope_rescale_coords,
            dtype=ROPE_DTYPE[cfg.pos_embed_rope_dtype],
            device=device,
        )
        ffn_layer = make_ffn_layer(cfg.ffn_layer)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(
                dim=cfg.embed_dim,
                num_heads=cfg.num_heads,
                ffn_ratio=cfg.ffn_ratio,
                qkv_bias=cfg.qkv_bias,
                proj_bias=cfg.proj_bias,
                ffn_bias=cfg.ffn_bias,
                init_values=cfg.layerscale_init,
                drop_path=cfg.drop_path_rate,
                norm_layer=norm_layer,
                act_layer=nn.GELU,
                ffn_layer=ffn_layer,
                mask_k_bias=cfg.mask_k_bias,
                device=device,
            )
            for _ in range(cfg.depth)
        )
        self.chunked_blocks = False
        self.norm = norm_layer(cfg.embed_dim)
        self.untie_cls_and_patch_norms = cfg.untie_cls_and_patch_norms
        self.cls_norm = norm_layer(cfg.embed_dim) if cfg.untie_cls_and_patch_norms else None
        self.untie_global_and_local_cls_norm = cfg.untie_global_and_local_cls_norm
        # Applied to cls + storage of the 2nd crop set (local crops) in training only; never at eval.
        self.local_cls_norm = norm_layer(cfg.embed_dim) if cfg.untie_global_and_local_cls_norm else None
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.empty(1, cfg.embed_dim, device=device))
        self.metadata: Any = None  # BackboneMetadata attached by load_backbone
        self.arch_name: str | None = None  # registered arch name, set by build_backbone / load_backbone
        self.load_report: Any = None  # checkpoint.LoadReport, set by load_backbone

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Official init: trunc-normal(0.02) linears with zero bias, normal(0.02) cls/storage tokens,
        zero mask token, LayerScale 1e-5, default conv init for the patch embedding, recomputed periods."""
        self.rope_embed._init_weights()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.storage_tokens is not None:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        named_apply(init_weights_vit, self)

    # --------------------------------------------------------------- tokens
    def prepare_tokens_with_masks(
        self, x: Tensor, masks: Tensor | None = None
    ) -> tuple[Tensor, tuple[int, int]]:
        """Patch-embed ``x``, substitute ``mask_token`` at ``masks`` (``[B, N]`` bool), prepend cls/storage."""
        x = self.patch_embed(x)
        B, H, W, _ = x.shape
        x = x.flatten(1, 2)
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise ValueError(
                    f"masks must have shape {tuple(x.shape[:2])} (B, N patches), got {tuple(masks.shape)}"
                )
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
            cls_token = self.cls_token
        else:
            cls_token = self.cls_token + 0 * self.mask_token  # keeps mask_token in the autograd graph
        parts = [cls_token.expand(B, -1, -1)]
        if self.storage_tokens is not None:
            parts.append(self.storage_tokens.expand(B, -1, -1))
        parts.append(x)
        return torch.cat(parts, dim=1), (H, W)

    def _rope(self, H: int, W: int) -> RopeTables:
        return self.rope_embed(H=H, W=W)

    # -------------------------------------------------------------- forward
    def forward_features_list(
        self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None]
    ) -> list[dict[str, Tensor | None]]:
        """Run several crop sets through the same blocks; returns one output dict per crop set."""
        if len(x_list) != len(masks_list):
            raise ValueError(f"got {len(x_list)} inputs but {len(masks_list)} masks")
        xs: list[Tensor] = []
        hws: list[tuple[int, int]] = []
        for t_x, t_masks in zip(x_list, masks_list, strict=True):
            tokens, hw = self.prepare_tokens_with_masks(t_x, t_masks)
            xs.append(tokens)
            hws.append(hw)
        if len(xs) > 1 and all(getattr(blk, "flat_capable", False) for blk in self.blocks):
            # several crop sets stay concatenated from the first block to the last (as the official list
            # forward, without splitting and re-concatenating them around every block)
            flat, shapes, num_tokens = cat_keep_shapes(xs)
            for blk in self.blocks:
                ropes = [self._rope(H, W) for H, W in hws]  # per block: each draws its own box jittering
                flat = blk.forward_flat(flat, shapes, num_tokens, ropes)
            xs = uncat_with_shapes(flat, shapes, num_tokens)
        else:
            for blk in self.blocks:
                # recomputed per block: in training each block draws its own RoPE box jittering
                ropes = [self._rope(H, W) for H, W in hws]
                xs = blk(xs, ropes)
        n_prefix = self.n_storage_tokens + 1
        output: list[dict[str, Tensor | None]] = []
        for idx, (x, masks) in enumerate(zip(xs, masks_list, strict=True)):
            if self.untie_cls_and_patch_norms or self.untie_global_and_local_cls_norm:
                if self.untie_global_and_local_cls_norm and self.training and idx == 1:
                    x_norm_cls_reg = self.local_cls_norm(x[:, :n_prefix])  # type: ignore[misc]
                elif self.untie_cls_and_patch_norms:
                    x_norm_cls_reg = self.cls_norm(x[:, :n_prefix])  # type: ignore[misc]
                else:
                    x_norm_cls_reg = self.norm(x[:, :n_prefix])
                x_norm_patch = self.norm(x[:, n_prefix:])
            else:
                x_norm = self.norm(x)
                x_norm_cls_reg = x_norm[:, :n_prefix]
                x_norm_patch = x_norm[:, n_prefix:]
            output.append(
                {
                    "x_norm_clstoken": x_norm_cls_reg[:, 0],
                    "x_storage_tokens": x_norm_cls_reg[:, 1:],
                    "x_norm_patchtokens": x_norm_patch,
                    "x_prenorm": x,
                    "masks": masks,
                }
            )
        return output

    def forward_features(
        self, x: Tensor | list[Tensor], masks: Tensor | None | list[Tensor | None] = None
    ) -> dict[str, Tensor | None] | list[dict[str, Tensor | None]]:
        """Features of one batch (a dict) or of a list of crop sets (a list of dicts, ``masks`` a list)."""
        if isinstance(x, Tensor):
            if isinstance(masks, list):
                raise TypeError("masks must be a Tensor or None when x is a single Tensor")
            return self.forward_features_list([x], [masks])[0]
        if masks is None:
            masks = [None] * len(x)
        if not isinstance(masks, list):
            raise TypeError("masks must be a list (one entry per crop set) when x is a list")
        return self.forward_features_list(x, masks)

    def forward(self, *args: Any, is_training: bool = False, **kwargs: Any) -> Any:
        """``head(x_norm_clstoken)`` (``head`` is Identity); with ``is_training=True`` the feature dict(s)."""
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        if isinstance(ret, list):
            return [self.head(r["x_norm_clstoken"]) for r in ret]
        return self.head(ret["x_norm_clstoken"])

    # ------------------------------------------------------ intermediate layers
    def _get_intermediate_layers_not_chunked(self, x: Tensor, n: int | Sequence[int] = 1) -> list[Tensor]:
        x, (H, W) = self.prepare_tokens_with_masks(x)
        total = len(self.blocks)
        if isinstance(n, int):
            if not 1 <= n <= total:
                raise ValueError(f"n must be between 1 and {total}, got {n}")
            blocks_to_take: Sequence[int] = range(total - n, total)
        else:
            blocks_to_take = [int(i) for i in n]
            bad = [i for i in blocks_to_take if not 0 <= i < total]
            if bad:
                raise ValueError(f"block indices {bad} out of range for a {total}-block model (0-based)")
        wanted = set(blocks_to_take)
        last = max(wanted)
        output: list[Tensor] = []
        for i, blk in enumerate(self.blocks):
            if not self.training and i > last:
                break  # nothing left to collect; eval is deterministic so skipping changes nothing
            x = blk(x, self._rope(H, W))
            if i in wanted:
                output.append(x)
        if len(output) != len(blocks_to_take):
            raise ValueError(f"only {len(output)} / {len(blocks_to_take)} blocks found (duplicate indices?)")
        return output

    def get_intermediate_layers(
        self,
        x: Tensor,
        *,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
        pad_to_multiple: bool = False,
    ) -> tuple[Any, ...]:
        """Outputs of some blocks, exactly as Meta's method.

        Args:
            x: images ``[B, C, H, W]``.
            n: an int takes the last ``n`` blocks; a sequence takes those 0-based block indices.
            reshape: return patch tokens as ``[B, D, h, w]`` instead of ``[B, h*w, D]``.
            return_class_token / return_extra_tokens: return tuples ``(patches, cls[, storage])``.
            norm: apply the final norm (``cls_norm`` to cls/storage when untied).
            pad_to_multiple: dinov3geo extra: centre-pad ``x`` to a multiple of the patch size first
                (Meta's eval ``CenterPadding``); otherwise sides are floored by the patch conv.

        Returns:
            A tuple with one entry per taken block: a patch tensor, or a tuple
            ``(patches, cls [B, D])``, ``(patches, storage [B, R, D])`` or ``(patches, cls, storage)``.
        """
        if pad_to_multiple:
            x = pad_to_patch_multiple(x, self.patch_size)
        outputs = self._get_intermediate_layers_not_chunked(x, n)
        n_prefix = self.n_storage_tokens + 1
        if norm:
            normed = []
            for out in outputs:
                if self.untie_cls_and_patch_norms:
                    cls_reg = self.cls_norm(out[:, :n_prefix])  # type: ignore[misc]
                    normed.append(torch.cat((cls_reg, self.norm(out[:, n_prefix:])), dim=1))
                else:
                    normed.append(self.norm(out))
            outputs = normed
        class_tokens = [out[:, 0] for out in outputs]
        extra_tokens = [out[:, 1:n_prefix] for out in outputs]
        patches = [out[:, n_prefix:] for out in outputs]
        if reshape:
            B, _, h, w = x.shape
            hp, wp = h // self.patch_size, w // self.patch_size
            patches = [p.reshape(B, hp, wp, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token and return_extra_tokens:
            return tuple(zip(patches, class_tokens, extra_tokens, strict=True))
        if return_class_token:
            return tuple(zip(patches, class_tokens, strict=True))
        if return_extra_tokens:
            return tuple(zip(patches, extra_tokens, strict=True))
        return tuple(patches)
