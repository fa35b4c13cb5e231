"""Automatic thresholds for change scores (Otsu's method on the valid pixels)."""

from __future__ import annotations

import numpy as np

__all__ = ["otsu_threshold"]


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
    v = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(v)
    if mask is not None:
        keep &= np.asarray(mask, dtype=bool)
    v = v[keep]
    if v.size == 0:
        raise ValueError("otsu_threshold: no finite valid values (is everything nodata or masked?)")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        raise ValueError(f"otsu_threshold: all {v.size} valid values equal {lo}; there is nothing to separate")
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
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
