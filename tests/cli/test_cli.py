"""The command line is a thin layer over the API: help, ingest, info, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dinov3geo.cli import main
from dinov3geo.ingest import TileStore


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "ingest" in out and "info" in out and "--quiet" in out and "--verbose" in out


def test_console_script_installed():
    exe = subprocess.run([sys.executable, "-m", "dinov3geo", "ingest", "--help"], capture_output=True, text=True)
    assert exe.returncode == 0 and "--tile" in exe.stdout and "--scheduler" in exe.stdout


def test_ingest_and_info(shared_data, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    rc = main(["-q", "ingest", str(shared_data / "landsat/rstoolbox_LT05_224063_1988"), "--out", str(out),
               "--tile", "64", "--bands", "red,nir"])
    assert rc == 0
    assert TileStore.open(out).band_names == ["red", "nir"]
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == "tile_store" and d["tiles"] > 0 and d["scenes"] == ["LT52240631988227CUB02"]
    assert main(["info", str(shared_data / "landsat/rasterio_RGB.byte.tif"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [b["name"] for b in d["bands"]] == ["red", "green", "blue"]


def test_errors_are_one_clear_line(shared_data, capsys):
    rc = main(["info", str(shared_data / "change_pairs/forestgapr_cauaxi_als_chm/ALS_CHM_CAU_2012.tif")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "ALS_CHM_CAU_2012.tif" in err and "CRS" in err and "Traceback" not in err
    assert main(["info", str(shared_data / "change_pairs/forestgapr_cauaxi_als_chm/ALS_CHM_CAU_2012.tif"),
                 "--assume-crs", "EPSG:31982"]) == 0
