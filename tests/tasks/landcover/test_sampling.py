"""Stratified random reference samples: allocation (Olofsson et al. 2014), strata respected, determinism,
uniform inclusion within a stratum, windowed reading, bad sizes and the output guard."""

from __future__ import annotations

import hashlib

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from dinov3geo.io.grid import GridSpec
from dinov3geo.tasks.landcover.accuracy import AccuracyWarning
from dinov3geo.tasks.landcover.classes import ClassTable, LandClass, write_class_raster
from dinov3geo.tasks.landcover.sampling import SampleSizeError, allocate, stratified_sample
from dinov3geo.utils.outputs import OutputConflictError

TABLE = ClassTable([LandClass(1, "forest", "#006400"), LandClass(2, "herbaceous", "#ffff4c"),
                    LandClass(3, "water", "#0064c8"), LandClass(9, "urban", "#fa0000")])


def _map(tmp_path, counts=(3000, 600, 80, 12), width=61, seed=0, name="map.tif"):
    """A class map with the given pixel count per class (TABLE order) plus some nodata."""
    vals = np.concatenate([np.full(n, c, np.uint8) for n, c in zip(counts, TABLE.codes, strict=True)])
    total = -(-(len(vals) + 40) // width) * width
    vals = np.concatenate([vals, np.full(total - len(vals), 255, np.uint8)])
    arr = np.random.default_rng(seed).permutation(vals).reshape(-1, width)
    grid = GridSpec("EPSG:32633", from_origin(500000, 4000000, 10, 10), width, arr.shape[0])
    return write_class_raster(tmp_path / name, arr, grid, TABLE), arr, grid


def test_allocation_follows_olofsson_2014():
    # section 5.1.1 / Table 5: weights 0.020, 0.015, 0.320, 0.645 and n = 641
    w = [0.020, 0.015, 0.320, 0.645]
    assert allocate(w, 641, min_per_class=1) == [13, 10, 205, 413]  # proportional allocation
    # "allocate 100 to each rare class, the remainder proportionally to the stable classes": 441 * 0.32 / 0.965
    assert allocate(w, 641, min_per_class=100) == [100, 100, 146, 295]
    # a stratum with fewer pixels than its minimum gives all of them; the rest stays proportional
    assert allocate([1000, 50, 10], 200, min_per_class=50, available=[1000, 50, 10]) == [140, 50, 10]
    with pytest.raises(SampleSizeError, match=r"minimum of 50 units \(150 needed\).*--n"):
        allocate([5, 3, 2], 120)


def test_sample_is_stratified_deterministic_and_on_its_pixels(tmp_path):
    path, arr, grid = _map(tmp_path)
    out = tmp_path / "pts.gpkg"
    gdf = stratified_sample(path, out, n_total=300, min_per_class=50, seed=7)
    pixels = [int((arr == c).sum()) for c in TABLE.codes]
    want = allocate(pixels, 300, min_per_class=50, available=pixels)
    assert want == [188, 50, 50, 12]  # urban has only 12 pixels: all of them
    got = gdf["map_code"].value_counts().reindex(TABLE.codes, fill_value=0).tolist()
    assert got == want
    back = gpd.read_file(out)
    assert len(back) == 300 and back.crs == grid.crs and (back["reference"].fillna("") == "").all()
    assert set(back.columns) >= {"id", "map_code", "map_class", "reference", "x", "y", "row", "col"}
    # each point is the centre of a distinct pixel of its class
    with rasterio.open(path) as ds:
        vals = np.array([v[0] for v in ds.sample(zip(back["x"], back["y"], strict=True))])
    assert (vals == back["map_code"].to_numpy()).all()
    assert (arr[back["row"], back["col"]] == back["map_code"]).all()
    assert len({(r, c) for r, c in zip(back["row"], back["col"], strict=True)}) == 300
    np.testing.assert_allclose(back["x"], 500000 + 10 * back["col"] + 5)
    np.testing.assert_allclose(back.geometry.y, 4000000 - 10 * back["row"] - 5)
    assert (back["map_class"] == back["map_code"].map(dict(zip(TABLE.codes, TABLE.names, strict=True)))).all()
    # the same seed gives the same points whatever the strip size; another seed gives others
    again = stratified_sample(path, n_total=300, min_per_class=50, seed=7, window=8)
    assert again.drop(columns="geometry").equals(gdf.drop(columns="geometry"))
    other = stratified_sample(path, n_total=300, min_per_class=50, seed=8)
    assert set(zip(other["row"], other["col"], strict=True)) != set(zip(gdf["row"], gdf["col"], strict=True))


def test_every_pixel_of_a_stratum_is_equally_likely(tmp_path):
    arr = np.full((8, 8), 1, dtype=np.uint8)
    arr[:, :2] = 2  # a second stratum, so ranks must be counted per class across strips
    grid = GridSpec("EPSG:32633", from_origin(0, 80, 10, 10), 8, 8)
    path = write_class_raster(tmp_path / "m.tif", arr, grid, ClassTable.from_labels([1, 2]))
    hits = np.zeros((8, 8), dtype=int)
    for seed in range(100):
        g = stratified_sample(path, n_per_class={1: 24, 2: 8}, seed=seed, window=3)
        np.add.at(hits, (g["row"].to_numpy(), g["col"].to_numpy()), 1)
    p1, p2 = 24 / 48, 8 / 16
    for mask, p in ((arr == 1, p1), (arr == 2, p2)):
        sd = np.sqrt(100 * p * (1 - p))
        assert (np.abs(hits[mask] - 100 * p) < 4.5 * sd).all()
        assert hits[mask].min() > 0
    assert hits[arr == 1].sum() == 100 * 24 and hits[arr == 2].sum() == 100 * 8


def test_per_class_sizes_and_small_samples(tmp_path):
    path, arr, _ = _map(tmp_path)
    with pytest.warns(AccuracyWarning, match="urban"):
        g = stratified_sample(path, n_per_class=20, seed=1)
    assert g["map_code"].value_counts().reindex(TABLE.codes).tolist() == [20, 20, 20, 12]
    g = stratified_sample(path, n_per_class={"water": 5, 1: 30}, min_per_class=10, seed=1)
    assert g["map_code"].value_counts().reindex(TABLE.codes).tolist() == [30, 10, 5, 10]
    with pytest.raises(SampleSizeError, match="'grass', which the map does not have"):
        stratified_sample(path, n_per_class={"grass": 5})
    with pytest.raises(SampleSizeError, match=r"sample of 100 cannot give each of the 4 mapped classes"):
        stratified_sample(path, n_total=100, min_per_class=50)


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_output_guard_keeps_the_map_and_labelled_samples(tmp_path):
    path, _, _ = _map(tmp_path)
    before = _sha(path)
    with pytest.raises(OutputConflictError, match="it is the input"):
        stratified_sample(path, path, n_total=200, min_per_class=10)
    assert _sha(path) == before
    out = tmp_path / "pts.gpkg"
    g = stratified_sample(path, out, n_total=100, min_per_class=10, seed=1)
    stratified_sample(path, out, n_total=100, min_per_class=10, seed=2)  # an unlabelled sample: replaced
    assert not gpd.read_file(out)["row"].equals(g["row"])
    g = gpd.read_file(out)
    g.loc[:2, "reference"] = "forest"  # three points labelled by the interpreter
    g.to_file(out)
    labelled = _sha(out)
    with pytest.raises(OutputConflictError, match="labelled point"):
        stratified_sample(path, out, n_total=100, min_per_class=10, seed=3)
    assert _sha(out) == labelled
    mine = tmp_path / "plots.gpkg"
    gpd.GeoDataFrame({"plot": [1]}, geometry=gpd.points_from_xy([500005], [3999995]), crs="EPSG:32633").to_file(mine)
    kept = _sha(mine)
    with pytest.raises(OutputConflictError, match="not a dinov3geo sample"):
        stratified_sample(path, mine, n_total=100, min_per_class=10)
    assert _sha(mine) == kept
