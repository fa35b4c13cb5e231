"""Class tables and class COGs: colour table, category names, class-table tag and QGIS style survive."""

from __future__ import annotations

import ctypes
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from dinov3geo.io.cog import validate_cog
from dinov3geo.io.grid import GridSpec
from dinov3geo.tasks.landcover.classes import (
    CLASSES_TAG,
    ClassTable,
    ClassTableError,
    LandClass,
    read_class_table,
    write_class_raster,
)


def gdal_category_names(path: Path) -> list[str]:
    """Category names of band 1 as GDAL itself reports them (rasterio does not expose them), through the GDAL
    library rasterio loaded. GDAL 3.10 loads a GeoTIFF's PAM sidecar lazily on the first metadata request (as
    gdalinfo and QGIS make), so the dataset metadata is asked for first."""
    from dinov3geo.io.cog import _loaded_libs

    libs = _loaded_libs("libgdal")
    assert libs, "rasterio's GDAL library is not loaded"
    lib = libs[0]
    lib.GDALAllRegister()
    lib.GDALOpen.restype = ctypes.c_void_p
    lib.GDALOpen.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.GDALGetRasterBand.restype = ctypes.c_void_p
    lib.GDALGetRasterBand.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.GDALGetMetadata.restype = ctypes.c_void_p
    lib.GDALGetMetadata.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.GDALGetRasterCategoryNames.restype = ctypes.c_void_p
    lib.GDALGetRasterCategoryNames.argtypes = [ctypes.c_void_p]
    lib.CSLCount.argtypes = [ctypes.c_void_p]
    lib.CSLGetField.restype = ctypes.c_char_p
    lib.CSLGetField.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.GDALClose.argtypes = [ctypes.c_void_p]
    h = lib.GDALOpen(str(path).encode(), 0)
    assert h, f"GDAL cannot open {path}"
    try:
        lib.GDALGetMetadata(h, None)
        band = lib.GDALGetRasterBand(h, 1)
        names = lib.GDALGetRasterCategoryNames(band)
        if not names:
            return []
        return [lib.CSLGetField(names, i).decode() for i in range(lib.CSLCount(names))]
    finally:
        lib.GDALClose(h)


def _grid(h: int = 40, w: int = 50) -> GridSpec:
    return GridSpec("EPSG:32615", from_origin(462405.0, 1741815.0, 30.0, 30.0), w, h)


def test_from_labels_names_codes_and_familiar_colours() -> None:
    t = ClassTable.from_labels(["water", "Forest", "urban", "forest", None, "", "zzz_other"])
    assert t.names == ["Forest", "urban", "water", "zzz_other"]  # case-insensitive unique, sorted
    assert t.codes == [1, 2, 3, 4]
    assert t.by_name("forest").color == "#006400"  # a forest green
    assert t.by_name("water").color == "#0064c8"
    assert t.by_name("zzz_other").color not in {"#006400", "#0064c8", "#fa0000"}
    c = ClassTable.from_labels([5, 2, 2.0, "5"], names={2: "forest", 5: "pasture"})
    assert c.codes == [2, 5] and c.names == ["forest", "pasture"]
    assert c.index_of(5) == 1 and c.name_of(2) == "forest"
    with pytest.raises(KeyError, match="class code 7"):
        c.index_of(7)
    assert c.unknown_codes([2, 7, 255, 9]) == [7, 9]
    lut = c.index_lut()
    assert lut[2] == 0 and lut[5] == 1 and lut[3] == 255 and lut[255] == 255
    assert list(c.code_lut()[:3]) == [2, 5, 255]


def test_table_errors_and_json_round_trip() -> None:
    with pytest.raises(ClassTableError, match="255"):
        LandClass(255, "x", "#000000")
    with pytest.raises(ClassTableError, match="#rrggbb"):
        LandClass(1, "x", "green")
    with pytest.raises(ClassTableError, match="used twice"):
        ClassTable([LandClass(1, "a", "#000000"), LandClass(1, "b", "#000000")])
    with pytest.raises(ClassTableError, match="used twice"):
        ClassTable([LandClass(1, "a", "#000000"), LandClass(2, "A", "#000000")])
    t = ClassTable([LandClass(3, "forest", "#228B22"), LandClass(7, "water", "#0000ff")])
    assert ClassTable.from_json(t.to_json()) == t
    assert t.colormap() == {3: (34, 139, 34, 255), 7: (0, 0, 255, 255), 255: (0, 0, 0, 0)}
    assert t.category_names() == ["", "", "", "forest", "", "", "", "water"]
    with pytest.raises(ClassTableError, match="malformed"):
        ClassTable.from_json('[{"name": "x"}]')


def test_class_cog_keeps_colours_names_tag_and_style(tmp_path: Path) -> None:
    t = ClassTable([LandClass(1, "forest", "#228b22"), LandClass(2, "pasture", "#e6e64d"),
                    LandClass(4, "water", "#0000ff")])
    g = _grid(600, 700)  # larger than one 512 px tile: overviews are built
    rng = np.random.default_rng(0)
    codes = rng.choice(np.array([1, 2, 4, 255], dtype=np.uint8), size=g.shape)
    conf = rng.random(g.shape)
    conf[0, 0] = np.nan
    out = write_class_raster(tmp_path / "lc.tif", codes, g, t, confidence=conf)
    assert validate_cog(out)[0]
    with rasterio.open(out) as ds:
        assert ds.count == 2 and ds.dtypes == ("uint8", "uint8") and ds.nodata == 255
        assert ds.descriptions == ("class", "confidence")
        assert np.array_equal(ds.read(1), codes)
        pct = ds.read(2)
        assert pct[0, 0] == 255 and (pct[codes == 255] == 255).all()
        ok = (codes != 255) & np.isfinite(conf)
        assert np.array_equal(pct[ok], np.rint(conf[ok] * 100).astype(np.uint8))
        cm = ds.colormap(1)
        assert cm[1] == (34, 139, 34, 255) and cm[2] == (230, 230, 77, 255) and cm[4] == (0, 0, 255, 255)
        assert cm[255][3] == 0
        assert ClassTable.from_json(ds.tags()[CLASSES_TAG]) == t
        assert ds.overviews(1)  # and the overviews are nearest: only class codes appear in them
    with rasterio.open(out, overview_level=0) as ov:
        assert set(np.unique(ov.read(1)).tolist()) <= {1, 2, 4, 255}
    assert read_class_table(out) == t
    # category names in the PAM sidecar, indexed by value, and read back by GDAL itself
    root = ET.parse(f"{out}.aux.xml").getroot()
    cats = root.find("PAMRasterBand[@band='1']/CategoryNames")
    assert cats is not None
    assert [c.text or "" for c in cats.findall("Category")] == ["", "forest", "pasture", "", "water"]
    assert gdal_category_names(out) == ["", "forest", "pasture", "", "water"]
    # the QGIS style: a paletted renderer with one labelled entry per class
    qml = ET.parse(out.with_suffix(".qml")).getroot()
    r = qml.find("pipe/rasterrenderer")
    assert r is not None and r.get("type") == "paletted" and r.get("band") == "1"
    entries = [(e.get("value"), e.get("color"), e.get("label")) for e in r.findall("colorPalette/paletteEntry")]
    assert entries == [("1", "#228b22", "forest"), ("2", "#e6e64d", "pasture"), ("4", "#0000ff", "water")]
    assert "dinov3geo-style" in out.with_suffix(".qml").read_text()  # ours: a restyle may replace it
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    # a style the user saved there is kept when the map is written again
    out.with_suffix(".qml").write_text("<qgis>mine</qgis>")
    write_class_raster(out, codes, g, t, confidence=conf)
    assert out.with_suffix(".qml").read_text() == "<qgis>mine</qgis>"


def test_failed_write_leaves_nothing_and_keeps_an_older_map(tmp_path: Path) -> None:
    t = ClassTable([LandClass(1, "forest", "#228b22"), LandClass(2, "water", "#0000ff")])
    g = _grid()
    good = np.ones(g.shape, np.uint8)
    out = write_class_raster(tmp_path / "lc.tif", good, g, t)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    bad = good.copy()
    bad[3, 3] = 9
    with pytest.raises(ValueError, match=r"class codes \[9\]"):
        write_class_raster(out, bad, g, t)
    with pytest.raises(ValueError, match="grid"):
        write_class_raster(out, good[:-1], g, t)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_read_class_table_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "plain.tif"
    with rasterio.open(p, "w", driver="GTiff", width=4, height=4, count=1, dtype="uint8", crs="EPSG:32615",
                       transform=from_origin(0, 40, 10, 10)) as ds:
        ds.write(np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(ClassTableError, match=r"plain\.tif.*no class table"):
        read_class_table(p)
