"""Land-cover heads, model, checkpoint and the class-weighted loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dinov3geo.models import CheckpointError
from dinov3geo.models.registry import build_backbone
from dinov3geo.tasks.landcover.classes import ClassTable
from dinov3geo.tasks.landcover.heads import (
    DenseHead,
    LandcoverModel,
    LinearHead,
    load_landcover_model,
    save_landcover_model,
)
from dinov3geo.tasks.landcover.train import class_weights, landcover_loss

TABLE = ClassTable.from_labels(["forest", "pasture", "water"])


def real_backbone(in_chans: int = 4, seed: int = 0) -> torch.nn.Module:
    """A random ``vit_tiny_test`` whose blocks matter: LayerScale gammas U(0.1, 1) instead of the official 1e-5
    (which makes every block nearly the identity), other weights perturbed."""
    torch.manual_seed(seed)
    bb = build_backbone("vit_tiny_test", in_chans=in_chans).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in bb.named_parameters():
            if name.endswith((".ls1.gamma", ".ls2.gamma")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.9 + 0.1)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return bb


def test_linear_head_is_the_linear_protocol() -> None:
    """Logits at patch resolution upsampled == a linear classifier on bilinearly upsampled features."""
    torch.manual_seed(0)
    head = LinearHead(64, 3)
    f = torch.randn(2, 64, 5, 7)
    y = head([f])
    up = F.interpolate(f, size=(80, 112), mode="bilinear", align_corners=False)
    ref = F.conv2d(up, head.classifier.weight, head.classifier.bias)
    assert y.shape == (2, 3, 80, 112)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in head.modules())


def test_dense_head_blocks_matter_and_image_detail() -> None:
    bb = real_backbone()
    # the backbone's blocks change the tokens (the official LayerScale init would leave them ~unchanged)
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        emb = bb.patch_embed(x).flatten(1, 2)
        out = bb.forward_features(x)["x_prenorm"][:, -16:]
    assert (out - emb).norm() > 0.1 * emb.norm()
    head = DenseHead([64] * 4, 3, n_levels=4, hidden=32, image_detail=True, in_bands=4)
    model = LandcoverModel(bb, head, TABLE)
    assert model.layers == [0, 0, 1, 1] and model.uses_image
    x = torch.randn(2, 4, 48, 40)  # not a multiple of 16: padded and cropped back
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 3, 48, 40)
        # the full-resolution image branch: one pixel of the image changes the logits right there
        x2 = x.clone()
        x2[0, :, 20, 20] += 5.0
        d = (model(x2) - y).abs()
    assert d[0, :, 20, 20].max() > 1e-3
    assert d[1].max() == 0  # the other sample is untouched
    # context through attention: a far corner of the window moves the logits at the other corner (tapped blocks)
    no_detail = LandcoverModel(bb, DenseHead([64] * 4, 3, n_levels=4, hidden=32), TABLE)
    x3 = x.clone()
    x3[:, :, :16, :16] = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        far = (no_detail(x3) - no_detail(x))[:, :, 40:, 30:].abs().max()
    assert far > 1e-4
    with pytest.raises(ValueError, match="uses the image"):
        head([torch.randn(1, 64, 2, 2)] * 4)


def test_convnext_backbone_works_through_get_intermediate_layers() -> None:
    bb = build_backbone("convnext_tiny_test", in_chans=3)
    head = DenseHead([16, 32, 64, 128], 3, n_levels=4, hidden=16)
    model = LandcoverModel(bb, head, TABLE, layers=[0, 1, 2, 3])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_convnext_inputs_are_padded_to_its_total_stride() -> None:
    """An 80 px input (not a multiple of 32) must give what the same image centre-padded to 96 px gives: the
    stage grids of a ConvNeXt are exact only on multiples of 32 (padding to 16 truncated and stretched them)."""
    torch.manual_seed(0)
    bb = build_backbone("convnext_tiny_test", in_chans=3)
    with torch.no_grad():
        for name, p in bb.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.1, 1.0)  # blocks that matter
    head = DenseHead([16, 32, 64, 128], 3, n_levels=4, hidden=16)
    model = LandcoverModel(bb, head, TABLE, layers=[0, 1, 2, 3]).eval()
    assert model.multiple == 32
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        small = model(x)
        padded = model(torch.nn.functional.pad(x, (8, 8, 8, 8)))[..., 8:88, 8:88]
    assert small.shape == (1, 3, 80, 80)
    torch.testing.assert_close(small, padded, rtol=0, atol=1e-5)


def test_checkpoint_round_trip_weights_only(tmp_path: Path) -> None:
    bb = real_backbone()
    model = LandcoverModel(bb, DenseHead([64] * 4, 3, hidden=16, image_detail=True, in_bands=4), TABLE)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = save_landcover_model(tmp_path / "m.pt", model, bands=["blue", "green", "red", "nir"], mean=[1, 2, 3, 4],
                                std=[1, 1, 1, 2], value_scale=1e-4, gsd=30.0, backbone_source="test",
                                extra={"band_keys": [1, 2, 3, 4], "source_bands": ["b1", "b2", "b3", "b4", "b5"]})
    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["format"] == "dinov3geo.landcover" and len(raw["backbone"]["sha256"]) == 64
    loaded, info = load_landcover_model(path)
    assert loaded.table == TABLE and info["uses_image_pixels"] is True and info["gsd"] == 30.0
    assert info["bands"] == ["blue", "green", "red", "nir"] and info["head"]["kind"] == "dense"
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ValueError, match="unknown metadata key"):
        save_landcover_model(tmp_path / "x.pt", model, bands=["a", "b", "c", "d"], mean=None, std=None,
                             extra={"colour": 1})
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a dinov3geo land-cover model"):
        load_landcover_model(tmp_path / "other.pt")


def test_class_weights_change_the_loss_as_expected() -> None:
    w = class_weights([100, 25, 0], "inverse_sqrt")
    # 1/sqrt(n) = 0.1, 0.2 (0 for a class without pixels), scaled so that the mean weight per pixel is 1
    s = 125 / (100 * 0.1 + 25 * 0.2)
    torch.testing.assert_close(w, torch.tensor([0.1 * s, 0.2 * s, 0.0]))
    torch.testing.assert_close(class_weights([100, 25], "inverse"), torch.tensor([0.01, 0.04]) * 125 / 2)
    torch.testing.assert_close(class_weights([3, 1], "none"), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(class_weights([3, 1], {"b": 3.0}, ["a", "b"]), torch.tensor([1.0, 3.0]) * 4 / 6)
    with pytest.raises(ValueError, match=r"unknown classes \['c'\]"):
        class_weights([3, 1], {"c": 2.0}, ["a", "b"])
    logits = torch.tensor([[[[2.0, 0.0, 1.0, 5.0]], [[0.0, 1.0, 1.0, 5.0]], [[0.0, 0.0, 3.0, 5.0]]]])  # [1, 3, 1, 4]
    target = torch.tensor([[[0, 1, 1, 255]]])
    nll = [-math.log(math.exp(2) / (math.exp(2) + 2)),
           -math.log(math.e / (1 + math.e + 1)),
           -math.log(math.e / (math.e + math.e + math.exp(3)))]
    plain = landcover_loss(logits, target)
    assert plain.item() == pytest.approx(sum(nll) / 3, rel=1e-5)  # the 255 pixel does not count
    wt = torch.tensor([2.0, 0.5, 1.0])
    weighted = landcover_loss(logits, target, wt)
    assert weighted.item() == pytest.approx((2 * nll[0] + 0.5 * nll[1] + 0.5 * nll[2]) / (2 + 0.5 + 0.5), rel=1e-5)
    assert weighted.item() != pytest.approx(plain.item(), rel=1e-3)
    assert landcover_loss(logits, torch.full_like(target, 255)).item() == 0.0
