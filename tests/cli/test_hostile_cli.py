"""Hostile use of the command line: every failure is one named line, bad options are refused at parse time,
advice names options and values that work, Ctrl-C / closed pipes / library warnings stay clean (issue 15)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rasterio
from rasterio.transform import from_origin

import dinov3geo.cli.info as info_cmd
from dinov3geo.cli import INTERRUPTED, main

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data"
RGB = DATA / "landsat" / "rasterio_RGB.byte.tif"  # 791 x 718 px, 3 bands, EPSG:32618
NEON = DATA / "neon_bart_2019" / "2019_BART_5_320000_4881000_image_crop.tif"  # 1213 x 1106 px RGB, EPSG:32619
NEON_CHM = DATA / "neon_bart_2019" / "NEON_D01_BART_DP3_320000_4881000_CHM_crop.tif"
PUC = DATA / "pucallpa"

RAW_WARNING = re.compile(r"\.py:\d+: \w*Warning")  # Python's default "file.py:12: SomeWarning: ..." form
ANSI = "\x1b"


def _digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (inputs must be byte-for-byte untouched)."""
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _one_error(err: str, command: str) -> str:
    lines = _lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dinov3geo {command}: error: "), err
    assert "Traceback" not in err and ANSI not in err
    return lines[0]


def _interruptible() -> None:
    """In the child before exec: SIGINT back to its default, so that the CLI gets KeyboardInterrupt even when
    the test suite was started in the background by a shell (which makes its children ignore SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dinov3geo.cli", *args], env={**os.environ, **(env or {})},
                            preexec_fn=_interruptible, **kw)


@pytest.fixture
def no_crs(tmp_path) -> Path:
    """A real 160 x 160 px RGB crop of the NEON image, written without CRS (pixel-unit transform)."""
    with rasterio.open(NEON) as src:
        arr = src.read(window=((0, 160), (0, 160)))
        profile = src.profile
    profile.update(width=160, height=160, crs=None, transform=from_origin(0, 160, 1, 1))
    path = tmp_path / "nocrs.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(arr)
    return path


class Foreign:
    """A class a checkpoint must never be unpickled into."""


@pytest.fixture
def pickled_object(tmp_path) -> Path:
    import torch

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": Foreign()}, path)
    return path


@pytest.fixture(scope="module")
def canopy_model(tmp_path_factory) -> Path:
    """A tiny (random) canopy model file: ViT test backbone + light head, RGB."""
    import torch

    from dinov3geo.models import build_backbone
    from dinov3geo.tasks.canopy.heads import LightHead
    from dinov3geo.tasks.canopy.model import CanopyHeightModel, save_canopy_model

    torch.manual_seed(0)
    model = CanopyHeightModel(build_backbone("vit_tiny_test", depth=4, num_heads=4), LightHead(64, hidden=32))
    path = tmp_path_factory.mktemp("canopy_model") / "model.pt"
    return save_canopy_model(path, model, backbone_source="vit_tiny_test(random)", bands=["red", "green", "blue"],
                             mean=[0.4, 0.4, 0.3], std=[0.2, 0.15, 0.14], value_scale=1 / 255, gsd=None)


# ------------------------------------------------------------------------------ 3. options validated at parse time
@pytest.mark.parametrize("argv, option, says", [
    (["change", "detect", "--threshold", "nan"], "--threshold", "finite"),
    (["change", "detect", "--threshold", "inf"], "--threshold", "finite"),
    (["change", "detect", "--mmu-ha", "-1"], "--mmu-ha", ">= 0"),
    (["change", "detect", "--drop", "0"], "--drop", "> 0"),
    (["change", "detect", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["change", "detect", "--std", "1,0,1"], "--std", "> 0"),
    (["change", "detect", "--nodata", "inf"], "--nodata", "finite"),
    (["features", "IMG", "--window", "100"], "--window", "at least 112"),
    (["features", "IMG", "--window", "200"], "--window", "use 192 or 208"),
    (["features", "IMG", "--layers", "1,x"], "--layers", "'x'"),
    (["features", "IMG", "--value-scale", "-1"], "--value-scale", "> 0"),
    (["canopy", "predict", "--image", "IMG", "--window", "132"], "--window", "use 128 or 144"),
    (["canopy", "predict", "--image", "IMG", "--window", "64"], "--window", "at least 80"),
    (["canopy", "predict", "--image", "IMG", "--batch-size", "-2"], "--batch-size", ">= 1"),
    (["canopy", "predict", "--image", "IMG", "--overlap", "-1"], "--overlap", ">= 0"),
    (["canopy", "evaluate", "--pred", "IMG", "--truth", "IMG", "--bins", "0,5,2"], "--bins", "increasing"),
    (["canopy", "evaluate", "--pred", "IMG", "--truth", "IMG", "--band", "0"], "--band", ">= 1"),
    (["canopy", "evaluate", "--pred", "IMG", "--truth", "IMG", "--border", "-3"], "--border", ">= 0"),
    (["canopy", "summarise", "IMG", "--aoi", "A", "--cover-threshold", "nan"], "--cover-threshold", "finite"),
    (["pretrain", "cfg.yaml", "--max-steps", "0"], "--max-steps", ">= 1"),
    (["report", "r.html", "--size", "wide"], "--size", "WIDTHxHEIGHT"),
])
def test_bad_numbers_refused_while_parsing(argv, option, says, tmp_path, capsys):
    argv = [str(RGB) if a == "IMG" else a for a in argv]
    out = tmp_path / "out"
    needs = {"change": ["--before", str(PUC / "pucallpa_2000.tif"), "--after", str(PUC / "pucallpa_2020.tif")],
             "features": [], "canopy": [], "pretrain": [], "report": []}[argv[0]]
    if argv[0] in ("change", "features", "canopy") and "summarise" not in argv:
        needs = [*needs, "--out", str(out)]
    before = _digest(RGB, PUC)
    with pytest.raises(SystemExit) as e:
        main([*argv, *needs])
    assert e.value.code == 2
    command = " ".join(argv[:2]) if argv[0] in ("change", "canopy") else argv[0]
    line = _one_error(capsys.readouterr().err, command)
    assert f"argument {option}" in line and says in line, line
    assert not out.exists() and _digest(RGB, PUC) == before


def test_threshold_must_fit_the_method_and_nothing_is_written(tmp_path, capsys):
    base = ["change", "detect", "--before", str(PUC / "pucallpa_2000.tif"), "--after", str(PUC / "pucallpa_2020.tif"),
            "--out", str(tmp_path / "c")]
    assert main([*base, "--classic", "ndvi", "--threshold", "2.5"]) == 2
    line = _one_error(capsys.readouterr().err, "change detect")
    assert "--threshold 2.5" in line and "ndvi" in line and "<= 2" in line
    assert main([*base, "--method", "zeroshot", "--backbone", "b.pth", "--threshold", "1"]) == 2
    assert "< 1" in _one_error(capsys.readouterr().err, "change detect")
    assert main([*base, "--threshold", "-0.5"]) == 2
    assert "> 0" in _one_error(capsys.readouterr().err, "change detect")
    assert not (tmp_path / "c").exists()


def test_window_too_big_for_memory_refused_before_allocating(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DINOV3GEO_AVAILABLE_MEMORY", str(8 * 2**30))
    before = _digest(RGB, PUC)
    assert main(["features", str(RGB), "--out", str(tmp_path / "f.zarr"), "--window", "100000"]) == 2
    line = _one_error(capsys.readouterr().err, "features")
    assert "--window 100000" in line and "791 x 718 px" in line and "8.0 GiB is available" in line
    need = float(re.search(r"at least ([\d.]+) GiB", line).group(1))
    assert need >= 3 * 100000**2 / 2**30  # at least the raw window of 3 uint8 bands
    assert "--window 800 covers it" in line  # a valid window (multiple of 16 >= 791)
    assert main(["change", "detect", "--before", str(PUC / "pucallpa_2000.tif"), "--after",
                 str(PUC / "pucallpa_2020.tif"), "--out", str(tmp_path / "c"), "--window", "100000"]) == 2
    line = _one_error(capsys.readouterr().err, "change detect")
    assert "--window 100000" in line and "697 x 377 px" in line and "GiB" in line
    assert main(["canopy", "predict", "--image", str(RGB), "--model", "m.pt", "--out", str(tmp_path / "p.tif"),
                 "--window", "65536", "--batch-size", "64"]) == 2
    assert "--window 65536" in _one_error(capsys.readouterr().err, "canopy predict")
    assert not any(tmp_path.iterdir()) and _digest(RGB, PUC) == before


def test_available_memory_is_known():
    from dinov3geo.cli._types import available_memory

    assert (available_memory() or 0) > 2**20


def test_window_advice_and_help_agree_with_the_models():
    """The minimum windows the CLI accepts (and its help states) are what the engine accepts."""

    import torch

    from dinov3geo.cli import canopy as canopy_cli
    from dinov3geo.cli import features as features_cli
    from dinov3geo.inference.engine import make_layout
    from dinov3geo.inference.layout import min_window
    from dinov3geo.inference.models import BackboneFeatures
    from dinov3geo.models import build_backbone
    from dinov3geo.tasks.canopy.heads import LightHead
    from dinov3geo.tasks.canopy.model import CanopyHeightModel, CanopyRasterModel

    bb = build_backbone("vit_tiny_test")
    rm = CanopyRasterModel(CanopyHeightModel(bb, LightHead(64, hidden=32)))
    margin = rm.receptive_margin  # the default for a ViT (a ConvNeXt's is wider: the engine's advice covers it)
    assert margin == canopy_cli.RECEPTIVE_MARGIN
    assert min_window(1, margin, canopy_cli.WINDOW_MULTIPLE) == canopy_cli.MIN_WINDOW
    make_layout(rm, 500, 500, window=canopy_cli.MIN_WINDOW)  # accepted
    with pytest.raises(ValueError):
        make_layout(rm, 500, 500, window=canopy_cli.MIN_WINDOW - canopy_cli.WINDOW_MULTIPLE)
    with torch.no_grad():  # the advised values run through the model
        rm(torch.zeros(1, 3, 144, 144), torch.ones(1, 144, 144, dtype=torch.bool))
    bf = BackboneFeatures(bb)
    assert (bf.scale, bf.receptive_margin) == (features_cli.PATCH, features_cli.RECEPTIVE_MARGIN)
    assert min_window(bf.scale, bf.receptive_margin, features_cli.PATCH) == features_cli.MIN_WINDOW
    make_layout(bf, 500, 500, window=features_cli.MIN_WINDOW)
    with pytest.raises(ValueError):
        make_layout(bf, 500, 500, window=features_cli.MIN_WINDOW - features_cli.PATCH)
    from dinov3geo.cli import build_parser

    helps = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0].choices["canopy"]
             ._subparsers._group_actions[0].choices["predict"]._actions}
    assert "multiple of 16" in helps["window"] and f"at least {canopy_cli.MIN_WINDOW}" in helps["window"]
    assert "32" not in helps["window"]


# ------------------------------------------------------------------------------ 2. advice names what works
def test_canopy_predict_and_features_take_assume_crs(no_crs, canopy_model, tmp_path, capsys):
    before = _digest(no_crs, canopy_model)
    for argv, cmd in ((["canopy", "predict", "--image", str(no_crs), "--model", str(canopy_model), "--out",
                        str(tmp_path / "p.tif"), "--window", "160"], "canopy predict"),
                      (["features", str(no_crs), "--out", str(tmp_path / "f.zarr"), "--arch", "vit_tiny_test",
                        "--window", "160", "--no-pca"], "features")):
        assert main(["-q", *argv]) == 1
        line = _one_error(capsys.readouterr().err, cmd)
        assert "nocrs.tif" in line and "--assume-crs" in line  # the hint names an option the command has
        assert main(["-q", *argv, "--assume-crs", "EPSG:32619"]) == 0, capsys.readouterr().err
    with rasterio.open(tmp_path / "p.tif") as ds:
        assert ds.crs.to_epsg() == 32619 and ds.count == 2 and ds.shape == (160, 160)
    assert "32619" in (tmp_path / "f.zarr" / "spatial_ref" / "zarr.json").read_text()  # the CRS given
    assert _digest(no_crs, canopy_model) == before


def test_canopy_train_crs_hint_names_the_config_key(no_crs, tmp_path, capsys):
    chm_no_crs = tmp_path / "chm_nocrs.tif"
    with rasterio.open(NEON_CHM) as src:
        arr, profile = src.read(), src.profile
    profile.update(crs=None)
    with rasterio.open(chm_no_crs, "w", **profile) as dst:
        dst.write(arr)
    before = _digest(no_crs, chm_no_crs)
    cfg = {"data": {"pairs": [{"image": str(NEON), "chm": str(chm_no_crs)}]},
           "model": {"backbone": "random:vit_tiny_test", "head": "light"}, "train": {"epochs": 1}}
    for k, pair in enumerate(({"image": str(NEON), "chm": str(chm_no_crs)}, {"image": str(no_crs), "chm": str(NEON_CHM)})):
        cfg["data"]["pairs"] = [pair]
        cfg["out"] = str(tmp_path / f"run{k}")
        path = tmp_path / f"train{k}.yaml"
        path.write_text(json.dumps(cfg))
        assert main(["-q", "canopy", "train", str(path)]) == 1
        line = _one_error(capsys.readouterr().err, "canopy train")
        assert "no coordinate reference system" in line and "data.pairs[0]" in line and "assume_crs" in line
        assert "--truth-crs" not in line and "--assume-crs" not in line
    # the key is read: with it, the CRS error is gone (the pixel-unit image then lies far from the CHM)
    cfg["data"]["pairs"] = [{"image": str(no_crs), "chm": str(NEON_CHM), "assume_crs": "EPSG:32619"}]
    cfg["out"] = str(tmp_path / "run2")
    (tmp_path / "train2.yaml").write_text(json.dumps(cfg))
    assert main(["-q", "canopy", "train", str(tmp_path / "train2.yaml")]) == 1
    line = _one_error(capsys.readouterr().err, "canopy train")
    assert "coordinate reference system" not in line and "overlap" in line
    assert _digest(no_crs, chm_no_crs) == before


@pytest.mark.parametrize("argv, command", [
    (["canopy", "train", "CFG"], "canopy train"),
    (["pretrain", "CFG"], "pretrain"),
])
def test_malformed_yaml_names_file_and_line(argv, command, tmp_path, capsys):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("data:\n  pairs: [\n    {image: a.tif\nmodel: {backbone: x}\n")
    before = _digest(cfg)
    assert main([str(cfg) if a == "CFG" else a for a in argv]) == 1
    line = _one_error(capsys.readouterr().err, command)
    assert f"{cfg} line 4, column 6" in line and "not valid YAML" in line and "line 3" in line
    assert "<unicode string>" not in line
    assert _digest(cfg) == before


def test_checkpoint_errors_never_advise_unsafe_loading(pickled_object, tmp_path, capsys):
    before = _digest(pickled_object)
    for argv, command in (
        (["features", str(RGB), "--out", str(tmp_path / "f.zarr"), "--weights", str(pickled_object)], "features"),
        (["canopy", "predict", "--image", str(RGB), "--model", str(pickled_object), "--out", str(tmp_path / "p.tif")],
         "canopy predict"),
        (["change", "detect", "--before", str(PUC / "pucallpa_2000.tif"), "--after", str(PUC / "pucallpa_2020.tif"),
          "--out", str(tmp_path / "c"), "--method", "head", "--model", str(pickled_object)], "change detect"),
    ):
        assert main(["-q", *argv]) == 1
        line = _one_error(capsys.readouterr().err, command)
        assert "evil.pt" in line and "Foreign" in line and "weights-only" in line
        assert line.count("never unpickles") == 1 and line.count("Foreign") == 1  # said once
        low = line.lower()
        assert "weights_only=false" not in low and "set to `false`" not in low and "likely succeed" not in low
        assert "trust" not in low and "add_safe_globals" not in line
    assert _digest(pickled_object) == before
    assert not (tmp_path / "f.zarr").exists() and not (tmp_path / "p.tif").exists()


# ------------------------------------------------------------------------------ 4. output checked before the work
def test_features_output_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("keep me\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    before = _digest(blocker, mine, RGB)
    for out, says in ((blocker / "f.zarr", "is a file, not a folder"), (mine, "did not create")):
        t0 = time.monotonic()
        rc = main(["features", str(RGB), "--out", str(out)])
        line = _one_error(capsys.readouterr().err, "features")
        assert rc in (1, 2) and says in line and str(out.name) in line and "[Errno" not in line
        assert time.monotonic() - t0 < 30  # refused up front, not after the extraction
    assert _digest(blocker, mine, RGB) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "mine"]


# ------------------------------------------------------------------------------ 1. error reporting of main
def test_quiet_failure_is_still_explained(tmp_path, capsys, monkeypatch):
    # end to end: every scene skipped (no 'nir' band) under -q
    out = tmp_path / "s.zarr"
    before = _digest(RGB)
    assert main(["-q", "ingest", str(RGB), "--out", str(out), "--bands", "nir"]) == 1
    cap = capsys.readouterr()
    assert cap.out == "" and "nir" in cap.err and "error:" in cap.err and "Traceback" not in cap.err
    assert _digest(RGB) == before

    # whatever a command returns non-zero without printing is explained by main, once
    import logging

    def silent_with_warning(args):
        logging.getLogger("dinov3geo.test").warning("band 'nir' not found in %s", args.source)
        return 1

    monkeypatch.setattr(info_cmd, "run", silent_with_warning)
    assert main(["-q", "info", "x.tif"]) == 1
    line = _one_error(capsys.readouterr().err, "info")
    assert "band 'nir' not found in x.tif" in line
    monkeypatch.setattr(info_cmd, "run", lambda args: 3)
    assert main(["info", "x.tif"]) == 3
    assert "exit status 3" in _one_error(capsys.readouterr().err, "info")

    def explains_itself(args):
        print("dinov3geo info: error: said it myself", file=sys.stderr)
        return 1

    monkeypatch.setattr(info_cmd, "run", explains_itself)
    assert main(["info", "x.tif"]) == 1
    assert "said it myself" in _one_error(capsys.readouterr().err, "info")  # not repeated


def test_error_messages_are_one_clean_line(monkeypatch, capsys):
    def fails(args):
        raise ValueError("\x1b[1mbold\x1b[0m problem\n\twith details (CLI: --no-such-option) (CLI: --assume-crs)")

    monkeypatch.setattr(info_cmd, "run", fails)
    assert main(["info", "x.tif"]) == 1
    line = _one_error(capsys.readouterr().err, "info")
    assert line == "dinov3geo info: error: bold problem with details (CLI: --assume-crs)"
    assert main(["-v", "info", "x.tif"]) == 1  # -v: the traceback too, then the same line
    err = capsys.readouterr().err
    assert "Traceback" in err and _lines(err)[-1] == line.replace(ANSI, "")

    def raw_oserror(args):
        raise FileExistsError(17, "File exists", "/tmp/some/file")

    monkeypatch.setattr(info_cmd, "run", raw_oserror)
    assert main(["info", "x.tif"]) == 1
    line = _one_error(capsys.readouterr().err, "info")
    assert "[Errno" not in line and "/tmp/some/file: File exists" in line


def test_group_without_action_names_the_actions(capsys):
    assert main(["change"]) == 2
    cap = capsys.readouterr()
    assert "detect" in cap.out
    assert "detect, train" in _one_error(cap.err, "change")


def test_closed_stdout_ends_quietly(tmp_path):
    from dinov3geo.ingest import ingest

    store = tmp_path / "s.zarr"
    ingest([RGB], store, tile_size=64, progress=False)
    r, w = os.pipe()
    os.close(r)  # `| head -0`: the reader is gone before the first write
    proc = _cli("info", str(store), "--json", stdout=w, stderr=subprocess.PIPE, text=True)
    os.close(w)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and err == ""


def test_library_warnings_are_clean_log_lines_shown_with_v(shared_data, capsys):
    import warnings

    png = shared_data / "change_pairs/levir_cd_samples/A/test_2_0000_0000.png"  # not georeferenced
    errs = []
    for verbose in ([], ["-v"]):
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # as outside pytest (whose config ignores this warning)
            assert main([*verbose, "info", str(png), "--assume-crs", "EPSG:32650"]) == 1
        errs.append(capsys.readouterr().err)
    err_q, err_v = errs
    for err in errs:
        assert not RAW_WARNING.search(err), err
        assert _lines(err)[-1].startswith("dinov3geo info: error: ") and "test_2_0000_0000.png" in err
    assert "NotGeoreferencedWarning" not in err_q  # another library's warning: shown with -v only
    shown = [ln for ln in _lines(err_v) if "NotGeoreferencedWarning" in ln]
    assert len(shown) == 1 and shown[0].startswith("INFO py.warnings: NotGeoreferencedWarning: ")
    assert re.search(r"\(rasterio/\S+\.py:\d+\)$", shown[0])

    def ours(args):  # a warning raised by dinov3geo's own code (this module's): a WARNING line by default
        warnings.warn_explicit("\x1b[33mcoloured\x1b[0m advice\nover two lines", UserWarning, mod.__file__, 7)
        return 0

    import dinov3geo.cli.info as mod

    old = mod.run
    mod.run = ours
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            assert main(["info", "x"]) == 0
    finally:
        mod.run = old
    (line,) = _lines(capsys.readouterr().err)
    assert line == "WARNING py.warnings: UserWarning: coloured advice over two lines (dinov3geo/cli/info.py:7)"


def _interrupt_when(proc: subprocess.Popen, ready, timeout: float = 300) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"the run ended (rc {proc.returncode}) before it could be interrupted:\n{out}\n{err}")
            assert time.monotonic() < deadline, "the run never got going"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        return proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_ctrl_c_in_engine_threads_is_one_line(tmp_path):
    before = _digest(NEON)
    proc = _cli("-q", "features", str(NEON), "--out", str(tmp_path / "f.zarr"), "--window", "512",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = _interrupt_when(proc, lambda: any(tmp_path.glob(".*.parts/*")))
    assert proc.returncode == 130, err
    assert _lines(err) == [INTERRUPTED], err
    assert "Traceback" not in err and not (tmp_path / "f.zarr").exists()
    assert _digest(NEON) == before


def test_ctrl_c_in_lightning_is_one_line(tmp_path):
    """Lightning catches the KeyboardInterrupt and calls sys.exit(1): still the one line, exit status 130."""
    from dinov3geo.ingest import ingest

    store = tmp_path / "neon.zarr"
    ingest([NEON], store, tile_size=64, progress=False)
    cfg = {
        "data": {"batch_size": 2, "num_workers": 0, "store": str(store)},
        "student": {"arch": "vit_tiny_test"},
        "crops": {"global_crops_size": 64, "local_crops_size": 32, "local_crops_number": 2},
        "dino": {"head_n_prototypes": 128, "head_hidden_dim": 64, "head_bottleneck_dim": 32},
        "ibot": {"head_n_prototypes": 128, "head_hidden_dim": 64, "head_bottleneck_dim": 32},
        "optim": {"iterations": 100000},
        "train": {"checkpoint_every": 1, "log_every": 1, "health_every": 100000, "progress_bar": False,
                  "output_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "pt.yaml"
    path.write_text(json.dumps(cfg))
    proc = _cli("pretrain", str(path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = _interrupt_when(proc, lambda: (tmp_path / "run" / "checkpoints" / "last.ckpt").exists())
    assert proc.returncode == 130, err
    assert _lines(err) == [INTERRUPTED], err  # no Lightning banners, no "Detected KeyboardInterrupt", no traceback
