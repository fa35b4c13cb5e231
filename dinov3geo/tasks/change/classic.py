"""The classic change baseline, always available: change-vector analysis and NDVI differencing, with Otsu.

* **CVA** (change-vector analysis): each band of each date is standardised with that date's own mean and
  standard deviation over the valid pixels (this also absorbs global radiometric differences between the
  dates), and the score is the magnitude of the difference vector divided by ``sqrt(C)``:
  ``||z_after - z_before|| / sqrt(C)``.
* **NDVI differencing**: ``NDVI = (nir - red) / (nir + red)`` per date; the score is the NDVI decrease
  ``max(NDVI_before - NDVI_after, 0)`` (``direction="decrease"``: vegetation loss, the deforestation signal),
  the increase (``"increase"``), or ``|NDVI_before - NDVI_after|`` (``"both"``). Directional scores are clipped
  at 0 so that Otsu separates "no change in this direction" from the tail instead of splitting the signed
  distribution between its gain and loss sides (on Pucallpa 2000/2020 the unclipped Otsu threshold was
  -0.39, calling 30 % of the scene "loss").

A pixel is change when its score exceeds a threshold: Otsu's (:func:`~dinov3geo.tasks.change.thresholds.
otsu_threshold`) on the valid pixels unless one is given. Both run on in-memory arrays (:func:`classic_change`)
and on rasters of any size as inference-engine models (:class:`CVAModel`, :class:`NDVIDiffModel`) over the
stacked two-date source, window by window. The per-date band statistics of CVA are global (computed once,
e.g. on :meth:`~dinov3geo.tasks.change.coregister.CoregisteredPair.sample`), so windowed and whole-image
scores are identical.

Scores are not probabilities. :func:`score_to_probability` maps a score to ``[0, 1)`` with 0.5 at the
threshold (``s^2 / (s^2 + t^2)``), a monotone rescaling for display and polygon confidence, not a calibrated
probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dinov3geo.inference.models import RasterModel
from dinov3geo.tasks.change.thresholds import otsu_threshold

__all__ = [
    "BandStats",
    "CVAModel",
    "ClassicResult",
    "NDVIDiffModel",
    "band_stats",
    "classic_change",
    "cva_score",
    "find_band",
    "ndvi",
    "ndvi_difference",
    "score_to_probability",
]

_RED = ("red", "b04", "b4", "sr_b4")
_NIR = ("nir", "b08", "b8", "nir08", "b8a", "sr_b5")
_DIRECTIONS = ("decrease", "increase", "both")


@dataclass(frozen=True)
class BandStats:
    """Per-band mean and standard deviation of both dates (valid pixels), for CVA standardisation."""

    mean_before: tuple[float, ...]
    std_before: tuple[float, ...]
    mean_after: tuple[float, ...]
    std_after: tuple[float, ...]


@dataclass
class ClassicResult:
    """Output of :func:`classic_change`.

    Attributes:
        score: ``[H, W]`` float32 change score (NaN where invalid).
        change: ``[H, W]`` bool (False where invalid).
        valid: ``[H, W]`` bool.
        threshold: the threshold used.
        threshold_source: ``"otsu"`` or ``"given"``.
        method: ``"cva"`` or ``"ndvi"``.
    """

    score: np.ndarray
    change: np.ndarray
    valid: np.ndarray
    threshold: float
    threshold_source: str
    method: str


def band_stats(before: np.ndarray, after: np.ndarray, valid: np.ndarray) -> BandStats:
    """Per-band mean/std of both ``[C, H, W]`` dates over ``valid`` pixels (std of a constant band: 1)."""
    v = np.asarray(valid, dtype=bool)
    if not v.any():
        raise ValueError("no pixel is valid in both dates; cannot compute band statistics")
    out = []
    for arr in (before, after):
        x = np.asarray(arr, dtype=np.float64)[:, v]
        m, s = x.mean(axis=1), x.std(axis=1)
        s[s == 0] = 1.0
        out += [tuple(float(a) for a in m), tuple(float(a) for a in s)]
    return BandStats(*out)


def cva_score(before: np.ndarray, after: np.ndarray, stats: BandStats) -> np.ndarray:
    """CVA magnitude ``||z_after - z_before|| / sqrt(C)`` of ``[C, H, W]`` arrays (see the module docstring)."""
    b, a = np.asarray(before, np.float32), np.asarray(after, np.float32)
    mb, sb = np.asarray(stats.mean_before, np.float32), np.asarray(stats.std_before, np.float32)
    ma, sa = np.asarray(stats.mean_after, np.float32), np.asarray(stats.std_after, np.float32)
    if len(mb) != b.shape[0]:
        raise ValueError(f"statistics have {len(mb)} bands but the images have {b.shape[0]}")
    d = (a - ma[:, None, None]) / sa[:, None, None] - (b - mb[:, None, None]) / sb[:, None, None]
    return np.sqrt((d * d).sum(axis=0) / b.shape[0]).astype(np.float32)


def find_band(band_names: Sequence[str], role: str) -> int:
    """0-based index of the ``"red"`` or ``"nir"`` band in ``band_names`` (common names or Sentinel-2 ids).

    Raises:
        ValueError: naming the bands that are there and how to name them.
    """
    names = [n.lower() for n in band_names]
    cands = {"red": _RED, "nir": _NIR}[role]
    for c in cands:
        if c in names:
            return names.index(c)
    raise ValueError(
        f"NDVI needs a {role!r} band but the bands are {list(band_names)}. Name the bands (e.g. "
        f"band_names=['swir16', 'nir', 'red', 'green'], CLI --band-names) or use the CVA method."
    )


def ndvi(data: np.ndarray, band_names: Sequence[str]) -> np.ndarray:
    """``(nir - red) / (nir + red)`` of a ``[C, H, W]`` array (NaN where ``nir + red == 0``)."""
    r = np.asarray(data[find_band(band_names, "red")], np.float32)
    n = np.asarray(data[find_band(band_names, "nir")], np.float32)
    s = n + r
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s != 0, (n - r) / s, np.nan).astype(np.float32)


def ndvi_difference(before: np.ndarray, after: np.ndarray, band_names: Sequence[str],
                    direction: str = "decrease") -> np.ndarray:
    """NDVI change score (see the module docstring for ``direction``)."""
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    d = ndvi(before, band_names) - ndvi(after, band_names)
    if direction == "both":
        return np.abs(d)
    return np.maximum(d if direction == "decrease" else -d, 0).astype(np.float32)


def score_to_probability(score: np.ndarray, threshold: float) -> np.ndarray:
    """Monotone map of a non-negative score to ``[0, 1)`` with 0.5 at ``threshold``: ``s^2 / (s^2 + t^2)``.

    Negative scores map to 0.
    """
    s = np.maximum(np.asarray(score, np.float32), 0)
    t = np.float32(max(threshold, 1e-12))
    return (s * s / (s * s + t * t)).astype(np.float32)


def classic_change(
    before: np.ndarray,
    after: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    method: str = "cva",
    band_names: Sequence[str] | None = None,
    threshold: float | None = None,
    direction: str = "decrease",
    stats: BandStats | None = None,
) -> ClassicResult:
    """Classic change detection on two ``[C, H, W]`` arrays on one grid.

    Args:
        valid: ``[H, W]`` pixels valid in both dates (default: finite everywhere).
        method: ``"cva"`` or ``"ndvi"``.
        band_names: band names (needed for NDVI: a red and a nir band).
        threshold: score threshold (default: Otsu on the valid pixels).
        direction: NDVI score direction (``"decrease"``, ``"increase"``, ``"both"``).
        stats: CVA band statistics (default: from these arrays).
    """
    b, a = np.asarray(before, np.float32), np.asarray(after, np.float32)
    if b.shape != a.shape or b.ndim != 3:
        raise ValueError(f"before and after must be [C, H, W] arrays of one shape, got {b.shape}, {a.shape}")
    v = np.all(np.isfinite(b), 0) & np.all(np.isfinite(a), 0)
    if valid is not None:
        v &= np.asarray(valid, dtype=bool)
    if method == "cva":
        score = cva_score(b, a, stats or band_stats(b, a, v))
    elif method == "ndvi":
        if band_names is None:
            raise ValueError("method='ndvi' needs band_names with a 'red' and a 'nir' band")
        score = ndvi_difference(b, a, band_names, direction)
    else:
        raise ValueError(f"method must be 'cva' or 'ndvi', got {method!r}")
    v &= np.isfinite(score)
    score = np.where(v, score, np.nan).astype(np.float32)
    src = "given"
    if threshold is None:
        threshold, src = otsu_threshold(score, v), "otsu"
    change = v & (score > threshold)
    return ClassicResult(score, change, v, float(threshold), src, method)


class CVAModel(RasterModel):
    """CVA magnitude over the stacked two-date source ``[B, 2C, H, W]`` -> ``[B, 1, H, W]`` (per pixel).

    Args:
        stats: global per-date band statistics (:func:`band_stats` on a sample of the pair).
    """

    band_names = ("cva_magnitude",)
    receptive_margin = 0
    scale = 1

    def __init__(self, stats: BandStats) -> None:
        self.stats = stats
        c = len(stats.mean_before)
        self.in_bands = 2 * c
        self._c = c
        self._m = torch.tensor(stats.mean_before + stats.mean_after, dtype=torch.float32)[:, None, None]
        self._s = torch.tensor(stats.std_before + stats.std_after, dtype=torch.float32)[:, None, None]

    def preprocess(self, x: Tensor, valid: Tensor) -> Tensor:
        return (x - self._m.to(x.device)) / self._s.to(x.device)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        d = x[:, self._c :] - x[:, : self._c]
        return torch.sqrt((d * d).sum(dim=1, keepdim=True) / self._c)

    def _state_tensors(self) -> list[Tensor]:
        return [self._m, self._s]


class NDVIDiffModel(RasterModel):
    """NDVI difference score over the stacked two-date source ``[B, 2C, H, W]`` -> ``[B, 1, H, W]``.

    Args:
        band_names: the ``C`` band names of one date (must include red and nir).
        direction: ``"decrease"`` (vegetation loss, default), ``"increase"`` or ``"both"``.
    """

    receptive_margin = 0
    scale = 1

    def __init__(self, band_names: Sequence[str], direction: str = "decrease") -> None:
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
        self.red, self.nir = find_band(band_names, "red"), find_band(band_names, "nir")
        self._c = len(band_names)
        self.in_bands = 2 * self._c
        self.direction = direction
        self.band_names = (f"ndvi_{direction}",)

    def _ndvi(self, x: Tensor, off: int) -> Tensor:
        r, n = x[:, off + self.red], x[:, off + self.nir]
        s = n + r
        return torch.where(s != 0, (n - r) / torch.where(s != 0, s, torch.ones_like(s)), torch.nan)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        d = self._ndvi(x, 0) - self._ndvi(x, self._c)
        if self.direction == "both":
            return d.abs()[:, None]
        d = d if self.direction == "decrease" else -d
        return torch.where(torch.isnan(d), d, d.clamp(min=0))[:, None]

    def fingerprint(self) -> str:
        return super().fingerprint() + f"-{self.red}-{self.nir}-{self.direction}"
