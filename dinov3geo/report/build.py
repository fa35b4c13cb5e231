"""Build a self-contained HTML report: ``build_report(sections, "outputs/demo/report.html")``.

A report is a title, a summary box of key numbers, sections (each with text, figures, tables and links to
output files) and generation metadata (dinov3geo version, UTC date, machine). Sections are made in Python
(:class:`Section` with :class:`Figure`/:class:`Table`/:class:`Link`, the figures from
:mod:`dinov3geo.report.figures`) or from plain specs, as pipelines do (``type: report`` stages)::

    sections:
      - {title: Scene, kind: rgb, path: scene.tif, caption: "RGB, 2-98 % stretch"}
      - title: Canopy height
        items:
          - {kind: map, path: chm.tif, label: "height (m)", cmap: viridis, vmin: 0, vmax: 30}
          - {kind: map, path: chm_std.tif, label: "uncertainty (m)", cmap: magma}
          - {kind: class_map, path: landcover.tif}   # a class raster in its colours, with a legend
          - {kind: table, path: transition_matrix.csv}   # CSV: numbers formatted
          - {kind: table, path: metrics.json, caption: "hold-out metrics"}
      - {title: Forest loss, kind: overlay, image: t2.tif, mask: loss.tif, label: loss, area: true,
         polygons: loss.gpkg}   # optional polygon outlines (any CRS) on top
      - {title: Features, kind: pca, features: feats.zarr}
      - {title: Pretraining, kind: loss_curves, runs: [outputs/pretrain]}
      - {title: Files, kind: links, paths: [chm.tif, {path: loss.gpkg, label: "loss polygons"}]}

Item kinds and their keys are in :data:`ITEM_KEYS` (unknown keys are errors naming the key).
"""

from __future__ import annotations

import json
import os
import platform
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dinov3geo.report import figures as F
from dinov3geo.report import html as H

PathLike = str | os.PathLike[str]


@dataclass
class Figure:
    """A PNG (bytes) with a caption."""

    png: bytes
    caption: str = ""
    alt: str = ""


@dataclass
class Table:
    """A mapping (key/value rows) or a list of row mappings."""

    rows: Mapping[str, Any] | Sequence[Mapping[str, Any]]
    caption: str = ""


@dataclass
class Link:
    """A link to an output file or folder (written relative to the report)."""

    path: PathLike
    label: str = ""
    note: str = ""


@dataclass
class Section:
    """A titled part of the report."""

    title: str
    text: str = ""
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)


def generation_metadata(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """dinov3geo/Python/torch versions, UTC time, host and machine, plus ``extra``."""
    from dinov3geo import __version__

    meta: dict[str, Any] = {"dinov3geo": __version__,
                            "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
                            "host": socket.gethostname(), "machine": f"{platform.system()} {platform.machine()}",
                            "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        meta["torch"] = torch.__version__
        meta["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:  # noqa: BLE001 - metadata only
        pass
    meta.update(extra or {})
    return meta


def _with_stac_items(links: Sequence[Link]) -> list[tuple[PathLike, str, str]]:
    """``(path, label, note)`` of each link, followed by a link to its STAC Item when it has one."""
    from dinov3geo.io.stac import item_path

    out: list[tuple[PathLike, str, str]] = []
    for lk in links:
        out.append((lk.path, lk.label, lk.note))
        item = item_path(lk.path)
        if item.is_file():
            out.append((item, f"{lk.label or Path(lk.path).name}: STAC item", ""))
    return out


def _stac_section(collection: PathLike, html_dir: PathLike) -> str:
    """The "STAC" section: a link to the run's STAC Collection."""
    text = ("Each product of this run (COG maps, feature stores, polygons) has a STAC Item next to it "
            "(<name>.stac.json: footprint, CRS, bands, units, checksums, model and inputs); the Collection "
            "links them all. Open it in a STAC browser or QGIS, or read it with pystac.")
    return (f"<section><h2>STAC</h2><p>{H.esc(text)}</p>"
            f"{H.links_html([(collection, 'STAC Collection of all products', '')], html_dir)}</section>")


def _find_collection(out_html: Path, stac: PathLike | None) -> Path | None:
    """The STAC Collection to link: ``stac`` when given; with ``"auto"``, ``stac/collection.json`` next to the
    report when it is one dinov3geo wrote (a pipeline run's); None: no link."""
    if stac is None:
        return None
    if str(stac) != "auto":
        return Path(stac)
    from dinov3geo.io.stac import COLLECTION_NAME, is_ours

    cand = out_html.absolute().parent / "stac" / COLLECTION_NAME
    return cand if cand.is_file() and is_ours(cand) else None


def render_report(sections: Sequence[Section], html_dir: PathLike, *, title: str = "dinov3geo report",
                  subtitle: str | None = None, summary: Mapping[str, Any] | None = None,
                  metadata: Mapping[str, Any] | None = None, stac: PathLike | None = None) -> str:
    """The report as an HTML string (links relative to ``html_dir``); ``stac``: a STAC Collection to link in a
    final "STAC" section."""
    parts = []
    for s in sections:
        body = [f"<h2>{H.esc(s.title)}</h2>"]
        if s.text:
            body += [f"<p>{H.esc(p)}</p>" for p in s.text.split("\n\n") if p.strip()]
        if s.figures:
            body.append('<div class="figs">' + "".join(H.figure_html(f.png, f.caption, f.alt) for f in s.figures)
                        + "</div>")
        body += [H.table_html(t.rows, t.caption) for t in s.tables]
        if s.links:
            body.append(H.links_html(_with_stac_items(s.links), html_dir))
        parts.append(f"<section>{''.join(body)}</section>")
    if stac is not None:
        parts.append(_stac_section(stac, html_dir))
    meta = generation_metadata(metadata)
    footer = "Generated by " + " \u00b7 ".join(f"{H.esc(k)}: {H.esc(H.fmt(v))}" for k, v in meta.items())
    return H.page_html(title, "\n".join(parts), subtitle=subtitle or "", summary=summary, footer=footer)


def build_report(sections: Sequence[Section], out_html: PathLike, *, title: str = "dinov3geo report",
                 subtitle: str | None = None, summary: Mapping[str, Any] | None = None,
                 metadata: Mapping[str, Any] | None = None, stac: PathLike | None = "auto") -> Path:
    """Write the self-contained report to ``out_html`` (atomically) and return its path.

    Args:
        sections: the report's sections, in order.
        out_html: output path (its folder is created); links are made relative to its folder. A linked
            product with a STAC Item (``<product>.stac.json``) gets a link to its Item too.
        title, subtitle: page heading.
        summary: key numbers for the summary box (label -> value).
        metadata: extra generation metadata (e.g. the pipeline name) for the footer.
        stac: a STAC Collection to link in a final "STAC" section; ``"auto"`` (default): the pipeline run's
            ``stac/collection.json`` next to the report, when there is one; None: no such section.
    """
    from dinov3geo.utils.atomic import atomic_path

    out = Path(out_html)
    text = render_report(sections, out.absolute().parent, title=title, subtitle=subtitle, summary=summary,
                         metadata=metadata, stac=_find_collection(out, stac))
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------ measurements
def raster_area_ha(path: PathLike, threshold: float = 0.5, band: int = 1) -> float:
    """Area in hectares of the pixels of ``band`` with ``value >= threshold`` (nodata excluded).

    Projected CRS: pixel area in the CRS's linear unit converted to m^2; geographic CRS: geodesic area of
    each row's pixels on the CRS's ellipsoid.
    """
    import rasterio
    from pyproj import CRS as ProjCRS
    from rasterio.windows import Window

    with rasterio.open(path) as src:
        if src.crs is None or src.transform.is_identity:
            raise ValueError(f"{path}: no CRS/geotransform, cannot measure an area")
        crs = ProjCRS(src.crs.to_wkt())
        t = src.transform
        if crs.is_geographic:
            geod = crs.get_geod()
        else:
            unit = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
            px_m2 = abs(t.a * t.e - t.b * t.d) * unit * unit
        total = 0.0
        step = 1024
        for r0 in range(0, src.height, step):
            win = Window(0, r0, src.width, min(step, src.height - r0))
            a = src.read(band, window=win, masked=True)
            hit = np.ma.filled(a >= threshold, False)
            per_row = hit.sum(axis=1)
            if crs.is_geographic:
                for i, n in enumerate(per_row):
                    if n:
                        x0, y0 = t * (0, r0 + i)
                        x1, y1 = t * (1, r0 + i + 1)
                        area, _ = geod.polygon_area_perimeter([x0, x1, x1, x0], [y0, y0, y1, y1])
                        total += abs(area) * int(n)
            else:
                total += float(per_row.sum()) * px_m2
    return total / 1e4


# ----------------------------------------------------------------------------------------------- specs
#: keys of each item kind (``kind`` plus these); the first group is required
ITEM_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "rgb": (("path",), ("bands", "percentiles", "caption", "max_size")),
    "map": (("path",), ("band", "label", "cmap", "vmin", "vmax", "caption", "max_size")),
    "class_map": (("path",), ("band", "legend", "caption", "max_size")),
    "overlay": (("image", "mask"), ("threshold", "color", "alpha", "label", "bands", "percentiles", "caption",
                                    "area", "max_size", "polygons", "outline")),
    "pca": (("features",), ("caption", "max_size", "variable")),
    "image": (("path",), ("caption",)),
    "loss_curves": (("runs",), ("metrics", "caption")),
    "table": ((), ("rows", "path", "caption")),
    "links": (("paths",), ()),
    "text": (("text",), ()),
}
SECTION_KEYS = ("title", "text", "items")
#: keys of an item holding input paths (the report stage re-runs when they change)
_PATH_KEYS = ("path", "image", "mask", "features", "runs", "paths", "polygons")


def _items(spec: Mapping[str, Any], where: str) -> list[Mapping[str, Any]]:
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: a section is a mapping with 'title' and 'items' (or 'kind'), got {spec!r}")
    if "kind" in spec:
        if "items" in spec:
            raise ValueError(f"{where}: give either 'kind' or 'items', not both")
        return [{k: v for k, v in spec.items() if k not in ("title", "text")}]
    bad = sorted(set(spec) - set(SECTION_KEYS))
    if bad:
        raise ValueError(f"{where}: unknown key(s) {bad}; a section has {list(SECTION_KEYS)} (or 'kind')")
    items = spec.get("items") or []
    if not isinstance(items, list):
        raise ValueError(f"{where}: 'items' must be a list")
    return items


def validate_specs(specs: Sequence[Mapping[str, Any]]) -> None:
    """Check section specs; ``ValueError`` naming the section, item and key."""
    if not isinstance(specs, list | tuple):
        raise ValueError("parameter 'sections' must be a list of sections")
    for i, spec in enumerate(specs):
        where = f"sections[{i}]" + (f" ({spec.get('title')!r})" if isinstance(spec, Mapping) else "")
        for j, item in enumerate(_items(spec, where)):
            iw = f"{where} item {j}"
            if not isinstance(item, Mapping) or "kind" not in item:
                raise ValueError(f"{iw}: an item needs 'kind' (one of {sorted(ITEM_KEYS)})")
            kind = item["kind"]
            if kind not in ITEM_KEYS:
                raise ValueError(f"{iw}: unknown kind {kind!r}; kinds: {sorted(ITEM_KEYS)}")
            req, opt = ITEM_KEYS[kind]
            bad = sorted(set(item) - {"kind", *req, *opt})
            if bad:
                raise ValueError(f"{iw} (kind {kind}): unknown key(s) {bad}; valid: {sorted({*req, *opt})}")
            missing = [k for k in req if k not in item]
            if missing:
                raise ValueError(f"{iw} (kind {kind}): missing key(s) {missing}")
            if kind == "table" and ("rows" in item) == ("path" in item):
                raise ValueError(f"{iw} (kind table): give exactly one of 'rows' or 'path'")


def spec_paths(specs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every file path the section specs read (inputs of a report stage)."""
    out: list[str] = []
    for i, spec in enumerate(specs):
        for item in _items(spec, f"sections[{i}]"):
            for k in _PATH_KEYS:
                v = item.get(k)
                for x in (v if isinstance(v, list) else [v] if v is not None else []):
                    p = x.get("path") if isinstance(x, Mapping) else x
                    if p is not None:
                        out.append(str(p))
    return out


def _cell(v: str | None) -> Any:
    """A CSV cell as a number when it is one (so that the table formats it), else the text."""
    if v is None or v.strip() == "":
        return v
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def _read_table(path: Path) -> Mapping[str, Any] | list[Mapping[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"report table: {str(path)!r} not found")
    if path.suffix.lower() == ".csv":
        import csv

        with open(path, newline="") as f:
            return [{k: _cell(v) for k, v in r.items()} for r in csv.DictReader(f)]
    data = json.loads(path.read_text())
    if isinstance(data, Mapping):
        flat = {k: v for k, v in data.items() if not isinstance(v, Mapping | list)}
        nested = {k: v for k, v in data.items() if isinstance(v, Mapping)}
        if nested and all(isinstance(v, Mapping) for v in nested.values()) and not flat:
            return [{"": k, **v} for k, v in nested.items()]  # {"model A": {...}, "model B": {...}}
        return flat or data
    if isinstance(data, list):
        return data
    raise ValueError(f"report table: {path} holds neither a mapping nor a list of rows")


def section_from_spec(spec: Mapping[str, Any]) -> Section:
    """A :class:`Section` from a spec (see module docstring); figures are rendered here."""
    validate_specs([spec])
    sec = Section(str(spec.get("title") or ""), str(spec.get("text") or ""))
    for item in _items(spec, "section"):
        kind = item["kind"]
        cap = str(item.get("caption") or "")
        ms = int(item.get("max_size", 1024))
        if kind == "rgb":
            pct = tuple(item.get("percentiles", (2, 98)))
            png = F.rgb_figure(item["path"], bands=item.get("bands"), percentiles=pct, max_size=ms)  # type: ignore[arg-type]
            sec.figures.append(Figure(png, cap or f"{Path(item['path']).name}: RGB, {pct[0]:g}-{pct[1]:g} % stretch"))
        elif kind == "map":
            png = F.map_figure(item["path"], band=item.get("band", 1), label=str(item.get("label", "")),
                               cmap=str(item.get("cmap", "viridis")), vmin=item.get("vmin"), vmax=item.get("vmax"),
                               max_size=ms)
            sec.figures.append(Figure(png, cap or f"{Path(item['path']).name} ({item.get('label', 'band 1')})"))
        elif kind == "class_map":
            png = F.class_map_figure(item["path"], band=int(item.get("band", 1)), max_size=ms,
                                     legend=bool(item.get("legend", True)))
            sec.figures.append(Figure(png, cap or f"{Path(item['path']).name}: classes"))
        elif kind == "overlay":
            thr = float(item.get("threshold", 0.5))
            png = F.overlay_figure(item["image"], item["mask"], threshold=thr,
                                   color=str(item.get("color", "#e8112d")), alpha=float(item.get("alpha", 0.6)),
                                   label=str(item.get("label", "")), bands=item.get("bands"),
                                   percentiles=tuple(item.get("percentiles", (2, 98))), max_size=ms,  # type: ignore[arg-type]
                                   polygons=item.get("polygons"), outline=str(item.get("outline", "#ffd400")))
            text = cap or f"{Path(item['mask']).name} >= {thr:g} over {Path(item['image']).name}"
            if item.get("area"):
                ha = raster_area_ha(item["mask"], thr)
                text += f" ({ha:,.2f} ha)"
                sec.tables.append(Table({f"{item.get('label') or Path(item['mask']).stem} area (ha)": round(ha, 4)}))
            sec.figures.append(Figure(png, text))
        elif kind == "pca":
            png = F.pca_figure(item["features"], max_size=int(item.get("max_size", 512)),
                               variable=str(item.get("variable", "features")))
            sec.figures.append(Figure(png, cap or "PCA of the dense features (3 components as RGB)"))
        elif kind == "image":
            p = Path(item["path"])
            if not p.exists():
                raise FileNotFoundError(f"report image: {str(p)!r} not found")
            sec.figures.append(Figure(p.read_bytes(), cap or p.name))
        elif kind == "loss_curves":
            png = F.loss_curves_figure(item["runs"], metrics=item.get("metrics"))
            sec.figures.append(Figure(png, cap or "Pretraining losses"))
        elif kind == "table":
            rows = item["rows"] if "rows" in item else _read_table(Path(item["path"]))
            sec.tables.append(Table(rows, cap))
        elif kind == "links":
            for x in item["paths"]:
                if isinstance(x, Mapping):
                    sec.links.append(Link(x["path"], str(x.get("label", "")), str(x.get("note", ""))))
                else:
                    sec.links.append(Link(x))
        elif kind == "text":
            sec.text = "\n\n".join(t for t in (sec.text, str(item["text"])) if t)
    return sec
