"""Vector I/O for labels, AOIs and result polygons: read, write (atomically), AOI masks and areas.

Formats are chosen by file suffix:

* ``.geojson`` / ``.json``: read and write; written in EPSG:4326 (RFC 7946) unless ``rfc7946=False``.
* ``.gpkg``: read and write; ``layer`` selects/creates a layer, other layers of the file are kept.
* ``.shp``: read only (a multi-file format cannot be replaced atomically).
* ``.parquet``: GeoParquet, read and write (via pyarrow).
* ``.fgb``: FlatGeobuf, read and write; written with a spatial index, so features come back in spatial
  (Hilbert) order, not in the original order.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pyproj import CRS as ProjCRS
from rasterio.features import geometry_mask
from shapely.geometry.base import BaseGeometry

from dinov3geo.io.errors import EmptyLayerError, MissingCRSError, UnsupportedFormatError, VectorReadError
from dinov3geo.io.grid import GridSpec
from dinov3geo.utils.atomic import atomic_path, check_writable

__all__ = ["aoi_geometry", "aoi_mask", "area_ha", "read_vector", "repair_geometries", "write_vector"]

_READ_SUFFIXES = {".geojson", ".json", ".gpkg", ".shp", ".parquet", ".geoparquet", ".fgb"}
_WRITE_DRIVERS = {".geojson": "GeoJSON", ".json": "GeoJSON", ".gpkg": "GPKG", ".fgb": "FlatGeobuf"}
_WRITE_SUFFIXES = set(_WRITE_DRIVERS) | {".parquet", ".geoparquet"}
_POLYGONAL = ("Polygon", "MultiPolygon")


# ---------------------------------------------------------------------- reading
def repair_geometries(gdf: gpd.GeoDataFrame, source: Any = None) -> tuple[gpd.GeoDataFrame, int]:
    """Repair invalid geometries with :func:`shapely.make_valid`; returns ``(gdf, n_repaired)``.

    Polygons stay polygonal: when repair produces a collection (e.g. a polygon plus a stray line from a
    bow-tie), only its polygonal parts are kept. Null geometries are left as they are. A ``UserWarning``
    names ``source`` and the number of repaired features.
    """
    geoms = gdf.geometry.values
    present = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    invalid = present & ~shapely.is_valid(geoms)
    n = int(invalid.sum())
    if not n:
        return gdf, 0
    fixed = shapely.make_valid(geoms[invalid])
    was_poly = np.isin(shapely.get_type_id(geoms[invalid]), [3, 6])  # Polygon, MultiPolygon
    out = []
    for g, poly in zip(fixed, was_poly, strict=True):
        if poly and g.geom_type not in _POLYGONAL:
            parts = [p for p in shapely.get_parts(g) if p.geom_type in _POLYGONAL]
            g = shapely.union_all(parts) if parts else shapely.Polygon()
        out.append(g)
    gdf = gdf.copy()
    new = gdf.geometry.values.copy()
    new[invalid] = out
    gdf[gdf.geometry.name] = gpd.GeoSeries(new, index=gdf.index, crs=gdf.crs)
    where = f" in {os.fspath(source)!r}" if source is not None else ""
    warnings.warn(
        f"repaired {n} invalid geometr{'y' if n == 1 else 'ies'}{where} with shapely.make_valid", stacklevel=3
    )
    return gdf, n


def read_vector(
    path: str | os.PathLike[str],
    crs: Any = None,
    layer: str | int | None = None,
    assume_crs: Any = None,
    repair: bool = True,
    allow_empty: bool = False,
) -> gpd.GeoDataFrame:
    """Read a GeoJSON / GeoPackage / Shapefile / GeoParquet / FlatGeobuf file as a GeoDataFrame.

    Args:
        path: the file.
        crs: if given, the result is reprojected to this CRS.
        layer: layer name or index (GeoPackage with several layers).
        assume_crs: CRS to use when the file declares none (GeoJSON without a ``crs`` member is always
            EPSG:4326, per RFC 7946, and needs no assumption).
        repair: fix invalid geometries with :func:`shapely.make_valid` (counted in ``gdf.attrs["n_repaired"]``,
            with a warning); when False, invalid geometries are returned as they are.
        allow_empty: return an empty GeoDataFrame instead of raising :class:`EmptyLayerError`.

    Raises:
        VectorReadError: missing or unreadable file (a ``FileNotFoundError``-like ``OSError``).
        UnsupportedFormatError: unknown suffix.
        MissingCRSError: the file has no CRS and ``assume_crs`` is not given.
        EmptyLayerError: no features.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in _READ_SUFFIXES:
        raise UnsupportedFormatError(p, sorted(_READ_SUFFIXES))
    if not p.exists():
        raise VectorReadError(
            p, "no such file", "Check the path (relative paths start from the current folder)."
        )
    try:
        if suffix in {".parquet", ".geoparquet"}:
            gdf = gpd.read_parquet(p)
        else:
            gdf = gpd.read_file(p, layer=layer, engine="pyogrio")
    except Exception as exc:
        raise VectorReadError(p, f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(gdf, gpd.GeoDataFrame) or gdf.geometry is None:  # pragma: no cover - defensive
        raise VectorReadError(p, "the file has no geometry column")
    if len(gdf) == 0 and not allow_empty:
        raise EmptyLayerError(p, str(layer) if layer is not None else None)
    if gdf.crs is None:
        if suffix in {".geojson", ".json"}:
            gdf = gdf.set_crs("EPSG:4326")
        elif assume_crs is not None:
            gdf = gdf.set_crs(assume_crs)
        else:
            raise MissingCRSError(
                p,
                "Pass assume_crs='EPSG:xxxx' if you know it, or add it to the file "
                "(e.g. `ogr2ogr -a_srs EPSG:xxxx out.gpkg in.shp`).",
            )
    n_repaired = 0
    if repair:
        gdf, n_repaired = repair_geometries(gdf, source=p)
    if crs is not None:
        gdf = gdf.to_crs(crs)
    gdf.attrs["n_repaired"] = n_repaired
    gdf.attrs["source"] = os.fspath(p)
    return gdf


# ---------------------------------------------------------------------- writing
def write_vector(
    gdf: gpd.GeoDataFrame,
    path: str | os.PathLike[str],
    layer: str | None = None,
    rfc7946: bool = True,
) -> Path:
    """Write ``gdf`` atomically (never a half-written file at ``path``), format chosen by suffix.

    Args:
        gdf: the features; must have a CRS.
        path: ``.gpkg``, ``.parquet`` (GeoParquet), ``.geojson``/``.json`` or ``.fgb``.
        layer: GeoPackage layer name (default: the file stem). Writing a layer into an existing GeoPackage
            keeps its other layers and replaces a layer of the same name.
        rfc7946: write GeoJSON in EPSG:4326 as RFC 7946 requires (QGIS/web tools assume it). With False the
            features are written in their own CRS, declared with a ``crs`` member (non-standard).

    Returns:
        the final path.

    Raises:
        MissingCRSError: ``gdf`` has no CRS.
        UnsupportedFormatError: unknown suffix (e.g. ``.shp``).
        OutputError: the folder cannot be written (checked before anything is written).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in _WRITE_SUFFIXES:
        raise UnsupportedFormatError(p, sorted(_WRITE_SUFFIXES))
    if not isinstance(gdf, gpd.GeoDataFrame):
        raise TypeError(f"write_vector needs a GeoDataFrame, got {type(gdf).__name__}")
    if gdf.crs is None:
        raise MissingCRSError(
            None,
            f"Cannot write {os.fspath(p)!r}: set the GeoDataFrame's CRS first (gdf.set_crs('EPSG:xxxx')).",
        )
    check_writable(p)
    if suffix in {".geojson", ".json"} and rfc7946 and not gdf.crs.equals(ProjCRS("EPSG:4326")):
        gdf = gdf.to_crs("EPSG:4326")
    with atomic_path(p, check=False) as tmp:
        if suffix in {".parquet", ".geoparquet"}:
            gdf.to_parquet(tmp)
        elif suffix == ".gpkg":
            if p.exists() and layer is not None:
                shutil.copy2(p, tmp)  # keep the other layers; the named one is replaced below
            gdf.to_file(tmp, driver="GPKG", layer=layer or p.stem, engine="pyogrio")
        else:
            gdf.to_file(tmp, driver=_WRITE_DRIVERS[suffix], engine="pyogrio")
    return p


# ---------------------------------------------------------------------- AOIs
def aoi_geometry(
    path_or_geoms: str
    | os.PathLike[str]
    | gpd.GeoDataFrame
    | gpd.GeoSeries
    | BaseGeometry
    | Iterable[BaseGeometry],
    crs: Any,
    src_crs: Any = None,
    layer: str | int | None = None,
) -> BaseGeometry:
    """The union of the AOI polygons, reprojected into ``crs``.

    Args:
        path_or_geoms: a vector file (read with :func:`read_vector`), a GeoDataFrame/GeoSeries with a CRS, or
            shapely geometries (then ``src_crs`` is required).
        crs: target CRS (e.g. ``grid.crs``).
        src_crs: CRS of bare shapely geometries.
        layer: layer of a multi-layer file.

    Returns:
        a valid (Multi)Polygon in ``crs``. Non-polygonal parts (points, lines) are ignored.

    Raises:
        MissingCRSError: geometries without a CRS and no ``src_crs``.
        ValueError: no polygon area in the input.
    """
    name: Any = None
    if isinstance(path_or_geoms, str | os.PathLike):
        name = path_or_geoms
        series = read_vector(path_or_geoms, layer=layer).geometry
    elif isinstance(path_or_geoms, gpd.GeoDataFrame | gpd.GeoSeries):
        series = path_or_geoms.geometry if isinstance(path_or_geoms, gpd.GeoDataFrame) else path_or_geoms
        if series.crs is None:
            if src_crs is None:
                raise MissingCRSError(None, "The AOI geometries have no CRS: set it or pass src_crs.")
            series = series.set_crs(src_crs)
    else:
        geoms = [path_or_geoms] if isinstance(path_or_geoms, BaseGeometry) else list(path_or_geoms)
        if src_crs is None:
            raise MissingCRSError(
                None, "Bare shapely AOI geometries need src_crs (the CRS of their coordinates)."
            )
        series = gpd.GeoSeries(geoms, crs=src_crs)
    series = series.to_crs(crs)
    geoms = shapely.make_valid(series.values[~(series.isna().to_numpy() | series.is_empty.to_numpy())])
    parts = [p for p in shapely.get_parts(geoms) if p.geom_type in _POLYGONAL]
    aoi = shapely.union_all(parts) if parts else shapely.Polygon()
    if aoi.is_empty or aoi.area == 0:
        where = f" in {os.fspath(name)!r}" if name is not None else ""
        raise ValueError(f"no polygon area found{where}; an AOI must contain polygons")
    return aoi


def aoi_mask(
    geometry: BaseGeometry | Iterable[BaseGeometry], grid: GridSpec, all_touched: bool = False
) -> np.ndarray:
    """Rasterise AOI geometry (already in ``grid.crs``) on ``grid``: True inside, False outside.

    A pixel is inside when its centre is inside (or, with ``all_touched``, when the geometry touches it).
    Returns a ``bool`` array of shape ``grid.shape``.
    """
    geoms = [geometry] if isinstance(geometry, BaseGeometry) else list(geometry)
    geoms = [g for g in geoms if g is not None and not g.is_empty]
    if not geoms:
        return np.zeros(grid.shape, dtype=bool)
    return geometry_mask(
        geoms, out_shape=grid.shape, transform=grid.transform, all_touched=all_touched, invert=True
    )


# ---------------------------------------------------------------------- areas
def _ring_area(geod: Any, ring: Any) -> float:
    xs, ys = shapely.get_coordinates(ring).T
    area, _ = geod.polygon_area_perimeter(xs, ys)
    return abs(float(area))


def _geodesic_area(geod: Any, geom: BaseGeometry | None) -> float:
    if geom is None:
        return float("nan")
    total = 0.0
    for part in shapely.get_parts(geom):
        if part.geom_type not in _POLYGONAL or part.is_empty:
            continue
        total += _ring_area(geod, part.exterior) - sum(_ring_area(geod, r) for r in part.interiors)
    return total


def area_ha(gdf: gpd.GeoDataFrame | gpd.GeoSeries) -> pd.Series:
    """Polygon areas in hectares (points/lines: 0; missing geometries: NaN).

    * Projected CRS: planar area in the projection, converted from the CRS's linear unit (metre, US survey
      foot, international foot, ...). Note that this is the area *in that projection* (e.g. UTM is 0.04 %
      small at its central meridian); use an equal-area CRS for exact areas of large regions.
    * Geographic CRS: geodesic area on the CRS's own ellipsoid (WGS84, GRS80, a sphere...) with
      :class:`pyproj.Geod`, not planar square degrees.

    Raises:
        MissingCRSError: no CRS.
        ValueError: a CRS that is neither projected nor geographic (e.g. geocentric), or with an unknown unit.
    """
    geo = gdf.geometry if isinstance(gdf, gpd.GeoDataFrame) else gdf
    if geo.crs is None:
        raise MissingCRSError(None, "area_ha needs a CRS to know the units: set it with gdf.set_crs(...).")
    crs = ProjCRS(geo.crs)
    if crs.is_geographic:
        geod = crs.get_geod()
        if geod is None:  # pragma: no cover - every geographic CRS has an ellipsoid
            raise ValueError(f"cannot find the ellipsoid of {crs.name}")
        values = [_geodesic_area(geod, g) for g in geo.values]
        return pd.Series(values, index=geo.index, dtype="float64", name="area_ha") / 1e4
    if not crs.is_projected:
        raise ValueError(f"area_ha supports projected or geographic CRSs, got {crs.name!r}")
    factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else None
    if not factor:
        raise ValueError(f"cannot determine the linear unit of {crs.name!r}")
    area = geo.area.astype("float64") * (factor * factor) / 1e4
    area[geo.isna()] = np.nan
    return area.rename("area_ha")
