"""Tests for dinov3geo.utils.atomic."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from dinov3geo.io.errors import DinoGeoIOError, OutputError
from dinov3geo.utils.atomic import atomic_path, check_writable, temp_sibling


def test_temp_sibling_is_hidden_same_dir_and_keeps_suffix(tmp_path: Path) -> None:
    final = tmp_path / "chm.tif"
    tmp = temp_sibling(final)
    assert tmp.parent == tmp_path
    assert re.fullmatch(rf"\.chm\.tmp-{os.getpid()}-[0-9a-f]{{8}}\.tif", tmp.name), tmp.name
    assert temp_sibling(final) != tmp  # random part differs
    assert temp_sibling(tmp_path / "roads.shp.zip").name.endswith(".shp.zip")
    assert not tmp.exists()


def test_atomic_path_success_renames_into_place(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "out.txt"
    with atomic_path(final) as tmp:
        assert tmp.parent == final.parent and tmp != final
        tmp.write_text("new")
        assert not final.exists()  # nothing visible at the final name until the end
    assert final.read_text() == "new"
    assert sorted(p.name for p in final.parent.iterdir()) == ["out.txt"]


def test_atomic_path_exception_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    final = tmp_path / "out.txt"
    final.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(final) as tmp:
        tmp.write_text("half-writ")
        raise RuntimeError("boom")
    assert final.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_path_keyboard_interrupt_cleans_up(tmp_path: Path) -> None:
    final = tmp_path / "out.txt"
    with pytest.raises(KeyboardInterrupt), atomic_path(final) as tmp:
        tmp.write_text("x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_body_that_writes_nothing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="never written"), atomic_path(tmp_path / "a.gpkg"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_gdal_picks_driver_from_kept_suffix(tmp_path: Path) -> None:
    final = tmp_path / "img.tif"
    with (
        atomic_path(final) as tmp,
        rasterio.open(
            tmp,
            "w",
            width=4,
            height=3,
            count=1,
            dtype="uint8",
            crs="EPSG:32632",
            transform=from_origin(0, 30, 10, 10),
        ) as dst,
    ):  # no driver given: chosen from the .tif suffix
        dst.write(np.arange(12, dtype="uint8").reshape(1, 3, 4))
    with rasterio.open(final) as src:
        assert src.driver == "GTiff"
        assert src.read(1).tolist() == np.arange(12).reshape(3, 4).tolist()


def test_check_writable_creates_parents(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "c.tif"
    assert check_writable(out) == out
    assert out.parent.is_dir()
    assert list(out.parent.iterdir()) == []  # the probe file is gone


def test_check_writable_fails_early_naming_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    out = blocker / "results" / "map.tif"
    with pytest.raises(OutputError) as info:
        check_writable(out)
    assert str(out) in str(info.value)
    assert isinstance(info.value, PermissionError) and isinstance(info.value, DinoGeoIOError)
    assert info.value.path == str(out)


def test_check_writable_refuses_a_folder_and_missing_parent_without_create(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="folder exists"):
        check_writable(tmp_path)
    with pytest.raises(OutputError, match="does not exist"):
        check_writable(tmp_path / "missing" / "x.tif", create_parents=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_check_writable_read_only_folder(tmp_path: Path) -> None:  # pragma: no cover - not run as root
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_writable(ro / "x.tif")
    finally:
        ro.chmod(0o700)
