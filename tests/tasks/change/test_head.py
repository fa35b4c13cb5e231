"""Change head: shapes, frozen backbone, checkpoint round trip (weights_only), backbone identity checks."""

from __future__ import annotations

import pytest
import torch

from dinov3geo.models import build_backbone, save_backbone
from dinov3geo.tasks.change.head import (
    ChangeHead,
    ChangeModel,
    ChangeRasterModel,
    load_change_model,
    save_change_model,
)


def _model(upscale: int = 1, detail: int = 8, in_chans: int = 3) -> ChangeModel:
    torch.manual_seed(0)
    bb = build_backbone("vit_tiny_test", in_chans=in_chans).eval()
    head = ChangeHead(64, 2, 16 // upscale, in_chans, hidden=32, detail_channels=detail)
    return ChangeModel(bb, head, [0, 1], upscale)


def test_shapes_and_frozen_backbone():
    m = _model()
    x = torch.randn(2, 6, 40, 56)  # padded to 48x64 internally, cropped back
    assert m(x).shape == (2, 1, 40, 56)
    assert all(not p.requires_grad for p in m.backbone.parameters())
    m.train()
    assert not m.backbone.training and m.head.training
    m(x).mean().backward()
    assert all(p.grad is None for p in m.backbone.parameters())
    assert all(p.grad is not None for p in m.head.parameters())
    m4 = _model(upscale=4, detail=0)
    assert m4.stride == 4 and len(m4.head.up) == 2
    assert m4(torch.randn(1, 6, 12, 20)).shape == (1, 1, 12, 20)
    with pytest.raises(ValueError, match="power of two"):
        ChangeHead(64, 2, 12, 3)
    with pytest.raises(ValueError, match="does not fit"):
        ChangeModel(build_backbone("vit_tiny_test"), ChangeHead(64, 3, 16, 3), [0, 1])


def test_save_load_round_trip(tmp_path):
    m = _model(in_chans=4)
    with torch.no_grad():
        for p in m.head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = save_change_model(m, tmp_path / "head.pt", bands=["blue", "green", "red", "nir"], value_scale=1e-4,
                             mean=[0.1, 0.2, 0.3, 0.4], std=[0.5, 0.5, 0.5, 0.5], threshold=0.37,
                             train_info={"loss_history": [1.0, 0.5], "note": ("a", 1)})
    raw = torch.load(path, weights_only=True)  # plain dict of tensors and primitives
    assert raw["format"] == "dinov3geo.change_head" and raw["backbone"]["config"]["in_chans"] == 4
    loaded = load_change_model(path)
    assert isinstance(loaded, ChangeRasterModel)
    assert loaded.threshold == pytest.approx(0.37) and loaded.bands == ["blue", "green", "red", "nir"]
    assert loaded.in_bands == 8 and loaded.scale == 1 and loaded.receptive_margin == 32
    x = torch.rand(2, 8, 32, 48) * 10000
    valid = torch.ones(2, 32, 48, dtype=torch.bool)
    ref = ChangeRasterModel(m, value_scale=1e-4, mean=[0.1, 0.2, 0.3, 0.4], std=[0.5] * 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, valid), ref(x, valid))
        y = loaded(x, valid)
    assert y.shape == (2, 1, 32, 48) and float(y.min()) >= 0 and float(y.max()) <= 1
    assert loaded.fingerprint() == ref.fingerprint()


def test_external_backbone_identity_is_checked(tmp_path):
    m = _model()
    bb_path = save_backbone(m.backbone, tmp_path / "bb.pt")
    path = save_change_model(m, tmp_path / "head.pt", bands=["red", "green", "blue"], value_scale=1 / 255,
                             mean=None, std=None, threshold=0.5, backbone_source=bb_path, include_backbone=False)
    assert torch.load(path, weights_only=True)["backbone"]["state_dict"] is None
    loaded = load_change_model(path)  # from the recorded source
    x = torch.rand(1, 6, 32, 32)
    v = torch.ones(1, 32, 32, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, v), torch.sigmoid(m(x / 255)))
    other = build_backbone("vit_tiny_test").eval()  # same arch, other weights
    with pytest.raises(ValueError, match="not the one it was trained with"):
        load_change_model(path, backbone=other)
    bb_path.unlink()
    with pytest.raises(FileNotFoundError, match="needs its backbone"):
        load_change_model(path)


def test_rejects_other_files(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"format": "something"}, p)
    with pytest.raises(ValueError, match="not a dinov3geo change-head checkpoint"):
        load_change_model(p)
    with pytest.raises(FileNotFoundError):
        load_change_model(tmp_path / "missing.pt")
