"""Light/DPT heads, CanopyHeightModel (padding, cached features, checkpoints) and CanopyRasterModel on a real GeoTIFF."""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio
import torch

from dinov3geo.inference import predict_raster
from dinov3geo.models import SAT493M_CHMV2, CheckpointError, build_backbone
from dinov3geo.tasks.canopy.bins import HeightBins
from dinov3geo.tasks.canopy.chmv2 import CHMv2
from dinov3geo.tasks.canopy.dpt import DPTHead
from dinov3geo.tasks.canopy.heads import LightHead, build_head, head_config
from dinov3geo.tasks.canopy.model import (
    CanopyHeightModel,
    CanopyRasterModel,
    backbone_sha256,
    load_canopy_model,
    save_canopy_model,
)

SAVE_META = dict(bands=["red", "green", "blue"], mean=[0.4, 0.4, 0.3], std=[0.2, 0.15, 0.14],
                 value_scale=1 / 255, gsd=0.5)


def tiny_backbone(seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone("vit_tiny_test", depth=4, num_heads=4)


def make_model(kind: str, seed: int = 0) -> CanopyHeightModel:
    bb = tiny_backbone(seed)
    if kind == "light":
        return CanopyHeightModel(bb, LightHead(64, hidden=32))
    if kind == "light_bins":
        return CanopyHeightModel(bb, LightHead(64, n_levels=1, hidden=32, output="bins", n_bins=16),
                                 HeightBins(16, "linear", "softmax", 0.5, 60.0))
    head = DPTHead(64, [8, 16, 32, 64], channels=16, n_hidden_channels=8, n_bins=24)
    return CanopyHeightModel(bb, head, HeightBins(24, "log", "chmv2_mixlog", 0.1, 100.0))


def test_light_head_shapes_and_regression_range():
    head = LightHead(64, n_levels=2, hidden=32)
    feats = [(torch.randn(2, 64, 3, 5), torch.randn(2, 64)) for _ in range(4)]
    y = head(feats)
    assert y.shape == (2, 1, 48, 80) and torch.all(y >= 0)
    binned = LightHead(64, n_levels=4, hidden=32, output="bins", n_bins=12)
    assert binned(feats).shape == (2, 12, 48, 80)
    assert head_config(binned)["kind"] == "light"
    assert build_head(**head_config(binned)).config() == binned.config()
    with pytest.raises(ValueError, match="unknown light head option"):
        build_head("light", in_channels=64, width=3)
    with pytest.raises(ValueError, match="power of two"):
        LightHead(64, patch_size=14)


@pytest.mark.parametrize("kind", ["light", "light_bins", "dpt"])
def test_model_input_size_cached_features_and_frozen_backbone(kind):
    model = make_model(kind)
    x = torch.randn(2, 3, 72, 40)  # neither side a multiple of 16
    out = model(x, return_logits=True)
    assert out["height"].shape == (2, 1, 72, 40) and out["height"].dtype == torch.float32
    if kind == "light":
        assert out["std"] is None and out["logits"] is None
    else:
        assert out["std"].shape == (2, 1, 72, 40) and torch.all(out["std"] >= 0)
        assert out["logits"].shape[-2:] == (72, 40)
    feats = model.forward_features(x)
    assert model.layers == ([3] if kind == "light_bins" else [0, 1, 2, 3])  # a 1-level head taps the last block
    assert len(feats) == len(model.layers) and feats[0][1].shape == (2, 64)
    again = model.forward_head(feats, (72, 40))
    assert torch.equal(again["height"], out["height"])
    with pytest.raises(ValueError, match="do not belong"):
        model.forward_head(feats, (40, 40))
    # training touches the head only
    model.train()
    assert not model.backbone.training
    loss = model(x)["height"].mean()
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())


def test_dpt_model_equals_aligned_chmv2():
    m = make_model("dpt")
    chm = CHMv2(m.backbone, m.head, m.bins, m.layers)
    x = torch.randn(1, 3, 80, 48)  # padded to 96x64 (multiple of 32): output aligned with the input
    with torch.no_grad():
        ours = m(x)
        h, s = chm.forward_with_uncertainty(x, output="aligned")
    assert torch.equal(ours["height"], h) and torch.equal(ours["std"], s)
    via = CanopyHeightModel.from_chmv2(chm)
    with torch.no_grad():
        assert torch.equal(via(x)["height"], h)


@pytest.mark.parametrize("kind", ["light", "dpt"])
def test_save_load_round_trip(tmp_path, kind):
    model = make_model(kind).eval()
    path = save_canopy_model(tmp_path / "m.pt", model, backbone_source="vit_tiny_test(random)", **SAVE_META)
    raw = torch.load(path, weights_only=True)  # plain dicts of tensors and primitives
    assert raw["format"] == "dinov3geo.canopy" and raw["backbone"]["sha256"] == backbone_sha256(model.backbone)
    loaded, meta = load_canopy_model(path)
    assert meta["bands"] == SAVE_META["bands"] and meta["gsd"] == 0.5 and meta["value_scale"] == 1 / 255
    assert meta["head"]["kind"] == kind and meta["backbone"]["source"] == "vit_tiny_test(random)"
    assert meta["layers"] == [0, 1, 2, 3]
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a["height"], b["height"])
    if kind == "dpt":
        assert torch.equal(a["std"], b["std"])
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temporary


def test_save_without_backbone_checks_identity(tmp_path):
    model = make_model("light")
    path = save_canopy_model(tmp_path / "head_only.pt", model, include_backbone=False, **SAVE_META)
    with pytest.raises(CheckpointError, match="saved without backbone weights"):
        load_canopy_model(path)
    loaded, _ = load_canopy_model(path, backbone=model.backbone.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x)["height"], model(x)["height"])
    with pytest.raises(CheckpointError, match="differ from those the head was trained on"):
        load_canopy_model(path, backbone=tiny_backbone(seed=1))
    with pytest.raises(ValueError, match="2 band names"):
        save_canopy_model(tmp_path / "x.pt", model, bands=["a", "b"], mean=None, std=None)
    with pytest.raises(ValueError, match="mean has 2 values but there are 3 bands"):
        save_canopy_model(tmp_path / "x.pt", model, bands=["r", "g", "b"], mean=[0.1, 0.2], std=None)
    bad = tmp_path / "bad.pt"
    torch.save({"format": "something.else"}, bad)
    with pytest.raises(CheckpointError, match="not a dinov3geo canopy model"):
        load_canopy_model(bad)


def test_raster_model_predict_real_geotiff(tmp_path, shared_data):
    src_path = shared_data / "aerial_rgb_chm" / "kootenay_drone_2016" / "kootenayOrtho.tif"
    if not src_path.is_file():
        pytest.skip(f"{src_path} not found")
    with rasterio.open(src_path) as src:
        arr = src.read(window=((0, 150), (0, 200)))
        profile = src.profile | {"height": 150, "width": 200, "nodata": 0, "tiled": False}
        profile.pop("blockysize", None)
        profile.pop("blockxsize", None)
        crs, transform = src.crs, src.transform
    arr[:, :40, :50] = 0  # a real nodata corner
    tif = tmp_path / "ortho_crop.tif"
    with rasterio.open(tif, "w", **profile) as dst:
        dst.write(arr)

    model = make_model("dpt")
    ckpt = save_canopy_model(tmp_path / "m.pt", model, **SAVE_META)
    rm = CanopyRasterModel.from_checkpoint(ckpt)
    assert rm.in_bands == 3 and rm.receptive_margin >= 32 and rm.value_scale == pytest.approx(1 / 255)
    x = torch.rand(1, 3, 80, 48) * 255  # a 16-multiple window that is not a 32-multiple
    assert rm(x, torch.ones(1, 80, 48, dtype=torch.bool)).shape == (1, 2, 80, 48)

    out = predict_raster(rm, tif, tmp_path / "chm.tif", window=144, batch_size=4, progress=False)
    with rasterio.open(out) as ds:
        assert ds.count == 2 and ds.descriptions == ("height", "height_std")
        assert ds.dtypes == ("float32", "float32") and math.isnan(ds.nodata)
        assert ds.crs == crs and ds.transform == transform
        height, std = ds.read(1), ds.read(2)
    assert np.isnan(height[:40, :50]).all() and np.isnan(std[:40, :50]).all()
    valid = np.isfinite(height)
    np.testing.assert_array_equal(valid, ~(arr == 0).any(0))  # a pixel with any band at nodata is invalid
    assert valid.sum() >= 150 * 200 - 40 * 50 - 10
    assert (height[valid] >= 0.1).all() and (height[valid] <= 100.0).all()  # inside the bins' range
    assert (std[valid] >= 0).all() and float(np.nanstd(height)) > 0


def test_raster_model_from_chmv2_normalisation():
    m = make_model("dpt")
    rm = CanopyRasterModel.from_chmv2(CHMv2(m.backbone, m.head, m.bins, m.layers))
    raw = torch.full((1, 3, 32, 32), 255.0)
    pre = rm.preprocess(raw, torch.ones(1, 32, 32, dtype=torch.bool))
    expect = [(1 - mu) / sd for mu, sd in zip(SAT493M_CHMV2.mean, SAT493M_CHMV2.std, strict=True)]
    torch.testing.assert_close(pre[0, :, 0, 0], torch.tensor(expect))
    assert SAT493M_CHMV2.mean[0] == 0.420
    light = CanopyRasterModel(make_model("light"))
    y = light(torch.randn(1, 3, 32, 48), torch.ones(1, 32, 48, dtype=torch.bool))
    assert y.shape == (1, 2, 32, 48) and torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, 0]).all()
    with pytest.raises(ValueError, match="not a multiple of 16"):
        light(torch.randn(1, 3, 40, 48), torch.ones(1, 40, 48, dtype=torch.bool))
