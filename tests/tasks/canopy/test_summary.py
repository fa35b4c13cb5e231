"""Per-polygon height summaries in projected and geographic CRSs, window by window."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from rasterio.transform import from_origin

from dinov3geo.io.errors import MissingCRSError
from dinov3geo.io.vector import read_vector
from dinov3geo.tasks.canopy.summary import summarise_heights

UTM = "EPSG:32633"
X0, Y0 = 500000.0, 4000100.0


@pytest.fixture
def chm(make_raster):
    rng = np.random.default_rng(0)
    arr = rng.uniform(0, 25, (100, 100)).astype(np.float32)
    arr[0:10, 0:10] = -9999.0  # nodata corner
    arr[50, 50] = np.nan
    path = make_raster("chm.tif", arr, crs=UTM, transform=from_origin(X0, Y0, 1, 1), nodata=-9999.0)
    return path, arr


def test_summary_matches_numpy(chm, tmp_path):
    path, arr = chm
    polys = gpd.GeoDataFrame(
        {"stand": ["a", "corner", "half_out", "tiny"], "owner": [1, 2, 3, 4]},
        geometry=[
            shapely.box(X0 + 20, Y0 - 60, X0 + 70, Y0 - 30),  # rows 30..59, cols 20..69
            shapely.box(X0, Y0 - 20, X0 + 20, Y0),  # rows 0..19, cols 0..19 (a quarter is nodata)
            shapely.box(X0 + 80, Y0 - 20, X0 + 120, Y0),  # half beyond the east edge
            shapely.box(X0 + 5.1, Y0 - 50.9, X0 + 5.4, Y0 - 50.6),  # no pixel centre inside
        ],
        crs=UTM,
    )
    out = summarise_heights(path, polys, tmp_path / "s.gpkg", tmp_path / "s.csv", window=16)
    a = out.iloc[0]
    v = arr[30:60, 20:70].astype(np.float64)
    v = v[np.isfinite(v)]
    assert a["n_pixels"] == 1500 and a["valid_share"] == pytest.approx((1500 - 1) / 1500)  # the NaN pixel
    assert a["mean_height_m"] == pytest.approx(v.mean(), rel=1e-9)
    assert a["p95_height_m"] == pytest.approx(np.percentile(v, 95, method="inverted_cdf"), abs=0.0051)
    assert a["cover_share_5m"] == pytest.approx((v >= 5).mean())
    assert a["area_ha"] == pytest.approx(50 * 30 / 1e4)
    c = out.iloc[1]
    assert c["n_pixels"] == 400 and c["valid_share"] == pytest.approx(0.75)
    h = out.iloc[2]
    assert h["n_pixels"] == 800 and h["valid_share"] == pytest.approx(0.5)
    t = out.iloc[3]
    assert t["n_pixels"] == 0 and np.isnan(t["mean_height_m"])
    # outputs: attributes kept, geometry in the GeoPackage, CSV without geometry
    g = read_vector(tmp_path / "s.gpkg")
    assert list(g["stand"]) == ["a", "corner", "half_out", "tiny"] and g.crs == polys.crs
    assert g.geometry.iloc[0].equals_exact(polys.geometry.iloc[0], 1e-6)
    csv = pd.read_csv(tmp_path / "s.csv")
    assert "geometry" not in csv.columns and list(csv["owner"]) == [1, 2, 3, 4]
    assert csv["mean_height_m"].iloc[0] == pytest.approx(a["mean_height_m"])


def test_geographic_polygons_and_cover_threshold(chm, tmp_path):
    path, arr = chm
    utm_poly = gpd.GeoDataFrame({"id": [7]}, geometry=[shapely.box(X0 + 20, Y0 - 60, X0 + 70, Y0 - 30)], crs=UTM)
    geo = utm_poly.to_crs("EPSG:4326")
    out = summarise_heights(path, geo, None, tmp_path / "g.csv", cover_threshold=10)
    r = out.iloc[0]
    # geodesic area on WGS84 of the reprojected box: UTM scale factor ~0.9996 at the central meridian
    assert r["area_ha"] == pytest.approx(0.15, rel=2e-3)
    assert out.crs.to_epsg() == 4326 and "cover_share_10m" in out.columns
    v = arr[30:60, 20:70].astype(np.float64)
    v = v[np.isfinite(v)]
    assert abs(r["n_pixels"] - 1500) <= 60  # pixel centres of a slightly curved quadrilateral
    assert r["cover_share_10m"] == pytest.approx((v >= 10).mean(), abs=0.02)


def test_errors(chm, tmp_path, make_raster):
    path, _ = chm
    polys = gpd.GeoDataFrame(geometry=[shapely.box(X0, Y0 - 10, X0 + 10, Y0)], crs=UTM)
    with pytest.raises(ValueError, match="band 2"):
        summarise_heights(path, polys, None, None, band=2)
    nocrs = make_raster("n.tif", np.ones((4, 4), np.float32), crs=None, transform=from_origin(0, 4, 1, 1))
    with pytest.raises(MissingCRSError, match="n.tif"):
        summarise_heights(nocrs, polys, None, None)
