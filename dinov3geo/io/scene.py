"""A scene: named bands from one or more raster files, read on one target grid with a valid-pixel mask.

A :class:`Scene` is a small, picklable description (file paths, band names, target grid, nodata policy).
Reading goes through a :class:`SceneReader`, which keeps the files open, resamples bands that are not on the
target grid (``WarpedVRT``), pads windows that reach past the grid, and returns a :class:`Chip`: the pixel
array, a boolean valid mask (declared nodata, NaN, internal/alpha masks, a user nodata override, outside
the source footprint) and the chip's own georeferencing.

Open scenes with :func:`dinov3geo.io.open_scene`; this module holds the reading machinery.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from dinov3geo.io.errors import BandNotFoundError, MissingCRSError, RasterReadError
from dinov3geo.io.grid import GridSpec
from dinov3geo.io.windows import clip_window

#: GDAL settings for window-by-window work: a bounded block cache (the default grows with RAM and makes
#: window reads slow and memory hungry, see benchmarks) and no directory listing on open.
GDAL_ENV: dict[str, Any] = {"GDAL_CACHEMAX": 256, "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}


@dataclass(frozen=True)
class Band:
    """One band of a scene.

    Attributes:
        name: canonical name (e.g. ``"red"``); selection is case-insensitive.
        path: file path or GDAL path (``/vsicurl/https://...`` for remote COGs).
        index: 1-based band index inside ``path``.
        aliases: other accepted names (sensor band id, ``bN`` position, STAC asset key...).
        source: where the band came from, for messages (e.g. the STAC asset key).
    """

    name: str
    path: str
    index: int = 1
    aliases: tuple[str, ...] = ()
    source: str = ""

    def matches(self, key: str) -> bool:
        k = key.lower()
        return self.name.lower() == k or any(a.lower() == k for a in self.aliases)


@dataclass(frozen=True)
class Chip:
    """Pixels of a window of a scene.

    Attributes:
        data: ``[bands, height, width]`` array in the scene dtype; invalid pixels hold ``fill``.
        valid: ``[height, width]`` bool, True where every band has a valid value.
        grid: georeferencing of this chip (CRS, transform of its top-left pixel, shape).
        band_names: names of the bands in ``data`` order.
    """

    data: np.ndarray
    valid: np.ndarray
    grid: GridSpec
    band_names: tuple[str, ...]

    @property
    def valid_fraction(self) -> float:
        return float(self.valid.mean()) if self.valid.size else 0.0


@dataclass(frozen=True)
class Scene:
    """Bands from one or more rasters, described on one target grid.

    Attributes:
        id: scene identifier (file stem, Landsat product id, STAC item id...).
        bands: the bands, in order.
        grid: target grid every band is read on (resampled when a file is on another grid).
        datetime: acquisition time when known (UTC), else None.
        nodata: user override of the nodata value for every band (the files' declared nodata is then
            ignored); None uses what the files declare.
        assume_crs: CRS to assume for files that have none (refused otherwise).
        resampling: resampling used for bands that are not on the target grid.
        dtype: numpy dtype of read data (the promoted dtype of all bands).
        metadata: free-form provenance (sensor, source paths, STAC properties...).
    """

    id: str
    bands: tuple[Band, ...]
    grid: GridSpec
    datetime: datetime | None = None
    nodata: float | None = None
    assume_crs: CRS | None = None
    resampling: Resampling = Resampling.bilinear
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.path for b in self.bands))

    def band(self, key: str | int) -> Band:
        """Band by name/alias (case-insensitive) or by 1-based position (an int, or a string of digits such as
        ``"2"`` from a command line when no band has that name)."""
        if isinstance(key, int) and not isinstance(key, bool):
            if 1 <= key <= len(self.bands):
                return self.bands[key - 1]
        else:
            for b in self.bands:
                if b.matches(str(key)):
                    return b
            if str(key).strip().isdigit() and 1 <= int(key) <= len(self.bands):
                return self.bands[int(key) - 1]
        raise BandNotFoundError(self.id, key, list(self.band_names))

    def select(self, keys: Sequence[str | int]) -> Scene:
        """A scene with only the given bands, in the given order."""
        bands = tuple(self.band(k) for k in keys)
        return dataclasses.replace(self, bands=bands, dtype=_promote_dtypes(bands, self))

    def with_grid(self, grid: GridSpec, resampling: Resampling | str | None = None) -> Scene:
        """The same scene read on another grid (reprojection/resampling happens on read)."""
        rs = self.resampling if resampling is None else _resampling(resampling)
        return dataclasses.replace(self, grid=grid, resampling=rs)

    def reproject(
        self, crs: Any = None, res: float | tuple[float, float] | None = None, resampling: Any = None
    ) -> Scene:
        """The scene on a grid in ``crs`` (default: same CRS) at ``res`` (default: GDAL's suggestion)."""
        return self.with_grid(target_grid(self.grid, crs=crs, res=res), resampling)

    def reader(self) -> SceneReader:
        """Open the scene's files for reading (use as a context manager)."""
        return SceneReader(self)

    def read(self, window: Window | None = None, fill: float = 0) -> Chip:
        """Read ``window`` of the target grid (whole grid when None); see :meth:`SceneReader.read`."""
        with self.reader() as r:
            return r.read(window, fill=fill)


def _resampling(value: Resampling | str) -> Resampling:
    if isinstance(value, Resampling):
        return value
    try:
        return Resampling[str(value).lower()]
    except KeyError:
        raise ValueError(
            f"unknown resampling {value!r}; use one of {[r.name for r in Resampling][:12]}"
        ) from None


def _promote_dtypes(bands: Sequence[Band], scene: Scene | None = None) -> str:
    dtypes: list[str] = []
    for path in dict.fromkeys(b.path for b in bands):
        idx = [b.index for b in bands if b.path == path]
        try:
            with rasterio.Env(**GDAL_ENV), rasterio.open(path) as ds:
                dtypes.extend(ds.dtypes[i - 1] for i in idx)
        except rasterio.errors.RasterioIOError as e:
            raise RasterReadError(path, str(e)) from e
    return str(np.result_type(*dtypes)) if dtypes else (scene.dtype if scene else "float32")


def target_grid(reference: GridSpec, crs: Any = None, res: float | tuple[float, float] | None = None) -> GridSpec:
    """Grid covering ``reference`` in ``crs`` at ``res``.

    Same CRS and no ``res``: the reference itself. Same CRS with ``res``: the reference bounds at the new
    resolution (aligned on the reference origin). Another CRS: GDAL's ``calculate_default_transform``.
    """
    from rasterio.warp import calculate_default_transform

    dst_crs = reference.crs if crs is None else CRS.from_user_input(crs)
    if dst_crs == reference.crs:
        if res is None:
            return reference
        return GridSpec.from_bounds(*reference.bounds, res=res, crs=dst_crs)
    transform, width, height = calculate_default_transform(
        reference.crs, dst_crs, reference.width, reference.height, *reference.bounds, resolution=res
    )
    return GridSpec(dst_crs, transform, int(width), int(height))


class SceneReader:
    """Reads windows of a :class:`Scene` with its files kept open. Not thread-safe: one per thread/task."""

    def __init__(self, scene: Scene) -> None:
        self.scene = scene
        self._env: rasterio.Env | None = None
        self._groups: list[tuple[Any, list[int], list[int], Any]] = []  # (dataset, file idx, out idx, raw)

    # ------------------------------------------------------------------ context management
    def __enter__(self) -> SceneReader:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        self._env = rasterio.Env(**GDAL_ENV)
        self._env.__enter__()
        try:
            groups: dict[str, tuple[list[int], list[int]]] = {}
            for i, b in enumerate(self.scene.bands):
                fidx, oidx = groups.setdefault(b.path, ([], []))
                fidx.append(b.index)
                oidx.append(i)
            for path, (fidx, oidx) in groups.items():
                raw = open_raster(path)
                try:
                    ds = self._aligned_or_warped(raw, path)
                except Exception:
                    raw.close()
                    raise
                self._groups.append((ds, fidx, oidx, raw))
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        for ds, _, _, raw in self._groups:
            if ds is not raw:
                ds.close()
            raw.close()
        self._groups = []
        if self._env is not None:
            self._env.__exit__(None, None, None)
            self._env = None

    def _aligned_or_warped(self, raw: Any, path: str) -> Any:
        sc = self.scene
        src_crs = raw.crs
        if src_crs is None:
            if sc.assume_crs is None:
                raise MissingCRSError(
                    path, hint="Pass crs='EPSG:xxxx' (CLI: --assume-crs) if you know the CRS of this file."
                )
            src_crs = sc.assume_crs
        for i in {b.index for b in sc.bands if b.path == path}:
            if not 1 <= i <= raw.count:
                raise BandNotFoundError(path, i, list(range(1, raw.count + 1)))
        g = sc.grid
        aligned = CRS.from_user_input(src_crs) == g.crs and _same_transform(raw.transform, g.transform, g.res)
        if aligned:
            return raw
        kwargs: dict[str, Any] = dict(
            crs=g.crs, transform=g.transform, width=g.width, height=g.height, resampling=sc.resampling
        )
        if raw.crs is None:
            kwargs["src_crs"] = src_crs
        src_nodata = sc.nodata if sc.nodata is not None else raw.nodata
        if src_nodata is not None:
            kwargs["src_nodata"] = src_nodata
            kwargs["nodata"] = src_nodata
        else:
            # no nodata value: an alpha band marks what lies outside the source footprint
            kwargs["add_alpha"] = True
        return WarpedVRT(raw, **kwargs)

    # ------------------------------------------------------------------ reading
    def read(self, window: Window | None = None, fill: float = 0) -> Chip:
        """Read a window of the target grid.

        The window may reach past the grid (boundless): the outside part is filled with ``fill`` and masked
        invalid. A pixel is valid when every band is valid there.
        """
        sc = self.scene
        g = sc.grid
        if window is None:
            window = Window(0, 0, g.width, g.height)
        h, w = int(window.height), int(window.width)
        n = len(sc.bands)
        cw = clip_window(window, g.height, g.width)
        direct = self._direct_group(cw, h, w)
        if direct is not None:
            # the window lies inside the grid and one file holds every band in order, in the scene dtype:
            # GDAL decodes straight into the output (no fill, no second copy)
            ds, fidx = direct
            data = np.empty((n, h, w), dtype=sc.dtype)
            _, valid = _read_group(ds, fidx, cw.inner, sc.nodata, out=data)
            if fill is not None and not valid.all():
                np.copyto(data, np.asarray(fill).astype(data.dtype), where=~valid)
            return Chip(data, valid, g.window_grid(window), sc.band_names)
        data = np.full((n, h, w), fill, dtype=sc.dtype)
        valid = np.zeros((h, w), dtype=bool)
        if cw.inner is not None:
            ih, iw = int(cw.inner.height), int(cw.inner.width)
            inner_valid = np.ones((ih, iw), dtype=bool)
            inner = data[:, cw.rows, cw.cols]  # a view
            for ds, fidx, oidx, _raw in self._groups:
                # a file on the grid's lattice may cover only part of the grid: read what it has
                fw = clip_window(cw.inner, ds.height, ds.width)
                if fw.inner is None:
                    inner_valid[:] = False
                    continue
                arr, ok = _read_group(ds, fidx, fw.inner, sc.nodata)
                covered = np.zeros((ih, iw), dtype=bool)
                covered[fw.rows, fw.cols] = ok
                inner_valid &= covered
                inner[oidx, fw.rows, fw.cols] = arr
            valid[cw.rows, cw.cols] = inner_valid
            if fill is not None and not inner_valid.all():
                np.copyto(inner, np.asarray(fill).astype(inner.dtype), where=~inner_valid)
        return Chip(data, valid, g.window_grid(window), sc.band_names)

    def native_block_shape(self) -> tuple[int, int] | None:
        """``(rows, cols)`` of the internal tiles of the scene's file when windows of the scene grid are windows
        of one tiled file (one file, on the grid, not warped, all bands tiled alike); else None. Readers
        that align their reads to these tiles make GDAL decode each tile once."""
        if len(self._groups) != 1:
            return None
        ds, fidx, _oidx, raw = self._groups[0]
        if ds is not raw:
            return None
        shapes = {tuple(ds.block_shapes[i - 1]) for i in fidx}
        if len(shapes) != 1:
            return None
        bh, bw = shapes.pop()
        if bh < 16 or bw < 16 or bw >= ds.width:  # untiled (strips of whole rows) or tiny blocks
            return None
        return int(bh), int(bw)

    def _direct_group(self, cw: Any, h: int, w: int) -> tuple[Any, list[int]] | None:
        """``(dataset, band indexes)`` when the clipped window ``cw`` is the whole requested ``h x w`` window
        and a single open file of the scene's dtype holds all bands in output order over it; else None."""
        if cw.inner is None or len(self._groups) != 1:
            return None
        if (int(cw.inner.height), int(cw.inner.width)) != (h, w):
            return None
        ds, fidx, oidx, _raw = self._groups[0]
        if list(oidx) != list(range(len(self.scene.bands))) or np.dtype(ds.dtypes[fidx[0] - 1]) != self.scene.dtype:
            return None
        if any(ds.dtypes[i - 1] != ds.dtypes[fidx[0] - 1] for i in fidx):
            return None
        fw = clip_window(cw.inner, ds.height, ds.width)
        if fw.inner is None or (int(fw.inner.height), int(fw.inner.width)) != (h, w):
            return None
        return ds, list(fidx)


def _same_transform(a: Any, b: Any, res: tuple[float, float], tol: float = 1e-6) -> bool:
    scale = max(res[0], res[1], 1e-300)
    return all(abs(x - y) <= tol * scale for x, y in zip(tuple(a)[:6], tuple(b)[:6], strict=True))


def open_raster(path: str | os.PathLike[str]) -> Any:
    """``rasterio.open(path)`` for reading, with a :class:`RasterReadError` naming the file when it cannot be
    opened or has no bands. Use as a context manager."""
    path = os.fspath(path)
    try:
        ds = rasterio.open(path)
    except rasterio.errors.RasterioIOError as e:
        raise RasterReadError(path, str(e)) from e
    if ds.count == 0:
        ds.close()
        raise RasterReadError(path, "it has no raster bands")
    return ds


def _read_group(
    ds: Any, indexes: list[int], window: Window, nodata: float | None, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read bands of one dataset (into ``out`` when given) and their joint valid mask."""
    try:
        arr = ds.read(indexes, window=window, out=out)
    except rasterio.errors.RasterioIOError as e:
        raise RasterReadError(ds.name, f"reading window {window}: {e}") from e
    valid = np.ones(arr.shape[1:], dtype=bool)
    is_float = np.issubdtype(arr.dtype, np.floating)
    if nodata is not None:
        valid &= ~np.any(np.isnan(arr) if np.isnan(nodata) else arr == np.asarray(nodata, arr.dtype), axis=0)
    else:
        for k, bidx in enumerate(indexes):
            flags = ds.mask_flag_enums[bidx - 1]
            if MaskFlags.all_valid in flags:
                continue
            if MaskFlags.nodata in flags and ds.nodata is not None:
                nd = ds.nodata
                band = arr[k]
                if np.isnan(nd):
                    valid &= ~np.isnan(band)
                elif is_float and not np.isfinite(np.asarray(nd, band.dtype)):
                    valid &= np.isfinite(band)
                else:
                    ndv = _representable(nd, band.dtype)
                    if ndv is not None:  # a nodata value the dtype cannot hold matches no pixel
                        valid &= band != ndv
            else:  # internal mask, per-dataset mask or alpha band: ask GDAL
                valid &= ds.read_masks(bidx, window=window) > 0
    if is_float:
        valid &= np.all(np.isfinite(arr), axis=0)
    return arr, valid


def _representable(value: float, dtype: np.dtype) -> Any:
    """``value`` as a scalar of ``dtype``, or None when the dtype cannot hold it exactly."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if float(value).is_integer() and info.min <= value <= info.max:
            return dtype.type(int(value))
        return None
    return np.asarray(value).astype(dtype)
