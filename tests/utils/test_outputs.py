"""The shared output guard and output locks (dinov3geo.utils.outputs / dinov3geo.utils.locks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinov3geo.utils.locks import OutputLockedError, lock_path, output_lock, read_holder
from dinov3geo.utils.outputs import (
    MARKER,
    OutputConflictError,
    folder_kind,
    guard_output,
    input_paths,
    make_output_folder,
    mark_folder,
    remove_owned,
)


@pytest.fixture
def user(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "in.tif").write_bytes(b"II*\x00pixels")
    (d / "notes.txt").write_text("mine")
    return d


def test_output_equal_to_an_input_in_any_spelling_is_refused(user, tmp_path, monkeypatch):
    img = user / "in.tif"
    monkeypatch.chdir(tmp_path)
    os.symlink(img, tmp_path / "link.tif")
    os.link(img, tmp_path / "hard.tif")
    for out in (img, "data/in.tif", "data/../data/in.tif", tmp_path / "link.tif", tmp_path / "hard.tif"):
        with pytest.raises(OutputConflictError, match="it is the input"):
            guard_output(out, [str(img) if out != tmp_path / "hard.tif" else tmp_path / "hard2.tif", img])
    with pytest.raises(OutputConflictError, match="it is the input"):
        guard_output(tmp_path / "hard.tif", [img])  # a hard link is the same file


def test_folder_relations(user, tmp_path):
    img = user / "in.tif"
    with pytest.raises(OutputConflictError, match="contains the input"):
        guard_output(tmp_path, [img], folder=True)
    with pytest.raises(OutputConflictError, match="inside the input folder"):
        guard_output(user / "out.tif", [user])
    # a folder that is only added to may hold its inputs (training runs, evaluations)
    assert guard_output(user.parent / "run", [img], folder=True, replaces=False) == user.parent / "run"
    with pytest.raises(OutputConflictError, match="did not create"):
        guard_output(user, [], folder=True)
    with pytest.raises(OutputConflictError, match="a folder exists"):
        guard_output(user, [])
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputConflictError, match="a file"):
        guard_output(tmp_path / "f", [], folder=True)
    # remote inputs never collide; an empty folder is fine
    assert input_paths(["/vsicurl/https://x/a.tif", "s3://b/c.tif", img]) == [img]
    (tmp_path / "empty").mkdir()
    assert guard_output(tmp_path / "empty", [img], folder=True) == tmp_path / "empty"


def test_marked_folders_are_ours_and_only_ours_are_removed(user, tmp_path):
    with pytest.raises(OutputConflictError, match="did not create"):
        remove_owned(user)
    assert (user / "in.tif").exists()
    out = make_output_folder(tmp_path / "run", [user / "in.tif"], kind="canopy-train")
    assert folder_kind(out) == "canopy-train" and (out / MARKER).is_file()
    (out / "model.pt").write_bytes(b"x")
    assert guard_output(out, [], folder=True, kind="canopy-train") == out
    with pytest.raises(OutputConflictError, match="not a features folder"):
        guard_output(out, [], folder=True, kind="features")
    with pytest.raises(OutputConflictError, match="not one of"):
        remove_owned(out, kinds=["features"])
    assert remove_owned(out, kinds=["canopy-train"]) and not out.exists()
    # nothing may be written inside a folder managed as a whole
    store = tmp_path / "f.zarr"
    store.mkdir()
    mark_folder(store, "features")
    with pytest.raises(OutputConflictError, match="inside the dinov3geo features"):
        guard_output(store / "x.tif", [])
    # an earlier run from before the marker is adopted by its own file names, a user folder is not
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "last.pt").write_bytes(b"ckpt")
    make_output_folder(legacy, [], kind="canopy-train", adopt=("last.pt",))
    assert folder_kind(legacy) == "canopy-train"
    with pytest.raises(OutputConflictError, match="it is the input"):
        make_output_folder(tmp_path / "run2", [tmp_path / "run2" / "model.pt"], kind="canopy-train",
                           files=("model.pt",))


_names = st.lists(st.sampled_from(["a", "b", "c", "..", "."]), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(out_parts=_names, in_parts=_names)
def test_guard_agrees_with_resolved_path_relations(tmp_path_factory, out_parts, in_parts):
    """For any two spellings of paths under a root, the guard refuses exactly the same / inside / containing
    relations of the resolved paths (file output; the input is a folder or a file)."""
    root = tmp_path_factory.mktemp("rel") / "x" / "y" / "z"
    root.mkdir(parents=True)
    out = root.joinpath(*out_parts)
    inp = root.joinpath(*in_parts)
    ro, ri = Path(os.path.realpath(out)), Path(os.path.realpath(inp))
    related = ro == ri or ro in ri.parents or (ri in ro.parents and ri.is_dir())
    if out.is_dir():
        related = True  # a file output where a folder exists is refused too
    try:
        guard_output(out, [inp])
        refused = False
    except OutputConflictError:
        refused = True
    assert refused == related


def test_lock_refuses_a_second_holder_and_names_it(tmp_path):
    out = tmp_path / "o.tif"
    with output_lock(out, what="predict"):
        h = read_holder(lock_path(out))
        assert h["pid"] == os.getpid() and h["what"] == "predict"
        code = ("import sys\nfrom dinov3geo.utils.locks import output_lock, OutputLockedError\n"
                f"try:\n    with output_lock({str(out)!r}): pass\nexcept OutputLockedError as e:\n"
                "    print(e); sys.exit(3)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert r.returncode == 3 and f"pid {os.getpid()}" in r.stdout
        with output_lock(out):  # re-entrant in this thread
            pass
        err: list[BaseException] = []
        t = threading.Thread(target=lambda: _try(out, err))
        t.start()
        t.join()
        assert isinstance(err[0], OutputLockedError)  # another thread of this process is refused
    assert not lock_path(out).exists()


def _try(out: Path, err: list[BaseException]) -> None:
    try:
        with output_lock(out):
            pass
    except BaseException as e:  # noqa: BLE001
        err.append(e)


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    """kill -9 leaves the lock file behind, but not the lock: the next run takes it at once."""
    out = tmp_path / "store.zarr"
    code = (f"from dinov3geo.utils.locks import output_lock\nimport time\nwith output_lock({str(out)!r}):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=f"pid {p.pid}"), output_lock(out):
            pass
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    assert lock_path(out).exists()  # stale file
    t0 = time.monotonic()
    with output_lock(out):
        assert read_holder(lock_path(out))["pid"] == os.getpid()
    assert time.monotonic() - t0 < 5 and not lock_path(out).exists()


def test_lock_waits_when_asked(tmp_path):
    out, flag = tmp_path / "o.tif", tmp_path / "releasing"
    code = (f"from dinov3geo.utils.locks import output_lock\nimport time, pathlib\nwith output_lock({str(out)!r}):\n"
            f"    print('held', flush=True)\n    time.sleep(1.5)\n    pathlib.Path({str(flag)!r}).touch()\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with output_lock(out, wait=120):
        assert flag.exists()  # we got it only once the holder let go
    p.wait(timeout=30)
