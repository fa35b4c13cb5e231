"""Atomic file writing: outputs appear at their final name complete, or not at all.

Long raster/vector jobs write to a hidden temporary sibling of the final path (same folder, hence same
filesystem, so :func:`os.replace` is an atomic rename) and move it into place only once it is complete.
A crash, ``KeyboardInterrupt`` or exception never leaves a half-written file at the final name, and an
existing file there stays intact until the new one replaces it.

The temporary name keeps the real suffix (``.<name>.tmp-<pid>-<rand><suffix>``), so GDAL/OGR drivers chosen
from the extension (``.tif``, ``.gpkg``, ``.fgb``, ...) behave exactly as for the final name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dinov3geo.io.errors import OutputError

__all__ = ["atomic_path", "check_writable", "remove_if_writer_dead", "temp_sibling", "remove_quietly"]


def _multi_suffix(name: str) -> str:
    """The suffix to keep on a temporary name (``.tif``; ``.tar.gz``-style double suffixes kept whole)."""
    p = Path(name)
    suffixes = p.suffixes
    if len(suffixes) >= 2 and suffixes[-2].lower() in {".tar", ".shp", ".gpkg", ".geojson", ".json", ".csv"}:
        return "".join(suffixes[-2:])
    return p.suffix


def temp_sibling(final: str | os.PathLike[str], tag: str = "tmp") -> Path:
    """A fresh, unused hidden path next to ``final``: ``.<name>.<tag>-<pid>-<rand><suffix>``.

    Nothing is created on disk.
    """
    final = Path(final)
    suffix = _multi_suffix(final.name)
    stem = final.name[: len(final.name) - len(suffix)] if suffix else final.name
    while True:
        cand = final.with_name(f".{stem}.{tag}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")
        if not cand.exists():
            return cand


def remove_quietly(path: str | os.PathLike[str]) -> None:
    """Remove a file or folder (and GDAL side-car files ``<path>.aux.xml``/``.ovr``) ignoring absence."""
    p = Path(path)
    for cand in (p, Path(f"{p}.aux.xml"), Path(f"{p}.ovr"), Path(f"{p}.msk")):
        with contextlib.suppress(FileNotFoundError):
            if cand.is_dir() and not cand.is_symlink():
                shutil.rmtree(cand, ignore_errors=True)
            else:
                cand.unlink()


def remove_if_writer_dead(path: str | os.PathLike[str], pid: int, log: Any = None) -> bool:
    """Remove ``path``, a temporary file written by process ``pid`` (its name says so), if that process no longer
    exists: what a killed run leaves behind. Never this process's own files, nor those of live processes (of
    any user). Returns whether it was removed."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        if log is not None:
            log.info("removing %s left by a killed run", path)
        remove_quietly(path)
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def check_writable(path: str | os.PathLike[str], create_parents: bool = True) -> Path:
    """Fail early if ``path`` cannot be written, before any long computation starts.

    Creates the parent folder (when ``create_parents``), then proves it is writable by creating and removing
    a small probe file there. Refuses an existing folder at ``path``. (An existing file at ``path`` is fine: it
    is replaced by rename, which needs only the folder to be writable.)

    Returns:
        ``path`` as an absolute :class:`~pathlib.Path`.

    Raises:
        OutputError: (a ``PermissionError``) naming ``path`` and the reason.
    """
    final = Path(path).expanduser().absolute()
    parent = final.parent
    if final.is_dir():
        raise OutputError(final, "a folder exists at that path", "Give a file name, not a folder.")
    try:
        if create_parents:
            parent.mkdir(parents=True, exist_ok=True)
        elif not parent.is_dir():
            raise OutputError(final, f"the folder {str(parent)!r} does not exist", "Create it first.")
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        raise OutputError(final, f"cannot create the folder {str(parent)!r} ({exc.strerror or exc})") from exc
    probe = temp_sibling(final, tag="probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except OSError as exc:
        raise OutputError(
            final, f"the folder {str(parent)!r} is not writable ({exc.strerror or exc})"
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return final


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], check: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to write to; rename it to ``final`` on success.

    On a clean exit the temporary file (if the body created it) replaces ``final`` with :func:`os.replace`
    (atomic on POSIX; an existing file at ``final`` is overwritten only at that moment). If the body raises,
    the temporary file (and GDAL side-cars) is removed and ``final`` is left untouched.

    Args:
        final: the path the finished file should have.
        check: run :func:`check_writable` first (creates the parent folder).

    Raises:
        OutputError: if the folder is not writable, or the body exited without creating the temporary file.

    Example::

        with atomic_path("out/labels.gpkg") as tmp:
            gdf.to_file(tmp, driver="GPKG")
    """
    final = Path(final)
    if check:
        check_writable(final)
    tmp = temp_sibling(final)
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError(final, f"the temporary file {str(tmp)!r} was never written")
        os.replace(tmp, final)
    except BaseException:
        remove_quietly(tmp)
        raise
    # A side-car written next to the temporary file would otherwise be orphaned (and stale for ``final``).
    for side in (".aux.xml", ".ovr", ".msk"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{tmp}{side}").unlink()
