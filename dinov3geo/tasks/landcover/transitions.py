"""From-to land-use transitions between two class maps: a transition raster, matrices in hectares, polygons.

:func:`transitions` takes the class maps of two dates (uint8 class codes, 255 = nodata, each with its class
table; e.g. two outputs of ``dinov3geo landcover predict``) and writes into ``out_dir``:

* ``transitions.tif``: a COG whose pixel value codes the pair of classes, ``code = from_index * K + to_index``
  with the **indexes** of the ``K`` classes in the class table (not their codes); uint8 when ``K * K < 255``
  (nodata 255), else uint16 (nodata 65535). Its colour table shows unchanged pixels (``from == to``) light grey
  and every transition in the colour of its destination class (TIFF colour tables hold no transparency); its
  category names (``forest -> herbaceous``, ``forest -> forest``...) are in the GDAL PAM sidecar
  ``transitions.tif.aux.xml`` (read by GDAL and QGIS) and, with the class table and the coding rule, as JSON in
  the dataset tag ``DINOV3GEO_TRANSITIONS`` (:data:`TRANSITIONS_TAG`, read back by
  :func:`read_transition_info`). A pixel is nodata when either date is nodata (or outside date 2's footprint);
* ``transition_matrix.csv``: hectares from each class (rows) to each class (columns); the diagonal is the
  unchanged area. Areas are sums of pixel areas: planar in projected CRSs, **geodesic per row** in geographic
  CRSs (:func:`~dinov3geo.tasks.change.polygons.pixel_area_ha`), so the matrix sums to the mapped area (pixels
  valid in both dates);
* with a change detector (``change``: the change probability ``change_prob.tif`` or the binary ``change.tif``
  of ``dinov3geo change detect``, or any raster where ``value >= change_threshold`` means change):
  ``transitions_gated.tif`` and ``transition_matrix_gated.csv``, where a pixel changes class **only where
  change was detected**; elsewhere it keeps its date-1 class (``from -> from``). This suppresses the false
  transitions that two independent classifications produce where nothing changed (each map's errors show up
  as change). Where the detector has nodata (clouds, outside its footprint) the gated pixel is nodata.
  Both matrices are reported;
* ``transition_polygons.gpkg`` (``polygons=True``): one polygon per connected region of one transition
  (``from != to``; 8-connectivity by default), regions smaller than ``mmu_ha`` dropped, from the gated raster
  when there is one, else the ungated one, with ``from_class``, ``to_class``, ``transition``, ``from_code``,
  ``to_code``, ``area_ha`` (geodesic in geographic CRSs), ``n_pixels``, ``date1``, ``date2``,
  ``mean_confidence`` (when both maps carry a confidence band: the mean over the region of the product of the
  two dates' class confidences, i.e. the probability that both labels are right if their errors are
  independent) and ``mmu_ha``. Forest loss by driver is one query: ``from_class = 'forest'``. The MMU applies to
  the polygons only: the rasters and matrices are per pixel;
* ``summary.json``: inputs, class table, coding, grid, dates, both matrices (hectares and pixels), changed
  area with and without gating, polygon counts and hectares per transition, notes.

Both maps must share the class table (the same codes and names; an error names both files otherwise). When
the grids differ, date 2 is **reprojected onto date 1's grid with nearest-neighbour resampling** (class codes
are never averaged); the change raster likewise. The two maps must overlap (an error names both files
otherwise). Maps without a class table take the other map's, or one made from the codes found.

Everything is computed tile by tile (``tile x tile`` pixels, default 2048: memory is bounded by the tile, never
the whole raster): one pass reads both maps (and the change raster), writes the rasters and sums the
matrices; the polygons are built per transition with the windowed region machinery of
:mod:`~dinov3geo.tasks.change.windowed` (regions cut by tile edges joined, the MMU decided on whole regions),
reading back only the tiles where that transition occurs.

Pixel counts of classified maps are biased area estimates: for areas with confidence intervals, label a
stratified sample of the transition raster (:func:`dinov3geo.tasks.landcover.sampling.stratified_sample`) and
use :func:`dinov3geo.tasks.landcover.accuracy.assess_map` (Olofsson et al. 2014).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
from rasterio.windows import Window

from dinov3geo.io.cog import COGWriter
from dinov3geo.io.errors import RasterReadError
from dinov3geo.io.grid import GridSpec
from dinov3geo.io.sidecars import remove_sidecars, sidecar_properties, write_sidecars
from dinov3geo.io.stac import parse_date
from dinov3geo.tasks.change.polygons import pixel_area_ha
from dinov3geo.tasks.change.windowed import DEFAULT_TILE, tile_windows, windowed_change_polygons
from dinov3geo.tasks.landcover.classes import NODATA, ClassTable, ClassTableError, read_class_table
from dinov3geo.utils.atomic import atomic_path
from dinov3geo.utils.outputs import make_output_folder, remove_owned, writes_output_folder

__all__ = [
    "TRANSITIONS_KIND",
    "TRANSITIONS_TAG",
    "TransitionError",
    "TransitionResult",
    "read_transition_info",
    "transition_names",
    "transitions",
]

log = logging.getLogger(__name__)

#: the dinov3geo folder kind of a transitions output folder
TRANSITIONS_KIND = "transitions"
#: the dataset tag of a transition raster (JSON: class table, K, coding rule, nodata, gating)
TRANSITIONS_TAG = "DINOV3GEO_TRANSITIONS"
#: colour of unchanged pixels in the transition raster's colour table
UNCHANGED_RGB = (200, 200, 200)
_FILES = ("transitions.tif", "transitions_gated.tif", "transition_matrix.csv", "transition_matrix_gated.csv",
          "transition_polygons.gpkg", "summary.json")
_GDAL_CACHE_MB = 64


class TransitionError(ValueError):
    """Two class maps cannot be compared (different class tables, no overlap, unknown codes)."""


@dataclass
class TransitionResult:
    """What :func:`transitions` wrote and found.

    Attributes:
        out_dir: the output folder.
        paths: output files by name (``transitions``, ``matrix``, ``transitions_gated``, ``matrix_gated``,
            ``polygons``, ``summary``).
        table: the class table (row/column order of the matrices, index order of the codes).
        matrix_ha: ``[K, K]`` hectares from (rows) to (columns), ungated.
        matrix_px: ``[K, K]`` pixel counts, ungated.
        matrix_gated_ha, matrix_gated_px: the same with change gating (None without a change raster).
        n_polygons: transition polygons written (0 when ``polygons=False``).
        summary: the content of ``summary.json``.
    """

    out_dir: Path
    paths: dict[str, Path]
    table: ClassTable
    matrix_ha: np.ndarray
    matrix_px: np.ndarray
    matrix_gated_ha: np.ndarray | None = None
    matrix_gated_px: np.ndarray | None = None
    n_polygons: int = 0
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def mapped_ha(self) -> float:
        """Hectares valid in both dates (the sum of the ungated matrix)."""
        return float(self.matrix_ha.sum())

    @property
    def changed_ha(self) -> float:
        """Hectares whose class changed (off-diagonal of the ungated matrix)."""
        return float(self.matrix_ha.sum() - np.trace(self.matrix_ha))

    def frame(self, gated: bool = False) -> pd.DataFrame:
        """A matrix (hectares) as a DataFrame, rows = from, columns = to (class names)."""
        m = self.matrix_gated_ha if gated else self.matrix_ha
        if m is None:
            raise ValueError("no gated matrix: run transitions() with a change raster")
        return _matrix_frame(m, self.table)


# ---------------------------------------------------------------------- coding
def transition_names(table: ClassTable) -> list[str]:
    """Category names of the transition codes: entry ``i * K + j`` is ``"<class i> -> <class j>"``."""
    names = table.names
    return [f"{a} -> {b}" for a in names for b in names]


def _dtype_for(k: int) -> tuple[str, int]:
    """The transition raster's dtype and nodata for ``k`` classes."""
    return ("uint8", 255) if k * k < 255 else ("uint16", 65535)


def _colormap(table: ClassTable) -> dict[int, tuple[int, int, int, int]]:
    k = len(table)
    cm: dict[int, tuple[int, int, int, int]] = {}
    for i in range(k):
        for j, c in enumerate(table.classes):
            cm[i * k + j] = (*UNCHANGED_RGB, 255) if i == j else (*c.rgb, 255)
    _, nd = _dtype_for(k)
    cm[nd] = (0, 0, 0, 0)
    return cm


def _info(table: ClassTable, gated: bool, threshold: float | None) -> dict[str, Any]:
    k = len(table)
    dtype, nd = _dtype_for(k)
    return {"classes": table.to_dict(), "k": k, "coding": "from_index * k + to_index (indexes in the class table)",
            "dtype": dtype, "nodata": nd, "gated": gated, "change_threshold": threshold}


def read_transition_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``DINOV3GEO_TRANSITIONS`` tag of a transition raster, with ``table`` (a :class:`ClassTable`) and
    ``names`` (the category names) added.

    Raises:
        TransitionError: the file is not a transition raster written by dinov3geo.
    """
    try:
        with rasterio.open(path) as ds:
            raw = ds.tags().get(TRANSITIONS_TAG)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterReadError(path, str(exc).split("\n")[0]) from exc
    if not raw:
        raise TransitionError(f"{os.fspath(path)!r} is not a transition raster (no {TRANSITIONS_TAG} tag); write "
                              "one with `dinov3geo change transitions`")
    info = json.loads(raw)
    info["table"] = ClassTable.from_json(info["classes"])
    info["names"] = transition_names(info["table"])
    return info


class _PaletteCOGWriter(COGWriter):
    """A :class:`COGWriter` that gives band 1 a colour table (GDAL copies it into the COG)."""

    def __init__(self, *args: Any, colormap: dict[int, tuple[int, int, int, int]], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._colormap = colormap

    def _set_metadata(self, ds: Any) -> None:
        super()._set_metadata(ds)
        ds.write_colormap(1, self._colormap)


def _write_categories(path: Path, names: Sequence[str]) -> Path:
    """The PAM sidecar ``<path>.aux.xml`` with band 1's category names (indexed by pixel value), atomically."""
    aux = Path(f"{path}.aux.xml")
    root = ET.Element("PAMDataset")
    band = ET.SubElement(root, "PAMRasterBand", band="1")
    cats = ET.SubElement(band, "CategoryNames")
    for n in names:
        ET.SubElement(cats, "Category").text = n
    ET.indent(root, space="  ")
    with atomic_path(aux) as tmp:
        tmp.write_text(ET.tostring(root, encoding="unicode") + "\n", encoding="utf-8")
    return aux


def _matrix_frame(m: np.ndarray, table: ClassTable) -> pd.DataFrame:
    return pd.DataFrame(m, index=pd.Index(table.names, name="from \\ to"), columns=table.names)


def _write_matrix(path: Path, m: np.ndarray, table: ClassTable) -> Path:
    with atomic_path(path) as tmp:
        _matrix_frame(m, table).to_csv(tmp, float_format="%.10g")
    return path


# ---------------------------------------------------------------------- inputs
def _check_map(path: Any, role: str) -> GridSpec:
    try:
        with rasterio.open(path) as ds:
            if ds.crs is None:
                raise RasterReadError(path, f"the {role} class map has no coordinate reference system",
                                      "Set one with `gdal_edit.py -a_srs EPSG:xxxx`.")
            if not np.issubdtype(np.dtype(ds.dtypes[0]), np.integer):
                raise RasterReadError(path, f"the {role} map's band 1 is {ds.dtypes[0]}, not class codes",
                                      "Give class maps (uint8 codes, 255 = nodata) from `dinov3geo landcover predict`.")
            return GridSpec.from_dataset(ds)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterReadError(path, str(exc).split("\n")[0]) from exc


def _table_or_none(path: Any) -> ClassTable | None:
    try:
        return read_class_table(path)
    except ClassTableError:
        return None


def _codes_present(path: Any) -> set[int]:
    found: set[int] = set()
    with rasterio.open(path) as ds:
        for _, win in ds.block_windows(1):
            a = ds.read(1, window=win, masked=True)
            vals = np.unique(a.compressed()) if np.ma.is_masked(a) else np.unique(np.asarray(a))
            found.update(int(v) for v in vals if 0 <= int(v) <= 254)
    return found


def _same_classes(a: ClassTable, b: ClassTable) -> bool:
    return {(c.code, c.name.lower()) for c in a} == {(c.code, c.name.lower()) for c in b}


def _resolve_table(map1: Any, map2: Any, classes: ClassTable | str | os.PathLike[str] | None,
                   notes: list[str]) -> ClassTable:
    if classes is not None:
        from dinov3geo.tasks.landcover.accuracy import map_class_table

        return map_class_table(map1, classes)[0]
    t1, t2 = _table_or_none(map1), _table_or_none(map2)
    if t1 is not None and t2 is not None:
        if not _same_classes(t1, t2):
            raise TransitionError(
                f"the class maps {os.fspath(map1)!r} ({', '.join(f'{c.code}={c.name}' for c in t1)}) and "
                f"{os.fspath(map2)!r} ({', '.join(f'{c.code}={c.name}' for c in t2)}) have different class tables; "
                "classify both dates with the same model (or pass one class table for both)")
        return t1
    if t1 is not None or t2 is not None:
        which = map2 if t1 is not None else map1
        notes.append(f"{os.fspath(which)!r} has no class table; the other map's is used for both")
        return t1 if t1 is not None else t2  # type: ignore[return-value]
    codes = sorted(_codes_present(map1) | _codes_present(map2))
    if not codes:
        raise TransitionError(f"the class maps {os.fspath(map1)!r} and {os.fspath(map2)!r} hold no class value "
                              "(all nodata)")
    notes.append(f"neither map has a class table; classes named after the codes found ({codes})")
    return ClassTable.from_labels(codes)


def _check_overlap(map1: Any, map2: Any, g1: GridSpec, g2: GridSpec, what: str = "class maps") -> None:
    import shapely
    from rasterio.warp import transform_bounds

    b2 = transform_bounds(g2.crs, g1.crs, *g2.bounds, densify_pts=21)
    inter = shapely.box(*g1.bounds).intersection(shapely.box(*b2))
    if inter.is_empty or inter.area <= 0:
        raise TransitionError(f"the {what} {os.fspath(map1)!r} and {os.fspath(map2)!r} do not overlap "
                              f"(bounds {tuple(round(x, 6) for x in g1.bounds)} and {tuple(round(x, 6) for x in b2)} "
                              f"in {g1.crs.to_string()}); give two maps of the same area")


def _date(path: Any, given: Any) -> str | None:
    from dinov3geo.tasks.change.coregister import date_of, normalise_date

    if given is not None:
        return normalise_date(given)
    with contextlib.suppress(Exception):
        from dinov3geo.io.sources import open_scene

        return date_of(open_scene(path, bands=[1]), path)[0]
    return None


def _has_confidence(path: Any) -> bool:
    with rasterio.open(path) as ds:
        return ds.count >= 2 and (ds.descriptions[1] or "").lower() == "confidence"


def _inputs(a: dict[str, Any]) -> list[Any]:
    """Everything :func:`transitions` reads (for the output guard)."""
    return [a.get(k) for k in ("map1", "map2", "change", "classes")
            if isinstance(a.get(k), str | os.PathLike)]


class _Reader:
    """Band ``band`` of a raster window by window on ``grid`` (nearest resampling), float32 NaN = invalid."""

    def __init__(self, path: Any, grid: GridSpec, band: int = 1) -> None:
        from dinov3geo.tasks.change.deforestation import GridReader

        self._r = GridReader(path, grid, resampling="nearest", band=band)

    def __enter__(self) -> _Reader:
        self._r.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._r.__exit__(*exc)

    def read(self, win: Window) -> np.ndarray:
        return self._r.read(win)


def _indexes(values: np.ndarray, lut: np.ndarray, path: Any) -> np.ndarray:
    """Class indexes (uint8, 255 = nodata) of a window of class codes read as float32 (NaN = nodata)."""
    ok = np.isfinite(values)
    codes = np.where(ok, values, NODATA).astype(np.int64)
    codes[(codes < 0) | (codes > 255)] = -1
    if (codes < 0).any():
        raise TransitionError(f"class map {os.fspath(path)!r} holds values outside the class codes 0..254")
    idx = lut[codes]
    bad = (idx == NODATA) & (codes != NODATA)
    if bad.any():
        found = sorted({int(c) for c in np.unique(codes[bad])})
        raise TransitionError(f"class map {os.fspath(path)!r} holds codes {found} that the class table lacks; "
                              "give the matching class table")
    return idx


def _confidence(values: np.ndarray) -> np.ndarray:
    """uint8 percent (255 = none) read as float32 -> probability 0..1 (NaN = none)."""
    v = np.asarray(values, dtype=np.float32)
    return np.where(np.isfinite(v) & (v <= 100), v / 100.0, np.nan).astype(np.float32)


# ---------------------------------------------------------------------- the task
@writes_output_folder("out_dir", kind=TRANSITIONS_KIND, inputs=_inputs, what="change transitions", files=_FILES)
def transitions(
    map1: str | os.PathLike[str],
    map2: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    change: str | os.PathLike[str] | None = None,
    change_threshold: float = 0.5,
    mmu_ha: float = 0.0,
    polygons: bool = True,
    connectivity: int = 8,
    classes: ClassTable | str | os.PathLike[str] | None = None,
    dates: Sequence[Any] | None = None,
    tile: int = DEFAULT_TILE,
    progress: bool = True,
    sidecars: bool | dict[str, Any] = True,
) -> TransitionResult:
    """Transition raster, matrices (hectares) and polygons between two class maps (see the module docstring).

    Args:
        map1, map2: class maps of date 1 (from) and date 2 (to); map 2 is read on map 1's grid.
        out_dir: output folder (created and marked as a dinov3geo ``transitions`` folder; an existing folder
            must be empty or one of ours).
        change: optional change probability / binary change raster gating the transitions.
        change_threshold: ``change >= change_threshold`` is change (0.5 suits both ``change_prob.tif`` and the
            0/1 ``change.tif``).
        mmu_ha: minimum mapping unit of the transition polygons (hectares; 0 keeps every region).
        polygons: write ``transition_polygons.gpkg``.
        connectivity: 4 or 8 for the polygons' regions.
        classes: a class table (or JSON file) overriding the maps' own.
        dates: ``(date1, date2)`` overriding the dates found in the maps' metadata or file names.
        tile: tile size in pixels (memory bound; results do not depend on it).
        progress: progress bars.
        sidecars: writes ``<product>.stac.json`` (STAC Item with the maps, the change raster and the class
            table; dated ``dates`` when both are given) for the transition rasters and polygons and, for the
            rasters, a QGIS ``.qml`` style + GDAL statistics (:func:`dinov3geo.io.sidecars.write_sidecars`; never
            fails the task). ``sidecars=False`` to skip; a dict adds its entries to the Items' properties. The
            sidecars of an earlier run's product that this run does not write again are removed with it.

    Raises:
        TransitionError: different class tables, no overlap, codes outside the table (naming the files).
        RasterReadError: an unreadable map or one without a CRS.
        OutputConflictError: ``out_dir`` is an input, contains one, or is a folder dinov3geo did not create.
    """
    from dinov3geo.utils.progress import progress_bar

    if not 0 <= float(mmu_ha) < float("inf"):
        raise ValueError(f"mmu_ha must be a finite number >= 0, got {mmu_ha}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    if int(tile) < 16:
        raise ValueError(f"tile must be >= 16 pixels, got {tile}")
    notes: list[str] = []
    g1 = _check_map(map1, "date-1")
    g2 = _check_map(map2, "date-2")
    _check_overlap(map1, map2, g1, g2)
    if not g2.same_as(g1):
        notes.append(f"{os.fspath(map2)!r} is on another grid: reprojected onto the grid of {os.fspath(map1)!r} with "
                     "nearest-neighbour resampling")
    if change is not None:
        gc = _check_change(change)
        _check_overlap(map1, change, g1, gc, what="class map and change raster")
        if not gc.same_as(g1):
            notes.append(f"the change raster {os.fspath(change)!r} is on another grid: read on the date-1 grid with "
                         "nearest-neighbour resampling")
    table = _resolve_table(map1, map2, classes, notes)
    k = len(table)
    dtype, nd = _dtype_for(k)
    lut = table.index_lut().astype(np.int64)
    d1 = _date(map1, dates[0] if dates else None)
    d2 = _date(map2, dates[1] if dates else None)
    conf = _has_confidence(map1) and _has_confidence(map2)
    gated = change is not None
    fresh = not Path(out_dir).exists()
    out = make_output_folder(out_dir, _inputs(locals()), kind=TRANSITIONS_KIND)
    try:
        names = transition_names(table)
        row_area = pixel_area_ha(g1)[:, 0]
        windows = tile_windows(g1.height, g1.width, int(tile))
        mat = np.zeros((2, k * k), dtype=np.float64)
        pix = np.zeros((2, k * k), dtype=np.int64)
        nodata_px = np.zeros(2, dtype=np.int64)
        suppressed = np.zeros(2, dtype=np.float64)  # hectares / pixels of change not confirmed by the detector
        present: dict[tuple[int, int], np.ndarray] = {}  # tile -> changed codes of the polygon raster
        paths: dict[str, Path] = {"transitions": out / "transitions.tif", "matrix": out / "transition_matrix.csv"}
        if gated:
            paths.update(transitions_gated=out / "transitions_gated.tif",
                         matrix_gated=out / "transition_matrix_gated.csv")
        changed_codes = np.array([i * k + j for i in range(k) for j in range(k) if i != j], dtype=np.int64)
        cm = _colormap(table)
        tags_common = {"DATE1": d1 or "", "DATE2": d2 or "", "MAP1": os.fspath(map1), "MAP2": os.fspath(map2)}
        with ExitStack() as stack:
            r1 = stack.enter_context(_Reader(map1, g1))
            r2 = stack.enter_context(_Reader(map2, g1))
            rc = stack.enter_context(_Reader(change, g1)) if gated else None
            writers = [stack.enter_context(_PaletteCOGWriter(
                paths["transitions"], g1, 1, dtype, nodata=nd, band_names=["transition"], colormap=cm,
                tags={**tags_common, TRANSITIONS_TAG: json.dumps(_info(table, False, None))},
                overview_resampling="nearest", gdal_cachemax_mb=_GDAL_CACHE_MB))]
            if gated:
                writers.append(stack.enter_context(_PaletteCOGWriter(
                    paths["transitions_gated"], g1, 1, dtype, nodata=nd, band_names=["transition"], colormap=cm,
                    tags={**tags_common, "CHANGE": os.fspath(change),
                          TRANSITIONS_TAG: json.dumps(_info(table, True, float(change_threshold)))},
                    overview_resampling="nearest", gdal_cachemax_mb=_GDAL_CACHE_MB)))
            with progress_bar(total=len(windows), desc="transitions", disable=not progress) as bar:
                for win in windows:
                    i1 = _indexes(r1.read(win), lut, map1)
                    i2 = _indexes(r2.read(win), lut, map2)
                    valid = (i1 != NODATA) & (i2 != NODATA)
                    raw = np.where(valid, i1 * k + i2, nd)
                    layers = [(raw, valid)]
                    if rc is not None:
                        ch = rc.read(win)
                        known = np.isfinite(ch)
                        detected = known & (ch >= change_threshold)
                        gvalid = valid & known
                        gcode = np.where(gvalid, np.where(detected, raw, i1 * (k + 1)), nd)
                        layers.append((gcode, gvalid))
                    r0, h = int(win.row_off), int(win.height)
                    weights = np.broadcast_to(row_area[r0: r0 + h, None], raw.shape)
                    if rc is not None:
                        off = gvalid & ~detected & (i1 != i2)
                        suppressed += (float(weights[off].sum()), int(off.sum()))
                    for li, (codes, ok) in enumerate(layers):
                        writers[li].write(codes.astype(dtype), win)
                        c = codes[ok]
                        pix[li] += np.bincount(c, minlength=k * k)
                        mat[li] += np.bincount(c, weights=weights[ok], minlength=k * k)
                        nodata_px[li] += int((~ok).sum())
                    final = layers[-1][0]
                    found = np.unique(final)
                    present[(int(win.row_off), int(win.col_off))] = found[np.isin(found, changed_codes)]
                    bar.update(1)
        for key in ("transitions", "transitions_gated"):
            if key in paths:
                _write_categories(paths[key], names)
        matrix_ha = mat[0].reshape(k, k)
        matrix_px = pix[0].reshape(k, k)
        _write_matrix(paths["matrix"], matrix_ha, table)
        matrix_g_ha = matrix_g_px = None
        if gated:
            matrix_g_ha, matrix_g_px = mat[1].reshape(k, k), pix[1].reshape(k, k)
            _write_matrix(paths["matrix_gated"], matrix_g_ha, table)

        n_poly = 0
        poly_stats: dict[str, dict[str, float]] = {}
        if polygons:
            final_path = paths["transitions_gated" if gated else "transitions"]
            final_px = (matrix_g_px if gated else matrix_px).reshape(-1)  # type: ignore[union-attr]
            gdf = _transition_polygons(final_path, g1, table, [int(c) for c in changed_codes if final_px[c] > 0],
                                       present, int(tile), mmu_ha=float(mmu_ha), connectivity=connectivity,
                                       date1=d1, date2=d2, conf_paths=(map1, map2) if conf else None,
                                       progress=progress)
            from dinov3geo.io.vector import write_vector

            paths["polygons"] = write_vector(gdf, out / "transition_polygons.gpkg", layer="transitions")
            n_poly = len(gdf)
            for name, grp in gdf.groupby("transition", sort=False):
                poly_stats[str(name)] = {"n_polygons": int(len(grp)), "area_ha": float(grp["area_ha"].sum())}
        # outputs of an earlier run in this folder that this run does not produce would be stale
        for name in ("transitions_gated.tif", "transition_matrix_gated.csv", "transition_polygons.gpkg"):
            p = out / name
            if p not in paths.values() and p.exists():
                p.unlink()
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{p}.aux.xml").unlink()
                remove_sidecars(p)

        summary = _summary(map1, map2, change, change_threshold, table, g1, dtype, nd, d1, d2, mmu_ha, matrix_ha,
                           matrix_px, matrix_g_ha, matrix_g_px, nodata_px, suppressed, row_area, poly_stats, n_poly,
                           notes, paths)
        paths["summary"] = out / "summary.json"
        with atomic_path(paths["summary"]) as tmp:
            tmp.write_text(json.dumps(summary, indent=1) + "\n")
        for msg in notes:
            log.info(msg)
        props = sidecar_properties(sidecars, "dinov3geo.tasks.landcover.transitions.transitions")
        if props is not None:
            stamps = None
            if dates and len(dates) == 2 and dates[0] and dates[1]:
                try:
                    stamps = (parse_date(dates[0], "date1"), parse_date(dates[1], "date2"))
                except (TypeError, ValueError):
                    stamps = None  # the Items then take their dates from the maps
            table_file = classes if isinstance(classes, str | os.PathLike) else None
            write_sidecars(paths.values(), inputs=[map1, map2, change, table_file], datetime=stamps,
                           extra_properties=props)
        return TransitionResult(out, paths, table, matrix_ha, matrix_px, matrix_g_ha, matrix_g_px, n_poly, summary)
    except BaseException:
        if fresh:  # a failed run leaves no folder behind (the writers already removed their files)
            with contextlib.suppress(OSError):
                remove_owned(out, kinds=[TRANSITIONS_KIND])
        raise


def _check_change(change: Any) -> GridSpec:
    try:
        with rasterio.open(change) as ds:
            if ds.crs is None:
                raise RasterReadError(change, "the change raster has no coordinate reference system",
                                      "Set one with `gdal_edit.py -a_srs EPSG:xxxx`.")
            return GridSpec.from_dataset(ds)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterReadError(change, str(exc).split("\n")[0]) from exc


def _transition_polygons(path: Path, grid: GridSpec, table: ClassTable, codes: list[int],
                         present: dict[tuple[int, int], np.ndarray], tile: int, *, mmu_ha: float,
                         connectivity: int, date1: str | None, date2: str | None,
                         conf_paths: tuple[Any, Any] | None, progress: bool) -> Any:
    """Polygons of the regions of each transition ``codes`` in the transition raster ``path``."""
    import geopandas as gpd

    from dinov3geo.utils.progress import progress_bar

    k = len(table)
    names = table.names
    frames = []
    with ExitStack() as stack:
        ds = stack.enter_context(rasterio.open(path))
        c1 = c2 = None
        if conf_paths is not None:
            c1 = stack.enter_context(_Reader(conf_paths[0], grid, band=2))
            c2 = stack.enter_context(_Reader(conf_paths[1], grid, band=2))
        with progress_bar(total=len(codes), desc="transition polygons", disable=not progress) as bar:
            for code in codes:
                def mask(win: Window, code: int = code) -> np.ndarray:
                    key = (int(win.row_off), int(win.col_off))
                    if code not in present.get(key, ()):
                        return np.zeros((int(win.height), int(win.width)), dtype=bool)
                    return ds.read(1, window=win) == code

                prob = None
                if c1 is not None and c2 is not None:
                    def prob(win: Window, code: int = code) -> np.ndarray:
                        key = (int(win.row_off), int(win.col_off))
                        if code not in present.get(key, ()):
                            return np.full((int(win.height), int(win.width)), np.nan, dtype=np.float32)
                        return _confidence(c1.read(win)) * _confidence(c2.read(win))

                gdf = windowed_change_polygons(mask, grid, tile=tile, mmu_ha=mmu_ha, connectivity=connectivity,
                                               date_before=date1, date_after=date2, prob=prob)
                i, j = divmod(code, k)
                gdf.insert(1, "from_class", names[i])
                gdf.insert(2, "to_class", names[j])
                gdf.insert(3, "transition", f"{names[i]} -> {names[j]}")
                gdf.insert(4, "from_code", table.codes[i])
                gdf.insert(5, "to_code", table.codes[j])
                frames.append(gdf)
                bar.update(1)
    cols = ["id", "from_class", "to_class", "transition", "from_code", "to_code", "area_ha", "n_pixels",
            "date_before", "date_after"] + (["mean_prob"] if conf_paths is not None else [])
    if frames:
        gdf = pd.concat(frames, ignore_index=True)
        gdf = gpd.GeoDataFrame(gdf, geometry="geometry", crs=grid.crs)
    else:
        empty: dict[str, Any] = {c: [] for c in cols}
        gdf = gpd.GeoDataFrame(empty, geometry=gpd.GeoSeries([], crs=grid.crs), crs=grid.crs)
    gdf = gdf[[*cols, "geometry"]].rename(columns={"date_before": "date1", "date_after": "date2",
                                                   "mean_prob": "mean_confidence"})
    gdf = gdf.sort_values("area_ha", ascending=False, kind="stable").reset_index(drop=True)
    gdf["id"] = np.arange(1, len(gdf) + 1, dtype=np.int64)
    gdf["mmu_ha"] = float(mmu_ha)
    for c in ("from_code", "to_code", "n_pixels"):
        gdf[c] = gdf[c].astype(np.int64)
    gdf["area_ha"] = gdf["area_ha"].astype(np.float64)
    return gdf


def _summary(map1: Any, map2: Any, change: Any, threshold: float, table: ClassTable, grid: GridSpec, dtype: str,
             nd: int, d1: str | None, d2: str | None, mmu_ha: float, m: np.ndarray, mp: np.ndarray,
             mg: np.ndarray | None, mgp: np.ndarray | None, nodata_px: np.ndarray, suppressed: np.ndarray,
             row_area: np.ndarray, poly: dict[str, dict[str, float]], n_poly: int, notes: list[str],
             paths: dict[str, Path]) -> dict[str, Any]:
    """The content of ``summary.json``."""
    names = table.names

    def block(mat: np.ndarray, px: np.ndarray, nodata: int) -> dict[str, Any]:
        changed = float(mat.sum() - np.trace(mat))
        rows = [{"from": names[i], "to": names[j], "area_ha": float(mat[i, j]), "pixels": int(px[i, j])}
                for i in range(len(names)) for j in range(len(names)) if i != j and px[i, j] > 0]
        rows.sort(key=lambda r: -r["area_ha"])
        return {"mapped_ha": float(mat.sum()), "changed_ha": changed, "unchanged_ha": float(np.trace(mat)),
                "nodata_pixels": int(nodata), "matrix_ha": mat.tolist(), "matrix_pixels": px.astype(int).tolist(),
                "from_area_ha": dict(zip(names, mat.sum(axis=1).tolist(), strict=True)),
                "to_area_ha": dict(zip(names, mat.sum(axis=0).tolist(), strict=True)),
                "transitions": rows}

    out: dict[str, Any] = {
        "inputs": {"map1": os.fspath(map1), "map2": os.fspath(map2),
                   "change": os.fspath(change) if change is not None else None,
                   "change_threshold": float(threshold) if change is not None else None},
        "dates": {"date1": d1, "date2": d2},
        "classes": table.to_dict(),
        "coding": {"rule": "from_index * k + to_index", "k": len(table), "dtype": dtype, "nodata": nd,
                   "names": transition_names(table)},
        "grid": {**grid.to_dict(), "area_ha": float(row_area.sum() * grid.width)},
        "ungated": block(m, mp, int(nodata_px[0])),
        "mmu_ha": float(mmu_ha),
        "polygons": {"source": "transitions_gated.tif" if mg is not None else "transitions.tif",
                     "n_polygons": n_poly, "by_transition": poly},
        "notes": notes,
        "disclaimer": "Pixel counts of classified maps are biased estimates of area; label a stratified sample and "
                      "use `dinov3geo landcover areas` (Olofsson et al. 2014) for areas with confidence intervals.",
        "outputs": {k: p.name for k, p in paths.items()},
    }
    if mg is not None and mgp is not None:
        g = block(mg, mgp, int(nodata_px[1]))
        g["suppressed_ha"] = float(suppressed[0])  # changed in the maps, no change detected: kept as date 1
        g["suppressed_pixels"] = int(suppressed[1])
        out["gated"] = g
    return out
