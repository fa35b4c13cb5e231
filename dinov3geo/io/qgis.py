"""QGIS-ready maps: a default rendering and GDAL statistics for every raster product.

A GeoTIFF opens in QGIS as a grey stretch unless something says how to draw it. For each raster product,
:func:`style_product` writes two sidecars, and never touches the product itself (its bytes, and so the checksum
in its STAC Item, stay the same):

* a **QGIS layer style** ``<stem>.qml`` next to the raster, which QGIS applies automatically when the raster is
  opened (:func:`write_qml`):

  - continuous maps (canopy height, change distance, any float band) get a *singleband pseudocolor* renderer on
    band 1 with an interpolated colour ramp: canopy height from 0 to the 98th percentile (Viridis, as in the
    HTML report), change probability 0 to 1 (YlOrRd), other maps 2nd to 98th percentile (Viridis). A second
    band such as ``height_std`` is not styled (QGIS shows band 1);
  - class maps get a *paletted* renderer with one labelled colour per class, from the class table that
    ``dinov3geo landcover`` writes (the ``DINOV3GEO_CLASSES`` dataset tag), else from the band's GDAL colour
    table and category names (the PAM ``.aux.xml``);
  - binary masks (values 0/1, 255 = nodata: forest masks, change and forest-loss maps) get a paletted renderer
    with the class drawn in colour and 0 transparent;
  - RGB-like multi-band rasters (PCA composites) are left to QGIS's own multiband renderer;

* **GDAL statistics** of each band (``STATISTICS_MINIMUM/MAXIMUM/MEAN/STDDEV/VALID_PERCENT``) in the GDAL PAM
  sidecar ``<file>.aux.xml`` (:func:`write_statistics`), which GDAL merges into the band metadata when it opens
  the file, so ``gdalinfo``, QGIS and any GDAL-based viewer stretch sensibly without scanning the raster. The
  sidecar's other content (category names, other metadata) is kept.

Statistics come from a decimated read of at most :data:`STATS_PIXELS` pixels per band (GDAL serves it from the
COG's overviews), like ``gdalinfo -approx_stats``: ``STATISTICS_APPROXIMATE=YES`` is written when the read was
decimated. A region-scale COG costs one overview read per band (well under a second), not a full scan.

Sidecars dinov3geo did not write are never replaced: our QML files carry the comment ``<!-- dinov3geo-style
-->``; an existing ``.qml`` without it (a user's own style, or another tool's) is kept and reported as skipped.
Both sidecars are written atomically.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinov3geo.io.errors import OutputError, RasterReadError

__all__ = [
    "RAMPS",
    "STATS_PIXELS",
    "STYLE_MARK",
    "BandStats",
    "band_statistics",
    "product_style_kind",
    "style_product",
    "write_qml",
    "write_statistics",
]

#: the comment that marks a QML file as written by dinov3geo (only those are ever replaced)
STYLE_MARK = "dinov3geo-style"
#: the largest number of pixels per band read for statistics (a decimated read above it)
STATS_PIXELS = 1 << 20
#: the class-table dataset tag of dinov3geo class maps (see ``dinov3geo.tasks.landcover.classes``)
CLASSES_TAG = "DINOV3GEO_CLASSES"
#: colour ramps (stops from low to high), from matplotlib (Viridis) and ColorBrewer (YlGn, YlOrRd)
RAMPS: dict[str, tuple[str, ...]] = {
    "viridis": ("#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58",
                "#b5de2b", "#fde725"),
    "ylgn": ("#ffffe5", "#f7fcb9", "#d9f0a3", "#addd8e", "#78c679", "#41ab5d", "#238443", "#006837", "#004529"),
    "ylorrd": ("#ffffb2", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#b10026"),
}
#: style kinds :func:`write_qml` knows
KINDS = ("height", "probability", "continuous", "classes", "mask")
#: colours of binary masks by band name (value 1); others use :data:`_MASK_DEFAULT`
_MASK_COLORS = {"forest": "#1a9850", "forest_loss": "#e8112d", "loss": "#e8112d", "change": "#e8112d",
                "deforestation": "#e8112d", "gain": "#2c7fb8", "forest_gain": "#2c7fb8"}
_MASK_DEFAULT = "#e8112d"


@dataclass
class BandStats:
    """Statistics of one band (valid pixels only: nodata and NaN excluded)."""

    minimum: float
    maximum: float
    mean: float
    stddev: float
    valid_percent: float  #: share of valid pixels, 0..100
    p2: float  #: 2nd percentile
    p98: float  #: 98th percentile
    approximate: bool  #: computed from a decimated read (overviews)
    integers: bool = False  #: all valid values are whole numbers
    values: list[int] = field(default_factory=list)  #: the distinct values, when there are at most 32 integers

    def as_stac(self) -> dict[str, float]:
        """The ``statistics`` object of the STAC raster extension."""
        return {"minimum": self.minimum, "maximum": self.maximum, "mean": self.mean, "stddev": self.stddev,
                "valid_percent": self.valid_percent}


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def band_statistics(path: str | os.PathLike[str], band: int = 1, *,
                    max_pixels: int = STATS_PIXELS) -> BandStats | None:
    """Statistics of ``band`` of the raster at ``path`` from a read of at most ``max_pixels`` pixels.

    Returns None when the band has no valid pixel.

    Raises:
        RasterReadError: the file cannot be opened or read.
    """
    import rasterio

    try:
        with rasterio.open(path) as src:
            h, w = src.height, src.width
            f = max(1.0, math.sqrt(h * w / max(1, max_pixels)))
            shape = (max(1, round(h / f)), max(1, round(w / f)))
            a = src.read(band, out_shape=shape, masked=True)
    except rasterio.errors.RasterioError as exc:
        raise RasterReadError(path, str(exc)) from exc
    data = np.ma.masked_invalid(a.astype(np.float64, copy=False)) if a.dtype.kind == "f" else a
    v = np.ma.compressed(data).astype(np.float64, copy=False)
    if v.size == 0:
        return None
    p2, p98 = np.percentile(v, [2, 98])
    ints = bool(np.all(np.mod(v, 1) == 0))
    uniq = np.unique(v) if ints else np.empty(0)
    return BandStats(minimum=_round(v.min()), maximum=_round(v.max()), mean=_round(v.mean()),
                     stddev=_round(v.std()), valid_percent=_round(100.0 * v.size / data.size),
                     p2=_round(p2), p98=_round(p98), approximate=shape != (h, w), integers=ints,
                     values=[int(x) for x in uniq] if 0 < uniq.size <= 32 else [])


# ---------------------------------------------------------------------------------------- statistics
def _aux_path(path: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(path)}.aux.xml")


def write_statistics(path: str | os.PathLike[str], stats: Mapping[int, BandStats | None] | None = None) -> Path:
    """Write GDAL band statistics of the raster ``path`` into its PAM sidecar ``<path>.aux.xml``, atomically.

    Args:
        path: the raster (not modified).
        stats: statistics per band number (computed with :func:`band_statistics` when None; bands without
            valid pixels get none).

    Returns:
        The sidecar path. Its other content (category names, other metadata) is kept; only the
        ``STATISTICS_*`` items of the bands are replaced.
    """
    import rasterio

    from dinov3geo.utils.atomic import atomic_path

    if stats is None:
        try:
            with rasterio.open(path) as src:
                n = src.count
        except rasterio.errors.RasterioError as exc:
            raise RasterReadError(path, str(exc)) from exc
        stats = {b: band_statistics(path, b) for b in range(1, n + 1)}
    aux = _aux_path(path)
    root = ET.Element("PAMDataset")
    if aux.exists():
        try:
            root = ET.parse(aux).getroot()
        except (ET.ParseError, OSError) as exc:
            raise OutputError(aux, f"it cannot be read as a GDAL PAM sidecar ({exc})",
                              "Move it away if GDAL statistics should be written; it was left untouched.") from exc
        if root.tag != "PAMDataset":
            raise OutputError(aux, "it is not a GDAL PAM sidecar (its root element is not PAMDataset)",
                              "Move it away if GDAL statistics should be written; it was left untouched.")
    for b, st in sorted(stats.items()):
        bel = next((e for e in root.findall("PAMRasterBand") if e.get("band") == str(b)), None)
        if bel is None:
            bel = ET.SubElement(root, "PAMRasterBand", band=str(b))
        md = next((m for m in bel.findall("Metadata") if not m.get("domain")), None)
        if md is None:
            md = ET.SubElement(bel, "Metadata")
        for item in list(md.findall("MDI")):
            if (item.get("key") or "").startswith("STATISTICS_"):
                md.remove(item)
        if st is None:
            continue
        items = {"STATISTICS_MINIMUM": st.minimum, "STATISTICS_MAXIMUM": st.maximum, "STATISTICS_MEAN": st.mean,
                 "STATISTICS_STDDEV": st.stddev, "STATISTICS_VALID_PERCENT": st.valid_percent}
        if st.approximate:
            items["STATISTICS_APPROXIMATE"] = "YES"  # type: ignore[assignment]
        for k, val in items.items():
            ET.SubElement(md, "MDI", key=k).text = f"{val:.10g}" if isinstance(val, float) else str(val)
    ET.indent(root, space="  ")
    with atomic_path(aux) as tmp:
        tmp.write_text(ET.tostring(root, encoding="unicode") + "\n", encoding="utf-8")
    return aux


# ------------------------------------------------------------------------------------------ kind
@dataclass
class _RasterInfo:
    count: int
    dtypes: tuple[str, ...]
    descriptions: tuple[str | None, ...]
    tags: dict[str, str]
    colorinterp: tuple[str, ...]
    colormap: dict[int, tuple[int, int, int, int]] | None
    nodata: float | None


def _info(path: str | os.PathLike[str]) -> _RasterInfo:
    import rasterio

    try:
        with rasterio.open(path) as src:
            cmap = None
            with contextlib.suppress(ValueError):
                cmap = src.colormap(1)
            return _RasterInfo(src.count, tuple(src.dtypes), tuple(src.descriptions), dict(src.tags()),
                               tuple(c.name for c in src.colorinterp), cmap, src.nodata)
    except rasterio.errors.RasterioError as exc:
        raise RasterReadError(path, str(exc)) from exc


def product_style_kind(path: str | os.PathLike[str], stats: BandStats | None = None) -> str | None:
    """How band 1 of the raster ``path`` should be drawn: one of :data:`KINDS`, or None (RGB-like multi-band
    rasters, empty rasters: left to QGIS).

    ``classes``: a dinov3geo class map (``DINOV3GEO_CLASSES`` tag) or a band with a GDAL colour table;
    ``mask``: an integer band holding only 0 and 1 (nodata aside); ``height``: a band named ``height`` or a
    product whose ``PRODUCT`` tag mentions canopy height; ``probability``: a float band named ``*prob*`` with
    values in 0..1; ``continuous``: any other band.
    """
    info = _info(path)
    if info.tags.get(CLASSES_TAG) or info.colormap:
        return "classes"
    if info.count >= 3 and {"red", "green", "blue"} <= set(info.colorinterp[:3]):
        return None
    st = stats if stats is not None else band_statistics(path, 1)
    if st is None:
        return None
    name = (info.descriptions[0] or "").lower()
    floating = np.dtype(info.dtypes[0]).kind == "f"
    if not floating and st.integers and set(st.values) <= {0, 1} and st.values:
        return "mask"
    if name == "height" or name.startswith("height") or "canopy height" in info.tags.get("PRODUCT", "").lower():
        return "height"
    if "prob" in name and st.minimum >= 0 and st.maximum <= 1:
        return "probability"
    return "continuous"


# ------------------------------------------------------------------------------------------- QML
def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*[int(c) for c in rgb[:3]])


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _header() -> str:
    from dinov3geo import __version__

    return ("<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
            f"<!-- {STYLE_MARK}: written by dinov3geo {__version__}; replaced when the product is restyled. "
            "Save your own style under another name (or remove this line) to keep it. -->\n"
            '<qgis version="3.28.0" styleCategories="Symbology">\n  <pipe>\n')


_FOOTER = """    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>
    <huesaturation saturation="0" grayscaleMode="0" colorizeOn="0" colorizeRed="255" colorizeGreen="128" \
colorizeBlue="128" colorizeStrength="100"/>
    <rasterresampler maxOversampling="2"/>
    <resamplingStage>resamplingFilter</resamplingStage>
  </pipe>
  <blendMode>0</blendMode>
</qgis>
"""

_MINMAX = """      <rasterTransparency/>
      <minMaxOrigin>
        <limits>None</limits>
        <extent>WholeRaster</extent>
        <statAccuracy>Estimated</statAccuracy>
        <cumulativeCutLower>0.02</cumulativeCutLower>
        <cumulativeCutUpper>0.98</cumulativeCutUpper>
        <stdDevFactor>2</stdDevFactor>
      </minMaxOrigin>
"""


def _pseudocolor(band: int, vmin: float, vmax: float, ramp: Sequence[str], label: str) -> str:
    """A singleband pseudocolor renderer: the ramp's stops spread evenly over vmin..vmax (interpolated)."""
    n = len(ramp)
    vals = [vmin + (vmax - vmin) * i / (n - 1) for i in range(n)]
    digits = max(0, min(4, 2 - int(math.floor(math.log10(max(abs(vmax - vmin), 1e-9))))))
    items = "\n".join(f'          <item alpha="255" value="{_fmt(v)}" label="{v:.{digits}f}" color="{c}"/>'
                      for v, c in zip(vals, ramp, strict=True))
    stops = ":".join(f"{i / (n - 1):.4g};{','.join(str(int(ramp[i][k:k + 2], 16)) for k in (1, 3, 5))},255"
                     for i in range(1, n - 1))
    c1 = ",".join(str(int(ramp[0][k:k + 2], 16)) for k in (1, 3, 5))
    c2 = ",".join(str(int(ramp[-1][k:k + 2], 16)) for k in (1, 3, 5))
    return (f'    <rasterrenderer type="singlebandpseudocolor" opacity="1" band="{band}" alphaBand="-1" '
            f'classificationMin="{_fmt(vmin)}" classificationMax="{_fmt(vmax)}" nodataColor="">\n'
            f"{_MINMAX}"
            "      <rastershader>\n"
            f'        <colorrampshader colorRampType="INTERPOLATED" classificationMode="1" clip="0" '
            f'minimumValue="{_fmt(vmin)}" maximumValue="{_fmt(vmax)}" labelPrecision="{digits}">\n'
            '          <colorramp type="gradient" name="[source]">\n'
            '            <Option type="Map">\n'
            f'              <Option type="QString" name="color1" value="{c1},255"/>\n'
            f'              <Option type="QString" name="color2" value="{c2},255"/>\n'
            '              <Option type="QString" name="discrete" value="0"/>\n'
            '              <Option type="QString" name="rampType" value="gradient"/>\n'
            f'              <Option type="QString" name="stops" value="{stops}"/>\n'
            "            </Option>\n"
            "          </colorramp>\n"
            f"{items}\n"
            "        </colorrampshader>\n"
            "      </rastershader>\n"
            "    </rasterrenderer>\n"
            f"    <!-- {html.escape(label)} -->\n")


def _paletted(band: int, entries: Sequence[tuple[int, str, int, str]]) -> str:
    """A paletted renderer: (value, colour, alpha, label) per class."""
    rows = "\n".join(f'        <paletteEntry value="{v}" color="{c}" alpha="{a}" label="{html.escape(lab)}"/>'
                     for v, c, a, lab in entries)
    return (f'    <rasterrenderer type="paletted" opacity="1" band="{band}" alphaBand="-1" nodataColor="">\n'
            f"{_MINMAX}"
            "      <colorPalette>\n"
            f"{rows}\n"
            "      </colorPalette>\n"
            "    </rasterrenderer>\n")


def _class_entries(path: str | os.PathLike[str], info: _RasterInfo) -> list[tuple[int, str, int, str]]:
    """(value, colour, alpha, label) of each class: the ``DINOV3GEO_CLASSES`` table, else the colour table with
    the category names of the PAM sidecar."""
    raw = info.tags.get(CLASSES_TAG)
    if raw:
        try:
            obj = json.loads(raw)
            obj = obj["classes"] if isinstance(obj, Mapping) else obj
            return [(int(d["code"]), str(d.get("color") or "#808080"), 255, str(d["name"])) for d in obj]
        except (ValueError, KeyError, TypeError) as exc:
            raise OutputError(path, f"its {CLASSES_TAG} tag is not a class table ({exc})",
                              "Rewrite the class map with `dinov3geo landcover predict`; no style was "
                              "written.") from exc
    names: list[str] = []
    aux = _aux_path(path)
    if aux.is_file():
        with contextlib.suppress(ET.ParseError, OSError):
            for b in ET.parse(aux).getroot().findall("PAMRasterBand"):
                cats = b.find("CategoryNames") if b.get("band") == "1" else None
                if cats is not None:
                    names = [c.text or "" for c in cats.findall("Category")]
    out = []
    for v, rgba in sorted((info.colormap or {}).items()):
        label = names[v] if v < len(names) else ""
        if nodata_value(info) == v or (not label and tuple(rgba[:3]) == (0, 0, 0) and rgba[3] in (0, 255)
                                       and v > max(len(names) - 1, 0)):
            continue  # nodata and the unused black entries GDAL fills colour tables with
        out.append((int(v), _hex(rgba), int(rgba[3]), label or str(v)))
    return out


def nodata_value(info: _RasterInfo) -> int | None:
    """The nodata value as an int, None when there is none (or it is not a whole number)."""
    nd = info.nodata
    if nd is None or not np.isfinite(nd) or nd != int(nd):
        return None
    return int(nd)


def _qml_path(path: str | os.PathLike[str]) -> Path:
    return Path(path).with_suffix(".qml")


def _ours(qml: Path) -> bool:
    try:
        head = qml.read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return False
    return f"<!-- {STYLE_MARK}" in head


def write_qml(path: str | os.PathLike[str], kind: str | None = None, *, band: int = 1,
              vmin: float | None = None, vmax: float | None = None, ramp: str | None = None,
              stats: BandStats | None = None) -> Path:
    """Write the QGIS style ``<stem>.qml`` of the raster ``path`` (applied by QGIS when the raster is opened).

    Args:
        path: the raster (not modified).
        kind: ``height``, ``probability``, ``continuous``, ``classes`` or ``mask``
            (:func:`product_style_kind` when None).
        band: the band to draw.
        vmin, vmax: the ramp's range (default: 0..98th percentile for height, 0..1 for probability,
            2nd..98th percentile otherwise).
        ramp: a name in :data:`RAMPS` (default: viridis; ylorrd for probability).
        stats: the band's statistics (computed when needed and not given).

    Returns:
        The QML path.

    Raises:
        OutputConflictError: a ``.qml`` that dinov3geo did not write exists there (it is kept), or the QML path
            is an input.
        ValueError: an unknown ``kind`` or ``ramp``, or a raster that cannot be styled.
    """
    from dinov3geo.utils.atomic import atomic_path
    from dinov3geo.utils.outputs import OutputConflictError, guard_output

    qml = _qml_path(path)
    if Path(path).suffix.lower() == ".qml":
        raise ValueError(f"{os.fspath(path)!r} is a QML file, not a raster")
    guard_output(qml, [path], role="QGIS style")
    if qml.exists() and not _ours(qml):
        raise OutputConflictError(qml, "a QGIS style that dinov3geo did not write is there",
                                  "It was kept; delete or rename it to get the dinov3geo default style.")
    info = _info(path)
    if kind is None:
        kind = product_style_kind(path, stats)
        if kind is None:
            raise ValueError(f"{os.fspath(path)!r}: no default style for this raster (RGB-like or empty); "
                             "pass kind=")
    if kind not in KINDS:
        raise ValueError(f"unknown style kind {kind!r}; one of {list(KINDS)}")
    if ramp is not None and ramp.lower() not in RAMPS:
        raise ValueError(f"unknown colour ramp {ramp!r}; one of {sorted(RAMPS)}")
    if kind == "classes":
        entries = _class_entries(path, info)
        if not entries:
            raise ValueError(f"{os.fspath(path)!r}: no class table or colour table to build a palette from")
        body = _paletted(band, entries)
    elif kind == "mask":
        name = (info.descriptions[band - 1] or "class 1") if band <= info.count else "class 1"
        color = _MASK_COLORS.get(name.lower(), _MASK_DEFAULT)
        body = _paletted(band, [(0, "#bdbdbd", 0, f"not {name.replace('_', ' ')}"),
                                (1, color, 255, name.replace("_", " "))])
    else:
        st = stats if stats is not None and band == 1 else band_statistics(path, band)
        if kind == "probability":
            lo, hi = 0.0, 1.0
        elif kind == "height":
            top = st.p98 if st is not None and st.p98 > 0 else (st.maximum if st is not None else 0.0)
            lo, hi = 0.0, float(math.ceil(top)) if top > 0 else 1.0
        else:
            lo, hi = (st.p2, st.p98) if st is not None else (0.0, 1.0)
            if hi <= lo:
                lo, hi = (st.minimum, st.maximum) if st is not None else (0.0, 1.0)
            if hi <= lo:
                hi = lo + 1.0
        lo = lo if vmin is None else float(vmin)
        hi = hi if vmax is None else float(vmax)
        if hi <= lo:
            raise ValueError(f"vmax ({hi}) must be larger than vmin ({lo})")
        stops = RAMPS[(ramp or ("ylorrd" if kind == "probability" else "viridis")).lower()]
        desc = info.descriptions[band - 1] if band <= info.count else None
        unit = info.tags.get("UNITS", "")
        body = _pseudocolor(band, lo, hi, stops, f"{kind}: band {band} ({desc or 'unnamed'}) "
                            f"{_fmt(lo)}..{_fmt(hi)}{' ' + unit if unit else ''}")
    with atomic_path(qml) as tmp:
        tmp.write_text(_header() + body + _FOOTER, encoding="utf-8")
    return qml


def style_product(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Give the raster product ``path`` its QGIS style and GDAL statistics (see the module docstring).

    Returns:
        ``{"kind": ..., "qml": path or None, "statistics": path or None, "skipped": [...], "kept": [...]}``:
        what was written; why a sidecar was not (an RGB raster, an empty band, a class map needing no
        statistics); and ``kept``, one line per sidecar that dinov3geo did not write and so left in place.

    Raises:
        RasterReadError: ``path`` cannot be read as a raster.
    """
    from dinov3geo.utils.outputs import OutputConflictError

    info = _info(path)
    skipped: list[str] = []
    kept: list[str] = []
    stats = {b: band_statistics(path, b) for b in range(1, info.count + 1)}
    kind = product_style_kind(path, stats.get(1))
    aux = None
    if kind == "classes":
        skipped.append("statistics: not needed for a class map")
    else:
        try:
            aux = write_statistics(path, stats)
        except OutputError as exc:
            kept.append(f"GDAL statistics not written: {exc}")
    qml = None
    existing = _qml_path(path)
    if kind is None:
        skipped.append("style: no default style for an RGB-like or empty raster")
    elif kind == "classes" and existing.is_file() and not _ours(existing):
        # class maps get their palette from their writer (``dinov3geo landcover``): not a conflict
        skipped.append(f"style: the class map already has a QGIS style ({existing}); kept")
    else:
        try:
            qml = write_qml(path, kind, stats=stats.get(1))
        except OutputConflictError as exc:
            kept.append(f"QGIS style not written: {exc}")
        except ValueError as exc:
            skipped.append(f"style: {exc}")
    return {"kind": kind, "qml": str(qml) if qml else None, "statistics": str(aux) if aux else None,
            "skipped": skipped, "kept": kept}
