"""HeightBins: CHMv2 bin values, normalisations, expectation/std, two-hot targets and bin cross-entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinov3geo.tasks.canopy.bins import HeightBins


def test_chmv2_bin_values_match_spec():
    bins = HeightBins()  # Meta's defaults: 256 mixlog bins, 0.001 .. 96 m
    assert bins.n_bins == 256 and bins.output_scale == 8.0
    # spec section 6, metres, to the precision shown there
    expected = {0: 0.008, 1: 0.0098, 2: 0.0145, 32: 1.54, 64: 6.11, 128: 24.6, 192: 56.8, 255: 96.0}
    for i, v in expected.items():
        decimals = len(repr(v).split(".")[1])
        assert round(float(bins.centres[i]), decimals) == pytest.approx(v), i
    assert float(bins.centres[-1]) >= 96.0
    assert torch.all(torch.diff(bins.centres) > 0)


def test_mixlog_formula_independent_fp64():
    n, a, b = 256, 0.001, 96.0 / 8
    t = np.linspace(1, 0, n)
    ref = (t * np.exp(np.linspace(np.log(a), np.log(b), n)) + (1 - t) * np.linspace(a, b, n)) * 8
    np.testing.assert_allclose(HeightBins().centres.numpy(), ref, rtol=2e-6)


@pytest.mark.parametrize("strategy", ["linear", "log"])
def test_linear_and_log_strategies(strategy):
    bins = HeightBins(64, strategy, "softmax", 0.5, 120.0)
    c = bins.centres.double().numpy()
    assert c[0] == pytest.approx(0.5) and c[-1] == pytest.approx(120.0, rel=1e-6)
    steps = np.diff(c) if strategy == "linear" else np.diff(np.log(c))
    np.testing.assert_allclose(steps, steps[0], rtol=1e-3)


@pytest.mark.parametrize("norm", ["chmv2_mixlog", "softmax"])
def test_normalisation_sums_to_one(norm):
    bins = HeightBins(32, "log", norm)
    logits = torch.randn(2, 32, 5, 7) * 3
    logits[0, :, 0, 0] = -1.0  # all negative: mixlog falls back to the uniform 1e-8 shift
    p = bins.normalize(logits)
    assert torch.all(p >= 0)
    torch.testing.assert_close(p.sum(1), torch.ones(2, 5, 7))
    if norm == "chmv2_mixlog":
        torch.testing.assert_close(p[0, :, 0, 0], torch.full((32,), 1 / 32))
        # linear, not softmax: proportional to relu(logits) + 1e-8
        y = torch.relu(logits[1, :, 2, 3]) + 1e-8
        torch.testing.assert_close(p[1, :, 2, 3], y / y.sum())


def test_expectation_matches_transformers_features_to_depth():
    import transformers  # a dev dependency (>= 5.4): a missing one fails, never skips
    from transformers.models.chmv2 import modeling_chmv2 as chmv2

    cfg = transformers.CHMv2Config()
    ref = chmv2.CHMv2FeaturesToDepth(cfg)
    logits = torch.randn(2, 256, 6, 5) * 2
    ours = HeightBins().expectation(logits)
    torch.testing.assert_close(ours, ref(logits), rtol=0, atol=1e-5)


def test_std_nonnegative_onehot_and_uniform():
    bins = HeightBins()
    logits = torch.randn(1, 256, 4, 4)
    mean, std = bins.mean_and_std(logits)
    assert torch.all(std >= 0) and mean.shape == std.shape == (1, 1, 4, 4)
    torch.testing.assert_close(std, bins.std(logits))
    onehot = torch.zeros(1, 256, 1, 3)
    for j, i in enumerate((3, 100, 250)):
        onehot[0, i, 0, j] = 1e6
    m, s = bins.mean_and_std(onehot)
    assert float(s.max()) < 1e-3
    torch.testing.assert_close(m[0, 0, 0], bins.centres[[3, 100, 250]], rtol=1e-5, atol=1e-5)
    uniform = torch.zeros(1, 256, 1, 1)
    _, s = bins.mean_and_std(uniform)
    assert float(s) == pytest.approx(float(np.std(bins.centres.double().numpy())), rel=1e-4)


def test_dtype_preserved_and_bad_channels():
    bins = HeightBins(16, "linear", "softmax", 1.0, 50.0)
    for dt in (torch.float32, torch.float64):
        assert bins.expectation(torch.randn(1, 16, 2, 2, dtype=dt)).dtype == dt
    with pytest.raises(ValueError, match="one channel per bin"):
        bins.expectation(torch.randn(1, 15, 2, 2))
    with pytest.raises(ValueError, match="unknown bin strategy"):
        HeightBins(16, "cubic")
    with pytest.raises(ValueError, match="unknown HeightBins option"):
        HeightBins.from_config({"n_bins": 4, "max": 3})
    assert HeightBins.from_config(bins.config()).config() == bins.config()


def test_encode_two_hot():
    bins = HeightBins(64, "log", "softmax", 0.1, 100.0)
    h = torch.tensor([[[0.0, 0.1, 3.7, 55.5], [100.0, 250.0, math.nan, 12.0]]])
    t = bins.encode(h)
    assert t.shape == (1, 64, 2, 4)
    assert torch.all((t > 0).sum(1) <= 2)
    sums = t.sum(1)
    assert float(sums[0, 1, 2]) == 0.0  # NaN: empty target
    finite = torch.isfinite(h)
    torch.testing.assert_close(sums[finite], torch.ones(int(finite.sum())))
    e = bins.expectation_from_probs(t)[:, 0]
    torch.testing.assert_close(e[finite], h.clamp(0.1, 100.0)[finite], rtol=1e-5, atol=1e-6)
    assert torch.equal(bins.encode(h[:, None]), t)  # [B,1,H,W] accepted


def test_cross_entropy_masks_and_trains():
    torch.manual_seed(0)
    for norm in ("softmax", "chmv2_mixlog"):
        bins = HeightBins(32, "linear", norm, 0.5, 40.0)
        height = torch.rand(2, 6, 6) * 40
        valid = torch.ones(2, 6, 6, dtype=torch.bool)
        valid[:, :3] = False
        # ReLU-linear normalisation: negative logits get no gradient, so start positive for mixlog
        init = torch.randn(2, 32, 6, 6) if norm == "softmax" else torch.rand(2, 32, 6, 6) + 0.1
        logits = init.requires_grad_(True)
        loss = bins.cross_entropy(logits, height, valid).detach()
        changed = height.clone()
        changed[:, :3] = 5.0  # only invalid pixels change
        changed[0, 0, 0] = math.nan
        assert float(bins.cross_entropy(logits, changed, valid).detach()) == pytest.approx(float(loss))
        opt = torch.optim.Adam([logits], lr=0.1)
        for _ in range(60):
            opt.zero_grad()
            bins.cross_entropy(logits, height, valid).backward()
            opt.step()
        err = (bins.expectation(logits.detach())[:, 0] - height)[valid].abs().max()
        assert float(bins.cross_entropy(logits, height, valid).detach()) < float(loss)
        assert float(err) < 1.5, (norm, float(err))
        empty = bins.cross_entropy(logits, height, torch.zeros_like(valid))
        assert float(empty.detach()) == 0.0
        empty.backward()
