"""Per-polygon summaries of a canopy-height raster (mean, p95, canopy cover, valid share, area).

For each AOI polygon (reprojected to the raster CRS for masking) the raster is read window by window over the
polygon's bounding box only (never the whole raster); a pixel belongs to a polygon when its centre is inside.
Columns added to the polygon attributes:

* ``area_ha``: polygon area from :func:`dinov3geo.io.vector.area_ha` in the polygons' own CRS (planar in a
  projected CRS, geodesic on the ellipsoid in a geographic one);
* ``n_pixels``: raster pixels whose centre is inside the polygon, including the grid's pixels beyond the raster
  edge (counted exactly in windows that touch the raster, estimated from the area in windows that do not);
* ``valid_share``: share of those pixels with a valid height (nodata, NaN and off-raster pixels are invalid);
* ``mean_height_m``: mean of valid heights;
* ``p95_height_m``: 95th percentile (nearest rank: the ``ceil(0.95 n)``-th smallest valid height) from a
  0.01 m histogram over [0, 200] m, so exact to 0.005 m (heights below 0 count as 0 and above 200 m as 200 m
  for the percentile only);
* ``cover_share_<t>m``: share of valid pixels with height >= ``t`` (default 5 m, the tree-cover definition of
  the Hansen/GFW products).

Statistics are NaN (empty in the CSV) for polygons with no valid pixel (``n_pixels`` tells whether a polygon
is smaller than one pixel). Outputs: a GeoPackage with the polygons (original geometry and CRS) and a CSV
without geometry, both written atomically.
"""

from __future__ import annotations

import math
import os
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from rasterio.windows import Window

from dinov3geo.io.errors import MissingCRSError
from dinov3geo.io.grid import GridSpec
from dinov3geo.io.scene import GDAL_ENV, open_raster
from dinov3geo.io.vector import aoi_mask, area_ha, read_vector, write_vector
from dinov3geo.io.windows import clip_window
from dinov3geo.utils.atomic import atomic_path, check_writable

__all__ = ["summarise_heights"]

_HIST_STEP = 0.01
_HIST_MAX = 200.0


def _p95(hist: np.ndarray, q: float = 0.95) -> float:
    total = hist.sum()
    if total == 0:
        return float("nan")
    k = int(np.searchsorted(np.cumsum(hist), math.ceil(q * total)))  # first cell reaching the q-th value
    return k * _HIST_STEP


def summarise_heights(
    raster: str | os.PathLike[str],
    aoi: str | os.PathLike[str] | gpd.GeoDataFrame,
    out_gpkg: str | os.PathLike[str] | None,
    out_csv: str | os.PathLike[str] | None,
    *,
    band: int = 1,
    cover_threshold: float = 5.0,
    window: int = 1024,
    layer: str | int | None = None,
) -> gpd.GeoDataFrame:
    """Summarise a height raster inside each AOI polygon (see the module docstring for the columns).

    Args:
        raster: canopy height raster (metres in ``band``), any CRS.
        aoi: polygons: a vector file or a GeoDataFrame with a CRS; their attributes are kept.
        out_gpkg: output GeoPackage (None: not written).
        out_csv: output CSV without geometry (None: not written).
        band: 1-based height band.
        cover_threshold: height (m) for the canopy-cover share.
        window: maximum window side in pixels read at once.
        layer: layer of a multi-layer AOI file.

    Returns:
        the polygons with the summary columns, in their original CRS.
    """
    from dinov3geo.utils.outputs import guard_output

    protect = [raster, aoi if isinstance(aoi, str | os.PathLike) else None]
    for p in (out_gpkg, out_csv):
        if p is not None:
            guard_output(p, protect, role="summary")
            check_writable(p)
    gdf = read_vector(aoi, layer=layer) if isinstance(aoi, str | os.PathLike) else aoi.copy()
    if gdf.crs is None:
        raise MissingCRSError(None, "The AOI polygons have no CRS: set it (gdf.set_crs(...)) first.")
    raster = os.fspath(raster)
    cover_col = f"cover_share_{cover_threshold:g}m"
    rows: list[dict[str, float]] = []
    with rasterio.Env(**GDAL_ENV):
        ds = open_raster(raster)
        with ds:
            if not 1 <= band <= ds.count:
                raise ValueError(f"band {band} not found in {raster!r} ({ds.count} band(s)); give the height band")
            if ds.crs is None:
                raise MissingCRSError(raster, hint="The height raster must be georeferenced to match the polygons.")
            grid = GridSpec.from_dataset(ds)
            geoms = gdf.geometry.to_crs(grid.crs)
            inv = ~grid.transform
            for geom in geoms.values:
                rows.append(_summarise_one(ds, band, grid, inv, geom, cover_threshold, window))
    stats = pd.DataFrame(rows, index=gdf.index).rename(columns={"cover": cover_col})
    out = gdf.copy()
    out["area_ha"] = area_ha(gdf).to_numpy()
    for col in ("n_pixels", "valid_share", "mean_height_m", "p95_height_m", cover_col):
        out[col] = stats[col].to_numpy()
    out["n_pixels"] = out["n_pixels"].astype("int64")
    cols = [c for c in out.columns if c != out.geometry.name] + [out.geometry.name]
    out = out[cols]
    if out_gpkg is not None:
        write_vector(out, out_gpkg)
    if out_csv is not None:
        with atomic_path(out_csv) as tmp:
            pd.DataFrame(out.drop(columns=out.geometry.name)).to_csv(tmp, index=False)
    return out


def _summarise_one(
    ds: Any, band: int, grid: GridSpec, inv: Any, geom: Any, thr: float, window: int
) -> dict[str, float]:
    empty = {"n_pixels": 0, "valid_share": float("nan"), "mean_height_m": float("nan"),
             "p95_height_m": float("nan"), "cover": float("nan")}
    if geom is None or geom.is_empty:
        return empty
    minx, miny, maxx, maxy = geom.bounds
    cols, rows = zip(*(inv * (x, y) for x in (minx, maxx) for y in (miny, maxy)), strict=True)
    c0, c1 = math.floor(min(cols)), math.ceil(max(cols))
    r0, r1 = math.floor(min(rows)), math.ceil(max(rows))
    n_pix = n_valid = n_cover = 0
    pixel_area = abs(grid.transform.determinant)
    total = 0.0
    hist = np.zeros(int(round(_HIST_MAX / _HIST_STEP)) + 1, dtype=np.int64)
    for r in range(r0, max(r1, r0 + 1), window):
        for c in range(c0, max(c1, c0 + 1), window):
            win = Window(c, r, min(window, c1 - c), min(window, r1 - r))
            if win.width <= 0 or win.height <= 0:
                continue
            wgrid = grid.window_grid(win)
            cw = clip_window(win, grid.height, grid.width)
            if cw.inner is None:  # off the raster: no data, count the pixel centres from the area
                part = geom.intersection(shapely.box(*wgrid.bounds)).area
                n_pix += int(round(part / pixel_area))
                continue
            inside = aoi_mask(geom, wgrid)
            if not inside.any():
                continue
            n_pix += int(inside.sum())
            arr = ds.read(band, window=cw.inner, masked=True)
            vals = np.ma.filled(arr.astype(np.float64), np.nan)
            sel = inside[cw.rows, cw.cols] & np.isfinite(vals)
            v = vals[sel]
            if v.size == 0:
                continue
            n_valid += int(v.size)
            total += float(v.sum())
            n_cover += int((v >= thr).sum())
            idx = np.clip(np.round(v / _HIST_STEP), 0, hist.size - 1).astype(np.int64)
            hist += np.bincount(idx, minlength=hist.size)
    if n_pix == 0:
        return empty
    if n_valid == 0:
        return {**empty, "n_pixels": n_pix, "valid_share": 0.0}
    return {
        "n_pixels": n_pix,
        "valid_share": n_valid / n_pix,
        "mean_height_m": total / n_valid,
        "p95_height_m": _p95(hist),
        "cover": n_cover / n_valid,
    }
