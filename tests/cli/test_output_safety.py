"""Outputs never replace or delete the user's data: the CLI on real files, as a hostile user would run it.

Each case runs the real command and then checks, byte for byte, that every input (and every user file beside
it) is untouched, that the exit code is non-zero and the one-line message names the output and the input.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
import torch
from rasterio.transform import from_origin

from dinov3geo.cli import main
from dinov3geo.models import build_backbone, save_backbone
from dinov3geo.tasks.canopy.bins import HeightBins
from dinov3geo.tasks.canopy.dpt import DPTHead
from dinov3geo.tasks.canopy.model import CanopyHeightModel, save_canopy_model
from dinov3geo.utils.locks import lock_path

UTM = "EPSG:32619"
X0, Y0 = 320000.0, 4881000.0


def _tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (the evidence that nothing changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def scene(tmp_path, make_raster):
    """A user's folder: a small RGB image, their notes, an AOI."""
    d = tmp_path / "mydata"
    d.mkdir()
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (3, 96, 96), dtype=np.uint8)
    path = make_raster(d / "in.tif", img, crs=UTM, transform=from_origin(X0, Y0, 0.5, 0.5))
    (d / "notes.txt").write_text("field notes: plots 1-12\n")
    aoi = d / "stands.gpkg"
    gpd.GeoDataFrame({"stand": ["a"]}, geometry=[shapely.box(X0 + 5, Y0 - 40, X0 + 40, Y0 - 5)],
                     crs=UTM).to_file(aoi)
    return d, path, aoi


@pytest.fixture(scope="module")
def canopy_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    bb = build_backbone("vit_tiny_test", depth=2, num_heads=4)
    head = DPTHead(64, [8, 16, 32, 64], channels=16, n_hidden_channels=8, n_bins=8)
    model = CanopyHeightModel(bb, head, HeightBins(8, "linear", "softmax", 0.5, 40.0))
    return save_canopy_model(tmp_path_factory.mktemp("m") / "model.pt", model, bands=["red", "green", "blue"],
                             mean=[0.4, 0.4, 0.3], std=[0.2, 0.2, 0.2], value_scale=1 / 255)


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory) -> Path:
    return save_backbone(build_backbone("vit_tiny_test", depth=2, num_heads=4),
                         tmp_path_factory.mktemp("b") / "backbone.pt")


def _refused(capsys, argv: list[str], *needles: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0, f"{argv} was not refused"
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.mark.parametrize("target", ["folder", "input_folder", "tile_store"])
def test_features_never_wipes_a_folder_it_did_not_create(scene, backbone_file, tmp_path, capsys, target):
    d, img, _ = scene
    if target == "tile_store":
        from dinov3geo.ingest import ingest

        out = tmp_path / "tiles.zarr"
        ingest([img], out, tile_size=32, progress=False)
        watched = out
    else:
        out = d if target == "input_folder" else tmp_path / "user_folder"
        if target == "folder":
            out.mkdir()
            (out / "thesis.docx").write_bytes(b"chapter 1")
        watched = out
    before = _tree(watched), _tree(d)
    _refused(capsys, ["-q", "features", str(img), "--weights", str(backbone_file), "--out", str(out)],
             str(out))
    assert (_tree(watched), _tree(d)) == before
    assert not list(tmp_path.glob(".*.features.tif*")) and not list(d.glob(".*"))


def test_features_replaces_only_its_own_earlier_output(scene, backbone_file, tmp_path):
    _, img, _ = scene
    out = tmp_path / "feats.zarr"
    args = ["-q", "features", str(img), "--weights", str(backbone_file), "--out", str(out), "--window", "192"]
    assert main(args) == 0
    from dinov3geo.utils.outputs import folder_kind

    assert folder_kind(out) == "features" and not (out / ".dinov3geo.json").exists()  # known by its zarr.json
    assert main(args) == 0  # a re-run replaces the earlier output (ours, marked)
    assert (out / "zarr.json").is_file() and not list(tmp_path.glob(".feats.zarr.*"))


@pytest.mark.parametrize("case", ["out_is_image", "out_is_model", "summary_is_aoi", "out_in_input_store",
                                  "out_in_other_store"])
def test_canopy_predict_refuses_to_overwrite_inputs(scene, canopy_model, tmp_path, capsys, case):
    d, img, aoi = scene
    model = tmp_path / "model.pt"
    model.write_bytes(canopy_model.read_bytes())
    args = ["-q", "canopy", "predict", "--image", str(img), "--model", str(model), "--window", "192"]
    if case == "out_is_image":
        args += ["--out", str(img)]
    elif case == "out_is_model":
        args += ["--out", str(model)]
    elif case == "summary_is_aoi":
        args += ["--aoi", str(aoi), "--summary", str(aoi), "--out", str(tmp_path / "chm.tif")]
    else:
        from dinov3geo.ingest import ingest

        store = tmp_path / "tiles.zarr"
        ingest([img], store, tile_size=32, progress=False)
        args = ["-q", "canopy", "predict", "--image", str(store if case == "out_in_input_store" else img),
                "--model", str(model), "--window", "192", "--out", str(store / "chm.tif")]
    before = _tree(tmp_path)
    _refused(capsys, args, "cannot write output")
    assert _tree(tmp_path) == before  # nothing written, nothing changed (no lock file, parts folder or temp)


def test_all_nodata_image_is_refused_not_mapped(make_raster, canopy_model, tmp_path, capsys):
    img = make_raster(tmp_path / "empty.tif", np.zeros((3, 64, 64), np.uint8), crs=UTM,
                      transform=from_origin(X0, Y0, 0.5, 0.5), nodata=0)
    out = tmp_path / "chm.tif"
    _refused(capsys, ["-q", "canopy", "predict", "--image", str(img), "--model", str(canopy_model),
                      "--window", "192", "--out", str(out)], "no valid pixel", "empty.tif")
    assert not out.exists() and not list(tmp_path.glob(".chm*")) and not list(tmp_path.glob("chm*"))


def test_second_writer_of_one_output_is_refused_naming_the_first(make_raster, canopy_model, tmp_path):
    """A run holds the output (here: this test process, through the same lock a run takes); the CLI in
    another process is refused at once, naming the holder's pid, and writes nothing; once the holder is
    done, the same command maps the region."""
    import os

    import rasterio

    from dinov3geo.utils.locks import output_lock

    rng = np.random.default_rng(1)
    img = make_raster(tmp_path / "big.tif", rng.integers(1, 255, (3, 256, 256), dtype=np.uint8), crs=UTM,
                      transform=from_origin(X0, Y0, 0.5, 0.5))
    out = tmp_path / "chm.tif"
    cmd = [sys.executable, "-m", "dinov3geo.cli", "-q", "canopy", "predict", "--image", str(img),
           "--model", str(canopy_model), "--window", "192", "--out", str(out)]
    with output_lock(out, what="predict"):
        before = _tree(tmp_path)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stderr
        assert f"pid {os.getpid()}" in second.stderr and "another dinov3geo run" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
        assert _tree(tmp_path) == before
    assert not lock_path(out).exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with rasterio.open(out) as ds:
        assert ds.count == 2 and np.isfinite(ds.read(1)).all()
    assert not lock_path(out).exists()


@pytest.mark.parametrize("name", ["map", "map[1]*.tif"])
def test_output_names_without_suffix_or_with_glob_characters(make_raster, canopy_model, tmp_path, name):
    """The engine's clean-up of a killed run's temporary files once built a glob from the output name: an
    output without a suffix made it ``Invalid pattern: '**'``; glob characters matched other files."""
    img = make_raster(tmp_path / "img.tif", np.random.default_rng(2).integers(1, 255, (3, 64, 64), np.uint8),
                      crs=UTM, transform=from_origin(X0, Y0, 0.5, 0.5))
    neighbour = tmp_path / ".map.tmp-1-x.tif"  # looks like a stale temp of a dead process, but is not ours
    neighbour.write_bytes(b"user file")
    out = tmp_path / name
    assert main(["-q", "canopy", "predict", "--image", str(img), "--model", str(canopy_model), "--window", "192",
                 "--out", str(out)]) == 0
    assert out.is_file() and neighbour.read_bytes() == b"user file"


REPO_DATA = Path(__file__).resolve().parents[2] / "data" / "pucallpa"


def test_change_detect_refuses_a_user_folder_and_a_failed_run_leaves_no_folder(tmp_path, capsys):
    before, after = REPO_DATA / "pucallpa_2000.tif", REPO_DATA / "pucallpa_2020.tif"
    user = tmp_path / "mydata"
    user.mkdir()
    (user / "change.tif").write_bytes(b"my own map")
    snap = _tree(user)
    _refused(capsys, ["-q", "change", "detect", "--before", str(before), "--after", str(after),
                      "--out", str(user)], "did not create", str(user))
    assert _tree(user) == snap
    # an output folder that would hold an input is refused; a failing model leaves no empty folder behind
    _refused(capsys, ["-q", "change", "detect", "--before", str(before), "--after", str(after),
                      "--out", str(REPO_DATA)], "cannot write output")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "new" / "change"
    _refused(capsys, ["-q", "change", "detect", "--before", str(before), "--after", str(after), "--method",
                      "head", "--model", str(bad), "--out", str(out)], "bad.pt")
    assert not out.exists() and not (tmp_path / "new").exists()
