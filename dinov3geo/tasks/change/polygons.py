"""Change/loss polygons with areas in hectares, dates and confidence; minimum mapping unit; per-AOI summaries.

:func:`change_polygons` labels the connected regions of a binary raster (4- or 8-connectivity), drops regions
smaller than the minimum mapping unit (default 0.1 ha, the RADD alert MMU), polygonises the rest with
:func:`rasterio.features.shapes` (one feature per region, holes kept) and attaches:

* ``area_ha``: :func:`dinov3geo.io.vector.area_ha` of the polygon: planar area for projected CRSs, geodesic
  area on the CRS's ellipsoid (:class:`pyproj.Geod`) for geographic CRSs;
* ``date_before``, ``date_after``: the dates of the pair;
* ``mean_prob``: mean change probability over the region's pixels (confidence), when a probability is given;
* ``mean_height_drop``, ``max_height_drop`` (metres), ``mean_height_before``, ``mean_height_after``: when
  canopy heights of both dates are known;
* ``n_pixels``.

Zonal statistics come from the region labels directly (``np.bincount``), so each pixel counts exactly once.
The binary raster is held in memory (1 byte per pixel, plus 4 for the labels): this is the in-memory
reference. Rasters of any size go through :mod:`~dinov3geo.tasks.change.windowed` (tile by tile, regions cut
by tile edges merged, the same polygons), which :func:`~dinov3geo.tasks.change.detect.detect_change` uses;
both build their table with :func:`polygon_frame`.

:func:`aoi_summary` sums polygon hectares per AOI feature (polygons clipped to each AOI) plus a total, and
writes it as CSV or JSON; :class:`AOISummary` does the same batch by batch.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pyproj import CRS as ProjCRS
from rasterio.features import shapes
from scipy import ndimage

from dinov3geo.io import GridSpec
from dinov3geo.io.vector import area_ha, read_vector, write_vector
from dinov3geo.utils.atomic import atomic_path

__all__ = [
    "AOISummary",
    "aoi_summary",
    "change_polygons",
    "label_regions",
    "pixel_area_ha",
    "polygon_frame",
    "remove_small_regions",
    "write_polygons",
    "write_summary",
]

_STRUCT = {4: ndimage.generate_binary_structure(2, 1), 8: ndimage.generate_binary_structure(2, 2)}


def _check_connectivity(connectivity: int) -> None:
    if connectivity not in _STRUCT:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")


def pixel_area_ha(grid: GridSpec) -> np.ndarray:
    """Area of the grid's pixels in hectares, as a ``[H, 1]`` column (it only varies with the row).

    Projected CRS: ``|det(transform)|`` in the CRS's linear unit squared, converted to m². Geographic CRS: the
    geodesic area of each row's pixel on the CRS's ellipsoid (north-up grids).
    """
    crs = ProjCRS(grid.crs)
    t = grid.transform
    if crs.is_geographic:
        if t.b or t.d:
            raise ValueError("pixel areas of rotated geographic grids are not supported; reproject to a north-up grid")
        geod = crs.get_geod()
        out = np.empty((grid.height, 1), dtype=np.float64)
        x0, x1 = t.c, t.c + t.a
        for r in range(grid.height):
            y0, y1 = t.f + r * t.e, t.f + (r + 1) * t.e
            a, _ = geod.polygon_area_perimeter([x0, x1, x1, x0], [y0, y0, y1, y1])
            out[r, 0] = abs(a) / 1e4
        return out
    factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    return np.full((grid.height, 1), abs(t.a * t.e - t.b * t.d) * factor * factor / 1e4)


def label_regions(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected regions of a boolean mask: ``(labels int32 [H, W], n)`` (0 = background)."""
    _check_connectivity(connectivity)
    labels, n = ndimage.label(np.asarray(mask, dtype=bool), structure=_STRUCT[connectivity])
    return labels.astype(np.int32, copy=False), int(n)


def _region_areas(labels: np.ndarray, n: int, grid: GridSpec) -> np.ndarray:
    pa = np.broadcast_to(pixel_area_ha(grid), labels.shape)
    return np.bincount(labels.ravel(), weights=pa.ravel(), minlength=n + 1)


def remove_small_regions(mask: np.ndarray, grid: GridSpec, mmu_ha: float, connectivity: int = 8) -> np.ndarray:
    """``mask`` without its connected regions smaller than ``mmu_ha`` hectares (sum of pixel areas)."""
    m = np.asarray(mask, dtype=bool)
    if mmu_ha <= 0 or not m.any():
        return m.copy()
    labels, n = label_regions(m, connectivity)
    keep = _region_areas(labels, n, grid) >= mmu_ha * (1 - 1e-9)  # 10 x 0.01 ha is not < 0.1 ha
    keep[0] = False
    return keep[labels]


def _zonal_mean(labels: np.ndarray, n: int, values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v) & (labels > 0)
    s = np.bincount(labels[ok], weights=v[ok], minlength=n + 1)
    c = np.bincount(labels[ok], minlength=n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, s / np.maximum(c, 1), np.nan)


def _zonal_max(labels: np.ndarray, n: int, values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v) & (labels > 0)
    out = np.full(n + 1, -np.inf)
    np.maximum.at(out, labels[ok], v[ok])
    out[~np.isfinite(out)] = np.nan
    return out


def change_polygons(
    mask: np.ndarray,
    grid: GridSpec,
    *,
    mmu_ha: float = 0.1,
    connectivity: int = 8,
    date_before: str | None = None,
    date_after: str | None = None,
    prob: np.ndarray | None = None,
    height_before: np.ndarray | None = None,
    height_after: np.ndarray | None = None,
) -> gpd.GeoDataFrame:
    """Polygons of the regions of a binary change/loss raster (see the module docstring).

    Args:
        mask: ``[H, W]`` bool (or 0/1) on ``grid``; nodata must already be False.
        grid: its grid (CRS and transform of the polygons).
        mmu_ha: minimum mapping unit in hectares; smaller regions are dropped (0: keep all).
        connectivity: 4 or 8 (diagonal neighbours join a region).
        date_before, date_after: dates written to every feature.
        prob: ``[H, W]`` change probability (``mean_prob``).
        height_before, height_after: ``[H, W]`` canopy heights in metres (height-drop attributes).

    Returns:
        a GeoDataFrame in ``grid.crs`` with the attributes above, sorted by decreasing area.
    """
    m = np.asarray(mask, dtype=bool)
    if m.shape != grid.shape:
        raise ValueError(f"mask is {m.shape} but the grid is {grid.shape} (h, w)")
    for name, arr in (("prob", prob), ("height_before", height_before), ("height_after", height_after)):
        if arr is not None and np.shape(arr) != m.shape:
            raise ValueError(f"{name} is {np.shape(arr)} but the mask is {m.shape}")
    labels, n = label_regions(m, connectivity)
    region_area = _region_areas(labels, n, grid)
    keep = region_area >= mmu_ha * (1 - 1e-9) if mmu_ha > 0 else np.ones(n + 1, bool)
    keep[0] = False
    kept_ids = np.nonzero(keep)[0]
    cols: dict[str, Any] = {}
    if len(kept_ids):
        remap = np.zeros(n + 1, dtype=np.int32)
        remap[kept_ids] = np.arange(1, len(kept_ids) + 1, dtype=np.int32)
        labels = remap[labels]
        n = len(kept_ids)
    else:
        labels = np.zeros_like(labels)
        n = 0
    geoms: dict[int, Any] = {}
    if n:
        for geom, val in shapes(labels, mask=labels > 0, connectivity=connectivity, transform=grid.transform):
            g = shapely.geometry.shape(geom)
            k = int(val)
            geoms[k] = g if k not in geoms else shapely.union(geoms[k], g)
    ids = np.arange(1, n + 1)
    geom_list = [geoms[int(k)] for k in ids]
    geom_list = [g if g.is_valid else shapely.make_valid(g) for g in geom_list]
    cols["n_pixels"] = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.int64)
    if prob is not None:
        cols["mean_prob"] = _zonal_mean(labels, n, prob)[1:]
    if height_before is not None and height_after is not None:
        hb, ha = np.asarray(height_before, np.float64), np.asarray(height_after, np.float64)
        drop = hb - ha
        cols["mean_height_drop"] = _zonal_mean(labels, n, drop)[1:]
        cols["max_height_drop"] = _zonal_max(labels, n, drop)[1:]
        cols["mean_height_before"] = _zonal_mean(labels, n, hb)[1:]
        cols["mean_height_after"] = _zonal_mean(labels, n, ha)[1:]
    return polygon_frame(geom_list, cols, grid.crs, mmu_ha=mmu_ha, date_before=date_before, date_after=date_after)


def polygon_frame(
    geoms: list[Any],
    cols: dict[str, Any],
    crs: Any,
    *,
    mmu_ha: float = 0.1,
    date_before: str | None = None,
    date_after: str | None = None,
) -> gpd.GeoDataFrame:
    """The polygon table of :func:`change_polygons` from region geometries and their zonal columns.

    Adds ``area_ha`` (:func:`dinov3geo.io.vector.area_ha` of each geometry) and the dates, drops polygons
    smaller than ``mmu_ha`` (the pixel-area sum and the polygon area agree to rounding; the polygon decides),
    sorts by decreasing area (stable: regions of equal area keep the given order, the raster-scan order of
    their first pixel) and numbers them ``id`` 1..n.

    Args:
        geoms: one geometry per region, in ``crs``.
        cols: ``n_pixels`` and the optional zonal columns (``mean_prob``, ``mean_height_drop``,
            ``max_height_drop``, ``mean_height_before``, ``mean_height_after``), one value per region.
        crs: CRS of the geometries.
        mmu_ha: minimum mapping unit in hectares (0: keep all).
        date_before, date_after: dates written to every feature.
    """
    n = len(geoms)
    order = ["n_pixels", "mean_prob", "mean_height_drop", "max_height_drop", "mean_height_before",
             "mean_height_after"]
    data: dict[str, Any] = {"n_pixels": np.asarray(cols.get("n_pixels", np.zeros(n)), dtype=np.int64),
                            "date_before": [date_before] * n, "date_after": [date_after] * n}
    for k in order[1:]:
        if k in cols:
            data[k] = np.asarray(cols[k], dtype=np.float64)
    gdf = gpd.GeoDataFrame(data, geometry=gpd.GeoSeries(list(geoms), crs=crs), crs=crs)
    gdf.insert(0, "area_ha", area_ha(gdf).to_numpy() if n else np.zeros(0))
    if n and mmu_ha > 0:
        gdf = gdf[gdf["area_ha"] >= mmu_ha * (1 - 1e-9)]
    gdf = gdf.sort_values("area_ha", ascending=False, kind="stable").reset_index(drop=True)
    gdf.insert(0, "id", np.arange(1, len(gdf) + 1, dtype=np.int64))
    return gdf


def write_polygons(gdf: gpd.GeoDataFrame, path: str | os.PathLike[str], layer: str | None = None) -> Path:
    """Write polygons atomically as GeoPackage (``.gpkg``), GeoParquet (``.parquet``) or GeoJSON (``.geojson``).

    An empty result is written too (a valid file with no features), so "no change" is explicit.
    """
    return write_vector(gdf, path, layer=layer)


class AOISummary:
    """:func:`aoi_summary` batch by batch: :meth:`add` polygon batches (e.g. tile by tile), then :meth:`table`.

    Each AOI feature's hectares are the sum over batches of the polygons clipped to it, so memory holds one
    batch at a time. Adding all polygons as one batch gives exactly :func:`aoi_summary`.

    Args:
        aoi: AOI polygons (file or GeoDataFrame); None gives only the total.
        crs: CRS of the polygons to come (the AOI is reprojected to it once); None keeps the AOI's CRS.
        id_field: AOI attribute naming each feature (default: ``name``/``id`` when present, else the row number).
    """

    def __init__(
        self,
        aoi: str | os.PathLike[str] | gpd.GeoDataFrame | None = None,
        crs: Any = None,
        *,
        id_field: str | None = None,
    ) -> None:
        self.crs = crs
        self._aoi: gpd.GeoDataFrame | None = None
        self._names: list[str] = []
        self._aoi_ha: list[float] = []
        if aoi is not None:
            a = read_vector(aoi) if isinstance(aoi, str | os.PathLike) else aoi
            if a.crs is None:
                raise ValueError("the AOI has no CRS; set it before summarising")
            if id_field is None:
                id_field = next((c for c in ("name", "id", "aoi", "NAME") if c in a.columns), None)
            elif id_field not in a.columns:
                raise KeyError(f"AOI attribute {id_field!r} not found; attributes are {list(a.columns)}")
            a = a.to_crs(crs) if crs is not None else a
            aha = area_ha(a)
            for i, (idx, feat) in enumerate(a.iterrows()):
                self._names.append(str(feat[id_field]) if id_field else str(i))
                self._aoi_ha.append(float(aha.loc[idx]))
            self._aoi = a
        self._loss = [0.0] * len(self._names)
        self._count = [0] * len(self._names)
        self._total_ha = 0.0
        self._total_n = 0

    def add(self, polygons: gpd.GeoDataFrame) -> None:
        """Add a batch of polygons (output of :func:`change_polygons`, in the summary's CRS)."""
        if not len(polygons):
            return
        self._total_ha += float(polygons["area_ha"].sum())
        self._total_n += len(polygons)
        if self._aoi is None:
            return
        geoms = polygons.geometry.values
        for i, geom in enumerate(self._aoi.geometry.values):
            clipped = shapely.intersection(geoms, geom)
            nonempty = [g for g in clipped if not g.is_empty]
            if nonempty:
                self._loss[i] += float(area_ha(gpd.GeoSeries(nonempty, crs=polygons.crs)).sum())
                self._count[i] += len(nonempty)

    def table(self) -> pd.DataFrame:
        """Columns ``aoi``, ``aoi_area_ha``, ``loss_ha``, ``loss_fraction``, ``n_polygons``; last row ``total``."""
        rows: list[dict[str, Any]] = []
        for name, total, loss, n in zip(self._names, self._aoi_ha, self._loss, self._count, strict=True):
            rows.append({"aoi": name, "aoi_area_ha": total, "loss_ha": loss,
                         "loss_fraction": loss / total if total > 0 else math.nan, "n_polygons": n})
        rows.append({"aoi": "total", "aoi_area_ha": math.nan, "loss_ha": self._total_ha, "loss_fraction": math.nan,
                     "n_polygons": self._total_n})
        return pd.DataFrame(rows)


def aoi_summary(
    polygons: gpd.GeoDataFrame,
    aoi: str | os.PathLike[str] | gpd.GeoDataFrame | None = None,
    *,
    id_field: str | None = None,
) -> pd.DataFrame:
    """Hectares of change/loss per AOI feature, plus a ``"total"`` row.

    Args:
        polygons: output of :func:`change_polygons` (any CRS).
        aoi: AOI polygons (file or GeoDataFrame); None gives only the total.
        id_field: AOI attribute naming each feature (default: ``name``/``id`` when present, else the row number).

    Returns:
        columns ``aoi``, ``aoi_area_ha``, ``loss_ha``, ``loss_fraction``, ``n_polygons`` (polygons intersecting
        the AOI). Polygons are clipped to each AOI before measuring; the total is over all polygons (inside
        the processed area). :class:`AOISummary` computes the same batch by batch.
    """
    acc = AOISummary(aoi, polygons.crs, id_field=id_field)
    acc.add(polygons)
    return acc.table()


def write_summary(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write an :func:`aoi_summary` table atomically as ``.csv`` or ``.json`` (a list of records)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ValueError(f"summary path {os.fspath(p)!r} must end with .csv or .json")
    with atomic_path(p) as tmp:
        if suffix == ".csv":
            table.to_csv(tmp, index=False)
        else:
            recs = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                    for r in table.to_dict(orient="records")]
            tmp.write_text(json.dumps(recs, indent=1))
    return p
