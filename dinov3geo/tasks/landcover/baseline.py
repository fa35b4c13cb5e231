"""The classic land-cover baseline: a per-pixel random forest on band values and spectral indices.

What land-cover practitioners run today (e.g. the open-geo-tutorial this module's test scene comes from): every
labelled pixel is a sample, its features are the band values plus normalised-difference indices, and a
:class:`sklearn.ensemble.RandomForestClassifier` (fixed seed) learns the classes. Trained on the same labels and
the same polygon split as the heads (:func:`~dinov3geo.tasks.landcover.labels.split_by_polygon`), so its test
metrics sit side by side with theirs.

Indices, where the bands exist (found by their common names or aliases, see :mod:`dinov3geo.io.bands`):

* ``NDVI = (nir - red) / (nir + red)``;
* ``NDWI = (green - nir) / (green + nir)`` (McFeeters 1996, open water);
* ``NBR = (nir - swir22) / (nir + swir22)``;
* ``NDMI = (nir - swir16) / (nir + swir16)``.

They are computed on raw values (the ratios do not depend on a reflectance scale factor; for Sentinel-2 L2A with
the +1000 offset, give raw values minus the offset). A zero denominator gives 0.

``n_jobs`` follows the cores other processes leave free (:func:`free_cores`), as the heads' training does.
Fitted forests are not saved (scikit-learn models can only be pickled; refitting takes seconds).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["INDICES", "BaselineResult", "band_roles", "fit_random_forest", "free_cores", "pixel_features",
           "run_baseline"]

#: index name -> (band a, band b) of ``(a - b) / (a + b)``
INDICES: dict[str, tuple[str, str]] = {
    "ndvi": ("nir", "red"),
    "ndwi": ("green", "nir"),
    "nbr": ("nir", "swir22"),
    "ndmi": ("nir", "swir16"),
}
#: names that count as each role (common names first, then sensor ids)
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "blue": ("blue", "b02"),
    "green": ("green", "b03"),
    "red": ("red", "b04"),
    "nir": ("nir", "nir08", "b08", "b8a"),
    "swir16": ("swir16", "swir1", "b11"),
    "swir22": ("swir22", "swir2", "b12"),
}


def band_roles(names: Sequence[str], aliases: Sequence[Sequence[str]] | None = None) -> dict[str, int]:
    """``{role: 0-based band index}`` for the roles of :data:`ROLE_NAMES` found among the band names (and
    aliases)."""
    out: dict[str, int] = {}
    for role, cands in ROLE_NAMES.items():
        for cand in cands:
            for i, n in enumerate(names):
                al = [a.lower() for a in (aliases[i] if aliases is not None else ())]
                if n.lower() == cand or cand in al:
                    out.setdefault(role, i)
            if role in out:
                break
    return out


def pixel_features(values: np.ndarray, names: Sequence[str], aliases: Sequence[Sequence[str]] | None = None
                   ) -> tuple[np.ndarray, list[str]]:
    """Per-pixel features of ``values`` ``[C, N]`` (bands x pixels): ``([N, F] float32, feature names)``."""
    v = np.asarray(values, dtype=np.float64)
    feats = [v[i] for i in range(v.shape[0])]
    fnames = [str(n) for n in names]
    roles = band_roles(names, aliases)
    for idx, (a, b) in INDICES.items():
        if a in roles and b in roles:
            x, y = v[roles[a]], v[roles[b]]
            den = x + y
            feats.append(np.divide(x - y, den, out=np.zeros_like(den), where=den != 0))
            fnames.append(idx)
    return np.stack(feats, axis=1).astype(np.float32), fnames


def free_cores() -> int:
    """Cores not kept busy by other processes (at least 1; all of them when it cannot be measured)."""
    from dinov3geo.utils.threads import other_load

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = other_load(0.2)
    if busy is None:
        return n
    return max(1, min(n, round(n - busy)))


def fit_random_forest(x: np.ndarray, y: np.ndarray, *, n_estimators: int = 200, max_depth: int | None = None,
                      class_weight: str | Mapping[int, float] | None = "balanced", seed: int = 0,
                      n_jobs: int | None = None) -> Any:
    """A fitted :class:`~sklearn.ensemble.RandomForestClassifier` (``n_jobs`` default: :func:`free_cores`)."""
    from sklearn.ensemble import RandomForestClassifier

    rf = RandomForestClassifier(n_estimators=n_estimators, max_depth=max_depth, class_weight=class_weight,
                                random_state=seed, n_jobs=n_jobs or free_cores())
    rf.fit(x, y)
    return rf


@dataclass
class BaselineResult:
    """A fitted baseline and its provenance."""

    estimator: Any
    feature_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, values: np.ndarray, names: Sequence[str], aliases: Sequence[Sequence[str]] | None = None
                ) -> np.ndarray:
        """Class indexes of pixels ``values`` ``[C, N]``."""
        x, _ = pixel_features(values, names, aliases)
        return self.estimator.predict(x).astype(np.uint8)


def run_baseline(image: np.ndarray, names: Sequence[str], index: np.ndarray, train_mask: np.ndarray, *,
                 aliases: Sequence[Sequence[str]] | None = None, n_estimators: int = 200,
                 max_depth: int | None = None, class_weight: str | None = "balanced", seed: int = 0,
                 max_samples: int | None = 200_000) -> BaselineResult:
    """Fit the random forest on the labelled pixels of ``train_mask``.

    Args:
        image: ``[C, H, W]`` band values.
        names: band names (roles for the indices).
        index: ``[H, W]`` class indexes (255 = unlabelled).
        train_mask: ``[H, W]`` bool training pixels.
        aliases: band aliases (per band) to find roles.
        n_estimators, max_depth, class_weight, seed: forest settings (``class_weight="none"``: unweighted).
        max_samples: at most this many training pixels (a seeded sample).
    """
    sel = train_mask & (index != 255)
    rows, cols = np.nonzero(sel)
    if rows.size == 0:
        raise ValueError("the baseline has no training pixels")
    if max_samples is not None and rows.size > max_samples:
        pick = np.random.default_rng(seed).choice(rows.size, max_samples, replace=False)
        rows, cols = rows[pick], cols[pick]
    x, fnames = pixel_features(image[:, rows, cols], names, aliases)
    y = index[rows, cols].astype(np.int64)
    t0 = time.perf_counter()
    cw = None if class_weight in (None, "none") else class_weight
    rf = fit_random_forest(x, y, n_estimators=n_estimators, max_depth=max_depth, class_weight=cw, seed=seed)
    info = {"model": "RandomForestClassifier", "n_estimators": n_estimators, "max_depth": max_depth,
            "class_weight": class_weight or "none", "seed": seed, "n_train_pixels": int(rows.size),
            "features": fnames, "fit_seconds": round(time.perf_counter() - t0, 3), "n_jobs": int(rf.n_jobs)}
    return BaselineResult(rf, fnames, info)
