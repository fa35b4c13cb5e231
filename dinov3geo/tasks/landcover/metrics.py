"""Land-cover accuracy metrics from a confusion matrix, its CSV and a picture.

Convention: ``cm[i, j]`` counts pixels whose **reference** class is ``i`` and whose **map** (predicted) class
is ``j`` (rows = reference, columns = map, as ``sklearn.metrics.confusion_matrix``). Olofsson et al. (2014)
write the error matrix the other way round (rows = map); use ``cm.T`` for that layout.

For class ``k`` with ``TP = cm[k, k]``, ``FN = row sum - TP`` (reference ``k`` mapped as something else) and
``FP = column sum - TP`` (mapped as ``k`` but something else on the ground):

* **producer's accuracy** (recall) ``TP / (TP + FN)``: how much of class ``k`` on the ground the map finds;
  undefined (None) without reference pixels of ``k``;
* **user's accuracy** (precision) ``TP / (TP + FP)``: how often a ``k`` on the map is ``k`` on the ground;
  undefined (None) when the map never says ``k``;
* **F1** ``2 TP / (2 TP + FP + FN)`` and **IoU** ``TP / (TP + FP + FN)``: 0 for a class that is missed
  entirely or only ever predicted wrongly; undefined (None) only for a class absent from both reference and
  map (it then does not count in the means);
* **overall accuracy** ``trace / n``; **Cohen's kappa** ``(p_o - p_e) / (1 - p_e)`` with
  ``p_e = sum(row_k * col_k) / n^2`` (None when ``p_e = 1``);
* **macro-F1** and **mIoU**: unweighted means over the classes where F1 / IoU is defined.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinov3geo.utils.atomic import atomic_path

__all__ = [
    "ConfusionAccumulator",
    "classification_metrics",
    "confusion_matrix",
    "plot_confusion",
    "write_confusion_csv",
]

_IGNORE = 255


def confusion_matrix(reference: np.ndarray, prediction: np.ndarray, n_classes: int,
                     mask: np.ndarray | None = None, ignore: int = _IGNORE) -> np.ndarray:
    """``[n_classes, n_classes]`` int64 counts, rows = reference index, columns = predicted index.

    Pixels where either array holds ``ignore`` (255) or ``mask`` is False are left out. Indexes must lie in
    ``0..n_classes-1`` (else ``ValueError``).
    """
    r = np.asarray(reference).ravel().astype(np.int64)
    p = np.asarray(prediction).ravel().astype(np.int64)
    if r.shape != p.shape:
        raise ValueError(f"reference has {r.size} pixels but the prediction {p.size}")
    keep = (r != ignore) & (p != ignore)
    if mask is not None:
        keep &= np.asarray(mask, dtype=bool).ravel()
    r, p = r[keep], p[keep]
    if r.size and (min(r.min(), p.min()) < 0 or max(r.max(), p.max()) >= n_classes):
        raise ValueError(f"class indexes must lie in 0..{n_classes - 1}")
    return np.bincount(r * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


class ConfusionAccumulator:
    """Sum confusion matrices window by window (:meth:`update`), then :meth:`compute` the metrics."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = [str(n) for n in names]
        k = len(self.names)
        self.cm = np.zeros((k, k), dtype=np.int64)

    def update(self, reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add the pixels of one window (class indexes; 255 ignored)."""
        self.cm += confusion_matrix(reference, prediction, len(self.names), mask)

    def compute(self) -> dict[str, Any]:
        """:func:`classification_metrics` of the accumulated matrix."""
        return classification_metrics(self.cm, self.names)


def _div(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


def _mean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def classification_metrics(cm: np.ndarray, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Every metric of the module docstring from a confusion matrix (rows = reference, columns = map).

    Returns:
        ``{"n", "overall_accuracy", "kappa", "macro_f1", "miou", "per_class": {name: {"producers_accuracy",
        "users_accuracy", "f1", "iou", "reference_pixels", "map_pixels", "correct"}}, "confusion_matrix",
        "classes"}``; undefined values are None.
    """
    m = np.asarray(cm, dtype=np.int64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {m.shape}")
    k = m.shape[0]
    names = [str(n) for n in names] if names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} names for a {k}-class matrix")
    n = int(m.sum())
    rows, cols, tp = m.sum(axis=1), m.sum(axis=0), np.diag(m)
    per: dict[str, dict[str, Any]] = {}
    f1s, ious = [], []
    for i, name in enumerate(names):
        fn, fp = int(rows[i] - tp[i]), int(cols[i] - tp[i])
        f1 = _div(2 * tp[i], 2 * tp[i] + fp + fn)
        iou = _div(tp[i], tp[i] + fp + fn)
        f1s.append(f1)
        ious.append(iou)
        per[name] = {"producers_accuracy": _div(tp[i], rows[i]), "users_accuracy": _div(tp[i], cols[i]),
                     "f1": f1, "iou": iou, "reference_pixels": int(rows[i]), "map_pixels": int(cols[i]),
                     "correct": int(tp[i])}
    oa = _div(int(tp.sum()), n)
    kappa = None
    if n:
        pe = float((rows.astype(np.float64) * cols).sum()) / float(n) ** 2
        po = float(tp.sum()) / n
        kappa = (po - pe) / (1 - pe) if pe < 1 else None
    return {"n": n, "overall_accuracy": oa, "kappa": kappa, "macro_f1": _mean(f1s), "miou": _mean(ious),
            "per_class": per, "classes": names, "confusion_matrix": m.tolist()}


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def confusion_csv_text(cm: np.ndarray, names: Sequence[str]) -> str:
    """The CSV text of :func:`write_confusion_csv`."""
    met = classification_metrics(cm, names)
    m = np.asarray(cm, dtype=np.int64)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["reference \\ map", *names, "total", "producers_accuracy"])
    for i, name in enumerate(names):
        w.writerow([name, *[int(x) for x in m[i]], int(m[i].sum()), _fmt(met["per_class"][name]["producers_accuracy"])])
    w.writerow(["total", *[int(x) for x in m.sum(axis=0)], int(m.sum()), ""])
    w.writerow(["users_accuracy", *[_fmt(met["per_class"][n]["users_accuracy"]) for n in names], "",
                _fmt(met["overall_accuracy"])])
    return buf.getvalue()


def write_confusion_csv(cm: np.ndarray, names: Sequence[str], path: str | os.PathLike[str]) -> Path:
    """Write the confusion matrix as CSV, atomically: a header row of map classes, one row per reference class
    with its total and producer's accuracy, then a ``total`` row and a ``users_accuracy`` row (its last cell:
    the overall accuracy)."""
    text = confusion_csv_text(cm, names)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def plot_confusion(cm: np.ndarray, names: Sequence[str], path: str | os.PathLike[str], *, title: str = "",
                   normalise: bool = True) -> Path:
    """A confusion-matrix PNG (rows = reference, columns = map), atomically: cells coloured by the share of
    the reference row (``normalise``) and annotated with the pixel counts."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    m = np.asarray(cm, dtype=np.float64)
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0) if normalise else m
    k = len(names)
    size = max(3.5, 0.7 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    try:
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1 if normalise else None)
        ax.set_xticks(range(k), labels=list(names), rotation=45, ha="right")
        ax.set_yticks(range(k), labels=list(names))
        ax.set_xlabel("map (predicted)")
        ax.set_ylabel("reference")
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center",
                        color="white" if share[i, j] > 0.5 else "black", fontsize=8)
        met = classification_metrics(cm, names)
        oa = met["overall_accuracy"]
        f1 = met["macro_f1"]
        sub = f"OA {oa:.3f}, macro-F1 {f1:.3f}, n={met['n']}" if oa is not None and f1 is not None else "no pixels"
        ax.set_title(f"{title}\n{sub}" if title else sub, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of reference row" if normalise else "pixels")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return Path(path)
