"""Turn what users point at into :class:`~dinov3geo.io.scene.Scene` objects.

Supported sources:

* one multi-band raster (GeoTIFF, COG, VRT, anything GDAL reads), local or remote (``http(s)://`` becomes
  ``/vsicurl/``, ``s3://`` becomes ``/vsis3/``);
* a folder or list of single-band files: a Landsat product (``*_B<n>.TIF`` + ``*_MTL.txt``), Sentinel-2 band
  files (``*_B02.tif``/``.jp2`` ... at 10/20/60 m, resampled onto one grid), or any other single-band files
  (named after their file names);
* a STAC Item (JSON file or ``pystac.Item``) whose assets are local paths or URLs.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import rasterio
from rasterio.crs import CRS

from dinov3geo.io import bands as bandnames
from dinov3geo.io.errors import DinoGeoIOError, RasterReadError
from dinov3geo.io.grid import GridSpec
from dinov3geo.io.scene import GDAL_ENV, Band, Scene, _promote_dtypes, _resampling, target_grid

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img", ".nc", ".hdf", ".png", ".jpg")
SourceLike = str | os.PathLike | Sequence[str | os.PathLike] | Any


def gdal_path(href: str) -> str:
    """GDAL path for an href: URLs go through ``/vsicurl/`` (``/vsis3/`` for ``s3://``); paths unchanged."""
    if href.startswith(("http://", "https://")):
        return "/vsicurl/" + href
    if href.startswith("s3://"):
        return "/vsis3/" + href[5:]
    if href.startswith("gs://"):
        return "/vsigs/" + href[5:]
    return href


def open_scene(
    source: SourceLike,
    *,
    bands: Sequence[str | int] | None = None,
    band_names: Sequence[str] | None = None,
    crs: Any = None,
    nodata: float | None = None,
    target_crs: Any = None,
    res: float | tuple[float, float] | None = None,
    grid: GridSpec | None = None,
    resampling: str = "bilinear",
    scene_id: str | None = None,
    acquired: datetime | str | None = None,
) -> Scene:
    """Open a scene from a file, a band folder, a list of band files or a STAC Item.

    Args:
        source: see the module docstring.
        bands: bands to keep, by name/alias (case-insensitive) or 1-based position, in this order.
        band_names: names for the bands of a multi-band file (overrides descriptions), one per band.
        crs: CRS to assume for files that have none. Files without CRS are refused unless this is given.
        nodata: nodata value overriding what the files declare (for files that declare none or a wrong one).
        target_crs, res: reproject onto this CRS / resolution (default: the finest band's grid).
        grid: an explicit target grid (overrides ``target_crs``/``res``).
        resampling: resampling for bands not on the target grid (``bilinear``, ``nearest``, ``cubic``...).
        scene_id: identifier; default derived from the source.
        acquired: acquisition datetime override.

    Returns:
        A :class:`Scene`. Nothing is read yet except metadata.
    """
    assume_crs = CRS.from_user_input(crs) if crs is not None else None
    meta: dict[str, Any] = {}
    dt: datetime | None = None
    renamed = False
    if _is_stac(source):
        band_list, sid, dt, meta = _stac_bands(source)
    elif isinstance(source, list | tuple):
        files = [str(p) for p in source]
        if not files:
            raise DinoGeoIOError("empty list of band files given; pass at least one raster")
        band_list, sid, dt, meta = _band_files(files, Path(files[0]).parent)
    else:
        p = str(source)
        if os.path.isdir(p):
            band_list, sid, dt, meta = _band_folder(Path(p))
        else:
            band_list, sid, dt, meta = _multiband_file(gdal_path(p), band_names)
            renamed = True
    if band_names is not None and not renamed:
        if len(band_names) != len(band_list):
            raise ValueError(f"{len(band_names)} band_names given for {len(band_list)} bands of {source!r}")
        band_list = [
            Band(n, b.path, b.index, (b.name, *b.aliases), b.source) for n, b in zip(band_names, band_list, strict=True)
        ]
    if acquired is not None:
        dt = _parse_dt(acquired) if isinstance(acquired, str) else acquired
    scene = Scene(
        id=scene_id or sid,
        bands=tuple(band_list),
        grid=_reference_grid(band_list, assume_crs),
        datetime=dt,
        nodata=nodata,
        assume_crs=assume_crs,
        resampling=_resampling(resampling),
        dtype="float32",
        metadata=meta,
    )
    if bands is not None:
        scene = scene.select(list(bands))
    else:
        scene = dataclasses.replace(scene, dtype=_promote_dtypes(scene.bands, scene))
    if grid is not None:
        scene = scene.with_grid(grid)
    elif target_crs is not None or res is not None:
        scene = scene.with_grid(target_grid(scene.grid, crs=target_crs, res=res))
    return scene


# ---------------------------------------------------------------------------------------------- helpers
def _open_meta(path: str) -> dict[str, Any]:
    try:
        with rasterio.Env(**GDAL_ENV), rasterio.open(path) as ds:
            if ds.count == 0:
                raise RasterReadError(path, "it has no raster bands")
            return {
                "count": ds.count,
                "crs": ds.crs,
                "transform": ds.transform,
                "width": ds.width,
                "height": ds.height,
                "descriptions": ds.descriptions,
                "colorinterp": tuple(c.name for c in ds.colorinterp),
                "tags": ds.tags(),
                "dtypes": ds.dtypes,
                "nodata": ds.nodata,
            }
    except rasterio.errors.RasterioIOError as e:
        raise RasterReadError(path, str(e)) from e


def _reference_grid(band_list: Sequence[Band], assume_crs: CRS | None) -> GridSpec:
    """The grid of the finest-resolution band (panchromatic bands excluded when others exist)."""
    best: tuple[float, GridSpec] | None = None
    candidates = [b for b in band_list if b.name != "pan"] or list(band_list)
    seen: set[str] = set()
    for b in candidates:
        if b.path in seen:
            continue
        seen.add(b.path)
        m = _open_meta(b.path)
        crs = m["crs"] or assume_crs
        if crs is None:
            from dinov3geo.io.errors import MissingCRSError

            raise MissingCRSError(b.path, hint="Pass crs='EPSG:xxxx' (CLI: --assume-crs) if you know its CRS.")
        g = GridSpec(crs, m["transform"], m["width"], m["height"])
        if g.transform.is_identity:
            raise RasterReadError(
                b.path,
                "it has no geotransform (pixel coordinates only)",
                hint="Georeference it first (e.g. borrow the transform of a co-registered band with "
                "`gdal_edit.py -a_ullr` / rasterio), or pass it to an API that accepts plain arrays.",
            )
        area = abs(g.res[0] * g.res[1])
        if best is None or area < best[0] - 1e-12 * best[0]:
            best = (area, g)
    assert best is not None
    return best[1]


_DATE_RES = [
    (re.compile(r"(?<!\d)((?:19|20)\d{2})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})(?!\d)"), True),
    (re.compile(r"(?<!\d)((?:19|20)\d{2})-(\d{2})-(\d{2})(?!\d)"), False),
    (re.compile(r"(?<!\d)((?:19|20)\d{2})(\d{2})(\d{2})(?!\d)"), False),
]


def _parse_dt(text: str) -> datetime:
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise ValueError(f"cannot parse datetime {text!r}; use ISO 8601 like 2020-08-31T10:00:00Z") from e
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def datetime_from_name(name: str) -> datetime | None:
    """Acquisition datetime from a file name (``20200831``, ``2020-08-31``, ``20170829T105019``), if any."""
    for rx, has_time in _DATE_RES:
        for m in rx.finditer(name):
            g = [int(x) for x in m.groups()]
            try:
                return datetime(*g[:3], *(g[3:6] if has_time else []), tzinfo=UTC)
            except ValueError:
                continue
    return None


def _datetime_from_tags(tags: dict[str, str]) -> datetime | None:
    for key in ("ACQUISITIONDATETIME", "ACQUISITION_DATETIME", "DATETIME_ACQUIRED", "acquisition_datetime"):
        if key in tags:
            try:
                return _parse_dt(tags[key])
            except ValueError:
                continue
    return None


def _stem(path: str) -> str:
    name = os.path.basename(path.rstrip("/"))
    for suf in RASTER_SUFFIXES + (".TIF",):
        if name.lower().endswith(suf.lower()):
            return name[: -len(suf)]
    return name


def _multiband_file(path: str, band_names: Sequence[str] | None) -> tuple[list[Band], str, Any, dict]:
    m = _open_meta(path)
    if band_names is not None:
        if len(band_names) != m["count"]:
            raise ValueError(
                f"{len(band_names)} band_names given but {path!r} has {m['count']} bands; give one name per band"
            )
        named = [(n, (f"b{i}",)) for i, n in enumerate(band_names, start=1)]
    else:
        named = bandnames.names_from_metadata(m["descriptions"], m["colorinterp"])
    bl = [Band(n, path, i, al) for i, (n, al) in enumerate(named, start=1)]
    dt = _datetime_from_tags(m["tags"]) or datetime_from_name(os.path.basename(path))
    return bl, _stem(path), dt, {"sources": [path], "tags": m["tags"]}


# -- band folders -------------------------------------------------------------------------------------
_S2_FILE = re.compile(r"(?:^|_)(B(?:0?\d|1[0-2]|8A))(?:_\d+m)?\.(?:tif|tiff|jp2)$", re.IGNORECASE)
_LANDSAT_FILE = re.compile(r"_B(\d{1,2}(?:_VCID_[12])?)\.TIF$", re.IGNORECASE)


def _parse_mtl(path: Path) -> dict[str, str]:
    """Flat ``KEY -> value`` map of a Landsat MTL text file (groups ignored, quotes stripped)."""
    out: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if "=" not in line:
            continue
        k, v = (s.strip() for s in line.split("=", 1))
        if k in ("GROUP", "END_GROUP"):
            continue
        out.setdefault(k, v.strip('"'))
    return out


def _landsat(folder: Path, mtl: Path) -> tuple[list[Band], str, Any, dict]:
    meta = _parse_mtl(mtl)
    table = bandnames.landsat_table(meta.get("SPACECRAFT_ID"), meta.get("SENSOR_ID"))
    bl: list[Band] = []
    for key, fname in sorted(meta.items(), key=lambda kv: _band_sort_key(kv[0])):
        m = re.fullmatch(r"FILE_NAME_BAND_(\d{1,2}(?:_VCID_[12])?)", key)
        if not m:
            continue
        num = m.group(1)
        fpath = folder / fname
        if not fpath.exists():
            raise RasterReadError(str(fpath), f"listed in {mtl.name} as {key} but missing",
                                  hint="Re-download the product or remove the band from the folder's MTL.")
        name = table.get(num, f"b{num.lower()}")
        bl.append(Band(name, str(fpath), 1, (f"B{num}", f"b{num}"), key))
    if not bl:  # MTL without file names: fall back to the *_B<n>.TIF pattern
        for f in sorted(folder.iterdir(), key=lambda p: _band_sort_key(p.name)):
            m = _LANDSAT_FILE.search(f.name)
            if m:
                num = m.group(1)
                bl.append(Band(table.get(num, f"b{num}"), str(f), 1, (f"B{num}", f"b{num}"), f.name))
    if not bl:
        raise DinoGeoIOError(f"no band files found for Landsat metadata {mtl}", mtl)
    date = meta.get("DATE_ACQUIRED") or meta.get("ACQUISITION_DATE")
    dt = None
    if date:
        t = meta.get("SCENE_CENTER_TIME") or meta.get("SCENE_CENTER_SCAN_TIME") or "00:00:00"
        t = t.rstrip("Z")[:15]
        dt = _parse_dt(f"{date}T{t}+00:00") if re.match(r"\d{2}:\d{2}:\d{2}", t) else _parse_dt(date)
    sid = meta.get("LANDSAT_PRODUCT_ID") or meta.get("LANDSAT_SCENE_ID") or mtl.name.replace("_MTL.txt", "")
    return bl, sid, dt, {"sensor": meta.get("SENSOR_ID"), "spacecraft": meta.get("SPACECRAFT_ID"),
                         "mtl": str(mtl), "sources": [b.path for b in bl]}


def _band_sort_key(name: str) -> tuple[int, str]:
    m = re.search(r"B(\d+)", name)
    return (int(m.group(1)) if m else 999, name)


def _band_files(files: Sequence[str], folder: Path) -> tuple[list[Band], str, Any, dict]:
    s2 = {f: _S2_FILE.search(os.path.basename(f)) for f in files}
    if all(s2.values()):
        order = {bid: i for i, bid in enumerate(bandnames.SENTINEL2_ORDER)}
        items = sorted(
            ((bandnames.normalise_s2_id(m.group(1)), f) for f, m in s2.items() if m), key=lambda t: order[t[0]]
        )
        bl = [Band(bandnames.SENTINEL2_BANDS[bid], gdal_path(f), 1, (bid, bid.replace("B0", "B")), os.path.basename(f))
              for bid, f in items]
        first = os.path.basename(items[0][1])
        sid = re.sub(r"_?B(?:0?\d|1[0-2]|8A)(?:_\d+m)?\..*$", "", first, flags=re.IGNORECASE) or folder.name
        dt = datetime_from_name(first)
        return bl, sid, dt, {"sensor": "MSI", "sources": list(files)}
    bl = []
    for f in files:
        m = _open_meta(gdal_path(f))
        if m["count"] != 1:
            raise DinoGeoIOError(
                f"{f!r} has {m['count']} bands; a band list/folder must hold single-band files "
                "(open a multi-band file on its own)", f
            )
        bl.append(Band(_stem(f), gdal_path(f), 1, (), os.path.basename(f)))
    dt = datetime_from_name(os.path.basename(files[0]))
    return bl, folder.name, dt, {"sources": list(files)}


def _band_folder(folder: Path) -> tuple[list[Band], str, Any, dict]:
    mtls = sorted(folder.glob("*_MTL.txt"))
    if mtls:
        return _landsat(folder, mtls[0])
    files = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in RASTER_SUFFIXES and p.is_file())
    if not files:
        raise DinoGeoIOError(f"no raster files in folder {folder}; expected band files (*.tif, *.jp2)", folder)
    return _band_files(files, folder)


# -- STAC -----------------------------------------------------------------------------------------------
def _is_stac(source: Any) -> bool:
    try:
        import pystac
    except ImportError:  # pragma: no cover
        return False
    if isinstance(source, pystac.Item):
        return True
    return isinstance(source, str | os.PathLike) and str(source).lower().endswith(".json")


_SKIP_ROLES = {"thumbnail", "overview", "metadata", "visual"}


def _stac_bands(source: Any) -> tuple[list[Band], str, Any, dict]:
    import pystac

    if isinstance(source, pystac.Item):
        item = source
    else:
        try:
            item = pystac.Item.from_file(str(source))
        except Exception as e:  # noqa: BLE001 - pystac raises many kinds
            raise DinoGeoIOError(f"cannot read STAC item {str(source)!r}: {e}. Pass a STAC Item JSON file.", source) from e
    assets = [
        (k, a) for k, a in item.assets.items()
        if (a.media_type or "").startswith(("image/tiff", "image/jp2", "image/vnd.stac.geotiff"))
        or a.href.lower().endswith((".tif", ".tiff", ".jp2", ".vrt"))
    ]
    data_assets = [(k, a) for k, a in assets if a.roles and "data" in a.roles]
    if data_assets:
        assets = data_assets
    else:
        assets = [(k, a) for k, a in assets if not (set(a.roles or []) & _SKIP_ROLES)] or assets
    if not assets:
        raise DinoGeoIOError(f"STAC item {item.id!r} has no raster (GeoTIFF/COG/JP2) assets", source)
    bl: list[Band] = []
    for key, asset in assets:
        href = gdal_path(asset.get_absolute_href() or asset.href)
        eo = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands") or []
        try:
            count = _open_meta(href)["count"]
        except RasterReadError as e:
            raise RasterReadError(href, f"STAC asset {key!r} of item {item.id!r} is unreadable: {e}") from e
        for i in range(1, count + 1):
            info = eo[i - 1] if i - 1 < len(eo) else {}
            common = info.get("common_name") or info.get("eo:common_name")
            bname = info.get("name")
            if count == 1:
                name = common or key
                aliases = tuple(a for a in (key, bname) if a and a != name)
            else:
                name = common or bname or f"{key}_{i}"
                aliases = tuple(a for a in (f"{key}_{i}", bname) if a and a != name)
            bl.append(Band(name, href, i, aliases, key))
    dt = item.datetime or (
        _parse_dt(item.properties["start_datetime"]) if item.properties.get("start_datetime") else None
    )
    return bl, item.id, dt, {"stac_item": item.id, "collection": item.collection_id,
                             "sources": list(dict.fromkeys(b.path for b in bl))}
