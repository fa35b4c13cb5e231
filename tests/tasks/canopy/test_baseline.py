"""Per-pixel gradient-boosting baseline: features, fit/predict, safe persistence, real-pair measurement."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dinov3geo.tasks.canopy.baseline import (
    baseline_features,
    evaluate_split,
    fit_baseline,
    load_baseline,
    measure_baseline,
    predict_baseline,
    save_baseline,
)
from dinov3geo.tasks.canopy.splits import block_split


def _synthetic(h=64, w=64, seed=0):
    """Trees are green and textured; height grows with a smooth 'crown' field."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    height = np.clip(15 * np.sin(xx / 9.0) * np.cos(yy / 11.0), 0, None)
    tree = height > 0
    texture = rng.normal(0, 1, (h, w)) * (2 + height)
    r = 120 - 3 * height + texture
    g = 110 + 2 * height + texture
    b = 100 - 2 * height + texture
    return np.stack([r, g, b]).astype(np.float32), height.astype(np.float32), tree


def test_features_names_and_invalid_pixels():
    img, _, _ = _synthetic(20, 24)
    valid = np.ones((20, 24), bool)
    valid[:, :4] = False
    f, names = baseline_features(img, valid, windows=(3, 5))
    assert f.shape == (20, 24, len(names)) and f.dtype == np.float32
    assert names[:5] == ["band1", "band2", "band3", "brightness", "exg"]
    assert {"bright_mean3", "bright_std5", "exg_mean5", "grad", "grad_mean5"} <= set(names)
    # invalid pixels never leak into valid neighbourhoods
    img2 = img.copy()
    img2[:, :, :4] = 1e6
    f2, _ = baseline_features(img2, valid, windows=(3, 5))
    np.testing.assert_allclose(f2[:, 8:, names.index("bright_mean5")], f[:, 8:, names.index("bright_mean5")])
    gray, gnames = baseline_features(img[:1], windows=(3,))
    assert "exg" not in gnames and gray.shape[-1] == len(gnames)


def test_fit_predict_beats_constant_and_persists(tmp_path):
    img, height, _ = _synthetic()
    valid = np.ones(height.shape, bool)
    split = block_split(height.shape, block=16, buffer=4, seed=0)
    model = fit_baseline(img, height, valid, split.mask("train"), windows=(3, 7), max_iter=40)
    pred = predict_baseline(model, img, valid)
    assert pred.shape == height.shape and pred.dtype == np.float32 and (pred >= 0).all()
    test = split.mask("test")
    mae = float(np.abs(pred - height)[test].mean())
    const = float(np.abs(height[split.mask("train")].mean() - height)[test].mean())
    assert mae < 0.5 * const
    m = evaluate_split(pred, _Pair(height, valid), split, "test")
    assert m["mae"] == pytest.approx(mae, rel=1e-6)
    # persistence: pickles only on explicit trust
    path = save_baseline(model, tmp_path / "baseline.joblib")
    with pytest.raises(ValueError, match="trusted=True"):
        load_baseline(path)
    again = load_baseline(path, trusted=True)
    np.testing.assert_array_equal(predict_baseline(again, img, valid), pred)
    with pytest.raises(ValueError, match="3 bands"):
        predict_baseline(model, img[:2])


class _Pair:
    """The fields of ImageCHMPair that evaluate_split uses."""

    def __init__(self, heights, valid):
        from rasterio.transform import from_origin

        from dinov3geo.io.grid import GridSpec

        self.heights, self.valid = heights, valid
        self.grid = GridSpec("EPSG:32633", from_origin(0, 0, 1, 1), heights.shape[1], heights.shape[0])


def test_too_few_training_pixels():
    img, height, _ = _synthetic(16, 16)
    with pytest.raises(ValueError, match="training pixels"):
        fit_baseline(img, height, np.ones((16, 16), bool), np.zeros((16, 16), bool))


def test_measure_on_kootenay(shared_data):
    d = shared_data / "aerial_rgb_chm/kootenay_drone_2016"
    r = measure_baseline(d / "kootenayOrtho.tif", d / "kootenayCHM.tif", res=0.5, block=64, buffer=16, seed=0,
                         max_iter=50)
    json.dumps(r, allow_nan=False)
    test = r["test"]
    assert test["n"] == r["split"]["valid_pixels"]["test"] > 1000
    # better than predicting the mean test height everywhere (R2 > 0) and than the bare-ground guess
    assert test["r2"] > 0.2 and test["mae"] < test["mean_true"]
    assert r["train"]["mae"] < test["mae"]
    assert r["data"]["grid_res"] == [0.5, 0.5]
