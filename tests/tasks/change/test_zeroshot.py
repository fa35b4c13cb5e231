"""Zero-shot change: patch tokens only (no cls/storage), distances in [0, 1], engine integration."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from dinov3geo.inference import StackSource, predict_raster
from dinov3geo.models import build_backbone
from dinov3geo.tasks.change.zeroshot import ZeroShotChange, date_features, resolve_layers
from tests.conftest import write_raster


def _backbone(**kw):
    """A random ``vit_tiny_test`` whose blocks matter: the official LayerScale init (1e-5) makes every block
    nearly the identity, so each patch feature would be little more than its own patch embedding and nothing
    about context (a change seen through attention, padding, window seams) would be tested. Every
    ``ls1.gamma``/``ls2.gamma`` is set to U(0.1, 1) (seeded) and the other weights perturbed, so storage
    tokens and attention across the window shape the features (:func:`test_backbone_features_depend_on_context`)."""
    torch.manual_seed(0)
    bb = build_backbone("vit_tiny_test", **kw).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial storage tokens so that mixing them in would show
        for name, p in bb.named_parameters():
            if name.endswith((".ls1.gamma", ".ls2.gamma")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.9 + 0.1)
            else:
                p.add_(torch.randn_like(p) * 0.05)
    return bb


def test_backbone_features_depend_on_context():
    """The test backbone mixes context: changing one corner patch moves the features of the far corner."""
    bb = _backbone()
    gammas = [p.detach() for n, p in bb.named_parameters() if n.endswith(".gamma")]
    assert len(gammas) == 2 * len(bb.blocks) and min(float(p.min()) for p in gammas) >= 0.1
    torch.manual_seed(3)
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[..., :16, :16] = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        fx, fy = (date_features(bb, t, [len(bb.blocks) - 1])[0] for t in (x, y))
        ff = bb.forward_features(x)
        emb = bb.patch_embed(x).flatten(1, 2)
    far = (fx[..., 3, 3] - fy[..., 3, 3]).norm() / fx[..., 3, 3].norm()
    near = (fx[..., 0, 0] - fy[..., 0, 0]).norm() / fx[..., 0, 0].norm()
    # measured: 0.012 here; 8e-4 with the old +-0.05 perturbation of LayerScale, 7e-8 with the official init
    assert far > 0.005, float(far)
    assert near > 20 * far, (float(near), float(far))
    # and the blocks transform the tokens (measured 13 % of the patch embedding; official init: 7e-7)
    assert (ff["x_prenorm"][:, -16:] - emb).norm() > 0.1 * emb.norm()


def test_patch_grid_is_exactly_the_patch_tokens():
    bb = _backbone()
    assert bb.n_storage_tokens == 4  # DINOv3 layout: 1 cls + 4 storage tokens before the patches
    x = torch.randn(2, 3, 48, 80)
    ours = date_features(bb, x, [len(bb.blocks) - 1])[0]  # [B, D, 3, 5]
    ff = bb.forward_features(x)
    ref = ff["x_norm_patchtokens"].reshape(2, 3, 5, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(ours, ref)
    # what ChangeViT does (tokens 1..N of x_prenorm after the final norm) is a different, shifted grid
    changevit = bb.norm(ff["x_prenorm"])[:, 1:1 + 15].reshape(2, 3, 5, -1).permute(0, 3, 1, 2)
    assert not torch.allclose(changevit, ref, atol=1e-3)
    torch.testing.assert_close(changevit.flatten(2)[..., 4:], ref.flatten(2)[..., :-4])


def test_identical_dates_give_zero_and_change_is_positive():
    bb = _backbone()
    m = ZeroShotChange(bb, value_scale=1 / 255, layers=2)
    x = torch.rand(2, 3, 40, 56) * 255  # not a multiple of 16: padded internally, output at input size
    valid = torch.ones(2, 40, 56, dtype=torch.bool)
    same = m(torch.cat([x, x], 1), valid)
    assert same.shape == (2, 1, 40, 56)
    assert float(same.abs().max()) < 1e-5
    y = x.clone()
    y[:, :, :16, :16] = 255 - y[:, :, :16, :16]
    d = m(torch.cat([x, y], 1), valid)
    assert float(d.min()) >= 0 and float(d.max()) <= 1
    assert float(d[..., :8, :8].mean()) > 10 * float(d[..., 32:, 40:].mean() + 1e-6)


def test_layers_upscale_and_bands():
    bb = _backbone()
    assert resolve_layers(bb, 2) == [0, 1] and resolve_layers(bb, [-1]) == [1]
    with pytest.raises(ValueError, match="2 blocks"):
        resolve_layers(bb, 3)
    m = ZeroShotChange(bb, upscale=4)
    assert m.stride == 4 and m.receptive_margin == 8
    x = torch.randn(1, 6, 12, 20)
    assert m(x, torch.ones(1, 12, 20, dtype=torch.bool)).shape == (1, 1, 12, 20)
    with pytest.raises(ValueError, match="divide the patch size"):
        ZeroShotChange(bb, upscale=3)
    # 5 bands per date: refused without names, widened (a copy) with them
    with pytest.raises(ValueError, match="takes 3 input bands but each date has 5"):
        ZeroShotChange(bb, 5)
    w = ZeroShotChange(bb, 5, band_names=["blue", "green", "red", "nir", "swir16"], mean=[0] * 5, std=[1] * 5)
    assert w.in_bands == 10 and int(bb.patch_embed.proj.in_channels) == 3
    out = w(torch.randn(1, 10, 32, 32), torch.ones(1, 32, 32, dtype=torch.bool))
    assert out.shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="expected 10 stacked bands"):
        w(torch.randn(1, 6, 32, 32), torch.ones(1, 32, 32, dtype=torch.bool))


def test_through_the_inference_engine(tmp_path):
    """Two dates as a StackSource: the engine blends the upsampled distance; unchanged areas stay ~0."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (3, 96, 112)).astype(np.uint8)
    after = base.copy()
    after[:, 40:72, 48:80] = 255 - after[:, 40:72, 48:80]
    b = write_raster(tmp_path / "t0.tif", base)
    a = write_raster(tmp_path / "t1.tif", after)
    m = ZeroShotChange(_backbone(), value_scale=1 / 255, layers=[-1], receptive_margin=16)
    out = predict_raster(m, StackSource([b, a]), tmp_path / "dist.tif", window=64, overlap=48, progress=False,
                         device="cpu")
    with rasterio.open(out) as ds:
        d = ds.read(1)
        assert ds.descriptions[0] == "change_distance" and (ds.height, ds.width) == (96, 112)
    assert np.isfinite(d).all() and d.min() >= 0 and d.max() <= 1
    assert d[48:64, 56:72].mean() > 3 * d[:24, :24].mean()
