"""``dinov3geo.models.taps``: what task code needs of a ViT or a ConvNeXt, and the ConvNeXt's 16 px SSL tokens."""

from __future__ import annotations

import pytest
import torch

from dinov3geo.models import LVD1689M, SAT493M, build_backbone
from dinov3geo.models.taps import (
    default_normalization,
    grid_stride,
    input_multiple,
    n_taps,
    pad_bottom_right,
    receptive_radius,
    tap_maps,
    tap_widths,
)
from tests.models.convnext_weights import convnext_test_backbone


def test_family_facts():
    vit = build_backbone("vit_tiny_test")
    cnx = build_backbone("convnext_tiny")
    assert n_taps(vit) == 2 and n_taps(cnx) == 4
    assert tap_widths(vit, [0, -1]) == [64, 64] and tap_widths(cnx, [0, 1, 2, -1]) == [96, 192, 384, 768]
    assert (grid_stride(vit), input_multiple(vit)) == (16, 16)
    assert (grid_stride(cnx), input_multiple(cnx)) == (16, 32)
    assert grid_stride(build_backbone("convnext_tiny_test", patch_size=None)) == 32
    assert default_normalization(vit) is SAT493M and default_normalization(cnx) is LVD1689M
    assert receptive_radius(vit) is None and receptive_radius(cnx) == 876


def test_pad_bottom_right_keeps_the_origin():
    x = torch.arange(2 * 48 * 80, dtype=torch.float32).reshape(1, 2, 48, 80)
    y = pad_bottom_right(x, 32)
    assert y.shape == (1, 2, 64, 96) and torch.equal(y[..., :48, :80], x)
    assert torch.equal(y[..., 48, :80], x[..., 46, :])  # reflection of the rows above the edge
    assert torch.equal(pad_bottom_right(x, 32, "constant")[..., 48:, :], torch.zeros(1, 2, 16, 96))
    assert pad_bottom_right(x, 16) is x
    tiny = torch.ones(1, 1, 16, 16)
    assert pad_bottom_right(tiny, 32).shape == (1, 1, 32, 32)  # too short to reflect: replicated


def test_tap_maps_crop_convnext_maps_to_the_input_grid():
    bb = convnext_test_backbone()
    x = torch.randn(1, 3, 80, 112)
    with torch.no_grad():
        maps = tap_maps(bb, x, [0, 3], return_class_token=True)
    assert [tuple(m.shape) for m, _ in maps] == [(1, 16, 5, 7), (1, 128, 5, 7)]
    assert [tuple(c.shape) for _, c in maps] == [(1, 16), (1, 128)]
    vit = build_backbone("vit_tiny_test").eval()
    with torch.no_grad():
        a = tap_maps(vit, x, [-1])[0]
        b = vit.get_intermediate_layers(x, n=[1], reshape=True, norm=True)[0]
    assert torch.equal(a, b)  # a ViT input is passed as it is


def test_tokens_on_grid_give_the_last_stage_on_the_16px_grid():
    bb = convnext_test_backbone()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        native = bb.forward_features(x)
        bb.tokens_on_grid = True
        grid = bb.forward_features(x)
        ref = bb.get_intermediate_layers(x, n=1, reshape=False, norm=True, return_class_token=True)[0]
    assert native["x_norm_patchtokens"].shape == (2, 2 * 3, 128)  # Meta's stride-32 tokens
    assert grid["x_norm_patchtokens"].shape == (2, 4 * 6, 128)  # the teacher's 16 px grid
    torch.testing.assert_close(grid["x_norm_patchtokens"], ref[0])
    torch.testing.assert_close(grid["x_norm_clstoken"], native["x_norm_clstoken"])  # pooled at native stride
    torch.testing.assert_close(grid["x_norm_clstoken"], ref[1])


@pytest.mark.parametrize("stage", [1, 3])
def test_receptive_radius_bounds_the_gradient_support(stage):
    bb = convnext_test_backbone()
    x = torch.randn(1, 3, 640, 640, requires_grad=True)
    f = tap_maps(bb, x, [stage])[0]
    i = 20  # the cell covering pixels 320-335
    (f[0, :, i, i] * torch.randn(f.shape[1])).sum().backward()
    rows = torch.nonzero(x.grad[0].abs().sum(0).sum(1))[:, 0]
    reach = max(i * 16 + 8 - int(rows.min()), int(rows.max()) - (i * 16 + 8))
    assert 0.8 * receptive_radius(bb, [stage]) < reach <= receptive_radius(bb, [stage])
