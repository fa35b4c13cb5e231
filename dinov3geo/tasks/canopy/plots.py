"""Canopy-height evaluation figures (matplotlib, Agg backend), written atomically as PNG.

* :func:`plot_pred_vs_true`: 2-D histogram of (true, predicted) heights with a logarithmic colour scale, the
  1:1 line and the headline metrics in the title. It takes the histogram accumulated by
  :class:`~dinov3geo.tasks.canopy.metrics.CanopyMetricAccumulator`, so a whole region is plotted without
  holding its pixels.
* :func:`plot_error_by_bin`: MAE and bias per true-height bin, with the pixel count of each bin.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dinov3geo.utils.atomic import atomic_path

__all__ = ["plot_error_by_bin", "plot_pred_vs_true"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def _save(fig: Any, path: str | os.PathLike[str], dpi: int) -> Path:
    plt = _plt()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def plot_pred_vs_true(
    hist2d: np.ndarray,
    edges: np.ndarray,
    metrics: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    title: str = "Canopy height",
    dpi: int = 120,
) -> Path:
    """Density plot of predicted vs true height.

    Args:
        hist2d: ``[n_true_cells, n_pred_cells]`` pixel counts (``CanopyMetricAccumulator.hist2d``).
        edges: the cell edges in metres (``CanopyMetricAccumulator.hist_edges``), same for both axes.
        metrics: output of ``CanopyMetricAccumulator.compute`` (for the title).
        path: output ``.png`` (replaced atomically).
        title: first line of the title.
        dpi: resolution.
    """
    from matplotlib.colors import LogNorm

    plt = _plt()
    hist = np.asarray(hist2d, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5.6, 5))
    lim = float(edges[-1])
    if hist.sum() > 0:
        masked = np.ma.masked_equal(hist.T, 0)  # rows = predicted cells for pcolormesh(x=true, y=pred)
        mesh = ax.pcolormesh(edges, edges, masked, norm=LogNorm(vmin=1, vmax=max(hist.max(), 1)), cmap="viridis")
        fig.colorbar(mesh, ax=ax, label="pixels")
        nz_t = np.flatnonzero(hist.sum(axis=1))
        nz_p = np.flatnonzero(hist.sum(axis=0))
        lim = float(edges[min(max(nz_t.max(), nz_p.max()) + 2, len(edges) - 1)])
    ax.plot([0, lim], [0, lim], color="crimson", lw=1, label="1:1")
    ax.set_xlim(0, lim)
    ax.set_ylim(0, lim)
    ax.set_aspect("equal")
    ax.set_xlabel("reference height (m)")
    ax.set_ylabel("predicted height (m)")
    ax.legend(loc="upper left")
    ax.set_title(
        f"{title}\nMAE {_fmt(metrics.get('mae'))} m, RMSE {_fmt(metrics.get('rmse'))} m, "
        f"bias {_fmt(metrics.get('bias'), '+.2f')} m\nR² {_fmt(metrics.get('r2'))}, "
        f"block R² {_fmt(metrics.get('block_r2'))}, n = {metrics.get('n', 0):,}",
        fontsize=9,
    )
    return _save(fig, path, dpi)


def plot_error_by_bin(
    metrics: dict[str, Any], path: str | os.PathLike[str], *, title: str = "Error by reference height", dpi: int = 120
) -> Path:
    """Bar chart of MAE and bias per true-height bin (``metrics["bins"]``), pixel counts above the bars."""
    plt = _plt()
    bins = metrics.get("bins") or []
    labels = [b["bin"] for b in bins]
    mae = np.asarray([np.nan if b["mae"] is None else b["mae"] for b in bins], dtype=float)
    bias = np.asarray([np.nan if b["bias"] is None else b["bias"] for b in bins], dtype=float)
    counts = [int(b["n"]) for b in bins]
    x = np.arange(len(bins))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(bins) + 2), 4))
    ax.bar(x - 0.2, np.nan_to_num(mae), width=0.4, label="MAE", color="tab:blue")
    ax.bar(x + 0.2, np.nan_to_num(bias), width=0.4, label="bias (pred - ref)", color="tab:orange")
    ax.axhline(0, color="black", lw=0.8)
    vals = np.concatenate([mae, np.abs(bias)])
    top = float(np.nanmax(vals)) if np.isfinite(vals).any() else 0.0
    top = max(top, 0.1)  # keep a readable scale (and the count labels inside) for near-perfect predictions
    low = float(np.nanmin(bias)) if np.isfinite(bias).any() else 0.0
    ax.set_ylim(min(0.0, low) - 0.05 * top, 1.15 * top)
    for xi, n, m in zip(x, counts, mae, strict=True):
        ax.text(xi, (0 if np.isnan(m) else m) + 0.03 * top, f"n={n:,}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_xlabel("reference height bin (m)")
    ax.set_ylabel("metres")
    ax.legend()
    ax.set_title(f"{title} (overall MAE {_fmt(metrics.get('mae'))} m)", fontsize=9)
    return _save(fig, path, dpi)
