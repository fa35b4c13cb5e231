"""Tests of the DINO/iBOT projection head."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from dinov3geo.ssl.heads import DINOHead


def test_structure_and_official_state_dict_keys() -> None:
    head = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in head.mlp if isinstance(m, nn.Linear)] == [
        (32, 48),
        (48, 48),
        (48, 16),
    ]
    assert head.last_layer.bias is None
    assert (head.last_layer.in_features, head.last_layer.out_features) == (16, 64)
    # DINOv3 has no weight-norm on the last layer: no parametrisation, no weight_g / weight_v.
    assert not parametrize.is_parametrized(head.last_layer)
    assert set(head.state_dict()) == {
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
        "mlp.4.weight",
        "mlp.4.bias",
        "last_layer.weight",
    }


def test_output_shapes_and_normalised_bottleneck() -> None:
    head = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    x = torch.randn(5, 32)
    out = head(x)
    assert out.shape == (5, 64)
    z = head(x, no_last_layer=True)
    assert z.shape == (5, 16)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(head(z, only_last_layer=True), out)
    torch.testing.assert_close(out, z @ head.last_layer.weight.t())
    # Works on token batches too.
    assert head(torch.randn(2, 7, 32)).shape == (2, 7, 64)


def test_normalisation_eps_float32_vs_float16() -> None:
    head = DINOHead(4, 3, nlayers=1, bottleneck_dim=4)
    with torch.no_grad():
        head.mlp.weight.copy_(torch.eye(4))
        head.mlp.bias.zero_()
    tiny = torch.tensor([[3e-7, 4e-7, 0.0, 0.0]])  # norm 5e-7: above the fp32 eps (1e-12), below fp16's 1e-6
    z32 = head(tiny, no_last_layer=True)
    assert z32.norm().item() == pytest.approx(1.0, rel=1e-5)
    z16 = head.half()(tiny.half(), no_last_layer=True)
    assert z16.dtype == torch.float16
    # fp16 eps 1e-6 dominates: the result is x / 1e-6, not a unit vector (fp16 rounds the inputs).
    expected = tiny.half().float().norm().item() / 1e-6
    assert z16.float().norm().item() == pytest.approx(expected, rel=0.05)
    assert expected < 0.6


def test_init_statistics() -> None:
    torch.manual_seed(0)
    head = DINOHead(256, 2048, hidden_dim=512, bottleneck_dim=256)
    for layer in [*[m for m in head.mlp if isinstance(m, nn.Linear)], head.last_layer]:
        w = layer.weight.detach()
        assert w.std().item() == pytest.approx(0.02, rel=0.05)
        assert abs(w.mean().item()) < 1e-3
        assert w.abs().max().item() <= 2.0  # trunc_normal_ bounds are absolute (a=-2, b=2)
        if layer.bias is not None:
            assert torch.count_nonzero(layer.bias) == 0
    # init_weights() re-draws the weights.
    before = head.last_layer.weight.detach().clone()
    head.init_weights()
    assert not torch.equal(before, head.last_layer.weight)


def test_bn_and_nlayers_options() -> None:
    head = DINOHead(8, 10, use_bn=True, nlayers=4, hidden_dim=12, bottleneck_dim=6, mlp_bias=False)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.GELU] * 3 + [nn.Linear]
    assert all(m.bias is None for m in head.mlp if isinstance(m, nn.Linear))
    assert head(torch.randn(4, 8)).shape == (4, 10)
