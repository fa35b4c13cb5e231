"""A full disk in the middle of ``dinov3geo canopy predict``: while the engine saves a block's results
(``<out>.parts``) and while the COG is written (:class:`dinov3geo.io.cog.COGWriter`).

The output folder is a real 32 MB tmpfs filled with a ballast file when this process may mount one (root);
otherwise the same failures are injected where the bytes are written (numpy's block file; GDAL's flush of the
COG when it is closed, which GDAL reports only as a logged error). Either way the user gets one line naming the
output and saying the disk is full (free space and what was needed), the earlier output at that path is
unchanged byte for byte, no temporary or staging file is left, and once space is freed the same command
finishes the map, identical to the earlier one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio

from dinov3geo.cli import main
from tests.faults.conftest import NEON_RGB, sha

SIDE = 128  # the test image is SIDE x SIDE px: one engine block
#: the block results of a run: (2 bands + weights) float32 sums per output pixel, one block, .npy header
PARTS_BYTES = 3 * 4 * SIDE * SIDE + 128
PAGE = 4096


@pytest.fixture
def image(tmp_path) -> Path:
    """The top-left SIDE x SIDE px of the bundled NEON image."""
    with rasterio.open(NEON_RGB) as src:
        arr = src.read(window=((0, SIDE), (0, SIDE)))
        profile = src.profile | {"width": SIDE, "height": SIDE, "tiled": True, "blockxsize": SIDE,
                                 "blockysize": SIDE, "transform": src.window_transform(((0, SIDE), (0, SIDE)))}
    path = tmp_path / "in" / "image.tif"
    path.parent.mkdir()
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(arr)
    return path


class SmallDisk:
    """An output folder on a small filesystem that can be filled up (tmpfs), or a plain folder where a full
    disk is injected instead (``real`` False)."""

    def __init__(self, root: Path, real: bool) -> None:
        self.root, self.real = root, real
        self.ballast = root / "ballast.bin"

    def leave_free(self, nbytes: int) -> None:
        """Fill the filesystem until ``nbytes`` (rounded down to pages) stay free."""
        free = shutil.disk_usage(self.root).free
        with open(self.ballast, "ab") as f:
            f.write(b"\0" * max(0, free - nbytes))
        assert shutil.disk_usage(self.root).free <= nbytes

    def free_up(self) -> None:
        self.ballast.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[SmallDisk]:
    root = tmp_path / "disk"
    root.mkdir()
    mounted = False
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") and \
            os.environ.get("DINOV3GEO_TEST_NO_TMPFS") != "1":
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(root)],
                                 capture_output=True).returncode == 0
    try:
        yield SmallDisk(root, mounted)
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], check=True)


def _predict(image: Path, model: Path, out: Path) -> list[str]:
    return ["-q", "canopy", "predict", "--image", str(image), "--model", str(model), "--window", "128",
            "--out", str(out)]


def _refused_for_lack_of_space(capfd, argv: list[str], out: Path, *needles: str) -> str:
    """The command fails with one line on stderr (also nothing printed by C libraries) naming ``out``."""
    rc = main(argv)
    captured = capfd.readouterr()
    err = captured.err
    assert rc == 1, (rc, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in (f"cannot write output {str(out)!r}", "the disk is full", "No space left on device", "free",
              *needles):
        assert n in err, (n, err)
    return err


def _leftovers(folder: Path) -> list[str]:
    """Temporary, staging and lock files in ``folder`` and in a parts folder there."""
    names = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    for parts in folder.glob("*.parts"):
        names += [f"{parts.name}/{p.name}" for p in parts.iterdir() if ".tmp" in p.name]
    return names


@contextlib.contextmanager
def _no_space_for_block_files(disk: SmallDisk, monkeypatch) -> Iterator[None]:
    """A disk with room for the run's small files (lock, manifest) but not for a block's results."""
    if disk.real:
        disk.leave_free(100_000)
    else:
        real_save = np.save

        def save(f, arr, *a, **k):  # numpy writes part of it, then the disk is full
            f.write(b"\x93NUMPY" + b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(np, "save", save)
    try:
        yield
    finally:
        disk.free_up()
        if not disk.real:
            monkeypatch.setattr(np, "save", real_save)


@contextlib.contextmanager
def _no_space_for_the_cog(disk: SmallDisk, monkeypatch, cog_bytes: int) -> Iterator[None]:
    """A disk with room for the block results but not for the COG's tiles (``cog_bytes`` in all)."""
    if disk.real:  # the parts file and 6 small files (lock, marker, manifest and its temporary, staging header)
        # in whole pages, and a quarter of the COG
        disk.leave_free(-(-PARTS_BYTES // PAGE) * PAGE + 6 * PAGE + cog_bytes // 4)
    else:
        # GDAL writes the last tiles when the file is closed and reports a failure there only as a logged
        # error (checked by dinov3geo through GDAL's last error): a close that fails that way
        import dinov3geo.io.cog as cogmod

        real_close = cogmod.COGWriter.close
        real_failures = cogmod._gdal_failures

        @contextlib.contextmanager
        def failing() -> Iterator[None]:
            with real_failures():
                yield
            raise cogmod._GDALWriteFailed("TIFFAppendToStrip:Write error at scanline 4294967295")

        def close(self):
            monkeypatch.setattr(cogmod, "_gdal_failures", failing)
            monkeypatch.setattr(cogmod, "free_bytes", lambda folder: 0)
            try:
                return real_close(self)
            finally:
                monkeypatch.setattr(cogmod, "_gdal_failures", real_failures)

        monkeypatch.setattr(cogmod.COGWriter, "close", close)
    try:
        yield
    finally:
        disk.free_up()
        monkeypatch.undo()


@pytest.mark.parametrize("where", ["block results", "COG"])
def test_full_disk_fails_clearly_keeps_the_old_map_and_leaves_nothing(where, small_disk, image, canopy_model, one_thread,
                                                                      monkeypatch, capfd):
    out = small_disk.root / "maps" / "chm.tif"
    args = _predict(image, canopy_model, out)
    inputs = {p: sha(p) for p in (image, canopy_model)}
    assert main(args) == 0  # an earlier, successful run
    before = out.read_bytes()
    capfd.readouterr()

    if where == "block results":
        with _no_space_for_block_files(small_disk, monkeypatch):
            _refused_for_lack_of_space(capfd, args, out, f"{PARTS_BYTES / 1e3:.1f} kB needed for each block's "
                                       f"results", "finished blocks are kept")
    else:
        with _no_space_for_the_cog(small_disk, monkeypatch, len(before)):
            _refused_for_lack_of_space(capfd, args, out, f"up to {2 * 4 * SIDE * SIDE / 1e3:.1f} kB needed for the "
                                       f"{SIDE} x {SIDE} x 2 float32 COG")
    assert out.read_bytes() == before  # the earlier map is untouched
    assert _leftovers(out.parent) == []  # no staging file, temporary COG, block file or lock
    assert {p: sha(p) for p in inputs} == inputs

    assert main(args) == 0  # space freed: the same command finishes the map
    assert out.read_bytes() == before
    # the map and its sidecars (QGIS style, GDAL statistics, STAC Item), nothing else
    assert sorted(p.name for p in out.parent.iterdir()) == ["chm.qml", "chm.tif", "chm.tif.aux.xml",
                                                            "chm.tif.stac.json"]
