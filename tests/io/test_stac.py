"""STAC Items next to every product and a Collection per pipeline run, validated offline with pystac.

Validation uses pystac's ``JsonSchemaSTACValidator`` with the STAC core schemas pystac ships and the published
projection/raster/file extension schemas kept in ``tests/data/stac_schemas`` (no network: a schema that is not
there fails validation instead of being downloaded).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import yaml
from pystac.errors import STACValidationError
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from shapely.geometry import Point, Polygon, shape

from dinov3geo.cli import main as cli_main
from dinov3geo.io.cog import write_cog
from dinov3geo.io.grid import GridSpec
from dinov3geo.io.stac import (
    EXT_FILE,
    EXT_PROJECTION,
    EXT_RASTER,
    describable,
    describe_product,
    item_path,
    offline_validator,
    validate_file,
    write_collection,
    write_item,
)
from dinov3geo.pipelines import load_pipeline, run_pipeline
from dinov3geo.utils.outputs import OutputConflictError

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "tests" / "data" / "stac_schemas"
CHM = ROOT / "data" / "neon_bart_2019" / "NEON_D01_BART_DP3_320000_4881000_CHM_crop.tif"
NEON = ROOT / "data" / "neon_bart_2019" / "2019_BART_5_320000_4881000_image_crop.tif"
PUC = ROOT / "data" / "pucallpa"
NAMES = ["swir16", "nir", "red", "green"]
CORE_ITEM = "https://schemas.stacspec.org/v1.1.0/item-spec/json-schema/item.json"
CORE_COLLECTION = "https://schemas.stacspec.org/v1.1.0/collection-spec/json-schema/collection.json"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation must never fetch a schema."""

    original = pystac.stac_io.DefaultStacIO.read_text

    def local_only(self, source, *a, **k):  # noqa: ANN001
        if "://" in str(source):
            raise AssertionError(f"tried to fetch {source}")
        return original(self, source, *a, **k)

    monkeypatch.setattr(pystac.stac_io.DefaultStacIO, "read_text", local_only)


@pytest.fixture
def canopy_map(tmp_path: Path) -> Path:
    """A 2-band canopy-height COG written like ``canopy predict``'s, from the real NEON lidar CHM."""
    with rasterio.open(CHM) as src:
        h = src.read(1, masked=True).astype("float32").filled(np.nan)
        grid = GridSpec(src.crs, src.transform, src.width, src.height)
    std = np.where(np.isfinite(h), 0.5 + 0.1 * np.nan_to_num(h), np.nan).astype("float32")
    return write_cog(tmp_path / "canopy_height.tif", np.stack([h, std]), grid, band_names=["height", "height_std"],
                     nodata=float("nan"), tags={"UNITS": "metre", "PRODUCT": "canopy height (dinov3geo)"})


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    from dinov3geo.models import build_backbone, save_backbone

    return save_backbone(build_backbone("vit_tiny_test"), tmp_path / "backbone.pth")


def test_cog_item_describes_the_map_and_validates_offline(canopy_map: Path, model_file: Path) -> None:
    before = _sha(canopy_map)
    item = write_item(canopy_map, inputs=[CHM], model=model_file, datetime="2019-08-25",
                      extra_properties={"dinov3geo:stage": "canopy_map"})
    assert item == canopy_map.with_name("canopy_height.tif.stac.json")
    assert validate_file(item, SCHEMAS) == [CORE_ITEM, EXT_PROJECTION, EXT_RASTER, EXT_FILE]
    it = pystac.Item.from_file(str(item))
    assert it.validate(validator=offline_validator(SCHEMAS))
    d = json.loads(item.read_text())
    pr, asset = d["properties"], d["assets"]["data"]
    # what and where, against the file itself
    with rasterio.open(canopy_map) as src:
        crs, tr, shape_, bounds = src.crs, src.transform, (src.height, src.width), src.bounds
        h = src.read(1, masked=True)
    assert pr["proj:code"] == f"EPSG:{crs.to_epsg()}"
    assert pr["proj:shape"] == list(shape_) and pr["proj:transform"] == list(tr)[:6]
    assert d["bbox"] == pytest.approx(list(transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)), abs=1e-6)
    foot = shape(d["geometry"])  # the raster's outline in WGS 84: its 4 reprojected corners, in order
    xs, ys = [bounds.left, bounds.right, bounds.right, bounds.left], [bounds.bottom, bounds.bottom, bounds.top,
                                                                        bounds.top]
    lon, lat = rasterio.warp.transform(crs, "EPSG:4326", xs, ys)
    corners = [Point(a, b) for a, b in zip(lon, lat, strict=True)]
    assert all(foot.exterior.distance(c) < 1e-6 for c in corners)
    assert foot.area == pytest.approx(Polygon(list(zip(lon, lat, strict=True))).area, rel=1e-3)
    assert asset["href"] == "./canopy_height.tif" and "cloud-optimized" in asset["type"]
    assert asset["file:size"] == canopy_map.stat().st_size
    assert asset["file:checksum"] == "1220" + _sha(canopy_map)
    b1, b2 = asset["raster:bands"]
    assert (b1["name"], b2["name"]) == ("height", "height_std")
    assert b1["unit"] == "m" and b1["nodata"] == "nan" and b1["data_type"] == "float32"
    assert b1["statistics"]["maximum"] == pytest.approx(float(h.max()), rel=1e-5)
    assert b1["spatial_resolution"] == pytest.approx(abs(tr.a))
    # when and how
    assert pr["datetime"] == "2019-08-25T00:00:00Z" and pr["dinov3geo:datetime_source"] == "argument"
    assert pr["dinov3geo:model"] == {"path": str(model_file), "size": model_file.stat().st_size,
                                     "sha256": _sha(model_file)}
    assert pr["dinov3geo:inputs"] == [{"path": str(CHM), "size": CHM.stat().st_size, "sha256": _sha(CHM)}]
    assert pr["dinov3geo:stage"] == "canopy_map" and pr["dinov3geo:version"]
    assert pr["dinov3geo:metadata"]["UNITS"] == "metre"
    assert _sha(canopy_map) == before  # the product is never touched


def test_validation_is_strict_and_never_downloads(canopy_map: Path, tmp_path: Path) -> None:
    item = describe_product(canopy_map, datetime=("2000", "2020-06-30"))
    d = json.loads(item.read_text())
    assert d["properties"]["datetime"] is None
    assert (d["properties"]["start_datetime"], d["properties"]["end_datetime"]) == ("2000-01-01T00:00:00Z",
                                                                                 "2020-06-30T00:00:00Z")
    bad = tmp_path / "bad.json"
    for where, mutate in {
        "file:checksum": lambda x: x["assets"]["data"].update({"file:checksum": "not-hex"}),
        "proj:shape": lambda x: x["properties"].update({"proj:shape": [1]}),
        "raster:bands": lambda x: x["assets"]["data"]["raster:bands"][0].update({"data_type": "float33"}),
        "bbox": lambda x: x.pop("bbox"),
    }.items():
        x = json.loads(item.read_text())
        mutate(x)
        bad.write_text(json.dumps(x))
        with pytest.raises(STACValidationError):
            validate_file(bad, SCHEMAS)
        assert where  # each extension's schema is really applied
    # a raster without georeferencing (a LEVIR-CD-like PNG pair turned GeoTIFF) is described without a footprint
    with rasterio.open(canopy_map) as src:
        arr = src.read(1)
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", width=arr.shape[1], height=arr.shape[0], count=1,
                       dtype="float32") as ds:
        ds.write(arr, 1)
    p = json.loads(describe_product(plain).read_text())
    assert p["geometry"] is None and "bbox" not in p and "proj:code" not in p["properties"]
    assert validate_file(item_path(plain), SCHEMAS)[0] == CORE_ITEM
    # a schema found neither in the folder nor among pystac's own extension schemas fails, never downloaded
    # (the _no_network fixture turns a fetch into an AssertionError, which the match below would reject)
    unknown = "https://stac-extensions.github.io/no-such-extension/v9.9.9/schema.json"
    x = json.loads(item.read_text())
    x["stac_extensions"].insert(0, unknown)  # validated first: the error names it on any pystac
    bad.write_text(json.dumps(x))
    empty = tmp_path / "no_schemas"
    empty.mkdir()
    for folder in (SCHEMAS, empty):
        with pytest.raises(Exception, match="no-such-extension/v9.9.9/schema.json") as e:
            validate_file(bad, folder)
        assert "not available offline" in str(e.value.__cause__ or e.value)
    # the folder's schema is the one applied, whichever pystac (>= 1.16 ships its own copies): a stricter
    # projection schema there rejects the item that the published one accepts
    strict = tmp_path / "strict_schemas"
    shutil.copytree(SCHEMAS, strict)
    proj = strict / "projection" / "v2.0.0" / "schema.json"
    sch = json.loads(proj.read_text())
    sch["required"] = [*sch.get("required", []), "dinov3geo:not-there"]
    proj.write_text(json.dumps(sch))
    assert validate_file(item, SCHEMAS)[1] == EXT_PROJECTION
    with pytest.raises(STACValidationError, match="projection/v2.0.0/schema.json"):
        validate_file(item, strict)


def test_an_item_dinov3geo_did_not_write_is_never_replaced(canopy_map: Path, tmp_path: Path) -> None:
    mine = item_path(canopy_map)
    mine.write_text('{"note": "my own catalogue entry"}\n')
    with pytest.raises(OutputConflictError, match="did not write") as e:
        describe_product(canopy_map)
    assert str(mine) in str(e.value) and "\n" not in str(e.value)
    assert mine.read_text() == '{"note": "my own catalogue entry"}\n'
    mine.unlink()
    # the Item path may not be an input, nor a folder
    with pytest.raises(OutputConflictError, match="input"):
        describe_product(canopy_map, inputs=[item_path(canopy_map)])
    item_path(canopy_map).mkdir()
    with pytest.raises(OutputConflictError, match="folder"):
        describe_product(canopy_map)
    assert not any(item_path(canopy_map).iterdir())
    # a missing product and an unknown kind: one line naming the file
    with pytest.raises(Exception, match="does not exist") as e:
        describe_product(tmp_path / "nope.tif")
    assert "nope.tif" in str(e.value)
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with pytest.raises(ValueError, match="notes.txt"):
        describe_product(notes)


def test_geopackage_and_feature_store_items(tmp_path: Path, model_file: Path) -> None:
    import geopandas as gpd
    from rasterio.features import shapes

    from dinov3geo.tasks.features import extract_features

    # polygons of the real Pucallpa 2000 composite's bright (cleared) areas, in its CRS (EPSG:4326)
    with rasterio.open(PUC / "pucallpa_2000.tif") as src:
        win = Window(380, 230, 160, 96)
        red = src.read(3, window=win)
        crs, tr = src.crs, src.window_transform(win)
    polys = [shape(g) for g, v in shapes((red > np.percentile(red, 90)).astype("uint8"), transform=tr) if v == 1]
    gpkg = tmp_path / "cleared.gpkg"
    gpd.GeoDataFrame({"id": range(len(polys))}, geometry=polys, crs=crs).to_file(gpkg, layer="cleared")
    item = describe_product(gpkg, inputs=[PUC / "pucallpa_2000.tif"], datetime="2000-08-01")
    assert validate_file(item, SCHEMAS) == [CORE_ITEM, EXT_PROJECTION, EXT_FILE]
    d = json.loads(item.read_text())
    assert d["assets"]["data"]["type"] == "application/geopackage+sqlite3"
    assert d["properties"]["dinov3geo:layers"] == [{"name": "cleared", "geometry_type": "Polygon",
                                                    "features": len(polys), "fields": ["id"]}]
    b = gpd.read_file(gpkg).total_bounds
    assert d["bbox"] == pytest.approx(list(b), abs=1e-6) and d["properties"]["proj:code"] == "EPSG:4326"

    # a feature store made by the real extractor (tiny ViT) on a crop of the NEON image
    crop = tmp_path / "neon.tif"
    with rasterio.open(NEON) as src:
        win = Window(0, 0, 128, 128)
        arr, prof = src.read(window=win), src.profile
    prof.update(width=128, height=128, transform=src.window_transform(win))
    for k in ("blockxsize", "blockysize", "tiled", "compress", "interleave"):
        prof.pop(k, None)
    with rasterio.open(crop, "w", **prof) as out:
        out.write(arr)
    res = extract_features(crop, tmp_path / "feats.zarr", weights=model_file, arch="vit_tiny_test", window=128,
                           progress=False, pca=False)
    assert describable(res.zarr)
    item = describe_product(res.zarr, inputs=[crop], model=model_file)
    assert item.name == "feats.zarr.stac.json"
    assert validate_file(item, SCHEMAS) == [CORE_ITEM, EXT_PROJECTION, EXT_RASTER, EXT_FILE]
    d = json.loads(item.read_text())
    asset = d["assets"]["data"]
    assert asset["type"] == "application/vnd+zarr" and asset["href"] == "./feats.zarr"
    import xarray as xr

    ds = xr.open_zarr(res.zarr, consolidated=False)
    assert [b["name"] for b in asset["raster:bands"]] == [str(v) for v in ds["feature"].values]
    assert d["properties"]["proj:shape"] == list(ds["features"].shape[1:])
    assert d["properties"]["proj:code"] == "EPSG:32619"
    assert asset["file:size"] == sum(f.stat().st_size for f in res.zarr.rglob("*") if f.is_file())
    assert d["properties"]["dinov3geo:model"]["sha256"] == _sha(model_file)


def test_collection_links_items_and_is_rewritten_only_when_it_changes(canopy_map: Path, tmp_path: Path) -> None:
    a = describe_product(canopy_map, datetime="2019-08-25")
    other = tmp_path / "sub" / "copy.tif"
    other.parent.mkdir()
    other.write_bytes(canopy_map.read_bytes())
    b = describe_product(other, datetime=("2018", "2020"), item_id="copy")
    coll = write_collection([a, b], tmp_path / "stac", "run", "two maps")
    assert validate_file(coll, SCHEMAS) == [CORE_COLLECTION]
    c = pystac.Collection.from_file(str(coll))
    hrefs = sorted(Path(lk.get_absolute_href()).resolve() for lk in c.get_links("item"))
    assert hrefs == sorted([a.resolve(), b.resolve()])
    d = json.loads(coll.read_text())
    assert d["extent"]["temporal"]["interval"] == [["2018-01-01T00:00:00Z", "2020-01-01T00:00:00Z"]]
    ia = json.loads(a.read_text())
    assert d["extent"]["spatial"]["bbox"] == [ia["bbox"]]
    mtime = coll.stat().st_mtime_ns
    write_collection([a, b], tmp_path / "stac", "run", "two maps")
    assert coll.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="used twice"):
        write_collection([a, a], tmp_path / "stac2", "run", "dup")
    # a collection.json that is not ours, and a folder that is not ours, are refused and kept
    coll.write_text('{"mine": true}')
    with pytest.raises(OutputConflictError, match="did not write"):
        write_collection([a], tmp_path / "stac", "run", "x")
    assert coll.read_text() == '{"mine": true}'
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.txt").write_text("x")
    with pytest.raises(OutputConflictError, match="did not create"):
        write_collection([a], user, "run", "x")
    assert sorted(os.listdir(user)) == ["thesis.txt"]


def _crop(src: Path, dst: Path, win: Window) -> Path:
    with rasterio.open(src) as ds:
        arr, prof = ds.read(window=win), ds.profile
        prof.update(width=win.width, height=win.height, transform=ds.window_transform(win), driver="GTiff")
    for k in ("blockxsize", "blockysize", "tiled", "compress", "interleave"):
        prof.pop(k, None)
    with rasterio.open(dst, "w", **prof) as out:
        out.write(arr)
    return dst


def test_pipeline_run_describes_styles_and_collects_every_product(tmp_path: Path, model_file: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    _crop(PUC / "pucallpa_2000.tif", tmp_path / "a.tif", Window(380, 230, 160, 96))
    _crop(PUC / "pucallpa_2020.tif", tmp_path / "b.tif", Window(380, 230, 160, 96))
    _crop(NEON, tmp_path / "neon.tif", Window(0, 0, 128, 128))
    pipe = {"name": "p", "outputs": "out", "stages": [
        {"name": "feats", "type": "features", "image": "neon.tif", "weights": model_file.name,
         "arch": "vit_tiny_test", "out": "${outputs}/feats.zarr", "window": 128},
        {"name": "forest", "type": "forest_mask", "image": "a.tif", "out": "${outputs}/forest.tif",
         "band_names": NAMES, "threshold": 0.78},
        {"name": "change", "type": "change_detect", "image_before": "a.tif", "image_after": "b.tif",
         "band_names": NAMES, "out_dir": "${outputs}/change", "classic_method": "ndvi",
         "forest_mask": "${outputs}/forest.tif", "mmu_ha": 1.0, "dates": ["2000-08-01", "2020-08-01"]},
        {"name": "report", "type": "report", "out": "${outputs}/report.html",
         "sections": [{"title": "Files", "kind": "links", "paths": ["${outputs}/forest.tif"]}]},
    ]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipe, sort_keys=False))
    inputs = {n: _sha(tmp_path / n) for n in ("a.tif", "b.tif", "neon.tif", model_file.name)}
    assert cli_main(["run", "p.yaml"]) == 0
    assert "no STAC item" not in capsys.readouterr().out
    out = tmp_path / "out"
    # every product of every stage has a valid Item, and the Collection links exactly those
    spec = load_pipeline(tmp_path / "p.yaml")
    products = [Path(o) for s in spec.stages for o in s.outputs() if describable(o)]
    kinds = {p.suffix for p in products}
    assert {".zarr", ".tif", ".gpkg"} <= kinds and len(products) >= 6
    coll = out / "stac" / "collection.json"
    assert validate_file(coll, SCHEMAS) == [CORE_COLLECTION]
    c = pystac.Collection.from_file(str(coll))
    linked = sorted(Path(lk.get_absolute_href()).resolve() for lk in c.get_links("item"))
    assert linked == sorted(item_path(p).resolve() for p in products)
    for p in products:
        item = item_path(p)
        assert validate_file(item, SCHEMAS)[0] == CORE_ITEM
        d = json.loads(item.read_text())
        assert d["properties"]["dinov3geo:pipeline"] == "p"
        if p.is_file():
            assert d["assets"]["data"]["file:checksum"] == "1220" + _sha(p)
    feats = json.loads(item_path(out / "feats.zarr").read_text())["properties"]
    assert feats["dinov3geo:model"]["sha256"] == inputs[model_file.name]
    assert feats["dinov3geo:inputs"] == [{"path": "neon.tif", "size": (tmp_path / "neon.tif").stat().st_size,
                                          "sha256": inputs["neon.tif"]}]
    loss = json.loads(item_path(out / "change" / "loss_polygons.gpkg").read_text())["properties"]
    assert (loss["start_datetime"], loss["end_datetime"]) == ("2000-08-01T00:00:00Z", "2020-08-01T00:00:00Z")
    # rasters open styled in QGIS
    assert (out / "forest.qml").is_file() and (out / "change" / "change_prob.qml").is_file()
    # the report links the Collection and the Items of the linked products
    html = (out / "report.html").read_text()
    assert 'href="stac/collection.json"' in html and 'href="forest.tif.stac.json"' in html
    assert {n: _sha(tmp_path / n) for n in inputs} == inputs  # inputs byte for byte

    # a re-run with nothing to do writes nothing and says nothing more
    snap = _tree(out)
    lines: list[str] = []
    run_pipeline(tmp_path / "p.yaml", echo=lines.append)
    assert all(m.endswith("skipped (up to date)") for m in lines) and _tree(out) == snap

    # an Item replaced by the user's own file is kept when the stage re-runs; the run says so in one line
    mine = item_path(out / "forest.tif")
    mine.write_text("my notes\n")
    lines.clear()
    run_pipeline(tmp_path / "p.yaml", force=["forest"], echo=lines.append)
    assert mine.read_text() == "my notes\n"
    warn = [m for m in lines if "no STAC item" in m]
    assert len(warn) == 1 and "out/forest.tif.stac.json" in warn[0] and "did not write" in warn[0]
    c = pystac.Collection.from_file(str(coll))
    assert mine.resolve() not in [Path(lk.get_absolute_href()).resolve() for lk in c.get_links("item")]
