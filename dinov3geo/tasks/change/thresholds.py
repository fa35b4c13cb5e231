"""Automatic thresholds for change scores (Otsu's method on the valid pixels), in memory or window by window.

:func:`otsu_threshold` takes one array. Rasters of any size use the same computation in two streaming passes
over their windows (:func:`otsu_threshold_streaming`): a :class:`ValueRange` gathers the minimum and maximum
of the used values, then a :class:`ScoreHistogram` over that range sums the per-window histograms. A value's
bin depends on the value and the range only (``np.histogram`` with a fixed range is element-wise), so the
summed histogram equals the histogram of all values at once, count for count, and the streaming threshold
equals :func:`otsu_threshold` of the whole array exactly (bit for bit), whatever the windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

__all__ = ["ScoreHistogram", "ValueRange", "otsu_from_histogram", "otsu_threshold", "otsu_threshold_streaming"]


def _used(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The finite entries of ``values`` where ``mask`` is True, as float64 (a 1-D array)."""
    v = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(v)
    if mask is not None:
        keep &= np.asarray(mask, dtype=bool)
    return v[keep]


class ValueRange:
    """Minimum, maximum and count of the finite, unmasked values seen so far (first streaming pass)."""

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf
        self.n = 0

    def add(self, values: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add a window's values (``mask``: False entries are ignored, as are NaN and infinities)."""
        v = _used(values, mask)
        if v.size:
            self.lo = min(self.lo, float(v.min()))
            self.hi = max(self.hi, float(v.max()))
            self.n += int(v.size)

    @property
    def constant(self) -> bool:
        """True when at least one value was seen and all of them are equal."""
        return self.n > 0 and self.hi <= self.lo


class ScoreHistogram:
    """Histogram of the used values over a fixed ``[lo, hi]`` range with ``bins`` equal bins (second pass)."""

    def __init__(self, lo: float, hi: float, bins: int = 256) -> None:
        if not hi > lo:
            raise ValueError(f"histogram range must have hi > lo, got [{lo}, {hi}]")
        self.lo, self.hi, self.bins = float(lo), float(hi), int(bins)
        self.counts = np.zeros(self.bins, dtype=np.int64)

    def add(self, values: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add a window's used values (values outside ``[lo, hi]`` are not counted, as in ``np.histogram``)."""
        v = _used(values, mask)
        if v.size:
            self.counts += np.histogram(v, bins=self.bins, range=(self.lo, self.hi))[0]

    def otsu(self) -> float:
        """Otsu's threshold of the histogram (see :func:`otsu_from_histogram`)."""
        return otsu_from_histogram(self.counts, self.lo, self.hi)


def otsu_from_histogram(hist: np.ndarray, lo: float, hi: float) -> float:
    """Otsu's threshold from histogram counts over ``len(hist)`` equal bins of ``[lo, hi]``.

    Returns the upper edge of the last bin of the lower class (the class split maximising the between-class
    variance, bins represented by their centres).
    """
    hist = np.asarray(hist)
    edges = np.histogram_bin_edges(np.zeros(0), bins=len(hist), range=(lo, hi))
    centers = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1.0
    k = int(np.argmax(between))
    return float(edges[k + 1])


def otsu_threshold(values: np.ndarray, mask: np.ndarray | None = None, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (finite entries where ``mask`` is True), maximising between-class variance.

    Args:
        values: scores of any shape (e.g. a cosine distance or an NDVI difference).
        mask: optional boolean array of the same shape; False entries are ignored.
        bins: histogram bins over ``[min, max]`` of the used values.

    Returns:
        The threshold; ``values > threshold`` is the upper class.

    Raises:
        ValueError: no finite valid value, or all valid values are equal.
    """
    return otsu_threshold_streaming(lambda: [(values, mask)], bins=bins)


def otsu_threshold_streaming(
    chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray | None]]], bins: int = 256
) -> float:
    """Otsu's threshold of values arriving window by window, equal to :func:`otsu_threshold` of all of them.

    Args:
        chunks: called twice (one pass for the range, one for the histogram); each call yields
            ``(values, mask)`` pairs (``mask`` None or boolean, False = ignored) covering the data once.
        bins: histogram bins over ``[min, max]`` of the used values.

    Raises:
        ValueError: no finite valid value, or all valid values are equal.
    """
    rng = ValueRange()
    for values, mask in chunks():
        rng.add(values, mask)
    if rng.n == 0:
        raise ValueError("otsu_threshold: no finite valid values (is everything nodata or masked?)")
    if rng.constant:
        raise ValueError(f"otsu_threshold: all {rng.n} valid values equal {rng.lo}; there is nothing to separate")
    hist = ScoreHistogram(rng.lo, rng.hi, bins)
    for values, mask in chunks():
        hist.add(values, mask)
    return hist.otsu()
