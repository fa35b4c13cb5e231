"""Change metrics: hand-checked confusion matrices, the valid mask, streaming, threshold search."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dinov3geo.tasks.change.metrics import ConfusionMatrix, ThresholdSearch, change_metrics


def test_hand_checked_example():
    # 3x4 image: 2 TP, 1 FP, 1 FN, 7 TN valid, 1 pixel ignored (would be a FP)
    target = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    pred = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    valid = np.ones_like(target, bool)
    valid[2, 3] = False
    m = change_metrics(pred, target, valid)
    assert (m["tp"], m["fp"], m["fn"], m["tn"], m["n"]) == (2, 1, 1, 7, 11)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)  # 2*2 / (2*2 + 1 + 1)
    assert m["iou"] == pytest.approx(0.5)  # 2 / (2 + 1 + 1)
    assert m["oa"] == pytest.approx(9 / 11)
    # kappa by hand: pe = (3*3 + 8*8) / 121 = 73/121; (9/11 - 73/121) / (1 - 73/121) = (99-73)/(121-73)
    assert m["kappa"] == pytest.approx(26 / 48)


def test_ignored_pixels_do_not_count():
    target = np.zeros((4, 4), np.uint8)
    pred = np.ones((4, 4), bool)
    valid = np.zeros((4, 4), bool)
    m = change_metrics(pred, target, valid)
    assert m["n"] == 0 and math.isnan(m["oa"]) and math.isnan(m["precision"])
    valid[0, 0] = True
    m = change_metrics(pred, target, valid)
    assert (m["fp"], m["n"], m["precision"]) == (1, 1, 0.0)
    assert math.isnan(m["recall"])  # no change in the reference: recall undefined, not 0


def test_streaming_equals_one_shot():
    rng = np.random.default_rng(0)
    t = rng.random((50, 60)) < 0.2
    p = rng.random((50, 60)) < 0.3
    v = rng.random((50, 60)) < 0.9
    cm = ConfusionMatrix()
    for r in range(0, 50, 7):
        cm.update(p[r:r + 7], t[r:r + 7], v[r:r + 7])
    assert cm.compute() == change_metrics(p, t, v)
    half = ConfusionMatrix().update(p[:25], t[:25], v[:25]) + ConfusionMatrix().update(p[25:], t[25:], v[25:])
    assert half == cm
    # sklearn agrees
    sk = pytest.importorskip("sklearn.metrics")
    assert cm.f1 == pytest.approx(sk.f1_score(t[v], p[v]))
    assert cm.kappa == pytest.approx(sk.cohen_kappa_score(t[v], p[v]))
    assert cm.iou == pytest.approx(sk.jaccard_score(t[v], p[v]))


def test_rejects_non_binary_and_shape_mismatch():
    with pytest.raises(ValueError, match="binary"):
        change_metrics(np.array([0, 2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        change_metrics(np.zeros(3, bool), np.zeros(4, bool))


def test_threshold_search_finds_the_separating_threshold():
    rng = np.random.default_rng(1)
    target = rng.random(4000) < 0.3
    score = np.where(target, rng.uniform(0.62, 1.0, 4000), rng.uniform(0.0, 0.6, 4000))
    s = ThresholdSearch(1000).update(score, target)
    thr, f1 = s.best("f1")
    assert f1 == pytest.approx(1.0)
    assert 0.6 <= thr <= 0.62
    assert change_metrics(score >= thr, target)["f1"] == pytest.approx(1.0)
    # overlapping classes: the chosen threshold's F1 equals a brute-force search over the same edges
    score2 = np.clip(score + rng.normal(0, 0.15, 4000), 0, 1)
    s2 = ThresholdSearch(200).update(score2, target)
    thr2, f12 = s2.best("f1")
    brute = max(change_metrics(score2 >= e, target)["f1"] for e in np.linspace(0.005, 1.0, 200))
    assert f12 == pytest.approx(brute, abs=1e-9)
    assert change_metrics(score2 >= thr2, target)["f1"] == pytest.approx(f12, abs=1e-9)


def test_threshold_search_without_positives_raises():
    s = ThresholdSearch().update(np.array([0.1, 0.2]), np.array([0, 0]))
    with pytest.raises(ValueError, match="no changed pixel"):
        s.best()
