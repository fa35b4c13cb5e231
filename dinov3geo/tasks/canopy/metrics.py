"""Canopy-height metrics as the literature reports them, streamed window by window.

What is computed (all on pixels that are valid in the label, finite in the label and finite in the prediction;
zero-height pixels are **included**: unlike depth metrics that mask ``gt > 0``, bare ground matters for bias and
tree cover):

* ``mae`` = mean |pred - true|; ``rmse`` = sqrt(mean (pred - true)^2); ``bias`` = mean (pred - true) (Tolan et
  al.'s "Bias", Open-Canopy's "ME"); ``std_error`` = standard deviation of (pred - true).
* ``r2`` = 1 - SSE / SST, pooled over every pixel seen (SST around the pooled mean of the true heights), as
  ``torchmetrics.R2Score`` in Tolan et al. 2024 (``inference.py::evaluate``).
* ``nmae`` = MAE / mean true height (a ratio of means, so undefined when the mean true height is 0);
  ``nmae_open_canopy`` = mean(|pred - true| / (1 + true)) as in Open-Canopy's ``compute_metrics.py``.
* ``block_r2`` (Tolan et al. 2024): each update is one *tile*; its first ``border`` rows and columns are
  dropped (``chm[..., 3:, 3:]`` in the reference code), the rest is cut into full ``block x block`` blocks
  starting there (``AvgPool2d(50)``, incomplete blocks at the right/bottom are dropped: for a 256 px tile that
  leaves 5 x 5 blocks and a 3 px border on every side). A block counts only when all its pixels are valid.
  Block means of prediction and truth from every tile are pooled and ``block_r2`` is their R² (also
  ``block_mae``, ``block_rmse``, ``n_blocks``). Block R² therefore depends on the tiling: evaluate on the
  tiles the model was run on (e.g. 256 px windows).
* per height bin, **by true height**: bins ``[e0, e1), [e1, e2), ..., [e_last, inf)`` from ``bins`` (default
  ``[0,2), [2,5), [5,10), [10,15), [15,20), [20,30), [30,60), [60, inf)``); a true height on an edge falls in the
  bin that starts there; a (rare, unclipped) negative height falls in the first bin. Each bin has ``n``,
  ``share``, ``mae``, ``rmse``, ``bias``, ``r2`` (R² within the bin: SST of the bin's own true heights, so it
  is small or negative for narrow bins), ``nmae``, ``mean_true``, ``mean_pred``.
* tree cover at each threshold ``t`` in ``cover_thresholds`` (default 2 m and 5 m): a pixel is tree when
  height >= ``t``; ``iou`` = |pred tree & true tree| / |pred tree or true tree|, with ``precision``,
  ``recall``, ``f1``, ``true_cover`` and ``pred_cover`` (shares of valid pixels).

Metrics that are undefined (no pixels, zero variance, no blocks) are ``None`` in the output, which is plain
JSON (floats, ints, lists, dicts). Sums are kept in float64 and variances merged with Chan et al.'s parallel
formula, so evaluating a region window by window gives the same numbers as one call on the whole array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["DEFAULT_BINS", "CanopyMetricAccumulator", "canopy_metrics", "bin_labels"]

#: Height-bin edges (m) of Open-Canopy's per-bin metrics; a last open bin [60, inf) is added.
DEFAULT_BINS: tuple[float, ...] = (0, 2, 5, 10, 15, 20, 30, 60)


def bin_labels(bins: Sequence[float]) -> list[str]:
    """Human-readable labels ``"[0, 2)"`` ... ``"[60, inf)"`` for the bins defined by ``bins`` edges."""
    edges = [float(b) for b in bins]
    out = [f"[{edges[i]:g}, {edges[i + 1]:g})" for i in range(len(edges) - 1)]
    out.append(f"[{edges[-1]:g}, inf)")
    return out


class _Moments:
    """Streaming first/second moments of (pred, true, error) for one group of pixels (float64)."""

    __slots__ = ("n", "sum_abs", "sum_err", "sum_sq", "sum_rel", "sum_pred", "mean_true", "m2_true")

    def __init__(self) -> None:
        self.n = 0
        self.sum_abs = 0.0
        self.sum_err = 0.0
        self.sum_sq = 0.0
        self.sum_rel = 0.0
        self.sum_pred = 0.0
        self.mean_true = 0.0
        self.m2_true = 0.0

    def update(self, pred: np.ndarray, true: np.ndarray) -> None:
        n = int(true.size)
        if n == 0:
            return
        p = pred.astype(np.float64, copy=False)
        t = true.astype(np.float64, copy=False)
        err = p - t
        self.sum_abs += float(np.abs(err).sum())
        self.sum_err += float(err.sum())
        self.sum_sq += float(np.square(err).sum())
        self.sum_rel += float((np.abs(err) / (1.0 + np.abs(t))).sum())
        self.sum_pred += float(p.sum())
        mean_b = float(t.mean())
        m2_b = float(np.square(t - mean_b).sum())
        n_a = self.n
        tot = n_a + n
        delta = mean_b - self.mean_true
        self.mean_true += delta * n / tot
        self.m2_true += m2_b + delta * delta * n_a * n / tot
        self.n = tot

    def result(self) -> dict[str, Any]:
        n = self.n
        if n == 0:
            keys = ("mae", "rmse", "bias", "std_error", "r2", "nmae", "nmae_open_canopy", "mean_true", "mean_pred")
            return {"n": 0, **dict.fromkeys(keys)}
        mae = self.sum_abs / n
        bias = self.sum_err / n
        mse = self.sum_sq / n
        return {
            "n": n,
            "mae": mae,
            "rmse": math.sqrt(mse),
            "bias": bias,
            "std_error": math.sqrt(max(mse - bias * bias, 0.0)),
            "r2": (1.0 - self.sum_sq / self.m2_true) if self.m2_true > 0 else None,
            "nmae": (mae / self.mean_true) if self.mean_true > 0 else None,
            "nmae_open_canopy": self.sum_rel / n,
            "mean_true": self.mean_true,
            "mean_pred": self.sum_pred / n,
        }


class CanopyMetricAccumulator:
    """Accumulate canopy-height metrics over many tiles/windows; :meth:`compute` gives the pooled result.

    Each :meth:`update` call is one tile (this matters only for the block R², see the module docstring).
    See the module docstring for every metric's definition.

    Args:
        bins: height-bin edges in metres (increasing); metrics are also given per bin of the true height.
        block: block side in pixels for the block R² (Tolan et al.: 50).
        border: rows/columns dropped at the top and left of each tile before cutting blocks (Tolan et al.: 3).
        cover_thresholds: heights (m) defining tree cover for the IoU.
        hist_max: upper height (m) of the 2-D (true, pred) histogram kept for density plots; larger values land
            in the last cell. ``hist_bins`` cells per axis.
    """

    def __init__(
        self,
        *,
        bins: Sequence[float] = DEFAULT_BINS,
        block: int = 50,
        border: int = 3,
        cover_thresholds: Sequence[float] = (2, 5),
        hist_max: float = 60.0,
        hist_bins: int = 120,
    ) -> None:
        edges = np.asarray([float(b) for b in bins], dtype=np.float64)
        if edges.ndim != 1 or edges.size < 1 or np.any(np.diff(edges) <= 0) or not np.all(np.isfinite(edges)):
            raise ValueError(f"bins must be finite, strictly increasing height edges (m), got {list(bins)}")
        if block < 1 or border < 0:
            raise ValueError(f"block must be >= 1 and border >= 0, got block={block}, border={border}")
        if hist_max <= 0 or hist_bins < 1:
            raise ValueError(f"hist_max must be > 0 and hist_bins >= 1, got {hist_max}, {hist_bins}")
        self.bins = edges
        self.block = int(block)
        self.border = int(border)
        self.cover_thresholds = tuple(float(t) for t in cover_thresholds)
        self.hist_edges = np.linspace(0.0, float(hist_max), int(hist_bins) + 1)
        self.hist2d = np.zeros((int(hist_bins), int(hist_bins)), dtype=np.int64)  # [true cell, pred cell]
        self._all = _Moments()
        self._bins = [_Moments() for _ in range(edges.size)]
        self._blocks = _Moments()
        self._cover = {t: np.zeros(3, dtype=np.int64) for t in self.cover_thresholds}  # both, pred only, true only
        self._n_cover_pred = {t: 0 for t in self.cover_thresholds}
        self._n_cover_true = {t: 0 for t in self.cover_thresholds}
        self.n_tiles = 0
        self.n_label_valid = 0
        self.n_pred_missing = 0

    # ------------------------------------------------------------------ updating
    def update(self, pred: np.ndarray, true: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add one tile: ``pred`` and ``true`` heights (m) and the label's ``valid`` mask, all ``[H, W]``.

        Pixels count where ``valid`` is True and both heights are finite. A non-finite prediction where the
        label is valid is counted in ``n_pred_missing`` (a model that leaves holes should be visible).
        """
        pred = np.asarray(pred)
        true = np.asarray(true)
        if pred.shape != true.shape or pred.ndim != 2:
            raise ValueError(f"pred and true must be 2-D arrays of one shape, got {pred.shape} and {true.shape}")
        label_ok = np.isfinite(true)
        if valid is not None:
            valid = np.asarray(valid, dtype=bool)
            if valid.shape != true.shape:
                raise ValueError(f"valid mask has shape {valid.shape}, expected {true.shape}")
            label_ok &= valid
        ok = label_ok & np.isfinite(pred)
        self.n_tiles += 1
        self.n_label_valid += int(label_ok.sum())
        self.n_pred_missing += int((label_ok & ~ok).sum())
        p, t = pred[ok], true[ok]
        self._all.update(p, t)
        if t.size:
            idx = np.clip(np.searchsorted(self.bins, t, side="right") - 1, 0, self.bins.size - 1)
            for b in np.unique(idx):
                sel = idx == b
                self._bins[int(b)].update(p[sel], t[sel])
            for thr in self.cover_thresholds:
                pt, tt = p >= thr, t >= thr
                self._cover[thr] += (int((pt & tt).sum()), int((pt & ~tt).sum()), int((~pt & tt).sum()))
                self._n_cover_pred[thr] += int(pt.sum())
                self._n_cover_true[thr] += int(tt.sum())
            hb = self.hist_edges.size - 1
            ti = np.clip(np.searchsorted(self.hist_edges, t, side="right") - 1, 0, hb - 1)
            pi = np.clip(np.searchsorted(self.hist_edges, p, side="right") - 1, 0, hb - 1)
            self.hist2d += np.bincount(ti * hb + pi, minlength=hb * hb).reshape(hb, hb)
        self._update_blocks(pred, true, ok)

    def _update_blocks(self, pred: np.ndarray, true: np.ndarray, ok: np.ndarray) -> None:
        b, bd = self.block, self.border
        h, w = true.shape
        ny, nx = (h - bd) // b, (w - bd) // b
        if ny <= 0 or nx <= 0:
            return
        sl = (slice(bd, bd + ny * b), slice(bd, bd + nx * b))
        okb = ok[sl].reshape(ny, b, nx, b)
        full = okb.all(axis=(1, 3))
        if not full.any():
            return
        pb = np.where(ok, pred, 0).astype(np.float64)[sl].reshape(ny, b, nx, b).mean(axis=(1, 3))
        tb = np.where(ok, true, 0).astype(np.float64)[sl].reshape(ny, b, nx, b).mean(axis=(1, 3))
        self._blocks.update(pb[full], tb[full])

    def merge(self, other: CanopyMetricAccumulator) -> None:
        """Add another accumulator's pixels (same settings), e.g. from a parallel worker."""
        if (
            not np.array_equal(self.bins, other.bins)
            or (self.block, self.border) != (other.block, other.border)
            or self.cover_thresholds != other.cover_thresholds
            or not np.array_equal(self.hist_edges, other.hist_edges)
        ):
            raise ValueError("cannot merge canopy metric accumulators with different settings")
        for mine, theirs in [(self._all, other._all), (self._blocks, other._blocks), *zip(self._bins, other._bins, strict=True)]:
            _merge_moments(mine, theirs)
        for t in self.cover_thresholds:
            self._cover[t] += other._cover[t]
            self._n_cover_pred[t] += other._n_cover_pred[t]
            self._n_cover_true[t] += other._n_cover_true[t]
        self.hist2d += other.hist2d
        self.n_tiles += other.n_tiles
        self.n_label_valid += other.n_label_valid
        self.n_pred_missing += other.n_pred_missing

    # ------------------------------------------------------------------ results
    def compute(self) -> dict[str, Any]:
        """All metrics as a JSON-serialisable dict (undefined values are None)."""
        out: dict[str, Any] = self._all.result()
        blk = self._blocks.result()
        out.update(
            block_r2=blk["r2"], block_mae=blk["mae"], block_rmse=blk["rmse"], n_blocks=blk["n"],
            n_tiles=self.n_tiles, n_label_valid=self.n_label_valid, n_pred_missing=self.n_pred_missing,
        )
        n = out["n"]
        labels = bin_labels(self.bins.tolist())
        bins_out = []
        for i, m in enumerate(self._bins):
            r = m.result()
            lo = float(self.bins[i])
            hi = float(self.bins[i + 1]) if i + 1 < self.bins.size else None
            bins_out.append({"bin": labels[i], "lo": lo, "hi": hi, "share": (r["n"] / n) if n else None, **r})
        out["bins"] = bins_out
        cover: dict[str, Any] = {}
        for t in self.cover_thresholds:
            both, p_only, t_only = (int(v) for v in self._cover[t])
            union = both + p_only + t_only
            prec = both / (both + p_only) if both + p_only else None
            rec = both / (both + t_only) if both + t_only else None
            cover[f"{t:g}"] = {
                "threshold_m": t,
                "iou": both / union if union else None,
                "precision": prec,
                "recall": rec,
                "f1": (2 * both / (2 * both + p_only + t_only)) if union else None,
                "true_cover": self._n_cover_true[t] / n if n else None,
                "pred_cover": self._n_cover_pred[t] / n if n else None,
            }
        out["cover"] = cover
        out["settings"] = {
            "bins": self.bins.tolist(),
            "block": self.block,
            "border": self.border,
            "cover_thresholds": list(self.cover_thresholds),
        }
        return out


def _merge_moments(a: _Moments, b: _Moments) -> None:
    if b.n == 0:
        return
    tot = a.n + b.n
    delta = b.mean_true - a.mean_true
    a.m2_true += b.m2_true + delta * delta * a.n * b.n / tot
    a.mean_true += delta * b.n / tot
    a.n = tot
    for k in ("sum_abs", "sum_err", "sum_sq", "sum_rel", "sum_pred"):
        setattr(a, k, getattr(a, k) + getattr(b, k))


def canopy_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    bins: Sequence[float] = DEFAULT_BINS,
    block: int = 50,
    border: int = 3,
    cover_thresholds: Sequence[float] = (2, 5),
) -> dict[str, Any]:
    """Canopy-height metrics of one tile ``[H, W]`` or a stack of tiles ``[N, H, W]`` (see module docstring).

    Args:
        pred: predicted heights (m).
        true: reference heights (m), e.g. a lidar CHM aligned with :mod:`dinov3geo.tasks.canopy.labels`.
        valid: label valid mask of the same shape (None: every finite label pixel is valid).
        bins, block, border, cover_thresholds: see :class:`CanopyMetricAccumulator`.

    Returns:
        a JSON-serialisable dict: ``n, mae, rmse, bias, std_error, r2, nmae, nmae_open_canopy, mean_true,
        mean_pred, block_r2, block_mae, block_rmse, n_blocks, bins[...], cover{...}, settings``.
    """
    pred = np.asarray(pred)
    true = np.asarray(true)
    if pred.shape != true.shape or pred.ndim not in (2, 3):
        raise ValueError(f"pred and true must both be [H, W] or [N, H, W], got {pred.shape} and {true.shape}")
    acc = CanopyMetricAccumulator(bins=bins, block=block, border=border, cover_thresholds=cover_thresholds)
    if pred.ndim == 2:
        acc.update(pred, true, valid)
    else:
        for i in range(pred.shape[0]):
            acc.update(pred[i], true[i], None if valid is None else np.asarray(valid)[i])
    return acc.compute()
