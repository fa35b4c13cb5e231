"""``dinov3geo change transitions``, ``dinov3geo landcover sample`` and ``dinov3geo landcover areas`` end to end
through :func:`dinov3geo.cli.main`: exit codes, one-line errors naming the files, inputs byte for byte untouched.

Until the lead wires :mod:`dinov3geo.cli.transitions` into the top-level parser, the ``cli`` fixture adds its
parsers to the real one (the same error handling, exit codes and messages as the installed command).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from rasterio.transform import from_origin

import dinov3geo.cli as cli_pkg
from dinov3geo.cli import main
from dinov3geo.cli.transitions import add_landcover_area_parsers, add_transitions_parser
from dinov3geo.io.grid import GridSpec
from dinov3geo.tasks.landcover.classes import ClassTable, LandClass, write_class_raster

TABLE = ClassTable([LandClass(1, "forest", "#006400"), LandClass(2, "herbaceous", "#ffff4c"),
                    LandClass(5, "water", "#0064c8")])
GRID = GridSpec("EPSG:32633", from_origin(500000, 4000000, 10, 10), 80, 60)


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


@pytest.fixture
def cli(monkeypatch):
    """``main`` with the transitions/sample/areas parsers present (added when the CLI does not wire them yet)."""
    real = cli_pkg.build_parser

    def build() -> argparse.ArgumentParser:
        p = real()
        top = _subparsers(p)
        change = _subparsers(top.choices["change"])
        if "transitions" not in change.choices:
            add_transitions_parser(change)
        if "landcover" not in top.choices:
            lc = top.add_parser("landcover", help="land cover")
            lc.add_subparsers(dest="landcover_command", metavar="ACTION")
        lcsub = _subparsers(top.choices["landcover"])
        if "areas" not in lcsub.choices:
            add_landcover_area_parsers(lcsub)
        cli_pkg._mark_commands(p)
        return p

    monkeypatch.setattr(cli_pkg, "build_parser", build)
    return main


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def maps(tmp_path):
    d = tmp_path / "mydata"
    d.mkdir()
    rng = np.random.default_rng(1)
    a = rng.choice(np.array(TABLE.codes, np.uint8), size=GRID.shape, p=[0.6, 0.3, 0.1])
    b = a.copy()
    b[10:30, 10:50] = 2
    p1 = write_class_raster(d / "lc2019.tif", a, GRID, TABLE)
    p2 = write_class_raster(d / "lc2023.tif", b, GRID, TABLE)
    (d / "notes.txt").write_text("plots 1-12\n")
    return d, p1, p2, a, b


def _one_error_line(err: str, command: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dinov3geo {command}: error: ")
    return lines[0]


def test_transitions_end_to_end(cli, maps, tmp_path, capsys):
    d, p1, p2, a, b = maps
    before = _tree(d)
    rc = cli(["-q", "change", "transitions", str(p1), str(p2), "--out", str(tmp_path / "out"), "--mmu-ha", "0.02"])
    assert rc == 0, capsys.readouterr().err
    m = pd.read_csv(tmp_path / "out" / "transition_matrix.csv", index_col=0)
    assert m.loc["forest", "herbaceous"] == pytest.approx(((a == 1) & (b == 2)).sum() * 0.01)
    assert m.to_numpy().sum() == pytest.approx(a.size * 0.01)
    poly = gpd.read_file(tmp_path / "out" / "transition_polygons.gpkg")
    assert (poly["area_ha"] >= 0.02).all() and set(poly["transition"]) <= {"forest -> herbaceous",
                                                                          "water -> herbaceous"}
    assert _tree(d) == before
    rc = cli(["change", "transitions", str(p1), str(p2), "--out", str(tmp_path / "out"), "--no-polygons"])
    out = capsys.readouterr().out
    assert rc == 0 and "forest -> herbaceous" in out and "changed" in out


def test_transitions_errors_are_one_line_and_touch_nothing(cli, maps, tmp_path, capsys):
    d, p1, p2, _, b = maps
    other = ClassTable([LandClass(1, "forest", "#006400"), LandClass(2, "grass", "#ffff4c"),
                        LandClass(5, "water", "#0064c8")])
    p3 = write_class_raster(d / "other.tif", b, GRID, other)
    before = _tree(d)
    rc = cli(["-q", "change", "transitions", str(p1), str(p3), "--out", str(tmp_path / "out")])
    line = _one_error_line(capsys.readouterr().err, "change transitions")
    assert rc == 1 and "lc2019.tif" in line and "other.tif" in line and "different class tables" in line
    assert not (tmp_path / "out").exists()
    rc = cli(["-q", "change", "transitions", str(p1), str(p2), "--out", str(d)])
    line = _one_error_line(capsys.readouterr().err, "change transitions")
    assert rc == 1 and "did not create" in line and str(d) in line
    rc = cli(["-q", "change", "transitions", str(p1), str(p2), "--out", str(p2)])
    line = _one_error_line(capsys.readouterr().err, "change transitions")
    assert rc == 1 and "it is the input" in line
    rc = cli(["change", "transitions", str(p1), str(p2), "--out", str(tmp_path / "o"), "--change-threshold", "0.3"])
    line = _one_error_line(capsys.readouterr().err, "change transitions")
    assert rc == 2 and "--change-threshold needs --change" in line
    rc = cli(["-q", "change", "transitions", str(p1), str(tmp_path / "missing.tif"), "--out", str(tmp_path / "o")])
    line = _one_error_line(capsys.readouterr().err, "change transitions")
    assert rc == 1 and "missing.tif" in line
    assert _tree(d) == before


def test_sample_then_areas(cli, maps, tmp_path, capsys):
    d, p1, _, a, _ = maps
    before = _tree(d)
    pts = tmp_path / "points.gpkg"
    rc = cli(["landcover", "sample", str(p1), "--n", "120", "--min-per-class", "30", "--seed", "3",
              "--out", str(pts)])
    assert rc == 0, capsys.readouterr().err
    g = gpd.read_file(pts)
    assert len(g) == 120 and g["map_class"].value_counts().min() >= 30
    # an interpreter labels the points: here the truth is the map, except 5 herbaceous points that are forest
    g["reference"] = g["map_class"]
    g.loc[g.index[g["map_class"] == "herbaceous"][:5], "reference"] = "forest"
    g.to_file(pts)
    rc = cli(["landcover", "areas", str(p1), "--reference", str(pts), "--out", str(tmp_path / "areas")])
    cap = capsys.readouterr()
    assert rc == 0 and "overall accuracy" in cap.out, cap.err
    t = pd.read_csv(tmp_path / "areas" / "areas.csv")
    mapped = {n: (a == c).sum() * 0.01 for c, n in zip(TABLE.codes, TABLE.names, strict=True)}
    row = t.set_index("name")
    assert row.loc["forest", "mapped_area_ha"] == pytest.approx(mapped["forest"])
    assert row.loc["forest", "area_ha"] > mapped["forest"]  # omission of forest in the map, corrected
    assert row.loc["overall", "area_ha"] == pytest.approx(a.size * 0.01)
    assert _tree(d) == before


def test_sample_and_areas_errors(cli, maps, tmp_path, capsys):
    d, p1, _, _, _ = maps
    before = _tree(d)
    rc = cli(["-q", "landcover", "sample", str(p1), "--n", "50", "--out", str(p1)])
    line = _one_error_line(capsys.readouterr().err, "landcover sample")
    assert rc == 1 and "it is the input" in line
    rc = cli(["-q", "landcover", "sample", str(p1), "--n", "20", "--out", str(tmp_path / "p.gpkg")])
    line = _one_error_line(capsys.readouterr().err, "landcover sample")
    assert rc == 1 and "--n" in line and "--min-per-class" in line and not (tmp_path / "p.gpkg").exists()
    pts = tmp_path / "pts.gpkg"
    gpd.GeoDataFrame({"label": ["forest"]}, geometry=gpd.points_from_xy([500105], [3999905]),
                     crs="EPSG:32633").to_file(pts)
    rc = cli(["-q", "landcover", "areas", str(p1), "--reference", str(pts), "--out", str(tmp_path / "a")])
    line = _one_error_line(capsys.readouterr().err, "landcover areas")
    assert rc == 1 and "pts.gpkg" in line and "no column 'reference'" in line and "--column" in line
    far = tmp_path / "far.gpkg"
    gpd.GeoDataFrame({"reference": ["forest", "water"]}, geometry=gpd.points_from_xy([0, 1], [0, 1]),
                     crs="EPSG:32633").to_file(far)
    rc = cli(["-q", "landcover", "areas", str(p1), "--reference", str(far), "--out", str(tmp_path / "a")])
    line = _one_error_line(capsys.readouterr().err, "landcover areas")
    assert rc == 1 and "far.gpkg" in line and "outside the map" in line and "lc2019.tif" in line
    assert not (tmp_path / "a").exists()
    assert _tree(d) == before
