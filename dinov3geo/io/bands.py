"""Band naming: sensor band tables and the rules that turn file metadata into band names.

Canonical names follow the STAC ``eo`` common names (``coastal, blue, green, red, rededge1..3, nir, nir08,
nir09, cirrus, swir16, swir22, pan, lwir``) so the same name means the same wavelength across sensors;
sensor band ids (``B04``, ``B4``) stay usable as aliases.
"""

from __future__ import annotations

import re

# Sentinel-2 MSI: band id -> common name.
SENTINEL2_BANDS: dict[str, str] = {
    "B01": "coastal",
    "B02": "blue",
    "B03": "green",
    "B04": "red",
    "B05": "rededge1",
    "B06": "rededge2",
    "B07": "rededge3",
    "B08": "nir",
    "B8A": "nir08",
    "B09": "nir09",
    "B10": "cirrus",
    "B11": "swir16",
    "B12": "swir22",
}
SENTINEL2_ORDER: tuple[str, ...] = tuple(SENTINEL2_BANDS)

# Landsat band number -> common name, per sensor family.
LANDSAT_TM_ETM: dict[str, str] = {
    "1": "blue",
    "2": "green",
    "3": "red",
    "4": "nir",
    "5": "swir16",
    "6": "lwir",
    "6_VCID_1": "lwir",
    "6_VCID_2": "lwir_high",
    "7": "swir22",
    "8": "pan",
}
LANDSAT_OLI_TIRS: dict[str, str] = {
    "1": "coastal",
    "2": "blue",
    "3": "green",
    "4": "red",
    "5": "nir",
    "6": "swir16",
    "7": "swir22",
    "8": "pan",
    "9": "cirrus",
    "10": "lwir11",
    "11": "lwir12",
}
LANDSAT_MSS: dict[str, str] = {"1": "green", "2": "red", "3": "nir", "4": "nir09"}

RGB_NAMES: tuple[str, str, str] = ("red", "green", "blue")

_IDENT = re.compile(r"^[A-Za-z0-9_.\-]{1,32}$")


def normalise_s2_id(band_id: str) -> str | None:
    """``"B4"``, ``"b04"``, ``"B8A"`` -> ``"B04"``, ``"B04"``, ``"B8A"``; None if not a Sentinel-2 band id."""
    m = re.fullmatch(r"[Bb](\d{1,2}|8[Aa])", band_id.strip())
    if not m:
        return None
    num = m.group(1).upper()
    key = "B8A" if num == "8A" else f"B{int(num):02d}"
    return key if key in SENTINEL2_BANDS else None


def landsat_table(spacecraft: str | None, sensor: str | None) -> dict[str, str]:
    """Band table for a Landsat spacecraft/sensor as written in the MTL (``LANDSAT_5``/``TM``, ...)."""
    sensor = (sensor or "").upper()
    spacecraft = (spacecraft or "").upper()
    if "OLI" in sensor or "TIRS" in sensor or spacecraft.endswith(("_8", "_9")):
        return LANDSAT_OLI_TIRS
    if sensor == "MSS":
        return LANDSAT_MSS
    return LANDSAT_TM_ETM


def names_from_metadata(
    descriptions: tuple[str | None, ...], colorinterp: tuple[str, ...]
) -> list[tuple[str, tuple[str, ...]]]:
    """Band (name, aliases) for a multi-band file from its band descriptions and colour interpretation.

    A short identifier-like description becomes the name (a Sentinel-2 id such as ``B4`` is mapped to its
    common name with the id as alias); otherwise RGB colour interpretation gives red/green/blue; otherwise
    ``b1..bN``. ``bN`` (1-based) is always an alias, so every band is selectable by position.
    """
    out: list[tuple[str, tuple[str, ...]]] = []
    ci = [c.lower() for c in colorinterp]
    rgb_like = len(ci) >= 3 and ci[:3] == ["red", "green", "blue"]
    for i, desc in enumerate(descriptions, start=1):
        pos = f"b{i}"
        aliases: list[str] = [pos]
        name: str | None = None
        if desc and _IDENT.match(desc.strip()):
            d = desc.strip()
            s2 = normalise_s2_id(d)
            if s2 is not None:
                name, aliases = SENTINEL2_BANDS[s2], [s2, d, pos]
            else:
                name = d
        elif desc:
            aliases.append(desc)
        if name is None and rgb_like and i <= 4:
            name = (*RGB_NAMES, "alpha")[i - 1] if i <= 3 or ci[3] == "alpha" else None
        out.append((name or pos, tuple(dict.fromkeys(a for a in aliases if a != name))))
    return out
