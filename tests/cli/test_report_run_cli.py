"""`dinov3geo run --summary` and `dinov3geo report` end to end: a real pipeline through the CLI, numbers checked
against the files it wrote, the report opened in headless Chromium."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
import zarr
from pyproj import Geod

from dinov3geo.report.browser import find_chromium

REPO = Path(__file__).resolve().parents[2]
PUCALLPA = REPO / "data" / "pucallpa" / "pucallpa_2000.tif"
LANDSAT = REPO / "data" / "landsat" / "rasterio_RGB.byte.tif"

chromium = pytest.mark.skipif(find_chromium() is None and not os.environ.get("CI"),
                              reason="Chromium not installed (Debian: apt-get install chromium): headless check "
                                     "skipped (never in CI)")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinov3geo", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("runsummary")
    out = tmp / "out"
    pipe = {
        "name": "summary_test",
        "outputs": str(out),
        "stages": [
            {"name": "tiles", "type": "ingest", "sources": [str(LANDSAT)], "out": "${outputs}/tiles.zarr",
             "tile_size": 128},
            {"name": "forest", "type": "forest_mask", "image": str(PUCALLPA), "out": "${outputs}/forest.tif",
             "threshold": 0.6, "band_names": ["swir16", "nir", "red", "green"]},
            {"name": "report", "type": "report", "out": "${outputs}/report.html", "title": "summary test",
             "sections": [{"title": "Forest", "items": [
                 {"kind": "rgb", "path": str(LANDSAT)},
                 {"kind": "map", "path": "${outputs}/forest.tif", "label": "forest"}]}]},
        ],
    }
    path = tmp / "pipe.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    first = _cli("run", str(path), "--summary", cwd=tmp)
    second = _cli("run", str(path), "--summary", cwd=tmp)
    return {"path": path, "out": out, "first": first, "second": second, "tmp": tmp}


def _numbers(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^ {6}([^:\n]+(?::[^:\n]+)*?): (\S+)$", stdout, flags=re.M))


def _forest_ha(mask: Path) -> float:
    """Forest hectares of the mask, with geodesic pixel areas computed here (pyproj, row by row)."""
    geod = Geod(ellps="WGS84")
    with rasterio.open(mask) as ds:
        m = ds.read(1)
        t = ds.transform
    total = 0.0
    for r in range(m.shape[0]):
        n = int((m[r] == 1).sum())
        if n:
            x0, y0 = t * (0, r)
            x1, y1 = t * (1, r + 1)
            area, _ = geod.polygon_area_perimeter([x0, x1, x1, x0], [y0, y0, y1, y1])
            total += n * abs(area) / 1e4
    return total


def test_run_summary_prints_the_numbers_the_files_hold(pipeline: dict) -> None:
    first, second = pipeline["first"], pipeline["second"]
    assert first.returncode == 0, first.stderr
    out = pipeline["out"]
    s = first.stdout
    assert "summary:" in s
    assert re.search(r"^  tiles \(ingest, done, [\d.]+ s\)$", s, flags=re.M), s
    assert re.search(r"^  forest \(forest_mask, done, [\d.]+ s\)$", s, flags=re.M), s
    nums = _numbers(s)
    tiles = zarr.open_group(str(out / "tiles.zarr"), mode="r")
    n_tiles = int(tiles["tiles"].shape[0])
    assert n_tiles and int(nums["tiles in store"]) == n_tiles
    key = next(k for k in nums if "forest at date 1 (ha" in k)
    assert float(nums[key].replace(",", "")) == pytest.approx(_forest_ha(out / "forest.tif"), rel=2e-3)
    assert f"report: {out / 'report.html'}" in s
    # up to date on the second run: nothing re-ran, the same numbers are printed
    assert second.returncode == 0, second.stderr
    assert "0 stage(s) ran, 3 up to date" in second.stdout
    assert _numbers(second.stdout) == nums


@chromium
def test_report_command_checks_images_and_screenshots(pipeline: dict, tmp_path: Path) -> None:
    assert pipeline["first"].returncode == 0
    html = pipeline["out"] / "report.html"
    shot = tmp_path / "shot.png"
    r = _cli("report", str(html), "--screenshot", str(shot), "--size", "640x480", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    n = len(re.findall(r"<img ", html.read_text()))
    assert n >= 2 and f"{n}/{n} images loaded" in r.stdout
    import PIL.Image

    with PIL.Image.open(shot) as im:
        assert im.size == (640, 480)
        assert np.asarray(im.convert("L")).std() > 1  # not a blank page
    # a report with a broken image: exit 1, one line naming what failed
    text = html.read_text()
    first_png = re.search(r'data:image/png;base64,([A-Za-z0-9+/=]+)', text)
    assert first_png
    broken = tmp_path / "broken.html"
    broken.write_text(text.replace(first_png.group(1), base64.b64encode(b"not a png").decode(), 1))
    r = _cli("report", str(broken), cwd=tmp_path)
    assert r.returncode == 1
    assert "did not load" in r.stderr and str(broken) in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a missing file: one line naming it
    r = _cli("report", str(tmp_path / "nope.html"), cwd=tmp_path)
    assert r.returncode != 0 and "nope.html" in r.stderr and len(r.stderr.strip().splitlines()) == 1
