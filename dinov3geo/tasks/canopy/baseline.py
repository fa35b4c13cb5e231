"""The classic baseline for canopy height: per-pixel gradient boosting on band values and texture.

Features per pixel (all computed on the working grid, invalid pixels excluded from every neighbourhood by
normalised convolution):

* the band values;
* brightness (mean of the RGB bands, or of all bands when there are fewer than 3);
* excess green ``ExG = 2g - r - b`` on chromatic coordinates (``r = R / (R + G + B)``, ...), when RGB exists;
* NDVI when a near-infrared band index is given;
* for every window size ``k`` in ``windows`` (pixels): local mean and local standard deviation of brightness and
  local mean of ExG over ``k x k``;
* gradient magnitude of brightness (Sobel) and its local mean over the largest window.

Model: :class:`sklearn.ensemble.HistGradientBoostingRegressor` on a seeded sample of training pixels.

Persistence: scikit-learn models can only be stored with pickle. :func:`save_baseline` writes a joblib
(pickle) file and :func:`load_baseline` refuses to read one unless called with ``trusted=True``: **unpickling
runs arbitrary code, so load only files you created yourself**. Refitting is cheap (seconds) and is the
safe alternative.

:func:`prepare_benchmark`, :func:`evaluate_split` and :func:`measure_baseline` give the reusable
measurement: image + CHM on a common grid, a spatial block split with a buffer, metrics on the test split.
A learned head evaluated with :func:`evaluate_split` on the same ``(pair, split)`` is directly comparable.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from dinov3geo.tasks.canopy.labels import ImageCHMPair, load_image_and_chm
from dinov3geo.tasks.canopy.metrics import DEFAULT_BINS, CanopyMetricAccumulator
from dinov3geo.tasks.canopy.splits import SpatialSplit, block_split
from dinov3geo.utils.atomic import atomic_path

__all__ = [
    "BaselineModel",
    "baseline_features",
    "evaluate_split",
    "fit_baseline",
    "load_baseline",
    "measure_baseline",
    "predict_baseline",
    "prepare_benchmark",
    "save_baseline",
]

_FORMAT = "dinov3geo.canopy.baseline/1"


@dataclass
class BaselineModel:
    """A fitted per-pixel baseline.

    Attributes:
        estimator: the fitted ``HistGradientBoostingRegressor``.
        feature_names: names of the feature columns.
        windows: local-statistics window sizes (pixels).
        rgb: 0-based indices of the red, green, blue bands (None: no RGB features).
        nir: 0-based index of a near-infrared band (None: no NDVI).
        n_bands: number of image bands the model expects.
        info: training provenance (pixels used, seed, parameters, fit time).
    """

    estimator: Any
    feature_names: list[str]
    windows: tuple[int, ...]
    rgb: tuple[int, int, int] | None
    nir: int | None
    n_bands: int
    info: dict[str, Any] = field(default_factory=dict)


def _local_mean(x: np.ndarray, w: np.ndarray, size: int) -> np.ndarray:
    num = ndimage.uniform_filter(x * w, size=size, mode="constant")
    den = ndimage.uniform_filter(w, size=size, mode="constant")
    return np.where(den > 1e-6, num / np.maximum(den, 1e-6), 0.0)


def baseline_features(
    image: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    windows: Sequence[int] = (3, 7, 15),
    rgb: tuple[int, int, int] | None = (0, 1, 2),
    nir: int | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Per-pixel features ``[H, W, F]`` (float32) and their names (see the module docstring).

    Args:
        image: ``[C, H, W]`` band values.
        valid: ``[H, W]`` pixels whose values may be used (None: all).
        windows: odd window sizes in pixels for the local statistics.
        rgb: band indices of red, green, blue (ignored if the image has fewer than 3 bands).
        nir: band index of near infrared, for NDVI.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 3:
        raise ValueError(f"image must be [bands, height, width], got shape {img.shape}")
    c, h, wd = img.shape
    w = np.ones((h, wd)) if valid is None else np.asarray(valid, dtype=np.float64)
    img = np.where(w[None] > 0, img, 0.0)
    feats: list[np.ndarray] = [img[i] for i in range(c)]
    names = [f"band{i + 1}" for i in range(c)]
    use_rgb = rgb is not None and c >= 3 and max(rgb) < c
    if use_rgb:
        r, g, b = (img[i] for i in rgb)  # type: ignore[union-attr]
        s = r + g + b
        safe = np.where(s > 0, s, 1.0)
        exg = np.where(s > 0, (2 * g - r - b) / safe, 0.0)
        bright = s / 3.0
        feats += [bright, exg]
        names += ["brightness", "exg"]
    else:
        bright = img.mean(axis=0)
        exg = None
        feats.append(bright)
        names.append("brightness")
    if nir is not None and rgb is not None and nir < c:
        red, n_ = img[rgb[0]], img[nir]
        den = red + n_
        feats.append(np.where(den > 0, (n_ - red) / np.where(den > 0, den, 1.0), 0.0))
        names.append("ndvi")
    for k in windows:
        if k < 1:
            raise ValueError(f"window sizes must be >= 1 pixel, got {k}")
        m = _local_mean(bright, w, k)
        m2 = _local_mean(bright * bright, w, k)
        feats += [m, np.sqrt(np.maximum(m2 - m * m, 0.0))]
        names += [f"bright_mean{k}", f"bright_std{k}"]
        if exg is not None:
            feats.append(_local_mean(exg, w, k))
            names.append(f"exg_mean{k}")
    filled = np.where(w > 0, bright, _local_mean(bright, w, max(windows) if windows else 3))
    grad = np.hypot(ndimage.sobel(filled, axis=0), ndimage.sobel(filled, axis=1))
    feats.append(grad)
    names.append("grad")
    if windows:
        feats.append(_local_mean(grad, w, max(windows)))
        names.append(f"grad_mean{max(windows)}")
    return np.stack(feats, axis=-1).astype(np.float32), names


def fit_baseline(
    image: np.ndarray,
    heights: np.ndarray,
    valid: np.ndarray,
    train_mask: np.ndarray,
    *,
    windows: Sequence[int] = (3, 7, 15),
    rgb: tuple[int, int, int] | None = (0, 1, 2),
    nir: int | None = None,
    max_samples: int = 200_000,
    seed: int = 0,
    **hgb_params: Any,
) -> BaselineModel:
    """Fit the gradient-boosting baseline on the pixels where ``valid & train_mask``.

    Args:
        image: ``[C, H, W]`` band values.
        heights: ``[H, W]`` reference heights (m).
        valid: ``[H, W]`` valid pixels (image and label).
        train_mask: ``[H, W]`` training area (e.g. ``SpatialSplit.mask("train")``).
        windows, rgb, nir: feature settings (see :func:`baseline_features`).
        max_samples: at most this many training pixels (seeded random sample).
        seed: seed of the sample and of the model.
        hgb_params: overrides of the ``HistGradientBoostingRegressor`` parameters (defaults: 300 iterations,
            learning rate 0.05, 31 leaves, 40 samples per leaf, L2 1.0, no early stopping).
    """
    from sklearn.ensemble import HistGradientBoostingRegressor

    heights = np.asarray(heights)
    sel = np.asarray(valid, bool) & np.asarray(train_mask, bool) & np.isfinite(heights)
    if heights.shape != sel.shape or np.asarray(image).shape[1:] != sel.shape:
        raise ValueError(
            f"image {np.asarray(image).shape}, heights {heights.shape}, valid and train_mask must share [H, W]"
        )
    n = int(sel.sum())
    if n < 50:
        raise ValueError(f"only {n} valid training pixels; need at least 50 (check the split and the valid mask)")
    t0 = time.perf_counter()
    feats, names = baseline_features(image, valid, windows=windows, rgb=rgb, nir=nir)
    X, y = feats[sel], heights[sel].astype(np.float64)
    rng = np.random.default_rng(seed)
    if n > max_samples:
        idx = rng.choice(n, size=max_samples, replace=False)
        X, y = X[idx], y[idx]
    params: dict[str, Any] = dict(
        max_iter=300, learning_rate=0.05, max_leaf_nodes=31, min_samples_leaf=40, l2_regularization=1.0,
        early_stopping=False, random_state=seed,
    )
    params.update(hgb_params)
    est = HistGradientBoostingRegressor(**params).fit(X, y)
    info = {"n_train_pixels": int(len(y)), "seed": seed, "params": {k: v for k, v in params.items()},
            "fit_seconds": time.perf_counter() - t0}
    return BaselineModel(est, names, tuple(int(k) for k in windows), rgb, nir, int(np.asarray(image).shape[0]), info)


def predict_baseline(model: BaselineModel, image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Predicted heights ``[H, W]`` float32 (m, clipped at 0); NaN where ``valid`` is False."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != model.n_bands:
        raise ValueError(f"the baseline was fitted on {model.n_bands} bands; got an image of shape {image.shape}")
    h, w = image.shape[1:]
    ok = np.ones((h, w), bool) if valid is None else np.asarray(valid, bool)
    feats, _ = baseline_features(image, ok, windows=model.windows, rgb=model.rgb, nir=model.nir)
    out = np.full((h, w), np.nan, dtype=np.float32)
    if ok.any():
        out[ok] = np.maximum(model.estimator.predict(feats[ok]), 0.0).astype(np.float32)
    return out


def save_baseline(model: BaselineModel, path: str | os.PathLike[str]) -> Path:
    """Store a fitted baseline with joblib (a **pickle**), atomically. Share such files only with yourself."""
    import joblib

    payload = {"format": _FORMAT, "model": model}
    with atomic_path(path) as tmp:
        joblib.dump(payload, tmp)
    return Path(path)


def load_baseline(path: str | os.PathLike[str], *, trusted: bool = False) -> BaselineModel:
    """Load a baseline written by :func:`save_baseline`.

    Args:
        path: the file.
        trusted: must be True: loading unpickles the file, which can run arbitrary code. Only load files you
            created yourself (or refit the baseline instead; it takes seconds).
    """
    if not trusted:
        raise ValueError(
            f"refusing to load {os.fspath(path)!r}: baseline files are pickles and unpickling can run code. "
            "Pass trusted=True only for a file you created yourself, or refit with fit_baseline()."
        )
    import joblib

    payload = joblib.load(path)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a dinov3geo canopy baseline file (format {_FORMAT})")
    return payload["model"]


# ---------------------------------------------------------------------- benchmark measurement
def prepare_benchmark(
    image: Any,
    chm: Any,
    *,
    res: float | None = 0.5,
    block: int = 64,
    buffer: int = 16,
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
    bands: Sequence[str | int] | None = None,
) -> tuple[ImageCHMPair, SpatialSplit]:
    """Image + CHM on a common grid (``res`` in image-CRS units, None: the image grid) and a block split.

    ``block`` and ``buffer`` are in pixels of the common grid; ``fractions`` defaults to 2/3 train, 1/3 test.
    """
    pair = load_image_and_chm(image, chm, target_res=res, bands=bands)
    split = block_split(pair.grid.shape, block=block, fractions=fractions, buffer=buffer, seed=seed)
    return pair, split


def evaluate_split(
    pred: np.ndarray,
    pair: ImageCHMPair,
    split: SpatialSplit,
    name: str = "test",
    *,
    bins: Sequence[float] = DEFAULT_BINS,
    block: int = 20,
    border: int = 0,
    cover_thresholds: Sequence[float] = (2, 5),
) -> dict[str, Any]:
    """Metrics of ``pred`` ``[H, W]`` on split ``name`` of ``pair`` (the whole grid is one tile).

    Block metrics use ``block x block`` pixel blocks (starting ``border`` pixels from the top-left) lying
    fully inside the split's valid area; the default 20 px differs from Tolan et al.'s 50 px because the
    sample sites are small (say which you report).
    """
    pred = np.asarray(pred)
    if pred.shape != pair.grid.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the benchmark grid {pair.grid.shape}")
    acc = CanopyMetricAccumulator(bins=bins, block=block, border=border, cover_thresholds=cover_thresholds)
    acc.update(pred, pair.heights, pair.valid & split.mask(name))
    return acc.compute()


def measure_baseline(
    image: Any,
    chm: Any,
    *,
    res: float | None = 0.5,
    block: int = 64,
    buffer: int = 16,
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
    metric_block: int = 20,
    windows: Sequence[int] = (3, 7, 15),
    **hgb_params: Any,
) -> dict[str, Any]:
    """Fit the baseline on the train blocks of an image/CHM pair and measure it on the test blocks.

    Returns:
        ``{"test": metrics, "train": metrics, "test_block50": metrics with Tolan's 50 px / 3 px blocks,
        "data": pair.info, "split": {...}, "baseline": model.info}`` (JSON-serialisable).
    """
    pair, split = prepare_benchmark(image, chm, res=res, block=block, buffer=buffer, fractions=fractions, seed=seed)
    names = split.names
    train_name = "train" if "train" in names else names[0]
    test_name = "test" if "test" in names else names[-1]
    model = fit_baseline(
        pair.image, pair.heights, pair.valid, split.mask(train_name), windows=windows, seed=seed, **hgb_params
    )
    pred = predict_baseline(model, pair.image, pair.valid)
    counts = {n: int((split.mask(n) & pair.valid).sum()) for n in names}
    return {
        "test": evaluate_split(pred, pair, split, test_name, block=metric_block),
        "train": evaluate_split(pred, pair, split, train_name, block=metric_block),
        "test_block50": evaluate_split(pred, pair, split, test_name, block=50, border=3),
        "data": pair.info,
        "split": {"block": split.block, "buffer": split.buffer, "seed": split.seed, "names": list(names),
                  "valid_pixels": counts, "assignment": split.assignment.tolist()},
        "baseline": {"features": model.feature_names, **model.info},
    }
