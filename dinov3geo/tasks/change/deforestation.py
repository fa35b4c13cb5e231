"""Forest loss: forest at date 1 that lost its canopy by date 2, with a minimum mapping unit.

Rules (after the operational products in the reference notes: Hansen/GFW "tree cover" = vegetation taller
than 5 m, RADD's 0.1 ha MMU):

* **forest at date 1**: canopy height ``>= min_height`` (5 m by default) from a canopy-height raster, or a
  user forest mask (non-zero = forest); with both, a pixel must satisfy both;
* **loss by date 2**: forest at date 1 AND the evidence that is available:

  - a canopy-height drop ``height_before - height_after >= drop_threshold`` (5 m by default) when the heights
    of both dates are known,
  - a change probability ``>= prob_threshold`` when a probability is given;

  with both kinds of evidence they are combined with ``combine="and"`` (default: both must agree, fewer false
  alarms from noisy modelled heights) or ``"or"``;
* regions smaller than the MMU (0.1 ha by default; 4- or 8-connected) are removed.

Invalid pixels (nodata, clouds, outside the AOI) are never loss.

:func:`forest_loss` works on in-memory arrays (the reference). The rules are per pixel except the MMU, so
:func:`~dinov3geo.tasks.change.detect.detect_change` applies them tile by tile (``mmu_ha=0``, inputs read with
:class:`GridReader`) and the MMU over whole regions with :mod:`~dinov3geo.tasks.change.windowed`: the same
loss map, bit for bit, with memory bounded by the tile.

Without a canopy-height model (e.g. Landsat imagery), :func:`ndvi_forest_mask` makes the date-1 forest mask
from the red and near-infrared bands: ``NDVI = (nir - red) / (nir + red) >= threshold``.

:func:`forestgapr_loss_labels` derives reference labels from the ForestGapR Cauaxi airborne-LiDAR CHMs
(2012, 2014): canopy loss = 2012 height >= 5 m AND (height drop >= 5 m OR 2014 height < 2 m, i.e. a new gap).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window

from dinov3geo.io import GridSpec, open_scene
from dinov3geo.tasks.change.polygons import remove_small_regions

__all__ = ["ForestLoss", "GridReader", "NDVIForest", "forest_loss", "forest_mask", "forestgapr_loss_labels",
           "ndvi", "ndvi_forest_mask", "read_on_grid"]


@dataclass
class ForestLoss:
    """Output of :func:`forest_loss`.

    Attributes:
        forest: ``[H, W]`` bool forest at date 1 (valid pixels only).
        loss: ``[H, W]`` bool loss after the MMU filter.
        loss_raw: loss before the MMU filter.
        valid: ``[H, W]`` bool pixels where the decision could be made.
        evidence: which evidence was used (``"height"``, ``"prob"``, ``"height+prob"``/``"height|prob"``).
    """

    forest: np.ndarray
    loss: np.ndarray
    loss_raw: np.ndarray
    valid: np.ndarray
    evidence: str


def forest_mask(
    height: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    *,
    min_height: float = 5.0,
) -> np.ndarray:
    """Forest at date 1: ``height >= min_height`` and/or a user mask (non-zero, finite = forest)."""
    if height is None and mask is None:
        raise ValueError("forest needs a canopy-height raster (height) or a forest mask (mask)")
    out = None
    if height is not None:
        h = np.asarray(height, dtype=np.float32)
        out = np.isfinite(h) & (h >= min_height)
    if mask is not None:
        m = np.asarray(mask)
        fm = (np.isfinite(m) if np.issubdtype(m.dtype, np.floating) else np.ones(m.shape, bool)) & (m != 0)
        out = fm if out is None else out & fm
    assert out is not None
    return out


def forest_loss(
    *,
    height_before: np.ndarray | None = None,
    height_after: np.ndarray | None = None,
    forest: np.ndarray | None = None,
    prob: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    min_height: float = 5.0,
    drop_threshold: float = 5.0,
    prob_threshold: float | None = None,
    combine: str = "and",
    grid: GridSpec | None = None,
    mmu_ha: float = 0.1,
    connectivity: int = 8,
) -> ForestLoss:
    """Forest loss between two dates (see the module docstring).

    Args:
        height_before, height_after: canopy heights (m) on one grid; NaN = unknown.
        forest: a user forest mask for date 1 (non-zero = forest).
        prob: change probability; used with ``prob_threshold``.
        valid: pixels usable at all (both dates valid, cloud-free, inside the AOI).
        min_height: forest height threshold (m).
        drop_threshold: height drop that counts as loss (m).
        prob_threshold: probability threshold (required when ``prob`` is given).
        combine: ``"and"`` or ``"or"`` when both a height drop and a probability are available.
        grid: the grid (needed for the MMU in hectares).
        mmu_ha: minimum mapping unit (0: none).
        connectivity: 4 or 8 for the MMU regions.
    """
    if combine not in ("and", "or"):
        raise ValueError(f"combine must be 'and' or 'or', got {combine!r}")
    fst = forest_mask(height_before, forest, min_height=min_height)
    ok = np.ones(fst.shape, bool) if valid is None else np.asarray(valid, bool).copy()
    if height_before is not None:
        ok &= np.isfinite(np.asarray(height_before, np.float32))
    evid: list[str] = []
    parts: list[np.ndarray] = []
    if height_before is not None and height_after is not None:
        hb, ha = np.asarray(height_before, np.float32), np.asarray(height_after, np.float32)
        ok &= np.isfinite(ha)
        parts.append((hb - ha) >= drop_threshold)
        evid.append("height")
    if prob is not None:
        if prob_threshold is None:
            raise ValueError("prob is given but prob_threshold is not; pass the change threshold")
        p = np.asarray(prob, np.float32)
        ok &= np.isfinite(p)
        parts.append(p >= prob_threshold)
        evid.append("prob")
    if not parts:
        raise ValueError("forest loss needs evidence of loss: canopy heights of both dates (height_before and "
                         "height_after) and/or a change probability (prob with prob_threshold)")
    ev = parts[0]
    for p in parts[1:]:
        ev = (ev & p) if combine == "and" else (ev | p)
    fst &= ok
    raw = fst & ev
    if mmu_ha > 0:
        if grid is None:
            raise ValueError("the MMU needs the grid (pixel areas); pass grid=... or mmu_ha=0")
        loss = remove_small_regions(raw, grid, mmu_ha, connectivity)
    else:
        loss = raw.copy()
    sep = "+" if combine == "and" else "|"
    return ForestLoss(fst, loss, raw, ok, sep.join(evid))


def ndvi(red: np.ndarray, nir: np.ndarray) -> np.ndarray:
    """``(nir - red) / (nir + red)`` as float32; NaN where either band is NaN or ``nir + red == 0``."""
    r, n = np.asarray(red, np.float32), np.asarray(nir, np.float32)
    den = n + r
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den != 0, (n - r) / den, np.nan).astype(np.float32)
    return out


@dataclass
class NDVIForest:
    """Output of :func:`ndvi_forest_mask`.

    Attributes:
        forest: ``[H, W]`` bool, NDVI >= threshold on valid pixels.
        valid: ``[H, W]`` bool, both bands valid (not nodata) and NDVI defined.
        ndvi: ``[H, W]`` float32 NDVI, NaN where invalid.
        grid: the image grid.
        threshold: the NDVI threshold used.
        path: the written mask COG (uint8: 1 forest, 0 not forest, 255 nodata) or None.

    ``forest``, ``valid`` and ``ndvi`` are None when the mask was made window by window into a file without
    keeping the arrays (``keep_arrays``): a region's mask never has to fit in memory.
    """

    forest: np.ndarray | None
    valid: np.ndarray | None
    ndvi: np.ndarray | None
    grid: GridSpec
    threshold: float
    path: Path | None = None
    n_valid: int = -1  #: valid pixels (counted window by window when the arrays are not kept)
    n_forest: int = -1  #: forest pixels

    @property
    def forest_fraction(self) -> float:
        """Share of the valid pixels that are forest (NaN when none is valid)."""
        n = int(self.valid.sum()) if self.valid is not None else self.n_valid
        f = int(self.forest.sum()) if self.forest is not None else self.n_forest
        return float(f / n) if n > 0 else float("nan")


def ndvi_forest_mask(
    image: Any,
    out: str | os.PathLike[str] | None = None,
    *,
    threshold: float = 0.6,
    red: str | int = "red",
    nir: str | int = "nir",
    band_names: Sequence[str] | None = None,
    nodata: float | None = None,
    assume_crs: Any = None,
    keep_arrays: bool | None = None,
    window: int = 2048,
) -> NDVIForest:
    """Date-1 forest mask from the red and near-infrared bands of an image: ``NDVI >= threshold``.

    For imagery without a canopy-height model (Landsat, Sentinel-2); the mask goes to
    :func:`~dinov3geo.tasks.change.detect.detect_change` as ``forest_mask``. The threshold depends on the
    data: about 0.6-0.7 for surface reflectance of closed tropical forest; stretched 8-bit visualisation
    composites (e.g. the bundled Pucallpa Landsat composites) saturate NDVI and need a higher one (~0.78
    there, chosen from the NDVI histogram, whose intact-forest mode lies at 0.80-0.86).

    Args:
        image: a raster file, band folder or STAC item (anything :func:`dinov3geo.io.open_scene` opens).
        out: optional output COG (uint8: 1 = forest, 0 = not forest, 255 = nodata), written atomically.
        threshold: NDVI threshold (forest when ``NDVI >= threshold``), in ``[-1, 1]``.
        red, nir: the red and NIR bands (names or aliases such as ``B04``/``B08``, or 1-based positions).
        band_names: names of the bands of a multi-band file without band descriptions
            (e.g. ``["swir16", "nir", "red", "green"]``).
        nodata: nodata override for files that declare none or a wrong one.
        assume_crs: CRS for files without one.
        keep_arrays: return the ``forest`` / ``valid`` / ``ndvi`` arrays. Default: only when no ``out`` is
            given or the grid has at most 25 million pixels. Without them, the image is read and the mask
            written ``window x window`` pixels at a time (memory bounded by the window, not the region).
        window: side of those windows in pixels.

    Raises:
        ValueError: the threshold is outside ``[-1, 1]``, or a band is missing (the message lists the bands).
    """
    if not -1.0 <= float(threshold) <= 1.0:
        raise ValueError(f"NDVI threshold must lie in [-1, 1], got {threshold}")
    scene = open_scene(image, band_names=band_names, nodata=nodata, crs=assume_crs)
    try:
        sel = open_scene(image, bands=[red, nir], band_names=band_names, nodata=nodata, crs=assume_crs)
    except Exception as e:  # noqa: BLE001 - re-raised naming the bands there are
        raise ValueError(f"{image}: cannot find the red band {red!r} and the NIR band {nir!r} (bands: "
                         f"{list(scene.band_names)}; {e}); pass red=/nir= (band names or 1-based indices), or "
                         "band_names=[...] for a file without band names") from e
    g = scene.grid
    if keep_arrays is None:
        keep_arrays = out is None or g.width * g.height <= 25_000_000
    if out is None and not keep_arrays:
        raise ValueError("keep_arrays=False needs an output file (out=...)")
    tags = {"dinov3geo_task": "forest_mask", "rule": f"NDVI >= {threshold:g}",
            "source": os.fspath(image) if isinstance(image, str | os.PathLike) else ""}

    def classify(win: Window | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        chip = sel.read(window=win, fill=0) if win is not None else sel.read(fill=0)
        v = np.asarray(chip.valid, bool)
        nd = ndvi(chip.data[0].astype(np.float32), chip.data[1].astype(np.float32))
        v &= np.isfinite(nd)
        nd[~v] = np.nan
        return v & (nd >= threshold), v, nd

    if keep_arrays:
        forest, v, nd = classify(None)
        path = None
        if out is not None:
            from dinov3geo.io.cog import write_cog

            arr = np.full(forest.shape, 255, np.uint8)
            arr[v] = forest[v]
            path = write_cog(out, arr, g, nodata=255, band_names=["forest"], overview_resampling="nearest",
                             tags=tags)
        return NDVIForest(forest, v, nd, g, float(threshold), path, int(v.sum()), int(forest.sum()))
    from dinov3geo.io.cog import COGWriter

    n_valid = n_forest = 0
    with COGWriter(out, g, 1, "uint8", nodata=255, band_names=["forest"], overview_resampling="nearest",
                   tags=tags) as wr:
        for r0 in range(0, g.height, window):
            for c0 in range(0, g.width, window):
                win = Window(c0, r0, min(window, g.width - c0), min(window, g.height - r0))
                forest, v, _ = classify(win)
                arr = np.full(forest.shape, 255, np.uint8)
                arr[v] = forest[v]
                wr.write(arr[None], win)
                n_valid += int(v.sum())
                n_forest += int(forest.sum())
    return NDVIForest(None, None, None, g, float(threshold), Path(out), n_valid, n_forest)


class GridReader:
    """One band of a raster (canopy height, forest mask...) read window by window on ``grid``.

    Use as a context manager; :meth:`read` gives float32 values, NaN where invalid. The file stays open
    between windows, so reading a whole grid tile by tile costs one open (see :func:`read_on_grid`).

    Args:
        path: raster file (or anything :func:`dinov3geo.io.open_scene` opens), any grid/CRS.
        grid: the grid to read on (reprojected/resampled on read when the file is on another grid).
        resampling: resampling method (``"bilinear"`` for heights, ``"nearest"`` for masks).
        assume_crs: CRS for files without one.
        band: the band (1-based index or name).
        nodata: nodata override.
    """

    def __init__(self, path: Any, grid: GridSpec, *, resampling: str = "bilinear", assume_crs: Any = None,
                 band: int | str = 1, nodata: float | None = None) -> None:
        self.grid = grid
        self.scene = open_scene(path, crs=assume_crs, nodata=nodata, bands=[band]).with_grid(grid, resampling)
        self._reader: Any = None

    def __enter__(self) -> GridReader:
        self._reader = self.scene.reader()
        self._reader.open()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def read(self, window: Window | None = None) -> np.ndarray:
        """``[h, w]`` float32 values of ``window`` of the grid (whole grid when None), NaN where invalid."""
        if self._reader is None:
            raise RuntimeError("GridReader.read outside its context (use `with GridReader(...) as r:`)")
        chip = self._reader.read(window, fill=0)
        out = chip.data[0].astype(np.float32)
        out[~chip.valid] = np.nan
        return out


def read_on_grid(path: Any, grid: GridSpec, *, resampling: str = "bilinear", assume_crs: Any = None,
                 band: int | str = 1, nodata: float | None = None) -> np.ndarray:
    """One band of a raster (canopy height, forest mask...) read on ``grid`` as float32, NaN where invalid.

    The whole grid in memory; :class:`GridReader` reads it window by window.
    """
    with GridReader(path, grid, resampling=resampling, assume_crs=assume_crs, band=band, nodata=nodata) as r:
        return r.read()


def forestgapr_loss_labels(
    chm_2012: np.ndarray | str | os.PathLike,
    chm_2014: np.ndarray | str | os.PathLike,
    *,
    min_height: float = 5.0,
    drop: float = 5.0,
    gap_height: float = 2.0,
    assume_crs: Any = "EPSG:31982",
) -> tuple[np.ndarray, np.ndarray]:
    """Canopy-loss reference labels for the ForestGapR Cauaxi CHM pair (2012 -> 2014).

    ``loss = (h2012 >= min_height) & ((h2012 - h2014 >= drop) | (h2014 < gap_height))``: forest in 2012 that
    dropped by at least ``drop`` metres or became a gap (below ``gap_height``) by 2014. The files have no CRS
    tag; their coordinates are UTM 22S (``assume_crs``, SIRGAS 2000 / UTM 22S by default).

    Returns:
        ``(loss bool [H, W], valid bool [H, W])`` (valid: both heights finite).
    """
    arrs = []
    for x in (chm_2012, chm_2014):
        if isinstance(x, str | os.PathLike):
            s = open_scene(x, crs=assume_crs)
            c = s.read(fill=0)
            a = c.data[0].astype(np.float32)
            a[~c.valid] = np.nan
            arrs.append(a)
        else:
            arrs.append(np.asarray(x, np.float32))
    h12, h14 = arrs
    if h12.shape != h14.shape:
        raise ValueError(f"the CHMs have different shapes {h12.shape} and {h14.shape}; put them on one grid first")
    valid = np.isfinite(h12) & np.isfinite(h14)
    with np.errstate(invalid="ignore"):
        loss = valid & (h12 >= min_height) & (((h12 - h14) >= drop) | (h14 < gap_height))
    return loss, valid
