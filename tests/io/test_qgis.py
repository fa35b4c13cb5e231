"""QGIS-ready maps: QML sidecars (pseudocolor ramps, palettes) and GDAL statistics, on real rasters.

The canopy map is the bundled NEON lidar CHM (Bartlett Forest, 1 m) written the way ``canopy predict`` writes
its COG (bands ``height`` + ``height_std``, ``UNITS=metre``); the mask is an NDVI forest mask of the bundled
Pucallpa Landsat composite.
"""

from __future__ import annotations

import hashlib
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio

from dinov3geo.io.cog import write_cog
from dinov3geo.io.grid import GridSpec
from dinov3geo.io.qgis import STYLE_MARK, product_style_kind, style_product, write_qml, write_statistics
from dinov3geo.utils.outputs import OutputConflictError

ROOT = Path(__file__).resolve().parents[2]
CHM = ROOT / "data" / "neon_bart_2019" / "NEON_D01_BART_DP3_320000_4881000_CHM_crop.tif"
PUC = ROOT / "data" / "pucallpa" / "pucallpa_2000.tif"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _grid(src: rasterio.DatasetReader) -> GridSpec:
    return GridSpec(src.crs, src.transform, src.width, src.height)


@pytest.fixture
def canopy_map(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 2-band canopy-height COG (height, height_std) from the real NEON CHM; returns it and the heights."""
    with rasterio.open(CHM) as src:
        h = src.read(1, masked=True).astype("float32").filled(np.nan)
        grid = _grid(src)
    std = np.where(np.isfinite(h), 0.5 + 0.1 * np.nan_to_num(h), np.nan).astype("float32")
    out = write_cog(tmp_path / "chm_map.tif", np.stack([h, std]), grid, band_names=["height", "height_std"],
                    nodata=float("nan"), tags={"UNITS": "metre", "PRODUCT": "canopy height (dinov3geo)"})
    return out, h


@pytest.fixture
def forest_mask(tmp_path: Path) -> Path:
    """A uint8 forest mask (1 forest, 0 not, 255 nodata) from NDVI of the real Pucallpa composite."""
    with rasterio.open(PUC) as src:
        swir, nir, red = (src.read(b).astype("float32") for b in (1, 2, 3))
        grid = _grid(src)
        valid = src.read_masks(1) > 0
    del swir
    ndvi = (nir - red) / np.maximum(nir + red, 1)
    mask = np.where(valid, (ndvi >= 0.78).astype("uint8"), 255).astype("uint8")
    return write_cog(tmp_path / "forest.tif", mask, grid, nodata=255, band_names=["forest"])


def _renderer(qml: Path) -> ET.Element:
    root = ET.parse(qml).getroot()  # parses as XML
    assert root.tag == "qgis"
    r = root.find("pipe/rasterrenderer")
    assert r is not None
    return r


def test_canopy_map_gets_a_ramp_from_zero_to_p98_and_gdal_statistics(canopy_map) -> None:
    path, h = canopy_map
    before = _sha(path)
    res = style_product(path)
    assert res["kind"] == "height" and res["kept"] == []
    qml = Path(res["qml"])
    assert qml == path.with_suffix(".qml") and STYLE_MARK in qml.read_text()
    r = _renderer(qml)
    assert r.get("type") == "singlebandpseudocolor" and r.get("band") == "1"
    shader = r.find("rastershader/colorrampshader")
    assert shader is not None and shader.get("colorRampType") == "INTERPOLATED"
    valid = h[np.isfinite(h)]
    top = math.ceil(float(np.percentile(valid, 98)))  # the map's own 98th percentile, rounded up to 1 m
    assert float(shader.get("minimumValue")) == 0 and float(shader.get("maximumValue")) == top
    values = [float(i.get("value")) for i in shader.findall("item")]
    assert values[0] == 0 and values[-1] == top and values == sorted(values) and len(values) >= 5
    colors = [i.get("color") for i in shader.findall("item")]
    assert len(set(colors)) == len(colors)  # a ramp, not grey
    # GDAL reads the statistics of both bands from the PAM sidecar; the COG itself is untouched
    with rasterio.open(path) as src:
        t1, t2 = src.tags(1), src.tags(2)
        std = src.read(2, masked=True)
    assert float(t1["STATISTICS_MAXIMUM"]) == pytest.approx(float(valid.max()), rel=1e-5)
    assert float(t1["STATISTICS_MINIMUM"]) == pytest.approx(float(valid.min()), abs=1e-5)
    assert float(t1["STATISTICS_MEAN"]) == pytest.approx(float(valid.mean()), rel=1e-4)
    assert float(t1["STATISTICS_STDDEV"]) == pytest.approx(float(valid.std()), rel=1e-4)
    assert float(t1["STATISTICS_VALID_PERCENT"]) == pytest.approx(100 * valid.size / h.size, rel=1e-4)
    assert "STATISTICS_APPROXIMATE" not in t1  # a small map is read in full
    assert float(t2["STATISTICS_MAXIMUM"]) == pytest.approx(float(std.max()), rel=1e-5)
    assert _sha(path) == before


def test_statistics_of_a_large_map_come_from_overviews_and_say_so(canopy_map) -> None:
    path, h = canopy_map
    write_statistics(path, None)
    from dinov3geo.io.qgis import band_statistics

    st = band_statistics(path, 1, max_pixels=1000)  # forces a decimated read
    assert st is not None and st.approximate
    valid = h[np.isfinite(h)]
    assert valid.min() - 1e-3 <= st.minimum <= st.maximum <= valid.max() + 1e-3
    assert st.mean == pytest.approx(float(valid.mean()), rel=0.1)


def test_restyle_keeps_other_pam_content_and_a_users_own_qml(canopy_map) -> None:
    path, _ = canopy_map
    aux = Path(f"{path}.aux.xml")
    aux.write_text('<PAMDataset>\n  <PAMRasterBand band="1">\n    <Description>mine</Description>\n'
                   '    <Metadata><MDI key="OWNER">me</MDI></Metadata>\n  </PAMRasterBand>\n</PAMDataset>\n')
    qml = path.with_suffix(".qml")
    mine = "<qgis><!-- my own hand-made style --></qgis>\n"
    qml.write_text(mine)
    res = style_product(path)
    assert qml.read_text() == mine and res["qml"] is None
    assert len(res["kept"]) == 1 and "QGIS style not written" in res["kept"][0] and str(qml) in res["kept"][0]
    with pytest.raises(OutputConflictError, match="did not write"):
        write_qml(path, "height")
    assert qml.read_text() == mine
    with rasterio.open(path) as src:
        tags = src.tags(1)
    assert tags["OWNER"] == "me" and "STATISTICS_MAXIMUM" in tags
    assert "<Description>mine</Description>" in aux.read_text()
    # an unreadable PAM sidecar is not ours to replace either
    aux.write_text("not xml")
    res = style_product(path)
    assert aux.read_text() == "not xml" and any("GDAL statistics not written" in k for k in res["kept"])


def test_our_own_qml_is_replaced_when_the_map_changes(canopy_map, tmp_path) -> None:
    path, h = canopy_map
    write_qml(path)
    first = path.with_suffix(".qml").read_text()
    with rasterio.open(path) as src:
        grid = _grid(src)
    write_cog(path, np.stack([h * 2, h]), grid, band_names=["height", "height_std"], tags={"UNITS": "metre"})
    res = style_product(path)
    shader = _renderer(Path(res["qml"])).find("rastershader/colorrampshader")
    valid = 2 * h[np.isfinite(h)]
    assert float(shader.get("maximumValue")) == math.ceil(float(np.percentile(valid, 98)))
    assert path.with_suffix(".qml").read_text() != first


def test_forest_mask_gets_a_two_class_palette(forest_mask) -> None:
    assert product_style_kind(forest_mask) == "mask"
    res = style_product(forest_mask)
    r = _renderer(Path(res["qml"]))
    assert r.get("type") == "paletted"
    entries = {int(e.get("value")): e for e in r.findall("colorPalette/paletteEntry")}
    assert set(entries) == {0, 1}
    assert entries[1].get("label") == "forest" and entries[1].get("alpha") == "255"
    assert entries[0].get("alpha") == "0"  # "not forest" is see-through: the image shows below


def test_class_map_palette_comes_from_its_class_table(tmp_path) -> None:
    """A class map as ``dinov3geo landcover`` writes it: colour table + class table JSON tag."""
    with rasterio.open(PUC) as src:
        b = src.read(2)
        grid = _grid(src)
    codes = np.digitize(b, [60, 120, 180]).astype("uint8") + 1  # 4 classes from the real NIR band
    table = [{"code": 1, "name": "water", "color": "#0064c8"}, {"code": 2, "name": "cleared", "color": "#c8a064"},
             {"code": 3, "name": "secondary forest", "color": "#3c9a3c"},
             {"code": 4, "name": "forest", "color": "#006400"}]
    path = tmp_path / "classes.tif"
    with rasterio.open(path, "w", driver="GTiff", width=grid.width, height=grid.height, count=1, dtype="uint8",
                       crs=grid.crs, transform=grid.transform, nodata=255) as ds:
        ds.write(codes, 1)
        ds.write_colormap(1, {c["code"]: tuple(int(c["color"][i:i + 2], 16) for i in (1, 3, 5)) + (255,)
                              for c in table} | {255: (0, 0, 0, 0)})
        ds.update_tags(DINOV3GEO_CLASSES=json.dumps(table))
    res = style_product(path)
    assert res["kind"] == "classes" and res["statistics"] is None
    r = _renderer(Path(res["qml"]))
    assert r.get("type") == "paletted"
    got = [(int(e.get("value")), e.get("color"), e.get("label")) for e in r.findall("colorPalette/paletteEntry")]
    assert got == [(c["code"], c["color"], c["name"]) for c in table]
    # the class map's own writer's style (no dinov3geo-style mark) is kept without a warning
    qml = path.with_suffix(".qml")
    qml.write_text("<qgis><pipe/></qgis>\n")
    res = style_product(path)
    assert res["kept"] == [] and res["qml"] is None and qml.read_text() == "<qgis><pipe/></qgis>\n"


def test_class_map_without_table_uses_colour_table_and_category_names(tmp_path) -> None:
    path = tmp_path / "lc.tif"
    with rasterio.open(PUC) as src:
        b = src.read(1)
        grid = _grid(src)
    codes = (b > np.median(b)).astype("uint8")
    with rasterio.open(path, "w", driver="GTiff", width=grid.width, height=grid.height, count=1, dtype="uint8",
                       crs=grid.crs, transform=grid.transform) as ds:
        ds.write(codes, 1)
        ds.write_colormap(1, {0: (200, 160, 100, 255), 1: (0, 100, 0, 255)})
    Path(f"{path}.aux.xml").write_text(
        '<PAMDataset><PAMRasterBand band="1"><CategoryNames><Category>bare</Category><Category>trees'
        "</Category></CategoryNames></PAMRasterBand></PAMDataset>")
    res = style_product(path)
    entries = _renderer(Path(res["qml"])).findall("colorPalette/paletteEntry")
    assert [(e.get("value"), e.get("color"), e.get("label")) for e in entries] == [
        ("0", "#c8a064", "bare"), ("1", "#006400", "trees")]


def test_probability_map_ramps_from_zero_to_one(tmp_path) -> None:
    with rasterio.open(CHM) as src:
        h = src.read(1, masked=True).astype("float32").filled(np.nan)
        grid = _grid(src)
    prob = (h / np.nanmax(h)).astype("float32")  # a real spatial pattern scaled to 0..1
    path = write_cog(tmp_path / "change_prob.tif", prob, grid, band_names=["change_prob"])
    assert product_style_kind(path) == "probability"
    shader = _renderer(Path(style_product(path)["qml"])).find("rastershader/colorrampshader")
    assert (float(shader.get("minimumValue")), float(shader.get("maximumValue"))) == (0.0, 1.0)


def test_rgb_composite_is_left_to_qgis(tmp_path) -> None:
    res = style_product(_copy(ROOT / "data" / "landsat" / "rasterio_RGB.byte.tif", tmp_path))
    assert res["kind"] is None and res["qml"] is None


def _copy(src: Path, folder: Path) -> Path:
    dst = folder / src.name
    dst.write_bytes(src.read_bytes())
    return dst
