"""Exception classes of the dinov3geo I/O layer.

Every error raised by ``dinov3geo.io`` (and ``dinov3geo.utils.atomic``) derives from :class:`DinoGeoIOError`,
so callers can catch them all at once. Messages are written for remote-sensing users: they name the file
(and layer, band or key where relevant) and say what to do about it.

The classes also derive from the closest built-in exception (``FileNotFoundError``, ``KeyError``,
``PermissionError``, ``ValueError``, ...) so existing ``except`` clauses keep working.

Example::

    raise MissingCRSError(path, hint="pass assume_crs='EPSG:32632' if you know the CRS")
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "BandNotFoundError",
    "DinoGeoIOError",
    "EmptyLayerError",
    "InvalidCOGError",
    "MissingCRSError",
    "OutputError",
    "RasterReadError",
    "UnsupportedFormatError",
    "VectorReadError",
]


def _fmt_path(path: Any) -> str:
    return os.fspath(path) if isinstance(path, str | os.PathLike) else str(path)


class DinoGeoIOError(Exception):
    """Base class of all dinov3geo I/O errors.

    Args:
        message: what went wrong and what to do about it.
        path: the file or folder concerned (kept on the exception as ``.path``), if any.
    """

    def __init__(self, message: str, path: Any = None) -> None:
        super().__init__(message)
        self.path = _fmt_path(path) if path is not None else None

    def __str__(self) -> str:  # KeyError's __str__ would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class RasterReadError(DinoGeoIOError, OSError):
    """A raster could not be opened or read (missing, corrupt, unsupported by GDAL)."""

    def __init__(self, path: Any, reason: str = "", hint: str = "") -> None:
        msg = f"cannot read raster {_fmt_path(path)!r}"
        if reason:
            msg += f": {reason}"
        msg += f". {hint or 'Check that the file exists, is complete and opens with `gdalinfo`.'}"
        super().__init__(msg, path)


class VectorReadError(DinoGeoIOError, OSError):
    """A vector file (GeoJSON, GeoPackage, Shapefile, GeoParquet, ...) could not be opened or read."""

    def __init__(self, path: Any, reason: str = "", hint: str = "") -> None:
        msg = f"cannot read vector file {_fmt_path(path)!r}"
        if reason:
            msg += f": {reason}"
        msg += f". {hint or 'Check that the file exists, is complete and opens with `ogrinfo`.'}"
        super().__init__(msg, path)


class MissingCRSError(DinoGeoIOError, ValueError):
    """A dataset (file or in-memory object) has no coordinate reference system."""

    def __init__(self, path: Any, hint: str = "") -> None:
        what = _fmt_path(path) if path is not None else "the data"
        msg = (
            f"{what!r} has no coordinate reference system (CRS). "
            f"{hint or 'Set one (e.g. gdf.set_crs(...), or `gdal_edit.py -a_srs EPSG:xxxx`) before using it.'}"
        )
        super().__init__(msg, path)


class BandNotFoundError(DinoGeoIOError, KeyError):
    """A requested band (by name or 1-based index) does not exist in a raster."""

    def __init__(self, path: Any, band: Any, available: list[Any] | None = None) -> None:
        msg = f"band {band!r} not found in {_fmt_path(path)!r}"
        if available is not None:
            msg += f"; available bands: {list(available)}"
        msg += ". Pick one of the available bands (names are case-sensitive; indexes are 1-based)."
        super().__init__(msg, path)
        self.band = band


class EmptyLayerError(DinoGeoIOError, ValueError):
    """A vector file or layer contains no features."""

    def __init__(self, path: Any, layer: str | None = None, hint: str = "") -> None:
        where = f"layer {layer!r} of {_fmt_path(path)!r}" if layer else repr(_fmt_path(path))
        msg = f"{where} contains no features. {hint or 'Check the file and the layer name (see `ogrinfo`).'}"
        super().__init__(msg, path)
        self.layer = layer


class UnsupportedFormatError(DinoGeoIOError, ValueError):
    """A file suffix / format is not supported by the reader or writer."""

    def __init__(self, path: Any, supported: list[str]) -> None:
        msg = (
            f"unsupported file format for {_fmt_path(path)!r}; "
            f"use one of the suffixes {', '.join(sorted(supported))}."
        )
        super().__init__(msg, path)


class OutputError(DinoGeoIOError, PermissionError):
    """An output cannot be written (folder missing/unwritable, disk full, failed finalisation)."""

    def __init__(self, path: Any, reason: str = "", hint: str = "") -> None:
        msg = f"cannot write output {_fmt_path(path)!r}"
        if reason:
            msg += f": {reason}"
        msg += f". {hint or 'Choose a folder you can write to, or fix its permissions.'}"
        super().__init__(msg, path)


class InvalidCOGError(DinoGeoIOError, ValueError):
    """A file that should be a Cloud Optimized GeoTIFF does not validate as one."""

    def __init__(self, path: Any, errors: list[str], warnings: list[str] | None = None) -> None:
        msg = f"{_fmt_path(path)!r} is not a valid Cloud Optimized GeoTIFF: errors={errors}"
        if warnings:
            msg += f", warnings={warnings}"
        msg += ". Rewrite it with dinov3geo.io.cog.write_cog or `rio cogeo create`."
        super().__init__(msg, path)
        self.errors = errors
        self.warnings = warnings or []
