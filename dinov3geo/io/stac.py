"""STAC descriptions of the products dinov3geo writes: an Item next to each product, a Collection per run.

Every product (a COG map, a feature Zarr store, a GeoPackage of polygons) gets a `STAC <https://stacspec.org>`_
1.1 Item in ``<product>.stac.json`` next to it (:func:`write_item`, or :func:`describe_product`, which picks
the kind from the path). The Item says what the product is and where it came from:

* **where**: ``geometry`` is the product's footprint reprojected to WGS 84 (the raster's outline, its edges
  densified so a UTM footprint stays accurate; for vectors, the layers' bounding box), ``bbox`` its bounds;
  the `projection extension <https://github.com/stac-extensions/projection>`_ (v2.0.0) gives the native CRS
  (``proj:code`` such as ``EPSG:32619``, or ``proj:wkt2`` when the CRS has no authority code), ``proj:bbox``,
  ``proj:shape``, ``proj:transform`` and ``proj:centroid``;
* **when**: ``datetime``, or ``start_datetime``/``end_datetime`` for a change product (before/after dates),
  from the caller, the product's tags (``date_before``/``date_after``), or the dates in its input file names;
  else the product's creation time. ``dinov3geo:datetime_source`` says which;
* **what**: the data asset with its media type (COG, GeoTIFF, ``application/vnd+zarr``,
  GeoPackage), the `raster extension <https://github.com/stac-extensions/raster>`_ (v1.1.0) per band (name,
  description, ``data_type``, ``nodata``, ``unit`` from the band's unit, its tags or the dataset's ``UNITS``
  tag, approximate ``statistics``), the `file extension <https://github.com/stac-extensions/file>`_ (v2.1.0):
  ``file:size`` and ``file:checksum`` (a SHA-256 multihash, ``1220`` + hex digest); for vectors, the layers
  with their geometry type, fields and feature counts (``dinov3geo:layers``);
* **how**: ``dinov3geo:version``, ``dinov3geo:model`` (path, size, SHA-256 of the model file(s)),
  ``dinov3geo:inputs`` (path and SHA-256, or size and modification time for inputs over
  :data:`INPUT_HASH_LIMIT`, or the folder for stores), the product's own metadata tags (``dinov3geo:metadata``)
  and whatever the caller adds (a pipeline adds its name and stage).

Cost: checksums read the whole file in 8 MiB chunks, about 0.5 to 2 s per GiB on one core (SHA-256), once per
product; model and input checksums are cached per process (by path, size and modification time). Statistics
come from a decimated read (:func:`dinov3geo.io.qgis.band_statistics`), not a full scan. A Zarr store gets
``file:size`` (the sum of its files) but no checksum.

A pipeline run writes a Collection linking its Items (:func:`write_collection`; ``dinov3geo run`` writes
``<outputs>/stac/collection.json``), with the union of their footprints and time spans as its extent.

Safety: an Item path is guarded like any output (:func:`dinov3geo.utils.outputs.guard_output`, with the
product and its inputs as inputs), and an existing ``.stac.json`` (or ``collection.json``) that dinov3geo did not
write (no ``dinov3geo:version``) is never replaced: :class:`~dinov3geo.utils.outputs.OutputConflictError`.
Files are written atomically.

Validation works offline: pystac ships the STAC core schemas; :func:`offline_validator` adds the extension
schemas from a local folder (the tests keep the published files in ``tests/data/stac_schemas``) and refuses to
fetch anything else, so :func:`validate_file` never touches the network.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dinov3geo.io.errors import DinoGeoIOError, RasterReadError, VectorReadError

__all__ = [
    "COLLECTION_NAME",
    "EXT_FILE",
    "EXT_PROJECTION",
    "EXT_RASTER",
    "INPUT_HASH_LIMIT",
    "ITEM_SUFFIX",
    "STAC_VERSION",
    "ZARR_MEDIA_TYPE",
    "describe_product",
    "describable",
    "file_sha256",
    "is_ours",
    "item_path",
    "offline_validator",
    "parse_date",
    "product_kind",
    "validate_file",
    "write_collection",
    "write_item",
]

STAC_VERSION = "1.1.0"
EXT_PROJECTION = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
EXT_RASTER = "https://stac-extensions.github.io/raster/v1.1.0/schema.json"
EXT_FILE = "https://stac-extensions.github.io/file/v2.1.0/schema.json"
#: the suffix added to a product's file name for its Item
ITEM_SUFFIX = ".stac.json"
#: the file name of a run's Collection
COLLECTION_NAME = "collection.json"
#: media type of a Zarr store asset
ZARR_MEDIA_TYPE = "application/vnd+zarr"
#: inputs larger than this are recorded by size and modification time, not hashed
INPUT_HASH_LIMIT = 2 << 30
#: bytes read at a time when hashing
HASH_CHUNK = 8 << 20
#: files at least this large show a progress bar while they are hashed
PROGRESS_BYTES = 1 << 30
#: how many points each edge of a raster footprint gets when it is reprojected
EDGE_POINTS = 21

RASTER_SUFFIXES = (".tif", ".tiff")
VECTOR_MEDIA = {".gpkg": "application/geopackage+sqlite3", ".geojson": "application/geo+json",
                ".fgb": "application/vnd.flatgeobuf"}
_UNITS = {"metre": "m", "meter": "m", "metres": "m", "meters": "m", "m": "m", "percent": "%", "%": "%",
          "hectare": "ha", "ha": "ha", "degree": "deg", "degrees": "deg"}
_MODEL_SUFFIXES = (".pt", ".pth", ".safetensors", ".ckpt", ".bin")

_HASHES: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------------ helpers
def item_path(product: str | os.PathLike[str]) -> Path:
    """The Item path of ``product``: ``<product file name>.stac.json`` next to it."""
    p = Path(os.fspath(product).rstrip("/"))
    return p.with_name(p.name + ITEM_SUFFIX)


def product_kind(path: str | os.PathLike[str]) -> str | None:
    """``raster`` (GeoTIFF/COG), ``features`` (a Zarr store with a georeferenced grid), ``vector`` (GeoPackage,
    GeoJSON, FlatGeobuf), or None for anything else (JSON, PNG, models, tile stores)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if p.name.endswith(ITEM_SUFFIX):
        return None
    if p.is_dir():
        zj = p / "zarr.json"
        if not zj.is_file():
            return None
        from dinov3geo.utils.outputs import folder_kind

        if folder_kind(p) == "features":
            return "features"
        return "features" if (p / "spatial_ref" / "zarr.json").is_file() else None
    if suffix in RASTER_SUFFIXES:
        return "raster"
    if suffix in VECTOR_MEDIA:
        return "vector"
    return None


def describable(path: str | os.PathLike[str]) -> bool:
    """Whether :func:`describe_product` can describe ``path`` (an existing product of a known kind)."""
    return Path(path).exists() and product_kind(path) is not None


def file_sha256(path: str | os.PathLike[str], chunk: int = HASH_CHUNK) -> str:
    """The SHA-256 hex digest of a file, read in ``chunk``-byte pieces (cached by path, size and mtime).

    Files of :data:`PROGRESS_BYTES` or more show a progress bar (``dinov3geo --quiet`` hides it).
    """
    from dinov3geo.utils.progress import progress_bar

    p = Path(path)
    st = p.stat()
    key = (os.path.realpath(p), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    h = hashlib.sha256()
    with open(p, "rb") as f, progress_bar(st.st_size, f"checksum {p.name}", disable=st.st_size < PROGRESS_BYTES,
                                          unit="B", unit_scale=True, leave=False) as bar:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
            bar.update(len(block))
    digest = h.hexdigest()
    with _HASH_LOCK:
        _HASHES[key] = digest
    return digest


def _multihash(hexdigest: str) -> str:
    return "1220" + hexdigest  # 0x12 = sha2-256, 0x20 = 32 bytes


def _iso(dt: datetime) -> str:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _mtime(p: Path) -> datetime:
    return datetime.fromtimestamp(p.stat().st_mtime, tz=UTC)


def parse_date(value: Any, what: str = "date") -> datetime:
    """A UTC datetime from a datetime, a year (``2020``), a date (``2020-08-31``) or an ISO 8601 string.

    Raises:
        ValueError: naming ``what`` and the value.
    """
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int) and 1000 <= value <= 9999:
        return datetime(value, 1, 1, tzinfo=UTC)
    s = str(value).strip()
    try:
        if len(s) == 4 and s.isdigit():
            return datetime(int(s), 1, 1, tzinfo=UTC)
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
        return dt if dt.tzinfo else dt.replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not a date; give a year (2020), a date (2020-08-31) or an "
                         "ISO 8601 datetime") from None


def _round_coords(obj: Any, nd: int = 7) -> Any:
    if isinstance(obj, float):
        return round(obj, nd)
    if isinstance(obj, list | tuple):
        return [_round_coords(x, nd) for x in obj]
    if isinstance(obj, dict):
        return {k: _round_coords(v, nd) for k, v in obj.items()}
    return obj


def _crs_fields(crs: Any) -> dict[str, Any]:
    """``proj:code`` (``EPSG:32619``), or ``proj:wkt2`` when the CRS has no authority code."""
    if crs is None:
        return {"proj:code": None}
    from pyproj import CRS

    pc = CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    auth = pc.to_authority(min_confidence=90)
    if auth is not None:
        return {"proj:code": f"{auth[0]}:{auth[1]}"}
    return {"proj:code": None, "proj:wkt2": pc.to_wkt("WKT2_2019")}


def _footprint(crs: Any, bounds: tuple[float, float, float, float]) -> tuple[dict[str, Any], list[float],
                                                                               dict[str, float]]:
    """(GeoJSON polygon in WGS 84, its bbox, centroid) of a rectangle in ``crs`` (edges densified)."""
    from pyproj import CRS, Transformer
    from shapely.geometry import Polygon, mapping

    x0, y0, x1, y1 = bounds
    n = EDGE_POINTS
    xs: list[float] = []
    ys: list[float] = []
    for (ax, ay), (bx, by) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)),
                               ((x0, y1), (x0, y0))):
        for i in range(n - 1):
            t = i / (n - 1)
            xs.append(ax + (bx - ax) * t)
            ys.append(ay + (by - ay) * t)
    src = CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    tr = Transformer.from_crs(src, CRS.from_epsg(4326), always_xy=True)
    lon, lat = tr.transform(xs, ys)
    pts = [(float(a), float(b)) for a, b in zip(lon, lat, strict=True) if math.isfinite(a) and math.isfinite(b)]
    if len(pts) < 3:
        raise ValueError("the footprint cannot be reprojected to WGS 84")
    poly = Polygon(pts)
    if not poly.is_valid:
        poly = poly.buffer(0)
    poly = poly.simplify(1e-7, preserve_topology=True)  # drop the points of edges that stay straight (< 1 cm)
    geom = _round_coords(mapping(poly))
    minx, miny, maxx, maxy = poly.bounds
    c = poly.centroid
    return geom, _round_coords([minx, miny, maxx, maxy]), {"lat": round(c.y, 7), "lon": round(c.x, 7)}


def _unit(value: str | None) -> str | None:
    if not value:
        return None
    return _UNITS.get(value.strip().lower(), value.strip())


def _nodata(v: float | None) -> float | str | None:
    if v is None:
        return None
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return int(v) if float(v).is_integer() else float(v)


def _is_remote(s: str) -> bool:
    return s.startswith("/vsi") or "://" in s


def _describe_path(p: str | os.PathLike[str], limit: int) -> dict[str, Any]:
    """``{"path", "sha256", "size"}`` of a local file (no hash above ``limit`` bytes: size + mtime instead);
    ``{"path", "kind": "folder"}`` for a folder; the string for a remote path or a missing file."""
    s = os.fspath(p)
    if _is_remote(s):
        return {"path": s, "remote": True}
    q = Path(s)
    if q.is_dir():
        from dinov3geo.utils.outputs import folder_kind

        return {"path": s, "kind": folder_kind(q) or "folder"}
    if not q.is_file():
        return {"path": s, "missing": True}
    size = q.stat().st_size
    if size > limit:
        return {"path": s, "size": size, "modified": _iso(_mtime(q))}
    return {"path": s, "size": size, "sha256": file_sha256(q)}


def _is_ours(data: Any) -> bool:
    if not isinstance(data, dict):
        return False
    if data.get("type") == "Feature":
        return "dinov3geo:version" in (data.get("properties") or {})
    return "dinov3geo:version" in data


def is_ours(path: str | os.PathLike[str]) -> bool:
    """Whether the STAC JSON file at ``path`` was written by dinov3geo (it has ``dinov3geo:version``)."""
    try:
        return _is_ours(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False


def _write_json(path: Path, data: dict[str, Any], inputs: Sequence[Any], role: str) -> Path:
    """Guard ``path`` (an input, a folder, a file dinov3geo did not write: refused), then write it atomically
    under its output lock. An identical existing file is left as it is (its mtime unchanged)."""
    from dinov3geo.utils.atomic import atomic_path
    from dinov3geo.utils.outputs import OutputConflictError, claim_output

    text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    with claim_output(path, list(inputs), role=role, what=role):
        if path.exists():
            if not is_ours(path):
                raise OutputConflictError(path, f"a file that dinov3geo did not write is there ({role})",
                                          "It was kept; move it away to get the dinov3geo STAC description.")
            try:
                if path.read_text(encoding="utf-8") == text:
                    return path
            except OSError:
                pass
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------- item parts
def _raster_parts(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(properties, data asset, extra) of a GeoTIFF/COG."""
    import rasterio

    from dinov3geo.io.cog import validate_cog
    from dinov3geo.io.qgis import band_statistics

    try:
        with rasterio.open(path) as src:
            crs, tr, w, h = src.crs, src.transform, src.width, src.height
            count, dtypes, nodatas = src.count, src.dtypes, src.nodatavals
            descriptions, units = src.descriptions, src.units
            tags = dict(src.tags())
            btags = [dict(src.tags(b)) for b in range(1, count + 1)]
            bounds = tuple(src.bounds)
    except rasterio.errors.RasterioError as exc:
        raise RasterReadError(path, str(exc)) from exc
    props: dict[str, Any] = {}
    georeferenced = crs is not None and not tr.is_identity
    extra: dict[str, Any] = {"crs": crs if georeferenced else None, "bounds": bounds, "tags": tags}
    if georeferenced:
        props.update(_crs_fields(crs))
        props["proj:bbox"] = _round_coords(list(bounds), 6)
        props["proj:shape"] = [h, w]
        props["proj:transform"] = [tr.a, tr.b, tr.c, tr.d, tr.e, tr.f]
    bands = []
    res = None
    if crs is not None and crs.is_projected and (crs.linear_units or "").lower() in ("metre", "meter", "m"):
        res = abs(tr.a) if tr.b == 0 and tr.d == 0 else math.hypot(tr.a, tr.d)
    for b in range(1, count + 1):
        bd: dict[str, Any] = {}
        name = descriptions[b - 1]
        if name:
            bd["name"] = name
        bd["data_type"] = dtypes[b - 1] if dtypes[b - 1] in _RASTER_TYPES else "other"
        nd = _nodata(nodatas[b - 1])
        if nd is not None:
            bd["nodata"] = nd
        unit = _unit(units[b - 1] or btags[b - 1].get("UNITS") or btags[b - 1].get("units")
                     or tags.get("UNITS") or tags.get("units"))
        if unit:
            bd["unit"] = unit
        if res is not None:
            bd["spatial_resolution"] = round(res, 6)
        st = band_statistics(path, b)
        if st is not None:
            bd["statistics"] = st.as_stac()
            if st.approximate:
                bd["dinov3geo:statistics_approximate"] = True
        bands.append(bd)
    ok, _errors, _warnings = validate_cog(path)
    asset = {"type": "image/tiff; application=geotiff" + ("; profile=cloud-optimized" if ok else ""),
             "roles": ["data"], "raster:bands": bands}
    title = tags.get("PRODUCT") or tags.get("DESCRIPTION") or ", ".join(d for d in descriptions if d)
    if title:
        asset["title"] = title
    return props, asset, extra


_RASTER_TYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
                 "float64", "cint16", "cint32", "cfloat32", "cfloat64"}


def _zarr_parts(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(properties, data asset, extra) of a feature Zarr store, from its ``zarr.json`` attributes."""
    from affine import Affine

    def meta(sub: str) -> dict[str, Any]:
        f = path / sub / "zarr.json" if sub else path / "zarr.json"
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise DinoGeoIOError(f"cannot read Zarr metadata {str(f)!r}: {exc}. Is {str(path)!r} a complete "
                                 "dinov3geo feature store?", path) from exc

    root = meta("")
    attrs = dict(root.get("attributes") or {})
    var = next((n for n in ("features", "feature_map", "data") if (path / n / "zarr.json").is_file()), None)
    if var is None:
        raise DinoGeoIOError(f"{str(path)!r} holds no 'features' array; give a dinov3geo feature store", path)
    arr = meta(var)
    shape = list(arr.get("shape") or [])
    dims = list(arr.get("dimension_names") or [])
    ref = (meta("spatial_ref").get("attributes") or {}) if (path / "spatial_ref" / "zarr.json").is_file() else {}
    wkt = ref.get("crs_wkt") or ref.get("spatial_ref")
    gt = ref.get("GeoTransform")
    props: dict[str, Any] = {}
    extra: dict[str, Any] = {"crs": None, "bounds": None, "tags": {k: v for k, v in attrs.items()}}
    h = w = None
    if "y" in dims and "x" in dims:
        h, w = shape[dims.index("y")], shape[dims.index("x")]
    if wkt and gt and h and w:
        from pyproj import CRS

        tr = Affine.from_gdal(*[float(v) for v in str(gt).split()])
        crs = CRS.from_wkt(wkt)
        x0, y0 = tr * (0, 0)
        x1, y1 = tr * (w, h)
        bounds = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        extra.update(crs=crs, bounds=bounds)
        props.update(_crs_fields(crs))
        props["proj:bbox"] = _round_coords(list(bounds), 6)
        props["proj:shape"] = [int(h), int(w)]
        props["proj:transform"] = [tr.a, tr.b, tr.c, tr.d, tr.e, tr.f]
    names: list[str] = []
    band_dim = next((d for d in dims if d not in ("x", "y")), None)
    if band_dim is not None and (path / band_dim / "zarr.json").is_file():
        try:
            import zarr

            names = [str(x) for x in zarr.open_array(str(path / band_dim), mode="r")[:]]
        except Exception:  # noqa: BLE001 - names are descriptive only
            names = []
    n = shape[dims.index(band_dim)] if band_dim in dims else 1
    dtype = str(arr.get("data_type") or "float32")
    fill = arr.get("fill_value")
    bands = []
    for i in range(int(n)):
        bd: dict[str, Any] = {"name": names[i] if i < len(names) else f"{band_dim or 'band'}_{i}",
                              "data_type": dtype if dtype in _RASTER_TYPES else "other"}
        if isinstance(fill, str) and fill.lower() in ("nan", "inf", "-inf"):
            bd["nodata"] = fill.lower()
        bands.append(bd)
    files = [f for f in path.rglob("*") if f.is_file()]
    asset: dict[str, Any] = {"type": ZARR_MEDIA_TYPE, "roles": ["data"], "title": "dense backbone features",
                             "raster:bands": bands, "file:size": sum(f.stat().st_size for f in files)}
    props["dinov3geo:files"] = len(files)
    return props, asset, extra


def _vector_parts(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(properties, data asset, extra) of a vector file: its layers, CRS and bounds."""
    import pyogrio
    from pyproj import CRS

    try:
        layers = [str(row[0]) for row in pyogrio.list_layers(path)]
        infos = [pyogrio.read_info(path, layer=lyr) for lyr in layers]
    except Exception as exc:  # noqa: BLE001 - pyogrio raises several kinds
        raise VectorReadError(path, str(exc)) from exc
    described = []
    crs = None
    bounds: list[float] | None = None
    for lyr, info in zip(layers, infos, strict=True):
        described.append({"name": lyr, "geometry_type": info.get("geometry_type"),
                          "features": int(info.get("features") or 0),
                          "fields": [str(f) for f in info.get("fields", [])]})
        tb = info.get("total_bounds")
        if info.get("crs") and crs is None:
            crs = CRS.from_user_input(info["crs"])
        if tb is not None and all(math.isfinite(float(v)) for v in tb) and int(info.get("features") or 0) > 0:
            if info.get("crs") and crs is not None and CRS.from_user_input(info["crs"]) != crs:
                from pyproj import Transformer

                t = Transformer.from_crs(CRS.from_user_input(info["crs"]), crs, always_xy=True)
                tb = t.transform_bounds(*tb, densify_pts=EDGE_POINTS)
            bounds = list(tb) if bounds is None else [min(bounds[0], tb[0]), min(bounds[1], tb[1]),
                                                     max(bounds[2], tb[2]), max(bounds[3], tb[3])]
    props: dict[str, Any] = {"dinov3geo:layers": described,
                             "dinov3geo:features": sum(d["features"] for d in described)}
    extra: dict[str, Any] = {"crs": crs, "bounds": tuple(bounds) if bounds else None, "tags": {}}
    if crs is not None:
        props.update(_crs_fields(crs))
        if bounds:
            props["proj:bbox"] = _round_coords(bounds, 6)
    asset = {"type": VECTOR_MEDIA[path.suffix.lower()], "roles": ["data"],
             "title": ", ".join(f"{d['name']} ({d['features']} features)" for d in described)}
    return props, asset, extra


# --------------------------------------------------------------------------------------------- items
def _datetimes(when: Any, tags: Mapping[str, Any], inputs: Sequence[str], product: Path) -> tuple[dict[str, Any],
                                                                                                  str]:
    """The STAC time fields and where they came from."""
    from dinov3geo.io.sources import datetime_from_name

    def fields(a: datetime, b: datetime | None) -> dict[str, Any]:
        if b is None or a == b:
            return {"datetime": _iso(a)}
        a, b = min(a, b), max(a, b)
        return {"datetime": None, "start_datetime": _iso(a), "end_datetime": _iso(b)}

    if when is not None:
        if isinstance(when, tuple | list):
            if len(when) != 2:
                raise ValueError(f"datetime: give one date or a (start, end) pair, got {when!r}")
            return fields(parse_date(when[0], "datetime start"), parse_date(when[1], "datetime end")), "argument"
        return fields(parse_date(when, "datetime"), None), "argument"
    lo, hi = tags.get("date_before"), tags.get("date_after")
    if lo and hi:
        try:
            return fields(parse_date(lo, "date_before"), parse_date(hi, "date_after")), "product tags"
        except ValueError:
            pass
    found = sorted({dt for dt in (datetime_from_name(Path(p).name) for p in inputs) if dt is not None})
    if found:
        return fields(found[0], found[-1]), "input file names"
    return fields(_mtime(product), None), "product creation time"


def _model_info(model: Any) -> dict[str, Any] | list[dict[str, Any]] | None:
    if model is None:
        return None
    paths = [model] if isinstance(model, str | os.PathLike) else list(model)
    out = [_describe_path(p, limit=1 << 62) for p in paths if p is not None]
    if not out:
        return None
    return out[0] if len(out) == 1 else out


def write_item(
    product_path: str | os.PathLike[str],
    *,
    kind: str | None = None,
    inputs: Iterable[Any] = (),
    model: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    datetime: Any = None,  # noqa: A002 - the STAC field's name
    extra_properties: Mapping[str, Any] | None = None,
    item_id: str | None = None,
    checksum: bool = True,
    input_hash_limit: int = INPUT_HASH_LIMIT,
) -> Path:
    """Write the STAC Item of a product to ``<product>.stac.json`` (atomically) and return its path.

    Args:
        product_path: a GeoTIFF/COG, a feature Zarr store or a vector file (GeoPackage, GeoJSON, FlatGeobuf).
        kind: ``raster``, ``features`` or ``vector`` (:func:`product_kind` of the path when None).
        inputs: what the product was made from (paths; hashed up to ``input_hash_limit`` bytes each).
        model: the model file(s) that made it (hashed).
        datetime: a date (``2020``, ``"2020-08-31"``, a :class:`~datetime.datetime`) or a ``(start, end)`` pair;
            None: from the product's tags, its inputs' names, or its creation time (see the module docstring).
        extra_properties: more Item properties (prefix your own keys, e.g. ``dinov3geo:stage``).
        item_id: the Item id (default: the product's file name without its suffix).
        checksum: hash the product (``file:checksum``); False skips the full read of very large products.
        input_hash_limit: inputs larger than this many bytes are recorded by size and modification time.

    Returns:
        The Item path.

    Raises:
        OutputConflictError: the Item path is an input, or holds a file dinov3geo did not write (kept).
        DinoGeoIOError: the product is missing or cannot be read (naming it).
        ValueError: an unknown ``kind`` or a malformed ``datetime``.
    """
    from dinov3geo import __version__

    p = Path(os.fspath(product_path).rstrip("/"))
    if not p.exists():
        raise DinoGeoIOError(f"cannot describe {str(p)!r}: it does not exist. Give the path of a product "
                             "(COG, feature Zarr store, GeoPackage).", p)
    k = kind or product_kind(p)
    if k not in ("raster", "features", "vector"):
        raise ValueError(f"cannot describe {str(p)!r} as a STAC Item: not a GeoTIFF/COG, feature Zarr store or "
                         f"vector file (kind {k!r}); give kind='raster', 'features' or 'vector'")
    ins = [i for i in (inputs if not isinstance(inputs, str | os.PathLike) else [inputs]) if i is not None]
    in_paths = [os.fspath(i) for i in ins if isinstance(i, str | os.PathLike)]
    models = [] if model is None else ([model] if isinstance(model, str | os.PathLike) else list(model))
    out = item_path(p)
    from dinov3geo.utils.outputs import guard_output

    guard_output(out, [p, *in_paths, *models], role="STAC item")  # before the (long) hashing
    parts = {"raster": _raster_parts, "features": _zarr_parts, "vector": _vector_parts}[k]
    props, asset, extra = parts(p)
    tags = {str(a): str(b) for a, b in (extra.get("tags") or {}).items()}
    time_fields, time_source = _datetimes(datetime, tags, in_paths, p)
    geometry: dict[str, Any] | None = None
    bbox: list[float] | None = None
    if extra.get("crs") is not None and extra.get("bounds") is not None:
        try:
            geometry, bbox, centroid = _footprint(extra["crs"], extra["bounds"])
            props["proj:centroid"] = centroid
        except ValueError:
            geometry = bbox = None
    asset["href"] = "./" + p.name
    if p.is_file():
        asset["file:size"] = p.stat().st_size
        if checksum:
            asset["file:checksum"] = _multihash(file_sha256(p))
    assets: dict[str, Any] = {"data": dict(sorted(asset.items(), key=lambda kv: kv[0] != "href"))}
    qml = p.with_suffix(".qml")
    if k == "raster" and qml.is_file():
        assets["qgis-style"] = {"href": "./" + qml.name, "type": "application/xml", "roles": ["style", "metadata"],
                                "title": "QGIS layer style (applied when the raster is opened in QGIS)"}
    properties: dict[str, Any] = {
        **time_fields,
        "created": _iso(_mtime(p)),
        **props,
        "dinov3geo:version": __version__,
        "dinov3geo:kind": k,
        "dinov3geo:datetime_source": time_source,
        "dinov3geo:inputs": [_describe_path(i, input_hash_limit) for i in in_paths],
    }
    minfo = _model_info(models)
    if minfo is not None:
        properties["dinov3geo:model"] = minfo
    if tags:
        properties["dinov3geo:metadata"] = tags
    for key, val in (extra_properties or {}).items():
        properties[str(key)] = val
    exts = [EXT_FILE] if k == "vector" else [EXT_PROJECTION, EXT_RASTER, EXT_FILE]
    if k == "vector" and any(key.startswith("proj:") for key in properties):
        exts.insert(0, EXT_PROJECTION)
    item: dict[str, Any] = {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": exts,
        "id": item_id or (p.name[: -len(p.suffix)] if p.suffix else p.name),
        "geometry": geometry,
    }
    if bbox is not None:
        item["bbox"] = bbox
    item.update({"properties": properties, "links": [], "assets": assets})
    return _write_json(out, json.loads(json.dumps(item, default=str)), [p, *in_paths, *models], "STAC item")


def describe_product(path: str | os.PathLike[str], **provenance: Any) -> Path:
    """Write the STAC Item of the product at ``path``, its kind picked from the path (:func:`product_kind`).

    ``provenance``: the keyword arguments of :func:`write_item` (``inputs``, ``model``, ``datetime``,
    ``extra_properties``, ``item_id``, ``checksum``).

    Returns:
        The Item path (``<path>.stac.json``).
    """
    return write_item(path, kind=product_kind(path), **provenance)


# ---------------------------------------------------------------------------------------- collection
def write_collection(
    items: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    id: str,  # noqa: A002 - the STAC field's name
    description: str,
    *,
    title: str | None = None,
    license: str = "other",  # noqa: A002 - the STAC field's name
    extra_fields: Mapping[str, Any] | None = None,
) -> Path:
    """Write a STAC Collection ``<out_dir>/collection.json`` linking ``items`` (Item JSON paths).

    The spatial extent is the union of the Items' bboxes (the whole globe when none has one), the temporal
    extent the span of their datetimes. Links are relative to ``out_dir``. The file is rewritten only when its
    content changes. ``out_dir`` is created (and marked as a dinov3geo ``stac`` folder) when missing.

    Raises:
        OutputConflictError: ``out_dir`` is a folder dinov3geo did not create, or ``collection.json`` there was
            not written by dinov3geo (kept).
        DinoGeoIOError: an Item cannot be read.
    """
    from dinov3geo import __version__
    from dinov3geo.utils.outputs import folder_kind, guard_output, mark_folder

    folder = Path(out_dir)
    paths = [Path(i) for i in items]
    guard_output(folder, paths, folder=True, kind="stac", role="STAC folder", replaces=False)
    docs = []
    for ip in paths:
        try:
            docs.append((ip, json.loads(ip.read_text(encoding="utf-8"))))
        except (OSError, ValueError) as exc:
            raise DinoGeoIOError(f"cannot read STAC item {str(ip)!r}: {exc}", ip) from exc
    ids = [d.get("id") for _, d in docs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"STAC collection {id!r}: item ids {dup} are used twice; give each item its own id")
    boxes = [d["bbox"] for _, d in docs if d.get("bbox")]
    bbox = ([min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
            if boxes else [-180.0, -90.0, 180.0, 90.0])
    times: list[str] = []
    for _, d in docs:
        pr = d.get("properties") or {}
        times += [t for t in (pr.get("datetime"), pr.get("start_datetime"), pr.get("end_datetime")) if t]
    times.sort()  # ISO 8601 UTC strings sort chronologically
    interval = [times[0], times[-1]] if times else [None, None]
    folder.mkdir(parents=True, exist_ok=True)
    if folder_kind(folder) is None:
        mark_folder(folder, "stac")
    links = [{"rel": "item", "href": os.path.relpath(ip.absolute(), folder.absolute()).replace(os.sep, "/"),
              "type": "application/geo+json", "title": str(d.get("id"))} for ip, d in docs]
    coll: dict[str, Any] = {
        "type": "Collection",
        "stac_version": STAC_VERSION,
        "stac_extensions": [],
        "id": id,
        "description": description or id,
        **({"title": title} if title else {}),
        "license": license,
        "extent": {"spatial": {"bbox": [bbox]}, "temporal": {"interval": [interval]}},
        "links": links,
        "dinov3geo:version": __version__,
        **dict(extra_fields or {}),
    }
    return _write_json(folder / COLLECTION_NAME, coll, paths, "STAC collection")


# ---------------------------------------------------------------------------------------- validation
def _bundled_extension_schema(uri: str) -> dict[str, Any] | None:
    """The extension schema that pystac (>= 1.16, its ``pystac-ext-*`` packages) ships for ``uri``, if any.

    pystac keeps ``https://stac-extensions.github.io/<name>/<version>/schema.json`` as
    ``pystac/extensions/json-schema/<name>/<version>.json``; older pystac ships none (None).
    """
    import importlib.resources

    parts = uri.split("/")
    if len(parts) < 3 or parts[-1] != "schema.json":
        return None
    name, version = parts[-3], parts[-2]
    try:
        f = importlib.resources.files("pystac.extensions").joinpath("json-schema", name, f"{version}.json")
        if not f.is_file():
            return None
        s = json.loads(f.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, OSError, ValueError):
        return None
    return s if isinstance(s, dict) and str(s.get("$id", "")).split("#", 1)[0] == uri else None


def offline_validator(schema_dir: str | os.PathLike[str]) -> Any:
    """A pystac validator that reads every schema locally and never fetches one.

    The STAC core schemas come from pystac's package data. An extension schema comes from ``schema_dir``, laid
    out as its published URL path (``projection/v2.0.0/schema.json`` for
    ``https://stac-extensions.github.io/projection/v2.0.0/schema.json``), else from the copy that pystac
    ships (pystac >= 1.16); ``schema_dir`` wins where both have it, whatever the pystac version. Use it with
    ``pystac.validation.set_validator`` or :func:`validate_file`. A schema found in neither place makes
    validation fail with ``GetSchemaError`` naming it (nothing is downloaded).
    """
    import pystac.utils
    from pystac.validation.stac_validator import GetSchemaError, JsonSchemaSTACValidator

    root = Path(schema_dir)
    prefix = "https://stac-extensions.github.io/"

    class _Offline(JsonSchemaSTACValidator):
        def validate_extension(self, stac_dict: dict[str, Any], stac_object_type: Any, stac_version: str,
                               extension_id: str, href: str | None = None) -> str | None:
            # pystac >= 1.16 fills its cache from its own extension schemas here, before ours is asked: look
            # them up in _get_schema instead, so that schema_dir comes first on every pystac version.
            uri = pystac.utils.make_absolute_href(extension_id, href)
            self._validate_from_uri(stac_dict, stac_object_type, uri, href)
            return uri

        def _get_schema(self, schema_uri: str) -> dict[str, Any]:
            uri = schema_uri.split("#", 1)[0]
            if uri not in self.schema_cache:
                local = root / uri[len(prefix):] if uri.startswith(prefix) else None
                if local is not None and local.is_file():
                    s = json.loads(local.read_text(encoding="utf-8"))
                else:
                    s = _bundled_extension_schema(uri) if uri.startswith(prefix) else None
                    if s is None:
                        raise GetSchemaError(schema_uri, FileNotFoundError(
                            f"not available offline (looked for {local} and in pystac's own extension schemas); "
                            "add the published schema there"))
                self.schema_cache[uri] = s
            return self.schema_cache[uri]

    v = _Offline()
    for uri in list(v.schema_cache):
        v.schema_cache[uri.split("#", 1)[0]] = v.schema_cache[uri]
    return v


def validate_file(path: str | os.PathLike[str], schema_dir: str | os.PathLike[str]) -> list[str]:
    """Validate a STAC Item or Collection JSON file offline (:func:`offline_validator`).

    Returns:
        The schema URIs it was validated against (core and each extension).

    Raises:
        pystac.errors.STACValidationError: the file is not valid (the message names the failing field).
    """
    from pystac.validation import validate_dict

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [str(u) for u in validate_dict(data, href=str(Path(path).absolute()),
                                          validator=offline_validator(schema_dir))]
