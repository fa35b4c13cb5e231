"""Architecture description of a DINOv3 backbone (:class:`BackboneConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dinov3geo.models.layers.ffn import FFN_LAYERS, ffn_hidden_features
from dinov3geo.models.layers.norm import NORM_LAYERS

#: Short override names accepted by :meth:`BackboneConfig.replace` / ``build_backbone`` -> field names.
ALIASES: dict[str, str] = {
    "rope_base": "pos_embed_rope_base",
    "rope_min_period": "pos_embed_rope_min_period",
    "rope_max_period": "pos_embed_rope_max_period",
    "rope_normalize_coords": "pos_embed_rope_normalize_coords",
    "rope_shift_coords": "pos_embed_rope_shift_coords",
    "rope_jitter_coords": "pos_embed_rope_jitter_coords",
    "rope_rescale_coords": "pos_embed_rope_rescale_coords",
    "rope_dtype": "pos_embed_rope_dtype",
    "layer_scale_init": "layerscale_init",
    "drop_path": "drop_path_rate",
    "num_storage_tokens": "n_storage_tokens",
    "untie_cls_norm": "untie_cls_and_patch_norms",
    "untie_local_cls_norm": "untie_global_and_local_cls_norm",
}

ROPE_DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class BackboneConfig:
    """Constructor arguments of :class:`~dinov3geo.models.DinoVisionTransformer` (Meta's names).

    Defaults are the flags shared by every released DINOv3 ViT (RoPE base 100, ``separate`` coords,
    ``rescale_coords=2``, fp32 RoPE, LayerScale 1e-5, ``layernormbf16`` i.e. LayerNorm eps 1e-5,
    4 storage tokens, masked k bias). ``norm_eps`` overrides the eps of the named norm.
    ``img_size`` is informational only.
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_ratio: float = 4.0
    ffn_layer: str = "mlp"
    patch_size: int = 16
    in_chans: int = 3
    img_size: int = 224
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    mask_k_bias: bool = True
    drop_path_rate: float = 0.0
    layerscale_init: float | None = 1e-5
    norm_layer: str = "layernormbf16"
    norm_eps: float | None = None
    n_storage_tokens: int = 4
    untie_cls_and_patch_norms: bool = False
    untie_global_and_local_cls_norm: bool = False
    pos_embed_rope_base: float | None = 100.0
    pos_embed_rope_min_period: float | None = None
    pos_embed_rope_max_period: float | None = None
    pos_embed_rope_normalize_coords: str = "separate"
    pos_embed_rope_shift_coords: float | None = None
    pos_embed_rope_jitter_coords: float | None = None
    pos_embed_rope_rescale_coords: float | None = 2.0
    pos_embed_rope_dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.embed_dim <= 0 or self.depth <= 0 or self.num_heads <= 0:
            raise ValueError("embed_dim, depth and num_heads must be positive")
        if self.embed_dim % (4 * self.num_heads) != 0:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by 4 * num_heads ({4 * self.num_heads}) for RoPE"
            )
        if self.ffn_layer not in FFN_LAYERS:
            raise ValueError(f"unknown ffn_layer {self.ffn_layer!r}; choose one of {sorted(FFN_LAYERS)}")
        if self.norm_layer not in NORM_LAYERS:
            raise ValueError(f"unknown norm_layer {self.norm_layer!r}; choose one of {sorted(NORM_LAYERS)}")
        if self.pos_embed_rope_dtype not in ROPE_DTYPES:
            raise ValueError(
                f"unknown pos_embed_rope_dtype {self.pos_embed_rope_dtype!r}; choose one of {ROPE_DTYPES}"
            )
        if self.pos_embed_rope_normalize_coords not in ("min", "max", "separate"):
            raise ValueError(
                f"unknown pos_embed_rope_normalize_coords {self.pos_embed_rope_normalize_coords!r}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.in_chans <= 0 or self.n_storage_tokens < 0:
            raise ValueError("in_chans must be positive and n_storage_tokens non-negative")

    @property
    def head_dim(self) -> int:
        """Per-head width ``D / heads``."""
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Actual FFN hidden width (after the SwiGLU 2/3 factor and alignment)."""
        return ffn_hidden_features(self.ffn_layer, self.embed_dim, self.ffn_ratio)

    def replace(self, **overrides: Any) -> BackboneConfig:
        """A copy with ``overrides`` applied; short aliases such as ``rope_rescale_coords`` are accepted."""
        fields = {f.name for f in dataclasses.fields(self)}
        resolved: dict[str, Any] = {}
        for key, value in overrides.items():
            name = ALIASES.get(key, key)
            if name not in fields:
                raise TypeError(
                    f"unknown backbone option {key!r}; valid options: {sorted(fields | set(ALIASES))}"
                )
            resolved[name] = value
        return dataclasses.replace(self, **resolved)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (primitive types only; safe for ``torch.load(weights_only=True)`` and JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        return cls().replace(**data)
