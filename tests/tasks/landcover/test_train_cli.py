"""``dinov3geo landcover train | predict | evaluate`` end to end on the real Chiapas Landsat 7 scene and polygons:
outputs, untouched inputs, bad inputs (one line, exit status, nothing written), resume equals an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch

from dinov3geo.cli import main
from dinov3geo.models import save_backbone
from dinov3geo.tasks.landcover.classes import ClassTable
from dinov3geo.tasks.landcover.heads import load_landcover_model
from dinov3geo.tasks.landcover.train import train_landcover
from dinov3geo.utils.outputs import MARKER
from tests.tasks.landcover.test_heads import real_backbone

CHIAPAS = "landcover/ogt_landsat7_chiapas_1999_2002"
IMG99 = "LE70220491999322EDC01_stack.gtif"
IMG02 = "LE70220492002106EDC00_stack.gtif"
BANDS = ["--bands", "1,2,3,4,5,6", "--band-names", "blue,green,red,nir,swir16,swir22"]
FAST = ["--set", "train.augment=false", "--set", "baseline.n_estimators=10", "--set", "train.batch_size=16",
        "--device", "cpu", "--block", "50", "--buffer", "5"]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_error(err: str, command: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dinov3geo {command}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def chiapas(shared_data: Path) -> Path:
    return shared_data / CHIAPAS


@pytest.fixture(scope="module")
def trained(chiapas: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, str]]:
    """One CLI training run (linear head, random control backbone): ``(run folder, stdout, input digests)``."""
    before = _digest(chiapas)
    run = tmp_path_factory.mktemp("lc") / "run"
    rc = main(["landcover", "train", "--image", str(chiapas / IMG99), "--labels", str(chiapas / "training_data.shp"),
               *BANDS, "--backbone", "random:vit_tiny_test", "--epochs", "2", "--tile", "128", *FAST,
               "--out", str(run)])
    assert rc == 0
    return run, (run / "summary.json").read_text(), before


def test_train_writes_model_map_and_side_by_side_scores(trained, chiapas: Path) -> None:
    run, summary_text, before = trained
    assert json.loads((run / MARKER).read_text())["kind"] == "landcover-train"
    for f in ("model.pt", "last.pt", "history.json", "split.json", "summary.json", "map.tif", "map.tif.aux.xml",
              "map.qml", "eval_test/metrics.json", "eval_test/confusion.csv", "eval_test/confusion.png",
              "baseline_test/metrics.json", "baseline_test/confusion.csv", "baseline_test/confusion.png"):
        assert (run / f).is_file(), f
    s = json.loads(summary_text)
    assert s["head"] == "linear" and s["uses_image_pixels"] is False
    assert s["test"]["split"] == "test" and s["baseline"]["split"] == "test"
    assert s["test"]["n"] == s["baseline"]["n"] > 0  # the same test pixels for both
    split = json.loads((run / "split.json").read_text())
    test_polys = set(split["polygon_split"]["polygons"]["test"])
    train_polys = set(split["polygon_split"]["polygons"]["train"])
    assert test_polys and train_polys and not test_polys & train_polys
    model, info = load_landcover_model(run / "model.pt")
    assert model.table.names == ["barren", "forest", "herbaceous", "urban", "water"]
    assert info["bands"] == ["blue", "green", "red", "nir", "swir16", "swir22"]
    assert info["band_keys"] == [1, 2, 3, 4, 5, 6] and len(info["source_bands"]) == 8
    assert info["gsd"] == 30.0 and info["backbone"]["source"] == "random:vit_tiny_test"
    assert info["mean"] is not None and "image statistics" in info["notes"]
    raw = torch.load(run / "model.pt", weights_only=True)
    assert len(raw["backbone"]["sha256"]) == 64
    assert _digest(chiapas) == before


def test_predict_and_evaluate_cli(trained, chiapas: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _, before = trained
    out = tmp_path / "maps" / "lc2002.tif"
    rc, _, err = _run(capsys, "-q", "landcover", "predict", str(chiapas / IMG02), "--model", str(run / "model.pt"),
                      "--out", str(out), "--confidence", "--window", "128", "--device", "cpu")
    assert rc == 0, err
    table = ClassTable.from_json(json.loads(json.dumps(load_landcover_model(run / "model.pt")[1]["classes"])))
    with rasterio.open(out) as ds, rasterio.open(chiapas / IMG02) as img:
        assert ds.crs == img.crs and ds.transform == img.transform and ds.shape == img.shape
        assert ds.count == 2 and ds.descriptions == ("class", "confidence") and ds.nodata == 255
        codes = ds.read(1)
        assert set(np.unique(codes).tolist()) <= set(table.codes)  # the 2002 image has no nodata: all mapped
        conf = ds.read(2)
        assert conf.max() <= 100 and conf.min() >= 100 // len(table)  # a max probability is >= 1/K
        assert ClassTable.from_json(ds.tags()["DINOV3GEO_CLASSES"]) == table
        assert ds.colormap(1)[table.codes[1]][:3] == table[1].rgb
    cats = ET.parse(f"{out}.aux.xml").getroot().find("PAMRasterBand[@band='1']/CategoryNames")
    assert [c.text or "" for c in cats.findall("Category")] == table.category_names()
    assert sorted(p.name for p in out.parent.iterdir()) == ["lc2002.qml", "lc2002.tif", "lc2002.tif.aux.xml",
                                                          "lc2002.tif.stac.json"]  # + its STAC Item

    ev = tmp_path / "eval"
    rc, so, err = _run(capsys, "-q", "landcover", "evaluate", str(out), "--labels", str(chiapas / "training_data.shp"),
                       "--out", str(ev), "--json")
    assert rc == 0, err
    m = json.loads(so)
    assert m["n"] == 718 and m["n_map_missing"] == 0
    cm = np.array(m["confusion_matrix"])
    assert m["overall_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert (ev / "metrics.json").is_file() and (ev / "confusion.csv").is_file() and (ev / "confusion.png").is_file()
    # the same map scored by the API on the same labels gives the same matrix
    from dinov3geo.tasks.landcover.evaluate import evaluate_map

    assert evaluate_map(out, chiapas / "training_data.shp", None)["confusion_matrix"] == m["confusion_matrix"]
    # a label raster with codes the map does not know: an error naming the file and the codes
    rc, _, err = _run(capsys, "landcover", "evaluate", str(out), "--labels", str(chiapas / "landcover_labels_idx.tif"),
                      "--out", str(tmp_path / "ev2"))
    line = _one_error(err, "landcover evaluate")
    assert rc == 1 and "landcover_labels_idx.tif" in line and "class codes [0]" in line
    assert not (tmp_path / "ev2").exists()
    assert _digest(chiapas) == before


def test_model_on_an_image_with_other_bands(trained, shared_data: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    run, _, _ = trained
    rgb = shared_data / "landsat/rasterio_RGB.byte.tif"  # red, green, blue only
    out = tmp_path / "rgb.tif"
    rc, _, err = _run(capsys, "landcover", "predict", str(rgb), "--model", str(run / "model.pt"), "--out", str(out),
                      "--window", "128", "--device", "cpu")
    line = _one_error(err, "landcover predict")
    assert rc == 1 and "trained on 6 band(s)" in line and "rasterio_RGB.byte.tif" in line and "--bands" in line
    assert "'red', 'green', 'blue'" in line
    assert not list(tmp_path.iterdir())
    # documented: an image that has the model's bands under their common names (Sentinel-2 here) is mapped
    # with those bands, in the model's order
    s2 = shared_data / "sentinel2/rstoolbox_sen2_amazon/sen2_L2A_12band_dn.tif"
    rc, _, err = _run(capsys, "-q", "landcover", "predict", str(s2), "--model", str(run / "model.pt"), "--out",
                      str(tmp_path / "s2.tif"), "--window", "128", "--device", "cpu")
    assert rc == 0, err
    from dinov3geo.tasks.landcover.predict import select_bands

    meta = load_landcover_model(run / "model.pt")[1]
    with rasterio.open(s2) as ds:
        assert ds.count == 12
    from dinov3geo.io.sources import open_scene

    assert select_bands(meta, open_scene(s2).band_names) == ["blue", "green", "red", "nir", "swir16", "swir22"]


def test_predict_refuses_to_overwrite_its_inputs(trained, chiapas: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run, _, _ = trained
    model_before = (run / "model.pt").read_bytes()
    rc, _, err = _run(capsys, "landcover", "predict", str(chiapas / IMG02), "--model", str(run / "model.pt"),
                      "--out", str(run / "model.pt"))
    line = _one_error(err, "landcover predict")
    assert rc == 1 and "it is the input" in line
    assert (run / "model.pt").read_bytes() == model_before


def _bad_labels(chiapas: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    g = gpd.read_file(chiapas / "training_data.shp")
    cases = {}
    p = tmp_path / "nocol.gpkg"
    g.rename(columns={"class": "cover", "id": "fid_x"}).to_file(p, driver="GPKG")
    cases["no class column"] = (p, "no class column found")
    p = tmp_path / "far.gpkg"
    g.assign(geometry=g.geometry.translate(yoff=-200_000)).to_file(p, driver="GPKG")
    cases["outside"] = (p, "entirely outside the image")
    p = tmp_path / "one.gpkg"
    g[g["class"] == "water"].to_file(p, driver="GPKG")
    cases["single class"] = (p, "only 1 class ('water')")
    return cases


def test_bad_labels_are_one_line_and_write_nothing(chiapas: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    before = _digest(chiapas)
    for what, (labels, text) in _bad_labels(chiapas, tmp_path).items():
        out = tmp_path / f"run_{labels.stem}"
        rc, _, err = _run(capsys, "landcover", "train", "--image", str(chiapas / IMG99), "--labels", str(labels),
                          "--backbone", "random:vit_tiny_test", "--epochs", "1", "--out", str(out))
        line = _one_error(err, "landcover train")
        assert rc == 1, what
        assert text in line and labels.name in line, (what, line)
        assert not out.exists(), what
    # a folder dinov3geo did not create is never used as a run folder
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    rc, _, err = _run(capsys, "landcover", "train", "--image", str(chiapas / IMG99), "--labels",
                      str(chiapas / "training_data.shp"), "--backbone", "random:vit_tiny_test", "--out", str(foreign))
    assert rc == 1 and "did not create" in _one_error(err, "landcover train")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    rc, _, err = _run(capsys, "landcover", "train", "--image", str(chiapas / IMG99))
    assert rc == 2 and "--labels, --backbone, --out" in _one_error(err, "landcover train")
    assert _digest(chiapas) == before


def _cfg(chiapas: Path, out: Path, **train: object) -> dict:
    return {"data": {"image": str(chiapas / IMG99), "labels": str(chiapas / "training_data.shp"),
                     "bands": [1, 2, 3, 4, 5, 6]},
            "split": {"block": 50, "buffer": 5, "fractions": {"train": 0.7, "val": 0.3}, "seed": 2},
            "model": {"backbone": "random:vit_tiny_test", "head": "linear"},
            "train": {"tile": 128, "epochs": 3, "batch_size": 4, "augment": True, "lr": 0.01, "device": "cpu",
                      **train},
            "baseline": {"enabled": False}, "out": str(out)}


def test_resume_after_a_kill_equals_an_uninterrupted_run(chiapas: Path, tmp_path: Path) -> None:
    full = train_landcover(_cfg(chiapas, tmp_path / "full"), progress=False)

    class Killed(KeyboardInterrupt):
        pass

    def kill_after_first(row: dict) -> None:
        if row["epoch"] == 0:
            raise Killed

    with pytest.raises(Killed):
        train_landcover(_cfg(chiapas, tmp_path / "killed"), progress=False, on_epoch=kill_after_first)
    assert json.loads((tmp_path / "killed" / "history.json").read_text())[-1]["epoch"] == 0
    ran: list[int] = []
    resumed = train_landcover(_cfg(chiapas, tmp_path / "killed"), progress=False,
                              on_epoch=lambda row: ran.append(row["epoch"]))
    assert ran == [1, 2]  # resumed after epoch 0, not started afresh

    def strip(h: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in h]

    assert strip(resumed.history) == strip(full.history)
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["head"]
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["head"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.best_epoch == full.best_epoch
    # the loss went down: the head learns from the cached features
    assert full.history[-1]["loss"] < full.history[0]["loss"]


def test_dense_head_with_image_detail_on_a_backbone_whose_blocks_matter(chiapas: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    bb_path = save_backbone(real_backbone(in_chans=6), tmp_path / "bb.dinov3geo.pt")
    out = tmp_path / "dense"
    rc, so, err = _run(capsys, "landcover", "train", "--image", str(chiapas / IMG99), "--labels",
                       str(chiapas / "training_data.shp"), *BANDS, "--backbone", str(bb_path), "--head", "dense",
                       "--image-detail", "--epochs", "1", "--tile", "128", "--no-baseline", *FAST, "--out", str(out))
    assert rc == 0, err
    assert "uses full-resolution image pixels" in so
    model, info = load_landcover_model(out / "model.pt")
    assert info["uses_image_pixels"] is True and info["head"]["kind"] == "dense" and model.layers == [0, 0, 1, 1]
    gammas = [p for n, p in model.backbone.named_parameters() if n.endswith(".gamma")]
    assert min(float(g.min()) for g in gammas) >= 0.1  # the loaded backbone kept its real LayerScale
    with rasterio.open(out / "map.tif") as ds:
        assert ds.tags()["USES_IMAGE_PIXELS"] == "yes"
    assert json.loads((out / "eval_test/metrics.json").read_text())["uses_image_pixels"] is True


def test_predict_aoi_and_kept_probabilities(trained, chiapas: Path, tmp_path: Path) -> None:
    import shapely

    from dinov3geo.tasks.landcover.predict import predict_landcover

    run, _, _ = trained
    with rasterio.open(chiapas / IMG99) as ds:
        left, bottom, right, top = ds.bounds
    aoi = tmp_path / "aoi.gpkg"
    half = shapely.box(left, bottom, left + (right - left) / 2, top)  # the western half, in EPSG:4326
    gpd.GeoDataFrame(geometry=[half], crs="EPSG:32615").to_crs("EPSG:4326").to_file(aoi, driver="GPKG")
    out = predict_landcover(run / "model.pt", chiapas / IMG99, tmp_path / "west.tif", aoi=aoi,
                            probabilities=tmp_path / "probs.tif", window=128, device="cpu", progress=False)
    with rasterio.open(out) as ds:
        codes = ds.read(1)
    assert (codes[:, 130:] == 255).all() and (codes[:, :120] != 255).all()
    with rasterio.open(tmp_path / "probs.tif") as ds:
        p = ds.read()
        assert ds.count == 5 and ds.descriptions[0] == "p_barren"
    inside = codes != 255
    np.testing.assert_allclose(p[:, inside].sum(axis=0), 1.0, atol=1e-4)  # blended probabilities stay a distribution
    table = load_landcover_model(run / "model.pt")[0].table
    assert np.array_equal(table.code_lut()[p[:, inside].argmax(axis=0)], codes[inside])
    # a re-run of the same job (e.g. after a kill during the class pass) reuses the finished probabilities
    stamp = (tmp_path / "probs.tif").stat().st_mtime_ns
    (tmp_path / "west.tif").unlink()
    predict_landcover(run / "model.pt", chiapas / IMG99, tmp_path / "west.tif", aoi=aoi,
                      probabilities=tmp_path / "probs.tif", window=128, device="cpu", progress=False)
    assert (tmp_path / "probs.tif").stat().st_mtime_ns == stamp
    with rasterio.open(tmp_path / "west.tif") as ds:
        assert np.array_equal(ds.read(1), codes)


def test_repository_config_loads_and_config_errors_name_the_key(tmp_path: Path) -> None:
    from dinov3geo.tasks.landcover.train import load_landcover_config
    from dinov3geo.utils.config import ConfigError

    root = Path(__file__).resolve().parents[3]
    cfg = load_landcover_config(root / "pipelines/configs/landcover_chiapas.yaml")
    assert cfg.data.bands == [1, 2, 3, 4, 5, 6] and cfg.model.head == "linear"
    base = {"data": {"image": "a.tif", "labels": "b.gpkg"}, "model": {"backbone": "random:vit_tiny_test"}}
    with pytest.raises(ConfigError, match="train.epoch"):
        load_landcover_config({**base, "train": {"epoch": 3}})
    with pytest.raises(ConfigError, match="model.head"):
        load_landcover_config({**base, "model": {"backbone": "x", "head": "unet"}})
    with pytest.raises(ConfigError, match="image_detail needs model.head: dense"):
        load_landcover_config({**base, "model": {"backbone": "x", "image_detail": True}})
    with pytest.raises(ConfigError, match="train.class_weights"):
        load_landcover_config({**base, "train": {"class_weights": "sqrt"}})
