"""Lazy dinov3geo maps of xarray / dask rasters: features, canopy height, change, land cover (Pangeo-native).

Take a georeferenced ``xarray.DataArray`` with dims ``(band, y, x)`` (rioxarray conventions: CRS and transform
through ``.rio``), e.g. from ``rioxarray.open_rasterio(path, chunks=...)``, ``stackstac.stack(...)`` (one time
step, ``xy_coords="center"``) or ``odc.stac.load(...).to_array("band")``, and get back a **lazy** (dask)
``DataArray``::

    import rioxarray
    import dinov3geo.xarray  # registers the ``.dinov3geo`` accessor

    img = rioxarray.open_rasterio("scene.tif", chunks={"x": 2048, "y": 2048})
    chm = img.dinov3geo.canopy_height("canopy.pt")           # bands height, height_std; nothing computed yet
    chm.rio.to_raster("chm.tif", tiled=True, lock=True)      # or chm.to_zarr("chm.zarr"), chm.mean().compute()

Functions: :func:`predict` (any :class:`~dinov3geo.inference.RasterModel`), :func:`features`,
:func:`canopy_height`, :func:`change_probability`, :func:`landcover`; the same as methods of the
``DataArray.dinov3geo`` accessor.

**The same numbers as the raster engine.** The result equals :func:`dinov3geo.inference.predict_raster` on
the same pixels (the DataArray written to a GeoTIFF; tested bit for bit): the same window lattice anchored on
the array's first pixel (:func:`~dinov3geo.inference.make_layout` with the same ``window``, ``overlap``,
``block_size`` and ``blocksize``), the same blocks of windows, batches, blend weights and summation order.
Each engine block is one dask task running the engine's own block code (reading its windows in strips,
skipping windows with no valid pixel, batching them, calling the model, accumulating ``sum(w * y)`` and
``sum(w)``); each output chunk adds the cropped sums of the blocks reaching into it in the engine's order and
divides (:func:`dinov3geo.inference.layout.finalise_blend`). Float32 sums depend on their order, so keep
``block_size``/``blocksize`` equal to the engine run you compare with (the defaults are the engine's). Some
models' CPU kernels also round differently with another torch thread count (a canopy head: ~1e-6 relative),
and the engine's thread tuner switches counts during a run: ``model_threads=1`` on both sides gives identical
bits for every model.

**Graph.** ``block`` tasks (one per engine block) -> ``crop`` tasks (the part of a block's sums inside one
output chunk; a block's full sums are freed once its crops are taken) -> output chunks. Output chunks are
square and regular (Zarr stores them as they are): one block stride (``block_windows * stride`` input pixels,
divided by ``scale``) a side, so each depends on at most 4 blocks (9 at the shifted last row/column), halved
for many-band outputs until a chunk holds at most 64 MiB (:func:`_chunk_step`). Every lattice window is run
**once** when the result is computed in one go (``compute``, ``to_zarr``, ``rio.to_raster``, a reduction):
duplicate-compute factor 1.0. Parts computed one after the other recompute the blocks they share.

How a block task gets its input (``reads``):

* ``"per-block"`` (the default for dask-backed arrays): the task computes its own input window from the input's
  graph, culled to that window, on the synchronous scheduler. Nothing of the input is kept between tasks, so
  peak memory is bounded by the dask threads times one block, whatever the raster size or the order dask
  chooses. For ``from_array``-style inputs (``rioxarray.open_rasterio(chunks=...)``, Zarr) dask fuses the slice
  into the read: each block reads only its window (plus the overlap) from the file. Input chunks that are
  *computed* (reprojection, compositing, generated data) are computed again by every block they straddle
  (the benchmark's generated input: 1.4x CPU at the default blocks).
* ``"shared"`` (the default for arrays given in memory): block tasks depend on the input's chunks, each
  computed once and kept until every block reading it has run. Cheaper for expensive inputs, but dask's local
  scheduler then keeps a band of input chunks across the raster's width (measured: peak RSS 1.30x from
  20000^2 to 40000^2, against 1.04x per block). Also the choice for arrays persisted on a ``dask.distributed``
  cluster (their chunks are futures, which a block task cannot compute itself).

**Lazy.** Building the result reads no pixel: only metadata (shape, chunks, coordinates, CRS) is used and
the model is not called (tested with an input whose chunks count their reads).

**Memory.** A block task holds the input chunks of its window (``"shared"``: as dask hands them over; per
block: the window itself), one strip of windows at a time as the engine reads them, a few batches and the
block's float32 sums (``K + 1`` bands over its extent); output chunks are ``K`` bands of one block stride a
side. The engine's blocks are large for patch-grid models (tile-aligned: ~8600 px a side for a 3-band
``scale = 16`` model, ~220 MB of uint8 RGB input); ``blocksize=`` (output pixels, a multiple of 16) makes them
smaller at the price of bit equality with the engine's default run (float32 rounding). ``benchmarks/
xarray_memory.py`` measures peak RSS on generated arrays of 40000^2 x 3 and 20000^2 x 3 (see its README
section).

**Model and threads.** The model lives in one graph node (the job) that every block task references: on the
default threaded scheduler it is never copied or pickled. Model calls are serialised by a process-wide lock
(one model call at a time, as in the engine, whose model runs in one thread): the other dask threads read
and assemble input, accumulate, crop and write meanwhile, so torch's intra-op threads and dask's threads do
not oversubscribe the cores. On CPU the intra-op thread count follows the cores other processes leave free
(:class:`dinov3geo.utils.threads.FairThreads`, ``model_threads="auto"``; capped by torch's setting) and torch's
setting is restored after every call. More dask threads than 2-4 gain nothing on CPU (they wait for the lock,
each holding a block's input): ``dask.config.set(scheduler="threads", num_workers=2)`` is a good choice there.
Progress: use dask's own (``dask.diagnostics.ProgressBar()``, or the distributed dashboard).

**dask.distributed.** Works: the job is one graph node, serialised once and sent to the workers that run
blocks. When the model was loaded from files (the wrappers given weight/model paths), the job carries the
paths instead of the weights and each worker process loads the model once; a :class:`RasterModel` object
given to :func:`predict` travels pickled with the graph (fine for small models; for large ones pass
``model_loader=functools.partial(load_fn, path)``). Per-block reads need the input readable from the
workers (files on a shared filesystem or object storage, as for any dask-on-files graph).

Validity: a pixel is valid where no band equals the nodata value (``nodata`` argument, else ``da.rio.nodata``;
NaN for ``masked=True`` arrays) and, for floats, every band is finite; outputs are nodata (NaN for float maps)
where no valid input pixel contributed. Mask clouds or an AOI by setting pixels to nodata/NaN first (e.g.
``da.rio.clip(...)``, ``da.where(clear)``). Normalisation of uint8 imagery follows the *stored* dtype
(``da.encoding["dtype"]`` for arrays opened with ``masked=True``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import dask
import dask.array as dsa
import numpy as np
import torch
import xarray as xr
from affine import Affine
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from rasterio.crs import CRS
from rasterio.windows import Window

from dinov3geo.inference.engine import (
    InferenceConfig,
    _Accumulator,
    _Batch,
    _block_batches,
    _read_strip,
    _run_model,
    make_layout,
    resolve_amp,
    resolve_device,
)
from dinov3geo.inference.layout import Layout, Rect, _intersect, finalise_blend
from dinov3geo.inference.models import RasterModel
from dinov3geo.inference.sources import RasterSource, WindowReader
from dinov3geo.io.grid import GridSpec
from dinov3geo.utils.threads import FairThreads, fair_threads_setting

try:  # dask >= 2024.12: explicit task specs (legacy tuples referencing keys of other layers are not always
    # resolved by newer dask when a layer is converted on its own)
    from dask._task_spec import DataNode, Task, TaskRef, parse_input
except ImportError:  # pragma: no cover - older dask: legacy tuple tasks
    Task = DataNode = TaskRef = parse_input = None

__all__ = ["DinoGeoAccessor", "canopy_height", "change_probability", "features", "landcover", "predict"]

log = logging.getLogger(__name__)

#: one model call at a time in this process (see the module docstring)
_MODEL_LOCK = threading.RLock()
#: models loaded by workers from a job's loader, by job token (a few recent jobs)
_LOADED: dict[str, RasterModel] = {}
_LOADED_MAX = 2


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class _Input:
    """One georeferenced input array, normalised to ``(band, y, x)``."""

    data: Any  # dask array [C, H, W]
    nodata: float | None
    band_names: tuple[str, ...]
    raw_dtype: np.dtype  # the stored dtype (before masking), for normalisation defaults
    y_dim: str
    x_dim: str
    y: xr.DataArray | None
    x: xr.DataArray | None
    crs: CRS | None
    transform: Affine
    scalar_coords: dict[str, Any]
    what: str
    in_memory: bool = False  # not dask-backed when given (numpy or a lazily indexed file without chunks)

    @property
    def height(self) -> int:
        return int(self.data.shape[1])

    @property
    def width(self) -> int:
        return int(self.data.shape[2])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)


def _band_names(da: xr.DataArray, band_dim: str) -> tuple[str, ...]:
    """Band names: string band coordinates, else the ``long_name`` descriptions rioxarray reads, else
    ``band_<k>``."""
    n = int(da.sizes[band_dim])
    if band_dim in da.coords:
        vals = [v.item() if hasattr(v, "item") else v for v in da.coords[band_dim].values]
        if all(isinstance(v, str) for v in vals):
            return tuple(vals)
    ln = da.attrs.get("long_name")
    if isinstance(ln, list | tuple) and len(ln) == n and all(isinstance(v, str) and v for v in ln):
        return tuple(ln)
    return tuple(f"band_{k + 1}" for k in range(n))


def _as_input(da: Any, nodata: float | None, what: str = "the DataArray") -> _Input:
    """Check ``da`` and bring it to ``(band, y, x)``, dask-backed (nothing is read)."""
    import rioxarray  # noqa: F401 - registers .rio

    if isinstance(da, xr.Dataset):
        raise TypeError(f"{what} is an xarray Dataset; pass a DataArray with dims (band, y, x), e.g. "
                        "ds.to_array('band') (odc-stac) or ds['<variable>']")
    if not isinstance(da, xr.DataArray):
        raise TypeError(f"{what} must be an xarray.DataArray with dims (band, y, x), got {type(da).__name__}")
    try:
        y_dim, x_dim = da.rio.y_dim, da.rio.x_dim
    except Exception as exc:  # rioxarray's MissingSpatialDimensionError
        raise ValueError(f"{what} has dims {tuple(da.dims)}: no spatial dims found; name them 'y' and 'x' (or "
                         "set them with da.rio.set_spatial_dims(x_dim=..., y_dim=...))") from exc
    others = [d for d in da.dims if d not in (y_dim, x_dim)]
    if len(others) > 1:
        extra = [d for d in others if d != "band"] or others[1:]
        raise ValueError(f"{what} has dims {tuple(da.dims)}; give one image with dims (band, y, x): select one "
                         f"{extra[0]!r} step first, e.g. da.isel({extra[0]}=0)")
    if not others:
        da = da.expand_dims("band")
        others = ["band"]
    band_dim = others[0]
    if da.sizes[y_dim] < 1 or da.sizes[x_dim] < 1 or da.sizes[band_dim] < 1:
        raise ValueError(f"{what} is empty: shape {dict(da.sizes)}")
    if not np.issubdtype(da.dtype, np.number) or np.issubdtype(da.dtype, np.complexfloating):
        raise ValueError(f"{what} has dtype {da.dtype}; give numeric (integer or float) pixel values")
    da = da.transpose(band_dim, y_dim, x_dim)
    in_memory = False
    if da.chunks is None:  # not dask-backed (``.data`` would load a lazily indexed file: not touched)
        in_memory = isinstance(getattr(da.variable, "_data", None), np.ndarray)
        # a numpy array or a lazily indexed file (rioxarray without chunks): wrap it, reading nothing
        da = da.chunk({band_dim: -1, y_dim: 2048, x_dim: 2048})
    try:
        coords = y_dim in da.coords and x_dim in da.coords and da.sizes[y_dim] > 1 and da.sizes[x_dim] > 1
        transform = da.rio.transform(recalc=coords)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{what} has no usable transform ({exc}); give it x/y coordinates of pixel centres or "
                         "write one with da.rio.write_transform(...)") from exc
    crs = da.rio.crs
    if nodata is None:
        nodata = da.rio.nodata
        if nodata is None:
            nodata = da.rio.encoded_nodata
    raw = np.dtype(da.encoding.get("dtype") or da.dtype)
    scalars = {k: v for k, v in da.coords.items() if v.ndim == 0 and k != "spatial_ref"}
    return _Input(data=da.data, nodata=None if nodata is None else float(nodata),
                  band_names=_band_names(da, band_dim), raw_dtype=raw, y_dim=str(y_dim), x_dim=str(x_dim),
                  y=da.coords.get(y_dim), x=da.coords.get(x_dim),
                  crs=crs, transform=transform, scalar_coords=scalars, what=what, in_memory=in_memory)


def _same_grid(a: _Input, b: _Input) -> bool:
    if (a.height, a.width) != (b.height, b.width):
        return False
    if (a.crs is None) != (b.crs is None) or (a.crs is not None and a.crs != b.crs):
        return False
    res = max(abs(a.transform.a), abs(a.transform.e), 1e-12)
    return all(abs(p - q) <= 1e-6 * res for p, q in zip(a.transform[:6], b.transform[:6], strict=True))


# ---------------------------------------------------------------------------------------------- engine glue
class _GridSource(RasterSource):
    """What the engine's block code needs to know about the input (grid, bands, dtype); pixels come from dask."""

    def __init__(self, grid: GridSpec, band_names: Sequence[str], dtype: str) -> None:
        self.grid = grid
        self.band_names = tuple(band_names)
        self.dtype = dtype

    def reader(self) -> WindowReader:  # pragma: no cover - never used: blocks read from their dask input
        raise NotImplementedError("the xarray path reads its windows from dask chunks")

    def describe(self) -> dict[str, Any]:
        return {"kind": "xarray", "bands": list(self.band_names), "grid": self.grid.to_dict()}


def _representable(value: float, dtype: np.dtype) -> Any:
    """``value`` in ``dtype`` when that dtype can hold it exactly, else None (it then matches no pixel)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if not math.isfinite(value) or value != int(value) or not info.min <= value <= info.max:
            return None
        return np.asarray(int(value), dtype=dtype)
    return np.asarray(value, dtype=dtype)


def _validity(arr: np.ndarray, nodata: float | None) -> np.ndarray:
    """``[H, W]``: no band equals ``nodata`` and, for floats, every band is finite (as the engine's readers)."""
    valid = np.ones(arr.shape[1:], dtype=bool)
    is_float = np.issubdtype(arr.dtype, np.floating)
    if nodata is not None:
        if math.isnan(nodata):
            if is_float:
                valid &= ~np.any(np.isnan(arr), axis=0)
        else:
            ndv = _representable(nodata, arr.dtype)
            if ndv is not None:
                valid &= ~np.any(arr == ndv, axis=0)
    if is_float:
        valid &= np.all(np.isfinite(arr), axis=0)
    return valid


def _nbands(nested: list) -> int:
    return sum(int(np.shape(bl[0][0])[0]) for bl in nested)


def _assemble(nested: list, origin: tuple[int, int], rect: Rect, out: np.ndarray | None = None) -> np.ndarray:
    """The input pixels of ``rect`` (rows, cols of the grid) from the dask chunks ``nested[b][i][j]`` whose
    first chunk starts at grid pixel ``origin``, copied into ``out`` (``[bands, rows, cols]``) when given."""
    rs, re_, cs, ce = rect
    b0 = 0
    for bl in nested:
        r = origin[0]
        nb = int(np.shape(bl[0][0])[0])
        for row in bl:
            h = int(np.shape(row[0])[1])
            c = origin[1]
            for chunk in row:
                w = int(np.shape(chunk)[2])
                y0, y1, x0, x1 = max(r, rs), min(r + h, re_), max(c, cs), min(c + w, ce)
                if y0 < y1 and x0 < x1:
                    ch = np.asarray(chunk)
                    if out is None:
                        out = np.empty((_nbands(nested), re_ - rs, ce - cs), dtype=ch.dtype)
                    out[b0 : b0 + nb, y0 - rs : y1 - rs, x0 - cs : x1 - cs] = ch[:, y0 - r : y1 - r, x0 - c : x1 - c]
                c += w
            r += h
        b0 += nb
    assert out is not None
    return out


class _ChunkReader(WindowReader):
    """Windows of the grid read from the dask chunks a block task received (per input: ``(nested chunks,
    origin)``), with the engine readers' semantics: boundless (outside the grid: 0, invalid), a pixel is
    invalid where its input says so (:func:`_validity`) and holds 0 there; stacked inputs (dates) are each
    zeroed at their own invalid pixels, cast to the common dtype and concatenated, and a pixel is valid where
    every input is. Only the strips the engine asks for are assembled (with ``reads="shared"`` a block's
    input then never exists as one array besides its chunks; per block, the window is its one chunk)."""

    def __init__(self, parts: list[tuple[list, tuple[int, int]]], nodatas: Sequence[float | None], dtype: np.dtype,
                 height: int, width: int) -> None:
        self.parts, self.nodatas, self.dtype = parts, list(nodatas), np.dtype(dtype)
        self.height, self.width = height, width
        self.nbands = [_nbands(nested) for nested, _ in parts]

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        r0, c0, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        data = np.zeros((sum(self.nbands), h, w), dtype=self.dtype)
        valid = np.zeros((h, w), dtype=bool)
        rect = (max(r0, 0), min(r0 + h, self.height), max(c0, 0), min(c0 + w, self.width))
        if rect[0] >= rect[1] or rect[2] >= rect[3]:
            return data, valid
        inner = (slice(rect[0] - r0, rect[1] - r0), slice(rect[2] - c0, rect[3] - c0))
        v_all: np.ndarray | None = None
        b0 = 0
        for (nested, origin), nd, nb in zip(self.parts, self.nodatas, self.nbands, strict=True):
            dst = data[(slice(b0, b0 + nb), *inner)]
            if np.asarray(nested[0][0][0]).dtype == self.dtype:
                arr = _assemble(nested, origin, rect, out=dst)  # straight from the chunks: one copy
            else:  # dates of different dtypes: validity on the date's own values, then the common dtype
                arr = _assemble(nested, origin, rect)
                dst[...] = arr
            v = _validity(arr, nd)
            if not v.all():
                dst[:, ~v] = 0
            v_all = v if v_all is None else v_all & v
            b0 += nb
        assert v_all is not None
        valid[inner] = v_all
        return data, valid


class _Job:
    """Everything the tasks of one prediction share: the model (or its loader), the engine config, the
    inputs' nodata values and dtypes. One graph node: never copied on the threaded scheduler."""

    def __init__(self, model: RasterModel, loader: Callable[[], RasterModel] | None, cfg: InferenceConfig,
                 nodatas: Sequence[float | None], dtype: np.dtype, device: Any, amp: Any,
                 model_threads: int | str | None) -> None:
        self.token = uuid.uuid4().hex
        self.model: RasterModel | None = model
        self.loader = loader
        self.cfg = cfg
        self.nodatas = list(nodatas)
        self.dtype = np.dtype(dtype)
        self.device_spec = str(device)
        self.amp_spec = amp
        self.model_threads = model_threads
        self.out_bands = int(model.out_bands)
        self.out_dtype = np.dtype(model.out_dtype)
        self.nodata = model.nodata
        self._ready = False
        self._cap: int | None = torch.get_num_threads()  # torch's setting: most intra-op threads "auto" uses

    # -- pickling (dask.distributed): a loader replaces the weights
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ready"] = False
        state["_cap"] = None  # the worker's own torch setting
        if self.loader is not None:
            state["model"] = None
        return state

    def __dask_tokenize__(self) -> str:
        return self.token

    def _model(self) -> tuple[RasterModel, torch.device, torch.dtype | None]:
        """The model on its device (loaded once per process when the job came without it); under the lock."""
        dev = resolve_device(self.device_spec)
        if self.model is None:
            m = _LOADED.get(self.token)
            if m is None:
                assert self.loader is not None
                m = self.loader()
                while len(_LOADED) >= _LOADED_MAX:
                    _LOADED.pop(next(iter(_LOADED)))
                _LOADED[self.token] = m
            self.model = m
        if not self._ready:
            self.model.to(dev).eval()
            self._ready = True
        return self.model, dev, resolve_amp(self.amp_spec, dev)

    def thread_cap(self) -> int:
        """Torch's intra-op thread setting outside model calls (read under the lock: calls change it)."""
        with _MODEL_LOCK:
            if self._cap is None:
                self._cap = torch.get_num_threads()
            return self._cap

    def run(self, batch: _Batch, fair: FairThreads | None) -> np.ndarray:
        """Model outputs of one batch (one model call at a time in the process)."""
        with _MODEL_LOCK:
            model, dev, amp = self._model()
            want: int | None = None
            if dev.type == "cpu":
                if isinstance(self.model_threads, int):
                    want = max(1, self.model_threads)
                elif self.model_threads == "auto" and fair is not None:
                    want = fair.tick()
            saved = torch.get_num_threads()
            if want and want != saved:
                torch.set_num_threads(want)
            try:
                return _run_model(model, batch, dev, amp, self.out_bands, self.cfg.layout.window_out)
            finally:
                if want and want != saved:
                    torch.set_num_threads(saved)

    # -- tasks
    def block(self, bi: int, bj: int, parts: list[tuple[list, tuple[int, int]]]
              ) -> tuple[Rect, np.ndarray] | None:
        """The engine's block ``(bi, bj)``: its windows read, batched, predicted and accumulated exactly as
        :func:`dinov3geo.inference.engine._process_block` does; ``(extent, sums)`` or None when empty."""
        cfg, lay = self.cfg, self.cfg.layout
        reader = _ChunkReader(parts, self.nodatas, self.dtype, lay.height, lay.width)
        acc = _Accumulator(cfg, (bi, bj))
        fair = None
        with contextlib.ExitStack() as stack:
            if self.model_threads == "auto":
                cap = self.thread_cap()
                # per block task, in its own thread (FairThreads keeps a per-thread stack); it only computes the
                # count, which run() applies under the lock and undoes after each call
                fair = stack.enter_context(FairThreads(cap, interval=0.5, probe=0.0, apply=False))
                if fair_threads_setting() == "auto":
                    fair.threads = cap  # until its first measurement (torch's count may be a call's just now)
            for batch in _block_batches(cfg, lambda cells: _read_strip(cfg, reader, cells), bi, bj, map_fn=map):
                y = self.run(batch, fair)
                for k, cell in enumerate(batch.cells):
                    acc.add(cell, y[k], batch.valid_out[k])
        return (acc.extent, acc.acc) if acc.n else None


def _crop_task(result: tuple[Rect, np.ndarray] | None, rect: Rect) -> tuple[Rect, np.ndarray] | None:
    """The part of a block's sums inside an output chunk (a copy: the block's sums can then be freed)."""
    if result is None:
        return None
    extent, acc = result
    inter = _intersect(rect, extent)
    if inter is None:
        return None
    sl = (slice(None), slice(inter[0] - extent[0], inter[1] - extent[0]),
          slice(inter[2] - extent[2], inter[3] - extent[2]))
    return inter, acc[sl].copy()


def _chunk_task(job: _Job, rect: Rect, crops: list) -> np.ndarray:
    """An output chunk: the blocks' sums added in the engine's (row-major block) order, then divided."""
    t0, t1, u0, u1 = rect
    total = np.zeros((job.out_bands + 1, t1 - t0, u1 - u0), dtype=np.float32)
    for crop in crops:
        if crop is None:
            continue
        (r0, r1, c0, c1), part = crop
        total[:, r0 - t0 : r1 - t0, c0 - u0 : c1 - u0] += part
    return finalise_blend(total, job.out_dtype, job.nodata)


def _task(key: Any, func: Callable[..., Any], *args: Any) -> Any:
    """A graph task ``func(*args)`` whose args may hold :func:`_ref` references (nested in lists/tuples)."""
    if Task is None:  # pragma: no cover
        return (func, *args)
    return Task(key, func, *(parse_input(a) for a in args))


def _ref(key: Any) -> Any:
    """A reference to the value of ``key`` inside a task's arguments."""
    return key if TaskRef is None else TaskRef(key)


def _data(key: Any, value: Any) -> Any:
    return value if DataNode is None else DataNode(key, value)


#: output chunks are halved (from one block stride a side) until they hold at most this many bytes
CHUNK_BYTES = 64 * 2**20


def _chunk_step(lay: Layout, out_bands: int, itemsize: int) -> int:
    """Side of the (square) output chunks in output pixels: one block stride, halved while a chunk would
    exceed :data:`CHUNK_BYTES` (many-band features: the engine's blocks are aligned to COG tiles, wide for
    patch grids), never below 64 px."""
    step = lay.block_windows * lay.stride_out
    while step > 64 and out_bands * step * step * itemsize > CHUNK_BYTES:
        step = max(64, math.ceil(step / 2))
    return step


def _chunk_edges(n_out: int, step: int) -> list[int]:
    return [*range(0, n_out, max(1, step)), n_out]


class _BlockInput:
    """``reads="per-block"``: the part of one input a block reads, as a culled dask array computed inside the
    block task (nothing of it is kept between tasks)."""

    def __init__(self, arr: dsa.Array, origin: tuple[int, int]) -> None:
        self.arr, self.origin = arr, origin

    def load(self) -> tuple[list, tuple[int, int]]:
        """``(nested chunks, origin)`` as :class:`_ChunkReader` takes them: one chunk, the whole window."""
        return [[[np.asarray(self.arr.compute(scheduler="sync"))]]], self.origin


def _block_task(job: _Job, bi: int, bj: int, parts: list) -> tuple[Rect, np.ndarray] | None:
    parts = [p.load() if isinstance(p, _BlockInput) else p for p in parts]
    return job.block(bi, bj, parts)


def _build_graph(job: _Job, inputs: Sequence[_Input], name: str, reads: str) -> dsa.Array:
    """The dask array of the prediction (see the module docstring: block -> crop -> output chunk)."""
    lay: Layout = job.cfg.layout
    step = _chunk_step(lay, job.out_bands, job.out_dtype.itemsize)
    rows, cols = _chunk_edges(lay.out_height, step), _chunk_edges(lay.out_width, step)
    job_key = f"{name}-job"
    blk, crp = f"{name}-block", f"{name}-crop"
    offsets = []
    for inp in inputs:
        _, ch_r, ch_c = inp.data.chunks
        offsets.append((np.concatenate([[0], np.cumsum(ch_r)]), np.concatenate([[0], np.cumsum(ch_c)]),
                        inp.data.__dask_keys__()))
    blk_dsk: dict[Any, Any] = {}
    for bi, bj in lay.blocks():
        win = lay.block_input_window(bi, bj)
        r0, c0 = int(win.row_off), int(win.col_off)
        rs, re_ = max(r0, 0), min(r0 + int(win.height), lay.height)
        cs, ce = max(c0, 0), min(c0 + int(win.width), lay.width)
        parts: list[Any] = []
        for inp, (off_r, off_c, keys) in zip(inputs, offsets, strict=True):
            if reads == "per-block":  # the block's window of the input graph, culled (and its slices fused)
                (sub,) = dask.optimize(inp.data[:, rs:re_, cs:ce])
                parts.append(_BlockInput(sub, (rs, cs)))
                continue
            i0, i1 = int(np.searchsorted(off_r, rs, "right")) - 1, int(np.searchsorted(off_r, re_, "left"))
            j0, j1 = int(np.searchsorted(off_c, cs, "right")) - 1, int(np.searchsorted(off_c, ce, "left"))
            nested = [[[_ref(keys[b][i][j]) for j in range(j0, j1)] for i in range(i0, i1)]
                      for b in range(len(keys))]
            parts.append((nested, (int(off_r[i0]), int(off_c[j0]))))
        blk_dsk[(blk, bi, bj)] = _task((blk, bi, bj), _block_task, _ref(job_key), bi, bj, parts)
    # which blocks reach into which output chunk: block extents are ordered along each axis
    row_ext = [lay.block_extent(bi, 0)[:2] for bi in range(lay.n_block_rows)]
    col_ext = [lay.block_extent(0, bj)[2:] for bj in range(lay.n_block_cols)]

    def reaching(ext: list[tuple[int, int]], a: int, b: int) -> list[int]:
        return [k for k, (e0, e1) in enumerate(ext) if e0 < b and e1 > a]

    crop_dsk: dict[Any, Any] = {}
    out_dsk: dict[Any, Any] = {}
    brows = [reaching(row_ext, rows[i], rows[i + 1]) for i in range(len(rows) - 1)]
    bcols = [reaching(col_ext, cols[j], cols[j + 1]) for j in range(len(cols) - 1)]
    for ci in range(len(rows) - 1):
        for cj in range(len(cols) - 1):
            rect = (rows[ci], rows[ci + 1], cols[cj], cols[cj + 1])
            crops = []
            for bi in brows[ci]:  # row-major: the engine's order of adding blocks
                for bj in bcols[cj]:
                    key = (crp, bi, bj, ci, cj)
                    crop_dsk[key] = _task(key, _crop_task, _ref((blk, bi, bj)), rect)
                    crops.append(_ref(key))
            out_dsk[(name, 0, ci, cj)] = _task((name, 0, ci, cj), _chunk_task, _ref(job_key), rect, crops)
    layers: dict[str, Any] = {}
    deps: dict[str, set[str]] = {}
    in_layers: set[str] = set()
    if reads == "shared":
        for inp in inputs:
            g = inp.data.__dask_graph__()
            if not isinstance(g, HighLevelGraph):
                g = HighLevelGraph.from_collections(inp.data.name, g, dependencies=())
            layers.update(g.layers)
            deps.update(g.dependencies)
            in_layers.update(inp.data.__dask_layers__())
    layers[job_key] = MaterializedLayer({job_key: _data(job_key, job)})
    deps[job_key] = set()
    layers[blk] = MaterializedLayer(blk_dsk)
    deps[blk] = {job_key, *in_layers}
    layers[crp] = MaterializedLayer(crop_dsk)
    deps[crp] = {blk}
    layers[name] = MaterializedLayer(out_dsk)
    deps[name] = {crp, job_key}
    chunks = ((job.out_bands,), tuple(np.diff(rows).tolist()), tuple(np.diff(cols).tolist()))
    return dsa.Array(HighLevelGraph(layers, deps), name, chunks=chunks, dtype=job.out_dtype,
                     meta=np.empty((0, 0, 0), dtype=job.out_dtype))


# ---------------------------------------------------------------------------------------------- predict
def _coords_1d(transform: Affine, n: int, axis: str) -> np.ndarray:
    k = np.arange(n, dtype=np.float64) + 0.5
    return transform.c + k * transform.a if axis == "x" else transform.f + k * transform.e


def _predict(model: RasterModel, inputs: Sequence[_Input], *, window: int, overlap: int | None,
             batch_size: int, device: Any, amp: Any, block_size: int | None, blocksize: int | None,
             model_threads: int | str | None, name: str, attrs: dict[str, Any] | None = None,
             loader: Callable[[], RasterModel] | None = None, reads: str = "auto") -> xr.DataArray:
    """:func:`predict` over one input or several stacked along the band axis (all on one grid)."""
    if not isinstance(model, RasterModel):
        raise TypeError(f"model must be a dinov3geo RasterModel (e.g. BackboneFeatures, CanopyRasterModel), got "
                        f"{type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not (model_threads is None or model_threads == "auto"
            or (isinstance(model_threads, int) and not isinstance(model_threads, bool) and model_threads >= 1)):
        raise ValueError(f"model_threads must be 'auto', None or a positive int, got {model_threads!r}")
    if reads not in ("auto", "per-block", "shared"):
        raise ValueError(f"reads must be 'auto', 'per-block' or 'shared', got {reads!r}")
    if reads == "auto":  # arrays given in memory have nothing to bound: share their chunks
        reads = "shared" if all(inp.in_memory for inp in inputs) else "per-block"
    ref = inputs[0]
    for other in inputs[1:]:
        if not _same_grid(ref, other):
            raise ValueError(
                f"{other.what} is not on the grid of {ref.what} (shape {other.height}x{other.width} vs "
                f"{ref.height}x{ref.width}, CRS and transform must match); align it first, e.g. "
                "after = after.rio.reproject_match(before)")
    names = (list(ref.band_names) if len(inputs) == 1
             else [f"t{k}_{b}" for k, inp in enumerate(inputs) for b in inp.band_names])
    if model.in_bands is not None and model.in_bands != len(names):
        raise ValueError(f"the model expects {model.in_bands} bands but {ref.what if len(inputs) == 1 else 'the inputs'}"
                         f" {'has' if len(inputs) == 1 else 'have'} {len(names)} ({', '.join(names)}); select bands "
                         "first, e.g. da.sel(band=[...]) or da.isel(band=[...])")
    layout = make_layout(model, ref.height, ref.width, window=window, overlap=overlap, block_size=block_size,
                         blocksize=blocksize)
    dtype = np.result_type(*[inp.dtype for inp in inputs])
    grid = GridSpec(ref.crs if ref.crs is not None else CRS.from_epsg(3857), ref.transform, ref.width, ref.height)
    amp_name = amp
    with contextlib.suppress(Exception):  # the engine's names when the device is known here
        t = resolve_amp(amp, resolve_device(device))
        amp_name = None if t is None else str(t).replace("torch.", "")
    cfg = InferenceConfig(source=_GridSource(grid, names, str(dtype)), layout=layout, out_bands=model.out_bands,
                          parts=Path(os.devnull), batch_size=batch_size, device=str(device), amp=amp_name)
    job = _Job(model, loader, cfg, [inp.nodata for inp in inputs], dtype, device, amp_name, model_threads)
    token = tokenize(job.token, [inp.data.name for inp in inputs], [inp.nodata for inp in inputs], window,
                     layout.overlap, block_size, blocksize, batch_size, reads)
    arr = _build_graph(job, inputs, f"dinov3geo-{name}-{token}", reads)
    scale = layout.scale
    out_tr = ref.transform * Affine.scale(scale) if scale > 1 else ref.transform
    ycoord = (ref.y.values if (scale == 1 and ref.y is not None)
              else _coords_1d(out_tr, layout.out_height, "y"))
    xcoord = (ref.x.values if (scale == 1 and ref.x is not None)
              else _coords_1d(out_tr, layout.out_width, "x"))
    band_names = np.array(model.names(), dtype=object)
    meta = {"long_name": tuple(model.names()), "dinov3geo_model": type(model).__name__,
            "dinov3geo_window": int(window), "dinov3geo_overlap": int(layout.overlap), "dinov3geo_scale": int(scale),
            "dinov3geo_reads": reads, **(attrs or {})}
    out = xr.DataArray(arr, dims=("band", ref.y_dim, ref.x_dim),
                       coords={"band": band_names, ref.y_dim: ycoord, ref.x_dim: xcoord, **ref.scalar_coords},
                       name=name, attrs=meta)
    if ref.crs is not None:
        out = out.rio.write_crs(ref.crs)
    out = out.rio.write_transform(out_tr)
    if model.nodata is not None:
        out = out.rio.write_nodata(model.nodata, encoded=False)
    return out


def predict(
    model: RasterModel,
    da: xr.DataArray,
    *,
    window: int = 512,
    overlap: int | None = None,
    batch_size: int = 8,
    nodata: float | None = None,
    device: str | torch.device = "auto",
    amp: str | bool | None = "auto",
    block_size: int | None = None,
    blocksize: int | None = None,
    model_threads: int | str | None = "auto",
    model_loader: Callable[[], RasterModel] | None = None,
    reads: str = "auto",
    name: str = "prediction",
) -> xr.DataArray:
    """Run ``model`` over ``da`` with the engine's blended sliding windows, lazily (see the module docstring).

    Args:
        model: a :class:`~dinov3geo.inference.RasterModel` (``BackboneFeatures``, ``CanopyRasterModel``,
            ``ZeroShotChange`` over two stacked dates, ``LandcoverRasterModel``...).
        da: a georeferenced DataArray ``(band, y, x)`` (a ``(y, x)`` array is one band); any chunking, or none.
        window, overlap, batch_size, device, amp, block_size, blocksize: as for
            :func:`~dinov3geo.inference.predict_raster` (keep them equal to compare with it bit for bit).
        nodata: input nodata value (default ``da.rio.nodata``; NaN and non-finite floats are always nodata).
        model_threads: torch intra-op threads on CPU: ``"auto"`` (follow the cores other processes leave free,
            at most torch's setting), an int, or None (torch's setting).
        model_loader: a picklable zero-argument function returning the same model, used instead of pickling
            the model for ``dask.distributed`` workers (each worker process loads it once).
        reads: how block tasks get their input (see the module docstring): ``"per-block"`` (each block task
            computes its own window of the input graph: memory bounded by the dask threads whatever the raster
            size), ``"shared"`` (blocks depend on the input's chunks: each chunk computed once but kept until
            all blocks reading it ran), ``"auto"`` (default: ``"shared"`` for arrays given in memory, else
            ``"per-block"``).
        name: the result's name (``to_zarr`` variable, ``rio.to_raster`` description).

    Returns:
        A dask-backed DataArray ``(band, y, x)``: ``band`` = the model's output band names, ``y``/``x`` the
        input's coordinates (coarsened by ``model.scale`` when > 1), CRS and transform written (``.rio``),
        nodata ``model.nodata`` where no valid input pixel contributed. Nothing is computed until asked.
    """
    return _predict(model, [_as_input(da, nodata)], window=window, overlap=overlap, batch_size=batch_size,
                    device=device, amp=amp, block_size=block_size, blocksize=blocksize, model_threads=model_threads,
                    name=name, loader=model_loader, reads=reads)


# ---------------------------------------------------------------------------------------------- wrappers
def _load_path_backbone(weights: Any) -> Any:
    from dinov3geo.models import load_backbone

    return load_backbone(weights)


def _features_model(backbone: Any, layers: Sequence[int], raw_dtype: str, value_scale: float | None,
                    mean: Sequence[float] | None, std: Sequence[float] | None) -> RasterModel:
    from dinov3geo.tasks.features import MultiLayerFeatures, normalisation_for

    if isinstance(backbone, str | os.PathLike):
        backbone = _load_path_backbone(backbone)
    backbone.eval()
    vs, m, s = normalisation_for(backbone, raw_dtype)
    return MultiLayerFeatures(backbone, layers, value_scale=value_scale if value_scale is not None else vs,
                              mean=mean if mean is not None else m, std=std if std is not None else s)


def features(
    da: xr.DataArray,
    weights: str | os.PathLike[str] | torch.nn.Module | None = None,
    *,
    arch: str = "vits16",
    layers: Sequence[int] = (-1,),
    window: int = 512,
    overlap: int | None = None,
    batch_size: int | None = None,
    nodata: float | None = None,
    device: str | torch.device = "auto",
    amp: str | bool | None = "auto",
    value_scale: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> xr.DataArray:
    """Dense DINOv3 patch features of ``da``, lazily: the values :func:`dinov3geo.tasks.features.extract_features`
    writes, as a DataArray ``(band, y, x)`` on the patch grid (16 px; bands ``l<layer>_f<k>``).

    Args:
        da: ``(band, y, x)`` image (bands in the backbone's order).
        weights: backbone weights file (Meta, timm or dinov3geo format) or a backbone module; None builds
            ``arch`` with random weights (tests).
        batch_size: windows per model call (None: chosen by memory as ``extract_features`` does).
        layers, window, overlap, nodata, device, amp: see :func:`predict` and ``extract_features``.
        value_scale, mean, std: override the input normalisation (default: the backbone's metadata, else its
            family's RGB statistics on ``[0, 1]`` values, uint8 divided by 255: see ``normalisation_for``).
        kwargs: more :func:`predict` options (``block_size``, ``model_threads``...).
    """
    from dinov3geo.inference.batching import check_batch_size, resolve_batch_size
    from dinov3geo.models import build_backbone

    check_batch_size(batch_size)
    dev = resolve_device(device)
    inp = _as_input(da, nodata)
    path = isinstance(weights, str | os.PathLike)
    backbone = weights if isinstance(weights, torch.nn.Module) else (
        _load_path_backbone(weights) if path else build_backbone(arch))
    model = _features_model(backbone, layers, str(inp.raw_dtype), value_scale, mean, std)
    loader = (partial(_features_model, os.fspath(weights), list(layers), str(inp.raw_dtype), value_scale, mean, std)
              if path else None)
    bs = resolve_batch_size(model, window, dev, batch_size, fallback=4)
    return _predict(model, [inp], window=window, overlap=overlap, batch_size=bs, device=dev, amp=amp,
                    name=kwargs.pop("name", "features"), loader=loader, **_engine_kwargs(kwargs),
                    attrs={"dinov3geo_layers": [int(x) for x in model.layers]})


def _engine_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    allowed = {"block_size": None, "blocksize": None, "model_threads": "auto", "reads": "auto"}
    bad = sorted(set(kw) - set(allowed))
    if bad:
        raise TypeError(f"unexpected option(s) {bad}; accepted: {sorted(allowed)}")
    return {k: kw.get(k, v) for k, v in allowed.items()}


def _select_bands(da: xr.DataArray, want: Sequence[str] | None, what: str) -> xr.DataArray:
    """``da`` restricted to the model's bands (by name) when it names them all; else unchanged."""
    if not want:
        return da
    inp_dims = [d for d in da.dims if d not in (da.rio.y_dim, da.rio.x_dim)]
    if len(inp_dims) != 1:
        return da
    names = [n.lower() for n in _band_names(da, inp_dims[0])]
    wanted = [str(w).lower() for w in want]
    if all(w in names for w in wanted) and names != wanted:
        idx = [names.index(w) for w in wanted]
        log.info("%s: using bands %s of %s", what, list(want), names)
        return da.isel({inp_dims[0]: idx})
    return da


def _canopy_model(model: Any, chmv2_backbone: Any, chmv2_head: Any, device: str) -> Any:
    from dinov3geo.tasks.canopy.predict import canopy_raster_model

    return canopy_raster_model(model, chmv2_backbone=chmv2_backbone, chmv2_head=chmv2_head, device=device)[0]


def canopy_height(
    da: xr.DataArray,
    model: str | os.PathLike[str] | RasterModel | None = None,
    *,
    chmv2_backbone: str | os.PathLike[str] | None = None,
    chmv2_head: str | os.PathLike[str] | None = None,
    window: int = 512,
    overlap: int | None = None,
    batch_size: int | None = None,
    nodata: float | None = None,
    device: str | torch.device = "auto",
    amp: str | bool | None = "auto",
    gsd_tolerance: float = 0.1,
    **kwargs: Any,
) -> xr.DataArray:
    """Canopy height of ``da`` in metres, lazily: bands ``height`` and ``height_std`` (uncertainty), the values
    :func:`dinov3geo.tasks.canopy.predict.predict_canopy` maps on the same grid.

    Args:
        da: ``(band, y, x)`` image; when the model records its band names and ``da`` names them (string band
            coordinates or ``long_name``), those bands are used in the model's order.
        model: a dinov3geo canopy model file or a :class:`~dinov3geo.tasks.canopy.model.CanopyRasterModel`;
            or give Meta's two CHMv2 files (``chmv2_backbone``, ``chmv2_head``; RGB uint8 input).
        batch_size: windows per model call (None: chosen by memory as ``predict_canopy`` does).
        gsd_tolerance: warn when the pixel size differs from the model's training GSD by more than this
            (relative). Unlike ``predict_canopy`` nothing is resampled: reproject first, e.g.
            ``da.rio.reproject(da.rio.crs, resolution=gsd)`` or ``da.coarsen(x=10, y=10).mean()``.
        window, overlap, nodata, device, amp, kwargs: see :func:`predict`.
    """
    from dinov3geo.tasks.canopy.predict import choose_batch_size, pixel_size_xy_m

    dev = resolve_device(device)
    rm = _canopy_model(model, chmv2_backbone, chmv2_head, str(dev))
    meta = getattr(rm.model, "metadata", {}) or {}
    da = _select_bands(da, meta.get("bands"), "canopy_height")
    inp = _as_input(da, nodata)
    gsd = meta.get("gsd")
    if gsd and inp.crs is not None:
        w_m, h_m = pixel_size_xy_m(GridSpec(inp.crs, inp.transform, inp.width, inp.height))
        if max(abs(w_m - gsd), abs(h_m - gsd)) > gsd_tolerance * gsd:
            warnings.warn(f"the image has {w_m:.3g} x {h_m:.3g} m pixels but the canopy model was trained at "
                          f"{gsd:.3g} m: heights will be off. Resample first, e.g. "
                          f"da.rio.reproject(da.rio.crs, resolution={gsd:g})", UserWarning, stacklevel=2)
    bs = choose_batch_size(rm, window, dev, batch_size)
    paths = [p for p in (model, chmv2_backbone, chmv2_head) if p is not None]
    loader = (partial(_canopy_model, model if not isinstance(model, RasterModel) else None, chmv2_backbone,
                      chmv2_head, str(dev))
              if paths and all(isinstance(p, str | os.PathLike) for p in paths) else None)
    return _predict(rm, [inp], window=window, overlap=overlap, batch_size=bs, device=dev, amp=amp,
                    name=kwargs.pop("name", "canopy_height"), loader=loader, **_engine_kwargs(kwargs),
                    attrs={"units": "metre"})


def _change_model(model: Any, weights: Any, bands_per_date: int, band_names: Sequence[str], raw_dtype: str,
                  layers: Any, value_scale: float | None, mean: Sequence[float] | None,
                  std: Sequence[float] | None) -> RasterModel:
    if model is not None:
        if isinstance(model, RasterModel):
            return model
        from dinov3geo.tasks.change.head import load_change_model

        return load_change_model(model, backbone=weights)
    if weights is None:
        raise ValueError("change_probability needs a trained change model (model=...) or backbone weights "
                         "(weights=...) for zero-shot change")
    from dinov3geo.tasks.change.zeroshot import ZeroShotChange
    from dinov3geo.tasks.features import normalisation_for

    bb = _load_path_backbone(weights) if isinstance(weights, str | os.PathLike) else weights
    vs, m, s = normalisation_for(bb, raw_dtype)
    if bb.patch_embed.proj.in_channels != bands_per_date and mean is None:
        m = s = None
    kw: dict[str, Any] = {"layers": layers} if layers is not None else {}
    return ZeroShotChange(bb, bands_per_date=bands_per_date, value_scale=vs if value_scale is None else value_scale,
                          mean=mean if mean is not None else m, std=std if std is not None else s,
                          band_names=list(band_names), **kw)


def change_probability(
    before: xr.DataArray,
    after: xr.DataArray,
    weights: str | os.PathLike[str] | torch.nn.Module | None = None,
    *,
    model: str | os.PathLike[str] | RasterModel | None = None,
    layers: Any = None,
    value_scale: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    window: int = 512,
    overlap: int | None = None,
    batch_size: int | None = None,
    nodata: float | None = None,
    device: str | torch.device = "auto",
    amp: str | bool | None = "auto",
    **kwargs: Any,
) -> xr.DataArray:
    """Change between two co-registered dates, lazily: a trained change head's probability (``model``), or the
    zero-shot cosine distance of frozen backbone features in ``[0, 1]`` (``weights`` only), as
    ``detect_change`` scores them (its ``change_prob.tif`` for ``method="head"``/``"zeroshot"``).

    The dates are stacked along the band axis (``[before bands, after bands]``, as
    :class:`~dinov3geo.inference.StackSource`); a pixel is valid where both dates are.

    Args:
        before, after: ``(band, y, x)`` images on one grid (same shape, CRS and transform; else align first:
            ``after.rio.reproject_match(before)``), the same bands in the same order.
        weights: backbone weights (file or module): zero-shot change; with ``model``, the backbone of a
            checkpoint that does not embed it.
        model: a trained change model file (``dinov3geo change train``) or a ``ChangeRasterModel``.
        layers, value_scale, mean, std: zero-shot settings (default: from the backbone, as ``detect_change``).
        nodata: nodata of both dates (default: each date's ``rio.nodata``).
        batch_size: windows per model call (None: a trained head's chosen by memory as ``detect_change`` does;
            zero-shot distances 4).
        window, overlap, device, amp, kwargs: see :func:`predict`.
    """
    from dinov3geo.inference.batching import check_batch_size, resolve_batch_size

    check_batch_size(batch_size)
    dev = resolve_device(device)
    b = _as_input(before, nodata, "before")
    a = _as_input(after, nodata, "after")
    if b.band_names != a.band_names and len(b.band_names) != len(a.band_names):
        raise ValueError(f"before has {len(b.band_names)} bands {list(b.band_names)} but after has "
                         f"{len(a.band_names)} {list(a.band_names)}; select the same bands in both")
    raw = str(b.raw_dtype)
    rm = _change_model(model, weights, len(b.band_names), b.band_names, raw, layers, value_scale, mean, std)
    paths = [p for p in (model, weights) if p is not None]
    loader = (partial(_change_model, model, weights, len(b.band_names), b.band_names, raw, layers, value_scale, mean,
                      std) if paths and all(isinstance(p, str | os.PathLike) for p in paths) else None)
    name = kwargs.pop("name", "change_probability" if "prob" in rm.names()[0] else "change_distance")
    bs = resolve_batch_size(rm, window, dev, batch_size, fallback=4)
    return _predict(rm, [b, a], window=window, overlap=overlap, batch_size=bs, device=dev, amp=amp,
                    name=name, loader=loader, **_engine_kwargs(kwargs))


def _landcover_model(model: Any, device: str) -> Any:
    from dinov3geo.tasks.landcover.predict import LandcoverRasterModel

    if isinstance(model, LandcoverRasterModel):
        return model
    return LandcoverRasterModel.from_checkpoint(model, device=device)[0]


def _classes_block(p: np.ndarray, lut: np.ndarray, confidence: bool) -> np.ndarray:
    """Class codes (and confidence percent) of a block of probabilities, as ``predict_landcover``'s second
    pass computes them from its probability COG."""
    from dinov3geo.tasks.landcover.classes import NODATA, confidence_percent

    p = p.astype(np.float32, copy=False)
    fin = np.isfinite(p)
    ok = fin.all(axis=0)
    idx = np.argmax(np.where(fin, p, -1.0), axis=0)
    codes = np.where(ok, lut[idx], NODATA).astype(np.uint8)
    if not confidence:
        return codes[None]
    conf = np.where(ok, np.max(np.where(fin, p, 0.0), axis=0), np.nan)
    return np.stack([codes, confidence_percent(conf, ~ok)])


def landcover(
    da: xr.DataArray,
    model: str | os.PathLike[str] | RasterModel,
    *,
    confidence: bool = True,
    window: int = 512,
    overlap: int | None = None,
    batch_size: int | None = None,
    nodata: float | None = None,
    device: str | torch.device = "auto",
    amp: str | bool | None = "auto",
    **kwargs: Any,
) -> xr.DataArray:
    """Land-cover classes of ``da``, lazily: uint8 class codes (band ``class``; 255 = no data) and, with
    ``confidence``, the maximum class probability in percent (band ``confidence``; 255 = no data), the
    values ``predict_landcover`` writes. ``attrs["classes"]`` holds the class table (JSON: code, name,
    colour), ``flag_values``/``flag_meanings`` the codes and names (CF). For the blended class probabilities
    themselves use :func:`predict` with the ``LandcoverRasterModel``.

    Args:
        da: ``(band, y, x)`` image; when the model records band names that ``da`` names, those are used.
        model: a land-cover model file (``dinov3geo landcover train``) or a ``LandcoverRasterModel``.
        batch_size: windows per model call (None: chosen by memory as ``predict_landcover`` does).
        window, overlap, nodata, device, amp, kwargs: see :func:`predict`.
    """
    from dinov3geo.inference.batching import check_batch_size, resolve_batch_size
    from dinov3geo.tasks.landcover.classes import NODATA

    check_batch_size(batch_size)

    dev = resolve_device(device)
    rm = _landcover_model(model, str(dev))
    meta = dict(getattr(rm.model, "metadata", {}) or {})
    da = _select_bands(da, meta.get("bands"), "landcover")
    loader = partial(_landcover_model, model, str(dev)) if isinstance(model, str | os.PathLike) else None
    name = kwargs.pop("name", "landcover")
    bs = resolve_batch_size(rm, window, dev, batch_size, fallback=4)
    probs = _predict(rm, [_as_input(da, nodata)], window=window, overlap=overlap, batch_size=bs,
                     device=dev, amp=amp, name=f"{name}-probabilities", loader=loader, **_engine_kwargs(kwargs))
    table = rm.table
    lut = np.asarray(table.code_lut())
    nb = 2 if confidence else 1
    data = probs.data.map_blocks(_classes_block, lut, confidence, dtype=np.uint8,
                                 chunks=((nb,), *probs.data.chunks[1:]), meta=np.empty((0, 0, 0), np.uint8))
    bands = ["class", "confidence"][:nb]
    attrs = {k: v for k, v in probs.attrs.items() if k not in ("long_name", "_FillValue")}
    attrs.update(long_name=tuple(bands), classes=table.to_json(), flag_values=[int(c) for c in table.codes],
                 flag_meanings=" ".join(n.replace(" ", "_") for n in table.names))
    out = xr.DataArray(data, dims=probs.dims, name=name, attrs=attrs,
                       coords={**{k: v for k, v in probs.coords.items() if k != "band"},
                               "band": np.array(bands, dtype=object)})
    return out.rio.write_nodata(NODATA, encoded=False)


# ---------------------------------------------------------------------------------------------- accessor
@xr.register_dataarray_accessor("dinov3geo")
class DinoGeoAccessor:
    """``da.dinov3geo.<method>(...)``: the functions of :mod:`dinov3geo.xarray` on this DataArray (lazy)."""

    def __init__(self, da: xr.DataArray) -> None:
        self._da = da

    def predict(self, model: RasterModel, **kwargs: Any) -> xr.DataArray:
        """:func:`dinov3geo.xarray.predict` of this array."""
        return predict(model, self._da, **kwargs)

    def features(self, weights: Any = None, **kwargs: Any) -> xr.DataArray:
        """:func:`dinov3geo.xarray.features` of this array."""
        return features(self._da, weights, **kwargs)

    def canopy_height(self, model: Any = None, **kwargs: Any) -> xr.DataArray:
        """:func:`dinov3geo.xarray.canopy_height` of this array."""
        return canopy_height(self._da, model, **kwargs)

    def change_probability(self, after: xr.DataArray, weights: Any = None, **kwargs: Any) -> xr.DataArray:
        """:func:`dinov3geo.xarray.change_probability` from this array (before) to ``after``."""
        return change_probability(self._da, after, weights, **kwargs)

    def landcover(self, model: Any, **kwargs: Any) -> xr.DataArray:
        """:func:`dinov3geo.xarray.landcover` of this array."""
        return landcover(self._da, model, **kwargs)

