"""Per-band statistics over valid pixels, mergeable across tasks and scenes.

Mean and standard deviation are exact (Chan et al.'s parallel update of count / mean / M2 in float64).
Percentiles come from a uniform random sample of valid pixels (up to ``sample_size`` per band, merged in
proportion to pixel counts), so they are approximate: with the default 100,000 samples the rank error of a
percentile is about 0.3 percentage points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES: tuple[float, ...] = (1.0, 2.0, 5.0, 25.0, 50.0, 75.0, 95.0, 98.0, 99.0)


@dataclass
class BandStats:
    """Running statistics of ``n_bands`` bands.

    Attributes:
        count, mean, m2: per band, float64 (``m2`` = sum of squared deviations).
        minimum, maximum: per band.
        sample: per band, a uniform sample of valid values (list of 1-D float64 arrays).
    """

    n_bands: int
    sample_size: int = 100_000
    count: np.ndarray = field(init=False)
    mean: np.ndarray = field(init=False)
    m2: np.ndarray = field(init=False)
    minimum: np.ndarray = field(init=False)
    maximum: np.ndarray = field(init=False)
    sample: list[np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.count = np.zeros(self.n_bands, np.float64)
        self.mean = np.zeros(self.n_bands, np.float64)
        self.m2 = np.zeros(self.n_bands, np.float64)
        self.minimum = np.full(self.n_bands, np.inf)
        self.maximum = np.full(self.n_bands, -np.inf)
        self.sample = [np.empty(0, np.float64) for _ in range(self.n_bands)]

    def update(self, data: np.ndarray, valid: np.ndarray, rng: np.random.Generator) -> None:
        """Add the valid pixels of ``data`` ``[bands, h, w]`` (``valid`` ``[h, w]``)."""
        if not valid.any():
            return
        vals = data[:, valid].astype(np.float64, copy=False)  # [bands, n]
        other = BandStats(self.n_bands, self.sample_size)
        n = vals.shape[1]
        other.count[:] = n
        other.mean[:] = vals.mean(axis=1)
        other.m2[:] = ((vals - other.mean[:, None]) ** 2).sum(axis=1)
        other.minimum[:] = vals.min(axis=1)
        other.maximum[:] = vals.max(axis=1)
        take = min(n, self.sample_size)
        idx = rng.choice(n, size=take, replace=False) if take < n else np.arange(n)
        other.sample = [vals[b, idx].copy() for b in range(self.n_bands)]
        self.merge(other, rng)

    def merge(self, other: BandStats, rng: np.random.Generator) -> BandStats:
        """Fold ``other`` into ``self`` (in place) and return ``self``."""
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = other.mean - self.mean
            self.mean = np.where(n > 0, self.mean + delta * np.where(n > 0, n_b / n, 0), 0.0)
            self.m2 = self.m2 + other.m2 + np.where(n > 0, delta**2 * n_a * n_b / np.where(n > 0, n, 1), 0)
        self.count = n
        self.minimum = np.minimum(self.minimum, other.minimum)
        self.maximum = np.maximum(self.maximum, other.maximum)
        for b in range(self.n_bands):
            self.sample[b] = _merge_samples(
                self.sample[b], float(n_a[b]), other.sample[b], float(n_b[b]), self.sample_size, rng
            )
        return self

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation per band."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(np.where(self.count > 0, self.m2 / np.maximum(self.count, 1), np.nan))

    def percentiles(self, q: tuple[float, ...] = PERCENTILES) -> np.ndarray:
        """``[bands, len(q)]`` percentiles (NaN for bands without valid pixels)."""
        out = np.full((self.n_bands, len(q)), np.nan)
        for b in range(self.n_bands):
            if self.sample[b].size:
                out[b] = np.percentile(self.sample[b], q)
        return out

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary and state (sample excluded; it is stored as an array)."""
        return {
            "count": self.count.tolist(),
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
            "min": [None if not np.isfinite(v) else float(v) for v in self.minimum],
            "max": [None if not np.isfinite(v) else float(v) for v in self.maximum],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], sample: np.ndarray | None = None, sample_size: int = 100_000) -> BandStats:
        """Inverse of :meth:`to_dict`; ``sample`` is ``[bands, S]`` with NaN padding."""
        n_bands = len(d["count"])
        s = cls(n_bands, sample_size)
        s.count = np.asarray(d["count"], np.float64)
        s.mean = np.asarray(d["mean"], np.float64)
        s.m2 = np.asarray(d["m2"], np.float64)
        s.minimum = np.asarray([np.inf if v is None else v for v in d["min"]], np.float64)
        s.maximum = np.asarray([-np.inf if v is None else v for v in d["max"]], np.float64)
        if sample is not None:
            s.sample = [row[~np.isnan(row)].astype(np.float64) for row in np.asarray(sample, np.float64)]
        return s

    def sample_array(self) -> np.ndarray:
        """``[bands, sample_size]`` float64 with NaN padding."""
        out = np.full((self.n_bands, self.sample_size), np.nan)
        for b, s in enumerate(self.sample):
            out[b, : s.size] = s
        return out


def _merge_samples(
    a: np.ndarray, n_a: float, b: np.ndarray, n_b: float, size: int, rng: np.random.Generator
) -> np.ndarray:
    """A sample of the union: each side contributes in proportion to the pixels it represents."""
    if a.size + b.size <= size and a.size == n_a and b.size == n_b:
        return np.concatenate([a, b])
    total = n_a + n_b
    if total <= 0:
        return np.empty(0, np.float64)
    k = min(size, a.size + b.size)
    k_a = int(round(k * n_a / total))
    k_a = min(k_a, a.size)
    k_b = min(k - k_a, b.size)
    pa = a[rng.choice(a.size, k_a, replace=False)] if k_a < a.size else a
    pb = b[rng.choice(b.size, k_b, replace=False)] if k_b < b.size else b
    return np.concatenate([pa, pb])
