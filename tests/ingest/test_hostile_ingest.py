"""Hostile input for ingestion (issue 15): every failure named in one line, nothing lost.

Concurrent runs on one store, output paths that are inputs or user folders, truncated files, runs that
commit nothing, ``-q``, kill -9 and Ctrl-C mid-scene, a full disk. Runs are stopped at a known point with the
ingestion's test hook (``DINOV3GEO_TEST_HOLD_AFTER_TILES`` / ``DINOV3GEO_TEST_HOLD_FILE``: the writing task
creates the file and waits while it exists), never with timed sleeps.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
import zarr
from rasterio.transform import from_origin

from dinov3geo.cli import main
from dinov3geo.data.tiles import TileDataset
from dinov3geo.ingest import TileStore, ingest
from dinov3geo.ingest.ingest import HOLD_FILE_ENV, HOLD_TILES_ENV
from dinov3geo.utils.locks import lock_path
from dinov3geo.utils.outputs import MARKER, folder_kind

store_module = sys.modules["dinov3geo.ingest.store"]

TILE = 32


def _raster(path: Path, seed: int, size: int = 256) -> Path:
    """A tiled 3-band uint16 GeoTIFF with a nodata corner and holes (so some tiles carry masks)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(1, 4000, size=(3, size, size), dtype=np.uint16)
    arr[:, :40, :50] = 0  # nodata corner: tiles below min-valid and masked tiles
    arr[:, 100:110, 70:75] = 0
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint16", nodata=0,
                       crs="EPSG:32633", transform=from_origin(400000 + seed * 5000, 5000000, 10, 10), tiled=True,
                       blockxsize=128, blockysize=128) as ds:
        for i, name in enumerate(["red", "green", "nir"], start=1):  # before the pixels: the header stays first
            ds.set_band_description(i, name)
        ds.write(arr)
    return path


def _truncated(path: Path, seed: int) -> Path:
    """A real tiled GeoTIFF cut in half: its header (written first) opens, half its pixel data is gone."""
    _raster(path, seed)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with rasterio.open(path) as ds:  # the header still opens
        assert ds.count == 3
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> content digest)."""
    return {str(p.relative_to(folder)): _digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _store_content(path: Path) -> dict[str, object]:
    """What two equal stores share: chunk files of tiles and masks byte for byte, per-tile metadata, array
    shapes (nothing past the committed tiles), statistics and the ledger of scenes."""
    ts = TileStore.open(path)
    n = ts.n_tiles
    out: dict[str, object] = {"n_tiles": n}
    for name in ("tiles", "valid"):
        out[f"{name}/chunks"] = {k: v for k, v in _files(path / name).items() if k != "zarr.json"}
    for name in ("scene_id", "datetime", "crs", "transform", "bounds", "valid_fraction", "row_off", "col_off"):
        arr = ts.group[name]
        out[f"{name}/shape"] = arr.shape
        out[name] = np.asarray(arr[:n]).tolist()
    out["tiles/shape"] = ts.group["tiles"].shape
    out["stats"] = ts.stats
    out["stats_sample"] = np.nan_to_num(ts.group["stats_sample"][:], nan=-1).tolist()
    out["scenes"] = ts.scenes
    out["pending"] = ts.group.attrs.get("pending")
    return out


def _assert_same_store(got: Path, want: Path) -> None:
    a, b = _store_content(got), _store_content(want)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k


def _interruptible() -> None:
    """In the child before exec: SIGINT back to its default, so that the CLI gets KeyboardInterrupt even when
    the test suite was started in the background by a shell (which makes its children ignore SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dinov3geo.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            preexec_fn=_interruptible)


def _hold_env(flag: Path, after_tiles: int) -> dict[str, str]:
    return {HOLD_TILES_ENV: str(after_tiles), HOLD_FILE_ENV: str(flag)}


def _wait_for_hold(proc: subprocess.Popen, flag: Path, timeout: float = 120) -> None:
    """Wait until the held run has written its tiles and stopped (the flag file exists)."""
    deadline = time.monotonic() + timeout
    while not flag.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before reaching the hold point:\n{out}\n{err}")
        assert time.monotonic() < deadline, "the run never reached the hold point"
        time.sleep(0.02)


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


@pytest.fixture
def scenes(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "scenes"
    folder.mkdir()
    return [_raster(folder / f"scene_{i}.tif", i) for i in range(3)]


def _reference(tmp_path: Path, sources: list[Path], name: str = "ref.zarr") -> Path:
    ref = tmp_path / name
    rep = ingest(sources, ref, tile_size=TILE, progress=False, workers=1)
    assert len(rep.ingested) == len(sources)
    return ref


# ------------------------------------------------------------------------------------------- 1. concurrency
def test_second_run_on_a_busy_store_is_refused_and_the_first_completes(tmp_path, scenes, capsys):
    """Two processes: the first (a `dinov3geo ingest` subprocess) is held mid-scene; the second (this test's
    process) is refused with one line naming the first, for another source (it used to undo the first run's
    pending scene and exit 0, losing it) and for the same source (it used to crash writing past the first
    run's slots); the first then completes untouched."""
    a, b = scenes[0], scenes[1]
    out = tmp_path / "s.zarr"
    flag = tmp_path / "hold"
    first = _cli(["-q", "ingest", str(a), "--out", str(out), "--tile", str(TILE), "--workers", "1"],
                 env=_hold_env(flag, 1))  # stops inside scene_0, its first block written, the scene pending
    try:
        _wait_for_hold(first, flag)
        assert lock_path(out).exists()
        before = _files(out)
        assert json.loads((out / "zarr.json").read_text())["attributes"]["pending"]["id"] == "scene_0"
        for source in (b, a):
            assert main(["-q", "ingest", str(source), "--out", str(out), "--tile", str(TILE)]) == 1
            err = capsys.readouterr().err
            lines = _error_lines(err)
            assert len(lines) == 1, err
            assert str(out) in lines[0] and "another dinov3geo run is writing it" in lines[0]
            assert f"pid {first.pid}" in lines[0] and "ingest" in lines[0] and "Traceback" not in err
        assert _files(out) == before  # the live run's pending scene was not undone, nothing was written
    finally:
        flag.unlink(missing_ok=True)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert not lock_path(out).exists()
    _assert_same_store(out, _reference(tmp_path, [a]))
    # the refused run, re-run once the first is done, adds its scene
    rep = ingest([b], out, tile_size=TILE, progress=False)
    assert rep.ingested == ["scene_1"] and rep.recovered is None
    _assert_same_store(out, _reference(tmp_path, [a, b], "ref_ab.zarr"))


def test_recovery_only_under_the_lock(tmp_path, scenes):
    """A pending scene held by a live run (here: this process holds the lock from another thread's view, as a
    second process would see it) is never undone by ``TileStore.recover``."""
    import threading

    from dinov3geo.utils.locks import OutputLockedError, output_lock

    out = tmp_path / "s.zarr"
    ingest(scenes[:1], out, tile_size=TILE, progress=False)
    ts = TileStore.open(out, mode="r+")
    ts.begin_scene("live", 4)
    errors: list[BaseException] = []

    def other_writer() -> None:
        try:
            TileStore.open(out, mode="r+").recover()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    with output_lock(out, what="ingest"):
        t = threading.Thread(target=other_writer)
        t.start()
        t.join()
    assert len(errors) == 1 and isinstance(errors[0], OutputLockedError)
    assert TileStore.open(out).group.attrs["pending"]["id"] == "live"


# ------------------------------------------------------------------------------------------- 2. output guard
def test_user_folder_as_out_is_refused_before_any_work(tmp_path, scenes, capsys):
    mydata = tmp_path / "mydata"
    mydata.mkdir()
    (mydata / "notes.txt").write_text("field notes\n")
    before, src_digest = _files(mydata), _digest(scenes[0])
    assert main(["ingest", str(scenes[0]), "--out", str(mydata), "--tile", str(TILE)]) == 1
    captured = capsys.readouterr()
    lines = _error_lines(captured.err)
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert str(mydata) in lines[0] and "existing folder that dinov3geo did not create" in lines[0]
    assert "scene_0.tif" not in lines[0]  # the output is to blame, not the input
    assert _files(mydata) == before and _digest(scenes[0]) == src_digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydata", "scenes"]  # no lock file left either


def _band_folder(folder: Path) -> Path:
    """A Sentinel-2 style band folder (one file per band, band ids in the names)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for band in ("B02", "B03", "B04", "B08"):
        with rasterio.open(folder / f"T33UUP_20200101T100000_{band}_10m.tif", "w", driver="GTiff", width=64,
                           height=64, count=1, dtype="uint16", nodata=0, crs="EPSG:32633",
                           transform=from_origin(400000, 5000000, 10, 10)) as ds:
            ds.write(rng.integers(1, 4000, size=(1, 64, 64), dtype=np.uint16))
    return folder


@pytest.mark.parametrize("case", ["is the source file", "holds the source", "inside the band folder"])
def test_out_that_is_holds_or_lies_inside_an_input_is_refused(tmp_path, scenes, case, capsys):
    bands = _band_folder(tmp_path / "S2_tile")
    if case == "is the source file":
        sources, out, words = [scenes[0]], scenes[0], "it is the input"
    elif case == "holds the source":
        sources, out, words = [scenes[0]], scenes[0].parent, "the folder contains the input"
    else:
        sources, out, words = [bands], bands / "tiles.zarr", "it lies inside the input folder"
    before = {**_files(scenes[0].parent), **{f"b/{k}": v for k, v in _files(bands).items()}}
    assert main(["-q", "ingest", *map(str, sources), "--out", str(out), "--tile", str(TILE)]) == 1
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(out) in lines[0] and words in lines[0], lines
    after = {**_files(scenes[0].parent), **{f"b/{k}": v for k, v in _files(bands).items()}}
    assert after == before and not (bands / "tiles.zarr").exists()


def test_new_store_is_known_as_ours_and_opens_without_warnings(tmp_path, scenes):
    """A new store is recognised as a dinov3geo tile store by its zarr.json (no marker file: Zarr would warn
    about it on every listing); xarray, Zarr and TileDataset open it; a kill during its creation leaves only a
    hidden, marked folder that the next run removes."""
    out = tmp_path / "s.zarr"
    ingest(scenes[:1], out, tile_size=TILE, progress=False)
    assert folder_kind(out) == "tile-store" and not (out / MARKER).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(out, consolidated=False)
        assert sorted(zarr.open_group(str(out), mode="r").array_keys())[0] == "band"
    assert ds["tiles"].shape[0] == TileStore.open(out).n_tiles > 0
    item = TileDataset(out)[0]
    assert item["image"].shape == (3, TILE, TILE)
    # an existing store (ours) is appended to; an empty folder becomes a store
    assert ingest(scenes[1:2], out, tile_size=TILE, progress=False).ingested == ["scene_1"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ingest(scenes[:1], empty, tile_size=TILE, progress=False).ingested == ["scene_0"]
    assert folder_kind(empty) == "tile-store"
    assert not [p for p in tmp_path.iterdir() if ".creating-" in p.name or p.name.endswith(".lock")]
    # what a kill -9 during the creation of a store leaves: a hidden folder, marked as ours, removed next time
    stale = tmp_path / ".new.zarr.creating-99999-abcd"
    stale.mkdir()
    (stale / MARKER).write_text(json.dumps({"kind": "tile-store"}))
    (stale / "zarr.json").write_text("{}")
    assert ingest(scenes[:1], tmp_path / "new.zarr", tile_size=TILE, progress=False).ingested == ["scene_0"]
    assert not stale.exists()


# ------------------------------------------------------------------------------------------- 3. truncated file
def test_truncated_file_is_skipped_undone_and_reported(tmp_path, scenes, capsys):
    """trunc.tif's header opens but its pixels stop halfway: its partial tiles are undone, it is named in the
    summary with the reason, the good scenes before and after it are ingested; exit status 1."""
    trunc = _truncated(tmp_path / "trunc.tif", 7)
    good0, good1 = scenes[0], scenes[1]
    digest = _digest(trunc)
    out = tmp_path / "s.zarr"
    rc = main(["ingest", str(good0), str(trunc), str(good1), "--out", str(out), "--tile", str(TILE),
               "--workers", "2"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "skipped: 1" in captured.out
    skip_line = next(ln for ln in captured.out.splitlines() if ln.strip().startswith("skipped "))
    assert str(trunc) in skip_line and "truncated or damaged" in skip_line and "Read error" in skip_line
    assert "1 source(s) skipped" in captured.err and "Traceback" not in captured.err
    ts = TileStore.open(out)
    assert [s["id"] for s in ts.scenes] == ["scene_0", "scene_1"]
    assert ts.group.attrs["skipped"][-1]["source"] == str(trunc)
    _assert_same_store(out, _reference(tmp_path, [good0, good1]))
    assert _digest(trunc) == digest
    # the API reports the same and goes on; a truncated first scene in a new store leaves a good store
    rep = ingest([trunc, good0], tmp_path / "t.zarr", tile_size=TILE, progress=False)
    assert rep.ingested == ["scene_0"] and [s for s, _ in rep.skipped] == [str(trunc)]
    _assert_same_store(tmp_path / "t.zarr", _reference(tmp_path, [good0], "ref0.zarr"))


# ------------------------------------------------------------------------------------------- 4 + 5. nothing kept
def test_failed_run_leaves_no_store_and_quiet_still_names_the_skips(tmp_path, scenes, capsys):
    trunc = _truncated(tmp_path / "trunc.tif", 7)
    out = tmp_path / "new" / "deeper" / "s.zarr"
    rc = main(["-q", "ingest", str(scenes[0]), str(trunc), "--bands", "blue", "--out", str(out),
               "--tile", str(TILE)])
    err = capsys.readouterr().err
    assert rc == 1
    lines = _error_lines(err)
    assert len(lines) == 3, err  # one per skipped source, then the error
    assert str(scenes[0]) in lines[0] and "blue" in lines[0]
    assert str(trunc) in lines[1] and "nothing was ingested" in lines[2] and str(out) in lines[2]
    assert not (tmp_path / "new").exists()  # the folders the run created are gone
    # a truncated file alone: the store created for it is removed again (not left empty)
    rc = main(["-q", "ingest", str(trunc), "--out", str(out), "--tile", str(TILE)])
    assert rc == 1 and "truncated or damaged" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # a folder that existed before is kept (and left as it was: empty)
    empty = tmp_path / "empty"
    empty.mkdir()
    rep = ingest([trunc], empty, tile_size=TILE, progress=False)
    assert rep.removed and not rep.ingested and empty.is_dir() and not any(empty.iterdir())
    assert "not kept" in rep.summary()
    # a run that fails in the first scene of a new store (here a bug: any exception) removes it too
    def broken(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("simulated failure")

    mp = pytest.MonkeyPatch()
    mp.setattr(sys.modules["dinov3geo.ingest.ingest"], "_strip_write", broken)
    try:
        with pytest.raises(RuntimeError, match="simulated failure"):
            ingest(scenes[:1], out, tile_size=TILE, progress=False, workers=2)
    finally:
        mp.undo()
    assert not (tmp_path / "new").exists()
    # an existing store with scenes is never removed, even when this run adds nothing
    good = tmp_path / "good.zarr"
    ingest(scenes[:1], good, tile_size=TILE, progress=False)
    rep = ingest([trunc], good, tile_size=TILE, progress=False)
    assert not rep.removed and [s["id"] for s in TileStore.open(good).scenes] == ["scene_0"]


# ------------------------------------------------------------------------------------------- 6. kill -9, Ctrl-C
def _interrupted_then_resumed(tmp_path: Path, scenes: list[Path], sig: int) -> tuple[subprocess.Popen, str]:
    ref = _reference(tmp_path, scenes)
    n0 = TileStore.open(ref).scenes[0]["tile_count"]
    out = tmp_path / "s.zarr"
    flag = tmp_path / "hold"
    # 256 px scenes, 32 px tiles, 128 px file blocks: 2 blocks of 32 candidate tiles per scene, one at a time;
    # hold once the first block of scene_1 is written: mid-scene, scene_0 committed
    proc = _cli(["-q", "ingest", *map(str, scenes), "--out", str(out), "--tile", str(TILE), "--workers", "1"],
                env=_hold_env(flag, n0 + 1))
    try:
        _wait_for_hold(proc, flag)
        attrs = json.loads((out / "zarr.json").read_text())["attributes"]
        assert [s["id"] for s in attrs["scenes"]] == ["scene_0"] and attrs["pending"]["id"] == "scene_1"
        proc.send_signal(sig)  # Ctrl-C: the run itself ends the hold once it has caught the interrupt
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        flag.unlink(missing_ok=True)
    ts = TileStore.open(out)
    assert [s["id"] for s in ts.scenes] == ["scene_0"]  # committed work survives
    rep = ingest(scenes, out, tile_size=TILE, progress=False, workers=2)
    assert rep.recovered == "scene_1"
    assert rep.already == ["scene_0"] and rep.ingested == ["scene_1", "scene_2"]
    _assert_same_store(out, ref)
    assert not lock_path(out).exists()
    return proc, err


def test_kill_9_mid_scene_then_rerun_equals_uninterrupted(tmp_path, scenes):
    proc, _ = _interrupted_then_resumed(tmp_path, scenes, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL


def test_ctrl_c_mid_scene_one_line_then_rerun_equals_uninterrupted(tmp_path, scenes):
    proc, err = _interrupted_then_resumed(tmp_path, scenes, signal.SIGINT)
    assert proc.returncode == 130
    assert _error_lines(err) == ["interrupted; re-run the same command to resume"], err


# ------------------------------------------------------------------------------------------- 7. disk full
def test_disk_full_names_the_store_keeps_committed_scenes_and_rerun_completes(tmp_path, scenes, monkeypatch,
                                                                              capsys):
    out = tmp_path / "s.zarr"
    ref0 = _reference(tmp_path, scenes[:1], "ref0.zarr")
    n0 = TileStore.open(ref0).n_tiles
    written = {"tiles": 0}
    real_open = open

    class _FullDisk:
        """A chunk file on a disk that fills up: half the bytes land, then ENOSPC."""

        def __init__(self, f):  # noqa: ANN001
            self.f = f

        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc):  # noqa: ANN002, ANN204
            self.f.close()

        def write(self, buf):  # noqa: ANN001, ANN201
            self.f.write(bytes(buf)[: len(buf) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_open(path, mode="r", *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        f = real_open(path, mode, *args, **kw)
        if "w" in mode and Path(path).parent.name == "tiles":
            written["tiles"] += 1
            if written["tiles"] > n0 + 8:  # in the middle of scene_1
                return _FullDisk(f)
        return f

    monkeypatch.setattr(store_module, "open", full_open, raising=False)
    rc = main(["-q", "ingest", *map(str, scenes), "--out", str(out), "--tile", str(TILE), "--workers", "1"])
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert rc == 1
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(out) in lines[0] and "disk full" in lines[0] and "scene_1" in lines[0]
    # scene_0 intact and readable; nothing of scene_1 left (no partial chunk beyond the committed tiles)
    ts = TileStore.open(out)
    assert [s["id"] for s in ts.scenes] == ["scene_0"]
    _assert_same_store(out, ref0)
    ds = TileDataset(out)
    assert all(ds[i]["image"].shape == (3, TILE, TILE) for i in range(len(ds)))
    # space freed: the same command completes the store
    assert main(["-q", "ingest", *map(str, scenes), "--out", str(out), "--tile", str(TILE)]) == 0
    _assert_same_store(out, _reference(tmp_path, scenes))
