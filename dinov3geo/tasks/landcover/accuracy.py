"""Area estimation and accuracy assessment with honest uncertainty: the stratified estimator of Olofsson et al.

Pixel counts of a classified map are biased estimates of area: every omission and commission error moves
hectares from one class to another. Olofsson et al. (2014) [1]_ (with the producer's-accuracy variance of
Olofsson et al. 2013 [2]_) estimate the area of each class from a *reference sample* instead, with the map as
the stratification, and give every number a standard error:

* strata ``i`` = map classes, with mapped area ``A_i`` (hectares) and weight ``W_i = A_i / A``;
* ``n_ij``: sample units mapped as ``i`` whose reference class is ``j`` (rows map, columns reference);
* estimated error matrix of area proportions ``p_ij = W_i n_ij / n_i.`` (Eq. 4 / 9);
* error-adjusted area of class ``k``: ``A_k = A p_.k``, standard error
  ``S(p_.k) = sqrt(sum_i W_i^2 (n_ik/n_i.)(1 - n_ik/n_i.) / (n_i. - 1))`` (Eq. 10), ``S(A_k) = A S(p_.k)`` and
  the 95 % confidence interval ``A_k +/- 1.96 S(A_k)`` (Eq. 11);
* user's accuracy ``U_i = p_ii / p_i.`` with ``V(U_i) = U_i (1 - U_i) / (n_i. - 1)`` (Eq. 2, 6);
* producer's accuracy ``P_j = p_jj / p_.j`` with the full variance of Eq. 7 (both the stratum of ``j`` and
  the omission errors found in the other strata);
* overall accuracy ``O = sum_j p_jj`` with ``V(O) = sum_i W_i^2 U_i (1 - U_i) / (n_i. - 1)`` (Eq. 1, 5).

The sample must be a stratified random sample of the map (:func:`dinov3geo.tasks.landcover.sampling.
stratified_sample` draws one) or a simple random / systematic one (then the same formulas are the
post-stratified estimator). Like the paper, no finite-population correction is applied (the map has many more
pixels than the sample).

Edge cases, each reported in :attr:`AreaEstimate.notes` and as an :class:`AccuracyWarning`:

* a stratum with **one** sample unit: its variance cannot be estimated (``n_i. - 1 = 0``), so every standard
  error that sums over that stratum is NaN (areas and accuracies themselves are still estimated);
* a map class with mapped area but **no** sample unit: its error rate is unknown; its area is carried as
  mapped (``p_ii = W_i``, assumed correct, variance 0) and it is listed in :attr:`AreaEstimate.unsampled`.
  Draw samples for every class to avoid this;
* reference classes never mapped appear as columns (their area comes entirely from omission errors);
* producer's accuracy of a class with estimated area 0 is NaN.

:func:`assess_map` does it from a class map and a reference sample file: points (the map class at the point's
pixel) or polygons (each polygon is **one** sample unit whose map class is the **majority** class of the map
pixels whose centres lie inside it, ties to the lowest code; polygons smaller than a pixel take the pixels
they touch). Units outside the map, on map nodata or without a reference label are dropped and counted in
:attr:`AreaEstimate.dropped`. The mapped areas are summed over the whole map window by window (memory bounded
by the window, never the whole raster), with geodesic pixel areas for geographic CRSs
(:func:`~dinov3geo.tasks.change.polygons.pixel_area_ha`). Note that polygon sample units are an approximation
of the paper's pixel-based design: an area-weighted design would need the polygons' inclusion probabilities.

References:
    .. [1] Olofsson, P., Foody, G. M., Herold, M., Stehman, S. V., Woodcock, C. E., Wulder, M. A. (2014). Good
       practices for estimating area and assessing accuracy of land change. Remote Sensing of Environment 148,
       42-57. doi:10.1016/j.rse.2014.02.015
    .. [2] Olofsson, P., Foody, G. M., Stehman, S. V., Woodcock, C. E. (2013). Making better use of accuracy data
       in land change studies: estimating accuracy and area and quantifying uncertainty using stratified
       estimation. Remote Sensing of Environment 129, 122-131.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dinov3geo.io.errors import RasterReadError, VectorReadError
from dinov3geo.io.grid import GridSpec
from dinov3geo.tasks.landcover.classes import NODATA, ClassTable, ClassTableError, read_class_table
from dinov3geo.utils.atomic import atomic_path
from dinov3geo.utils.outputs import make_output_folder, writes_output_folder

__all__ = [
    "Z95",
    "AccuracyWarning",
    "AreaEstimate",
    "MapCounts",
    "AREAS_KIND",
    "area_report",
    "assess_map",
    "count_map",
    "estimate_areas",
    "map_class_table",
    "parse_reference",
    "row_strips",
    "sample_map",
    "write_area_report",
]

#: the normal quantile of a 95 % two-sided confidence interval, as used by Olofsson et al. (2014)
Z95 = 1.96
#: default side (pixels) of the windows the map is read in
DEFAULT_WINDOW = 2048
#: the dinov3geo folder kind of an area-estimation output folder
AREAS_KIND = "landcover-areas"
#: the files :func:`area_report` writes
AREA_FILES = ("areas.csv", "error_matrix.csv", "error_matrix_counts.csv", "accuracy.json")


class AccuracyWarning(UserWarning):
    """A part of an area/accuracy estimate cannot be estimated from the sample (see the module docstring)."""


# ---------------------------------------------------------------------- the estimate
@dataclass
class AreaEstimate:
    """Error-adjusted areas and accuracies of a class map from a stratified reference sample.

    Every array has one entry per class, in :attr:`codes` order (the class table's order, then reference-only
    classes). Areas are in hectares; ``*_se`` are standard errors; confidence intervals are ``value +/- z * se``.

    Attributes:
        codes, names: the classes (map classes = strata, and reference classes).
        counts: ``[K, K]`` sample counts ``n_ij`` (rows map class, columns reference class).
        mapped_area_ha: ``[K]`` mapped area of each class (the strata sizes).
        proportions: ``[K, K]`` estimated error matrix of area proportions ``p_ij`` (sums to 1).
        area_ha, area_se_ha: ``[K]`` error-adjusted area and its standard error.
        user, user_se: ``[K]`` user's accuracy (1 - commission error) and standard error.
        producer, producer_se: ``[K]`` producer's accuracy (1 - omission error) and standard error.
        overall, overall_se: overall accuracy and standard error.
        z: the normal quantile of the confidence intervals (1.96: 95 %).
        unsampled: codes of map classes with mapped area but no sample unit (carried as mapped).
        dropped: sample units not used, by reason (``outside_map``, ``map_nodata``, ``no_reference``).
        notes: what could not be estimated and why (also issued as :class:`AccuracyWarning`).
        source: where the inputs came from (map, reference file, column), for reports.
    """

    codes: list[int]
    names: list[str]
    counts: np.ndarray
    mapped_area_ha: np.ndarray
    proportions: np.ndarray
    area_ha: np.ndarray
    area_se_ha: np.ndarray
    user: np.ndarray
    user_se: np.ndarray
    producer: np.ndarray
    producer_se: np.ndarray
    overall: float
    overall_se: float
    z: float = Z95
    unsampled: list[int] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived
    @property
    def total_area_ha(self) -> float:
        """The mapped area of all classes (hectares): the total the estimated areas sum to."""
        return float(self.mapped_area_ha.sum())

    @property
    def weights(self) -> np.ndarray:
        """``[K]`` stratum weights ``W_i`` (share of the mapped area)."""
        tot = self.total_area_ha
        return self.mapped_area_ha / tot if tot > 0 else np.zeros_like(self.mapped_area_ha)

    @property
    def n_samples(self) -> np.ndarray:
        """``[K]`` sample units per map class (stratum), ``n_i.``."""
        return self.counts.sum(axis=1)

    @property
    def area_ci_ha(self) -> np.ndarray:
        """``[K]`` half-width of the confidence interval of the area (``z * area_se_ha``)."""
        return self.z * self.area_se_ha

    @property
    def n_used(self) -> int:
        """Sample units used in the estimate."""
        return int(self.counts.sum())

    def index(self, key: int | str) -> int:
        """The position of a class given by code or name (case-insensitive).

        Raises:
            KeyError: naming the key and the known classes.
        """
        if isinstance(key, int | np.integer) and int(key) in self.codes:
            return self.codes.index(int(key))
        low = [n.lower() for n in self.names]
        if str(key).strip().lower() in low:
            return low.index(str(key).strip().lower())
        raise KeyError(f"class {key!r} is not in the estimate (classes {self.names})")

    # ------------------------------------------------------------------ tables
    def to_frame(self) -> pd.DataFrame:
        """One row per class: code, name, samples, mapped area, error-adjusted area with SE and CI (ha), user's
        and producer's accuracy with SE and CI half-widths."""
        z = self.z
        return pd.DataFrame({
            "code": self.codes,
            "name": self.names,
            "n_samples": self.n_samples.astype(np.int64),
            "n_reference": self.counts.sum(axis=0).astype(np.int64),
            "mapped_area_ha": self.mapped_area_ha,
            "mapped_fraction": self.weights,
            "area_ha": self.area_ha,
            "area_se_ha": self.area_se_ha,
            "area_ci95_ha": z * self.area_se_ha,
            "area_low_ha": self.area_ha - z * self.area_se_ha,
            "area_high_ha": self.area_ha + z * self.area_se_ha,
            "users_accuracy": self.user,
            "users_accuracy_se": self.user_se,
            "users_accuracy_ci95": z * self.user_se,
            "producers_accuracy": self.producer,
            "producers_accuracy_se": self.producer_se,
            "producers_accuracy_ci95": z * self.producer_se,
        })

    def error_matrix(self, kind: str = "proportion") -> pd.DataFrame:
        """The error matrix with map classes as rows and reference classes as columns.

        Args:
            kind: ``"proportion"`` (``p_ij``, estimated share of the area), ``"area"`` (``p_ij * A``, hectares)
                or ``"count"`` (sample counts ``n_ij``).
        """
        if kind == "proportion":
            m = self.proportions
        elif kind == "area":
            m = self.proportions * self.total_area_ha
        elif kind == "count":
            m = self.counts
        else:
            raise ValueError(f"kind must be 'proportion', 'area' or 'count', got {kind!r}")
        df = pd.DataFrame(m, index=pd.Index(self.names, name="map \\ reference"), columns=self.names)
        return df

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (NaN as null): overall accuracy, per-class table, error matrices, notes."""
        def clean(x: Any) -> Any:
            if isinstance(x, float | np.floating):
                return None if not math.isfinite(float(x)) else float(x)
            if isinstance(x, np.integer):
                return int(x)
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list | tuple):
                return [clean(v) for v in x]
            return x

        rows = self.to_frame().to_dict(orient="records")
        return clean({
            "method": "stratified estimator, Olofsson et al. (2014), Remote Sensing of Environment 148, 42-57",
            "confidence_level": _level(self.z),
            "z": self.z,
            "total_area_ha": self.total_area_ha,
            "n_used": self.n_used,
            "dropped": dict(self.dropped),
            "overall_accuracy": self.overall,
            "overall_accuracy_se": self.overall_se,
            "overall_accuracy_ci95": self.z * self.overall_se,
            "classes": rows,
            "error_matrix_proportions": self.proportions.tolist(),
            "sample_counts": self.counts.astype(int).tolist(),
            "unsampled": list(self.unsampled),
            "notes": list(self.notes),
            "source": dict(self.source),
        })

    # ------------------------------------------------------------------ writing
    def write_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write the per-class table (:meth:`to_frame`) as CSV, atomically, with an ``overall`` row last."""
        df = self.to_frame()
        overall = {c: np.nan for c in df.columns}
        overall.update({"code": "", "name": "overall", "n_samples": self.n_used, "users_accuracy": self.overall,
                        "users_accuracy_se": self.overall_se, "users_accuracy_ci95": self.z * self.overall_se,
                        "mapped_area_ha": self.total_area_ha, "area_ha": float(np.nansum(self.area_ha))})
        df = pd.concat([df.astype({"code": object}), pd.DataFrame([overall])], ignore_index=True)
        p = Path(path)
        with atomic_path(p) as tmp:
            df.to_csv(tmp, index=False, float_format="%.10g")
        return p

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        p = Path(path)
        with atomic_path(p) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return p


def _level(z: float) -> float:
    return round(math.erf(z / math.sqrt(2)), 4)


# ---------------------------------------------------------------------- the estimator
def estimate_areas(
    counts: np.ndarray | Sequence[Sequence[float]],
    mapped_area: np.ndarray | Sequence[float],
    *,
    codes: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    unit_area_ha: float = 1.0,
    z: float = Z95,
    dropped: Mapping[str, int] | None = None,
    source: Mapping[str, Any] | None = None,
) -> AreaEstimate:
    """The stratified estimator of Olofsson et al. (2014) from a confusion matrix of sample counts.

    Args:
        counts: ``[K, K]`` sample counts, rows = map class (stratum), columns = reference class, same class
            order for both.
        mapped_area: ``[K]`` mapped area of each class, in units of ``unit_area_ha`` hectares (e.g. pixel
            counts with ``unit_area_ha=0.09`` for 30 m pixels, or hectares with the default 1).
        codes, names: the classes (default codes ``0..K-1``, names ``class_<code>``).
        unit_area_ha: hectares per unit of ``mapped_area``.
        z: normal quantile of the confidence intervals (1.96: 95 %).
        dropped, source: recorded in the result.

    Returns:
        an :class:`AreaEstimate` (see the module docstring for the formulas and edge cases).

    Raises:
        ValueError: shapes that do not match, negative counts or areas, a zero total area.
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 2 or n.shape[0] != n.shape[1]:
        raise ValueError(f"counts must be a square [K, K] matrix (rows map, columns reference), got shape {n.shape}")
    k = n.shape[0]
    area = np.asarray(mapped_area, dtype=np.float64).reshape(-1) * float(unit_area_ha)
    if area.shape != (k,):
        raise ValueError(f"mapped_area has {area.size} values for {k} classes; give one per class")
    if (n < 0).any() or not np.isfinite(n).all() or (area < 0).any() or not np.isfinite(area).all():
        raise ValueError("counts and mapped areas must be finite and >= 0")
    total = float(area.sum())
    if total <= 0:
        raise ValueError("the mapped area is 0: nothing to estimate")
    codes = list(range(k)) if codes is None else [int(c) for c in codes]
    names = [f"class_{c}" for c in codes] if names is None else [str(x) for x in names]
    if len(codes) != k or len(names) != k:
        raise ValueError(f"got {len(codes)} codes and {len(names)} names for {k} classes")
    notes: list[str] = []

    w = area / total
    ni = n.sum(axis=1)
    sampled = ni > 0
    unsampled = [codes[i] for i in range(k) if not sampled[i] and w[i] > 0]
    if unsampled:
        what = ", ".join(f"{names[i]!r} ({100 * w[i]:.3g} % of the map)" for i in range(k)
                         if not sampled[i] and w[i] > 0)
        notes.append(f"no sample unit in the stratum of {what}: its error rate is unknown, so its area is carried "
                     "as mapped (assumed correct, no variance); sample every map class")
    single = [i for i in range(k) if ni[i] == 1 and w[i] > 0]
    if single:
        notes.append("only one sample unit in the stratum of "
                     + ", ".join(repr(names[i]) for i in single)
                     + ": its variance cannot be estimated, so the standard errors that depend on it are NaN; "
                     "sample at least 2 (Olofsson et al. advise 50 or more) units per class")

    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(sampled[:, None], n / np.where(sampled, ni, 1)[:, None], 0.0)  # n_ij / n_i.
        p = w[:, None] * frac
        for i in range(k):  # unsampled strata: assumed correct
            if not sampled[i]:
                p[i, i] = w[i]
        dof = ni - 1
        # per-stratum variance factor 1 / (n_i. - 1): NaN for one unit, 0 for unsampled (no variance assumed)
        inv = np.where(ni > 1, 1.0 / np.where(ni > 1, dof, 1), np.where(sampled, np.nan, 0.0))
        inv = np.where(w > 0, inv, 0.0)  # strata without area contribute nothing
        term = (w[:, None] ** 2) * frac * (1 - frac) * inv[:, None]  # [i, k]
        term = np.where((w[:, None] > 0) & ~sampled[:, None], 0.0, term)
        p_col = p.sum(axis=0)
        area_ha = p_col * total
        area_se = np.sqrt(term.sum(axis=0)) * total

        diag = np.diag(p).copy()
        u_frac = np.diag(frac).copy()  # U_i = p_ii / p_i. = n_ii / n_i.
        carried = ~sampled & (w > 0)  # unsampled strata, assumed correct
        user = np.where(sampled, u_frac, np.where(carried, 1.0, np.nan))
        user_se = np.where(sampled, np.sqrt(u_frac * (1 - u_frac) * inv), np.where(carried, 0.0, np.nan))

        overall = float(diag.sum())
        overall_se = float(math.sqrt(np.sum((w ** 2) * u_frac * (1 - u_frac) * inv)))

        producer = np.where(p_col > 0, diag / np.where(p_col > 0, p_col, 1), np.nan)
        # Eq. 7 (Olofsson et al. 2013/2014): N_i = mapped area of stratum i, N_.j = estimated area of class j
        n_hat = (area[:, None] * frac).sum(axis=0)
        for i in range(k):
            if not sampled[i]:
                n_hat[i] += area[i]
        producer_se = np.full(k, np.nan)
        for j in range(k):
            if not p_col[j] > 0 or not n_hat[j] > 0:
                continue
            pj = producer[j]
            own = area[j] ** 2 * (1 - pj) ** 2 * u_frac[j] * (1 - u_frac[j]) * inv[j] if sampled[j] else 0.0
            others = sum(area[i] ** 2 * frac[i, j] * (1 - frac[i, j]) * inv[i]
                         for i in range(k) if i != j and sampled[i] and w[i] > 0)
            producer_se[j] = math.sqrt((own + pj ** 2 * others) / n_hat[j] ** 2)
    absent = [names[j] for j in range(k) if p_col[j] == 0 and w[j] == 0]
    if absent:
        notes.append(f"classes {absent} are neither mapped nor found in the sample: area 0, accuracies undefined")
    for msg in notes:
        warnings.warn(msg, AccuracyWarning, stacklevel=2)
    return AreaEstimate(codes=codes, names=names, counts=n, mapped_area_ha=area, proportions=p, area_ha=area_ha,
                        area_se_ha=area_se, user=user, user_se=user_se, producer=producer, producer_se=producer_se,
                        overall=overall, overall_se=overall_se, z=float(z), unsampled=unsampled,
                        dropped=dict(dropped or {}), notes=notes, source=dict(source or {}))


# ---------------------------------------------------------------------- maps
def map_class_table(path: str | os.PathLike[str], classes: ClassTable | str | os.PathLike[str] | None = None,
                    present: Sequence[int] | None = None) -> tuple[ClassTable, bool]:
    """The class table of a class map: ``classes`` when given (a table or a JSON file), else the map's
    ``DINOV3GEO_CLASSES`` tag, else, for a uint8 transition raster of ``dinov3geo change transitions``, one class
    per transition (``"forest -> herbaceous"``: areas and accuracies of transitions), else one made from the codes
    ``present`` in the map (names ``class_<code>``).

    Returns:
        ``(table, known)``; ``known`` is False for a table made from the codes found.

    Raises:
        ClassTableError: a malformed table; no table and no ``present`` codes.
    """
    if isinstance(classes, ClassTable):
        return classes, True
    if classes is not None:
        try:
            text = Path(classes).read_text()
        except OSError as exc:
            raise ClassTableError(f"cannot read the class table {os.fspath(classes)!r} ({exc.strerror or exc}); "
                                  "give a JSON file [{'code': 1, 'name': 'forest', 'color': '#006400'}, ...]",
                                  classes) from exc
        try:
            return ClassTable.from_json(text), True
        except ClassTableError as exc:
            raise ClassTableError(f"{os.fspath(classes)!r}: {exc}", classes) from exc
    try:
        return read_class_table(path), True
    except ClassTableError:
        trans = _transition_table(path)
        if trans is not None:
            return trans, True
        if present is None:
            raise
    codes = sorted({int(c) for c in present if int(c) != NODATA})
    if not codes:
        raise ClassTableError(f"{os.fspath(path)!r} holds no class values (every pixel is nodata {NODATA}); check "
                              "the map", path)
    return ClassTable.from_labels(codes), False


def _transition_table(path: str | os.PathLike[str]) -> ClassTable | None:
    """The classes of a uint8 transition raster (``dinov3geo change transitions``): one per transition code, named
    ``"forest -> herbaceous"``; None for other files."""
    from dinov3geo.tasks.landcover.classes import LandClass
    from dinov3geo.tasks.landcover.transitions import TransitionError, read_transition_info

    try:
        info = read_transition_info(path)
    except (TransitionError, RasterReadError, ClassTableError, ValueError, KeyError):
        return None
    table: ClassTable = info["table"]
    k = len(table)
    if k * k > NODATA:  # uint16 transition rasters: codes beyond the 0..254 of class maps
        return None
    return ClassTable(LandClass(i * k + j, info["names"][i * k + j], "#c8c8c8" if i == j else table[j].color)
                      for i in range(k) for j in range(k))


@dataclass
class MapCounts:
    """Pixels and hectares of each value of a uint8 class map (:func:`count_map`).

    Attributes:
        grid: the map's grid.
        pixels: ``[256]`` pixel count per value (value 255 = nodata).
        area_ha: ``[256]`` hectares per value (geodesic pixel areas in geographic CRSs).
        nodata: the map's nodata value (255 unless the file declares another integer).
    """

    grid: GridSpec
    pixels: np.ndarray
    area_ha: np.ndarray
    nodata: int = NODATA

    @property
    def present(self) -> list[int]:
        """The values found, nodata excluded."""
        return [int(v) for v in np.flatnonzero(self.pixels) if int(v) != self.nodata]


def _open_map(path: str | os.PathLike[str]) -> Any:
    import rasterio

    try:
        ds = rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterReadError(path, str(exc).split("\n")[0]) from exc
    if ds.crs is None:
        ds.close()
        raise RasterReadError(path, "it has no coordinate reference system",
                              "Set one with `gdal_edit.py -a_srs EPSG:xxxx` before estimating areas.")
    if ds.dtypes[0] not in ("uint8", "int8", "uint16", "int16"):
        ds.close()
        raise RasterReadError(path, f"band 1 is {ds.dtypes[0]}, not a class map (integer class codes 0..254)",
                              "Give the class map written by `dinov3geo landcover predict` (uint8, 255 = nodata).")
    return ds


def _nodata_of(ds: Any) -> int:
    nd = ds.nodata
    if nd is None or not float(nd).is_integer() or not 0 <= int(nd) <= 255:
        return NODATA
    return int(nd)


def row_strips(height: int, width: int, window: int) -> Iterator[Any]:
    """Full-width row strips covering a grid, top to bottom, of about ``window * window`` pixels each."""
    from rasterio.windows import Window

    rows = max(1, min(height, (int(window) * int(window)) // max(width, 1)))
    for r in range(0, height, rows):
        yield Window(0, r, width, min(rows, height - r))


def _codes_u8(arr: np.ndarray, path: Any, nodata: int) -> np.ndarray:
    """Band values as uint8 codes (nodata -> 255); values outside 0..254 are an error naming the file."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        bad = (a != nodata) & ((a < 0) | (a > 254))
        if bad.any():
            v = int(a[bad].flat[0])
            raise RasterReadError(path, f"it holds the value {v}, outside the class codes 0..254",
                                  "Class maps hold codes 0..254 with 255 as nodata.")
        a = np.where(a == nodata, NODATA, a).astype(np.uint8)
    elif nodata != NODATA:
        a = np.where(a == nodata, NODATA, a).astype(np.uint8)
    return a


def count_map(path: str | os.PathLike[str], *, window: int = DEFAULT_WINDOW, progress: bool = False) -> MapCounts:
    """Pixels and hectares of every class value of a class map, read in row strips of about ``window^2``
    pixels (memory bounded by the strip, not the map).

    Raises:
        RasterReadError: the file cannot be opened, has no CRS or is not an integer map.
    """
    from dinov3geo.tasks.change.polygons import pixel_area_ha
    from dinov3geo.utils.progress import progress_bar

    with _open_map(path) as ds:
        grid = GridSpec.from_dataset(ds)
        nodata = _nodata_of(ds)
        row_area = pixel_area_ha(grid)[:, 0]
        pixels = np.zeros(256, dtype=np.int64)
        area = np.zeros(256, dtype=np.float64)
        wins = list(row_strips(grid.height, grid.width, window))
        with progress_bar(total=len(wins), desc="counting map classes", disable=not progress) as bar:
            for win in wins:
                a = _codes_u8(ds.read(1, window=win), path, nodata)
                r0, h = int(win.row_off), int(win.height)
                ra = row_area[r0: r0 + h]
                if ra.min() == ra.max():  # projected grids: one pixel area
                    cnt = np.bincount(a.ravel(), minlength=256)
                    pixels += cnt
                    area += cnt * ra[0]
                else:  # geographic grids: the pixel area changes with the row
                    per_row = np.stack([np.bincount(a[r], minlength=256) for r in range(h)])  # [h, 256]
                    pixels += per_row.sum(axis=0)
                    area += ra @ per_row
                bar.update(1)
    return MapCounts(grid, pixels, area, NODATA)


# ---------------------------------------------------------------------- reference samples
def parse_reference(values: Sequence[Any], table: ClassTable, *, path: Any = None,
                    column: str = "reference") -> np.ndarray:
    """Reference labels as class codes of ``table``: codes (integers, integral floats, numeric strings) or
    class names (case-insensitive). Missing labels (None, NaN, empty) give -1.

    Raises:
        ValueError: one line naming the file, the column, the unknown values and the known classes.
    """
    out = np.full(len(values), -1, dtype=np.int64)
    names = {n.lower(): c for n, c in zip(table.names, table.codes, strict=True)}
    codes = set(table.codes)
    unknown: list[str] = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
            continue
        code: int | None = None
        integral = (isinstance(v, int | np.integer) and not isinstance(v, bool)) or (
            isinstance(v, float | np.floating) and float(v).is_integer())
        if integral:
            code = int(v) if int(v) in codes else None
        else:
            s = str(v).strip()
            if s.lower() in names:
                code = names[s.lower()]
            elif s.lstrip("+-").isdigit() and int(s) in codes:
                code = int(s)
        if code is None:
            if str(v) not in unknown:
                unknown.append(str(v))
            continue
        out[i] = code
    if unknown:
        where = f"{os.fspath(path)!r} " if path is not None else ""
        shown = ", ".join(repr(u) for u in unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        known = ", ".join(f"{c}={n}" for c, n in zip(table.codes, table.names, strict=True))
        raise ValueError(f"reference sample {where}column {column!r}: {shown} {'is' if len(unknown) == 1 else 'are'} "
                         f"not a class of the map (classes {known}); label with these names or codes")
    return out


def sample_map(path: str | os.PathLike[str], geometries: Any, *, all_touched_small: bool = True) -> tuple[
        np.ndarray, np.ndarray]:
    """The map class of each sample unit: the pixel of a point, the majority class of a polygon.

    Args:
        path: the class map.
        geometries: a GeoSeries (any CRS; reprojected to the map's).
        all_touched_small: polygons containing no pixel centre take the pixels they touch.

    Returns:
        ``(classes int64 [n], status int8 [n])``: class codes (-1 when not found) and status 0 = found,
        1 = outside the map, 2 = only map nodata there.
    """
    import rasterio
    import shapely
    from rasterio.features import geometry_mask
    from rasterio.windows import Window, from_bounds

    with _open_map(path) as ds:
        grid = GridSpec.from_dataset(ds)
        nodata = _nodata_of(ds)
        geoms = geometries.to_crs(ds.crs).values
        n = len(geoms)
        out = np.full(n, -1, dtype=np.int64)
        status = np.zeros(n, dtype=np.int8)
        inv = ~grid.transform
        for i, g in enumerate(geoms):
            if g is None or g.is_empty:
                status[i] = 1
                continue
            if g.geom_type == "Point":
                col, row = inv * (g.x, g.y)
                r, c = math.floor(row), math.floor(col)
                if not (0 <= r < grid.height and 0 <= c < grid.width):
                    status[i] = 1
                    continue
                v = int(_codes_u8(ds.read(1, window=Window(c, r, 1, 1)), path, nodata)[0, 0])
            else:
                left, bottom, right, top = g.bounds
                win = from_bounds(left, bottom, right, top, transform=grid.transform)
                c0, r0 = max(0, math.floor(win.col_off)), max(0, math.floor(win.row_off))
                c1 = min(grid.width, math.ceil(win.col_off + win.width))
                r1 = min(grid.height, math.ceil(win.row_off + win.height))
                if c1 <= c0 or r1 <= r0 or not shapely.intersects(g, shapely.box(*grid.bounds)):
                    status[i] = 1
                    continue
                w = Window(c0, r0, c1 - c0, r1 - r0)
                a = _codes_u8(ds.read(1, window=w), path, nodata)
                wt = rasterio.windows.transform(w, grid.transform)
                inside = geometry_mask([g], out_shape=a.shape, transform=wt, invert=True)
                if not inside.any() and all_touched_small:
                    inside = geometry_mask([g], out_shape=a.shape, transform=wt, invert=True, all_touched=True)
                vals = a[inside]
                vals = vals[vals != NODATA]
                if vals.size == 0:
                    status[i] = 2 if inside.any() else 1
                    continue
                v = int(np.argmax(np.bincount(vals, minlength=256)))
            if v == NODATA:
                status[i] = 2
                continue
            out[i] = v
    return out, status


def _read_sample(reference: Any, column: str, layer: str | int | None) -> Any:
    import geopandas as gpd

    from dinov3geo.io.vector import read_vector

    if not isinstance(reference, gpd.GeoDataFrame) and layer is None and Path(reference).suffix.lower() == ".gpkg" \
            and Path(reference).is_file():
        import pyogrio

        try:
            layers = [str(x[0]) for x in pyogrio.list_layers(reference)]
        except Exception:  # noqa: BLE001 - read_vector below names what is wrong with the file
            layers = []
        if len(layers) > 1:
            raise VectorReadError(reference, f"it holds {len(layers)} layers {layers}",
                                  "Name the layer with the labelled sample (CLI: --layer).")
    gdf = reference if isinstance(reference, gpd.GeoDataFrame) else read_vector(reference, layer=layer)
    src = gdf.attrs.get("source", "the reference sample") if not isinstance(reference, str | os.PathLike) \
        else os.fspath(reference)
    if column not in gdf.columns:
        cols = [c for c in gdf.columns if c != gdf.geometry.name]
        raise VectorReadError(src, f"it has no column {column!r} (columns: {cols})",
                              "Name the column holding the reference classes (CLI: --column).")
    kinds = set(gdf.geometry.geom_type.dropna().unique())
    bad = kinds - {"Point", "Polygon", "MultiPolygon"}
    if bad:
        raise VectorReadError(src, f"it holds {sorted(bad)} geometries",
                              "Give sample points or polygons (one reference class each).")
    return gdf, src


def assess_map(
    map_path: str | os.PathLike[str],
    reference: Any,
    *,
    column: str = "reference",
    layer: str | int | None = None,
    classes: ClassTable | str | os.PathLike[str] | None = None,
    z: float = Z95,
    window: int = DEFAULT_WINDOW,
    progress: bool = False,
) -> AreaEstimate:
    """Error-adjusted areas and accuracies of a class map from a reference sample file.

    Args:
        map_path: the class map (uint8 codes, 255 = nodata; its class table from the ``DINOV3GEO_CLASSES``
            tag, else ``classes``, else the codes found).
        reference: sample points or polygons (vector file or GeoDataFrame, any CRS) with the reference class in
            ``column`` (class names or codes; empty = not labelled, dropped). Polygons: one unit each, map class
            by majority (see the module docstring).
        column: the reference-class column.
        layer: layer of a multi-layer file.
        classes: a class table (or JSON file) for maps without one.
        z: normal quantile of the confidence intervals.
        window: side (pixels) of the windows the map is read in (memory bound).
        progress: show a progress bar while counting the map.

    Raises:
        VectorReadError: missing column, unsupported geometries, unreadable file (naming the file).
        ValueError: reference labels that are not classes of the map; no usable sample unit.
        RasterReadError: the map cannot be read.
    """
    gdf, src = _read_sample(reference, column, layer)
    mc = count_map(map_path, window=window, progress=progress)
    table, known = map_class_table(map_path, classes, present=mc.present)
    unknown = table.unknown_codes(mc.present)
    if unknown:
        raise ValueError(f"class map {os.fspath(map_path)!r} holds codes {unknown} that its class table lacks "
                         f"(codes {table.codes}); give the matching class table")
    ref = parse_reference(list(gdf[column]), table, path=src, column=column)
    mapped, status = sample_map(map_path, gdf.geometry)
    dropped = {"outside_map": int((status == 1).sum()), "map_nodata": int((status == 2).sum()),
               "no_reference": int(((status == 0) & (ref < 0)).sum())}
    use = (status == 0) & (ref >= 0)
    if not use.any():
        raise ValueError(f"reference sample {src!r}: none of its {len(gdf)} units is usable ({dropped['outside_map']} "
                         f"outside the map {os.fspath(map_path)!r}, {dropped['map_nodata']} on map nodata, "
                         f"{dropped['no_reference']} without a reference label in column {column!r}); check the "
                         "file, its CRS and the labels")
    codes = list(table.codes)
    names = list(table.names)
    lut = {c: i for i, c in enumerate(codes)}
    counts = np.zeros((len(codes), len(codes)), dtype=np.int64)
    for m, r in zip(mapped[use], ref[use], strict=True):
        counts[lut[int(m)], lut[int(r)]] += 1
    area = np.array([mc.area_ha[c] for c in codes], dtype=np.float64)
    for reason, k in dropped.items():
        if k:
            warnings.warn(f"reference sample {src!r}: {k} unit(s) dropped ({reason.replace('_', ' ')})",
                          AccuracyWarning, stacklevel=2)
    source = {"map": os.fspath(map_path), "reference": src, "column": column, "class_table_known": known,
              "units": "polygons (majority map class)" if (gdf.geometry.geom_type != "Point").any() else "points",
              "grid": {"crs": mc.grid.crs.to_string(), "width": mc.grid.width, "height": mc.grid.height,
                       "res": list(mc.grid.res)}}
    return estimate_areas(counts, area, codes=codes, names=names, z=z, dropped=dropped, source=source)


# ---------------------------------------------------------------------- reports
def write_area_report(est: AreaEstimate, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``areas.csv`` (per class), ``error_matrix.csv`` (proportions of area), ``error_matrix_counts.csv``
    and ``accuracy.json`` into ``out_dir`` (each atomically). Returns the paths by name."""
    out = Path(out_dir)
    paths = {"areas": est.write_csv(out / "areas.csv")}
    for name, kind in (("error_matrix", "proportion"), ("error_matrix_counts", "count")):
        p = out / f"{name}.csv"
        with atomic_path(p) as tmp:
            est.error_matrix(kind).to_csv(tmp, float_format="%.10g")
        paths[name] = p
    paths["accuracy"] = est.write_json(out / "accuracy.json")
    return paths


def _area_inputs(a: dict[str, Any]) -> list[Any]:
    return [a.get(k) for k in ("map_path", "reference", "classes") if isinstance(a.get(k), str | os.PathLike)]


@writes_output_folder("out_dir", kind=AREAS_KIND, inputs=_area_inputs, what="landcover areas", files=AREA_FILES)
def area_report(
    map_path: str | os.PathLike[str],
    reference: Any,
    out_dir: str | os.PathLike[str],
    *,
    column: str = "reference",
    layer: str | int | None = None,
    classes: ClassTable | str | os.PathLike[str] | None = None,
    z: float = Z95,
    window: int = DEFAULT_WINDOW,
    progress: bool = False,
) -> tuple[AreaEstimate, dict[str, Path]]:
    """:func:`assess_map`, then :func:`write_area_report` into the folder ``out_dir``.

    The folder is guarded against the inputs and locked for the run (a folder dinov3geo did not create is
    refused); it is created only once the estimate succeeded, so a failed run leaves nothing behind.

    Returns:
        ``(estimate, paths by name)``.
    """
    est = assess_map(map_path, reference, column=column, layer=layer, classes=classes, z=z, window=window,
                     progress=progress)
    out = make_output_folder(out_dir, _area_inputs(locals()), kind=AREAS_KIND, files=AREA_FILES)
    return est, write_area_report(est, out)
