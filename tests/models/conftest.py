"""Helpers shared by the model tests: random tiny backbones and the matching timm Eva model."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from dinov3geo.models import BackboneConfig, DinoVisionTransformer, build_backbone


def randomize_(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter so biases, LayerScale and mask/storage tokens are non-trivial."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def random_backbone(arch: str = "vit_tiny_test", seed: int = 0, **overrides) -> DinoVisionTransformer:
    torch.manual_seed(seed)
    return randomize_(build_backbone(arch, **overrides)).eval()


def make_timm_eva(cfg: BackboneConfig, qkv_bias: bool | None = None):
    """timm ``Eva`` configured like ``cfg`` (what timm's ``vit_*_patch16_dinov3*`` builders pass)."""
    timm_eva = pytest.importorskip("timm.models.eva")
    from timm.layers import LayerNorm

    kw = {}
    if cfg.ffn_layer != "mlp":
        kw = {
            "swiglu_mlp": True,
            "swiglu_align_to": {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}[cfg.ffn_layer],
        }
    return timm_eva.Eva(
        img_size=64,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        qkv_bias=cfg.qkv_bias if qkv_bias is None else qkv_bias,
        mlp_ratio=cfg.ffn_hidden_dim / cfg.embed_dim,
        init_values=cfg.layerscale_init,
        rope_type="dinov3",
        rope_temperature=cfg.pos_embed_rope_base,
        rope_rotate_half=True,
        use_rot_pos_emb=True,
        use_abs_pos_emb=False,
        num_reg_tokens=cfg.n_storage_tokens,
        use_fc_norm=False,
        norm_layer=partial(LayerNorm, eps=1e-5),
        dynamic_img_size=True,
        global_pool="token",
        num_classes=0,
        **kw,
    ).eval()


@pytest.fixture
def tiny() -> DinoVisionTransformer:
    """Random eval-mode ``vit_tiny_test`` (GELU MLP, depth 2, D=64, 2 heads)."""
    return random_backbone("vit_tiny_test")
