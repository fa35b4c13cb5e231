"""Land-cover training/reference labels as users have them, put onto an image grid.

Two kinds of label files are read (:func:`load_labels`, or :class:`LabelSource` to read many windows):

* **polygons** (GeoPackage, Shapefile, GeoJSON, GeoParquet, FlatGeobuf; any CRS): reprojected to the image
  grid's CRS and rasterised with ``all_touched=False`` (a pixel is labelled when its centre lies inside a
  polygon). The class column is ``column`` when given, else the first of :data:`CLASS_COLUMNS` the file has
  (case-insensitive); it may hold class **names** (``"forest"``) or integer **codes**. When the names come with
  an integer column (``code``, ``class_id``, ``id``...) that maps one-to-one onto them, those integers become
  the codes; otherwise the names are numbered 1, 2, 3... in alphabetical order. Pixels covered by polygons of
  two different classes are left unlabelled (with a warning): their class is ambiguous.
* **class rasters** (any GDAL raster, any CRS/resolution, sparse or wall-to-wall): reprojected onto the image
  grid with **nearest** (or **mode** when the label cells are at least 1.5 times finer than the grid's pixels,
  so a coarse pixel takes the majority of the label cells it covers, "unlabelled" counting as one value: a pixel
  mostly outside the labels stays unlabelled). The declared nodata, 255 and the ``ignore`` values are
  unlabelled. A class table comes from the raster's ``DINOV3GEO_CLASSES`` tag when it has one, else its GDAL
  category names, else the codes are named ``class_<code>``.

The result is a :class:`LabelRaster`: a uint8 map of class **indexes** (0..n-1 in class-table order, 255 =
unlabelled), a per-pixel **polygon id** (for polygons: the feature; for rasters: the connected patch of one
class) used to split by polygon, and the :class:`~dinov3geo.tasks.landcover.classes.ClassTable`.

Problems are reported as :class:`LabelError` naming the file (and column/codes/bounds):

* no class column (the columns are listed);
* labels entirely outside the image (both bounds, in the image CRS);
* codes or names that are not in a given class table (listed);
* fewer than ``min_classes`` (default 2) classes inside the image;
* no labelled pixel at all (polygons smaller than a pixel).

**Classes absent from the image extent** (in the file, but with no labelled pixel inside the image) are
dropped from the class table with a warning naming them (documented behaviour, not an error): a model cannot
learn a class it never sees. With a given table (evaluating a map) the table is kept as it is.

:func:`split_by_polygon` assigns labelled pixels to spatially separated splits so that **no polygon straddles
two splits** and no pixel of one split lies within the split's buffer of a pixel of another.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window, from_bounds
from scipy import ndimage

from dinov3geo.io.errors import DinoGeoIOError, MissingCRSError, RasterReadError
from dinov3geo.io.grid import GridSpec
from dinov3geo.io.scene import GDAL_ENV, open_raster
from dinov3geo.tasks.canopy.splits import SpatialSplit
from dinov3geo.tasks.landcover.classes import (
    CLASSES_TAG,
    MAX_CODE,
    NODATA,
    ClassTable,
    ClassTableError,
    LandClass,
    _as_codes,
    default_color,
    read_category_names,
)

__all__ = [
    "CLASS_COLUMNS",
    "LabelError",
    "LabelRaster",
    "LabelSource",
    "PolygonSplit",
    "VECTOR_SUFFIXES",
    "is_vector",
    "load_labels",
    "split_by_polygon",
]

log = logging.getLogger("dinov3geo.landcover")

#: columns tried, in this order, when no class column is given (case-insensitive)
CLASS_COLUMNS = ("class", "classname", "label", "landcover", "lc", "type", "id")
#: integer columns that may carry the codes of a name column
CODE_COLUMNS = ("code", "class_id", "classid", "class_code", "value", "id")
#: suffixes read as polygons (everything else is opened as a raster)
VECTOR_SUFFIXES = frozenset({".geojson", ".json", ".gpkg", ".shp", ".parquet", ".geoparquet", ".fgb"})


class LabelError(DinoGeoIOError, ValueError):
    """A label file cannot be used as it is (the message names the file and what to do)."""

    def __init__(self, path: Any, reason: str, hint: str = "") -> None:
        super().__init__(f"labels {os.fspath(path)!r}: {reason}" + (f". {hint}" if hint else ""), path)


def is_vector(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is read as polygons (by its suffix)."""
    return Path(path).suffix.lower() in VECTOR_SUFFIXES


def _bounds_str(b: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in b) + ")"


# ---------------------------------------------------------------------------------------------- result
@dataclass
class LabelRaster:
    """Labels on an image grid.

    Attributes:
        index: ``[H, W]`` uint8 class index (table order; 255 = unlabelled).
        polygons: ``[H, W]`` int32 polygon id (>= 1; 0 = unlabelled): the feature of a polygon file, or the
            connected patch of one class (8-connectivity) of a class raster.
        table: the classes (index ``i`` is ``table[i]``).
        grid: the image grid.
        source: the label file.
        info: provenance (kind, column, pixels per class, dropped classes, conflicts...).
    """

    index: np.ndarray
    polygons: np.ndarray
    table: ClassTable
    grid: GridSpec
    source: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def labelled(self) -> np.ndarray:
        """``[H, W]`` bool: pixels with a class."""
        return self.index != NODATA

    def codes(self) -> np.ndarray:
        """``[H, W]`` uint8 class codes (255 = unlabelled)."""
        return self.table.code_lut()[self.index]

    def counts(self) -> dict[str, int]:
        """Labelled pixels per class name (table order)."""
        n = np.bincount(self.index[self.labelled].ravel(), minlength=len(self.table))
        return {c.name: int(n[i]) for i, c in enumerate(self.table)}


# ---------------------------------------------------------------------------------------------- columns
def _find_column(columns: Sequence[str], wanted: str) -> str | None:
    for c in columns:
        if c.lower() == wanted.lower():
            return c
    return None


def guess_class_column(columns: Sequence[str], path: Any, column: str | None = None) -> str:
    """The class column: ``column`` (must exist), else the first of :data:`CLASS_COLUMNS` present.

    Raises:
        LabelError: naming the file and listing its columns.
    """
    cols = [c for c in columns if c != "geometry"]
    if column is not None:
        found = _find_column(cols, column)
        if found is None:
            raise LabelError(path, f"has no column {column!r} (its columns: {', '.join(cols) or 'none'})",
                             "Name the class column with --column (config: data.column)")
        return found
    for cand in CLASS_COLUMNS:
        found = _find_column(cols, cand)
        if found is not None:
            return found
    raise LabelError(path, f"no class column found: none of {', '.join(CLASS_COLUMNS)} (its columns: "
                     f"{', '.join(cols) or 'none'})", "Name the class column with --column (config: data.column)")


def _missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    try:
        import pandas as pd

        if v is pd.NA or (not isinstance(v, str) and bool(pd.isna(v))):
            return True
    except (TypeError, ValueError):
        pass
    return isinstance(v, str) and not v.strip()


def _int_like(values: Sequence[Any]) -> list[int] | None:
    """``values`` as integer codes when all are integers (integral floats and digit strings count)."""
    return _as_codes(list(values))


def _table_from_values(values: Sequence[Any], path: Any, table: ClassTable | None,
                       codes_for_names: Mapping[str, int] | None = None) -> tuple[ClassTable, list[int]]:
    """The class table and the code of each value (None values excluded by the caller)."""
    ints = _int_like(values)
    if table is not None:
        if ints is not None:
            bad = table.unknown_codes(ints)
            if bad:
                raise LabelError(path, f"class codes {bad} are not in the model's class table (codes "
                                 f"{table.codes}: {', '.join(table.names)})",
                                 "Relabel them, or use a model trained with these classes")
            return table, ints
        names = [str(v).strip() for v in values]
        unknown = sorted({n for n in names if n.lower() not in {x.lower() for x in table.names}})
        if unknown:
            raise LabelError(path, f"class names {unknown} are not in the model's class table ({', '.join(table.names)})",
                             "Rename them, or use a model trained with these classes")
        return table, [table.by_name(n).code for n in names]
    if ints is not None:
        for c in sorted(set(ints)):
            if not 0 <= c <= MAX_CODE:
                raise LabelError(path, f"class code {c} is outside 0..{MAX_CODE} ({NODATA} means unlabelled)",
                                 "Renumber the classes")
        t = ClassTable.from_labels(ints)
        return t, ints
    names = [str(v).strip() for v in values]
    if codes_for_names:
        uniq = sorted({n.lower(): n for n in names}.values(), key=str.lower)
        t = ClassTable([LandClass(int(codes_for_names[n]), n, default_color(n, i)) for i, n in enumerate(uniq)])
        return t, [int(codes_for_names[n]) for n in names]
    t = ClassTable.from_labels(names)
    return t, [t.by_name(n).code for n in names]


def _name_codes(gdf: Any, name_col: str, path: Any) -> tuple[dict[str, int] | None, str | None]:
    """``{name: code}`` from an integer column that maps one-to-one onto the names, with its column name."""
    names = gdf[name_col]
    for cand in CODE_COLUMNS:
        col = _find_column([c for c in gdf.columns if c not in (name_col, "geometry")], cand)
        if col is None:
            continue
        keep = [not (_missing(a) or _missing(b)) for a, b in zip(names, gdf[col], strict=True)]
        vals = _int_like([v for v, k in zip(gdf[col], keep, strict=True) if k])
        if vals is None or not vals:
            continue
        nm = [str(v).strip() for v, k in zip(names, keep, strict=True) if k]
        pairs = set(zip(nm, vals, strict=True))
        by_name: dict[str, set[int]] = {}
        by_code: dict[int, set[str]] = {}
        for n, c in pairs:
            by_name.setdefault(n, set()).add(c)
            by_code.setdefault(c, set()).add(n)
        if all(len(v) == 1 for v in by_name.values()) and all(len(v) == 1 for v in by_code.values()) and \
                all(0 <= c <= MAX_CODE for c in by_code):
            return {n: next(iter(c)) for n, c in by_name.items()}, col
        log.info("%s: column %r does not map one-to-one onto the class names in %r; numbering the names "
                 "alphabetically instead", path, col, name_col)
    return None, None


# ---------------------------------------------------------------------------------------------- sources
class LabelSource:
    """A label file opened once, read onto any grid (window by window for large maps).

    Args:
        path: polygons (by suffix, :data:`VECTOR_SUFFIXES`) or a class raster.
        column: class column of a polygon file (default: guessed, see :data:`CLASS_COLUMNS`).
        table: the class table codes/names must belong to (e.g. a model's); None builds one from the file.
        ignore: class-raster values that mean "unlabelled" (besides the declared nodata and 255).
        layer: layer of a multi-layer polygon file.
        band: 1-based band of a class raster.
        assume_crs: CRS of a file that declares none.

    Raises:
        LabelError: no class column, unknown codes, labels outside the image, fewer classes than needed.
        MissingCRSError: a file without a CRS and no ``assume_crs``.
        VectorReadError: an unreadable polygon file.
        RasterReadError: an unreadable class raster.
    """

    def __init__(self, path: str | os.PathLike[str], *, column: str | None = None, table: ClassTable | None = None,
                 ignore: Iterable[int] | int | None = None, layer: str | int | None = None, band: int = 1,
                 assume_crs: Any = None) -> None:
        self.path = os.fspath(path)
        self.kind = "polygons" if is_vector(path) else "raster"
        self.given_table = table
        self.info: dict[str, Any] = {"labels": self.path, "kind": self.kind}
        self._gdfs: dict[str, Any] = {}
        self._ds: Any = None
        if self.kind == "polygons":
            self._open_polygons(column, table, layer, assume_crs)
        else:
            if column is not None:
                raise LabelError(self.path, "a class column was given but this is a raster",
                                 "Give --column only with polygon files")
            ign = [ignore] if isinstance(ignore, int) else list(ignore or [])
            self._open_raster(table, ign, band, assume_crs)

    # ---------------------------------------------------------------- polygons
    def _open_polygons(self, column: str | None, table: ClassTable | None, layer: Any, assume_crs: Any) -> None:
        from dinov3geo.io.vector import read_vector

        gdf = read_vector(self.path, layer=layer, assume_crs=assume_crs)
        col = guess_class_column(list(gdf.columns), self.path, column)
        keep = np.array([not _missing(v) for v in gdf[col]], dtype=bool)
        keep &= ~(gdf.geometry.isna().to_numpy() | gdf.geometry.is_empty.to_numpy())
        poly = np.isin(gdf.geometry.geom_type.to_numpy(), ["Polygon", "MultiPolygon"])
        n_nonpoly = int((keep & ~poly).sum())
        if n_nonpoly:
            warnings.warn(f"labels {self.path!r}: {n_nonpoly} feature(s) are not polygons (points or lines) and "
                          "were ignored", stacklevel=3)
        n_missing = int((~keep).sum())
        if n_missing:
            warnings.warn(f"labels {self.path!r}: {n_missing} feature(s) without a class in column {col!r} or "
                          "without a geometry were ignored", stacklevel=3)
        keep &= poly
        gdf = gdf[keep].copy()
        if not len(gdf):
            raise LabelError(self.path, f"no polygon has a class in column {col!r}", "Check the file and the column")
        codes_for_names, code_col = (None, None)
        if table is None and _int_like(list(gdf[col])) is None:
            codes_for_names, code_col = _name_codes(gdf, col, self.path)
        self.table, codes = _table_from_values(list(gdf[col]), self.path, table, codes_for_names)
        gdf["_code"] = np.asarray(codes, dtype=np.int32)
        gdf["_pid"] = np.arange(1, len(gdf) + 1, dtype=np.int32)
        self._gdf = gdf[["_code", "_pid", gdf.geometry.name]]
        self.crs = CRS.from_user_input(gdf.crs)
        self.info.update(column=col, code_column=code_col, n_polygons=int(len(gdf)),
                         polygons_per_class={self.table.name_of(c): int(n) for c, n in
                                             zip(*np.unique(gdf["_code"], return_counts=True), strict=True)})

    def _polygons_in(self, crs: CRS) -> Any:
        key = crs.to_wkt()
        if key not in self._gdfs:
            self._gdfs[key] = self._gdf if CRS.from_user_input(self._gdf.crs) == crs else self._gdf.to_crs(crs)
        return self._gdfs[key]

    # ---------------------------------------------------------------- rasters
    def _open_raster(self, table: ClassTable | None, ignore: list[int], band: int, assume_crs: Any) -> None:
        with rasterio.Env(**GDAL_ENV):
            self._ds = open_raster(self.path)
        ds = self._ds
        if not 1 <= band <= ds.count:
            raise LabelError(self.path, f"has {ds.count} band(s), no band {band}", "Give the 1-based class band")
        if not np.issubdtype(np.dtype(ds.dtypes[band - 1]), np.integer):
            raise LabelError(self.path, f"holds {ds.dtypes[band - 1]} values, not integer class codes",
                             "Give a raster of class codes (uint8/int16...)")
        self.band = band
        crs = ds.crs
        if crs is None:
            if assume_crs is None:
                raise MissingCRSError(self.path, hint="If you know its CRS, pass it (config: data.assume_crs).")
            crs = CRS.from_user_input(assume_crs)
        self.crs = CRS.from_user_input(crs)
        nd = ds.nodatavals[band - 1]
        self.ignore = sorted({int(v) for v in ignore} | ({int(nd)} if nd is not None and not math.isnan(nd) else set())
                             | {NODATA})
        own = None
        raw = ds.tags().get(CLASSES_TAG)
        if raw:
            try:
                own = ClassTable.from_json(raw)
            except ClassTableError:
                own = None
        self.own_table = own
        self.category_names = read_category_names(self.path, band)
        self.table = table if table is not None else own  # else built from the values read (see read())
        self.src_res = float(min(abs(ds.transform.a) or abs(ds.transform.b), abs(ds.transform.e) or abs(ds.transform.d)))
        self.info.update(ignore=self.ignore, band=band, class_table_from=("given" if table is not None else
                         "tag" if own is not None else "category names" if self.category_names else "codes"))

    def _read_raster_codes(self, grid: GridSpec) -> np.ndarray:
        """Class codes on ``grid`` (uint8, 255 = unlabelled)."""
        ds = self._ds
        out = np.full(grid.shape, NODATA, dtype=np.uint8)
        gb = transform_bounds(grid.crs, self.crs, *grid.bounds, densify_pts=21)
        t = ds.transform
        if t.b == 0 and t.d == 0:
            w = from_bounds(*gb, transform=t)
            c0, r0 = max(int(np.floor(w.col_off)) - 2, 0), max(int(np.floor(w.row_off)) - 2, 0)
            c1 = min(int(np.ceil(w.col_off + w.width)) + 2, ds.width)
            r1 = min(int(np.ceil(w.row_off + w.height)) + 2, ds.height)
            if c1 <= c0 or r1 <= r0:
                return out
            win = Window(c0, r0, c1 - c0, r1 - r0)
        else:
            win = Window(0, 0, ds.width, ds.height)
        src = ds.read(self.band, window=win).astype(np.int64)
        bad = np.isin(src, self.ignore)
        big = (~bad) & ((src < 0) | (src > MAX_CODE))
        if big.any():
            vals = sorted({int(v) for v in np.unique(src[big])})[:10]
            raise LabelError(self.path, f"holds class values {vals} outside 0..{MAX_CODE}",
                             "Give them as ignore values (--ignore) or renumber the classes")
        src8 = np.where(bad, NODATA, src).astype(np.uint8)
        finer = _target_res(grid, self.crs) > 1.5 * self.src_res
        # mode: "unlabelled" competes as a value of its own (no source nodata), so a coarse pixel that is mostly
        # unlabelled stays unlabelled instead of taking the class of one labelled cell it touches
        reproject(src8, out, src_transform=ds.window_transform(win), src_crs=self.crs,
                  src_nodata=None if finer else NODATA, dst_transform=grid.transform, dst_crs=grid.crs,
                  dst_nodata=NODATA, resampling=Resampling.mode if finer else Resampling.nearest)
        self.info["resampling"] = "mode" if finer else "nearest"
        self.info["reprojected"] = not (self.crs == grid.crs and np.allclose(tuple(t)[:6], tuple(grid.transform)[:6]))
        return out

    def _raster_table(self, codes_present: Sequence[int]) -> ClassTable:
        if self.table is not None:
            return self.table
        names = None
        if self.category_names:
            names = {c: self.category_names[c] for c in codes_present
                     if c < len(self.category_names) and self.category_names[c].strip()}
        return ClassTable.from_labels(list(codes_present), names=names)

    # ---------------------------------------------------------------- common
    def bounds_in(self, crs: CRS) -> tuple[float, float, float, float]:
        """Bounds of the labels in ``crs``."""
        if self.kind == "polygons":
            return tuple(float(v) for v in self._polygons_in(CRS.from_user_input(crs)).total_bounds)  # type: ignore[return-value]
        return tuple(transform_bounds(self.crs, crs, *self._ds.bounds, densify_pts=21))  # type: ignore[return-value]

    def check_overlap(self, grid: GridSpec, what: str = "the image") -> None:
        """Raise :class:`LabelError` naming both bounds when the labels lie entirely outside ``grid``."""
        lb = self.bounds_in(grid.crs)
        gb = grid.bounds
        if self.kind == "polygons":
            import shapely

            geoms = self._polygons_in(grid.crs).geometry.values
            hit = bool(shapely.intersects(geoms, shapely.box(*gb)).any())
        else:
            hit = lb[0] < gb[2] and lb[2] > gb[0] and lb[1] < gb[3] and lb[3] > gb[1]
        if not hit:
            raise LabelError(self.path, f"the labels lie entirely outside {what}: label bounds {_bounds_str(lb)} vs "
                             f"{what} bounds {_bounds_str(gb)} (both in {grid.crs.to_string()})",
                             "Check that both cover the same place and that their CRSs are declared correctly")

    def read_codes(self, grid: GridSpec) -> tuple[np.ndarray, np.ndarray, int]:
        """``(codes uint8, polygon ids int32, conflicting pixels)`` on ``grid`` (255 / 0 = unlabelled)."""
        if self.kind == "raster":
            codes = self._read_raster_codes(grid)
            return codes, np.zeros(grid.shape, dtype=np.int32), 0
        import shapely

        gdf = self._polygons_in(grid.crs)
        box = shapely.box(*grid.bounds)
        hit = shapely.intersects(gdf.geometry.values, box)
        sub = gdf[hit]
        codes = np.full(grid.shape, NODATA, dtype=np.uint8)
        pids = np.zeros(grid.shape, dtype=np.int32)
        if not len(sub):
            return codes, pids, 0
        geoms = list(sub.geometry.values)
        cl = [int(c) for c in sub["_code"]]
        kw = {"out_shape": grid.shape, "transform": grid.transform, "all_touched": False}
        fwd = rasterize(zip(geoms, cl, strict=True), fill=NODATA, dtype="uint8", **kw)
        rev = rasterize(zip(geoms[::-1], cl[::-1], strict=True), fill=NODATA, dtype="uint8", **kw)
        pids = rasterize(zip(geoms, [int(p) for p in sub["_pid"]], strict=True), fill=0, dtype="int32", **kw)
        conflict = fwd != rev
        codes = np.where(conflict, NODATA, fwd).astype(np.uint8)
        pids[codes == NODATA] = 0
        return codes, pids, int(conflict.sum())

    def read(self, grid: GridSpec, *, check: bool = False, min_classes: int = 1,
             drop_absent: bool | None = None, what: str = "the image") -> LabelRaster:
        """The labels on ``grid`` as a :class:`LabelRaster`.

        Args:
            grid: the image grid (or a window of it).
            check: run the whole-image checks (overlap, at least ``min_classes`` classes, absent classes).
            min_classes: classes needed inside ``grid`` (with ``check``).
            drop_absent: drop classes without pixels inside ``grid`` from the table (with a warning); default
                True when the table was built from the file, False for a given table.
            what: how ``grid`` is named in messages.
        """
        if check:
            self.check_overlap(grid, what)
        codes, pids, conflicts = self.read_codes(grid)
        present = sorted(int(v) for v in np.unique(codes) if v != NODATA)
        if self.kind == "raster":
            table = self._raster_table(present)
            bad = table.unknown_codes(present)
            if bad:
                raise LabelError(self.path, f"class codes {bad} are not in the class table (codes {table.codes}: "
                                 f"{', '.join(table.names)})", "Relabel them, or use a model trained with these classes")
        else:
            table = self.table
        info = dict(self.info)
        if conflicts:
            msg = (f"labels {self.path!r}: {conflicts} pixel(s) covered by polygons of different classes were left "
                   "unlabelled")
            warnings.warn(msg, stacklevel=2)
            info["conflicting_pixels"] = conflicts
        if drop_absent is None:
            drop_absent = self.given_table is None
        absent = [c for c in table.codes if c not in set(present)]
        if check and absent:
            names = [table.name_of(c) for c in absent]
            where = "inside the image extent" if what == "the image" else f"inside {what}"
            if drop_absent and len(absent) < len(table):
                warnings.warn(f"labels {self.path!r}: class(es) {names} have no labelled pixel {where} and were "
                              "dropped from the class table", stacklevel=2)
                table = table.subset(present)
                info["dropped_classes"] = names
            elif not drop_absent:
                log.info("%s: class(es) %s have no labelled pixel %s", self.path, names, where)
                info["absent_classes"] = names
        index = table.index_lut()[codes]
        if self.kind == "raster":
            pids = _patches(index)
        if check:
            n = int((index != NODATA).sum())
            if n == 0:
                raise LabelError(self.path, f"no pixel of {what} is labelled (polygons smaller than a pixel, or only "
                                 "ignored values)", "Check the labels against the image")
            if len(present) < min_classes:
                only = ", ".join(f"{table.name_of(c)!r}" for c in present)
                raise LabelError(self.path, f"only {len(present)} class ({only}) has labelled pixels {('in ' + what)}; "
                                 f"classification needs at least {min_classes}",
                                 "Add labels of other classes (or check the class column)")
        counts = np.bincount(index[index != NODATA].ravel(), minlength=len(table))
        info["pixels_per_class"] = {c.name: int(counts[i]) for i, c in enumerate(table)}
        info["n_labelled"] = int(counts.sum())
        return LabelRaster(index.astype(np.uint8), pids.astype(np.int32), table, grid, self.path, info)

    def close(self) -> None:
        """Close a class raster."""
        if self._ds is not None and not self._ds.closed:
            self._ds.close()

    def __enter__(self) -> LabelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _target_res(grid: GridSpec, crs: CRS) -> float:
    """The pixel size of ``grid`` measured in the units of ``crs`` (its centre pixel's diagonal / sqrt 2)."""
    if CRS.from_user_input(crs) == grid.crs:
        return float(min(grid.res))
    from rasterio.warp import transform

    t = grid.transform
    c, r = grid.width / 2, grid.height / 2
    xs, ys = zip(t * (c, r), t * (c + 1, r + 1), strict=True)
    tx, ty = transform(grid.crs, crs, list(xs), list(ys))
    return float(math.hypot(tx[1] - tx[0], ty[1] - ty[0]) / math.sqrt(2))


def _patches(index: np.ndarray) -> np.ndarray:
    """Connected patches (8-connectivity) of each class: ids 1.. (0 = unlabelled)."""
    out = np.zeros(index.shape, dtype=np.int32)
    nxt = 0
    for k in np.unique(index):
        if k == NODATA:
            continue
        lab, n = ndimage.label(index == k, structure=np.ones((3, 3), bool))
        out[lab > 0] = lab[lab > 0] + nxt
        nxt += n
    return out


def load_labels(
    path: str | os.PathLike[str],
    grid: GridSpec,
    *,
    column: str | None = None,
    table: ClassTable | None = None,
    ignore: Iterable[int] | int | None = None,
    layer: str | int | None = None,
    band: int = 1,
    assume_crs: Any = None,
    min_classes: int = 2,
    what: str = "the image",
) -> LabelRaster:
    """Read a polygon file or class raster onto ``grid`` with every check (see the module docstring).

    Args:
        path: polygons or a class raster.
        grid: the image grid.
        column, table, ignore, layer, band, assume_crs: see :class:`LabelSource`.
        min_classes: classes needed inside the image (2 for training; 1 to evaluate a map).
        what: how the grid is named in messages.

    Raises:
        LabelError: see the module docstring.
    """
    try:
        src = LabelSource(path, column=column, table=table, ignore=ignore, layer=layer, band=band,
                          assume_crs=assume_crs)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterReadError(path, str(exc)) from exc
    with src:
        return src.read(grid, check=True, min_classes=min_classes, what=what)


# ---------------------------------------------------------------------------------------------- splits
@dataclass
class PolygonSplit:
    """Labelled pixels assigned to splits by polygon.

    Attributes:
        masks: ``{split: [H, W] bool}`` labelled pixels of each split (after the buffer).
        polygon_split: ``{polygon id: split}``.
        buffer: the buffer in pixels.
        dropped: labelled pixels dropped by the buffer, per split.
    """

    masks: dict[str, np.ndarray]
    polygon_split: dict[int, str]
    buffer: int
    dropped: dict[str, int]

    def counts(self) -> dict[str, int]:
        """Pixels per split."""
        return {k: int(v.sum()) for k, v in self.masks.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        per: dict[str, list[int]] = {}
        for pid, s in sorted(self.polygon_split.items()):
            per.setdefault(s, []).append(int(pid))
        return {"buffer": self.buffer, "pixels": self.counts(), "dropped_by_buffer": self.dropped,
                "polygons": per}


def split_by_polygon(labels: LabelRaster, split: SpatialSplit,
                     priority: Sequence[str] = ("test", "val", "train")) -> PolygonSplit:
    """Assign every labelled pixel to a split so that polygons never straddle splits.

    1. Each polygon (``labels.polygons`` id) goes to the block split (:class:`SpatialSplit`, no buffer) that
       holds the **majority of its pixels** (ties: the first split in ``split.names``), with all its pixels.
    2. Buffer: splits are taken in ``priority`` order (``test`` keeps every pixel, then ``val``, then
       ``train``; splits not listed come last): a pixel is dropped when it lies within ``split.buffer`` pixels
       (Chebyshev distance, diagonals count one) of a pixel kept in a split of higher priority. So every kept
       pixel of one split is more than ``buffer`` pixels away from every kept pixel of any other split, and no
       training pixel touches a test polygon.

    Returns:
        a :class:`PolygonSplit`.
    """
    if labels.index.shape != (split.height, split.width):
        raise ValueError(f"labels are {labels.index.shape} but the split is {split.height}x{split.width}")
    block = split.labels()
    pids = labels.polygons
    lab = labels.labelled
    names = list(split.names)
    assign = np.full(pids.max() + 1 if pids.size else 1, -1, dtype=np.int64)
    ids = pids[lab]
    blk = block[lab]
    if ids.size:
        counts = np.zeros((assign.size, len(names)), dtype=np.int64)
        np.add.at(counts, (ids, blk), 1)
        has = counts.sum(axis=1) > 0
        assign[has] = counts[has].argmax(axis=1)
    pix_split = np.full(pids.shape, -1, dtype=np.int64)
    pix_split[lab] = assign[pids[lab]]
    order = [n for n in priority if n in names] + [n for n in names if n not in priority]
    b = int(split.buffer)
    masks: dict[str, np.ndarray] = {}
    dropped: dict[str, int] = {}
    taken = np.zeros(pids.shape, dtype=bool)
    for name in order:
        m = pix_split == names.index(name)
        before = int(m.sum())
        if b > 0 and taken.any():
            near = ndimage.maximum_filter(taken.astype(np.uint8), size=2 * b + 1, mode="constant") > 0
            m &= ~near
        masks[name] = m
        dropped[name] = before - int(m.sum())
        taken |= m
    polygon_split = {int(p): names[int(assign[p])] for p in np.unique(ids) if p > 0 and assign[p] >= 0}
    return PolygonSplit({n: masks[n] for n in names}, polygon_split, b, {n: dropped[n] for n in names})
