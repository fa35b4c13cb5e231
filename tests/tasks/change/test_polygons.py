"""Polygons: areas in hectares (projected and geographic, against hand computations), MMU, dates, zonal stats."""

from __future__ import annotations

import math

import geopandas as gpd
import numpy as np
import pytest
import shapely
from rasterio.transform import from_origin

from dinov3geo.io import GridSpec
from dinov3geo.io.vector import read_vector
from dinov3geo.tasks.change.polygons import (
    aoi_summary,
    change_polygons,
    pixel_area_ha,
    remove_small_regions,
    write_polygons,
    write_summary,
)

UTM = GridSpec("EPSG:32633", from_origin(500000.0, 4000000.0, 10.0, 10.0), 30, 30)


def _cell_area_wgs84(lat0: float, lat1: float, dlon_deg: float) -> float:
    """Exact area (m^2) of a graticule cell on the WGS84 ellipsoid, from the authalic-latitude formula."""
    a, f = 6378137.0, 1 / 298.257223563
    e2 = f * (2 - f)
    e = math.sqrt(e2)
    b2 = a * a * (1 - e2)

    def q(phi: float) -> float:
        s = math.sin(math.radians(phi))
        return s / (1 - e2 * s * s) + math.log((1 + e * s) / (1 - e * s)) / (2 * e)

    return abs(b2 / 2 * math.radians(dlon_deg) * (q(lat1) - q(lat0)))


def test_projected_areas_holes_and_dates():
    m = np.zeros((30, 30), bool)
    m[2:5, 3:7] = True  # 12 px of 100 m^2 = 0.12 ha
    m[10:15, 10:15] = True
    m[11:13, 11:13] = False  # a ring: 25 - 4 = 21 px = 0.21 ha, with a hole
    prob = np.full((30, 30), 0.2, np.float32)
    prob[2:5, 3:7] = 0.9
    hb = np.full((30, 30), 20.0, np.float32)
    ha = hb.copy()
    ha[2:5, 3:7] = 5.0
    ha[2, 3] = 0.0
    g = change_polygons(m, UTM, mmu_ha=0.1, date_before="2016-11-30", date_after="2017-08-29", prob=prob,
                        height_before=hb, height_after=ha)
    assert g.crs == UTM.crs and list(g["area_ha"]) == pytest.approx([0.21, 0.12])
    assert list(g["n_pixels"]) == [21, 12] and list(g["id"]) == [1, 2]
    assert (g["date_before"] == "2016-11-30").all() and (g["date_after"] == "2017-08-29").all()
    ring, block = g.iloc[0], g.iloc[1]
    assert len(ring.geometry.interiors) == 1
    assert block["mean_prob"] == pytest.approx(0.9) and ring["mean_prob"] == pytest.approx(0.2)
    assert block["mean_height_drop"] == pytest.approx((11 * 15 + 20) / 12) and block["max_height_drop"] == 20
    assert ring["mean_height_drop"] == 0 and block["mean_height_before"] == 20


def test_geographic_areas_are_geodesic():
    res = 0.001
    grid = GridSpec("EPSG:4326", from_origin(-74.5, -8.0, res, res), 40, 40)
    m = np.zeros((40, 40), bool)
    m[10:20, 5:15] = True  # rows 10..19: latitudes -8.010 .. -8.020
    expect_ha = _cell_area_wgs84(-8.010, -8.020, 10 * res) / 1e4
    g = change_polygons(m, grid, mmu_ha=0, date_before="2000", date_after="2020")
    assert len(g) == 1 and g.crs.to_epsg() == 4326
    assert g["area_ha"].iloc[0] == pytest.approx(expect_ha, rel=1e-6)  # ~122 ha, not square degrees
    assert expect_ha == pytest.approx(122.0, rel=0.01)
    per_row = pixel_area_ha(grid)
    assert per_row[10:20, 0].sum() * 10 == pytest.approx(expect_ha, rel=1e-6)
    assert per_row[0, 0] > per_row[-1, 0]  # pixels shrink away from the equator


def test_mmu_filter_and_connectivity():
    m = np.zeros((30, 30), bool)
    m[0, 0:10] = True  # 10 px = 0.10 ha: kept at MMU 0.1
    m[5, 0:9] = True  # 9 px = 0.09 ha: dropped
    m[10, 10] = m[11, 11] = True  # diagonal pair
    g = change_polygons(m, UTM, mmu_ha=0.1)
    assert list(g["area_ha"]) == pytest.approx([0.10])
    assert len(change_polygons(m, UTM, mmu_ha=0, connectivity=8)) == 3
    assert len(change_polygons(m, UTM, mmu_ha=0, connectivity=4)) == 4
    kept = remove_small_regions(m, UTM, 0.1)
    assert kept.sum() == 10 and kept[0, :10].all()
    assert remove_small_regions(m, UTM, 0.02, connectivity=8)[10, 10]
    assert not remove_small_regions(m, UTM, 0.02, connectivity=4)[10, 10]
    with pytest.raises(ValueError, match="connectivity"):
        change_polygons(m, UTM, connectivity=6)


@pytest.mark.parametrize("suffix", [".gpkg", ".parquet", ".geojson"])
def test_write_formats_and_empty(tmp_path, suffix):
    m = np.zeros((30, 30), bool)
    m[2:5, 3:7] = True
    g = change_polygons(m, UTM, mmu_ha=0.1, date_before="2000", date_after="2020")
    p = write_polygons(g, tmp_path / f"loss{suffix}")
    back = read_vector(p)
    assert len(back) == 1 and back["date_after"].iloc[0] == "2020"
    assert back["area_ha"].iloc[0] == pytest.approx(0.12)
    empty = change_polygons(np.zeros((30, 30), bool), UTM)
    assert len(empty) == 0 and "area_ha" in empty.columns
    write_polygons(empty, tmp_path / f"empty{suffix}")
    assert len(read_vector(tmp_path / f"empty{suffix}", allow_empty=True)) == 0


def test_aoi_summary(tmp_path):
    m = np.zeros((30, 30), bool)
    m[0:10, 0:10] = True  # 1 ha block at x 500000..500100, y 3999900..4000000
    g = change_polygons(m, UTM, mmu_ha=0.1)
    aoi = gpd.GeoDataFrame({"name": ["west", "east"]}, geometry=[
        shapely.box(500000, 3999900, 500050, 4000000),  # half of the block: 0.5 ha
        shapely.box(500200, 3999700, 500300, 3999800),  # none of it
    ], crs=UTM.crs).to_crs("EPSG:4326")  # another CRS: reprojected for the overlay
    t = aoi_summary(g, aoi)
    assert list(t["aoi"]) == ["west", "east", "total"]
    assert t["loss_ha"].tolist() == pytest.approx([0.5, 0.0, 1.0], rel=1e-3)
    assert t["aoi_area_ha"].iloc[0] == pytest.approx(0.5, rel=1e-3) and t["loss_fraction"].iloc[0] == pytest.approx(1, rel=1e-3)
    p = write_summary(t, tmp_path / "s.csv")
    assert p.read_text().splitlines()[0] == "aoi,aoi_area_ha,loss_ha,loss_fraction,n_polygons"
    with pytest.raises(ValueError, match=r"\.csv or \.json"):
        write_summary(t, tmp_path / "s.txt")
