"""Structure of the backbone: parameter/key counts of the releases, layer sizes, init, config handling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dinov3geo.models import ARCHS, RELEASED_ARCHS, BackboneConfig, build_backbone, get_config, list_archs
from dinov3geo.models.layers import LinearKMaskedBias, SwiGLUFFN, swiglu_hidden_features
from dinov3geo.models.layers.rope import compute_periods

# spec section 1.2: (params, state-dict keys), counted on the meta device from Meta's code
RELEASED = {
    "vits16": (21_601_152, 188),
    "vits16plus": (28_697_472, 212),
    "vitb16": (85_669_632, 188),
    "vitl16": (303_154_176, 368),
    "vitl16_sat493m": (303_156_224, 370),
    "vitl16plus": (403_915_776, 416),
    "vith16plus": (840_633_600, 552),
    "vit7b16": (6_716_043_264, 610),
}

# bf16-rounded periods stored in the released checkpoints (Dh = 64), spec section 1.1
RELEASED_PERIODS = [
    1,
    1.3359375,
    1.78125,
    2.375,
    3.15625,
    4.21875,
    5.625,
    7.5,
    10,
    13.3125,
    17.75,
    23.75,
    31.625,
    42.25,
    56.25,
    75,
]


@pytest.mark.parametrize("arch", RELEASED_ARCHS)
def test_released_param_and_key_counts(arch: str) -> None:
    model = build_backbone(arch, device="meta")
    params, keys = RELEASED[arch]
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys


def test_released_list_matches_table() -> None:
    assert set(RELEASED) == set(RELEASED_ARCHS)
    assert set(RELEASED_ARCHS) <= set(list_archs())


def test_vitl16_key_layout_and_shapes() -> None:
    sd = build_backbone("vitl16", device="meta").state_dict()
    keys = list(sd)
    assert keys[:6] == [
        "cls_token",
        "storage_tokens",
        "mask_token",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "rope_embed.periods",
    ]
    assert keys[6:21] == [
        f"blocks.0.{k}"
        for k in (
            "norm1.weight",
            "norm1.bias",
            "attn.qkv.weight",
            "attn.qkv.bias",
            "attn.qkv.bias_mask",
            "attn.proj.weight",
            "attn.proj.bias",
            "ls1.gamma",
            "norm2.weight",
            "norm2.bias",
            "mlp.fc1.weight",
            "mlp.fc1.bias",
            "mlp.fc2.weight",
            "mlp.fc2.bias",
            "ls2.gamma",
        )
    ]
    assert keys[-2:] == ["norm.weight", "norm.bias"]
    shapes = {
        "cls_token": (1, 1, 1024),
        "storage_tokens": (1, 4, 1024),
        "mask_token": (1, 1024),
        "patch_embed.proj.weight": (1024, 3, 16, 16),
        "rope_embed.periods": (16,),
        "blocks.23.attn.qkv.weight": (3072, 1024),
        "blocks.23.attn.qkv.bias_mask": (3072,),
        "blocks.23.mlp.fc1.weight": (4096, 1024),
        "blocks.23.mlp.fc2.weight": (1024, 4096),
    }
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k


def test_vit7b_layout() -> None:
    sd = build_backbone("vit7b16", device="meta").state_dict()
    assert "blocks.0.attn.qkv.bias" not in sd and "blocks.0.attn.qkv.bias_mask" not in sd
    assert tuple(sd["rope_embed.periods"].shape) == (32,)
    assert tuple(sd["blocks.0.mlp.w1.weight"].shape) == (8192, 4096)
    assert tuple(sd["blocks.0.mlp.w3.weight"].shape) == (4096, 8192)
    assert "local_cls_norm.weight" in sd


@pytest.mark.parametrize(
    ("hidden", "align", "expected"),
    [
        (2304, 8, 1536),
        (4096 * 6, 8, 16384),
        (12288, 64, 8192),
        (100, 8, 72),
        (100, 32, 96),
        (100, 64, 128),
        (100, 128, 128),
        (96, 8, 64),
    ],
)
def test_swiglu_hidden_alignment(hidden: int, align: int, expected: int) -> None:
    assert swiglu_hidden_features(hidden, align) == expected


@pytest.mark.parametrize(
    ("name", "align"), [("swiglu", 8), ("swiglu32", 32), ("swiglu64", 64), ("swiglu128", 128)]
)
def test_swiglu_layers_use_alignment(name: str, align: int) -> None:
    model = build_backbone("vit_tiny_swiglu_test", ffn_layer=name, ffn_ratio=3.1, device="meta")
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, SwiGLUFFN)
    d = int(int(64 * 3.1) * 2 / 3)
    assert mlp.w1.out_features == d + (-d % align) == model.config.ffn_hidden_dim
    assert mlp.w1.out_features % align == 0


def test_official_init() -> None:
    torch.manual_seed(0)
    model = build_backbone("vit_tiny_test", depth=3)
    assert torch.equal(model.mask_token, torch.zeros(1, 64))
    for blk in model.blocks:
        assert torch.equal(blk.ls1.gamma, torch.full((64,), 1e-5))
        assert torch.equal(blk.attn.qkv.bias, torch.zeros(192))
        assert torch.equal(blk.attn.qkv.bias_mask, torch.tensor([1.0] * 64 + [0.0] * 64 + [1.0] * 64))
        assert (
            0.017 < float(blk.attn.qkv.weight.detach().std()) < 0.023
        )  # trunc_normal(std=0.02), cut at +-2 (absolute)
    w = model.patch_embed.proj.weight
    assert w.abs().max() <= (1 / (3 * 256)) ** 0.5
    assert 0.01 < model.cls_token.std() < 0.04
    assert torch.allclose(model.rope_embed.periods, compute_periods(32, 100.0, dtype=torch.float32))


def test_periods_formula_and_released_values() -> None:
    periods = compute_periods(64, 100.0, dtype=torch.float32)
    assert periods.shape == (16,)
    assert periods[0] == 1 and abs(float(periods[-1]) - 100 ** (30 / 32)) < 1e-3
    assert periods.to(torch.bfloat16).float().tolist() == RELEASED_PERIODS
    assert compute_periods(128, 100.0, dtype=torch.float32).shape == (32,)
    minmax = compute_periods(64, None, min_period=0.5, max_period=50.0, dtype=torch.float64)
    assert torch.allclose(minmax, 0.5 * 100 ** torch.linspace(0, 1, 16, dtype=torch.float64))


def test_periods_and_bias_mask_are_persistent_buffers(tiny) -> None:
    sd = tiny.state_dict()
    assert "rope_embed.periods" in sd and "blocks.0.attn.qkv.bias_mask" in sd
    assert "rope_embed.periods" not in dict(tiny.named_parameters())
    assert isinstance(tiny.blocks[0].attn.qkv, LinearKMaskedBias)


def test_norm_eps_default_and_override() -> None:
    model = build_backbone("vit_tiny_test", device="meta")
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)
    model = build_backbone("vit_tiny_test", norm_eps=1e-6, device="meta")
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert build_backbone("vit_tiny_test", norm_layer="layernorm", device="meta").norm.eps == 1e-6


def test_overrides_and_aliases() -> None:
    model = build_backbone(
        "vit_tiny_test",
        in_chans=5,
        drop_path_rate=0.2,
        layerscale_init=None,
        n_storage_tokens=0,
        qkv_bias=False,
        untie_cls_and_patch_norms=True,
        rope_rescale_coords=None,
        rope_jitter_coords=1.5,
        device="meta",
    )
    sd = model.state_dict()
    assert sd["patch_embed.proj.weight"].shape[1] == 5
    assert (
        "storage_tokens" not in sd and "blocks.0.ls1.gamma" not in sd and "blocks.0.attn.qkv.bias" not in sd
    )
    assert "cls_norm.weight" in sd
    assert model.blocks[0].sample_drop_ratio == 0.2
    assert model.rope_embed.rescale_coords is None and model.rope_embed.jitter_coords == 1.5
    with pytest.raises(TypeError, match="unknown backbone option"):
        build_backbone("vit_tiny_test", not_an_option=1)
    with pytest.raises(KeyError, match="unknown DINOv3 arch"):
        build_backbone("vit_nope")
    assert get_config("dinov3_vits16") == ARCHS["vits16"]


@pytest.mark.parametrize(
    "bad",
    [
        {"embed_dim": 60, "num_heads": 2},
        {"ffn_layer": "geglu"},
        {"norm_layer": "batchnorm"},
        {"pos_embed_rope_dtype": "fp64"},
        {"drop_path_rate": 1.0},
    ],
)
def test_config_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        BackboneConfig(**{**ARCHS["vit_tiny_test"].to_dict(), **bad})


def test_config_dict_roundtrip() -> None:
    for cfg in ARCHS.values():
        assert BackboneConfig.from_dict(cfg.to_dict()) == cfg
