"""Hostile pipelines (issue 15, "every failure named, nothing lost"): `dinov3geo run` on real rasters.

1. a stage whose output is (or contains, or lies inside) what the pipeline reads, another stage's output, the
   outputs folder, the manifest or the pipeline file is refused before anything runs (it used to overwrite the
   input and exit 0);
2. a rebuild (``--force``, changed inputs) never deletes what dinov3geo did not create (an ingest stage writing
   its sources folder used to delete the imagery; canopy stages deleted the old model/map before rebuilding);
3. ``out: ${outputs}`` is refused (``--force=STAGE`` used to delete the whole outputs folder);
4. the outputs folder is marked as ours and locked for the whole run: a foreign folder is refused, a second run
   on the same folder is refused naming the first;
5. a run killed (``kill -9``) or interrupted (Ctrl-C) mid-stage is completed by a re-run, with the outputs of an
   uninterrupted run; an interrupted rebuild stays a rebuild;
6. malformed YAML is one line naming the file and the line.

Every refusal is checked end to end through the CLI: exit code, one readable line on stderr, and every file
under the test folder byte for byte as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rasterio
import yaml
from rasterio.windows import Window

from dinov3geo.cli import main as cli_main
from dinov3geo.ingest import TileStore
from dinov3geo.ingest.ingest import HOLD_FILE_ENV, HOLD_TILES_ENV
from dinov3geo.pipelines import PipelineError, load_pipeline, read_manifest, register_stage, run_pipeline
from dinov3geo.utils.locks import lock_path, read_holder
from dinov3geo.utils.outputs import MARKER, folder_kind

ROOT = Path(__file__).resolve().parents[2]
PUC = ROOT / "data" / "pucallpa"  # bundled Landsat composites of Pucallpa (Peru), 2000 and 2020
NAMES = ["swir16", "nir", "red", "green"]


# ------------------------------------------------------------------------------------------------ helpers
def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder``, hidden ones included (relative path -> content digest; links by target)."""
    return {str(p.relative_to(folder)): (f"-> {os.readlink(p)}" if p.is_symlink() else _digest(p))
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def _crop(year: int, dst: Path) -> Path:
    """A real 160 x 96 px crop (4 bands) of the bundled Pucallpa composite of ``year``."""
    with rasterio.open(PUC / f"pucallpa_{year}.tif") as ds:
        win = Window(380, 230, 160, 96)
        arr, crs, tr = ds.read(window=win), ds.crs, ds.window_transform(win)
    with rasterio.open(dst, "w", driver="GTiff", width=160, height=96, count=4, dtype="uint8", crs=crs,
                       transform=tr, nodata=0, photometric="MINISBLACK") as out:
        out.write(arr)
    return dst


def _write(path: Path, stages: list[dict], **top: object) -> Path:
    pipe = {"name": "p", "outputs": "out", **top, "stages": stages}
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return path


def _mask(name: str, image: str, out: str, **kw: object) -> dict:
    return {"name": name, "type": "forest_mask", "image": image, "out": out, "band_names": NAMES,
            "threshold": 0.78, **kw}


def _ingest(name: str, sources: list[str], out: str, **kw: object) -> dict:
    return {"name": name, "type": "ingest", "sources": sources, "out": out, "tile_size": 32, "workers": 1, **kw}


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``dinov3geo -q ARGS`` in this process: (exit code, stderr)."""
    capsys.readouterr()
    rc = cli_main(["-q", *args])
    return rc, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _interruptible() -> None:
    """In the child before exec: SIGINT back to its default, so that the CLI gets KeyboardInterrupt even when
    the test suite was started in the background by a shell (which makes its children ignore SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dinov3geo.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            preexec_fn=_interruptible)


def _wait_for(proc: subprocess.Popen, flag: Path, timeout: float = 180) -> None:
    """Wait until the held run reached its hold point (the ingest test hook created ``flag``)."""
    deadline = time.monotonic() + timeout
    while not flag.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before its hold point:\n{out}\n{err}")
        assert time.monotonic() < deadline, "the run never reached its hold point"
        time.sleep(0.05)


def _store(path: Path) -> dict[str, object]:
    """What two equal tile stores share: tile and mask chunk files byte for byte, the ledger, the count."""
    ts = TileStore.open(path)
    return {"n_tiles": ts.n_tiles, "scenes": ts.scenes, "pending": ts.group.attrs.get("pending"),
            "tiles": {k: v for k, v in _tree(path / "tiles").items() if k != "zarr.json"},
            "valid": {k: v for k, v in _tree(path / "valid").items() if k != "zarr.json"}}


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working folder (current directory): a.tif (2000) and b.tif (2020), and scenes/ holding a copy."""
    monkeypatch.chdir(tmp_path)
    _crop(2000, tmp_path / "a.tif")
    _crop(2020, tmp_path / "b.tif")
    (tmp_path / "scenes").mkdir()
    _crop(2000, tmp_path / "scenes" / "a.tif")
    return tmp_path


# ------------------------------------------------------------------- 1. outputs that would destroy inputs
def _link(ws: Path, name: str, hard: bool) -> None:
    (os.link if hard else os.symlink)(ws / "a.tif", ws / name)


CONFLICTS = {
    # id: (stages, extra setup, what the one line must say)
    "out_is_own_input": (
        [_mask("forest", "a.tif", "a.tif")], None,
        "stage 'forest' (type forest_mask): output 'a.tif' (parameter 'out') is its input 'a.tif' "
        "(parameter 'image'): it would be overwritten"),
    "out_is_a_symlink_to_the_input": (
        [_mask("forest", "a.tif", "link.tif")], lambda ws: _link(ws, "link.tif", hard=False),
        "output 'link.tif' (parameter 'out') is its input 'a.tif'"),
    "out_is_a_hard_link_to_the_input": (
        [_mask("forest", "a.tif", "hard.tif")], lambda ws: _link(ws, "hard.tif", hard=True),
        "output 'hard.tif' (parameter 'out') is its input 'a.tif'"),
    "out_is_an_earlier_stages_input": (
        [_mask("one", "b.tif", "${outputs}/one.tif"), _mask("two", "a.tif", "b.tif")], None,
        "stage 'two' (type forest_mask): output 'b.tif' (parameter 'out') is the input 'b.tif' of the earlier "
        "stage 'one' (parameter 'image')"),
    "two_stages_write_one_output": (
        [_mask("one", "a.tif", "${outputs}/m.tif"), _mask("two", "b.tif", "${outputs}/m.tif")], None,
        "stage 'two' (type forest_mask): output 'out/m.tif' (parameter 'out') is also the output of stage 'one'"),
    "out_is_the_pipeline_file": (
        [_mask("forest", "a.tif", "p.yaml")], None,
        "output 'p.yaml' (parameter 'out') is the pipeline file 'p.yaml'"),
    "out_is_the_outputs_folder": (
        [_mask("forest", "a.tif", "${outputs}")], None,
        "output 'out' (parameter 'out') is the pipeline's outputs folder 'out' (key 'outputs'), which holds the "
        "manifest pipeline-p.json"),
    "out_is_the_manifest": (
        [_mask("forest", "a.tif", "${outputs}/pipeline-p.json")], None,
        "output 'out/pipeline-p.json' (parameter 'out') is the pipeline's manifest"),
    "store_contains_the_outputs_folder_and_inputs": (
        [_ingest("tiles", ["a.tif"], ".")], None,
        "output '.' (parameter 'out') contains the pipeline's outputs folder"),
    "store_is_its_sources_folder": (
        [_ingest("tiles", ["scenes"], "scenes")], None,
        "stage 'tiles' (type ingest): output 'scenes' (parameter 'out') is its input 'scenes' "
        "(parameter 'sources')"),
    "store_contains_its_source": (
        [_ingest("tiles", ["scenes/a.tif"], "scenes")], None,
        "output 'scenes' (parameter 'out') contains its input 'scenes/a.tif' (parameter 'sources'): it would be "
        "deleted"),
    "store_inside_its_sources_folder": (
        [_ingest("tiles", ["scenes"], "scenes/t.zarr")], None,
        "output 'scenes/t.zarr' (parameter 'out') lies inside its input 'scenes'"),
    "mask_inside_an_earlier_stages_source_folder": (
        [_ingest("tiles", ["scenes"], "${outputs}/t.zarr"), _mask("forest", "a.tif", "scenes/mask.tif")], None,
        "stage 'forest' (type forest_mask): output 'scenes/mask.tif' (parameter 'out') lies inside the input "
        "'scenes' of the earlier stage 'tiles'"),
    "change_folder_is_the_outputs_folder": (
        [{"name": "change", "type": "change_detect", "image_before": "a.tif", "image_after": "b.tif",
          "band_names": NAMES, "out_dir": "${outputs}", "classic_method": "ndvi"}], None,
        "stage 'change' (type change_detect): folder 'out' (parameter 'out_dir') is the pipeline's outputs folder"),
    "change_folder_is_an_input": (
        [{"name": "change", "type": "change_detect", "image_before": "scenes", "image_after": "b.tif",
          "band_names": NAMES, "out_dir": "scenes", "classic_method": "ndvi"}], None,
        "folder 'scenes' (parameter 'out_dir') is its input 'scenes' (parameter 'image_before')"),
}


@pytest.mark.parametrize("case", list(CONFLICTS))
def test_conflicting_outputs_are_refused_before_anything_runs(ws: Path, case: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    stages, setup, message = CONFLICTS[case]
    if setup is not None:
        setup(ws)
    path = _write(ws / "p.yaml", stages)
    before = _tree(ws)
    for args in (["run", "p.yaml"], ["run", "p.yaml", "--force"]):
        rc, err = _cli(args, capsys)
        line = _one_line(err)
        assert rc == 1 and line.startswith("dinov3geo run: error: p.yaml: ") and message in line, line
        assert "nothing was run" in line
        assert _tree(ws) == before  # inputs byte for byte; no outputs folder, manifest or lock file
    with pytest.raises(PipelineError, match="nothing was run"):
        load_pipeline(path)


def test_reading_earlier_outputs_and_writing_into_folders_is_fine(ws: Path) -> None:
    """What the check must not refuse: a stage reading an earlier stage's output, a later stage writing a file
    into an earlier stage's folder, an input inside a stage's own folder, and a stage reading the outputs folder."""
    stages = [
        _mask("forest", "a.tif", "${outputs}/forest.tif"),
        {"name": "change", "type": "change_detect", "image_before": "a.tif", "image_after": "b.tif",
         "band_names": NAMES, "out_dir": "${outputs}/change", "classic_method": "ndvi",
         "forest_mask": "${outputs}/forest.tif", "mmu_ha": 1.0},
        _mask("again", "${outputs}/change/change.tif", "${outputs}/change/extra.tif", band_names=None,
              red=1, nir=1),
        {"name": "report", "type": "report", "out": "${outputs}/report.html",
         "sections": [{"title": "Files", "kind": "links", "paths": ["${outputs}", "${outputs}/forest.tif"]}]},
    ]
    p = load_pipeline(_write(ws / "p.yaml", stages))
    assert [s.name for s in p.stages] == ["forest", "change", "again", "report"]


# ------------------------------------------------------------------- 2. rebuilds never delete what is not ours
def test_ingest_into_its_sources_folder_with_force_deletes_nothing(ws: Path, capsys) -> None:
    """It used to: `run --force` removed the sources folder (the imagery), then failed."""
    _write(ws / "p.yaml", [_ingest("tiles", ["scenes"], "scenes")])
    before = _tree(ws)
    rc, err = _cli(["run", "p.yaml", "--force"], capsys)
    assert rc == 1 and "output 'scenes' (parameter 'out') is its input 'scenes'" in _one_line(err)
    assert _tree(ws) == before


def test_rebuild_refuses_a_folder_dinov3geo_did_not_create(ws: Path, capsys) -> None:
    """An ingest stage whose store path holds a user's folder: neither a run nor `--force` deletes it."""
    mine = ws / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("field notes")
    _crop(2020, mine / "plot.tif")
    _write(ws / "p.yaml", [_ingest("tiles", ["a.tif"], "mine")])
    before = _tree(mine)
    for args in (["run", "p.yaml", "--force"], ["run", "p.yaml"], ["run", "p.yaml", "--force=tiles"]):
        rc, err = _cli(args, capsys)
        line = _one_line(err)
        assert rc == 1 and "stage 'tiles' (type ingest) failed" in line and "output 'mine'" in line, line
        assert "did not create" in line
        assert _tree(mine) == before
    assert "tiles" not in read_manifest(load_pipeline("p.yaml"))["stages"]


def test_pretrain_rebuild_refuses_to_move_a_foreign_folder(ws: Path, capsys) -> None:
    """A pretrain stage's rebuild moves its old run aside: never a folder that is not a pretraining run."""
    (ws / "ssl.yaml").write_text(yaml.safe_dump({"optim": {"iterations": 2}}))
    mine = ws / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("chapter 1")
    _write(ws / "p.yaml", [{"name": "ssl", "type": "pretrain", "config": "ssl.yaml", "store": "a.zarr",
                            "output_dir": "mine"}])
    rc, err = _cli(["run", "p.yaml", "--force"], capsys)
    line = _one_line(err)
    assert rc == 1 and "stage 'ssl' (type pretrain) failed" in line and "output 'mine'" in line, line
    assert "not a pretraining run folder that dinov3geo created" in line
    assert _tree(mine) == {"thesis.txt": _digest(mine / "thesis.txt")}
    assert not (ws / "mine.previous").exists()


def test_failed_canopy_rebuilds_keep_the_previous_model_and_map(ws: Path, capsys) -> None:
    """A forced canopy_train / canopy_predict that fails leaves the previous model and map as they were (they
    used to be deleted before the rebuild started)."""
    (ws / "model.pt").write_text("not a model")  # the map stage fails loading it
    _write(ws / "train.yaml", [{"name": "train", "type": "canopy_train", "out": "${outputs}/canopy",
                                "config": {"data": {"pairs": [{"image": "gone.tif", "chm": "gone_chm.tif"}]},
                                           "model": {"backbone": "random:vit_tiny_test"}}}])
    _write(ws / "map.yaml", [{"name": "map", "type": "canopy_predict", "image": "a.tif", "model": "model.pt",
                              "out": "${outputs}/chm.tif", "device": "cpu"}], name="m")
    for f in ("train.yaml", "map.yaml"):
        assert _cli(["run", f], capsys)[0] == 1  # creates (and marks) the outputs folder, then fails
    # the products of an earlier, successful run
    (ws / "out" / "canopy" / "model.pt").write_bytes(b"trained head")
    (ws / "out" / "canopy" / "last.pt").write_bytes(b"last epoch")
    _crop(2020, ws / "out" / "chm.tif")
    before = _tree(ws)
    for f in ("train.yaml", "map.yaml"):
        rc, err = _cli(["run", f, "--force"], capsys)
        assert rc == 1 and "failed" in _one_line(err)
    after = _tree(ws)
    for name in ("out/canopy/model.pt", "out/canopy/last.pt", "out/chm.tif", "a.tif", "model.pt"):
        assert after[name] == before[name], name


# ---------------------------------------------------------------------- 3. out: ${outputs} with --force=STAGE
@pytest.mark.parametrize("stage", [
    _ingest("tiles", ["a.tif"], "${outputs}"),
    {"name": "tiles", "type": "report", "out": "${outputs}", "sections": [{"title": "x", "text": "y"}]},
    {"name": "tiles", "type": "canopy_evaluate", "pred": "a.tif", "truth": "b.tif", "out_dir": "${outputs}"},
], ids=["ingest", "report", "canopy_evaluate"])
def test_stage_writing_the_outputs_folder_cannot_wipe_it(ws: Path, stage: dict, capsys) -> None:
    """`run --force=STAGE` with `out: ${outputs}` used to delete the outputs folder (the other stages' outputs
    and the manifest), then fail."""
    _write(ws / "p.yaml", [_mask("forest", "a.tif", "${outputs}/forest.tif")])
    assert _cli(["run", "p.yaml"], capsys)[0] == 0
    _write(ws / "p.yaml", [_mask("forest", "a.tif", "${outputs}/forest.tif"), stage])
    before = _tree(ws)
    assert {"out/forest.tif", "out/pipeline-p.json", f"out/{MARKER}"} <= set(before)
    for args in (["run", "p.yaml", "--force=tiles"], ["run", "p.yaml", "--force"], ["run", "p.yaml"]):
        rc, err = _cli(args, capsys)
        line = _one_line(err)
        assert rc == 1 and "stage 'tiles'" in line and "is the pipeline's outputs folder 'out'" in line, line
        assert _tree(ws) == before


# ------------------------------------------------------------------------- 4. outputs folder: marker and lock
def test_outputs_folder_is_marked_and_locked_while_the_stages_run(ws: Path) -> None:
    seen: list[dict] = []

    @register_stage("test_hostile_copy", inputs=("src",), outputs=("dst",), replace=True)
    def copy(src: str, dst: str) -> dict:
        """Copy a file (and note who holds the outputs folder's lock meanwhile)."""
        seen.append(read_holder(lock_path("out")) or {})
        Path(dst).write_bytes(Path(src).read_bytes())
        return {}

    path = _write(ws / "p.yaml", [{"name": "c", "type": "test_hostile_copy", "src": "a.tif",
                                   "dst": "${outputs}/a.tif"}])
    run_pipeline(path, echo=None)
    assert seen[0]["pid"] == os.getpid() and "run p" in seen[0]["what"]
    assert folder_kind(ws / "out") == "pipeline-outputs"
    assert not lock_path(ws / "out").exists()  # released
    # a dry run writes nothing at all: no folder, no marker, no lock
    run_pipeline(_write(ws / "q.yaml", [_mask("f", "a.tif", "${outputs}/f.tif")], outputs="dry"), dry_run=True,
                 echo=None)
    assert not (ws / "dry").exists() and not lock_path(ws / "dry").exists()


def test_foreign_outputs_folder_is_refused_an_older_run_of_this_pipeline_adopted(ws: Path, capsys) -> None:
    out = ws / "out"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 not ours")
    _write(ws / "p.yaml", [_mask("forest", "a.tif", "${outputs}/forest.tif")])
    before = _tree(ws)
    rc, err = _cli(["run", "p.yaml"], capsys)
    line = _one_line(err)
    assert rc == 1 and str(out) in line and "p.yaml: key 'outputs'" in line, line
    assert "did not create" in line and _tree(ws) == before
    # another pipeline's manifest does not make it ours either
    (out / "pipeline-other.json").write_text(json.dumps({"pipeline": "other", "stages": {}}))
    assert _cli(["run", "p.yaml"], capsys)[0] == 1 and not (out / MARKER).exists()
    # a folder holding this pipeline's manifest (a run from before folders were marked) is taken over
    (out / "pipeline-p.json").write_text(json.dumps({"pipeline": "p", "stages": {}}))
    assert _cli(["run", "p.yaml"], capsys)[0] == 0
    assert folder_kind(out) == "pipeline-outputs" and (out / "forest.tif").is_file()
    assert (out / "holiday.jpg").read_bytes() == b"\xff\xd8 not ours"


def test_second_run_on_the_same_outputs_is_refused_naming_the_first(ws: Path, capsys) -> None:
    """Two `dinov3geo run` at once on one outputs folder: the second (this process) is refused with one line
    naming the first (a subprocess held in the middle of its ingest stage), which then completes."""
    flag = ws / "hold"
    _write(ws / "first.yaml", [_ingest("tiles", ["a.tif", "b.tif"], "${outputs}/t.zarr")], name="first")
    _write(ws / "second.yaml", [_mask("forest", "a.tif", "${outputs}/forest.tif")], name="second")
    first = _spawn(["-q", "run", "first.yaml"], env={HOLD_TILES_ENV: "1", HOLD_FILE_ENV: str(flag)})
    try:
        _wait_for(first, flag)
        before = _tree(ws / "out")
        for f in ("second.yaml", "first.yaml"):
            rc, err = _cli(["run", f], capsys)
            line = _one_line(err)
            assert rc == 1 and str(ws / "out") in line and "another dinov3geo run is writing it" in line, line
            assert f"pid {first.pid}" in line and "run first.yaml" in line
            assert _tree(ws / "out") == before
    finally:
        flag.unlink(missing_ok=True)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert _cli(["run", "second.yaml"], capsys)[0] == 0 and (ws / "out" / "forest.tif").is_file()
    assert set(read_manifest(load_pipeline("first.yaml"))["stages"]) == {"tiles"}


# --------------------------------------------------------------------------- 5. kill -9 / Ctrl-C, then re-run
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_run_is_completed_by_a_rerun(ws: Path, sig: int, capsys) -> None:
    """forest mask -> ingest (interrupted mid-scene) -> forest mask: the re-run skips the first stage, completes
    the ingestion and runs the last; every output equals that of an uninterrupted run."""
    flag = ws / "hold"
    _write(ws / "p.yaml", [_mask("before", "a.tif", "${outputs}/before.tif"),
                           _ingest("tiles", ["a.tif", "b.tif"], "${outputs}/t.zarr"),
                           _mask("after", "b.tif", "${outputs}/after.tif")])
    proc = _spawn(["-q", "run", "p.yaml"], env={HOLD_TILES_ENV: "1", HOLD_FILE_ENV: str(flag)})
    try:
        _wait_for(proc, flag)
        proc.send_signal(sig)  # Ctrl-C: the interrupted run itself ends the hold
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        flag.unlink(missing_ok=True)
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert _one_line(err) == "interrupted; re-run the same command to resume"
    else:
        assert proc.returncode == -signal.SIGKILL
    man = read_manifest(load_pipeline("p.yaml"))
    assert list(man["stages"]) == ["before"] and list(man["pending"]) == ["tiles"]
    assert not (ws / "out" / "after.tif").exists()

    capsys.readouterr()
    assert cli_main(["run", "p.yaml"]) == 0  # the lock of the killed run is gone with it
    out = capsys.readouterr().out
    assert "before (forest_mask): skipped" in out and "tiles (ingest): running (an earlier run of it was" in out
    assert cli_main(["-q", "run", "p.yaml", "--set", "outputs=ref"]) == 0  # an uninterrupted run
    for name in ("before.tif", "after.tif"):
        assert _digest(ws / "out" / name) == _digest(ws / "ref" / name), name
    assert _store(ws / "out" / "t.zarr") == _store(ws / "ref" / "t.zarr")
    man = read_manifest(load_pipeline("p.yaml"))
    assert list(man["stages"]) == ["before", "tiles", "after"] and not man["pending"]
    assert not lock_path(ws / "out").exists()


def test_an_interrupted_rebuild_is_still_a_rebuild(ws: Path) -> None:
    """A stage interrupted (Ctrl-C) while rebuilding for changed inputs is rebuilt by the next run, not resumed
    from what the interrupted rebuild left (it used to come back as "never ran", without ``ctx.rebuild``)."""
    calls: list[bool] = []
    stop = [False]

    @register_stage("test_hostile_upper", inputs=("src",), outputs=("dst",), replace=True)
    def upper(src: str, dst: str, ctx=None) -> dict:  # noqa: ANN001
        """Upper-case a text file."""
        calls.append(ctx.rebuild)
        if stop[0]:
            raise KeyboardInterrupt
        Path(dst).write_text(Path(src).read_text().upper())
        return {}

    (ws / "a.txt").write_text("abc")
    path = _write(ws / "p.yaml", [{"name": "up", "type": "test_hostile_upper", "src": "a.txt",
                                   "dst": "${outputs}/b.txt"}])
    run_pipeline(path, echo=None)
    (ws / "a.txt").write_text("abd")
    stop[0] = True
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(path, echo=None)
    stop[0] = False
    runs = run_pipeline(path, echo=None)
    assert calls == [False, True, True] and runs["up"].status == "done"
    assert (ws / "out" / "b.txt").read_text() == "ABD"


# ------------------------------------------------------------------------------------- 6. malformed YAML
def test_malformed_yaml_names_the_file_and_the_line(ws: Path, capsys) -> None:
    (ws / "p.yaml").write_text("name: p\noutputs: out\nstages:\n  - name: a\n    type: forest_mask\n"
                               "   image: a.tif\n")
    before = _tree(ws)
    rc, err = _cli(["run", "p.yaml"], capsys)
    line = _one_line(err)
    assert rc == 1 and line.startswith("dinov3geo run: error: p.yaml, line 6, column 4: not valid YAML"), line
    with pytest.raises(PipelineError, match=r"p\.yaml, line 6"):
        load_pipeline("p.yaml")
    # an unclosed quote, and a binary file given by mistake
    (ws / "q.yaml").write_text('name: "p\noutputs: out\n')
    rc, err = _cli(["run", "q.yaml"], capsys)
    assert rc == 1 and "q.yaml, line " in _one_line(err)
    rc, err = _cli(["run", "a.tif"], capsys)
    line = _one_line(err)
    assert rc == 1 and "a.tif" in line and "not a text (UTF-8) file" in line, line
    assert _tree(ws) == {**before, "q.yaml": _digest(ws / "q.yaml")}
