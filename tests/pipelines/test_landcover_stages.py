"""Land-cover stage kinds end to end through ``dinov3geo run`` on the bundled Pucallpa composites and demo
polygons: landcover_train -> landcover_predict (2000, 2020) -> landcover_transitions -> landcover_evaluate ->
landcover_areas -> report (class maps with legends, the hectare matrix and the head-vs-RF table); a re-run
skips everything; bad parameters are one line, nothing written; the inputs stay byte-for-byte untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import yaml

from dinov3geo.cli import main
from dinov3geo.report.build import _read_table

ROOT = Path(__file__).resolve().parents[2]
PUC = ROOT / "data" / "pucallpa"
NAMES = ["swir16", "nir", "red", "green"]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _pipeline(out: Path, **transitions: object) -> dict:
    config = {
        "data": {"image": str(PUC / "pucallpa_2000.tif"), "labels": str(PUC / "landcover_2000_demo.geojson"),
                 "column": "class", "band_names": NAMES, "value_scale": 1 / 255},
        "split": {"block": 64, "buffer": 2, "fractions": {"train": 0.6, "val": 0.2, "test": 0.2}, "seed": 1},
        "model": {"backbone": "random:vit_tiny_test", "head": "linear"},
        "train": {"tile": 64, "stride": 64, "epochs": 1, "batch_size": 16, "augment": False, "eval_window": 256,
                  "device": "cpu"},
        "baseline": {"n_estimators": 5},
    }
    return {"name": "lc", "outputs": str(out), "stages": [
        {"name": "train", "type": "landcover_train", "config": config, "out": "${outputs}/lc"},
        {"name": "map2000", "type": "landcover_predict", "image": str(PUC / "pucallpa_2000.tif"),
         "model": "${outputs}/lc/model.pt", "out": "${outputs}/lc2000.tif", "window": 256, "device": "cpu",
         "confidence": True},
        {"name": "map2020", "type": "landcover_predict", "image": str(PUC / "pucallpa_2020.tif"),
         "model": "${outputs}/lc/model.pt", "out": "${outputs}/lc2020.tif", "window": 256, "device": "cpu"},
        {"name": "trans", "type": "landcover_transitions", "map1": "${outputs}/lc2000.tif",
         "map2": "${outputs}/lc2020.tif", "out_dir": "${outputs}/trans", "dates": ["2000", "2020"], "mmu_ha": 1.0,
         **transitions},
        {"name": "eval", "type": "landcover_evaluate", "map": "${outputs}/lc2000.tif",
         "labels": str(PUC / "landcover_2000_demo.geojson"), "column": "class", "out_dir": "${outputs}/eval"},
        {"name": "areas", "type": "landcover_areas", "map": "${outputs}/lc2000.tif",
         "reference": str(PUC / "landcover_2000_demo.geojson"), "column": "class", "out_dir": "${outputs}/areas"},
        {"name": "report", "type": "report", "out": "${outputs}/report.html", "sections": [
            {"title": "Land cover", "items": [
                {"kind": "class_map", "path": "${outputs}/lc2000.tif"},
                {"kind": "class_map", "path": "${outputs}/trans/transitions.tif"},
                {"kind": "table", "path": "${outputs}/trans/transition_matrix.csv", "caption": "matrix (ha)"},
                {"kind": "table", "path": "${outputs}/lc/test_scores.csv", "caption": "head vs RF"}]}]},
    ]}


def test_landcover_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _digest(PUC)
    out = tmp_path / "out"
    pipe = tmp_path / "lc.yaml"
    pipe.write_text(yaml.safe_dump(_pipeline(out), sort_keys=False))
    assert main(["-q", "run", str(pipe)]) == 0, capsys.readouterr().err
    manifest = json.loads((out / "pipeline-lc.json").read_text())["stages"]
    res = {k: v["result"] for k, v in manifest.items()}

    # train: head and random forest scored on the same held-out test pixels, side by side
    scores = pd.read_csv(out / "lc" / "test_scores.csv")
    assert list(scores["model"]) == ["linear head on frozen features", "random forest (bands + indices)"]
    assert scores["pixels"].nunique() == 1 and scores["pixels"].iloc[0] == res["train"]["test"]["n"] > 0
    head = json.loads((out / "lc" / "eval_test" / "metrics.json").read_text())
    assert scores["macro-F1"].iloc[0] == pytest.approx(head["macro_f1"], abs=1e-4)
    s = res["train"]["summary"]
    assert s["train: random forest (bands + indices), test OA"] == pytest.approx(
        res["train"]["baseline"]["overall_accuracy"], abs=1e-3)

    # predict: class COG with its colour table; the summary's hectares are the map's classes
    with rasterio.open(out / "lc2000.tif") as ds:
        codes = ds.read(1)
        assert ds.count == 2 and ds.colormap(1)
    assert set(res["map2000"]["area_ha"]) == {"agriculture", "bare", "forest", "urban", "water"}
    share = {n: ha / res["map2000"]["mapped_ha"] for n, ha in res["map2000"]["area_ha"].items()}
    assert sum(share.values()) == pytest.approx(1.0)
    with rasterio.open(PUC / "pucallpa_2000.tif") as img:
        valid = (img.read() != img.nodata).all(axis=0)
    assert valid.any() and (codes[valid] != 255).all()  # every valid pixel of the composite is mapped

    # transitions: matrix in ha = the CSV; changed = off-diagonal; top transitions are its largest cells
    m = pd.read_csv(out / "trans" / "transition_matrix.csv", index_col=0)
    t = res["trans"]
    assert np.allclose(m.to_numpy(), np.array(t["matrix_ha"]))
    assert t["changed_ha"] == pytest.approx(m.to_numpy().sum() - np.trace(m.to_numpy()))
    off = m.to_numpy().copy()
    np.fill_diagonal(off, 0)
    i, j = np.unravel_index(off.argmax(), off.shape)
    assert next(iter(t["top_transitions_ha"])) == f"{m.index[i]} -> {m.columns[j]}"
    assert t["date_before"] == "2000" and t["date_after"] == "2020"
    assert (out / "trans" / "transition_polygons.gpkg").is_file()

    # evaluate and areas
    ev = json.loads((out / "eval" / "metrics.json").read_text())
    assert res["eval"]["n"] == ev["n"] > 0
    areas = pd.read_csv(out / "areas" / "areas.csv")
    assert res["areas"]["n_used"] == 11  # one sample unit per demo polygon
    assert set(res["areas"]["classes"]) <= set(areas["name"])

    # report: class maps as figures, the matrix with formatted numbers, head vs RF
    html = (out / "report.html").read_text()
    assert html.count("<figure>") == 2 and "matrix (ha)" in html and "random forest (bands + indices)" in html
    rows = _read_table(out / "trans" / "transition_matrix.csv")
    assert isinstance(rows, list) and all(isinstance(r["forest"], float) for r in rows)

    # up to date: nothing re-runs; the inputs are untouched
    capsys.readouterr()
    assert main(["run", str(pipe)]) == 0
    cap = capsys.readouterr()
    text = cap.out + cap.err
    assert text.count("skipped (up to date)") == 7, text
    assert _digest(PUC) == before


@pytest.mark.parametrize(("extra", "needle"), [({"dates": ["2000"]}, "dates"), ({"mmu_ha": -1}, "mmu_ha")])
def test_bad_transition_parameters_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 extra: dict, needle: str) -> None:
    out = tmp_path / "out"
    pipe = tmp_path / "lc.yaml"
    pipe.write_text(yaml.safe_dump(_pipeline(out, **extra), sort_keys=False))
    assert main(["-q", "run", str(pipe)]) != 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "trans" in lines[0], lines
    assert not out.exists() or not any(out.iterdir())
