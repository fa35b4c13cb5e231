"""Binary change-detection metrics from a streaming confusion matrix, and threshold selection.

The *change* class is the positive class. Every metric ignores pixels outside ``valid`` (unlabelled pixels
of sparse references such as Taizhou, nodata, image borders). Counts are accumulated as Python integers, so
any number of windows/scenes can be streamed through :meth:`ConfusionMatrix.update` without overflow.

Definitions (``tp, fp, fn, tn`` of the change class, ``n = tp + fp + fn + tn``):

* precision ``tp / (tp + fp)``, recall ``tp / (tp + fn)``, F1 ``2 tp / (2 tp + fp + fn)``,
* IoU of the change class ``tp / (tp + fp + fn)``, overall accuracy ``(tp + tn) / n``,
* Cohen's kappa ``(oa - pe) / (1 - pe)`` with ``pe = ((tp + fp)(tp + fn) + (fn + tn)(fp + tn)) / n^2``.

A ratio whose denominator is zero (e.g. precision when nothing is predicted as change) is ``nan``, not 0:
it is undefined, and averaging it as 0 would hide that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ConfusionMatrix", "ThresholdSearch", "change_metrics"]


def _as_bool(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        return a
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite values; mark them invalid instead")
    u = np.unique(a)
    if not np.all(np.isin(u, (0, 1))):
        raise ValueError(f"{name} must be binary (0/1 or bool), found values {u[:10].tolist()}")
    return a.astype(bool)


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


@dataclass
class ConfusionMatrix:
    """Streaming 2x2 confusion matrix of the change class (see the module docstring)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def update(self, pred: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None) -> ConfusionMatrix:
        """Add one window/scene: binary ``pred`` and ``target`` of the same shape; ``valid`` False = ignored."""
        p, t = _as_bool(pred, "pred"), _as_bool(target, "target")
        if p.shape != t.shape:
            raise ValueError(f"pred shape {p.shape} differs from target shape {t.shape}")
        if valid is not None:
            v = np.asarray(valid, dtype=bool)
            if v.shape != t.shape:
                raise ValueError(f"valid shape {v.shape} differs from target shape {t.shape}")
            p, t = p[v], t[v]
        tp = int(np.count_nonzero(p & t))
        fp = int(np.count_nonzero(p & ~t))
        fn = int(np.count_nonzero(~p & t))
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.tn += int(p.size) - tp - fp - fn
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return ConfusionMatrix(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def n(self) -> int:
        """Number of valid pixels counted."""
        return self.tp + self.fp + self.fn + self.tn

    @property
    def precision(self) -> float:
        return _div(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _div(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return _div(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def iou(self) -> float:
        return _div(self.tp, self.tp + self.fp + self.fn)

    @property
    def oa(self) -> float:
        return _div(self.tp + self.tn, self.n)

    @property
    def kappa(self) -> float:
        n = self.n
        if not n:
            return math.nan
        pe = ((self.tp + self.fp) * (self.tp + self.fn) + (self.fn + self.tn) * (self.fp + self.tn)) / (n * n)
        return _div(self.oa - pe, 1.0 - pe)

    def compute(self) -> dict[str, float | int]:
        """All metrics and counts as a dict (``precision recall f1 iou oa kappa tp fp fn tn n``)."""
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1, "iou": self.iou,
                "oa": self.oa, "kappa": self.kappa, "tp": self.tp, "fp": self.fp, "fn": self.fn,
                "tn": self.tn, "n": self.n}


def change_metrics(pred: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float | int]:
    """Metrics of one binary prediction against a binary target (see :class:`ConfusionMatrix`)."""
    return ConfusionMatrix().update(pred, target, valid).compute()


class ThresholdSearch:
    """Choose the threshold of a score in ``[lo, hi]`` that maximises F1 (or IoU), streaming.

    Scores of valid pixels are binned into ``bins`` equal bins per class; the threshold candidates are the
    bin edges, and ``score >= threshold`` predicts change (bin ``k`` holds ``[lo + k step, lo + (k+1) step)``). Memory is ``O(bins)`` whatever the data size.

    Args:
        bins: histogram resolution (the chosen threshold is exact to ``(hi - lo) / bins``).
        lo, hi: score range (probabilities and the zero-shot distance live in ``[0, 1]``).
    """

    def __init__(self, bins: int = 1000, lo: float = 0.0, hi: float = 1.0) -> None:
        if bins < 2 or not hi > lo:
            raise ValueError(f"need bins >= 2 and hi > lo, got bins={bins}, [{lo}, {hi}]")
        self.bins, self.lo, self.hi = int(bins), float(lo), float(hi)
        self.pos = np.zeros(self.bins, np.int64)
        self.neg = np.zeros(self.bins, np.int64)

    def update(self, score: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None) -> ThresholdSearch:
        """Add scores (any shape) with their binary ``target`` and optional ``valid`` mask."""
        s = np.asarray(score, dtype=np.float64)
        t = _as_bool(target, "target")
        keep = np.isfinite(s) if valid is None else (np.asarray(valid, bool) & np.isfinite(s))
        s, t = s[keep], t[keep]
        idx = np.clip(((s - self.lo) / (self.hi - self.lo) * self.bins).astype(np.int64), 0, self.bins - 1)
        self.pos += np.bincount(idx[t], minlength=self.bins)
        self.neg += np.bincount(idx[~t], minlength=self.bins)
        return self

    def curve(self, metric: str = "f1") -> tuple[np.ndarray, np.ndarray]:
        """``(thresholds, metric values)`` for every upper bin edge (``score >= threshold`` = change)."""
        if metric not in ("f1", "iou"):
            raise ValueError(f"metric must be 'f1' or 'iou', got {metric!r}")
        # predicted change = bins strictly above the edge index k (edges lo + k * step, k = 0..bins-1)
        tp = np.cumsum(self.pos[::-1])[::-1]  # tp[k] = positives in bins >= k
        fp = np.cumsum(self.neg[::-1])[::-1]
        tp = np.append(tp[1:], 0).astype(np.float64)  # bins > k
        fp = np.append(fp[1:], 0).astype(np.float64)
        fn = self.pos.sum() - tp
        denom = (2 * tp + fp + fn) if metric == "f1" else (tp + fp + fn)
        num = 2 * tp if metric == "f1" else tp
        with np.errstate(invalid="ignore", divide="ignore"):
            val = np.where(denom > 0, num / np.maximum(denom, 1), np.nan)
        edges = self.lo + (np.arange(self.bins) + 1) * (self.hi - self.lo) / self.bins
        return edges, val

    def best(self, metric: str = "f1") -> tuple[float, float]:
        """``(threshold, best metric value)``; raises ``ValueError`` when no positive pixel was seen."""
        if self.pos.sum() == 0:
            raise ValueError("threshold search saw no changed pixel; the validation data has no change labels")
        edges, val = self.curve(metric)
        k = int(np.nanargmax(val))
        return float(edges[k]), float(val[k])
