"""DINOv3 backbones: Meta's ViT and ConvNeXt architectures, weight loading/conversion, multispectral widening.

Quick start::

    from dinov3geo.models import build_backbone, load_backbone, SAT493M

    model = load_backbone("dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth")  # arch inferred, eval mode
    feats = model.forward_features(SAT493M.apply(images))["x_norm_patchtokens"]

    convnext = load_backbone("dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth")  # a ConvNeXt
    maps = convnext.get_intermediate_layers(images, n=1, reshape=True)  # stride-16 grid (patch_size=16)
"""

from dinov3geo.models.checkpoint import (
    CheckpointError,
    LoadReport,
    export_meta,
    from_timm_state_dict,
    infer_config,
    is_timm_state_dict,
    load_backbone,
    read_checkpoint,
    save_backbone,
    to_timm_state_dict,
)
from dinov3geo.models.config import BackboneConfig
from dinov3geo.models.convnext import (
    ConvNeXt,
    ConvNeXtConfig,
    from_timm_convnext_state_dict,
    infer_convnext_config,
    is_convnext_state_dict,
)
from dinov3geo.models.metadata import BackboneMetadata
from dinov3geo.models.multispectral import widen_patch_embed, widen_patch_weight
from dinov3geo.models.normalization import (
    LVD1689M,
    NORMALIZATIONS,
    SAT493M,
    SAT493M_CHMV2,
    Normalization,
    get_normalization,
    normalize,
)
from dinov3geo.models.padding import CenterPadding, pad_to_patch_multiple
from dinov3geo.models.registry import (
    ARCHS,
    CONVNEXT_ARCHS,
    RELEASED_ARCHS,
    RELEASED_CONVNEXT_ARCHS,
    TIMM_CONVNEXT_NAMES,
    TIMM_NAMES,
    Backbone,
    arch_name,
    build_backbone,
    config_from_dict,
    get_config,
    list_archs,
)
from dinov3geo.models.vision_transformer import DinoVisionTransformer

__all__ = [
    "ARCHS",
    "CONVNEXT_ARCHS",
    "LVD1689M",
    "NORMALIZATIONS",
    "RELEASED_ARCHS",
    "RELEASED_CONVNEXT_ARCHS",
    "SAT493M",
    "SAT493M_CHMV2",
    "TIMM_CONVNEXT_NAMES",
    "TIMM_NAMES",
    "Backbone",
    "BackboneConfig",
    "BackboneMetadata",
    "CenterPadding",
    "CheckpointError",
    "ConvNeXt",
    "ConvNeXtConfig",
    "DinoVisionTransformer",
    "LoadReport",
    "Normalization",
    "arch_name",
    "build_backbone",
    "config_from_dict",
    "export_meta",
    "from_timm_convnext_state_dict",
    "from_timm_state_dict",
    "get_config",
    "get_normalization",
    "infer_config",
    "infer_convnext_config",
    "is_convnext_state_dict",
    "is_timm_state_dict",
    "list_archs",
    "load_backbone",
    "normalize",
    "pad_to_patch_multiple",
    "read_checkpoint",
    "save_backbone",
    "to_timm_state_dict",
    "widen_patch_embed",
    "widen_patch_weight",
]
