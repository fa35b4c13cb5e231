"""Land-cover class tables and class rasters that open coloured and labelled in QGIS.

A :class:`ClassTable` is the ordered list of a model's classes: each :class:`LandClass` has an integer
**code** (the pixel value written in class maps, 0 to 254), a **name** and a **colour** (``"#rrggbb"``). The
table travels with the model (checkpoint metadata) and with every class map:

* as JSON in the dataset tag ``DINOV3GEO_CLASSES`` (:data:`CLASSES_TAG`; read back by :func:`read_class_table`);
* as the GDAL **colour table** of band 1 (``rasterio``'s ``write_colormap``; value 255 transparent);
* as GDAL **category names**: GDAL keeps category names of GeoTIFFs in the PAM sidecar ``<file>.aux.xml``
  (``<CategoryNames><Category>name</Category>...</CategoryNames>``, indexed by pixel value), which GDAL and
  QGIS read when they open the file (:func:`write_category_names`);
* as a QGIS style ``<file>.qml`` (paletted renderer with a label per class), which QGIS applies automatically
  to a raster of the same name (:func:`write_qml`).

Pixel value :data:`NODATA` (255) means "no class" (unlabelled, outside the AOI, no data in the image).

A model predicts class *indexes* (0..n-1, the order of the table); maps and label files hold *codes*
(:meth:`ClassTable.index_of`, :meth:`ClassTable.code_lut`, :meth:`ClassTable.index_lut` convert).
"""

from __future__ import annotations

import colorsys
import contextlib
import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from dinov3geo.io.cog import COGWriter
from dinov3geo.io.errors import DinoGeoIOError, RasterReadError
from dinov3geo.io.grid import GridSpec
from dinov3geo.utils.atomic import atomic_path

__all__ = [
    "CLASSES_TAG",
    "NODATA",
    "ClassRasterWriter",
    "ClassTable",
    "ClassTableError",
    "LandClass",
    "default_color",
    "read_category_names",
    "read_class_table",
    "write_category_names",
    "write_class_raster",
    "write_qml",
]

#: the dataset tag holding the class table as JSON
CLASSES_TAG = "DINOV3GEO_CLASSES"
#: the "no class" value of class rasters (unlabelled pixels, outside the AOI, image nodata)
NODATA = 255
#: the largest class code (255 is :data:`NODATA`)
MAX_CODE = 254

_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")

#: colours for familiar land-cover names (ESA WorldCover 2021 legend where it has the class, else close to it)
_KNOWN_COLORS: dict[str, str] = {
    "forest": "#006400", "tree": "#006400", "trees": "#006400", "tree_cover": "#006400", "woodland": "#1b7a2e",
    "primary_forest": "#00500a", "secondary_forest": "#3c9a3c", "plantation": "#6b8e23", "mangrove": "#00cf75",
    "mangroves": "#00cf75", "shrub": "#ffbb22", "shrubland": "#ffbb22", "shrubs": "#ffbb22", "scrub": "#ffbb22",
    "grass": "#ffff4c", "grassland": "#ffff4c", "herbaceous": "#ffff4c", "savanna": "#dcd159",
    "pasture": "#e6e64d", "cropland": "#f096ff", "crop": "#f096ff", "crops": "#f096ff", "agriculture": "#f096ff",
    "urban": "#fa0000", "built": "#fa0000", "built_up": "#fa0000", "buildings": "#fa0000", "settlement": "#fa0000",
    "village": "#fa0000", "road": "#c80000", "roads": "#c80000", "impervious": "#fa0000",
    "bare": "#b4b4b4", "barren": "#b4b4b4", "bare_soil": "#b4b4b4", "soil": "#b4b4b4", "sand": "#e6d2a0",
    "cleared": "#c8a064", "clearing": "#c8a064", "deforested": "#c8a064", "fallen_dry": "#a0785a",
    "dryout": "#d2b48c", "burnt": "#643200", "burned": "#643200",
    "snow": "#f0f0f0", "ice": "#f0f0f0", "snow_ice": "#f0f0f0", "water": "#0064c8", "river": "#0064c8",
    "lake": "#0064c8", "sea": "#00509a", "wetland": "#0096a0", "wetlands": "#0096a0", "marsh": "#0096a0",
    "moss": "#fae6a0", "lichen": "#fae6a0", "cloud": "#ffffff", "clouds": "#ffffff", "shadow": "#323232",
}
#: qualitative palette for other names (Tableau 20 order, well separated)
_QUALITATIVE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)


class ClassTableError(DinoGeoIOError, ValueError):
    """A class table is invalid (duplicate codes/names, code out of 0..254, bad colour) or missing."""


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def default_color(name: str, position: int = 0) -> str:
    """The colour of a class called ``name``: a familiar land-cover colour (forest green, water blue...) when
    the name is known, else entry ``position`` of a qualitative palette (golden-ratio hues beyond 20)."""
    k = _key(name)
    if k in _KNOWN_COLORS:
        return _KNOWN_COLORS[k]
    for part in k.split("_"):
        if part in _KNOWN_COLORS:
            return _KNOWN_COLORS[part]
    if position < len(_QUALITATIVE):
        return _QUALITATIVE[position]
    r, g, b = colorsys.hsv_to_rgb((position * 0.618034) % 1.0, 0.65, 0.85)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def _rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


@dataclass(frozen=True)
class LandClass:
    """One land-cover class.

    Attributes:
        code: pixel value in class maps and label rasters (0..254; 255 is "no class").
        name: class name (shown in QGIS, reports and metrics).
        color: display colour ``"#rrggbb"``.
    """

    code: int
    name: str
    color: str

    def __post_init__(self) -> None:
        if isinstance(self.code, bool) or int(self.code) != self.code or not 0 <= int(self.code) <= MAX_CODE:
            raise ClassTableError(f"class code {self.code!r} ({self.name!r}) must be an integer in 0..{MAX_CODE} "
                                  f"({NODATA} means 'no class'). Renumber the classes.")
        object.__setattr__(self, "code", int(self.code))
        if not str(self.name).strip():
            raise ClassTableError(f"class {self.code} has an empty name. Give every class a name.")
        object.__setattr__(self, "name", str(self.name).strip())
        if not isinstance(self.color, str) or not _HEX.match(self.color):
            raise ClassTableError(f"class {self.name!r} has the colour {self.color!r}; write colours as '#rrggbb'.")
        object.__setattr__(self, "color", self.color.lower())

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The colour as (r, g, b) integers 0..255."""
        return _rgb(self.color)


class ClassTable:
    """An ordered list of :class:`LandClass` (model output index ``i`` is ``classes[i]``).

    Codes and names are unique. Build one with :meth:`from_labels` (from the values found in a label file) or
    directly from :class:`LandClass` objects; store it with :meth:`to_json` / :meth:`from_json`.
    """

    def __init__(self, classes: Iterable[LandClass]) -> None:
        cl = tuple(classes)
        if not cl:
            raise ClassTableError("a class table needs at least one class.")
        seen_c: dict[int, str] = {}
        seen_n: dict[str, int] = {}
        for c in cl:
            if not isinstance(c, LandClass):
                raise TypeError(f"expected LandClass objects, got {type(c).__name__}")
            if c.code in seen_c:
                raise ClassTableError(f"class code {c.code} is used twice ({seen_c[c.code]!r} and {c.name!r}). "
                                      "Give each class its own code.")
            if c.name.lower() in seen_n:
                raise ClassTableError(f"class name {c.name!r} is used twice (codes {seen_n[c.name.lower()]} and "
                                      f"{c.code}). Give each class its own name.")
            seen_c[c.code] = c.name
            seen_n[c.name.lower()] = c.code
        self.classes: tuple[LandClass, ...] = cl
        self._index = {c.code: i for i, c in enumerate(cl)}
        self._by_name = {c.name.lower(): c for c in cl}

    # ------------------------------------------------------------------ access
    @property
    def codes(self) -> list[int]:
        """Class codes in table order."""
        return [c.code for c in self.classes]

    @property
    def names(self) -> list[str]:
        """Class names in table order."""
        return [c.name for c in self.classes]

    @property
    def colors(self) -> list[str]:
        """Class colours (``"#rrggbb"``) in table order."""
        return [c.color for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self) -> Iterator[LandClass]:
        return iter(self.classes)

    def __getitem__(self, i: int) -> LandClass:
        return self.classes[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClassTable) and self.classes == other.classes

    def __hash__(self) -> int:
        return hash(self.classes)

    def __repr__(self) -> str:
        return "ClassTable(" + ", ".join(f"{c.code}={c.name}" for c in self.classes) + ")"

    def index_of(self, code: int) -> int:
        """The model output index of class ``code``.

        Raises:
            KeyError: naming the code and the known codes.
        """
        try:
            return self._index[int(code)]
        except (KeyError, ValueError, TypeError):
            raise KeyError(f"class code {code!r} is not in the class table (codes {self.codes})") from None

    def by_name(self, name: str) -> LandClass:
        """The class called ``name`` (case-insensitive).

        Raises:
            KeyError: naming the name and the known names.
        """
        try:
            return self._by_name[str(name).strip().lower()]
        except KeyError:
            raise KeyError(f"class {name!r} is not in the class table (classes {self.names})") from None

    def name_of(self, code: int) -> str:
        """The name of class ``code``."""
        return self.classes[self.index_of(code)].name

    def index_lut(self) -> np.ndarray:
        """A 256-entry uint8 lookup table code -> index (unknown codes and 255 -> 255)."""
        lut = np.full(256, NODATA, dtype=np.uint8)
        for i, c in enumerate(self.classes):
            lut[c.code] = i
        return lut

    def code_lut(self) -> np.ndarray:
        """A 256-entry uint8 lookup table index -> code (indexes beyond the table and 255 -> 255)."""
        lut = np.full(256, NODATA, dtype=np.uint8)
        lut[: len(self.classes)] = self.codes
        return lut

    def unknown_codes(self, values: Iterable[int]) -> list[int]:
        """The codes among ``values`` (ignoring 255) that are not in the table, sorted."""
        return sorted({int(v) for v in values if int(v) != NODATA and int(v) not in self._index})

    def subset(self, codes: Iterable[int]) -> ClassTable:
        """The table restricted to ``codes`` (table order kept)."""
        keep = {int(c) for c in codes}
        return ClassTable(c for c in self.classes if c.code in keep)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_labels(cls, values: Iterable[Any], names: Mapping[int, str] | Sequence[str] | None = None,
                    colors: Mapping[Any, str] | None = None) -> ClassTable:
        """A table from the label values found in a label file.

        Args:
            values: class values: integer codes (``1, 2, 5``; numeric strings count as codes) or class names
                (``"forest"``, ``"water"``). Duplicates and missing values (None, NaN, empty) are ignored.
            names: for integer codes, their names: a mapping ``{code: name}`` or a sequence in sorted-code
                order (default ``"class_<code>"``). Ignored for name values.
            colors: optional ``{code or name: "#rrggbb"}`` overriding the default colours
                (:func:`default_color`: familiar names get familiar colours, others a qualitative palette).

        Codes are kept as given; names are sorted case-insensitively and numbered 1, 2, 3...

        Raises:
            ClassTableError: a code outside 0..254, names for a different number of codes.
        """
        raw = [v for v in values if not _missing(v)]
        as_codes = _as_codes(raw)
        colors = dict(colors or {})
        out: list[LandClass] = []
        if as_codes is not None:
            codes = sorted(set(as_codes))
            if isinstance(names, Mapping):
                nm = {int(k): str(v) for k, v in names.items()}
            elif names is not None:
                seq = list(names)
                if len(seq) != len(codes):
                    raise ClassTableError(f"got {len(seq)} class names for {len(codes)} codes {codes}. Give one "
                                          "name per code.")
                nm = dict(zip(codes, (str(s) for s in seq), strict=True))
            else:
                nm = {}
            for pos, code in enumerate(codes):
                name = nm.get(code, f"class_{code}")
                color = colors.get(code, colors.get(name, default_color(name, pos)))
                out.append(LandClass(code, name, color))
        else:
            uniq: dict[str, str] = {}
            for v in raw:
                s = str(v).strip()
                uniq.setdefault(s.lower(), s)
            for pos, key in enumerate(sorted(uniq)):
                name = uniq[key]
                out.append(LandClass(pos + 1, name, colors.get(name, default_color(name, pos))))
        return cls(out)

    def to_dict(self) -> list[dict[str, Any]]:
        """``[{"code": .., "name": .., "color": ..}, ...]`` in table order."""
        return [{"code": c.code, "name": c.name, "color": c.color} for c in self.classes]

    def to_json(self) -> str:
        """The table as compact JSON (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes | Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> ClassTable:
        """Inverse of :meth:`to_json` (also accepts the parsed list, or ``{"classes": [...]}``).

        Raises:
            ClassTableError: malformed JSON or entries.
        """
        try:
            obj = json.loads(data) if isinstance(data, str | bytes) else data
            if isinstance(obj, Mapping):
                obj = obj["classes"]
            return cls(LandClass(int(d["code"]), str(d["name"]), str(d.get("color") or default_color(
                str(d["name"]), i))) for i, d in enumerate(obj))
        except ClassTableError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise ClassTableError(f"malformed class table JSON ({exc}); expected a list of "
                                  "{'code': int, 'name': str, 'color': '#rrggbb'}.") from exc

    # ------------------------------------------------------------------ display
    def colormap(self) -> dict[int, tuple[int, int, int, int]]:
        """``{code: (r, g, b, 255)}`` for every class, plus ``255: (0, 0, 0, 0)`` (transparent no-class)."""
        cm: dict[int, tuple[int, int, int, int]] = {c.code: (*c.rgb, 255) for c in self.classes}
        cm[NODATA] = (0, 0, 0, 0)
        return cm

    def category_names(self) -> list[str]:
        """GDAL category names: entry ``v`` is the name of pixel value ``v`` ("" for unused values), up to the
        largest code."""
        out = [""] * (max(self.codes) + 1)
        for c in self.classes:
            out[c.code] = c.name
        return out


def _missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and np.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()


def _as_codes(values: list[Any]) -> list[int] | None:
    """``values`` as integer codes when they all are integers (or integral floats / numeric strings)."""
    out: list[int] = []
    for v in values:
        if isinstance(v, bool):
            return None
        if isinstance(v, int | np.integer):
            out.append(int(v))
        elif isinstance(v, float | np.floating):
            if float(v) != int(v):
                return None
            out.append(int(v))
        elif isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v):
            out.append(int(v))
        else:
            return None
    return out


# ---------------------------------------------------------------------- writing class rasters
def _as_grid(grid: GridSpec | Mapping[str, Any]) -> GridSpec:
    if isinstance(grid, GridSpec):
        return grid
    return GridSpec(grid["crs"], grid["transform"], int(grid["width"]), int(grid["height"]))


class ClassRasterWriter(COGWriter):
    """A :class:`~dinov3geo.io.cog.COGWriter` for class maps: uint8, nodata 255, band 1 "class" with the
    table's colour table, the table as JSON in the ``DINOV3GEO_CLASSES`` tag, nearest-neighbour overviews,
    and optionally a band 2 "confidence" (uint8 percent 0..100, 255 = none).

    Write blocks with :meth:`write` (class codes, and confidence when enabled); on a successful close the COG
    is moved into place atomically, then its category names (``.aux.xml``) and QGIS style (``.qml``) are
    written next to it, each atomically. On an error nothing is left at the path (an older file stays).
    """

    def __init__(self, path: str | os.PathLike[str], grid: GridSpec | Mapping[str, Any], table: ClassTable, *,
                 confidence: bool = False, tags: Mapping[str, Any] | None = None, qml: bool = True,
                 **kw: Any) -> None:
        self.table = table
        self.qml = qml
        allt = {**(tags or {}), CLASSES_TAG: table.to_json()}
        names = ["class", "confidence"] if confidence else ["class"]
        band_tags = {1: {"CLASS_CODES": ",".join(map(str, table.codes))}}
        if confidence:
            band_tags[2] = {"UNITS": "percent", "MEANING": "maximum class probability x 100 (255 = none)"}
        kw.setdefault("overview_resampling", "nearest")
        kw.setdefault("compress", "deflate")
        super().__init__(path, _as_grid(grid), len(names), "uint8", nodata=NODATA, band_names=names, tags=allt,
                         band_tags=band_tags, **kw)

    def _set_metadata(self, ds: Any) -> None:
        super()._set_metadata(ds)
        ds.write_colormap(1, self.table.colormap())

    def close(self) -> Path:
        """Finish the COG (atomically), then write its ``.aux.xml`` category names and ``.qml`` style."""
        done = self._closed
        path = super().close()
        if not done:
            write_category_names(path, self.table)
            if self.qml:
                write_qml(path, self.table, confidence=self.count == 2)
        return path


def write_class_raster(
    path: str | os.PathLike[str],
    classes: np.ndarray,
    grid: GridSpec | Mapping[str, Any],
    table: ClassTable,
    nodata: int = NODATA,
    confidence: np.ndarray | None = None,
    *,
    tags: Mapping[str, Any] | None = None,
    qml: bool = True,
    **kw: Any,
) -> Path:
    """Write an in-memory class map (class **codes**, uint8 ``[h, w]``) as a COG that opens coloured and
    labelled in GIS software, atomically.

    Args:
        path: output ``.tif``.
        classes: ``[h, w]`` class codes (values of ``table``; 255 = no class).
        grid: the map's grid (:class:`GridSpec` or a rasterio profile with crs/transform/width/height).
        table: the class table (colour table, category names, ``DINOV3GEO_CLASSES`` tag).
        nodata: the no-class value; only 255 is supported (kept for symmetry with rasterio profiles).
        confidence: optional ``[h, w]`` maximum class probability: floats in 0..1 are written as uint8
            percent (0..100) in band 2; NaN (or pixels without a class) as 255.
        tags: extra dataset tags (provenance).
        qml: also write the QGIS style ``<path>.qml``.
        **kw: passed to :class:`ClassRasterWriter` (``blocksize``, ``compress``...).

    Returns:
        the final path.

    Raises:
        ValueError: codes not in the table, wrong shapes or dtypes, a nodata other than 255.
    """
    if int(nodata) != NODATA:
        raise ValueError(f"class rasters use nodata={NODATA}, got {nodata}")
    g = _as_grid(grid)
    arr = np.asarray(classes)
    if arr.shape != g.shape:
        raise ValueError(f"class array is {arr.shape} but the grid is {g.shape} (h, w)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"class array must hold integer codes, got {arr.dtype}")
    present = np.unique(arr)
    bad = table.unknown_codes(present.tolist())
    if bad:
        raise ValueError(f"class codes {bad} are not in the class table (codes {table.codes})")
    bands = [arr.astype(np.uint8)]
    if confidence is not None:
        bands.append(confidence_percent(confidence, arr == NODATA))
    with ClassRasterWriter(path, g, table, confidence=confidence is not None, tags=tags, qml=qml, **kw) as w:
        step = w.blocksize
        stack = np.stack(bands)
        for r in range(0, g.height, step):
            h = min(step, g.height - r)
            w.write(stack[:, r: r + h, :], Window(0, r, g.width, h))
    return w.path


def confidence_percent(prob: np.ndarray, none: np.ndarray | None = None) -> np.ndarray:
    """Maximum class probability (0..1 float) as uint8 percent 0..100; NaN and ``none`` pixels -> 255."""
    p = np.asarray(prob, dtype=np.float64)
    bad = ~np.isfinite(p)
    out = np.clip(np.rint(np.where(bad, 0, p) * 100), 0, 100).astype(np.uint8)
    out[bad] = NODATA
    if none is not None:
        out[none] = NODATA
    return out


# ---------------------------------------------------------------------- sidecars
def _aux_path(path: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(path)}.aux.xml")


def write_category_names(path: str | os.PathLike[str], table: ClassTable, band: int = 1) -> Path:
    """Write the GDAL PAM sidecar ``<path>.aux.xml`` holding band ``band``'s category names, atomically.

    GDAL (and so QGIS, ``gdalinfo``) reads category names of a GeoTIFF from this sidecar. An existing sidecar
    is updated: its other content (statistics, other bands) is kept, the band's category names replaced.
    """
    aux = _aux_path(path)
    root: ET.Element | None = None
    if aux.is_file():
        with contextlib.suppress(ET.ParseError, OSError):
            root = ET.parse(aux).getroot()
            if root.tag != "PAMDataset":
                root = None
    if root is None:
        root = ET.Element("PAMDataset")
    bel = next((b for b in root.findall("PAMRasterBand") if b.get("band") == str(band)), None)
    if bel is None:
        bel = ET.SubElement(root, "PAMRasterBand", band=str(band))
    for old in bel.findall("CategoryNames"):
        bel.remove(old)
    cats = ET.Element("CategoryNames")
    for name in table.category_names():
        ET.SubElement(cats, "Category").text = name
    bel.insert(0, cats)
    ET.indent(root, space="  ")
    data = ET.tostring(root, encoding="unicode") + "\n"
    with atomic_path(aux) as tmp:
        tmp.write_text(data, encoding="utf-8")
    return aux


def read_category_names(path: str | os.PathLike[str], band: int = 1) -> list[str]:
    """Band ``band``'s category names from ``<path>.aux.xml`` ([] when there are none)."""
    aux = _aux_path(path)
    if not aux.is_file():
        return []
    try:
        root = ET.parse(aux).getroot()
    except ET.ParseError:
        return []
    for b in root.findall("PAMRasterBand"):
        if b.get("band") == str(band):
            cats = b.find("CategoryNames")
            if cats is not None:
                return [c.text or "" for c in cats.findall("Category")]
    return []


def write_qml(path: str | os.PathLike[str], table: ClassTable, confidence: bool = False) -> Path | None:
    """Write the QGIS layer style ``<stem>.qml`` of the class map ``path`` (paletted renderer on band 1, one
    labelled colour per class of ``table``), atomically, through :func:`dinov3geo.io.qgis.write_qml` (one QML
    writer for every product, marked as dinov3geo's so that restyling replaces it). A ``.qml`` that dinov3geo
    did not write is kept (a warning says so) and None is returned. Band 2 (confidence) is not styled."""
    import logging

    from dinov3geo.io.qgis import write_qml as write_style
    from dinov3geo.utils.outputs import OutputConflictError

    del confidence
    with rasterio.open(path) as ds:
        tagged = ds.tags().get(CLASSES_TAG)
    if tagged is None or ClassTable.from_json(tagged) != table:
        raise ClassTableError(f"{os.fspath(path)}: its {CLASSES_TAG} tag is not this class table; write the map "
                              "with write_class_raster / ClassRasterWriter first")
    try:
        return write_style(path, "classes")
    except OutputConflictError as exc:
        logging.getLogger(__name__).warning("%s", exc)
        return None


# ---------------------------------------------------------------------- reading
def read_class_table(path: str | os.PathLike[str]) -> ClassTable:
    """The class table of a class map written by dinov3geo (its ``DINOV3GEO_CLASSES`` tag).

    Raises:
        ClassTableError: the file has no such tag (naming the file and what to do).
        RasterReadError: the file cannot be opened.
    """
    try:
        with rasterio.open(path) as ds:
            raw = ds.tags().get(CLASSES_TAG)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterReadError(path, str(exc)) from exc
    if not raw:
        raise ClassTableError(f"{os.fspath(path)!r} has no class table (no {CLASSES_TAG} tag): it was not "
                              "written by `dinov3geo landcover predict`. Pass the class table or the model "
                              "that made the map.", path)
    try:
        return ClassTable.from_json(raw)
    except ClassTableError as exc:
        raise ClassTableError(f"{os.fspath(path)!r}: {exc}", path) from exc
