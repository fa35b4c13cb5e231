"""Canopy-height metrics on hand-made arrays whose answers are computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dinov3geo.tasks.canopy.metrics import CanopyMetricAccumulator, bin_labels, canopy_metrics


def _bin(m: dict, label: str) -> dict:
    return next(b for b in m["bins"] if b["bin"] == label)


def test_hand_computed_example():
    true = np.array([[0.0, 2.0, 5.0, 10.0]])
    pred = np.array([[1.0, 1.0, 5.0, 14.0]])  # errors 1, -1, 0, 4
    m = canopy_metrics(pred, true)
    assert m["n"] == 4
    assert m["mae"] == pytest.approx(1.5)
    assert m["rmse"] == pytest.approx(math.sqrt(18 / 4))
    assert m["bias"] == pytest.approx(1.0)
    sst = 4.25**2 + 2.25**2 + 0.75**2 + 5.75**2  # mean true 4.25
    assert m["r2"] == pytest.approx(1 - 18 / sst)
    assert m["nmae"] == pytest.approx(1.5 / 4.25)
    assert m["nmae_open_canopy"] == pytest.approx((1 / 1 + 1 / 3 + 0 + 4 / 11) / 4)
    assert m["std_error"] == pytest.approx(math.sqrt(18 / 4 - 1.0))
    # one pixel per bin; zero height counts
    assert [_bin(m, lab)["n"] for lab in ("[0, 2)", "[2, 5)", "[5, 10)", "[10, 15)")] == [1, 1, 1, 1]
    b = _bin(m, "[10, 15)")
    assert b["mae"] == pytest.approx(4) and b["bias"] == pytest.approx(4) and b["r2"] is None
    assert _bin(m, "[0, 2)")["share"] == pytest.approx(0.25)
    # tree cover: >= 2 m: true {2,5,10}, pred {5,14} -> IoU 2/3; >= 5 m: identical -> 1
    c2, c5 = m["cover"]["2"], m["cover"]["5"]
    assert c2["iou"] == pytest.approx(2 / 3) and c2["precision"] == 1.0 and c2["recall"] == pytest.approx(2 / 3)
    assert c2["true_cover"] == pytest.approx(0.75) and c2["pred_cover"] == pytest.approx(0.5)
    assert c5["iou"] == 1.0 and c5["f1"] == 1.0
    json.dumps(m, allow_nan=False)


def test_perfect_prediction():
    rng = np.random.default_rng(0)
    true = rng.uniform(0, 40, (120, 120))  # 2 x 2 blocks of 50
    m = canopy_metrics(true.copy(), true)
    assert m["mae"] == 0 and m["rmse"] == 0 and m["bias"] == 0
    assert m["r2"] == pytest.approx(1.0) and m["block_r2"] == pytest.approx(1.0)
    assert all(c["iou"] == 1.0 for c in m["cover"].values())


def test_constant_prediction_r2():
    true = np.array([[0.0, 4.0]])
    assert canopy_metrics(np.full((1, 2), 2.0), true)["r2"] == pytest.approx(0.0)  # the mean: R2 = 0
    # constant 3: SSE = 9 + 1 = 10, SST = 8 -> 1 - 10/8
    assert canopy_metrics(np.full((1, 2), 3.0), true)["r2"] == pytest.approx(-0.25)


def test_bin_assignment_at_edges():
    true = np.array([[0.0, 1.999, 2.0, 4.999, 5.0, 59.999, 60.0, 75.0, -0.5]])
    m = canopy_metrics(true.copy(), true)
    counts = {b["bin"]: b["n"] for b in m["bins"]}
    assert counts == {"[0, 2)": 3, "[2, 5)": 2, "[5, 10)": 1, "[10, 15)": 0, "[15, 20)": 0, "[20, 30)": 0,
                      "[30, 60)": 1, "[60, inf)": 2}
    assert bin_labels((0, 2, 5)) == ["[0, 2)", "[2, 5)", "[5, inf)"]
    last = m["bins"][-1]
    assert last["lo"] == 60 and last["hi"] is None


def test_zero_heights_included_and_undefined_metrics_are_none():
    true = np.zeros((4, 4))
    m = canopy_metrics(np.ones((4, 4)), true)
    assert m["n"] == 16 and m["mae"] == 1 and m["bias"] == 1
    assert m["r2"] is None and m["nmae"] is None  # no variance, mean true height 0
    assert m["cover"]["2"]["iou"] is None  # no tree anywhere
    assert m["bins"][0]["n"] == 16
    json.dumps(m, allow_nan=False)


def test_block_r2_border_and_blocks():
    # 9x9 tile, block 3, border 3: blocks cover rows/cols 3..8 -> 2 x 2 blocks
    true = np.zeros((9, 9))
    true[3:6, 3:6], true[3:6, 6:9], true[6:9, 3:6], true[6:9, 6:9] = 1, 2, 3, 4
    pred = true.copy()
    pred[:3, :] = 50.0  # the border rows/cols do not enter blocks
    pred[:, :3] = 50.0
    m = canopy_metrics(pred, true, block=3, border=3)
    assert m["n_blocks"] == 4 and m["block_r2"] == pytest.approx(1.0)
    assert m["r2"] < 0  # pixel R2 sees the border
    pred[6:9, 6:9] = 6.0  # block means [1,2,3,6] vs [1,2,3,4]: SSE 4, SST 5
    m = canopy_metrics(pred, true, block=3, border=3)
    assert m["block_r2"] == pytest.approx(1 - 4 / 5)
    assert m["block_mae"] == pytest.approx(0.5)
    valid = np.ones_like(true, dtype=bool)
    valid[7, 7] = False  # a block with an invalid pixel is dropped
    m = canopy_metrics(pred, true, valid, block=3, border=3)
    assert m["n_blocks"] == 3 and m["block_r2"] == pytest.approx(1.0)
    assert canopy_metrics(pred[:5, :5], true[:5, :5], block=3, border=3)["block_r2"] is None


def test_tolan_256_tiles_give_5x5_blocks_and_pool_over_tiles():
    rng = np.random.default_rng(1)
    true = rng.uniform(0, 30, (2, 256, 256))
    pred = true + rng.normal(0, 2, true.shape)
    m = canopy_metrics(pred, true)
    assert m["n_blocks"] == 50 and m["n_tiles"] == 2
    # by hand: AvgPool2d(50) of x[3:, 3:]
    pb = pred[:, 3:253, 3:253].reshape(2, 5, 50, 5, 50).mean(axis=(2, 4)).ravel()
    tb = true[:, 3:253, 3:253].reshape(2, 5, 50, 5, 50).mean(axis=(2, 4)).ravel()
    expected = 1 - np.sum((pb - tb) ** 2) / np.sum((tb - tb.mean()) ** 2)
    assert m["block_r2"] == pytest.approx(expected)


def test_streaming_equals_one_shot_and_merge():
    rng = np.random.default_rng(2)
    true = rng.gamma(2.0, 5.0, (40, 60))
    pred = true * 0.8 + rng.normal(0, 3, true.shape)
    valid = rng.random(true.shape) > 0.1
    whole = canopy_metrics(pred, true, valid)
    acc, a2, b2 = CanopyMetricAccumulator(), CanopyMetricAccumulator(), CanopyMetricAccumulator()
    acc.update(pred[:, :25], true[:, :25], valid[:, :25])
    acc.update(pred[:, 25:], true[:, 25:], valid[:, 25:])
    a2.update(pred[:, :25], true[:, :25], valid[:, :25])
    b2.update(pred[:, 25:], true[:, 25:], valid[:, 25:])
    a2.merge(b2)
    for res in (acc.compute(), a2.compute()):
        for k in ("n", "mae", "rmse", "bias", "r2", "nmae", "std_error"):
            assert res[k] == pytest.approx(whole[k], rel=1e-12), k
        for b1, b2_ in zip(res["bins"], whole["bins"], strict=True):
            assert b1["n"] == b2_["n"] and (b1["r2"] is None or b1["r2"] == pytest.approx(b2_["r2"]))
        for t in ("2", "5"):
            assert res["cover"][t] == pytest.approx(whole["cover"][t])
    assert acc.hist2d.sum() == whole["n"]


def test_missing_predictions_are_counted_not_used():
    true = np.array([[1.0, 2.0, np.nan, 4.0]])
    pred = np.array([[1.0, np.nan, 3.0, 4.0]])
    m = canopy_metrics(pred, true)
    assert m["n"] == 2 and m["n_label_valid"] == 3 and m["n_pred_missing"] == 1 and m["mae"] == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="strictly increasing"):
        CanopyMetricAccumulator(bins=(0, 5, 2))
    with pytest.raises(ValueError, match="must both be"):
        canopy_metrics(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="merge"):
        CanopyMetricAccumulator(block=10).merge(CanopyMetricAccumulator(block=20))
