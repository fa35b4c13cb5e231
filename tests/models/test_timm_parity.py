"""Numerical parity with timm's Eva DINOv3 port (which is bit-identical to Meta's model, spec section 7)."""

from __future__ import annotations

import pytest
import torch

from dinov3geo.models import from_timm_state_dict, load_backbone, to_timm_state_dict

from .conftest import make_timm_eva, random_backbone

timm_eva = pytest.importorskip("timm.models.eva")

ATOL = 1e-5
SIZES = [(64, 64), (48, 80)]


def _paired(arch: str):
    model = random_backbone(arch)
    eva = make_timm_eva(model.config)
    eva.load_state_dict(timm_eva.checkpoint_filter_fn(dict(model.state_dict()), eva), strict=True)
    return model, eva


@pytest.mark.parametrize("arch", ["vit_tiny_test", "vit_tiny_swiglu_test"])
@pytest.mark.parametrize("hw", SIZES)
def test_forward_features_match_timm(arch: str, hw: tuple[int, int]) -> None:
    model, eva = _paired(arch)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ours = model.forward_features(x)
        ref = eva.forward_features(x)
    n_prefix = 1 + model.n_storage_tokens
    torch.testing.assert_close(ours["x_norm_clstoken"], ref[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours["x_storage_tokens"], ref[:, 1:n_prefix], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours["x_norm_patchtokens"], ref[:, n_prefix:], atol=ATOL, rtol=0)
    assert ours["x_norm_patchtokens"].shape == (2, (hw[0] // 16) * (hw[1] // 16), 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eva(x), atol=ATOL, rtol=0)  # CLS via global_pool="token"


@pytest.mark.parametrize("arch", ["vit_tiny_test", "vit_tiny_swiglu_test"])
def test_intermediate_layers_match_timm(arch: str) -> None:
    model, eva = _paired(arch)
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        ours = model.get_intermediate_layers(x, n=[0, 1], reshape=True, return_class_token=True)
        ref = eva.forward_intermediates(
            x,
            indices=[0, 1],
            norm=True,
            output_fmt="NCHW",
            intermediates_only=True,
            return_prefix_tokens=True,
        )
    assert len(ours) == len(ref) == 2
    for (patch, cls), (ref_patch, ref_prefix) in zip(ours, ref, strict=True):
        assert patch.shape == (2, 64, 3, 5)
        torch.testing.assert_close(patch, ref_patch, atol=ATOL, rtol=0)
        torch.testing.assert_close(cls, ref_prefix[:, 0], atol=ATOL, rtol=0)


def test_timm_weights_load_and_match() -> None:
    """A timm-format state dict loads through load_backbone (q/v bias, gammas, SwiGLU names converted)."""
    model, eva = _paired("vit_tiny_swiglu_test")
    loaded = load_backbone(eva.state_dict(), num_heads=2)
    assert loaded.load_report.source_format == "timm"
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.forward_features(x)["x_prenorm"], model.forward_features(x)["x_prenorm"], atol=ATOL, rtol=0
        )
    # without the head count the released head dim (64) is assumed and the report says so
    guessed = load_backbone(eva.state_dict())
    assert guessed.num_heads == 1
    assert any("head dim 64" in n for n in guessed.load_report.notes)


def test_timm_conversion_roundtrip() -> None:
    model = random_backbone("vit_tiny_swiglu_test")
    sd = model.state_dict()
    back = from_timm_state_dict(to_timm_state_dict(sd), head_dim=32)
    assert list(back) == list(sd)
    lossy = {"mask_token"} | {f"blocks.{i}.attn.qkv.bias" for i in range(model.config.depth)}
    for k in set(sd) - lossy:
        assert torch.equal(back[k], sd[k]), k
    # k third of the qkv bias is masked: timm drops it and the effective bias is unchanged
    for i in range(model.config.depth):
        b, m = sd[f"blocks.{i}.attn.qkv.bias"], sd[f"blocks.{i}.attn.qkv.bias_mask"]
        torch.testing.assert_close(back[f"blocks.{i}.attn.qkv.bias"] * m, b * m, atol=0, rtol=0)
    assert torch.equal(
        back["mask_token"], torch.zeros(1, 64)
    )  # timm has no mask token: official init (zeros)


def test_loaded_periods_are_used() -> None:
    """Released checkpoints hold bf16-rounded periods; they must be loaded into the buffer and used."""
    model = random_backbone("vit_tiny_test")
    sd = dict(model.state_dict())
    rounded = sd["rope_embed.periods"].to(torch.bfloat16).float()
    assert not torch.equal(rounded, sd["rope_embed.periods"])
    sd["rope_embed.periods"] = rounded.to(torch.bfloat16)  # stored as bf16, as in the released files
    loaded = load_backbone(sd)
    assert loaded.rope_embed.periods.dtype == torch.float32
    assert torch.equal(loaded.rope_embed.periods, rounded)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = model.forward_features(x)["x_norm_patchtokens"]
        b = loaded.forward_features(x)["x_norm_patchtokens"]
    assert (a - b).abs().max() > 1e-6
    # the in-place route (load_state_dict into an existing model) also refreshes the cached eval tables
    with torch.no_grad():
        model.forward_features(x)
        model.load_state_dict(sd)
        torch.testing.assert_close(model.forward_features(x)["x_norm_patchtokens"], b, atol=0, rtol=0)
