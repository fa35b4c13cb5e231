"""Building blocks of the DINOv3 vision transformer (one concept per module, mirroring Meta's layout)."""

from dinov3geo.models.layers.attention import LinearKMaskedBias, SelfAttention
from dinov3geo.models.layers.block import SelfAttentionBlock
from dinov3geo.models.layers.drop_path import draw_subset_indices, subset_size
from dinov3geo.models.layers.ffn import FFN_LAYERS, Mlp, SwiGLUFFN, make_ffn_layer, swiglu_hidden_features
from dinov3geo.models.layers.layer_scale import LayerScale
from dinov3geo.models.layers.norm import NORM_LAYERS, RMSNorm, make_norm_layer
from dinov3geo.models.layers.patch_embed import PatchEmbed
from dinov3geo.models.layers.rope import RopePositionEmbedding, rope_apply, rope_rotate_half
from dinov3geo.models.layers.utils import cat_keep_shapes, named_apply, per_sample, uncat_with_shapes

__all__ = [
    "FFN_LAYERS",
    "NORM_LAYERS",
    "LayerScale",
    "LinearKMaskedBias",
    "Mlp",
    "PatchEmbed",
    "RMSNorm",
    "RopePositionEmbedding",
    "SelfAttention",
    "SelfAttentionBlock",
    "SwiGLUFFN",
    "cat_keep_shapes",
    "draw_subset_indices",
    "make_ffn_layer",
    "make_norm_layer",
    "named_apply",
    "per_sample",
    "rope_apply",
    "rope_rotate_half",
    "subset_size",
    "swiglu_hidden_features",
    "uncat_with_shapes",
]
