"""Land-cover metrics against examples computed by hand (a class never predicted, a class never in the reference)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from dinov3geo.tasks.landcover.metrics import (
    ConfusionAccumulator,
    classification_metrics,
    confusion_matrix,
    plot_confusion,
    write_confusion_csv,
)

NAMES = ["forest", "pasture", "water", "urban"]


def _pixels() -> tuple[np.ndarray, np.ndarray]:
    """20 reference/map pixel pairs (indexes; 255 = unlabelled or no class on the map).

    reference forest (0): 6 px, mapped forest 5, pasture 1
    reference pasture (1): 4 px, mapped pasture 2, forest 1, urban 1
    reference water (2): 3 px, mapped forest 1, pasture 2  -> water is never predicted
    reference urban (3): none -> urban only appears on the map (1 px, from pasture)
    plus 4 unlabelled reference pixels and 3 labelled pixels without a class on the map (not scored).
    """
    ref = [0] * 6 + [1] * 4 + [2] * 3 + [255] * 4 + [0, 1, 2]
    pred = [0, 0, 0, 0, 0, 1] + [1, 1, 0, 3] + [0, 1, 1] + [0, 1, 2, 3] + [255, 255, 255]
    return np.array(ref, np.uint8), np.array(pred, np.uint8)


def test_confusion_matrix_and_every_metric_by_hand() -> None:
    ref, pred = _pixels()
    cm = confusion_matrix(ref, pred, 4)
    expected = np.array([[5, 1, 0, 0],
                         [1, 2, 0, 1],
                         [1, 2, 0, 0],
                         [0, 0, 0, 0]])
    assert np.array_equal(cm, expected)
    m = classification_metrics(cm, NAMES)
    n = 13
    assert m["n"] == n
    assert m["overall_accuracy"] == pytest.approx(7 / 13)
    # kappa: rows (reference) 6, 4, 3, 0; columns (map) 7, 5, 0, 1
    pe = (6 * 7 + 4 * 5 + 3 * 0 + 0 * 1) / 13**2
    assert m["kappa"] == pytest.approx((7 / 13 - pe) / (1 - pe))
    f, p, w, u = (m["per_class"][k] for k in NAMES)
    assert f["producers_accuracy"] == pytest.approx(5 / 6) and f["users_accuracy"] == pytest.approx(5 / 7)
    assert f["f1"] == pytest.approx(2 * 5 / (2 * 5 + 2 + 1)) and f["iou"] == pytest.approx(5 / (5 + 2 + 1))
    assert p["producers_accuracy"] == pytest.approx(2 / 4) and p["users_accuracy"] == pytest.approx(2 / 5)
    assert p["f1"] == pytest.approx(4 / (4 + 3 + 2)) and p["iou"] == pytest.approx(2 / (2 + 3 + 2))
    # water: in the reference, never predicted: producer's 0, user's undefined, F1 = IoU = 0
    assert w["producers_accuracy"] == 0.0 and w["users_accuracy"] is None and w["f1"] == 0.0 and w["iou"] == 0.0
    # urban: predicted once, never in the reference: producer's undefined, user's 0, F1 = IoU = 0
    assert u["producers_accuracy"] is None and u["users_accuracy"] == 0.0 and u["f1"] == 0.0 and u["iou"] == 0.0
    assert u["reference_pixels"] == 0 and u["map_pixels"] == 1
    assert m["macro_f1"] == pytest.approx((10 / 13 + 4 / 9 + 0 + 0) / 4)
    assert m["miou"] == pytest.approx((5 / 8 + 2 / 7 + 0 + 0) / 4)


def test_class_absent_from_both_does_not_count_and_mask_and_accumulator() -> None:
    cm = np.array([[3, 1, 0], [0, 4, 0], [0, 0, 0]])
    m = classification_metrics(cm, ["a", "b", "c"])
    assert m["per_class"]["c"]["f1"] is None and m["per_class"]["c"]["iou"] is None
    assert m["macro_f1"] == pytest.approx((6 / 7 + 8 / 9) / 2)
    assert m["kappa"] == pytest.approx((7 / 8 - (4 * 3 + 4 * 5) / 64) / (1 - (4 * 3 + 4 * 5) / 64))
    ref, pred = _pixels()
    acc = ConfusionAccumulator(NAMES)
    acc.update(ref[:10], pred[:10])
    acc.update(ref[10:], pred[10:], mask=np.ones(ref[10:].shape, bool))
    assert np.array_equal(acc.cm, confusion_matrix(ref, pred, 4))
    only_forest = confusion_matrix(ref, pred, 4, mask=ref == 0)
    assert only_forest.sum() == 6 and only_forest[0, 0] == 5
    empty = classification_metrics(np.zeros((2, 2), int), ["a", "b"])
    assert empty["overall_accuracy"] is None and empty["kappa"] is None and empty["macro_f1"] is None
    with pytest.raises(ValueError, match="0..1"):
        confusion_matrix(np.array([0, 2]), np.array([0, 1]), 2)


def test_csv_and_picture(tmp_path: Path) -> None:
    ref, pred = _pixels()
    cm = confusion_matrix(ref, pred, 4)
    p = write_confusion_csv(cm, NAMES, tmp_path / "confusion.csv")
    rows = list(csv.reader(p.open()))
    assert rows[0] == ["reference \\ map", *NAMES, "total", "producers_accuracy"]
    assert rows[1] == ["forest", "5", "1", "0", "0", "6", f"{5 / 6:.4f}"]
    assert rows[3] == ["water", "1", "2", "0", "0", "3", "0.0000"]
    assert rows[4] == ["urban", "0", "0", "0", "0", "0", ""]
    assert rows[5] == ["total", "7", "5", "0", "1", "13", ""]
    assert rows[6] == ["users_accuracy", f"{5 / 7:.4f}", f"{2 / 5:.4f}", "", "0.0000", "", f"{7 / 13:.4f}"]
    png = plot_confusion(cm, NAMES, tmp_path / "confusion.png", title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
