"""The Python API writes its products' STAC Items and QGIS styles itself; the CLI and pipelines write each once.

End to end through the public functions on real data (crops of the bundled NEON BART image and Pucallpa
Landsat composites) with tiny models; every Item is validated offline (pystac + the extension schemas in
``tests/data/stac_schemas``) and checked against the files it describes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import torch
import yaml
from rasterio.windows import Window

import dinov3geo.io.stac as stac
from dinov3geo.io.stac import item_path, validate_file

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "tests" / "data" / "stac_schemas"
NEON = ROOT / "data" / "neon_bart_2019" / "2019_BART_5_320000_4881000_image_crop.tif"
PUC = ROOT / "data" / "pucallpa"
NAMES = ["swir16", "nir", "red", "green"]
CORE_ITEM = "https://schemas.stacspec.org/v1.1.0/item-spec/json-schema/item.json"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _props(product: Path) -> dict:
    return json.loads(item_path(product).read_text())["properties"]


def _crop(src_path: Path, dst: Path, win: Window) -> Path:
    with rasterio.open(src_path) as src:
        arr, prof = src.read(window=win), src.profile
        prof.update(width=int(win.width), height=int(win.height), transform=src.window_transform(win))
    for k in ("blockxsize", "blockysize", "tiled", "compress", "interleave"):
        prof.pop(k, None)
    with rasterio.open(dst, "w", **prof) as out:
        out.write(arr)
    return dst


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
def described(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """How many times each product was described (every Item goes through ``dinov3geo.io.stac.write_item``)."""
    calls: Counter = Counter()
    original = stac.write_item

    def counting(product_path, **kw):  # noqa: ANN001, ANN003
        calls[Path(product_path).resolve()] += 1
        return original(product_path, **kw)

    monkeypatch.setattr(stac, "write_item", counting)
    return calls


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Inputs: a 128 px crop of the NEON RGB image, Pucallpa crops of 2000 and 2020, an AOI, tiny models."""
    import geopandas as gpd
    import shapely

    from dinov3geo.models import build_backbone, save_backbone
    from dinov3geo.tasks.canopy.bins import HeightBins
    from dinov3geo.tasks.canopy.dpt import DPTHead
    from dinov3geo.tasks.canopy.model import CanopyHeightModel, save_canopy_model
    from dinov3geo.tasks.landcover.classes import ClassTable, LandClass
    from dinov3geo.tasks.landcover.heads import LandcoverModel, LinearHead, save_landcover_model

    d = tmp_path_factory.mktemp("inputs")
    neon = _crop(NEON, d / "neon.tif", Window(0, 0, 128, 128))
    with rasterio.open(neon) as ds:
        x0, y0 = ds.bounds.left, ds.bounds.top
        crs = ds.crs
    aoi = d / "stands.gpkg"
    gpd.GeoDataFrame({"stand": ["a"]}, geometry=[shapely.box(x0 + 5, y0 - 40, x0 + 40, y0 - 5)],
                     crs=crs).to_file(aoi)
    torch.manual_seed(0)
    backbone = save_backbone(build_backbone("vit_tiny_test", depth=2, num_heads=4), d / "backbone.pth")
    head = DPTHead(64, [8, 16, 32, 64], channels=16, n_hidden_channels=8, n_bins=8)
    canopy = save_canopy_model(d / "canopy.pt", CanopyHeightModel(build_backbone("vit_tiny_test", depth=2,
                                                                                  num_heads=4), head,
                                                                   HeightBins(8, "linear", "softmax", 0.5, 40.0)),
                               bands=["red", "green", "blue"], mean=[0.4, 0.4, 0.3], std=[0.2, 0.2, 0.2],
                               value_scale=1 / 255)
    table = ClassTable([LandClass(1, "forest", "#1b7837"), LandClass(4, "water", "#2166ac")])
    lin = LinearHead(64, 2)
    with torch.no_grad():
        lin.classifier.weight.mul_(20)
    landcover = save_landcover_model(d / "landcover.pt", LandcoverModel(build_backbone("vit_tiny_test"), lin, table),
                                     bands=["b1", "b2", "b3"], mean=[0.4] * 3, std=[0.2] * 3, value_scale=1 / 255)
    win = Window(380, 230, 160, 96)
    return {"neon": neon, "aoi": aoi, "backbone": backbone, "canopy": canopy, "landcover": landcover,
            "a": _crop(PUC / "pucallpa_2000.tif", d / "a.tif", win),
            "b": _crop(PUC / "pucallpa_2020.tif", d / "b.tif", win)}


def _check_item(product: Path, *, api: str | None, model: Path | None = None,
                inputs: tuple[Path, ...] = ()) -> dict:
    """The Item of ``product`` validates and describes it: checksum (files), projection, provenance."""
    item = item_path(product)
    assert item.is_file(), f"no STAC Item next to {product}"
    assert validate_file(item, SCHEMAS)[0] == CORE_ITEM
    d = json.loads(item.read_text())
    pr = d["properties"]
    assert pr.get("dinov3geo:api") == api
    if product.is_file():
        assert d["assets"]["data"]["file:checksum"] == "1220" + _sha(product)  # the finished product
        assert d["assets"]["data"]["file:size"] == product.stat().st_size
    assert pr["proj:code"] and d["geometry"] is not None
    if model is not None:
        assert pr["dinov3geo:model"]["sha256"] == _sha(model)
    recorded = {i["path"]: i.get("sha256") for i in pr["dinov3geo:inputs"]}
    for i in inputs:
        assert recorded.get(str(i)) == _sha(i), (i, recorded)
    return pr


# ------------------------------------------------------------------------------------------------ the API
def test_extract_features_describes_the_store_and_the_pca(data: dict[str, Path], tmp_path: Path) -> None:
    from dinov3geo.tasks.features import extract_features

    before = {p: _sha(p) for p in (data["neon"], data["backbone"])}
    res = extract_features(data["neon"], tmp_path / "feats.zarr", weights=data["backbone"], arch="vit_tiny_test",
                           window=128, progress=False)
    api = "dinov3geo.tasks.features.extract_features"
    pr = _check_item(res.zarr, api=api, model=data["backbone"], inputs=(data["neon"],))
    with rasterio.open(data["neon"]) as ds:
        assert pr["proj:code"] == f"EPSG:{ds.crs.to_epsg()}"
    assert pr["proj:shape"] == [res.grid.height, res.grid.width] and pr["dinov3geo:kind"] == "features"
    assert res.pca_tif is not None
    pr = _check_item(res.pca_tif, api=api, model=data["backbone"], inputs=(data["neon"],))
    assert pr["proj:shape"] == [res.grid.height, res.grid.width]
    assert "STATISTICS_MEAN" in Path(f"{res.pca_tif}.aux.xml").read_text()  # GDAL statistics for QGIS
    assert not item_path(res.pca_png).exists()  # a PNG is not a product with an Item
    assert {p: _sha(p) for p in before} == before


def test_predict_canopy_writes_item_style_and_summary_item_or_nothing(data: dict[str, Path], tmp_path: Path) -> None:
    from dinov3geo.tasks.canopy.predict import predict_canopy

    out = predict_canopy(data["canopy"], data["neon"], tmp_path / "chm.tif", aoi=data["aoi"],
                         summary=tmp_path / "stands_summary.gpkg", window=96, progress=False, device="cpu")
    api = "dinov3geo.tasks.canopy.predict.predict_canopy"
    _check_item(out, api=api, model=data["canopy"], inputs=(data["neon"], data["aoi"]))
    qml = out.with_suffix(".qml")
    assert qml.is_file() and "dinov3geo-style" in qml.read_text() and "singlebandpseudocolor" in qml.read_text()
    assert "STATISTICS_MAXIMUM" in Path(f"{out}.aux.xml").read_text()
    assert json.loads(item_path(out).read_text())["assets"]["qgis-style"]["href"] == "./chm.qml"
    _check_item(tmp_path / "stands_summary.gpkg", api=api, model=data["canopy"], inputs=(data["aoi"],))

    bare = tmp_path / "bare"
    bare.mkdir()
    out2 = predict_canopy(data["canopy"], data["neon"], bare / "chm.tif", window=96, progress=False, device="cpu",
                          sidecars=False)
    assert sorted(p.name for p in bare.iterdir()) == [out2.name]  # no .stac.json, .qml or .aux.xml


def test_detect_change_dates_its_raster_and_polygon_items(data: dict[str, Path], tmp_path: Path) -> None:
    from dinov3geo.tasks.change.detect import detect_change

    res = detect_change(data["a"], data["b"], tmp_path / "change", method="classic", classic_method="ndvi",
                        band_names=NAMES, dates=("2000-08-01", "2020-08-01"), mmu_ha=0.5, progress=False,
                        device="cpu")
    products = [p for p in res.paths.values() if p.suffix in (".tif", ".gpkg")]
    assert {p.suffix for p in products} == {".tif", ".gpkg"}
    for p in products:
        pr = _check_item(p, api="dinov3geo.tasks.change.detect.detect_change", inputs=(data["a"], data["b"]))
        assert (pr["start_datetime"], pr["end_datetime"]) == ("2000-08-01T00:00:00Z", "2020-08-01T00:00:00Z")
        assert pr["dinov3geo:datetime_source"] == "argument"
    assert res.paths["change"].with_suffix(".qml").is_file()
    assert not item_path(res.paths["summary"]).exists()  # JSON: no Item


def test_predict_landcover_describes_the_map_and_the_kept_probabilities(data: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    from dinov3geo.tasks.landcover.predict import predict_landcover

    probs = tmp_path / "probs.tif"
    out = predict_landcover(data["landcover"], data["neon"], tmp_path / "lc.tif", probabilities=probs,
                            confidence=True, window=96, progress=False, device="cpu")
    api = "dinov3geo.tasks.landcover.predict.predict_landcover"
    for p in (out, probs):
        _check_item(p, api=api, model=data["landcover"], inputs=(data["neon"],))
    assert "forest" in out.with_suffix(".qml").read_text()  # the class palette style

    bare = tmp_path / "bare"
    bare.mkdir()
    predict_landcover(data["landcover"], data["neon"], bare / "lc.tif", window=96, progress=False, device="cpu",
                      sidecars=False)
    assert not list(bare.glob("*.stac.json"))


def _class_maps(d: Path) -> tuple[Path, Path, Path]:
    from rasterio.transform import from_origin

    from dinov3geo.io.grid import GridSpec
    from dinov3geo.tasks.landcover.classes import ClassTable, LandClass, write_class_raster

    table = ClassTable([LandClass(1, "forest", "#006400"), LandClass(2, "agriculture", "#ffff4c")])
    grid = GridSpec("EPSG:32633", from_origin(500000, 4000000, 30, 30), 40, 30)
    rng = np.random.default_rng(0)
    a = rng.choice([1, 2], size=(30, 40)).astype("uint8")
    b = np.where(rng.random((30, 40)) < 0.3, 2, a).astype("uint8")
    m1 = write_class_raster(d / "lc_2000.tif", a, grid, table)
    m2 = write_class_raster(d / "lc_2020.tif", b, grid, table)
    from dinov3geo.io.cog import write_cog

    change = write_cog(d / "change_prob.tif", rng.random((1, 30, 40)).astype("float32"), grid)
    return m1, m2, change


def test_transitions_items_and_a_rerun_drops_stale_items(tmp_path: Path) -> None:
    from dinov3geo.tasks.landcover.transitions import transitions

    m1, m2, change = _class_maps(tmp_path)
    out = tmp_path / "trans"
    res = transitions(m1, m2, out, change=change, dates=("2000", "2020"), progress=False)
    api = "dinov3geo.tasks.landcover.transitions.transitions"
    described = [p for p in res.paths.values() if p.suffix in (".tif", ".gpkg")]
    assert {p.name for p in described} == {"transitions.tif", "transitions_gated.tif", "transition_polygons.gpkg"}
    for p in described:
        pr = _check_item(p, api=api, inputs=(m1, m2, change))
        assert (pr["start_datetime"], pr["end_datetime"]) == ("2000-01-01T00:00:00Z", "2020-01-01T00:00:00Z")
    gated = out / "transitions_gated.tif"
    assert gated.with_suffix(".qml").is_file()
    # a re-run without the change raster: the gated map goes, and its Item and style with it
    res = transitions(m1, m2, out, progress=False)
    assert not gated.exists() and not item_path(gated).exists() and not gated.with_suffix(".qml").exists()
    pr = _check_item(out / "transitions.tif", api=api, inputs=(m1, m2))
    assert str(change) not in json.dumps(pr["dinov3geo:inputs"])  # replaced: this run did not read it


def test_a_foreign_item_is_kept_and_a_rerun_replaces_ours(data: dict[str, Path], tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from dinov3geo.tasks.canopy.predict import predict_canopy

    out = tmp_path / "chm.tif"
    foreign = item_path(out)
    foreign.write_bytes(b'{"type": "Feature", "mine": true}\n')
    with caplog.at_level(logging.WARNING, logger="dinov3geo"):
        predict_canopy(data["canopy"], data["neon"], out, window=96, progress=False, device="cpu")
    assert foreign.read_bytes() == b'{"type": "Feature", "mine": true}\n'
    warned = [r.getMessage() for r in caplog.records if str(foreign) in r.getMessage()]
    assert len(warned) == 1 and "did not write" in warned[0]
    assert out.with_suffix(".qml").is_file()  # the style is independent of the Item

    foreign.unlink()
    predict_canopy(data["canopy"], data["neon"], out, window=96, progress=False, device="cpu")
    assert _props(out)["dinov3geo:api"].endswith("predict_canopy")
    # a re-run into the same output replaces the Item dinov3geo wrote
    predict_canopy(data["canopy"], data["neon"], out, window=96, progress=False, device="cpu",
                   sidecars={"dinov3geo:note": "second run"})
    assert _props(out)["dinov3geo:note"] == "second run"
    _check_item(out, api="dinov3geo.tasks.canopy.predict.predict_canopy", model=data["canopy"])


# --------------------------------------------------------------------------------- CLI and pipelines: once
def test_cli_items_carry_the_command_and_are_written_once(data: dict[str, Path], tmp_path: Path,
                                                          described: Counter) -> None:
    from dinov3geo.cli import main

    out = tmp_path / "chm.tif"
    assert main(["-q", "canopy", "predict", "--image", str(data["neon"]), "--model", str(data["canopy"]),
                 "--out", str(out), "--window", "96", "--device", "cpu"]) == 0
    pr = _check_item(out, api="dinov3geo.tasks.canopy.predict.predict_canopy", model=data["canopy"],
                     inputs=(data["neon"],))
    assert pr["dinov3geo:command"] == "canopy predict"
    assert described == {out.resolve(): 1}

    feats = tmp_path / "feats.zarr"
    assert main(["-q", "features", str(data["neon"]), "--weights", str(data["backbone"]), "--out", str(feats),
                 "--window", "128"]) == 0
    assert _props(feats)["dinov3geo:command"] == "features"
    assert described[feats.resolve()] == 1 and described[(tmp_path / "feats_pca.tif").resolve()] == 1


def test_pipeline_stages_write_each_item_once_with_their_stage(data: dict[str, Path], tmp_path: Path,
                                                               described: Counter,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from dinov3geo.pipelines import run_pipeline

    monkeypatch.chdir(tmp_path)
    m1, m2, change = _class_maps(tmp_path)
    pipe = {"name": "p", "outputs": "out", "stages": [
        {"name": "chm", "type": "canopy_predict", "image": str(data["neon"]), "model": str(data["canopy"]),
         "out": "${outputs}/chm.tif", "window": 96, "device": "cpu"},
        {"name": "change", "type": "change_detect", "image_before": str(data["a"]), "image_after": str(data["b"]),
         "band_names": NAMES, "out_dir": "${outputs}/change", "classic_method": "ndvi", "mmu_ha": 0.5,
         "dates": ["2000-08-01", "2020-08-01"], "device": "cpu"},
        {"name": "lc", "type": "landcover_predict", "image": str(data["neon"]), "model": str(data["landcover"]),
         "out": "${outputs}/lc.tif", "window": 96, "device": "cpu"},
        {"name": "trans", "type": "landcover_transitions", "map1": str(m1), "map2": str(m2),
         "out_dir": "${outputs}/trans", "dates": ["2000", "2020"]},
    ]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipe, sort_keys=False))
    lines: list[str] = []
    run_pipeline(tmp_path / "p.yaml", echo=lines.append)
    assert not [m for m in lines if "no STAC item" in m], lines
    out = tmp_path / "out"
    products = [out / "chm.tif", out / "change" / "change.tif", out / "change" / "loss_polygons.gpkg",
                out / "lc.tif", out / "trans" / "transitions.tif"]
    for p in products:
        pr = _props(p)
        assert pr["dinov3geo:pipeline"] == "p" and pr["dinov3geo:stage"] in ("chm", "change", "lc", "trans")
        assert "dinov3geo:api" not in pr and "dinov3geo:command" not in pr
        assert described[p.resolve()] == 1, (p, described[p.resolve()])
    assert max(described.values()) == 1
