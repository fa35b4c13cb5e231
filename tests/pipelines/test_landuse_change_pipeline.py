"""pipelines/landuse_change.yaml runs end to end on the shared Chiapas scenes (tiny settings) and its products
agree with each other: the transition matrix sums to the area mapped in both dates, the sample is stratified on
the transition map, the report shows the maps and tables."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio

from dinov3geo.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_landuse_change_pipeline_runs(shared_data: Path, tmp_path: Path) -> None:
    scenes = shared_data / "landcover" / "ogt_landsat7_chiapas_1999_2002"
    inputs = sorted(p for p in scenes.iterdir() if p.is_file())
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs}
    out = tmp_path / "luc"
    args = ["-q", "run", str(ROOT / "pipelines" / "landuse_change.yaml"), "--set", f"outputs={out}",
            "--set", f"vars.data={shared_data}", "--set", "vars.epochs=2", "--set", "vars.backbone=random:vit_tiny_test"]
    assert main(args) == 0
    # the matrix (ha) sums to what both maps cover, and its off-diagonal to the changed area of the summary
    m = pd.read_csv(out / "transitions" / "transition_matrix.csv", index_col=0)
    summary = json.loads((out / "transitions" / "summary.json").read_text())
    with rasterio.open(out / "landcover_1999.tif") as a, rasterio.open(out / "landcover_2002.tif") as b:
        both = (a.read(1) != 255) & (b.read(1) != 255)
        px_ha = abs(a.transform.a * a.transform.e) / 1e4
    total = float(m.select_dtypes("number").to_numpy().sum())
    assert total == pytest.approx(both.sum() * px_ha, rel=1e-6)
    vals = m.select_dtypes("number").to_numpy()
    assert float(vals.sum() - np.trace(vals)) == pytest.approx(summary["ungated"]["changed_ha"], rel=1e-6)
    # the sample: 600 points, every mapped transition with at least its minimum (or all its pixels)
    import geopandas as gpd

    sample = gpd.read_file(out / "sample.gpkg")
    assert len(sample) == 600 and (sample["reference"].fillna("") == "").all()  # empty: for the user to label
    assert (out / "areas" / "areas.csv").exists()
    html = (out / "report.html").read_text()
    assert html.count("<img ") >= 3 and "Olofsson" in html
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs} == before
