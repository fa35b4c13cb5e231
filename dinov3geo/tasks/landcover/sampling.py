"""Stratified random reference samples of a class map: the points users label to estimate honest areas.

Olofsson et al. (2014, Remote Sensing of Environment 148, 42-57, section 5.1) recommend a **stratified
random** sample with the map classes as strata: every class, however rare, gets enough units to estimate its
user's accuracy (they advise at least 50 per stratum, 50-100 for rare classes), and the rest of the sample is
allocated in proportion to the mapped area. :func:`allocate` does exactly that:

1. each stratum starts with its share of ``n_total`` proportional to its mapped area;
2. strata whose share is below ``min_per_class`` are raised to it (or to all their pixels when they have
   fewer), strata whose share exceeds their pixels take all their pixels; both leave the proportional pool;
3. the rest of the sample is re-allocated proportionally among the remaining strata, until nothing changes;
   shares are rounded to integers by largest remainders, so the sizes sum to ``n_total``.

:func:`stratified_sample` draws the pixels: pass 1 counts the pixels of each class (row strips of the map,
memory bounded by a strip, never the whole map); then, with ``numpy.random.default_rng(seed)``, the *ranks*
of ``n_h`` distinct pixels are drawn among the ``N_h`` pixels of each class, in the class table's order
(:meth:`numpy.random.Generator.choice` without replacement: memory ``O(n_h)``, not ``O(N_h)``); pass 2 walks
the strips again in raster order and keeps the pixels whose rank within their class was drawn. Every pixel of
a class has the same inclusion probability ``n_h / N_h`` (a simple random sample within each stratum), and
the sample depends only on the map, the sizes and the seed (not on the strip size or the machine).

The result is a point layer (pixel centres, in the map's CRS) with ``id``, ``map_code``, ``map_class``,
``x``, ``y``, ``row``, ``col`` and an empty ``reference`` column for the interpreter, in a seeded random order
(so labelling in file order does not follow the map classes). For a blind interpretation, hide
``map_code``/``map_class`` while labelling. Estimate areas afterwards with
:func:`dinov3geo.tasks.landcover.accuracy.assess_map`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinov3geo.tasks.landcover.accuracy import (
    DEFAULT_WINDOW,
    AccuracyWarning,
    _codes_u8,
    _nodata_of,
    _open_map,
    count_map,
    map_class_table,
    row_strips,
)
from dinov3geo.tasks.landcover.classes import ClassTable

__all__ = ["SampleSizeError", "allocate", "stratified_sample"]

#: the smallest stratum sample Olofsson et al. (2014) advise
MIN_PER_CLASS = 50


class SampleSizeError(ValueError):
    """The requested sample cannot be drawn (too small for the minimum per class, or no class at all)."""


def allocate(
    sizes: Sequence[float],
    n_total: int,
    *,
    min_per_class: int = MIN_PER_CLASS,
    available: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
) -> list[int]:
    """Sample sizes per stratum: proportional to ``sizes`` with at least ``min_per_class`` each (see the module
    docstring), never more than ``available`` (pixels of the stratum), summing to ``n_total`` when possible.

    Args:
        sizes: mapped area (or pixels) of each stratum.
        n_total: the total sample size.
        min_per_class: the smallest sample of a stratum (a stratum with fewer pixels takes them all).
        available: pixels of each stratum (default: unlimited).
        names: stratum names for messages.

    Raises:
        SampleSizeError: ``n_total`` smaller than the minimum over all strata (naming what would fit).
    """
    s = np.asarray(sizes, dtype=np.float64)
    k = len(s)
    avail = np.asarray(available if available is not None else [max(int(n_total), 0)] * k, dtype=np.int64)
    names = list(names) if names is not None else [str(i) for i in range(k)]
    live = (s > 0) & (avail > 0)
    floor = np.where(live, np.minimum(min_per_class, avail), 0)
    if int(n_total) < int(floor.sum()):
        raise SampleSizeError(
            f"a sample of {n_total} cannot give each of the {int(live.sum())} mapped classes its minimum of "
            f"{min_per_class} units ({int(floor.sum())} needed); ask for at least {int(floor.sum())} (CLI: --n) "
            "or lower the minimum per class (CLI: --min-per-class)")
    total_avail = int(np.where(live, avail, 0).sum())
    if int(n_total) > total_avail:
        warnings.warn(f"the map has only {total_avail} classified pixels; the sample takes all of them instead of "
                      f"{n_total}", AccuracyWarning, stacklevel=2)
        return [int(a) if live[i] else 0 for i, a in enumerate(avail)]
    out = np.zeros(k, dtype=np.int64)
    fixed = ~live
    while True:
        free = ~fixed
        remaining = int(n_total) - int(out[fixed].sum())
        tot = float(s[free].sum())
        share = np.where(free, remaining * s / tot if tot > 0 else 0.0, 0.0)
        low = free & (share < floor)
        high = free & (share > avail)
        if not (low.any() or high.any()):
            break
        out[low] = floor[low]
        out[high] = avail[high]
        fixed |= low | high
    base = np.floor(share).astype(np.int64)
    left = remaining - int(base[free].sum())
    if left > 0:
        frac = np.where(free & (base < avail), share - base, -1.0)
        order = np.argsort(-frac, kind="stable")[:left]
        base[order] += 1
    out[free] = base[free]
    return [int(x) for x in out]


def _sizes_for(table: ClassTable, n_total: int | None, n_per_class: int | Mapping[Any, int] | None,
               min_per_class: int, area: np.ndarray, avail: np.ndarray) -> list[int]:
    names = table.names
    if n_per_class is None:
        if n_total is None:
            raise SampleSizeError("give the sample size: n_total (CLI: --n) or n_per_class (CLI: --n-per-class)")
        return allocate(area, int(n_total), min_per_class=min_per_class, available=avail, names=names)
    if isinstance(n_per_class, int | np.integer):
        want = [int(n_per_class) if a > 0 else 0 for a in avail]
    else:
        want = [min(min_per_class, int(a)) if a > 0 else 0 for a in avail]
        for key, n in n_per_class.items():
            try:
                code = int(key) if str(key).strip().lstrip("+-").isdigit() else table.by_name(str(key)).code
                i = table.index_of(code)
            except KeyError:
                raise SampleSizeError(f"n_per_class names the class {key!r}, which the map does not have (classes "
                                      f"{', '.join(f'{c}={m}' for c, m in zip(table.codes, names, strict=True))})"
                                      ) from None
            want[i] = int(n)
    short = [f"{names[i]} ({int(avail[i])} px)" for i in range(len(want)) if want[i] > avail[i]]
    if short:
        warnings.warn(f"classes with fewer pixels than their sample size give all their pixels: {', '.join(short)}",
                      AccuracyWarning, stacklevel=3)
    return [min(w, int(a)) for w, a in zip(want, avail, strict=True)]


def _check_replaceable(out: Path) -> None:
    """Refuse to replace a file that is not an unlabelled sample of ours: labelling work is never overwritten."""
    from dinov3geo.utils.outputs import OutputConflictError

    if not out.exists():
        return
    try:
        import pyogrio

        info = pyogrio.read_info(out)
        fields = [str(f) for f in info["fields"]]
        labelled = 0
        if "reference" in fields and "map_code" in fields:
            ref = pyogrio.read_dataframe(out, columns=["reference"], read_geometry=False)["reference"]
            labelled = int(ref.map(lambda v: v is not None and str(v).strip() not in ("", "nan", "None")).sum())
        else:
            raise OutputConflictError(out, "an existing file that is not a dinov3geo sample is in the way",
                                      "Choose another output path; the file was left untouched.")
    except OutputConflictError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable: not ours to replace
        raise OutputConflictError(out, f"an existing file that is not a dinov3geo sample is in the way ({exc})",
                                  "Choose another output path; the file was left untouched.") from exc
    if labelled:
        raise OutputConflictError(out, f"it holds a sample with {labelled} labelled point(s)",
                                  "Write the new sample to another path; the labels were left untouched.")


def stratified_sample(
    map_path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    n_total: int | None = None,
    n_per_class: int | Mapping[Any, int] | None = None,
    min_per_class: int = MIN_PER_CLASS,
    seed: int = 0,
    classes: ClassTable | str | os.PathLike[str] | None = None,
    layer: str | None = None,
    window: int = DEFAULT_WINDOW,
    progress: bool = False,
) -> Any:
    """Draw a stratified random sample of a class map (points to label; see the module docstring).

    Args:
        map_path: the class map (uint8 codes, 255 = nodata).
        out: GeoPackage (or other vector file) to write the points to, atomically; None returns them only.
        n_total: total sample size, allocated by :func:`allocate`.
        n_per_class: instead of ``n_total``: one size for every class, or ``{code or name: n}`` (classes not
            named get ``min_per_class``).
        min_per_class: smallest sample of a class (Olofsson et al. advise >= 50).
        seed: random seed: the same map, sizes and seed give the same points.
        classes: a class table (or JSON file) for maps without one (default: the map's, else the codes found).
        layer: layer name in a GeoPackage (default: the file name without suffix, the layer geopandas writes back
            to when the labelled file is saved; the file is then replaced as a whole). With a name, the other
            layers of an existing GeoPackage are kept.
        window: strips of about ``window^2`` pixels are read at a time (memory bound).
        progress: progress bars.

    Returns:
        the points as a GeoDataFrame (in the map's CRS).

    Raises:
        SampleSizeError: impossible sizes.
        RasterReadError: an unreadable map.
        OutputConflictError: ``out`` is the map (or otherwise refused by the output guard), or an existing file
            there is not an unlabelled sample (a labelled sample or a file of the user's is never replaced).
    """
    import contextlib

    import geopandas as gpd
    from rasterio.transform import xy

    from dinov3geo.io.vector import write_vector
    from dinov3geo.utils.outputs import claim_output
    from dinov3geo.utils.progress import progress_bar

    if min_per_class < 1:
        raise SampleSizeError(f"min_per_class must be >= 1, got {min_per_class}")
    if n_total is not None and int(n_total) < 1:
        raise SampleSizeError(f"the sample size must be >= 1, got {n_total}")
    claim = claim_output(out, [map_path], what="landcover sample") if out is not None else contextlib.nullcontext()
    with claim:
        if out is not None:
            _check_replaceable(Path(out))
        mc = count_map(map_path, window=window, progress=progress)
        table, _ = map_class_table(map_path, classes, present=mc.present)
        unknown = table.unknown_codes(mc.present)
        if unknown:
            raise SampleSizeError(f"class map {os.fspath(map_path)!r} holds codes {unknown} that its class table "
                                  f"lacks (codes {table.codes}); give the matching class table")
        codes = table.codes
        avail = np.array([mc.pixels[c] for c in codes], dtype=np.int64)
        area = np.array([mc.area_ha[c] for c in codes], dtype=np.float64)
        if not avail.any():
            raise SampleSizeError(f"class map {os.fspath(map_path)!r} has no classified pixel (all nodata)")
        sizes = _sizes_for(table, n_total, n_per_class, int(min_per_class), area, avail)
        rng = np.random.default_rng(seed)
        ranks = {c: np.sort(rng.choice(int(avail[i]), size=sizes[i], replace=False)) if sizes[i] else
                 np.zeros(0, dtype=np.int64) for i, c in enumerate(codes)}
        seen = dict.fromkeys(codes, 0)
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        with _open_map(map_path) as ds:
            nodata = _nodata_of(ds)
            wins = list(row_strips(mc.grid.height, mc.grid.width, window))
            with progress_bar(total=len(wins), desc="drawing the sample", disable=not progress) as bar:
                for win in wins:
                    a = _codes_u8(ds.read(1, window=win), map_path, nodata)
                    counts = np.bincount(a.ravel(), minlength=256)
                    for c in codes:
                        cnt = int(counts[c])
                        if not cnt:
                            continue
                        r = ranks[c]
                        lo, hi = np.searchsorted(r, [seen[c], seen[c] + cnt])
                        if hi > lo:
                            pos = np.flatnonzero(a.ravel() == c)[r[lo:hi] - seen[c]]
                            rows.append(pos // mc.grid.width + int(win.row_off))
                            cols.append(pos % mc.grid.width)
                            vals.append(np.full(hi - lo, c, dtype=np.int64))
                        seen[c] += cnt
                    bar.update(1)
        row = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        col = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
        val = np.concatenate(vals) if vals else np.zeros(0, dtype=np.int64)
        canon = np.lexsort((col, row))  # raster order, whatever the strips: the shuffle is reproducible
        row, col, val = row[canon], col[canon], val[canon]
        order = rng.permutation(len(row))
        row, col, val = row[order], col[order], val[order]
        xs, ys = xy(mc.grid.transform, row, col, offset="center")
        xs, ys = np.asarray(xs, dtype=np.float64).reshape(-1), np.asarray(ys, dtype=np.float64).reshape(-1)
        names = dict(zip(codes, table.names, strict=True))
        gdf = gpd.GeoDataFrame({
            "id": np.arange(1, len(row) + 1, dtype=np.int64),
            "map_code": val.astype(np.int64),
            "map_class": [names[int(v)] for v in val],
            "reference": _empty_strings(len(row)),
            "x": xs, "y": ys,
            "row": row.astype(np.int64), "col": col.astype(np.int64),
        }, geometry=gpd.points_from_xy(xs, ys), crs=mc.grid.crs)
        gdf.attrs["allocation"] = {names[c]: int(n) for c, n in zip(codes, sizes, strict=True)}
        gdf.attrs["stratum_pixels"] = {names[c]: int(a) for c, a in zip(codes, avail, strict=True)}
        gdf.attrs["stratum_area_ha"] = {names[c]: float(a) for c, a in zip(codes, area, strict=True)}
        if out is not None:
            write_vector(gdf, out, layer=layer if Path(out).suffix.lower() == ".gpkg" else None)
    return gdf


def _empty_strings(n: int) -> Any:
    """An all-empty string column of length ``n`` (written as a text field, not as an untyped one)."""
    import pandas as pd

    return pd.Series([""] * n, dtype=object)
