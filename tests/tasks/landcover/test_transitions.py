"""From-to transitions: matrices equal a whole-array computation (projected and EPSG:4326 grids, windowed), the
raster round-trips to the matrix with its colours and names, change gating, reprojection of date 2, polygons
with MMU and confidence, real Landsat dates, and the one-line errors and folder guard."""

from __future__ import annotations

import hashlib
import json
import math

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import from_origin

from dinov3geo.io.cog import validate_cog, write_cog
from dinov3geo.io.grid import GridSpec
from dinov3geo.tasks.landcover.accuracy import assess_map
from dinov3geo.tasks.landcover.classes import (
    ClassTable,
    LandClass,
    read_category_names,
    write_class_raster,
)
from dinov3geo.tasks.landcover.sampling import stratified_sample
from dinov3geo.tasks.landcover.transitions import (
    TransitionError,
    read_transition_info,
    transition_names,
    transitions,
)
from dinov3geo.utils.outputs import MARKER, OutputConflictError

TABLE = ClassTable([LandClass(1, "forest", "#006400"), LandClass(2, "herbaceous", "#ffff4c"),
                    LandClass(5, "water", "#0064c8")])
UTM = GridSpec("EPSG:32633", from_origin(500000, 4000000, 10, 10), 150, 100)  # 0.01 ha pixels


def _pair(tmp_path, grid=UTM, seed=0, confidence=False):
    """Two class maps: date 2 = date 1 with blocks converted, noise flips and nodata in each date."""
    rng = np.random.default_rng(seed)
    h, w = grid.shape
    a = rng.choice(np.array(TABLE.codes, np.uint8), size=(h, w), p=[0.5, 0.3, 0.2])
    b = a.copy()
    b[20:50, 30:90] = 2  # a block of conversion to herbaceous
    b[60:70, :] = 5  # a band flooded
    flip = rng.random((h, w)) < 0.05  # classification noise: false transitions
    b[flip] = rng.choice(np.array(TABLE.codes, np.uint8), size=int(flip.sum()))
    a[:3, :] = 255
    b[:, -4:] = 255
    kw: dict = {}
    if confidence:
        kw = {"confidence": rng.uniform(0.3, 1.0, (h, w))}
    p1 = write_class_raster(tmp_path / "lc_2019-06-01.tif", a, grid, TABLE, **kw)
    kw2 = {"confidence": rng.uniform(0.3, 1.0, (h, w))} if confidence else {}
    p2 = write_class_raster(tmp_path / "lc_2023-06-01.tif", b, grid, TABLE, **kw2)
    return p1, p2, a, b


def _expected(a, b, row_area, gate=None):
    """Hectares from (rows) to (columns) by a whole-array computation (codes -> indexes by hand)."""
    idx = {c: i for i, c in enumerate(TABLE.codes)}
    m = np.zeros((3, 3))
    for r in range(a.shape[0]):
        for c in range(a.shape[1]):
            x, y = int(a[r, c]), int(b[r, c])
            if x == 255 or y == 255 or (gate is not None and np.isnan(gate[r, c])):
                continue
            i, j = idx[x], idx[y]
            if gate is not None and not gate[r, c] >= 0.5:
                j = i
            m[i, j] += row_area[r]
    return m


def test_matrix_equals_the_whole_array_computation_and_round_trips(tmp_path):
    p1, p2, a, b = _pair(tmp_path)
    res = transitions(p1, p2, tmp_path / "out", tile=48, progress=False)  # 48 px tiles: 12 tiles
    want = _expected(a, b, [0.01] * a.shape[0])
    np.testing.assert_allclose(res.matrix_ha, want, rtol=1e-12)
    valid = (a != 255) & (b != 255)
    assert res.matrix_ha.sum() == pytest.approx(valid.sum() * 0.01)  # sums to the mapped area
    assert res.matrix_px.sum() == valid.sum()
    csv = pd.read_csv(tmp_path / "out" / "transition_matrix.csv", index_col=0)
    assert csv.index.tolist() == TABLE.names and csv.columns.tolist() == TABLE.names
    np.testing.assert_allclose(csv.to_numpy(), want)
    # the raster decodes back to the matrix: code = from_index * K + to_index, nodata where either date is
    tif = tmp_path / "out" / "transitions.tif"
    assert validate_cog(tif)[0]
    with rasterio.open(tif) as ds:
        codes = ds.read(1)
        assert ds.dtypes[0] == "uint8" and ds.nodata == 255
        cmap = ds.colormap(1)
    assert ((codes == 255) == ~valid).all()
    back = np.bincount(codes[valid].ravel(), minlength=9).reshape(3, 3) * 0.01
    np.testing.assert_allclose(back, csv.to_numpy())
    # colours: unchanged grey, transitions in the destination class's colour; names in the PAM sidecar and tag
    assert cmap[0][:3] == (200, 200, 200) and cmap[4][:3] == (200, 200, 200)
    assert cmap[0 * 3 + 1][:3] == TABLE[1].rgb and cmap[1 * 3 + 2][:3] == TABLE[2].rgb
    names = read_category_names(tif)
    assert names[:4] == ["forest -> forest", "forest -> herbaceous", "forest -> water", "herbaceous -> forest"]
    assert names == transition_names(TABLE)
    info = read_transition_info(tif)
    assert info["table"] == TABLE and info["k"] == 3 and not info["gated"]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["dates"] == {"date1": "2019-06-01", "date2": "2023-06-01"}
    assert s["ungated"]["changed_ha"] == pytest.approx(want.sum() - np.trace(want))
    assert (tmp_path / "out" / MARKER).is_file()


def test_geographic_grid_uses_geodesic_pixel_areas(tmp_path):
    grid = GridSpec("EPSG:4326", from_origin(-62.0, -8.0, 0.001, 0.001), 70, 90)
    p1, p2, a, b = _pair(tmp_path, grid=grid, seed=2)
    res = transitions(p1, p2, tmp_path / "out", polygons=False, tile=32, progress=False)
    # exact area of each row's pixels on the WGS84 ellipsoid (authalic latitude-band formula), independent of
    # the code under test
    f = 1 / 298.257223563
    e2 = f * (2 - f)
    e = math.sqrt(e2)

    def q(lat):
        s = math.sin(math.radians(lat))
        return s / (1 - e2 * s * s) - math.log((1 - e * s) / (1 + e * s)) / (2 * e)

    row_area = [6378137.0 ** 2 * (1 - e2) / 2 * math.radians(0.001) * abs(q(-8 - 0.001 * r) - q(-8 - 0.001 * (r + 1)))
                / 1e4 for r in range(90)]
    want = _expected(a, b, row_area)
    np.testing.assert_allclose(res.matrix_ha, want, rtol=1e-7)
    valid = (a != 255) & (b != 255)
    assert res.mapped_ha == pytest.approx(sum(row_area[r] * valid[r].sum() for r in range(90)), rel=1e-7)
    assert res.mapped_ha != pytest.approx(valid.sum() * row_area[0], rel=1e-6)  # not a constant pixel area


def test_change_gating_suppresses_transitions_outside_detected_change(tmp_path):
    p1, p2, a, b = _pair(tmp_path)
    prob = np.zeros(UTM.shape, np.float32)
    prob[15:55, 25:95] = 0.9  # the detector finds the converted block only
    prob[80:, :10] = np.nan  # and has nodata there
    chg = write_cog(tmp_path / "change_prob.tif", prob, UTM)
    res = transitions(p1, p2, tmp_path / "out", change=chg, polygons=False, tile=64, progress=False)
    np.testing.assert_allclose(res.matrix_gated_ha, _expected(a, b, [0.01] * 100, gate=prob))
    np.testing.assert_allclose(res.matrix_ha, _expected(a, b, [0.01] * 100))
    with rasterio.open(tmp_path / "out" / "transitions.tif") as ds:
        raw = ds.read(1)
    with rasterio.open(tmp_path / "out" / "transitions_gated.tif") as ds:
        gated = ds.read(1)
        assert json.loads(ds.tags()["DINOV3GEO_TRANSITIONS"])["gated"] is True
    inside = prob >= 0.5
    frm, to = gated // 3, gated % 3
    ok = gated != 255
    assert (frm[ok & ~inside] == to[ok & ~inside]).all()  # no transition outside detected change
    assert (gated[inside] == raw[inside]).all()  # detected change keeps the maps' transitions
    assert (gated[np.isnan(prob)] == 255).all()  # detector nodata -> nodata
    off = res.matrix_ha.sum() - np.trace(res.matrix_ha)
    off_g = res.matrix_gated_ha.sum() - np.trace(res.matrix_gated_ha)
    assert off_g < off / 2  # the noise flips outside the block are gone
    s = res.summary
    assert s["gated"]["changed_ha"] == pytest.approx(off_g)
    valid_known = (raw != 255) & ~np.isnan(prob)
    assert s["gated"]["suppressed_ha"] == pytest.approx(((raw // 3 != raw % 3) & valid_known & ~inside).sum() * 0.01)
    assert pd.read_csv(tmp_path / "out" / "transition_matrix_gated.csv", index_col=0).to_numpy() == \
        pytest.approx(res.matrix_gated_ha)
    # a later run without --change removes the stale gated outputs of this folder
    transitions(p1, p2, tmp_path / "out", polygons=False, progress=False)
    assert not (tmp_path / "out" / "transitions_gated.tif").exists()
    assert not (tmp_path / "out" / "transition_matrix_gated.csv").exists()


def test_date2_on_another_grid_is_reprojected_with_nearest(tmp_path):
    p1, _, a, _ = _pair(tmp_path)
    coarse = GridSpec("EPSG:32633", from_origin(500000, 4000000, 20, 20), 75, 50)
    b = a[::2, ::2].copy()
    b[b == 255] = 1
    b[10:20, 10:30] = 5
    p2 = write_class_raster(tmp_path / "coarse.tif", b, coarse, TABLE)
    res = transitions(p1, p2, tmp_path / "out", polygons=False, progress=False)
    fine = np.repeat(np.repeat(b, 2, axis=0), 2, axis=1)  # each 20 m pixel covers 2 x 2 pixels of date 1
    np.testing.assert_allclose(res.matrix_ha, _expected(a, fine, [0.01] * 100))
    assert any("nearest-neighbour" in n for n in res.summary["notes"])


def test_polygons_carry_classes_areas_dates_confidence_and_respect_the_mmu(tmp_path):
    p1, p2, a, b = _pair(tmp_path, confidence=True)
    res = transitions(p1, p2, tmp_path / "out", mmu_ha=0.0, tile=40, progress=False)
    gdf = gpd.read_file(tmp_path / "out" / "transition_polygons.gpkg")
    assert {"from_class", "to_class", "transition", "area_ha", "n_pixels", "date1", "date2", "mean_confidence",
            "mmu_ha"} <= set(gdf.columns)
    assert set(gdf["date1"]) == {"2019-06-01"} and set(gdf["date2"]) == {"2023-06-01"}
    # with no MMU, every changed pixel is in exactly one polygon of its transition
    for (i, j), area in np.ndenumerate(res.matrix_ha):
        sel = gdf[(gdf["from_class"] == TABLE.names[i]) & (gdf["to_class"] == TABLE.names[j])]
        assert sel["area_ha"].sum() == pytest.approx(0.0 if i == j else area)
    # forest loss by driver is one query
    loss = gdf[gdf["from_class"] == "forest"].groupby("to_class")["area_ha"].sum()
    assert loss.to_dict() == pytest.approx({"herbaceous": res.matrix_ha[0, 1], "water": res.matrix_ha[0, 2]})
    # the largest region: forest -> herbaceous inside the converted block; its confidence by hand
    with rasterio.open(p1) as d1, rasterio.open(p2) as d2:
        c1, c2 = d1.read(2) / 100.0, d2.read(2) / 100.0
    big = gdf.iloc[0]
    assert big["n_pixels"] == int(big["area_ha"] / 0.01 + 0.5)
    from rasterio.features import rasterize

    inside = rasterize([(big.geometry, 1)], out_shape=UTM.shape, transform=UTM.transform).astype(bool)
    assert big["mean_confidence"] == pytest.approx(float((c1 * c2)[inside].mean()), rel=1e-6)
    # the MMU drops the small regions (the noise flips) but keeps the block
    res2 = transitions(p1, p2, tmp_path / "out2", mmu_ha=0.5, progress=False)
    g2 = gpd.read_file(tmp_path / "out2" / "transition_polygons.gpkg")
    assert (g2["area_ha"] >= 0.5).all() and 0 < len(g2) < len(gdf) and res2.n_polygons == len(g2)
    assert (g2["mmu_ha"] == 0.5).all()


def test_real_landsat_dates(tmp_path, shared_data):
    """Chiapas Landsat 7, 1999 and 2002 (20 % cloud in 2002, masked with its Fmask band)."""
    d = shared_data / "landcover" / "ogt_landsat7_chiapas_1999_2002"
    maps = []
    for name in ("LE70220491999322EDC01_stack.gtif", "LE70220492002106EDC00_stack.gtif"):
        with rasterio.open(d / name) as ds:
            red, nir, fmask = (ds.read(i).astype(float) for i in (3, 4, 8))
            grid = GridSpec.from_dataset(ds)
        ndvi = (nir - red) / np.maximum(nir + red, 1)
        cls = np.select([nir < 1200, ndvi > 0.6, ndvi > 0.45], [5, 1, 2], default=2).astype(np.uint8)
        cls[(fmask == 2) | (fmask == 4)] = 255
        maps.append((write_class_raster(tmp_path / f"lc{name[9:13]}.tif", cls, grid, TABLE), cls))
    res = transitions(maps[0][0], maps[1][0], tmp_path / "out", mmu_ha=0.45, tile=100, progress=False)
    a, b = maps[0][1], maps[1][1]
    valid = (a != 255) & (b != 255)
    assert 0.7 < valid.mean() < 0.9  # the 2002 clouds
    assert res.mapped_ha == pytest.approx(valid.sum() * 0.09)
    np.testing.assert_allclose(res.matrix_ha, _expected(a, b, [0.09] * a.shape[0]))
    gdf = gpd.read_file(tmp_path / "out" / "transition_polygons.gpkg")
    assert len(gdf) and (gdf["area_ha"] >= 0.45).all() and (gdf["from_class"] != gdf["to_class"]).all()


def test_transitions_get_honest_areas_from_a_sample_of_the_transition_raster(tmp_path):
    """Sample the transition raster by stratum, label the points with the true transition, estimate areas."""
    rng = np.random.default_rng(5)
    a = rng.choice(np.array(TABLE.codes, np.uint8), size=UTM.shape, p=[0.5, 0.3, 0.2])
    truth = a.copy()
    truth[20:50, 30:90] = 2
    b = truth.copy()
    flip = rng.random(UTM.shape) < 0.05
    b[flip] = rng.choice(np.array(TABLE.codes, np.uint8), size=int(flip.sum()))
    p1 = write_class_raster(tmp_path / "a.tif", a, UTM, TABLE)
    p2 = write_class_raster(tmp_path / "b.tif", b, UTM, TABLE)
    transitions(p1, p2, tmp_path / "out", polygons=False, progress=False)
    tif = tmp_path / "out" / "transitions.tif"
    pts = stratified_sample(tif, n_total=300, min_per_class=10, seed=2)
    assert set(pts["map_class"]) <= set(transition_names(TABLE))
    idx = TABLE.index_lut()
    true_code = idx[a] * 3 + idx[truth]
    names = transition_names(TABLE)
    pts["reference"] = [names[int(true_code[r, c])] for r, c in zip(pts["row"], pts["col"], strict=True)]
    est = assess_map(tif, pts)
    assert est.names == names and est.codes == list(range(9))
    want = np.zeros((9, 9), dtype=int)
    np.add.at(want, (pts["map_code"].to_numpy(), true_code[pts["row"], pts["col"]]), 1)
    assert est.counts.astype(int).tolist() == want.tolist()
    assert est.area_ha.sum() == pytest.approx(a.size * 0.01)
    # the noise flips are commission errors of the transition strata: their user's accuracy is low
    assert est.user[names.index("forest -> water")] < 0.5 < est.user[names.index("forest -> forest")]


def test_maps_without_class_tables(tmp_path, make_raster):
    _, _, a, b = _pair(tmp_path)
    kw = {"crs": UTM.crs, "transform": UTM.transform, "nodata": 255}
    q1, q2 = make_raster("plain1.tif", a, **kw), make_raster("plain2.tif", b, **kw)
    res = transitions(q1, q2, tmp_path / "o1", polygons=False, progress=False)
    assert res.table.codes == TABLE.codes and res.table.names == ["class_1", "class_2", "class_5"]
    assert any("neither map has a class table" in n for n in res.summary["notes"])
    np.testing.assert_allclose(res.matrix_ha, _expected(a, b, [0.01] * 100))
    p1 = write_class_raster(tmp_path / "with.tif", a, UTM, TABLE)
    res = transitions(p1, q2, tmp_path / "o2", polygons=False, progress=False)  # the other map's table is used
    assert res.table == TABLE and any("plain2.tif" in n for n in res.summary["notes"])


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_bad_inputs_give_one_line_errors_naming_both_files(tmp_path):
    p1, p2, a, b = _pair(tmp_path)
    other = ClassTable([LandClass(1, "forest", "#006400"), LandClass(2, "grass", "#ffff4c"),
                        LandClass(5, "water", "#0064c8")])
    p3 = write_class_raster(tmp_path / "other.tif", b, UTM, other)
    with pytest.raises(TransitionError, match=r"lc_2019-06-01\.tif.*other\.tif.*different class tables") as ei:
        transitions(p1, p3, tmp_path / "out", progress=False)
    assert "\n" not in str(ei.value)
    far = GridSpec("EPSG:32633", from_origin(900000, 4000000, 10, 10), 150, 100)
    p4 = write_class_raster(tmp_path / "far.tif", b, far, TABLE)
    with pytest.raises(TransitionError, match=r"lc_2019-06-01\.tif.*far\.tif.*do not overlap"):
        transitions(p1, p4, tmp_path / "out", progress=False)
    bad = b.copy()
    bad[5, 5] = 7
    with rasterio.open(p2) as ds:
        prof = ds.profile
    prof.update(driver="GTiff")
    p5 = tmp_path / "codes.tif"
    keys = ("driver", "width", "height", "count", "dtype", "crs", "transform", "nodata")
    with rasterio.open(p5, "w", **{k: v for k, v in prof.items() if k in keys}) as ds:
        ds.write(np.stack([bad] + [np.zeros_like(bad)] * (prof["count"] - 1)))
    with pytest.raises(TransitionError, match=r"codes\.tif.*holds codes \[7\].*class table lacks"):
        transitions(p1, p5, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # nothing created by a failed run


def test_output_folder_refused_when_it_is_an_input_or_foreign(tmp_path):
    p1, p2, _, _ = _pair(tmp_path)
    before = {p.name: _sha(p) for p in (p1, p2)}
    with pytest.raises(OutputConflictError, match="it is the input"):
        transitions(p1, p2, p1, progress=False)
    with pytest.raises(OutputConflictError, match="did not create"):
        transitions(p1, p2, tmp_path, progress=False)  # the user's folder holding the maps
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "transitions.tif").write_bytes(b"my own file")
    with pytest.raises(OutputConflictError, match="did not create"):
        transitions(p1, p2, foreign, progress=False)
    assert (foreign / "transitions.tif").read_bytes() == b"my own file"
    assert {p.name: _sha(p) for p in (p1, p2)} == before
