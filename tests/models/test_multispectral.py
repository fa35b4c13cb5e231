"""Patch-embed widening for multispectral input, and the built-in normalisation constants."""

from __future__ import annotations

import pytest
import torch

from dinov3geo.models import (
    LVD1689M,
    SAT493M,
    SAT493M_CHMV2,
    get_normalization,
    load_backbone,
    normalize,
    widen_patch_embed,
    widen_patch_weight,
)

from .conftest import random_backbone


def test_widen_maths() -> None:
    w = torch.randn(8, 3, 4, 4)
    out = widen_patch_weight(w, ["blue", "nir", "Red", "green", "swir16"])
    assert out.shape == (8, 5, 4, 4)
    assert (
        torch.equal(out[:, 0], w[:, 2])
        and torch.equal(out[:, 2], w[:, 0])
        and torch.equal(out[:, 3], w[:, 1])
    )
    mean = (w[:, 0] + w[:, 1] + w[:, 2]) / 3
    torch.testing.assert_close(out[:, 1], mean)
    torch.testing.assert_close(out[:, 4], mean)
    scaled = widen_patch_weight(w, ["blue", "nir", "Red", "green", "swir16"], rescale=True)
    torch.testing.assert_close(scaled, out * 3 / 5)


def test_widen_aliases_and_explicit_map() -> None:
    w = torch.randn(4, 3, 2, 2)
    s2 = widen_patch_weight(w, ["B02", "B03", "B04", "B08"])
    assert torch.equal(s2[:, :3], w.flip(1))
    mapped = widen_patch_weight(w, ["band3", "band2", "band1"], band_map={"band3": "red", "band1": "blue"})
    assert torch.equal(mapped[:, 0], w[:, 0]) and torch.equal(mapped[:, 2], w[:, 2])
    torch.testing.assert_close(mapped[:, 1], w.mean(1))
    bgr = widen_patch_weight(w, ["red", "green", "blue"], rgb_bands=("blue", "green", "red"))
    assert torch.equal(bgr, w.flip(1))
    with pytest.raises(ValueError, match="duplicate"):
        widen_patch_weight(w, ["red", "RED"])


def test_rescaled_widening_preserves_constant_input_response() -> None:
    """With 3/N rescaling an input whose bands all equal c embeds like the RGB model on a c-valued image."""
    model = random_backbone("vit_tiny_test")
    wide = widen_patch_embed(
        random_backbone("vit_tiny_test"), ["red", "green", "blue", "nir", "swir"], rescale=True
    )
    assert wide.patch_embed.proj.in_channels == 5 and wide.config.in_chans == 5
    img = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        a = model.patch_embed(img.expand(1, 3, 32, 32))
        b = wide.patch_embed(img.expand(1, 5, 32, 32))
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_unscaled_widening_keeps_rgb_response() -> None:
    model = random_backbone("vit_tiny_test")
    wide = widen_patch_embed(random_backbone("vit_tiny_test"), ["red", "green", "blue", "nir"])
    x = torch.randn(1, 3, 32, 32)
    x4 = torch.cat([x, torch.zeros(1, 1, 32, 32)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), wide(x4), atol=1e-6, rtol=0)


def test_load_backbone_with_bands() -> None:
    model = random_backbone("vit_tiny_test")
    sd = model.state_dict()
    loaded = load_backbone(sd, bands=["blue", "green", "red", "nir"])
    assert loaded.config.in_chans == 4 and loaded.metadata.bands == ["blue", "green", "red", "nir"]
    w = loaded.patch_embed.proj.weight
    assert torch.equal(w[:, 0], sd["patch_embed.proj.weight"][:, 2])
    torch.testing.assert_close(w[:, 3], sd["patch_embed.proj.weight"].mean(1))
    assert any("widened" in n for n in loaded.load_report.notes)
    same = load_backbone(sd, bands=["Red", "Green", "Blue"])
    assert same.config.in_chans == 3
    with pytest.raises(ValueError, match="cannot adapt"):
        load_backbone(loaded.state_dict(), bands=["a", "b"])


def test_normalization_constants() -> None:
    assert LVD1689M.mean == (0.485, 0.456, 0.406) and LVD1689M.std == (0.229, 0.224, 0.225)
    assert SAT493M.mean == (0.430, 0.411, 0.296) and SAT493M.std == (0.213, 0.156, 0.143)
    assert SAT493M_CHMV2.mean == (0.420, 0.411, 0.296) and SAT493M_CHMV2.std == SAT493M.std
    assert get_normalization("SAT-493M") is SAT493M and get_normalization("imagenet") is LVD1689M
    with pytest.raises(KeyError):
        get_normalization("landsat")
    x = torch.rand(2, 3, 4, 4)
    y = SAT493M.apply(x)
    torch.testing.assert_close(y[:, 2], (x[:, 2] - 0.296) / 0.143)
    with pytest.raises(ValueError):
        normalize(torch.rand(1, 4, 2, 2), SAT493M.mean, SAT493M.std)
