"""Land-cover labels on the real Chiapas scene: polygons and class rasters of any CRS, bad inputs, polygon splits."""

from __future__ import annotations

import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.warp import Resampling, calculate_default_transform, reproject

from dinov3geo.io.sources import open_scene
from dinov3geo.tasks.canopy.splits import block_split
from dinov3geo.tasks.landcover.classes import ClassTable, LandClass
from dinov3geo.tasks.landcover.labels import LabelError, load_labels, split_by_polygon

CHIAPAS = "landcover/ogt_landsat7_chiapas_1999_2002"
IMAGE = "LE70220491999322EDC01_stack.gtif"


@pytest.fixture(scope="module")
def chiapas(shared_data: Path) -> Path:
    return shared_data / CHIAPAS


@pytest.fixture(scope="module")
def grid(chiapas: Path):
    return open_scene(chiapas / IMAGE).grid


def test_polygons_names_to_classes_on_the_image_grid(chiapas: Path, grid) -> None:
    lr = load_labels(chiapas / "training_data.shp", grid)
    assert lr.table.names == ["barren", "forest", "herbaceous", "urban", "water"]
    assert lr.info["column"] == "class" and lr.info["n_polygons"] == 30
    # the shapefile's `id` column does not map one-to-one onto `class` (ids 4 and 5 are swapped in two
    # polygons), so the names are numbered alphabetically rather than taking wrong codes from it
    assert lr.info["code_column"] is None and lr.table.codes == [1, 2, 3, 4, 5]
    c = lr.counts()
    assert sum(c.values()) == 718 and c["forest"] == 383 and c["water"] == 16
    # the author's own rasterisation of these polygons labels the same 718 pixels
    with rasterio.open(chiapas / "training_data.gtif") as ds:
        orig = ds.read(1)
    assert np.array_equal(lr.labelled, orig != 0)
    assert lr.polygons[lr.labelled].min() >= 1 and (lr.polygons[~lr.labelled] == 0).all()
    assert len(np.unique(lr.polygons[lr.labelled])) == 30


def test_polygons_in_another_crs_and_the_class_raster_in_another_crs(chiapas: Path, grid, tmp_path: Path) -> None:
    ref = load_labels(chiapas / "training_data.shp", grid)
    gj = tmp_path / "labels_4326.geojson"
    g = gpd.read_file(chiapas / "training_data.shp").drop(columns=["id"])  # (GeoJSON would take `id` as feature id)
    g.to_crs("EPSG:4326").to_file(gj, driver="GeoJSON")
    lr = load_labels(gj, grid)
    assert lr.table == ref.table
    same = (lr.codes() == ref.codes()).mean()
    assert same > 0.999, same  # reprojection round trip: a few edge pixels at most
    # the derived class raster warped to EPSG:4326 (nearest) in a temporary folder, then read back onto the
    # UTM image grid: reprojected, not refused
    src = chiapas / "landcover_labels_idx.tif"
    warped = tmp_path / "labels_4326.tif"
    with rasterio.open(src) as ds:
        t, w, h = calculate_default_transform(ds.crs, "EPSG:4326", ds.width, ds.height, *ds.bounds)
        dst = np.full((h, w), 255, np.uint8)
        reproject(ds.read(1), dst, src_transform=ds.transform, src_crs=ds.crs, dst_transform=t,
                  dst_crs="EPSG:4326", src_nodata=255, dst_nodata=255, resampling=Resampling.nearest)
        orig = ds.read(1)
    with rasterio.open(warped, "w", driver="GTiff", width=w, height=h, count=1, dtype="uint8", crs="EPSG:4326",
                       transform=t, nodata=255) as ds:
        ds.write(dst[None])
    back = load_labels(warped, grid)
    assert back.info["reprojected"] is True and back.table.codes == [0, 1, 2, 3, 4]
    both = (back.index != 255) & (orig != 255)
    assert both.sum() > 600
    assert (back.codes()[both] == orig[both]).mean() > 0.97
    assert abs(int((back.index != 255).sum()) - 718) < 60
    # class-raster patches give split ids (8-connected patches of one class)
    assert back.polygons[back.labelled].min() >= 1


def test_original_raster_with_an_ignore_value(chiapas: Path, grid) -> None:
    lr = load_labels(chiapas / "training_data.gtif", grid, ignore=[0])
    assert lr.table.codes == [1, 2, 3, 4, 5] and sum(lr.counts().values()) == 718
    assert lr.info["ignore"] == [0, 255]


def test_missing_class_column_lists_the_columns(chiapas: Path, grid, tmp_path: Path) -> None:
    g = gpd.read_file(chiapas / "training_data.shp").rename(columns={"class": "cover_name", "id": "fid_x"})
    p = tmp_path / "nocol.gpkg"
    g.to_file(p, driver="GPKG")
    with pytest.raises(LabelError, match=r"nocol\.gpkg.*no class column.*fid_x, cover_name.*--column"):
        load_labels(p, grid)
    with pytest.raises(LabelError, match=r"has no column 'klass'.*cover_name"):
        load_labels(p, grid, column="klass")
    lr = load_labels(p, grid, column="cover_name")
    assert len(lr.table) == 5


def test_labels_outside_the_image_name_both_bounds(chiapas: Path, grid, tmp_path: Path) -> None:
    g = gpd.read_file(chiapas / "training_data.shp")
    g["geometry"] = g.geometry.translate(xoff=100_000)
    p = tmp_path / "far.gpkg"
    g.to_file(p, driver="GPKG")
    with pytest.raises(LabelError, match=r"far\.gpkg.*entirely outside the image.*label bounds \(5.*image bounds "
                       r"\(462405.*EPSG:32615"):
        load_labels(p, grid)


def test_single_class_and_absent_classes(chiapas: Path, grid, tmp_path: Path) -> None:
    g = gpd.read_file(chiapas / "training_data.shp")
    one = tmp_path / "forest_only.gpkg"
    g[g["class"] == "forest"].to_file(one, driver="GPKG")
    with pytest.raises(LabelError, match=r"forest_only\.gpkg.*only 1 class \('forest'\).*at least 2"):
        load_labels(one, grid)
    # water polygons moved out of the scene: water is dropped from the table with a warning naming it
    moved = g.copy()
    water = moved["class"] == "water"
    moved.loc[water, "geometry"] = moved.loc[water, "geometry"].translate(xoff=50_000)
    p = tmp_path / "no_water.gpkg"
    moved.to_file(p, driver="GPKG")
    with pytest.warns(UserWarning, match=r"\['water'\] have no labelled pixel inside the image extent"):
        lr = load_labels(p, grid)
    assert lr.table.names == ["barren", "forest", "herbaceous", "urban"]
    assert lr.info["dropped_classes"] == ["water"]


def test_unknown_codes_against_a_given_table(chiapas: Path, grid, tmp_path: Path) -> None:
    table = ClassTable([LandClass(1, "forest", "#006400"), LandClass(2, "water", "#0064c8")])
    g = gpd.read_file(chiapas / "training_data.shp")
    g["code"] = g["id"]  # codes 1..5, of which 3, 4, 5 are unknown to the table
    p = tmp_path / "codes.gpkg"
    g[["code", "geometry"]].to_file(p, driver="GPKG")
    with pytest.raises(LabelError, match=r"codes\.gpkg.*class codes \[3, 4, 5\] are not in the model's class table"):
        load_labels(p, grid, column="code", table=table)
    with pytest.raises(LabelError, match=r"class names \['barren', 'herbaceous', 'urban'\]"):
        load_labels(chiapas / "training_data.shp", grid, table=table)
    with pytest.raises(LabelError, match=r"class codes \[0, 2, 3, 4\] are not in the class table"):
        load_labels(chiapas / "landcover_labels_idx.tif", grid,
                    table=ClassTable([LandClass(1, "water", "#0064c8"), LandClass(7, "x", "#000000")]))


def test_overlapping_polygons_of_different_classes_are_left_unlabelled(chiapas: Path, grid, tmp_path: Path) -> None:
    g = gpd.read_file(chiapas / "training_data.shp")
    forest = g[g["class"] == "forest"].iloc[[0]].copy()
    forest["class"] = "urban"  # the same polygon once more, as another class
    p = tmp_path / "overlap.gpkg"
    gpd.GeoDataFrame(pd_concat([g, forest]), crs=g.crs).to_file(p, driver="GPKG")
    ref = load_labels(chiapas / "training_data.shp", grid)
    with pytest.warns(UserWarning, match="polygons of different classes were left unlabelled"):
        lr = load_labels(p, grid)
    n = lr.info["conflicting_pixels"]
    assert n > 10 and int(ref.labelled.sum()) - int(lr.labelled.sum()) == n


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def _chebyshev_min(a: np.ndarray, b: np.ndarray) -> int:
    ra, ca = np.nonzero(a)
    rb, cb = np.nonzero(b)
    if not ra.size or not rb.size:
        return 10**9
    d = np.maximum(np.abs(ra[:, None] - rb[None, :]), np.abs(ca[:, None] - cb[None, :]))
    return int(d.min())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_by_polygon_never_leaks(chiapas: Path, grid, seed: int) -> None:
    lr = load_labels(chiapas / "training_data.shp", grid)
    buffer = 4
    sp = block_split(grid.shape, block=25, fractions={"train": 0.6, "val": 0.2, "test": 0.2}, buffer=buffer,
                     seed=seed)
    # with 25 px blocks, some polygons straddle block boundaries: the case this must handle
    blocks = sp.labels()
    straddle = [p for p in np.unique(lr.polygons[lr.labelled]) if len(np.unique(blocks[lr.polygons == p])) > 1]
    assert straddle
    ps = split_by_polygon(lr, sp)
    names = list(sp.names)
    owner = np.full(lr.index.shape, -1)
    for k, n in enumerate(names):
        assert not (owner[ps.masks[n]] >= 0).any()  # a pixel is in one split at most
        owner[ps.masks[n]] = k
    assert (owner[~lr.labelled] == -1).all()
    # no polygon has pixels in two splits
    for p in np.unique(lr.polygons[lr.labelled]):
        held = np.unique(owner[(lr.polygons == p) & (owner >= 0)])
        assert len(held) <= 1, (p, held)
    # no pixel of one split lies within the buffer of a pixel of another (brute force over all pairs)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert _chebyshev_min(ps.masks[names[i]], ps.masks[names[j]]) > buffer
    assert set(ps.polygon_split.values()) <= set(names)
    assert sum(ps.counts().values()) + sum(ps.dropped.values()) == int(lr.labelled.sum())
    # the buffer removed pixels only from the lower-priority side: test keeps every pixel of its polygons
    assert ps.dropped["test"] == 0


def test_split_priorities_drop_train_pixels_next_to_test() -> None:
    from dinov3geo.io.grid import GridSpec
    from dinov3geo.tasks.landcover.labels import LabelRaster

    index = np.full((10, 20), 255, np.uint8)
    pids = np.zeros((10, 20), np.int32)
    index[2:8, 2:9], pids[2:8, 2:9] = 0, 1  # polygon 1 in the left block (train)
    index[2:8, 11:18], pids[2:8, 11:18] = 1, 2  # polygon 2 in the right block (test)
    t = ClassTable([LandClass(0, "a", "#000000"), LandClass(1, "b", "#ffffff")])
    g = GridSpec("EPSG:32615", rasterio.transform.from_origin(0, 100, 10, 10), 20, 10)
    lr = LabelRaster(index, pids, t, g, "synthetic")
    from dinov3geo.tasks.canopy.splits import SpatialSplit

    sp = SpatialSplit(10, 20, 10, 3, ("train", "test"), np.array([[0, 1]], np.int32))
    ps = split_by_polygon(lr, sp)
    assert ps.masks["test"].sum() == 42 and ps.dropped["test"] == 0
    # train columns 8 (distance 3 from column 11) is dropped; columns 2..7 kept
    assert ps.masks["train"][2:8, 2:8].all() and not ps.masks["train"][:, 8:].any()
    assert ps.polygon_split == {1: "train", 2: "test"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ps.to_dict()["polygons"] == {"train": [1], "test": [2]}
