"""Named DINOv3 architectures and :func:`build_backbone`.

Released backbones (``dinov3/hub/backbones.py``): ``vits16``, ``vits16plus``, ``vitb16``, ``vitl16``,
``vitl16_sat493m`` (ViT-L/16 SAT-493M, which carries an extra ``local_cls_norm``), ``vitl16plus``,
``vith16plus`` and ``vit7b16``. Tiny configs for tests: ``vit_tiny_test`` (GELU MLP),
``vit_tiny_swiglu_test`` (SwiGLU) and ``vit_tiny_7b_test`` (7B-like: no qkv bias, SwiGLU64, untied
local cls norm).

ConvNeXt backbones (``dinov3/hub/backbones.py`` ``dinov3_convnext_*``, :mod:`dinov3geo.models.convnext`):
``convnext_tiny``, ``convnext_small``, ``convnext_base``, ``convnext_large`` (:data:`CONVNEXT_ARCHS`,
:data:`RELEASED_CONVNEXT_ARCHS`); tiny configs for tests: ``convnext_tiny_test`` (depths [1, 1, 2, 1],
dims [16, 32, 64, 128]) and ``convnext_tiny_nols_test`` (the same without layer scale).
:func:`build_backbone` builds either family from its name or config.
"""

from __future__ import annotations

from typing import Any

import torch

from dinov3geo.models.config import BackboneConfig
from dinov3geo.models.convnext import CONVNEXT_SIZES, ConvNeXt, ConvNeXtConfig
from dinov3geo.models.vision_transformer import DinoVisionTransformer

#: Any backbone config / model of the package.
AnyConfig = BackboneConfig | ConvNeXtConfig
Backbone = DinoVisionTransformer | ConvNeXt

ARCHS: dict[str, BackboneConfig] = {
    "vits16": BackboneConfig(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4.0, ffn_layer="mlp"),
    "vits16plus": BackboneConfig(embed_dim=384, depth=12, num_heads=6, ffn_ratio=6.0, ffn_layer="swiglu"),
    "vitb16": BackboneConfig(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4.0, ffn_layer="mlp"),
    "vitl16": BackboneConfig(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4.0, ffn_layer="mlp"),
    "vitl16_sat493m": BackboneConfig(
        embed_dim=1024,
        depth=24,
        num_heads=16,
        ffn_ratio=4.0,
        ffn_layer="mlp",
        untie_global_and_local_cls_norm=True,
    ),
    "vitl16plus": BackboneConfig(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=6.0, ffn_layer="swiglu"),
    "vith16plus": BackboneConfig(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=6.0, ffn_layer="swiglu"),
    "vit7b16": BackboneConfig(
        embed_dim=4096,
        depth=40,
        num_heads=32,
        ffn_ratio=3.0,
        ffn_layer="swiglu64",
        qkv_bias=False,
        untie_global_and_local_cls_norm=True,
    ),
    # --- tiny configs for tests / examples (not released) ---
    "vit_tiny_test": BackboneConfig(embed_dim=64, depth=2, num_heads=2, ffn_ratio=4.0, ffn_layer="mlp"),
    "vit_tiny_swiglu_test": BackboneConfig(
        embed_dim=64, depth=2, num_heads=2, ffn_ratio=6.0, ffn_layer="swiglu"
    ),
    "vit_tiny_7b_test": BackboneConfig(
        embed_dim=64,
        depth=3,
        num_heads=2,
        ffn_ratio=3.0,
        ffn_layer="swiglu64",
        qkv_bias=False,
        untie_global_and_local_cls_norm=True,
    ),
}

#: The archs of Meta's released checkpoints.
RELEASED_ARCHS: tuple[str, ...] = (
    "vits16",
    "vits16plus",
    "vitb16",
    "vitl16",
    "vitl16_sat493m",
    "vitl16plus",
    "vith16plus",
    "vit7b16",
)

#: timm model names (``timm/models/eva.py``) of each released arch; ``_qkvb`` variants keep the q/v bias.
TIMM_NAMES: dict[str, str | None] = {
    "vits16": "vit_small_patch16_dinov3_qkvb",
    "vits16plus": "vit_small_plus_patch16_dinov3_qkvb",
    "vitb16": "vit_base_patch16_dinov3_qkvb",
    "vitl16": "vit_large_patch16_dinov3_qkvb",
    "vitl16_sat493m": "vit_large_patch16_dinov3_qkvb",
    "vitl16plus": None,  # not in timm
    "vith16plus": "vit_huge_plus_patch16_dinov3_qkvb",
    "vit7b16": "vit_7b_patch16_dinov3",
}


#: ConvNeXt archs (Meta's ``convnext_sizes``; ``patch_size`` 16, see :mod:`dinov3geo.models.convnext`).
CONVNEXT_ARCHS: dict[str, ConvNeXtConfig] = {
    **{f"convnext_{size}": ConvNeXtConfig(**spec) for size, spec in CONVNEXT_SIZES.items()},
    # --- tiny configs for tests / examples (not released) ---
    "convnext_tiny_test": ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128)),
    "convnext_tiny_nols_test": ConvNeXtConfig(
        depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), layer_scale_init_value=0.0
    ),
}

#: The ConvNeXt archs of Meta's released checkpoints (``dinov3_convnext_*_pretrain_lvd1689m-*.pth``).
RELEASED_CONVNEXT_ARCHS: tuple[str, ...] = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")

#: timm model names (``timm/models/convnext.py``, tags ``.dinov3_lvd1689m``) of the released ConvNeXts.
TIMM_CONVNEXT_NAMES: dict[str, str] = {name: name for name in RELEASED_CONVNEXT_ARCHS}


def list_archs(released_only: bool = False, family: str = "all") -> list[str]:
    """Names accepted by :func:`build_backbone`; ``family`` ``"vit"``, ``"convnext"`` or ``"all"``."""
    if family not in ("all", "vit", "convnext"):
        raise ValueError(f"family must be 'all', 'vit' or 'convnext', got {family!r}")
    vits = list(RELEASED_ARCHS) if released_only else list(ARCHS)
    convnexts = list(RELEASED_CONVNEXT_ARCHS) if released_only else list(CONVNEXT_ARCHS)
    return {"all": vits + convnexts, "vit": vits, "convnext": convnexts}[family]


def config_from_dict(data: dict[str, Any]) -> AnyConfig:
    """A config from its dict form: a :class:`ConvNeXtConfig` for ``family: convnext`` (or ``depths``/
    ``dims`` keys), else a :class:`BackboneConfig`."""
    if data.get("family") == ConvNeXtConfig.family or "depths" in data or "dims" in data:
        return ConvNeXtConfig.from_dict(data)
    return BackboneConfig.from_dict(data)


def get_config(arch: str | AnyConfig | dict[str, Any], **overrides: Any) -> AnyConfig:
    """Resolve ``arch`` (a name, a config or a config dict) and apply ``overrides``."""
    cfg: AnyConfig
    if isinstance(arch, BackboneConfig | ConvNeXtConfig):
        cfg = arch
    elif isinstance(arch, dict):
        cfg = config_from_dict(arch)
    elif isinstance(arch, str):
        key = arch.lower().removeprefix("dinov3_")
        if key in ARCHS:
            cfg = ARCHS[key]
        elif key in CONVNEXT_ARCHS:
            cfg = CONVNEXT_ARCHS[key]
        else:
            raise KeyError(f"unknown DINOv3 arch {arch!r}; known: {sorted(ARCHS) + sorted(CONVNEXT_ARCHS)}")
    else:
        raise TypeError(
            f"arch must be a name, a BackboneConfig, a ConvNeXtConfig or a dict, got {type(arch).__name__}"
        )
    return cfg.replace(**overrides) if overrides else cfg


def arch_name(config: AnyConfig) -> str | None:
    """The registered name whose config equals ``config`` up to training-only options, else ``None``.

    For a ConvNeXt, ``patch_size`` (the resize grid, not part of the weights) is ignored too.
    """
    if isinstance(config, ConvNeXtConfig):
        neutral_c = {"drop_path_rate": 0.0, "patch_size": 16}
        target_c = config.replace(**neutral_c)
        for name, ccfg in CONVNEXT_ARCHS.items():
            if ccfg.replace(**neutral_c) == target_c:
                return name
        return None
    neutral = {"drop_path_rate": 0.0, "img_size": 224}
    target = config.replace(**neutral)
    for name, cfg in ARCHS.items():
        if cfg.replace(**neutral) == target:
            return name
    return None


def build_backbone(
    arch: str | AnyConfig | dict[str, Any] = "vitl16",
    *,
    init: bool = True,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> Backbone:
    """Build a DINOv3 backbone: a :class:`DinoVisionTransformer` or a :class:`ConvNeXt`.

    Args:
        arch: a registered name (see :func:`list_archs`; a ``dinov3_`` prefix is accepted), a
            :class:`BackboneConfig` / :class:`ConvNeXtConfig` or its dict form.
        init: apply the official random init (skipped automatically on the ``meta`` device).
        device: where to allocate parameters (``"meta"`` for shape-only models).
        **overrides: any field of the config, e.g. for a ViT ``in_chans``, ``drop_path_rate``,
            ``layerscale_init``, ``n_storage_tokens``, ``qkv_bias``, ``ffn_layer``, ``norm_eps``,
            ``untie_global_and_local_cls_norm``, ``rope_rescale_coords`` (short RoPE aliases accepted); for a
            ConvNeXt ``in_chans``, ``drop_path_rate``, ``layer_scale_init_value``, ``patch_size``.
    """
    cfg = get_config(arch, **overrides)
    model: Backbone
    if isinstance(cfg, ConvNeXtConfig):
        model = ConvNeXt(cfg, device=device)
    else:
        model = DinoVisionTransformer(cfg, device=device)
    model.arch_name = arch_name(cfg)
    if init and (device is None or torch.device(device).type != "meta"):
        model.init_weights()
    return model
