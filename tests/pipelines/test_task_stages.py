"""Task stage kinds on real data: canopy_train -> canopy_predict (+ AOI summary) -> canopy_evaluate on NEON
BART; forest_mask -> change_detect (classic and zero-shot) -> report with polygon outlines on Pucallpa; the
repository's demo / canopy / deforestation pipelines validate and dry-run."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import yaml
from rasterio.windows import Window

from dinov3geo.io.vector import read_vector
from dinov3geo.pipelines import PipelineError, load_pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[2]
NEON = "aerial_rgb_chm/neon_bart_2019"
RGB = "2019_BART_5_320000_4881000_image_crop.tif"
CHM = "NEON_D01_BART_DP3_320000_4881000_CHM_crop.tif"
PUC = "change_pairs/pucallpa_landsat_timeseries"
NAMES = ["swir16", "nir", "red", "green"]


def _write(path: Path, pipe: dict) -> Path:
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return path


def _status(runs: dict) -> dict[str, str]:
    return {k: v.status for k, v in runs.items()}


def test_canopy_stages(shared_data: Path, tmp_path: Path) -> None:
    img, chm = shared_data / NEON / RGB, shared_data / NEON / CHM
    with rasterio.open(chm) as ds:
        b = ds.bounds
    aoi = gpd.GeoDataFrame({"name": ["west", "east"]}, crs="EPSG:32619", geometry=[
        shapely.box(b.left + 5, b.bottom + 5, b.left + 55, b.top - 5),
        shapely.box(b.left + 60, b.bottom + 5, b.right - 5, b.top - 5)])
    aoi.to_file(tmp_path / "aoi.gpkg")
    config = {
        "data": {"pairs": [{"image": str(img), "chm": str(chm), "name": "bart"}], "target_res": 1.0},
        "split": {"block": 40, "buffer": 4, "fractions": {"train": 0.5, "val": 0.25, "test": 0.25}, "seed": 1},
        "model": {"backbone": "random:vit_tiny_test", "head": "light", "output": "bins", "n_bins": 16,
                  "hidden": 32},
        "train": {"tile": 32, "stride": 16, "epochs": 1, "batch_size": 16, "augment": False, "eval_window": 128,
                  "device": "cpu"},
    }
    pipe = {"name": "c", "outputs": str(tmp_path / "out"), "stages": [
        {"name": "train", "type": "canopy_train", "config": config, "out": "${outputs}/canopy",
         "set": {"train.lr": 0.003}},
        {"name": "map", "type": "canopy_predict", "image": str(img), "model": "${outputs}/canopy/model.pt",
         "out": "${outputs}/chm.tif", "aoi": str(tmp_path / "aoi.gpkg"), "window": 128, "device": "cpu"},
        {"name": "eval", "type": "canopy_evaluate", "pred": "${outputs}/chm.tif", "truth": str(chm),
         "out_dir": "${outputs}/eval", "window": 64},
    ]}
    path = _write(tmp_path / "p.yaml", pipe)
    runs = run_pipeline(path, echo=None)
    assert _status(runs) == {"train": "done", "map": "done", "eval": "done"}
    out = tmp_path / "out"
    tr = runs["train"].result
    test = json.loads((out / "canopy/eval_bart/metrics.json").read_text())
    assert tr["model"] == str(out / "canopy/model.pt") and tr["test"]["bart"]["mae"] == pytest.approx(test["mae"])
    assert tr["summary"]["train test MAE (m)"] == pytest.approx(test["mae"], abs=0.01)
    # the map: two bands, NaN outside the AOI, stats equal to the raster's
    mp = runs["map"].result
    with rasterio.open(out / "chm.tif") as ds:
        h, s = ds.read(1), ds.read(2)
        assert ds.descriptions == ("height", "height_std") and ds.res == pytest.approx((1.0, 1.0))
    ok = np.isfinite(h)
    assert 0 < ok.mean() < 1  # the AOI leaves a gap between the two boxes
    assert mp["height"]["mean"] == pytest.approx(float(h[ok].mean()), rel=1e-5)
    assert mp["height"]["cover_share"] == pytest.approx(float((h[ok] >= 5).mean()))
    assert mp["height_std"]["mean"] == pytest.approx(float(np.nanmean(s)), rel=1e-5)
    summ = read_vector(out / "chm_aoi_summary.gpkg")
    assert list(summ["name"]) == ["west", "east"] and (out / "chm_aoi_summary.csv").exists()
    assert [r["name"] for r in mp["per_aoi"]] == ["west", "east"]
    ev = runs["eval"].result
    m = json.loads((out / "eval/metrics.json").read_text())
    assert ev["n"] == m["n"] > 0
    assert ev["summary"]["eval: RMSE (m)"] == pytest.approx(m["rmse"], abs=0.01)
    assert (out / "eval/pred_vs_true.png").exists()
    # up to date: nothing re-runs
    assert set(_status(run_pipeline(path, echo=None)).values()) == {"skipped"}


def test_canopy_predict_needs_one_model(tmp_path: Path) -> None:
    base = {"name": "x", "outputs": str(tmp_path), "stages": [
        {"name": "map", "type": "canopy_predict", "image": "a.tif", "out": "b.tif"}]}
    with pytest.raises(PipelineError, match="no canopy model.*chmv2_backbone"):
        load_pipeline(base)
    base["stages"][0] |= {"model": "m.pt", "chmv2_head": "h.pth"}
    with pytest.raises(PipelineError, match="not both"):
        load_pipeline(base)
    base["stages"][0] = {"name": "map", "type": "canopy_predict", "image": "a.tif", "out": "b.tif",
                         "chmv2_backbone": "sat493m.pth", "chmv2_head": "chmv2_head.pth"}
    p = load_pipeline(base)
    assert set(p.stage("map").inputs()) == {"a.tif", "sat493m.pth", "chmv2_head.pth"}
    base["stages"][0]["summary"] = "s.gpkg"
    with pytest.raises(PipelineError, match="'summary'.*needs 'aoi'"):
        load_pipeline(base)


def test_canopy_train_config_errors(tmp_path: Path) -> None:
    stage = {"name": "t", "type": "canopy_train", "config": {"data": {"pairs": [{"image": "a", "chm": "b"}]},
                                                             "model": {"backbone": "random:vit_tiny_test"}},
             "set": {"train.epoch": 3}}
    with pytest.raises(PipelineError, match="train.epoch"):
        load_pipeline({"name": "x", "outputs": str(tmp_path), "stages": [stage]})
    stage = {"name": "t", "type": "canopy_train", "config": str(tmp_path / "missing.yaml")}
    with pytest.raises(PipelineError, match="missing.yaml.*not found"):
        load_pipeline({"name": "x", "outputs": str(tmp_path), "stages": [stage]})


@pytest.fixture
def pucallpa_crop(shared_data: Path, tmp_path: Path) -> dict:
    """A 96 x 160 px crop of both dates (riverbank forest lost to the Ucayali meanders)."""
    paths = {}
    for year in (2000, 2020):
        with rasterio.open(shared_data / PUC / f"pucallpa_{year}.tif") as ds:
            win = Window(380, 230, 160, 96)
            arr, crs, tr = ds.read(window=win), ds.crs, ds.window_transform(win)
        p = tmp_path / f"puc_{year}.tif"
        with rasterio.open(p, "w", driver="GTiff", width=160, height=96, count=4, dtype="uint8", crs=crs,
                           transform=tr, nodata=0, photometric="MINISBLACK") as dst:
            dst.write(arr)
        paths[year] = p
    return paths


def test_deforestation_stages(pucallpa_crop: dict, tmp_path: Path) -> None:
    from dinov3geo.models import build_backbone, save_backbone

    bb = save_backbone(build_backbone("vit_tiny_test"), tmp_path / "tiny.dinov3geo.pt")
    with rasterio.open(pucallpa_crop[2000]) as ds:
        b = ds.bounds
    aoi = gpd.GeoDataFrame({"aoi": ["all"]}, crs="EPSG:4326", geometry=[shapely.box(*b)])
    aoi.to_file(tmp_path / "aoi.geojson")
    common = {"image_before": str(pucallpa_crop[2000]), "image_after": str(pucallpa_crop[2020]),
              "band_names": NAMES, "forest_mask": "${outputs}/forest.tif", "mmu_ha": 1.0, "device": "cpu"}
    pipe = {"name": "d", "outputs": str(tmp_path / "out"), "stages": [
        {"name": "forest", "type": "forest_mask", "image": str(pucallpa_crop[2000]), "out": "${outputs}/forest.tif",
         "band_names": NAMES, "threshold": 0.78},
        {"name": "classic", "type": "change_detect", **common, "out_dir": "${outputs}/classic", "method": "classic",
         "classic_method": "ndvi", "aoi": str(tmp_path / "aoi.geojson")},
        {"name": "zs", "type": "change_detect", **common, "out_dir": "${outputs}/zs", "method": "zeroshot",
         "backbone": str(bb), "value_scale": 1 / 255, "window": 128},
        {"name": "report", "type": "report", "out": "${outputs}/report.html", "sections": [
            {"title": "Loss", "items": [
                {"kind": "overlay", "image": str(pucallpa_crop[2020]), "mask": "${outputs}/classic/forest_loss.tif",
                 "polygons": "${outputs}/classic/loss_polygons.gpkg", "area": True, "label": "loss"}]}]},
    ]}
    path = _write(tmp_path / "p.yaml", pipe)
    runs = run_pipeline(path, echo=None)
    assert set(_status(runs).values()) == {"done"}
    out = tmp_path / "out"
    fr = runs["forest"].result
    with rasterio.open(out / "forest.tif") as ds:
        fm = ds.read(1)
    assert fr["forest_fraction"] == pytest.approx(float((fm == 1).sum() / (fm != 255).sum()))
    assert 0.1 < fr["forest_fraction"] < 0.95
    for name in ("classic", "zs"):
        r = runs[name].result
        polys = read_vector(out / name / "loss_polygons.gpkg", allow_empty=True)
        with rasterio.open(out / name / "forest_loss.tif") as ds:
            loss = ds.read(1)
        assert r["n_polygons"] == len(polys) and r["polygons_ha"] == pytest.approx(float(polys["area_ha"].sum()))
        assert r["loss_ha"] == pytest.approx(r["polygons_ha"], rel=0.02)  # polygons = the loss map after the MMU
        assert ((loss == 1) <= (fm == 1)).all()  # loss only where there was forest in 2000
        assert r["summary"][f"{name}: forest loss (ha)"] == pytest.approx(r["loss_ha"], abs=0.1)
        assert r["date_before"] == "2000" and r["date_after"] == "2020"
    assert runs["classic"].result["loss_ha"] > 0  # the meander took riverbank forest
    assert (out / "classic/aoi_summary.csv").exists()
    html = (out / "report.html").read_text()
    assert "loss area (ha)" in html and "data:image/png" in html
    # the forest mask changes -> both detections and the report re-run
    runs = run_pipeline(path, ["forest.threshold=0.8"], echo=None)
    assert _status(runs) == {"forest": "done", "classic": "done", "zs": "done", "report": "done"}


def test_change_detect_validation(tmp_path: Path) -> None:
    st = {"name": "c", "type": "change_detect", "image_before": "a.tif", "image_after": "b.tif", "out_dir": "o",
          "method": "zeroshot"}
    with pytest.raises(PipelineError, match="zeroshot needs 'backbone'"):
        load_pipeline({"name": "x", "outputs": str(tmp_path), "stages": [st]})
    with pytest.raises(PipelineError, match="'method': 'magic'"):
        load_pipeline({"name": "x", "outputs": str(tmp_path), "stages": [st | {"method": "magic"}]})
    with pytest.raises(PipelineError, match=r"unknown parameter\(s\) \['before'\]"):
        load_pipeline({"name": "x", "outputs": str(tmp_path), "stages": [st | {"method": "classic", "before": "a"}]})


@pytest.mark.parametrize("name", ["demo", "canopy_height_region", "deforestation"])
def test_repository_pipelines_dry_run(name: str, tmp_path: Path) -> None:
    lines: list[str] = []
    runs = run_pipeline(load_pipeline(ROOT / "pipelines" / f"{name}.yaml", [f"outputs={tmp_path}"]),
                        dry_run=True, echo=lines.append)
    assert all(r.status == "would run" for r in runs.values()) and len(lines) == len(runs)
    assert not any(tmp_path.iterdir())


def test_demo_pipeline_shape() -> None:
    p = load_pipeline(ROOT / "pipelines" / "demo.yaml")
    kinds = [s.type for s in p.stages]
    assert kinds == ["ingest", "pretrain", "features", "canopy_train", "canopy_predict", "forest_mask",
                     "change_detect", "change_detect", "landcover_train", "landcover_predict",
                     "landcover_predict", "landcover_transitions", "report"]
    assert p.stage("pretrain").params["stage"] == "all"
    assert p.stage("canopy_train").params["config"]["split"]["fractions"]["test"] > 0  # test blocks held out
    assert {s.params["method"] for s in p.stages if s.type == "change_detect"} == {"zeroshot", "classic"}
    # the staged demo config: every stage's warmup/cosine lengths fit its iterations
    from dinov3geo.ssl.config import load_config

    raw = yaml.safe_load((ROOT / "pipelines/configs/demo_pretrain.yaml").read_text())
    assert [s for s in ("pretrain", "gram", "highres") if s in raw] == ["pretrain", "gram", "highres"]
    for stage in ("pretrain", "gram", "highres"):
        cfg = load_config(raw, section=stage)
        its = cfg.optim.iterations
        for sched in (cfg.schedules.lr, cfg.schedules.teacher_temp, cfg.schedules.momentum):
            assert sched.warmup_iterations + (sched.cosine_iterations or 0) <= its, (stage, sched)
        for extra in (cfg.gram.loss_weight_schedule, cfg.dino.local_loss_weight_schedule):
            if extra:
                assert extra.get("warmup_iterations", 0) + (extra.get("cosine_iterations") or 0) <= its, stage
