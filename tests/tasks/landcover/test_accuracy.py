"""Error-adjusted areas and accuracies (Olofsson et al. 2014): the paper's worked example, hand-computed cases,
the map + reference-sample path (points and polygons, windowed), edge cases and bad inputs."""

from __future__ import annotations

import math
import warnings

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from rasterio.features import rasterize
from rasterio.transform import from_origin

from dinov3geo.io.errors import VectorReadError
from dinov3geo.io.grid import GridSpec
from dinov3geo.tasks.landcover.accuracy import (
    AccuracyWarning,
    area_report,
    assess_map,
    count_map,
    estimate_areas,
)
from dinov3geo.tasks.landcover.classes import ClassTable, LandClass, write_class_raster
from dinov3geo.utils.outputs import MARKER, OutputConflictError

# Olofsson et al. (2014), Remote Sensing of Environment 148, 42-57, section 5: Table 8 (counts, mapped pixels),
# Table 9 (proportions), sections 5.2.1 (accuracies) and 5.2.2 (areas), as transcribed with page references in a
# public test fixture of an R re-implementation, checked against other public re-implementations of the same
# example, and recomputed by hand from Eq. 2-11.
OLOFSSON_NAMES = ["deforestation", "forest gain", "stable forest", "stable non-forest"]
OLOFSSON_COUNTS = [[66, 0, 5, 4], [0, 55, 8, 12], [1, 0, 153, 11], [2, 1, 9, 313]]  # Table 8, rows = map
OLOFSSON_PIXELS = [200_000, 150_000, 3_200_000, 6_450_000]  # Table 8, 30 m pixels (0.09 ha)
OLOFSSON_P = [[0.0176, 0.0, 0.0013, 0.0011],  # Table 9: estimated area proportions, 4 dp
              [0.0, 0.0110, 0.0016, 0.0024],
              [0.0019, 0.0, 0.2967, 0.0213],
              [0.0040, 0.0020, 0.0179, 0.6212]]
OLOFSSON_AREA = [21_158, 11_686, 285_770, 581_386]  # section 5.2.2, ha
OLOFSSON_AREA_CI = [6_158, 3_756, 15_510, 16_282]  # 95 % half-widths, ha
OLOFSSON_USER = [0.88, 0.73, 0.93, 0.96]  # section 5.2.1, +/- 95 % half-widths below
OLOFSSON_USER_CI = [0.07, 0.10, 0.04, 0.02]
OLOFSSON_PROD = [0.75, 0.85, 0.93, 0.96]
# printed as 0.21, 0.23, 0.03, 0.01; the paper's own Eq. 7 gives 0.254 (forest gain) and 0.018 (stable
# non-forest), so the printed 0.23 and 0.01 are typos (noted as such by the transcription): the equation's values
OLOFSSON_PROD_CI = [0.21, 0.25, 0.03, 0.02]


def test_olofsson_2014_worked_example():
    est = estimate_areas(OLOFSSON_COUNTS, OLOFSSON_PIXELS, unit_area_ha=0.09, names=OLOFSSON_NAMES)
    assert np.round(est.proportions, 4).tolist() == OLOFSSON_P
    assert np.round(est.area_ha).astype(int).tolist() == OLOFSSON_AREA
    assert np.round(1.96 * est.area_se_ha).astype(int).tolist() == OLOFSSON_AREA_CI
    assert np.round(est.area_ci_ha).astype(int).tolist() == OLOFSSON_AREA_CI
    assert np.round(est.user, 2).tolist() == OLOFSSON_USER
    assert np.round(1.96 * est.user_se, 2).tolist() == OLOFSSON_USER_CI
    assert np.round(est.producer, 2).tolist() == OLOFSSON_PROD
    assert np.round(1.96 * est.producer_se, 2).tolist() == OLOFSSON_PROD_CI
    assert round(est.overall, 2) == 0.95 and round(1.96 * est.overall_se, 2) == 0.02
    # the text's own intermediate numbers: deforestation p_.1 = 0.0235, mapped 18,000 ha
    assert round(est.proportions[:, 0].sum(), 4) == 0.0235
    assert est.mapped_area_ha[0] == pytest.approx(18_000)
    assert est.area_ha.sum() == pytest.approx(est.total_area_ha) == pytest.approx(900_000)
    assert est.notes == [] and est.unsampled == []
    df = est.to_frame()
    assert df.loc[0, "name"] == "deforestation" and df.loc[0, "n_samples"] == 75
    assert df["area_low_ha"].iloc[0] == pytest.approx(est.area_ha[0] - est.area_ci_ha[0])


def test_hand_computed_two_class_example():
    # mapped 80 ha / 20 ha; sample rows = map: [[8, 2], [1, 9]]
    est = estimate_areas([[8, 2], [1, 9]], [80, 20], codes=[3, 7], names=["forest", "other"])
    w = (0.8, 0.2)
    p = [[0.8 * 8 / 10, 0.8 * 2 / 10], [0.2 * 1 / 10, 0.2 * 9 / 10]]  # 0.64 0.16 / 0.02 0.18
    np.testing.assert_allclose(est.proportions, p)
    np.testing.assert_allclose(est.area_ha, [66.0, 34.0])
    se0 = math.sqrt(w[0] ** 2 * 0.8 * 0.2 / 9 + w[1] ** 2 * 0.1 * 0.9 / 9)
    np.testing.assert_allclose(est.area_se_ha, [100 * se0, 100 * se0])  # two classes: the same variance
    np.testing.assert_allclose(est.user, [0.8, 0.9])
    np.testing.assert_allclose(est.user_se, [math.sqrt(0.8 * 0.2 / 9), math.sqrt(0.9 * 0.1 / 9)])
    np.testing.assert_allclose(est.producer, [0.64 / 0.66, 0.18 / 0.34])
    assert est.overall == pytest.approx(0.82)
    assert est.overall_se == pytest.approx(math.sqrt(0.64 * 0.8 * 0.2 / 9 + 0.04 * 0.9 * 0.1 / 9))
    # Eq. 7 by hand for class "forest": N_1 = 80, N_2 = 20, N_.1 = 80 * 0.8 + 20 * 0.1 = 66
    p1 = 0.64 / 0.66
    v = (80 ** 2 * (1 - p1) ** 2 * 0.8 * 0.2 / 9 + p1 ** 2 * 20 ** 2 * 0.1 * 0.9 / 9) / 66 ** 2
    assert est.producer_se[0] == pytest.approx(math.sqrt(v))
    assert est.index("other") == 1 and est.index(3) == 0


def test_one_unit_strata_and_unsampled_strata_are_reported_not_hidden():
    with pytest.warns(AccuracyWarning) as rec:
        est = estimate_areas([[5, 1, 0], [0, 1, 0], [0, 0, 0]], [50, 30, 20], names=["a", "b", "c"])
    msgs = [str(r.message) for r in rec]
    assert any("only one sample unit" in m and "'b'" in m for m in msgs)
    assert any("no sample unit in the stratum of 'c' (20 % of the map)" in m for m in msgs)
    assert math.isnan(est.area_se_ha[0]) and math.isnan(est.overall_se)
    assert math.isnan(est.user_se[1]) and not math.isnan(est.user_se[0])
    assert est.unsampled == [2]  # 'c' is mapped (20 ha) but has no sample unit: carried as mapped
    assert est.area_ha[2] == pytest.approx(20.0) and est.user[2] == 1.0
    assert any("no sample unit" in n and "'c'" in n for n in est.notes)
    assert est.area_ha.sum() == pytest.approx(100.0)
    # a reference-only class (never mapped) gets its area from omission errors only
    est = estimate_areas([[9, 1], [0, 0]], [100, 0], names=["forest", "burnt"])
    assert est.area_ha[1] == pytest.approx(10.0) and est.producer[1] == 0.0 and math.isnan(est.user[1])


def test_bad_matrices_are_refused():
    with pytest.raises(ValueError, match="square"):
        estimate_areas([[1, 2, 3]], [1])
    with pytest.raises(ValueError, match="one per class"):
        estimate_areas([[1, 0], [0, 1]], [1, 2, 3])
    with pytest.raises(ValueError, match="mapped area is 0"):
        estimate_areas([[1, 0], [0, 1]], [0, 0])


TABLE4 = ClassTable([LandClass(1, "deforestation", "#ff0000"), LandClass(2, "forest gain", "#00ff00"),
                     LandClass(3, "stable forest", "#006400"), LandClass(4, "stable non-forest", "#ffff4c")])


def _olofsson_map(tmp_path):
    """A 100 x 100 map with the paper's class proportions (1/1000 of its pixels) and its 640 sample points."""
    counts = [p // 1000 for p in OLOFSSON_PIXELS]  # 200, 150, 3200, 6450
    arr = np.repeat(np.arange(1, 5, dtype=np.uint8), counts)
    rng = np.random.default_rng(3)
    arr = rng.permutation(arr).reshape(100, 100)
    grid = GridSpec("EPSG:32633", from_origin(600000, 5000000, 30, 30), 100, 100)
    path = write_class_raster(tmp_path / "map.tif", arr, grid, TABLE4)
    pts, refs = [], []
    for i, row in enumerate(OLOFSSON_COUNTS):
        rr, cc = np.nonzero(arr == i + 1)
        pick = rng.choice(len(rr), sum(row), replace=False)
        labels = np.repeat(np.arange(4), row)
        for k, lab in zip(pick, labels, strict=True):
            pts.append(shapely.Point(600000 + 30 * cc[k] + 15, 5000000 - 30 * rr[k] - 15))
            refs.append(TABLE4.names[lab])
    return path, grid, arr, gpd.GeoDataFrame({"reference": refs}, geometry=pts, crs="EPSG:32633")


def test_map_and_points_reproduce_the_worked_example(tmp_path):
    path, _, _, pts = _olofsson_map(tmp_path)
    sample = tmp_path / "sample.gpkg"
    pts.to_crs("EPSG:4326").to_file(sample)  # another CRS: reprojected onto the map
    est = assess_map(path, sample, window=16)  # 16 x 16 px strips: many windows
    assert est.counts.astype(int).tolist() == OLOFSSON_COUNTS
    assert np.round(est.proportions, 4).tolist() == OLOFSSON_P
    # the same estimator on 1/1000 of the area: areas scale, accuracies do not
    assert np.round(est.area_ha * 1000).astype(int).tolist() == OLOFSSON_AREA
    assert np.round(est.producer, 2).tolist() == OLOFSSON_PROD
    assert est.dropped == {"outside_map": 0, "map_nodata": 0, "no_reference": 0}


def test_count_map_in_windows_equals_the_whole_array(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.choice(np.array([0, 4, 9, 255], dtype=np.uint8), size=(70, 45))
    grid = GridSpec("EPSG:4326", from_origin(-60.0, 10.0, 0.01, 0.01), 45, 70)
    path = write_class_raster(tmp_path / "m.tif", arr, grid, ClassTable.from_labels([0, 4, 9]))
    mc = count_map(path, window=8)
    np.testing.assert_array_equal(mc.pixels, np.bincount(arr.ravel(), minlength=256))
    # geodesic pixel areas: the exact area of each pixel's latitude band on the WGS84 ellipsoid (authalic formula)
    a, f = 6378137.0, 1 / 298.257223563
    e2 = f * (2 - f)
    e = math.sqrt(e2)

    def q(lat):
        s = math.sin(math.radians(lat))
        return s / (1 - e2 * s * s) - math.log((1 - e * s) / (1 + e * s)) / (2 * e)

    band = [a * a * (1 - e2) / 2 * math.radians(0.01) * (q(10 - 0.01 * r) - q(10 - 0.01 * (r + 1))) / 1e4
            for r in range(70)]
    want = np.zeros(256)
    for r in range(70):
        np.add.at(want, arr[r], band[r])
    np.testing.assert_allclose(mc.area_ha, want, rtol=1e-7)


def test_polygon_units_take_the_majority_class_and_unusable_units_are_counted(tmp_path):
    arr = np.full((20, 20), 1, dtype=np.uint8)
    arr[:, 10:] = 2
    arr[15:, :] = 255
    grid = GridSpec("EPSG:32633", from_origin(0, 200, 10, 10), 20, 20)
    table = ClassTable([LandClass(1, "forest", "#006400"), LandClass(2, "water", "#0064c8")])
    path = write_class_raster(tmp_path / "m.tif", arr, grid, table)
    polys = [
        shapely.box(40, 110, 130, 190),  # cols 4-12: 6 forest, 3 water columns -> forest
        shapely.box(90, 110, 190, 190),  # cols 9-18: 1 forest, 9 water columns -> water
        shapely.box(500, 500, 600, 600),  # outside the map
        shapely.box(20, 0, 80, 40),  # rows 16-19: map nodata only
        shapely.box(120, 120, 180, 180),  # no reference label
        shapely.box(101, 101, 104, 104),  # smaller than a pixel, touching one water pixel
    ]
    gdf = gpd.GeoDataFrame({"truth": ["forest", "water", "forest", "water", None, "1"]}, geometry=polys,
                           crs="EPSG:32633")
    with pytest.warns(AccuracyWarning):
        est = assess_map(path, gdf, column="truth")
    assert est.dropped == {"outside_map": 1, "map_nodata": 1, "no_reference": 1}
    assert est.counts.astype(int).tolist() == [[1, 0], [1, 1]]  # the tiny polygon: map water, reference forest
    assert est.source["units"].startswith("polygons")


def test_real_reference_polygons_on_a_real_map(tmp_path, shared_data):
    """Chiapas Landsat 7 (1999): a crude NDVI class map, assessed with the tutorial's 30 hand-drawn polygons."""
    d = shared_data / "landcover" / "ogt_landsat7_chiapas_1999_2002"
    with rasterio.open(d / "LE70220491999322EDC01_stack.gtif") as ds:
        red, nir = ds.read(3).astype(float), ds.read(4).astype(float)
        grid = GridSpec.from_dataset(ds)
    ndvi = (nir - red) / np.maximum(nir + red, 1)
    table = ClassTable([LandClass(1, "forest", "#006400"), LandClass(2, "water", "#0064c8"),
                        LandClass(3, "herbaceous", "#ffff4c"), LandClass(4, "barren", "#b4b4b4"),
                        LandClass(5, "urban", "#fa0000")])
    cls = np.select([nir < 1200, ndvi > 0.6, ndvi > 0.45], [2, 1, 3], default=4).astype(np.uint8)
    path = write_class_raster(tmp_path / "map1999.tif", cls, grid, table)
    ref = gpd.read_file(d / "training_data.shp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccuracyWarning)  # urban is never mapped, some strata have one unit
        est = assess_map(path, d / "training_data.shp", column="class")
    # independently: rasterise each polygon (pixel centres) and take its majority class
    want = np.zeros((5, 5), dtype=int)
    for geom, name in zip(ref.to_crs(grid.crs).geometry, ref["class"], strict=True):
        inside = rasterize([(geom, 1)], out_shape=grid.shape, transform=grid.transform, fill=0).astype(bool)
        m = int(np.argmax(np.bincount(cls[inside], minlength=6)))
        want[table.index_of(m), table.index_of(table.by_name(name).code)] += 1
    assert est.counts.astype(int).tolist() == want.tolist() and est.n_used == len(ref) == 30
    assert est.area_ha.sum() == pytest.approx(grid.width * grid.height * 0.09)
    assert est.mapped_area_ha.tolist() == pytest.approx([(cls == c).sum() * 0.09 for c in table.codes])


def test_bad_reference_files_give_one_line_errors_naming_the_file(tmp_path):
    path, _, _, pts = _olofsson_map(tmp_path)
    sample = tmp_path / "pts.gpkg"
    pts.rename(columns={"reference": "label"}).to_file(sample)
    with pytest.raises(VectorReadError, match=r"pts\.gpkg.*no column 'reference'.*'label'"):
        assess_map(path, sample)
    bad = pts.copy()
    bad.loc[3, "reference"] = "forset"
    bad.to_file(tmp_path / "typo.gpkg")
    with pytest.raises(ValueError, match=r"typo\.gpkg.*'forset' is not a class of the map") as ei:
        assess_map(path, tmp_path / "typo.gpkg")
    assert "\n" not in str(ei.value)
    two = tmp_path / "two.gpkg"
    pts.iloc[:5].to_file(two, layer="draft")
    pts.to_file(two, layer="labelled")
    with pytest.raises(VectorReadError, match=r"two\.gpkg.*2 layers \['draft', 'labelled'\].*--layer"):
        assess_map(path, two)
    assert assess_map(path, two, layer="labelled").n_used == 640
    far = pts.copy()
    far.geometry = far.geometry.translate(1e6, 0)
    far.to_file(tmp_path / "far.gpkg")
    with pytest.raises(ValueError, match=r"far\.gpkg.*none of its 640 units is usable \(640 outside the map"):
        assess_map(path, tmp_path / "far.gpkg")


def test_area_report_folder_is_guarded_and_written_only_on_success(tmp_path):
    path, _, _, pts = _olofsson_map(tmp_path)
    sample = tmp_path / "pts.gpkg"
    pts.to_file(sample)
    est, paths = area_report(path, sample, tmp_path / "areas")
    assert (tmp_path / "areas" / MARKER).is_file()
    assert sorted(p.name for p in paths.values()) == ["accuracy.json", "areas.csv", "error_matrix.csv",
                                                      "error_matrix_counts.csv"]
    import pandas as pd

    df = pd.read_csv(paths["areas"])
    assert df["name"].tolist()[-1] == "overall"
    assert df["area_ha"].iloc[:4].to_numpy() == pytest.approx(est.area_ha)
    with pytest.raises(OutputConflictError, match="it is the input"):
        area_report(path, sample, path)
    with pytest.raises(OutputConflictError, match="did not create"):
        area_report(path, sample, tmp_path)  # the user's folder holding the inputs
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(OutputConflictError, match="did not create"):
        area_report(path, sample, foreign)
    assert sorted(x.name for x in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(VectorReadError):
        area_report(path, sample, tmp_path / "never", column="nope")
    assert not (tmp_path / "never").exists()
