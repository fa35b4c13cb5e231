"""Evaluate a land-cover map against reference labels: metrics JSON, confusion CSV and picture.

:func:`evaluate_map` reads the map (a class COG written by ``dinov3geo landcover predict``, whose class table
travels in its ``DINOV3GEO_CLASSES`` tag) window by window, puts the reference labels (polygons or a class
raster, any CRS/resolution; see :mod:`dinov3geo.tasks.landcover.labels`) onto each window of the map's grid,
and scores only labelled pixels (sparse references are the normal case). Reference classes must belong to the
map's class table (by code or by name); unknown ones are an error naming them.

Labelled pixels where the map has no class (255: image nodata, outside its AOI) are not scored; they are counted
in ``n_map_missing``. Optional ``mask`` (a bool array on the map grid, e.g. the test split) and ``aoi``
restrict the pixels further.

Outputs in ``out_dir`` (each written atomically; the folder is checked before any work and created once the
inputs have loaded): ``metrics.json`` (:func:`~dinov3geo.tasks.landcover.metrics.classification_metrics` plus
provenance), ``confusion.csv`` and ``confusion.png``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from dinov3geo.io.grid import GridSpec
from dinov3geo.tasks.landcover.classes import NODATA, ClassTable, read_class_table
from dinov3geo.tasks.landcover.labels import LabelError, LabelSource
from dinov3geo.tasks.landcover.metrics import ConfusionAccumulator, plot_confusion, write_confusion_csv
from dinov3geo.utils.atomic import atomic_path
from dinov3geo.utils.locks import output_lock
from dinov3geo.utils.outputs import guard_output, make_output_folder
from dinov3geo.utils.progress import progress_bar

__all__ = ["EVAL_FILES", "EVAL_KIND", "evaluate_map", "write_json", "write_outputs"]

#: the dinov3geo folder kind of an evaluation folder and the files written into it
EVAL_KIND = "landcover-eval"
EVAL_FILES = ("metrics.json", "confusion.csv", "confusion.png")


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return Path(path)


def write_outputs(metrics: dict[str, Any], out_dir: Path, title: str = "") -> dict[str, str]:
    """Write ``metrics.json``, ``confusion.csv`` and ``confusion.png`` into ``out_dir``; returns their paths."""
    cm = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    names = metrics["classes"]
    paths = {"metrics": str(out_dir / "metrics.json"), "confusion_csv": str(out_dir / "confusion.csv"),
             "confusion_png": str(out_dir / "confusion.png")}
    write_confusion_csv(cm, names, paths["confusion_csv"])
    plot_confusion(cm, names, paths["confusion_png"], title=title)
    metrics["outputs"] = paths
    write_json(metrics, paths["metrics"])
    return paths


def evaluate_map(
    map_path: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None,
    *,
    column: str | None = None,
    ignore: Iterable[int] | int | None = None,
    layer: str | int | None = None,
    table: ClassTable | None = None,
    mask: np.ndarray | None = None,
    aoi: Any = None,
    window: int = 2048,
    title: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the class map ``map_path`` on the labelled pixels of ``labels`` (see the module docstring).

    Args:
        map_path: class COG (codes, 255 = no data) with a ``DINOV3GEO_CLASSES`` tag (else give ``table``).
        labels: reference polygons or class raster.
        out_dir: output folder (None: nothing written, metrics returned).
        column, ignore, layer: see :class:`~dinov3geo.tasks.landcover.labels.LabelSource`.
        table: class table of the map (default: its tag).
        mask: ``[H, W]`` bool on the map grid: only these pixels count.
        aoi: polygons (file/geometries, any CRS): only pixels inside count.
        window: window side for reading.
        title: title of the confusion picture.

    Returns:
        the metrics (with ``outputs`` when written).
    """
    inputs = [map_path, labels, aoi if isinstance(aoi, str | os.PathLike) else None]
    out = None
    if out_dir is not None:
        out = guard_output(out_dir, inputs, folder=True, kind=EVAL_KIND, role="--out", replaces=False)
        for f in EVAL_FILES:
            guard_output(out / f, inputs, role="--out")
    tbl = table if table is not None else read_class_table(map_path)
    with rasterio.open(map_path) as ds:
        grid = GridSpec.from_dataset(ds)
        tags = ds.tags()
        src = LabelSource(labels, column=column, table=tbl, ignore=ignore, layer=layer)
        with src:
            src.check_overlap(grid, f"the map {os.fspath(map_path)!r}")
            aoi_geom = None
            if aoi is not None:
                from dinov3geo.io.vector import aoi_geometry

                aoi_geom = aoi_geometry(aoi, grid.crs)
            acc = ConfusionAccumulator(tbl.names)
            lut = tbl.index_lut()
            n_missing = 0
            n_labelled = 0
            wins = [Window(c, r, min(window, grid.width - c), min(window, grid.height - r))
                    for r in range(0, grid.height, window) for c in range(0, grid.width, window)]
            bar = progress_bar(total=len(wins), desc="evaluate", disable=not progress or len(wins) < 4)
            for win in wins:
                bar.update(1)
                wg = grid.window_grid(win)
                codes, _pids, _ = src.read_codes(wg)
                ref = lut[codes]
                bad = table_codes_unknown(tbl, codes)
                if bad:
                    raise LabelError(labels, f"class codes {bad} are not in the map's class table (codes {tbl.codes})")
                pred = lut[ds.read(1, window=win)]
                keep = ref != NODATA
                if mask is not None:
                    r0, c0 = int(win.row_off), int(win.col_off)
                    keep &= mask[r0:r0 + int(win.height), c0:c0 + int(win.width)]
                if aoi_geom is not None:
                    from dinov3geo.io.vector import aoi_mask

                    keep &= aoi_mask(aoi_geom, wg)
                n_labelled += int(keep.sum())
                n_missing += int((keep & (pred == NODATA)).sum())
                acc.update(ref, pred, keep)
            bar.close()
    if n_labelled == 0:
        raise LabelError(labels, f"no labelled pixel lies on the map {os.fspath(map_path)!r}"
                         + (" inside the mask/AOI" if mask is not None or aoi is not None else ""),
                         "Check that the labels and the map cover the same place")
    m = acc.compute()
    m.update({"map": os.fspath(map_path), "labels": os.fspath(labels), "n_labelled": n_labelled,
              "n_map_missing": n_missing, "class_table": tbl.to_dict(),
              "uses_image_pixels": tags.get("USES_IMAGE_PIXELS"), "label_info": {
                  k: v for k, v in src.info.items() if k in ("kind", "column", "code_column", "n_polygons", "ignore")}})
    if out is not None:
        with output_lock(out, what="landcover evaluate"):
            make_output_folder(out, inputs, kind=EVAL_KIND, role="--out", files=EVAL_FILES)
            write_outputs(m, out, title or f"{Path(map_path).name} vs {Path(labels).name}")
    return m


def table_codes_unknown(table: ClassTable, codes: np.ndarray) -> list[int]:
    """Codes in ``codes`` (255 ignored) that are not in ``table``."""
    return table.unknown_codes(np.unique(codes).tolist())
