"""Inputs of the inference engine: one raster/scene, a mosaic of scenes, or a tile store, on one grid.

Every source is a small picklable description (so it can travel to dask workers) with a ``grid``, band
names, and a ``reader()`` context manager whose ``read(window)`` returns ``(data [C, h, w], valid [h, w])``
for any (boundless) window of the grid: pixels outside the data or nodata are ``valid=False`` and hold 0.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
import shapely.geometry
from rasterio.crs import CRS
from rasterio.features import geometry_mask
from rasterio.warp import Resampling, reproject, transform_bounds, transform_geom
from rasterio.windows import Window

from dinov3geo.io.grid import GridSpec
from dinov3geo.io.scene import GDAL_ENV, Scene
from dinov3geo.io.sources import open_scene

__all__ = ["ArraySource", "MosaicSource", "RasterSource", "SceneSource", "StackSource", "TileStoreSource", "as_source"]


class WindowReader(ABC):
    """Reads windows of a source; one per thread."""

    @abstractmethod
    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """``(data [C, h, w], valid [h, w] bool)`` of a window of the source grid (boundless)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open files."""

    def block_shape(self) -> tuple[int, int] | None:
        """``(rows, cols)`` of the tiles the underlying file is stored in, when windows of the source grid are
        windows of that file (reads aligned to them decode each tile once); None when unknown."""
        return None

    def __enter__(self) -> WindowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RasterSource(ABC):
    """A raster input on one grid (see the module docstring)."""

    grid: GridSpec
    band_names: tuple[str, ...]
    dtype: str

    @property
    def count(self) -> int:
        return len(self.band_names)

    @abstractmethod
    def reader(self) -> WindowReader:
        """A new reader (use as a context manager, one per thread)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-friendly identity of the input (for the resume manifest)."""


# ---------------------------------------------------------------------------------------------- scenes
class _SceneWindowReader(WindowReader):
    def __init__(self, scene: Scene) -> None:
        self._r = scene.reader()
        self._r.open()
        self._block_shape = self._r.native_block_shape()

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        chip = self._r.read(window, fill=0)
        return chip.data, chip.valid

    def block_shape(self) -> tuple[int, int] | None:
        return self._block_shape

    def close(self) -> None:
        self._r.close()


class SceneSource(RasterSource):
    """One :class:`~dinov3geo.io.scene.Scene` (a raster file, band files or a STAC item)."""

    def __init__(self, scene: Scene) -> None:
        self.scene = scene
        self.grid = scene.grid
        self.band_names = scene.band_names
        self.dtype = scene.dtype

    def reader(self) -> WindowReader:
        return _SceneWindowReader(self.scene)

    def describe(self) -> dict[str, Any]:
        return {"kind": "scene", "paths": list(self.scene.paths), "bands": list(self.band_names),
                "nodata": repr(self.scene.nodata), "grid": self.grid.to_dict()}


def _bounds_in(grid_crs: CRS, crs: CRS, bounds: tuple[float, float, float, float]) -> tuple[float, ...]:
    if CRS.from_user_input(crs) == grid_crs:
        return bounds
    return transform_bounds(crs, grid_crs, *bounds, densify_pts=21)


def _snap_grid(bounds: Sequence[float], ref: GridSpec, res: tuple[float, float]) -> GridSpec:
    """Grid covering ``bounds`` at ``res`` whose pixel lattice contains the origin of ``ref``."""
    left, bottom, right, top = bounds
    rx, ry = res
    x0, y0 = ref.transform.c, ref.transform.f
    left = x0 + math.floor((left - x0) / rx + 1e-9) * rx
    top = y0 + math.ceil((top - y0) / ry - 1e-9) * ry
    return GridSpec.from_bounds(left, bottom, right, top, res=(rx, ry), crs=ref.crs)


class _MosaicReader(WindowReader):
    def __init__(self, src: MosaicSource) -> None:
        self.src = src
        self._readers: dict[int, Any] = {}

    def _reader(self, k: int) -> Any:
        r = self._readers.get(k)
        if r is None:
            scene = self.src.scenes[k]
            r = (scene if self.src._offsets[k] is not None else scene.with_grid(self.src.grid)).reader()
            r.open()
            self._readers[k] = r
        return r

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        src, g = self.src, self.src.grid
        h, w = int(window.height), int(window.width)
        data = np.zeros((src.count, h, w), dtype=src.dtype)
        valid = np.zeros((h, w), dtype=bool)
        wg = g.window_grid(window)
        wl, wb, wr, wt = wg.bounds
        for k, sb in enumerate(src._scene_bounds):
            if sb[0] >= wr or sb[2] <= wl or sb[1] >= wt or sb[3] <= wb:
                continue
            off = src._offsets[k]
            if off is not None:  # same lattice: read the scene's own grid, shifted (boundless, masked)
                win = Window(window.col_off - off[1], window.row_off - off[0], w, h)
                chip = self._reader(k).read(win, fill=0)
                ok = chip.valid
            else:  # reprojected; also mask what lies outside the scene's footprint
                chip = self._reader(k).read(window, fill=0)
                ok = chip.valid & geometry_mask([src._footprints[k]], out_shape=(h, w), transform=wg.transform,
                                                invert=True)
            new = ok & ~valid
            if new.any():
                data[:, new] = chip.data[:, new]
                valid |= new
            if valid.all():
                break
        return data, valid

    def close(self) -> None:
        for r in reversed(list(self._readers.values())):  # newest first (nested GDAL environments)
            r.close()
        self._readers = {}


def _lattice_offset(scene_grid: GridSpec, grid: GridSpec) -> tuple[int, int] | None:
    """(row, col) of ``scene_grid``'s origin in ``grid`` when both share CRS, resolution and pixel lattice."""
    a, b = scene_grid.transform, grid.transform
    if scene_grid.crs != grid.crs or a.b or a.d or b.b or b.d:
        return None
    if abs(a.a - b.a) > 1e-9 * abs(b.a) or abs(a.e - b.e) > 1e-9 * abs(b.e):
        return None
    col, row = ~b * (a.c, a.f)
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    return round(row), round(col)


class MosaicSource(RasterSource):
    """Several scenes with the same bands read as one mosaic; where they overlap the first valid one wins.

    Args:
        scenes: scenes (or raster paths) in priority order; they may have different CRSs and resolutions.
        grid: the mosaic grid (default: the union of the scenes' footprints in the first scene's CRS, at the
            finest resolution, on the first scene's pixel lattice).
    """

    def __init__(self, scenes: Sequence[Scene | str | os.PathLike[str]], grid: GridSpec | None = None) -> None:
        sc = [s if isinstance(s, Scene) else open_scene(s) for s in scenes]
        if not sc:
            raise ValueError("a mosaic needs at least one scene")
        counts = {len(s.bands) for s in sc}
        if len(counts) != 1:
            raise ValueError(f"mosaic scenes must have the same number of bands, got {sorted(counts)}")
        self.scenes = sc
        ref = sc[0].grid
        if grid is None:
            bounds = [_bounds_in(ref.crs, s.grid.crs, s.grid.bounds) for s in sc]
            union = (min(b[0] for b in bounds), min(b[1] for b in bounds),
                     max(b[2] for b in bounds), max(b[3] for b in bounds))
            res = min((s.grid.res for s in sc if s.grid.crs == ref.crs), key=lambda r: r[0] * r[1])
            grid = _snap_grid(union, ref, res)
        self.grid = grid
        self.band_names = sc[0].band_names
        self.dtype = str(np.result_type(*[np.dtype(s.dtype) for s in sc]))
        self._scene_bounds = [_bounds_in(grid.crs, s.grid.crs, s.grid.bounds) for s in sc]
        self._offsets = [_lattice_offset(s.grid, grid) for s in sc]
        self._footprints = [
            shapely.geometry.shape(transform_geom(s.grid.crs, grid.crs, shapely.geometry.mapping(
                shapely.box(*s.grid.bounds).segmentize(max(s.grid.res) * 16))))
            for s in sc
        ]

    def reader(self) -> WindowReader:
        return _MosaicReader(self)

    def describe(self) -> dict[str, Any]:
        return {"kind": "mosaic", "paths": [list(s.paths) for s in self.scenes], "bands": list(self.band_names),
                "grid": self.grid.to_dict()}


class _StackReader(WindowReader):
    def __init__(self, src: StackSource) -> None:
        self._readers = [s.reader() for s in src.sources]
        self._dtype = src.dtype

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        datas, valid = [], None
        for r in self._readers:
            d, v = r.read(window)
            datas.append(d.astype(self._dtype, copy=False))
            valid = v if valid is None else valid & v
        assert valid is not None
        return np.concatenate(datas), valid

    def close(self) -> None:
        # newest first: each reader may hold a GDAL environment entered after the previous one's
        for r in reversed(self._readers):
            r.close()


class StackSource(RasterSource):
    """Bands of several inputs stacked on one grid, e.g. two dates for a change model (``[t0 bands, t1 bands]``).

    A pixel is valid where it is valid in every input. Band names get a ``t<k>_`` prefix.

    Args:
        inputs: scenes, raster paths or :class:`RasterSource` objects (each is read on ``grid``).
        grid: the common grid (default: the first input's grid).
    """

    def __init__(self, inputs: Sequence[Any], grid: GridSpec | None = None) -> None:
        if len(inputs) < 2:
            raise ValueError("a stack needs at least two inputs")
        first = inputs[0] if isinstance(inputs[0], RasterSource) else as_source(inputs[0])
        grid = grid or first.grid
        srcs: list[RasterSource] = []
        for x in inputs:
            if isinstance(x, RasterSource):
                if not x.grid.same_as(grid):
                    raise ValueError("RasterSource inputs of a stack must already be on the stack grid")
                srcs.append(x)
            else:
                srcs.append(as_source(x, grid=grid))
        self.sources = srcs
        self.grid = grid
        self.band_names = tuple(f"t{k}_{b}" for k, s in enumerate(srcs) for b in s.band_names)
        self.dtype = str(np.result_type(*[np.dtype(s.dtype) for s in srcs]))

    def reader(self) -> WindowReader:
        return _StackReader(self)

    def describe(self) -> dict[str, Any]:
        return {"kind": "stack", "inputs": [s.describe() for s in self.sources], "grid": self.grid.to_dict()}


# ---------------------------------------------------------------------------------------------- tile store
class _TileStoreReader(WindowReader):
    def __init__(self, src: TileStoreSource) -> None:
        import zarr

        self.src = src
        g = zarr.open_group(str(src.path), mode="r")
        self._tiles = g["tiles"]
        self._valid = g["valid"]

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        src, g = self.src, self.src.grid
        h, w = int(window.height), int(window.width)
        data = np.zeros((src.count, h, w), dtype=src.dtype)
        valid = np.zeros((h, w), dtype=bool)
        wg = g.window_grid(window)
        wl, wb, wr, wt = wg.bounds
        b = src._bounds
        hit = np.nonzero((b[:, 0] < wr) & (b[:, 2] > wl) & (b[:, 1] < wt) & (b[:, 3] > wb))[0]
        for k in hit:
            tile = np.asarray(self._tiles[int(k)])
            tvalid = np.asarray(self._valid[int(k)])
            off = src._offsets[k]
            if off is not None:  # on the grid's lattice: paste
                r0 = int(off[0]) - int(window.row_off)
                c0 = int(off[1]) - int(window.col_off)
                t = tile.shape[-1]
                rs, re_ = max(r0, 0), min(r0 + t, h)
                cs, ce = max(c0, 0), min(c0 + t, w)
                if rs >= re_ or cs >= ce:
                    continue
                tv = tvalid[rs - r0 : re_ - r0, cs - c0 : ce - c0]
                new = tv & ~valid[rs:re_, cs:ce]
                sub = data[:, rs:re_, cs:ce]
                sub[:, new] = tile[:, rs - r0 : re_ - r0, cs - c0 : ce - c0][:, new]
                valid[rs:re_, cs:ce] |= new
            else:  # another CRS or lattice: reproject the tile into the window
                t_crs = CRS.from_user_input(str(src._crs[k]))
                t_tr = rasterio.Affine(*src._transforms[k])
                rv = np.zeros((h, w), dtype=np.uint8)
                reproject(tvalid.astype(np.uint8), rv, src_transform=t_tr, src_crs=t_crs,
                          dst_transform=wg.transform, dst_crs=g.crs, resampling=Resampling.nearest)
                new = (rv > 0) & ~valid
                if not new.any():
                    continue
                tmp = np.zeros((src.count, h, w), dtype=np.float64)
                reproject(tile.astype(np.float64), tmp, src_transform=t_tr, src_crs=t_crs,
                          dst_transform=wg.transform, dst_crs=g.crs, resampling=src.resampling)
                data[:, new] = tmp[:, new].astype(data.dtype)
                valid |= new
        return data, valid


class TileStoreSource(RasterSource):
    """The tiles of a :class:`~dinov3geo.ingest.store.TileStore` read as one raster.

    Tiles on the grid's pixel lattice are pasted; others (another CRS or an unaligned origin) are reprojected
    into each window. Where tiles overlap the first valid one (store order) wins.

    Args:
        path: the Zarr tile store.
        grid: output grid (default: the union of the tiles in the first tile's CRS at its resolution, on its
            pixel lattice).
        resampling: for tiles that need reprojection.
    """

    def __init__(self, path: str | os.PathLike[str], grid: GridSpec | None = None,
                 resampling: Resampling = Resampling.bilinear) -> None:
        from dinov3geo.ingest.store import TileStore

        store = TileStore.open(path)
        n = store.n_tiles
        if n == 0:
            raise ValueError(f"tile store {path} has no committed tiles")
        g = store.group
        self.path = Path(path)
        self.band_names = tuple(store.band_names)
        self.dtype = str(store.dtype)
        self.resampling = resampling
        self._transforms = np.asarray(g["transform"][:n], dtype=np.float64)
        self._crs = [str(c) for c in g["crs"][:n]]
        tb = np.asarray(g["bounds"][:n], dtype=np.float64)
        t = store.tile_size
        ref_crs = CRS.from_user_input(str(self._crs[0]))
        ref = GridSpec(ref_crs, rasterio.Affine(*self._transforms[0]), t, t)
        cache: dict[str, CRS] = {}
        bounds = []
        for k in range(n):
            c = cache.setdefault(self._crs[k], CRS.from_user_input(self._crs[k]))
            bounds.append(tuple(tb[k]) if c == ref_crs else None)
        if grid is None:
            same = [b for b in bounds if b is not None]
            union = (min(b[0] for b in same), min(b[1] for b in same),
                     max(b[2] for b in same), max(b[3] for b in same))
            grid = _snap_grid(union, ref, ref.res)
        self.grid = grid
        self._bounds = np.asarray(
            [_bounds_in(grid.crs, cache[self._crs[k]], tuple(tb[k])) for k in range(n)], dtype=np.float64
        )
        inv = ~grid.transform
        self._offsets: list[tuple[int, int] | None] = []
        gres = grid.res
        for k in range(n):
            tr = self._transforms[k]
            aligned = cache[self._crs[k]] == grid.crs and abs(tr[0] - grid.transform.a) < 1e-9 * gres[0] and \
                abs(tr[4] - grid.transform.e) < 1e-9 * gres[1] and tr[1] == 0 and tr[3] == 0
            if aligned:
                col, row = inv * (tr[2], tr[5])
                if abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6:
                    self._offsets.append((round(row), round(col)))
                    continue
            self._offsets.append(None)

    def reader(self) -> WindowReader:
        return _TileStoreReader(self)

    def describe(self) -> dict[str, Any]:
        return {"kind": "tilestore", "path": str(self.path.absolute()), "n_tiles": len(self._offsets),
                "bands": list(self.band_names), "grid": self.grid.to_dict()}


# ---------------------------------------------------------------------------------------------- arrays
class _ArrayReader(WindowReader):
    def __init__(self, src: ArraySource) -> None:
        self.src = src

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        src = self.src
        h, w = int(window.height), int(window.width)
        r0, c0 = int(window.row_off), int(window.col_off)
        data = np.zeros((src.count, h, w), dtype=src.data.dtype)
        valid = np.zeros((h, w), dtype=bool)
        H, W = src.data.shape[1:]
        rs, re_, cs, ce = max(r0, 0), min(r0 + h, H), max(c0, 0), min(c0 + w, W)
        if rs < re_ and cs < ce:
            ok = src.valid[rs:re_, cs:ce]
            data[:, rs - r0 : re_ - r0, cs - c0 : ce - c0] = np.where(ok, src.data[:, rs:re_, cs:ce], 0)
            valid[rs - r0 : re_ - r0, cs - c0 : ce - c0] = ok
        return data, valid


class ArraySource(RasterSource):
    """An in-memory ``[C, H, W]`` array as an engine input (e.g. a co-registered pair, LEVIR-CD PNG crops).

    Args:
        data: the bands (any numeric dtype; non-finite values are invalid).
        valid: ``[H, W]`` validity (default: every finite pixel).
        grid: georeferencing of the array (default: a local 1 m grid; outputs of :func:`predict_array` are
            arrays, so it only matters for AOIs).
        band_names: names of the bands (default ``band_1``...).
    """

    def __init__(self, data: np.ndarray, valid: np.ndarray | None = None, grid: GridSpec | None = None,
                 band_names: Sequence[str] | None = None) -> None:
        data = np.asarray(data)
        if data.ndim != 3:
            raise ValueError(f"expected a [C, H, W] array, got shape {data.shape}")
        ok = np.ones(data.shape[1:], dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        if ok.shape != data.shape[1:]:
            raise ValueError(f"valid mask {ok.shape} does not match the array {data.shape[1:]}")
        if np.issubdtype(data.dtype, np.floating):
            ok = ok & np.isfinite(data).all(axis=0)
        self.data, self.valid = data, ok
        h, w = data.shape[1:]
        self.grid = grid if grid is not None else GridSpec(CRS.from_epsg(3857), rasterio.Affine(1, 0, 0, 0, -1, h),
                                                           w, h)
        if (self.grid.height, self.grid.width) != (h, w):
            raise ValueError(f"grid {self.grid.height}x{self.grid.width} does not match the array {h}x{w}")
        names = list(band_names) if band_names is not None else [f"band_{k + 1}" for k in range(data.shape[0])]
        if len(names) != data.shape[0]:
            raise ValueError(f"got {len(names)} band names for {data.shape[0]} bands")
        self.band_names = tuple(names)
        self.dtype = str(data.dtype)

    def reader(self) -> WindowReader:
        return _ArrayReader(self)

    def describe(self) -> dict[str, Any]:
        import hashlib

        digest = hashlib.sha1(np.ascontiguousarray(self.data).tobytes())
        digest.update(np.packbits(self.valid).tobytes())
        return {"kind": "array", "shape": list(self.data.shape), "dtype": self.dtype, "sha1": digest.hexdigest(),
                "grid": self.grid.to_dict()}


# ---------------------------------------------------------------------------------------------- dispatch
def as_source(
    source: Any,
    *,
    bands: Sequence[str | int] | None = None,
    grid: GridSpec | None = None,
    nodata: float | None = None,
) -> RasterSource:
    """Turn what a user passes to :func:`~dinov3geo.inference.predict_raster` into a :class:`RasterSource`.

    * a :class:`RasterSource`: used as is (``grid`` must then be None);
    * a :class:`~dinov3geo.io.scene.Scene`, a raster path or a STAC item: one scene (see
      :func:`~dinov3geo.io.open_scene`; for a folder/list of *band files* open the scene yourself);
    * a list of scenes or raster paths: a :class:`MosaicSource` (use :class:`StackSource` to stack dates);
    * a folder holding a Zarr tile store (``zarr.json``): a :class:`TileStoreSource`.

    Args:
        bands: bands to use, by name or 1-based index (scenes and mosaics).
        grid: read the input on this grid instead of its own.
        nodata: nodata override for raster files that declare none or a wrong one.
    """
    if isinstance(source, RasterSource):
        if grid is not None or bands is not None:
            raise ValueError("pass grid/bands when building the RasterSource, not with it")
        return source
    if isinstance(source, list | tuple):
        scenes = [s if isinstance(s, Scene) else open_scene(s, bands=bands, nodata=nodata) for s in source]
        if bands is not None:
            scenes = [s.select(list(bands)) if isinstance(source[k], Scene) else s for k, s in enumerate(scenes)]
        return MosaicSource(scenes, grid=grid)
    if isinstance(source, str | os.PathLike) and (Path(source) / "zarr.json").exists():
        if bands is not None:
            raise ValueError("band selection is not supported for tile stores")
        return TileStoreSource(source, grid=grid)
    if isinstance(source, Scene):
        scene = source.select(list(bands)) if bands is not None else source
    else:
        with rasterio.Env(**GDAL_ENV):
            scene = open_scene(source, bands=bands, nodata=nodata)
    if grid is not None:
        scene = scene.with_grid(grid)
    return SceneSource(scene)
