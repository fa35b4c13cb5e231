"""CLI commands give their products STAC Items and QGIS styles, as pipeline stages do (real files, end to end)."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from dinov3geo.cli import main
from dinov3geo.io.stac import validate_file

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "tests" / "data" / "stac_schemas"
PUC = REPO / "data" / "pucallpa"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_change_detect_writes_items_and_styles(tmp_path: Path) -> None:
    before, after = PUC / "pucallpa_2000.tif", PUC / "pucallpa_2020.tif"
    hashes = {p: _sha(p) for p in (before, after)}
    out = tmp_path / "change"
    rc = main(["-q", "change", "detect", "--before", str(before), "--after", str(after), "--out", str(out), "--method", "classic",
               "--classic", "ndvi", "--band-names", "swir16,nir,red,green", "--date-before", "2000",
               "--date-after", "2020"])
    assert rc == 0
    tifs = sorted(out.glob("*.tif"))
    assert tifs
    for tif in tifs:
        item = Path(f"{tif}.stac.json")
        assert item.exists(), item
        validate_file(item, SCHEMAS)
        import json

        doc = json.loads(item.read_text())
        assert doc["properties"]["dinov3geo:command"] == "change detect"
        assert doc["properties"]["start_datetime"].startswith("2000") and doc["properties"]["end_datetime"].startswith("2020")
        inputs = json.dumps(doc["properties"].get("dinov3geo:inputs"))
        assert "pucallpa_2000.tif" in inputs and "pucallpa_2020.tif" in inputs
    styled = [t for t in tifs if t.with_suffix(".qml").exists()]
    assert styled, "no raster got a QGIS style"
    for t in styled:
        ET.parse(t.with_suffix(".qml"))  # well-formed
    gpkgs = sorted(out.glob("*.gpkg"))
    for g in gpkgs:
        validate_file(Path(f"{g}.stac.json"), SCHEMAS)
    assert {p: _sha(p) for p in hashes} == hashes  # inputs untouched


def test_a_foreign_item_is_kept_and_the_command_still_succeeds(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    before, after = PUC / "pucallpa_2000.tif", PUC / "pucallpa_2020.tif"
    out = tmp_path / "change"
    args = ["change", "detect", "--before", str(before), "--after", str(after), "--out", str(out), "--method", "classic",
            "--classic", "ndvi", "--band-names", "swir16,nir,red,green"]
    assert main(["-q", *args]) == 0
    tif = sorted(out.glob("*.tif"))[0]
    foreign = Path(f"{tif}.stac.json")
    foreign.write_text('{"mine": true}')
    assert main(["-q", *args]) == 0  # re-run: the item in the way is not ours
    assert foreign.read_text() == '{"mine": true}'


def test_transitions_get_items_and_styles_and_rerun(tmp_path: Path) -> None:
    from rasterio.transform import from_origin

    from dinov3geo.io.grid import GridSpec
    from dinov3geo.tasks.landcover.classes import ClassTable, LandClass, write_class_raster

    table = ClassTable([LandClass(1, "forest", "#006400"), LandClass(2, "agriculture", "#ffff4c")])
    grid = GridSpec("EPSG:32633", from_origin(500000, 4000000, 30, 30), 40, 30)
    rng = np.random.default_rng(0)
    a = rng.choice([1, 2], size=(30, 40)).astype("uint8")
    b = np.where(rng.random((30, 40)) < 0.3, 2, a).astype("uint8")
    m1 = write_class_raster(tmp_path / "lc_2000.tif", a, grid, table)
    m2 = write_class_raster(tmp_path / "lc_2020.tif", b, grid, table)
    out = tmp_path / "trans"
    args = ["-q", "change", "transitions", str(m1), str(m2), "--out", str(out), "--date1", "2000", "--date2", "2020"]
    assert main(args) == 0
    item = out / "transitions.tif.stac.json"
    validate_file(item, SCHEMAS)
    ET.parse(out / "transitions.qml")
    import json

    doc = json.loads(item.read_text())
    assert doc["properties"]["start_datetime"].startswith("2000")
    assert main(args) == 0  # the sidecars in the folder do not block a re-run
    validate_file(item, SCHEMAS)
