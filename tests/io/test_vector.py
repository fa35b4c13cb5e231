"""Tests for dinov3geo.io.vector."""

from __future__ import annotations

import json
import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from affine import Affine
from shapely.geometry import Point, Polygon, box

from dinov3geo.io.errors import EmptyLayerError, MissingCRSError, UnsupportedFormatError, VectorReadError
from dinov3geo.io.grid import GridSpec
from dinov3geo.io.vector import aoi_geometry, aoi_mask, area_ha, read_vector, write_vector

WGS84_A = 6378137.0
WGS84_F = 1 / 298.257223563


def _utm_gdf() -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(
        {"label": ["forest", "cleared", "water"], "score": [0.9, 0.25, 1.0]},
        geometry=[
            box(580560, 5101700, 580660, 5101800),
            Polygon([(580700, 5101700), (580800, 5101700), (580750, 5101790)]),
            box(580000, 5100000, 580300, 5100300).difference(box(580100, 5100100, 580200, 5100200)),
        ],
        crs="EPSG:32632",
    )


# ---------------------------------------------------------------------- write / read round trips
@pytest.mark.parametrize("suffix", [".gpkg", ".parquet", ".fgb", ".geojson"])
def test_write_read_round_trip(tmp_path: Path, suffix: str) -> None:
    gdf = _utm_gdf()
    out = write_vector(gdf, tmp_path / "nested" / f"labels{suffix}")
    assert out.exists()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp files left
    back = read_vector(out)
    if suffix == ".fgb":  # FlatGeobuf's spatial index stores features in Hilbert order
        back = back.set_index("label").loc[gdf["label"]].reset_index()
    expected_crs = "EPSG:4326" if suffix == ".geojson" else "EPSG:32632"
    assert back.crs.equals(expected_crs)
    assert list(back["label"]) == list(gdf["label"])
    assert np.allclose(back["score"], gdf["score"])
    back_utm = back.to_crs(gdf.crs)
    tol = 1e-3 if suffix == ".geojson" else 0.0  # reprojection 32632 -> 4326 -> 32632: sub-millimetre
    for a, b in zip(back_utm.geometry, gdf.geometry, strict=True):
        assert a.equals_exact(b, tolerance=tol) or a.normalize().equals_exact(b.normalize(), tolerance=tol)
    assert read_vector(out, crs="EPSG:32632").crs.equals("EPSG:32632")


def test_geojson_is_written_in_wgs84_unless_told_otherwise(tmp_path: Path) -> None:
    gdf = _utm_gdf()
    doc = json.loads(write_vector(gdf, tmp_path / "a.geojson").read_text())
    assert "crs" not in doc or "4326" in json.dumps(doc["crs"]) or "CRS84" in json.dumps(doc["crs"])
    x, y = doc["features"][0]["geometry"]["coordinates"][0][0]
    assert 9.5 < x < 10.5 and 45.5 < y < 46.5  # lon/lat near Lake Barbellino, not UTM metres
    doc = json.loads(write_vector(gdf, tmp_path / "b.geojson", rfc7946=False).read_text())
    assert "32632" in json.dumps(doc["crs"])
    assert doc["features"][0]["geometry"]["coordinates"][0][0][0] > 500000


def test_gpkg_layers_are_added_and_replaced(tmp_path: Path) -> None:
    out = tmp_path / "labels.gpkg"
    gdf = _utm_gdf()
    write_vector(gdf, out, layer="train")
    write_vector(gdf.iloc[:1], out, layer="val")
    write_vector(gdf.iloc[:2], out, layer="train")
    layers = dict(pyogrio.list_layers(out))
    assert set(layers) == {"train", "val"}
    assert len(read_vector(out, layer="train")) == 2 and len(read_vector(out, layer="val")) == 1


def test_write_refuses_missing_crs_and_unknown_suffix(tmp_path: Path) -> None:
    gdf = _utm_gdf().set_crs(None, allow_override=True)
    with pytest.raises(MissingCRSError, match="no coordinate reference system") as info:
        write_vector(gdf, tmp_path / "x.gpkg")
    assert "x.gpkg" in str(info.value)
    with pytest.raises(UnsupportedFormatError, match=r"\.shp"):
        write_vector(_utm_gdf(), tmp_path / "x.shp")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "labels.fgb"
    write_vector(_utm_gdf(), out)
    before = out.read_bytes()

    def crash(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half a flatgeobuf")
        raise MemoryError("killed")

    monkeypatch.setattr(gpd.GeoDataFrame, "to_file", crash)
    with pytest.raises(MemoryError):
        write_vector(_utm_gdf().iloc[:1], out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["labels.fgb"]


def test_unwritable_output_fails_early(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    out = tmp_path / "f" / "labels.gpkg"
    with pytest.raises(PermissionError, match=str(out)):
        write_vector(_utm_gdf(), out)


# ---------------------------------------------------------------------- reading errors
def test_read_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(VectorReadError, match="nope.gpkg") as info:
        read_vector(tmp_path / "nope.gpkg")
    assert isinstance(info.value, OSError)
    with pytest.raises(UnsupportedFormatError, match="labels.kml"):
        read_vector(tmp_path / "labels.kml")


def test_geojson_without_crs_is_wgs84(tmp_path: Path) -> None:
    p = tmp_path / "pts.geojson"
    feat = {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [10.04, 46.07]}}
    p.write_text(json.dumps({"type": "FeatureCollection", "features": [feat]}))
    gdf = read_vector(p)
    assert gdf.crs.equals("EPSG:4326") and gdf.geometry.iloc[0].x == 10.04


def test_shapefile_without_crs_needs_assume_crs(tmp_path: Path) -> None:
    p = tmp_path / "plots.shp"
    with pytest.warns(UserWarning, match="crs"):
        gpd.GeoDataFrame({"id": [1]}, geometry=[box(0, 0, 10, 10)]).to_file(p)
    assert not p.with_suffix(".prj").exists()
    with pytest.raises(MissingCRSError) as info:
        read_vector(p)
    assert "plots.shp" in str(info.value) and "assume_crs" in str(info.value)
    gdf = read_vector(p, assume_crs="EPSG:32632", crs="EPSG:4326")
    assert gdf.crs.equals("EPSG:4326")


def test_empty_layer_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "empty.gpkg"
    write_vector(gpd.GeoDataFrame({"a": []}, geometry=[], crs="EPSG:32632"), p, layer="labels")
    with pytest.raises(EmptyLayerError, match="layer 'labels'.*empty.gpkg"):
        read_vector(p, layer="labels")
    assert len(read_vector(p, layer="labels", allow_empty=True)) == 0


def test_invalid_geometries_are_repaired_and_counted(tmp_path: Path) -> None:
    bowtie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    gdf = gpd.GeoDataFrame({"id": [1, 2]}, geometry=[bowtie, box(20, 0, 30, 10)], crs="EPSG:32632")
    p = tmp_path / "bad.gpkg"
    write_vector(gdf, p)
    with pytest.warns(UserWarning, match=r"repaired 1 invalid geometry in .*bad\.gpkg"):
        back = read_vector(p)
    assert back.attrs["n_repaired"] == 1
    assert back.geometry.is_valid.all()
    assert back.geometry.iloc[0].geom_type == "MultiPolygon" and back.geometry.iloc[0].area == pytest.approx(
        50
    )
    assert back.geometry.iloc[1].equals(box(20, 0, 30, 10))


def test_real_training_polygons(shared_data: Path) -> None:
    p = shared_data / "landsat" / "rstoolbox_LT05_224063_1988" / "training_polygons.gpkg"
    gdf = read_vector(p)
    assert len(gdf) == 36 and gdf.crs.to_epsg() == 32622
    assert set(gdf["class"]) == {"cleared", "fallen_dry", "forest", "water"}
    # planar UTM area vs geodesic area of the same polygons in lon/lat: UTM scale error here is < 0.1 %
    a_utm = area_ha(gdf)
    a_geo = area_ha(gdf.to_crs("EPSG:4326"))
    assert (a_utm > 0).all()
    assert np.allclose(a_utm, a_geo, rtol=2e-3)


# ---------------------------------------------------------------------- areas
def _ellipsoid_quadrangle_area(lon0: float, lat0: float, lon1: float, lat1: float) -> float:
    """Exact area (m^2) between two meridians and two parallels on the WGS84 ellipsoid (authalic formula)."""
    e2 = WGS84_F * (2 - WGS84_F)
    e = math.sqrt(e2)
    b2 = (WGS84_A * (1 - WGS84_F)) ** 2

    def q(lat: float) -> float:
        s = math.sin(math.radians(lat))
        return s / (1 - e2 * s * s) + math.log((1 + e * s) / (1 - e * s)) / (2 * e)

    return b2 * math.radians(lon1 - lon0) / 2 * (q(lat1) - q(lat0))


def test_area_ha_projected_metres_and_feet() -> None:
    utm = gpd.GeoDataFrame(geometry=[box(500000, 0, 500100, 100), Point(0, 0), None], crs="EPSG:32618")
    a = area_ha(utm)
    assert a.iloc[0] == pytest.approx(1.0, rel=1e-12) and a.iloc[1] == 0 and math.isnan(a.iloc[2])
    side_ft = 100 / 0.3048006096012192  # 100 m in US survey feet (EPSG:2263 units)
    ft = gpd.GeoSeries([box(1e6, 2e5, 1e6 + side_ft, 2e5 + side_ft)], crs="EPSG:2263")
    assert area_ha(ft).iloc[0] == pytest.approx(1.0, rel=1e-9)


def test_area_ha_geographic_is_geodesic() -> None:
    cell = box(0, 0, 0.01, 0.01)
    expected = _ellipsoid_quadrangle_area(0, 0, 0.01, 0.01) / 1e4
    assert 123.0 < expected < 123.2  # WGS84 ellipsoid (a sphere of 6371 km would give 123.6 ha)
    got = area_ha(gpd.GeoSeries([cell, box(30, 60, 30.01, 60.01)], crs="EPSG:4326"))
    assert got.iloc[0] == pytest.approx(expected, rel=1e-3)
    assert got.iloc[1] == pytest.approx(_ellipsoid_quadrangle_area(30, 60, 30.01, 60.01) / 1e4, rel=1e-3)
    # clockwise ring and a hole: the hole is subtracted whatever the ring orientation
    outer = Polygon(
        [(0, 0), (0, 0.02), (0.02, 0.02), (0.02, 0)],
        holes=[[(0.005, 0.005), (0.015, 0.005), (0.015, 0.015), (0.005, 0.015)]],
    )
    exp_hole = _ellipsoid_quadrangle_area(0, 0, 0.02, 0.02) - _ellipsoid_quadrangle_area(
        0.005, 0.005, 0.015, 0.015
    )
    assert area_ha(gpd.GeoSeries([outer], crs="EPSG:4326")).iloc[0] == pytest.approx(exp_hole / 1e4, rel=1e-3)


def test_area_ha_uses_the_crs_ellipsoid() -> None:
    sphere = "+proj=longlat +R=6371000 +no_defs"
    got = area_ha(gpd.GeoSeries([box(0, 0, 0.01, 0.01)], crs=sphere)).iloc[0]
    expected = (
        6371000.0**2 * math.radians(0.01) * math.sin(math.radians(0.01)) / 1e4
    )  # spherical zone formula
    assert got == pytest.approx(expected, rel=1e-3) and got == pytest.approx(123.6, abs=0.05)


def test_area_ha_requires_crs() -> None:
    with pytest.raises(MissingCRSError):
        area_ha(gpd.GeoSeries([box(0, 0, 1, 1)]))


# ---------------------------------------------------------------------- AOIs
def test_aoi_mask_of_wgs84_polygon_on_utm_grid(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "sentinel2" / "sen2r_barbellino"
    lake_utm = read_vector(folder / "barbellino.geojson")
    assert lake_utm.crs.to_epsg() == 32632  # the file declares UTM 32N; make a true EPSG:4326 copy
    lake_wgs84 = write_vector(lake_utm, tmp_path / "lake_4326.geojson")
    assert read_vector(lake_wgs84).crs.equals("EPSG:4326")
    with rasterio.open(folder / "S2A2A_20170703_022_Barbellino_BOA_10.tif") as src:
        grid = GridSpec.from_dataset(src)
    aoi = aoi_geometry(lake_wgs84, grid.crs)
    mask = aoi_mask(aoi, grid)
    assert mask.dtype == bool and mask.shape == grid.shape == (42, 24)
    # the lake polygon by hand: the 240 m x 420 m frame minus two 45-degree corner triangles (120 m and 100 m legs)
    expected_px = (240 * 420 - 120 * 120 / 2 - 100 * 100 / 2) / (10 * 10)
    assert expected_px == 886
    assert abs(int(mask.sum()) - expected_px) <= max(grid.shape)  # +- one row/column of pixels
    assert mask[20, 12] and not mask[41, 23] and not mask[0, 0]  # centre in; cut corners out
    touched = aoi_mask(aoi, grid, all_touched=True)
    assert touched.sum() >= mask.sum() and (touched | mask).sum() == touched.sum()


def test_aoi_geometry_inputs_and_errors() -> None:
    grid = GridSpec("EPSG:32632", Affine(10, 0, 580000, 0, -10, 5102000), 50, 40)
    sq = box(580100, 5101700, 580300, 5101900)  # 20 x 20 px, aligned with the grid
    two = [sq, box(580200, 5101800, 580400, 5101950)]
    aoi = aoi_geometry(two, "EPSG:32632", src_crs="EPSG:32632")
    assert aoi.area == pytest.approx(shapely.union_all(two).area)
    assert aoi_mask(aoi_geometry(sq, grid.crs, src_crs=grid.crs), grid).sum() == 400
    with pytest.raises(MissingCRSError, match="src_crs"):
        aoi_geometry(sq, grid.crs)
    with pytest.raises(ValueError, match="no polygon area"):
        aoi_geometry(gpd.GeoSeries([Point(1, 1)], crs="EPSG:4326"), grid.crs)
    assert not aoi_mask(Polygon(), grid).any()


# ---------------------------------------------------------------------- error classes
def test_error_classes_name_the_target_and_keep_builtin_bases(tmp_path: Path) -> None:
    from dinov3geo.io.errors import BandNotFoundError, DinoGeoIOError, OutputError, RasterReadError

    err = BandNotFoundError("s2.tif", "B8A", available=["B02", "B03"])
    assert isinstance(err, KeyError) and isinstance(err, DinoGeoIOError)
    assert str(err).startswith("band 'B8A' not found in 's2.tif'; available bands: ['B02', 'B03']")
    with pytest.raises(KeyError):
        raise err
    err = RasterReadError(tmp_path / "x.tif", "not a TIFF")
    assert isinstance(err, OSError) and str(tmp_path / "x.tif") in str(err) and "gdalinfo" in str(err)
    assert err.path == str(tmp_path / "x.tif")
    assert isinstance(OutputError("o.tif"), PermissionError)
    assert "set one" in str(MissingCRSError("a.shp")).lower()
