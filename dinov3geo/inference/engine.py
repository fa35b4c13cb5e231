"""Region-scale, resumable, out-of-core sliding-window inference: :func:`predict_raster`.

How a run works (geometry in :mod:`dinov3geo.inference.layout`):

1. The region is cut into *blocks* of windows. For each block the engine reads its windows lazily (skipping
   windows with no valid pixel inside the AOI), runs the model in batches, and accumulates ``sum(w * y)`` and
   ``sum(w)`` over the block's extent, where ``w`` is the blend weight times the pixel's validity.
2. A finished block's accumulators are saved as ``<out>.parts/b_<row>_<col>.npy`` and the block is recorded
   in ``<out>.parts/manifest.json`` (both written atomically). A re-run with the same inputs, model and
   settings skips recorded blocks, so a killed run continues where it stopped and gives the same output.
3. As soon as every block reaching into an output *tile* is finished, the tile is finalised
   (``sum(w * y) / sum(w)``; nodata where the sum of weights is 0, i.e. input nodata or outside the AOI) and
   written to a :class:`~dinov3geo.io.cog.COGWriter`. At the end the COG (overviews, nodata, CRS, band
   descriptions) is moved into place atomically and the parts folder is removed.

Locally, a reader thread reads each row of a block's windows as one strip and batches the windows, the
calling thread only runs the model, and a writer thread accumulates, saves blocks and writes tiles, so the
model is never waiting on I/O. With a
``dask.distributed`` client, blocks are tasks on the cluster's workers (which must see the output folder)
and the client finalises tiles as blocks complete.

Peak memory is bounded by the window size, batch size and block size (a block's accumulators, a tile, a few
batches in flight and GDAL's block cache), not by the raster size. The parts folder holds the blocks' float32
accumulators until the run finishes (about ``(K + 1) * 4`` bytes per output pixel).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
import torch
from rasterio.windows import Window

from dinov3geo.inference.layout import Layout, Rect, _intersect, finalise_blend
from dinov3geo.inference.models import RasterModel
from dinov3geo.inference.sources import ArraySource, RasterSource, WindowReader, as_source
from dinov3geo.io.cog import DISK_FULL_ERRNOS, COGWriter, disk_full_error, free_bytes
from dinov3geo.io.errors import OutputError
from dinov3geo.io.grid import GridSpec
from dinov3geo.io.vector import aoi_geometry, aoi_mask
from dinov3geo.utils.atomic import check_writable, remove_if_writer_dead
from dinov3geo.utils.locks import output_lock
from dinov3geo.utils.memory import keep_freed_memory as _keep_freed_memory
from dinov3geo.utils.outputs import folder_kind, guard_output, input_paths, mark_folder, remove_owned
from dinov3geo.utils.progress import progress_bar
from dinov3geo.utils.runs import consecutive_runs
from dinov3geo.utils.threads import FairThreads

__all__ = ["BLOCK_BYTES", "DEFAULT_BLOCK_SIZE", "InferenceConfig", "make_layout", "parts_dir", "predict_array",
           "predict_raster", "region_buffer_bytes", "resolve_amp", "resolve_device"]

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "dinov3geo.inference.manifest"
MANIFEST_VERSION = 1
_STOP = object()


# ---------------------------------------------------------------------------------------------- device
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else as given."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_amp(amp: str | bool | None, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: ``"auto"`` is bf16 on a CUDA device that supports it (Ampere and later) and fp32 (None)
    elsewhere (CPU: the same numbers on every machine; older GPUs: no emulated bf16, and fp16 could overflow);
    ``"bf16"``/``"fp16"`` force it."""
    if amp in (None, False, "none", "fp32", "float32"):
        return None
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if amp in (True, "bf16", "bfloat16"):
        return torch.bfloat16
    if amp in ("fp16", "float16", "half"):
        return torch.float16
    raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or None, got {amp!r}")


# ---------------------------------------------------------------------------------------------- config
@dataclass
class InferenceConfig:
    """Everything a block needs, picklable for dask workers (built by :func:`predict_raster`)."""

    source: RasterSource
    layout: Layout
    out_bands: int
    parts: Path
    batch_size: int
    aoi: Any = None  # shapely geometry in the source CRS, or None
    aoi_wkb: bytes | None = None
    device: str = "cpu"
    amp: str | None = None
    read_threads: int = 1
    _prepared: Any = field(default=None, repr=False, compare=False)

    def prepared_aoi(self) -> Any:
        if self.aoi is None:
            return None
        if self._prepared is None:
            g = shapely.from_wkb(self.aoi_wkb) if self.aoi_wkb is not None else self.aoi
            shapely.prepare(g)
            self._prepared = g
        return self._prepared

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_prepared"] = None
        return state


#: the dinov3geo folder kind of a run's parts folder (``<out>.parts``)
PARTS_KIND = "inference-parts"


class NoValidDataError(ValueError):
    """Every input pixel is nodata/NaN (or outside the AOI): the map would be all nodata, so none is written."""

    def __init__(self, source: Any, with_aoi: bool = False) -> None:
        paths = [str(p) for p in input_paths(source)] or [str(source)]
        where = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more)"
        super().__init__(
            f"no valid pixel in {where}{' inside the AOI' if with_aoi else ''}: every pixel is nodata or NaN, so "
            "the map would be empty and nothing was written. Check the input (`dinov3geo info`), its nodata "
            "value (override it with the nodata option) and the AOI")


def _adopt_legacy_parts(parts: Path) -> None:
    """Mark a parts folder written before folders carried dinov3geo's marker (it holds our manifest)."""
    if folder_kind(parts) is None and (parts / "manifest.json").is_file():
        try:
            doc = json.loads((parts / "manifest.json").read_text())
            if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
                return
        except (OSError, ValueError):
            return
        mark_folder(parts, PARTS_KIND)


def parts_dir(out_path: str | os.PathLike[str]) -> Path:
    """The folder holding the manifest and block results of a run writing ``out_path``."""
    p = Path(out_path)
    return p.with_name(p.name + ".parts")


# ---------------------------------------------------------------------------------------------- reading
_STRIP_BYTES = 64 * 2**20  # most input bytes read at once (a strip of neighbouring windows)
_NATIVE_DTYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.float32)}

_WindowData = tuple[tuple[int, int], np.ndarray, np.ndarray]


def _strips(cfg: InferenceConfig, cells: Sequence[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """``cells`` (row-major) cut into runs of neighbouring windows of one lattice row, each read as one strip.

    One read per strip instead of per window: overlapping windows share their pixels (each input pixel of a
    row is read once, not up to twice) and GDAL copies one large window out of its block cache much faster
    than many small misaligned ones (measured: 0.8 s vs 1.7 s of CPU for the 121 windows of a deflate 4096^2
    raster). A strip holds at most ``_STRIP_BYTES`` of input.
    """
    src = cfg.source
    per_window = len(src.band_names) * cfg.layout.window**2 * np.dtype(src.dtype).itemsize
    max_n = max(1, int(_STRIP_BYTES // max(per_window * cfg.layout.stride / cfg.layout.window, 1)))
    runs: list[list[tuple[int, int]]] = []
    for cell in cells:
        if runs and runs[-1][-1][0] == cell[0] and len(runs[-1]) < max_n:
            runs[-1].append(cell)
        else:
            runs.append([cell])
    return runs


class _TileCache:
    """Tiles of the input file, read in tile-aligned runs and shared by the reader threads.

    Strips of neighbouring lattice rows overlap (by the window overlap) and rarely start on a tile row of the
    file, so reading each strip on its own makes GDAL decode most tile rows twice (measured on a 512-px tiled
    deflate raster: the strips of a region cost 2x the CPU of decoding it once). Here a strip is assembled
    from the file's tiles: the tiles it needs that nobody holds are read in one tile-aligned window per tile
    row (by whichever reader thread needs them first; others wait for them) and kept while neighbouring strips
    (the next lattice row, the next block's first column) may still need them: least recently used first
    out, bounded in bytes. Pixels and masks are the same as reading the strip directly (the reader is
    pixel-exact on the file's own grid; tested). Readers without a native tile shape are read directly.
    """

    def __init__(self, max_bytes: int = 3 * _STRIP_BYTES // 2, min_entries: int = 16) -> None:
        self.max_bytes = max_bytes
        self.min_entries = min_entries
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, int], list[Any]] = {}  # (tile row, tile col) -> [event, value, error, nbytes]
        self._bytes = 0

    def read(self, reader: WindowReader, window: Window) -> tuple[np.ndarray, np.ndarray]:
        shape = reader.block_shape()
        if shape is None:
            return reader.read(window)
        bh, bw = shape
        r0, c0, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        t0, t1 = c0 // bw, -(-(c0 + w) // bw)
        data: np.ndarray | None = None
        valid = np.empty((h, w), dtype=bool)
        for k in range(r0 // bh, -(-(r0 + h) // bh)):
            y0, y1 = max(r0, k * bh), min(r0 + h, (k + 1) * bh)  # strip rows in this tile row
            for t, (td, tv) in zip(range(t0, t1), self._tiles(reader, k, t0, t1, bh, bw), strict=True):
                x0, x1 = max(c0, t * bw), min(c0 + w, (t + 1) * bw)  # strip columns in this tile
                if data is None:
                    data = np.empty((td.shape[0], h, w), dtype=td.dtype)
                src = (slice(y0 - k * bh, y1 - k * bh), slice(x0 - t * bw, x1 - t * bw))
                data[:, y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] = td[(slice(None), *src)]
                valid[y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] = tv[src]
        assert data is not None
        return data, valid

    def _tiles(self, reader: WindowReader, k: int, t0: int, t1: int, bh: int, bw: int
               ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Tiles ``t0..t1-1`` of tile row ``k``: held ones shared, the missing ones read in contiguous runs."""
        entries: list[list[Any]] = []
        mine: list[int] = []  # tile columns this call reads
        with self._lock:
            for t in range(t0, t1):
                entry = self._entries.pop((k, t), None)
                if entry is None:
                    entry = [threading.Event(), None, None, 0]
                    mine.append(t)
                self._entries[(k, t)] = entry  # (re)inserted last: the dict's order is the order of use
                entries.append(entry)
        done = 0  # tiles of ``mine`` whose events are set
        try:
            for start, n in consecutive_runs(mine):
                run = entries[start - t0 : start - t0 + n]
                d, v = reader.read(Window(start * bw, k * bh, n * bw, bh))
                for i, entry in enumerate(run):  # set before the events fire
                    # copies, not views of the run: an evicted tile must free its memory (the byte bound)
                    tile = (d[:, :, i * bw : (i + 1) * bw].copy(), v[:, i * bw : (i + 1) * bw].copy())
                    entry[1] = tile
                    entry[3] = tile[0].nbytes + tile[1].nbytes
                    entry[0].set()
                done += n
                with self._lock:  # count the tiles still held (an eviction may have dropped one already)
                    self._bytes += sum(e[3] for i, e in enumerate(run) if self._entries.get((k, start + i)) is e)
                    while self._bytes > self.max_bytes and len(self._entries) > self.min_entries:
                        old = self._entries.pop(next(iter(self._entries)))  # least recently used
                        self._bytes -= old[3]
        except BaseException as exc:
            # every tile this call owns and has not delivered fails (waiters then read it themselves)
            with self._lock:
                for t in mine[done:]:
                    entry = entries[t - t0]
                    entry[2] = exc
                    if self._entries.get((k, t)) is entry:
                        del self._entries[(k, t)]
                    entry[0].set()
            raise
        out = []
        for t, entry in zip(range(t0, t1), entries, strict=True):
            entry[0].wait()
            if entry[2] is not None:  # another thread's read failed: read (and fail) here too
                d, v = reader.read(Window(t * bw, k * bh, bw, bh))
                out.append((d, v))
            else:
                out.append(entry[1])
        return out


def _read_strip(cfg: InferenceConfig, reader: WindowReader,
                cells: Sequence[tuple[int, int]], tiles: _TileCache | None = None) -> list[_WindowData | None]:
    """Data and validity (inside the AOI) of neighbouring windows of one lattice row, read as one strip
    (assembled from the file's tiles when a ``tiles`` cache is given).

    Returns one entry per cell: ``(cell, data, valid)`` (``data`` a view into the strip), or None when the
    window has no valid pixel inside the AOI.
    """
    lay, grid = cfg.layout, cfg.source.grid
    wins = [lay.input_window(*c) for c in cells]
    c0 = min(int(w.col_off) for w in wins)
    c1 = max(int(w.col_off + w.width) for w in wins)
    r0, h = int(wins[0].row_off), int(wins[0].height)
    strip = Window(c0, r0, c1 - c0, h)
    aoi = cfg.prepared_aoi()
    if aoi is not None and not aoi.intersects(shapely.box(*grid.window_grid(strip).bounds)):
        return [None] * len(cells)
    data, valid = reader.read(strip) if tiles is None else tiles.read(reader, strip)
    if lay.edge_fill == "reflect":
        data = _reflect_past_edge(data, r0, c0, grid.height, grid.width)
    out: list[_WindowData | None] = []
    for cell, win in zip(cells, wins, strict=True):
        cols = slice(int(win.col_off) - c0, int(win.col_off + win.width) - c0)
        d, v = data[:, :, cols], valid[:, cols]
        if aoi is not None:
            wgrid = grid.window_grid(win)
            wbox = shapely.box(*wgrid.bounds)
            if not aoi.intersects(wbox):
                out.append(None)
                continue
            if not aoi.contains(wbox):
                v = v & aoi_mask(shapely.clip_by_rect(aoi, *wgrid.bounds), wgrid)
        out.append((cell, d, v) if v.any() else None)
    return out


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    """Grid indices ``>= 0`` folded into ``[0, n)`` by reflection at the edges, the edge pixel not repeated
    (``numpy.pad(mode="reflect")``, repeated for overhangs longer than the grid)."""
    if n == 1:
        return np.zeros_like(index)
    m = index % (2 * (n - 1))
    return np.where(m < n, m, 2 * (n - 1) - m)


def _reflect_past_edge(data: np.ndarray, r0: int, c0: int, height: int, width: int) -> np.ndarray:
    """A strip read at ``(r0, c0)`` with the pixels past the grid's bottom/right edge replaced by the grid
    mirrored at that edge (``Layout.edge_fill == "reflect"``; they stay invalid). Strips inside the grid come
    back as they are; the mirror of a pixel must lie in the strip (an overhang shorter than the strip's part
    inside the grid, which the layout guarantees for grids at least a window long)."""
    h, w = data.shape[-2:]
    if r0 + h <= height and c0 + w <= width:
        return data
    src_r = _mirror(np.arange(r0, r0 + h), height) - r0
    src_c = _mirror(np.arange(c0, c0 + w), width) - c0
    if src_r.min() < 0 or src_c.min() < 0 or r0 >= height or c0 >= width:
        return data  # a window mostly past a tiny grid: zeros, as without reflection
    return np.ascontiguousarray(data[:, src_r][:, :, src_c])


def _valid_out(valid: np.ndarray, scale: int) -> np.ndarray:
    """Output-pixel validity: any valid input pixel in the ``scale x scale`` cell."""
    if scale == 1:
        return valid
    h, w = valid.shape
    return valid.reshape(h // scale, scale, w // scale, scale).any(axis=(1, 3))


@dataclass
class _Batch:
    block: tuple[int, int]
    cells: list[tuple[int, int]]
    x: torch.Tensor
    valid: torch.Tensor
    valid_out: np.ndarray


def _block_batches(
    cfg: InferenceConfig, read_strip: Callable[[list[tuple[int, int]]], list[_WindowData | None]], bi: int, bj: int,
    map_fn: Callable[..., Iterator]
) -> Iterator[_Batch]:
    """Batches of the non-empty windows of a block (batches never span blocks: results are deterministic)."""
    cells = cfg.layout.block_cells(bi, bj)
    if cfg.aoi is not None:  # whole block outside the AOI: no read at all
        win = cfg.layout.block_input_window(bi, bj)
        if not cfg.prepared_aoi().intersects(shapely.box(*cfg.source.grid.window_grid(win).bounds)):
            return
    pending: list[_WindowData] = []
    pin = torch.cuda.is_available() and resolve_device(cfg.device).type == "cuda"

    def make() -> _Batch:
        d0 = pending[0][1]
        # small integer and float32 inputs travel as they are (half the bytes of float32 for uint16, a quarter
        # for uint8) and become float32 on the model's device; others are converted here
        dtype = d0.dtype if d0.dtype in _NATIVE_DTYPES else np.dtype(np.float32)
        x = np.empty((len(pending), *d0.shape), dtype=dtype)
        for k, p in enumerate(pending):
            x[k] = p[1]  # copy out of the strip (and convert) in one pass
        xt = torch.from_numpy(x)
        v = torch.from_numpy(np.stack([p[2] for p in pending]))
        if pin:
            xt, v = xt.pin_memory(), v.pin_memory()
        vo = np.stack([_valid_out(p[2], cfg.layout.scale) for p in pending])
        return _Batch((bi, bj), [p[0] for p in pending], xt, v, vo)

    for results in map_fn(read_strip, _strips(cfg, cells)):
        for res in results:
            if res is None:
                continue
            pending.append(res)
            if len(pending) == cfg.batch_size:
                yield make()
                pending = []
    if pending:
        yield make()


def _run_model(model: RasterModel, batch: _Batch, device: torch.device, amp: torch.dtype | None,
               out_bands: int, win_out: int) -> np.ndarray:
    x = batch.x.to(device, non_blocking=True).float()
    v = batch.valid.to(device, non_blocking=True)
    ctx = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        y = model(x, v)
    y = y.float().cpu().numpy()
    expect = (x.shape[0], out_bands, win_out, win_out)
    if y.shape != expect:
        raise ValueError(
            f"model returned {tuple(y.shape)} for a {tuple(x.shape)} batch; expected {expect} "
            "(check out_bands and scale)"
        )
    return y


# ---------------------------------------------------------------------------------------------- blocks
class _Accumulator:
    """``sum(w * y)`` (bands ``0..K-1``) and ``sum(w)`` (band ``K``) over one block's extent."""

    def __init__(self, cfg: InferenceConfig, block: tuple[int, int]) -> None:
        self.cfg = cfg
        self.block = block
        self.extent = cfg.layout.block_extent(*block)
        r0, r1, c0, c1 = self.extent
        self.acc = np.zeros((cfg.out_bands + 1, r1 - r0, c1 - c0), dtype=np.float32)
        self.n = 0

    def add(self, cell: tuple[int, int], y: np.ndarray, valid_out: np.ndarray) -> None:
        lay = self.cfg.layout
        r, c = lay.output_origin(*cell)
        r0, r1, c0, c1 = self.extent
        rr, cc = r - r0, c - c0
        h = min(lay.window_out, (r1 - r0) - rr)
        w = min(lay.window_out, (c1 - c0) - cc)
        wy, wx = lay.weights(*cell)
        wt = (np.outer(wy[:h], wx[:w]).astype(np.float32)) * valid_out[:h, :w]
        k = self.cfg.out_bands
        self.acc[:k, rr : rr + h, cc : cc + w] += y[:, :h, :w] * wt
        self.acc[k, rr : rr + h, cc : cc + w] += wt
        self.n += 1


def _block_path(parts: Path, block: tuple[int, int]) -> Path:
    return parts / f"b_{block[0]}_{block[1]}.npy"


def _output_of(parts: Path) -> Path:
    """The output whose parts folder is ``parts`` (the inverse of :func:`parts_dir`)."""
    return parts.with_name(parts.name.removesuffix(".parts"))


def _parts_disk_full(parts: Path, exc: OSError, need: int | None = None) -> OutputError:
    """The user's error for a write into the parts folder refused for lack of space."""
    return disk_full_error(
        _output_of(parts), parts, need=need, what="each block's results in the parts folder",
        quota=exc.errno == errno.EDQUOT,
        hint="Free some space there (or write the output to another disk), then re-run the same command: the "
        "finished blocks are kept and an earlier file at the output path was left untouched.")


def _save_block(parts: Path, acc: _Accumulator) -> str:
    """Save a finished block's accumulators atomically (a temporary file renamed into place).

    Raises:
        OutputError: the disk is full (naming the output, the free space and the block's size); the temporary
            file is removed.
    """
    if acc.n == 0:
        return "empty"
    final = _block_path(parts, acc.block)
    tmp = final.with_name(f".{final.stem}.tmp-{os.getpid()}-{threading.get_ident()}.npy")
    try:
        with open(tmp, "wb") as f:
            np.save(f, acc.acc)
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        need = acc.acc.nbytes + 128
        if isinstance(exc, OSError) and not isinstance(exc, OutputError) and (
                exc.errno in DISK_FULL_ERRNOS or (exc.errno is None and (free_bytes(parts) or 0) < need)):
            # (numpy reports a short write as "N requested and M written", without an errno)
            raise _parts_disk_full(parts, exc, need=need) from exc
        raise
    return "ok"


def _process_block(cfg: InferenceConfig, model: RasterModel, reader: WindowReader,
                   block: tuple[int, int]) -> tuple[tuple[int, int], str, int]:
    """Read, predict and save one block synchronously (used by dask workers and ``threads=False``).

    The block's strips are assembled from the file's tiles (:class:`_TileCache`, one per block here): the
    overlapping lattice rows of the block read each tile once (``threads=False`` on the 8192^2 data-path
    benchmark raster: 4.1-4.4 s instead of 5.8-6.0 s)."""
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    acc = _Accumulator(cfg, block)
    tiles = _TileCache()
    for batch in _block_batches(cfg, lambda cells: _read_strip(cfg, reader, cells, tiles), *block, map_fn=map):
        y = _run_model(model, batch, device, amp, cfg.out_bands, cfg.layout.window_out)
        for k, cell in enumerate(batch.cells):
            acc.add(cell, y[k], batch.valid_out[k])
    status = _save_block(cfg.parts, acc)
    return block, status, acc.n


_WORKER_MODELS: dict[str, RasterModel] = {}


def _dask_block(cfg: InferenceConfig, model: RasterModel, key: str, block: tuple[int, int]) -> tuple[Any, str, int]:
    """A dask task: process one block on a worker (model moved to the device once per worker)."""
    m = _WORKER_MODELS.get(key)
    if m is None:
        m = model.to(resolve_device(cfg.device)).eval()
        _WORKER_MODELS.clear()
        _WORKER_MODELS[key] = m
    with cfg.source.reader() as reader:
        return _process_block(cfg, m, reader, block)


# ---------------------------------------------------------------------------------------------- manifest
class _Manifest:
    def __init__(self, parts: Path, fingerprint: str, config: dict[str, Any]) -> None:
        self.path = parts / "manifest.json"
        self.fingerprint = fingerprint
        self.config = config
        self.done: dict[str, str] = {}

    @staticmethod
    def key(block: tuple[int, int]) -> str:
        return f"{block[0]}_{block[1]}"

    def load(self) -> bool:
        """Load an existing manifest of the same run; False when none (or a different run's)."""
        if not self.path.exists():
            return False
        try:
            m = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if m.get("format") != MANIFEST_FORMAT or m.get("fingerprint") != self.fingerprint:
            return False
        self.done = {k: v for k, v in m.get("done", {}).items()
                     if v == "empty" or _block_path(self.path.parent, tuple(map(int, k.split("_")))).exists()}
        return True

    def mark(self, block: tuple[int, int], status: str) -> None:
        self.done[self.key(block)] = status
        self.save()

    def is_done(self, block: tuple[int, int]) -> bool:
        return self.key(block) in self.done

    def save(self) -> None:
        doc = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "fingerprint": self.fingerprint,
               "config": self.config, "done": self.done}
        tmp = self.path.with_name(f".manifest.tmp-{os.getpid()}.json")
        try:
            tmp.write_text(json.dumps(doc, indent=1))
            os.replace(tmp, self.path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
                raise _parts_disk_full(self.path.parent, exc) from exc
            raise


# ---------------------------------------------------------------------------------------------- tiles
class _TileWriter:
    """Finalises tiles whose blocks are all done and writes them to the COG writer."""

    def __init__(self, cfg: InferenceConfig, model: RasterModel, writer: COGWriter, done: set[tuple[int, int]],
                 empty: set[tuple[int, int]]) -> None:
        self.cfg = cfg
        self.writer = writer
        self.done = done
        self.empty = empty
        self.written: set[tuple[int, int]] = set()
        self.nodata = model.nodata
        self.dtype = np.dtype(model.out_dtype)

    def block_finished(self, block: tuple[int, int], status: str, acc: _Accumulator | None = None) -> None:
        self.done.add(block)
        if status == "empty":
            self.empty.add(block)
        lay = self.cfg.layout
        bi, bj = block
        for ti in (bi - 1, bi, bi + 1):
            for tj in (bj - 1, bj, bj + 1):
                inside = 0 <= ti < lay.n_block_rows and 0 <= tj < lay.n_block_cols
                if inside and (ti, tj) not in self.written:
                    deps = lay.tile_deps(ti, tj)
                    if all(d in self.done for d in deps):
                        self._write_tile((ti, tj), deps, acc)

    def _write_tile(self, tile: tuple[int, int], deps: Sequence[tuple[int, int]], acc: _Accumulator | None) -> None:
        """Sum the partial results of ``deps`` over the tile, blend and write it, in strips of COG block rows
        (the buffers and the saved blocks' mapped pages are a strip's, not the tile's). Each pixel's sum is the
        same, added in the same order."""
        lay, k = self.cfg.layout, self.cfg.out_bands
        t0, t1, u0, u1 = lay.tile_rect(*tile)
        step = max(lay.align, (self.STRIP_ELEMENTS // max(1, (k + 1) * (u1 - u0))) // lay.align * lay.align)
        sources: list[tuple[tuple[int, int], Rect]] = [
            (d, lay.block_extent(*d)) for d in deps if d not in self.empty]
        for s0 in range(t0, t1, step):
            rect = (s0, min(t1, s0 + step), u0, u1)
            total = np.zeros((k + 1, rect[1] - rect[0], u1 - u0), dtype=np.float32)
            for d, ext in sources:
                inter = _intersect(rect, ext)
                if inter is None:
                    continue
                src = _slice(inter, ext)
                dst = _slice(inter, rect)
                if acc is not None and acc.block == d:
                    total[(slice(None), *dst)] += acc.acc[(slice(None), *src)]
                else:  # mapped per strip: its pages leave the resident set with the mapping
                    arr = np.load(_block_path(self.cfg.parts, d), mmap_mode="r")
                    total[(slice(None), *dst)] += arr[(slice(None), *src)]
                    del arr
            out = finalise_blend(total, self.dtype, self.nodata)  # in place: no temporaries of its size
            self.writer.write(out, Window(u0, rect[0], u1 - u0, rect[1] - rect[0]))
            del total, out
        self.written.add(tile)

    #: elements of one strip's sum buffer (``(K + 1) x rows x tile width``; at least one COG block row)
    STRIP_ELEMENTS = 4 * 2**20


def _slice(inner: Rect, outer: Rect) -> tuple[slice, slice]:
    return (slice(inner[0] - outer[0], inner[1] - outer[0]), slice(inner[2] - outer[2], inner[3] - outer[2]))


# ---------------------------------------------------------------------------------------------- pipeline
class _ThreadTuner:
    """Picks the model's intra-op thread count on CPU from the measured throughput of the whole pipeline.

    The reader and writer threads share the cores with the model. A heavy model (a ViT backbone) runs about
    twice as fast on two intra-op threads as on one, but a model that is cheap next to reading and writing
    gains nothing from a second thread and loses CPU to it (idle OpenMP workers spin between operators):
    measured on the data path of an 8192^2 raster (2 cores), 2.9-3.2 s with one thread vs 3.4-3.5 s with
    two, with the same time in model calls. So after ``warmup`` batches the tuner runs a group of ``group``
    batches with all threads, then one with one thread, timing each batch's wall time per window from the end
    of the previous one (waits for data included: the I/O threads' share counts; the first batch of a group
    is not timed, it may come from the other setting's read-ahead), and keeps the faster setting for the rest
    of the run. Shortcuts after the first group: when the model calls fill at least ``busy`` of the wall time
    with all threads (the model is the bottleneck: a backbone on CPU), all threads are kept; when they fill
    less than 0.9 / ``n_max`` of it, one thread is chosen without a trial (even ``n_max`` times slower, the model
    would keep up with reading and writing). One thread is also given up early when it is clearly slower
    (``early`` x after two timed batches). The caller restores torch's setting afterwards.
    """

    def __init__(self, n_max: int, warmup: int = 2, group: int = 4, early: float = 1.3, busy: float = 0.8) -> None:
        self.n_max = n_max
        self.candidates = [n_max, 1] if n_max > 1 else [n_max]
        self.plan = [n_max] * warmup + [c for c in self.candidates for _ in range(group)]
        self.timed = [False] * warmup + [k > 0 for _ in self.candidates for k in range(group)]
        self.early = early
        self.busy = busy
        self.model_seconds = 0.0
        self.i = 0
        self.seconds = dict.fromkeys(self.candidates, 0.0)
        self.windows = dict.fromkeys(self.candidates, 0)
        self.batches = dict.fromkeys(self.candidates, 0)
        self.chosen: int | None = None if len(self.candidates) > 1 else n_max
        self._t = time.perf_counter()

    def threads(self) -> int:
        """The intra-op threads for the next batch."""
        return self.chosen if self.chosen is not None else self.plan[self.i]

    def _rate(self, c: int) -> float:
        return self.seconds[c] / max(1, self.windows[c])

    def done(self, n_windows: int, model_seconds: float) -> None:
        """Record a finished batch of ``n_windows`` windows whose model call took ``model_seconds``."""
        now = time.perf_counter()
        if self.chosen is None:
            c = self.plan[self.i]
            if self.timed[self.i]:
                self.seconds[c] += now - self._t
                self.windows[c] += n_windows
                self.batches[c] += 1
                if c == self.n_max:
                    self.model_seconds += model_seconds
            self.i += 1
            last_of_group = self.i < len(self.plan) and self.plan[self.i] != c and self.timed[self.i - 1]
            share = self.model_seconds / max(self.seconds[self.n_max], 1e-9)
            if c == self.n_max and last_of_group and share >= self.busy:
                self.chosen = self.n_max  # model-bound: all threads
            elif c == self.n_max and last_of_group and share * self.n_max < 0.9:
                self.chosen = 1  # even n_max times slower, one thread would keep up with reading and writing
            elif c == 1 and self.batches[1] >= 2 and self._rate(1) > self.early * self._rate(self.n_max):
                self.chosen = self.n_max
            elif self.i == len(self.plan):
                self.chosen = min(self.candidates, key=self._rate)
            if self.chosen is not None:
                log.debug("pipeline s/window by intra-op threads: %s -> %d",
                          {k: self._rate(k) for k in self.candidates}, self.chosen)
        self._t = now


class _Pipeline:
    """Reader thread -> model (calling thread) -> writer thread, with bounded queues."""

    def __init__(self, cfg: InferenceConfig, model: RasterModel, tiles: _TileWriter, manifest: _Manifest,
                 todo: list[tuple[int, int]], done: list[tuple[int, int]], bar: Any, queue_batches: int,
                 io_nice: int = 0, model_threads: int | str | None = None) -> None:
        self.cfg, self.model, self.tiles, self.manifest = cfg, model, tiles, manifest
        self.model_threads = model_threads
        self.threads_used: int | None = None
        self.io_nice = io_nice
        self.todo, self.done, self.bar = todo, done, bar
        self.q_in: queue.Queue = queue.Queue(maxsize=queue_batches)
        self.q_out: queue.Queue = queue.Queue(maxsize=queue_batches)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.model_seconds = 0.0
        self.model_windows = 0
        self.reader_cpu = 0.0  # CPU seconds of the reader / writer threads (the reader pool's not included)
        self.writer_cpu = 0.0

    def _put(self, q: queue.Queue, item: Any) -> None:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _get(self, q: queue.Queue) -> Any:
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if self.stop.is_set():
                    return _STOP

    def _fail(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.stop.set()

    def _lower_priority(self) -> None:
        """Raise this thread's nice value so I/O work yields the cores to the model's threads (Linux)."""
        if self.io_nice > 0:
            with contextlib.suppress(AttributeError, OSError):
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self.io_nice)

    # -- reader thread
    def _reader(self) -> None:
        cfg = self.cfg
        self._lower_priority()
        local = threading.local()
        readers: list[WindowReader] = []
        lock = threading.Lock()
        tiles = _TileCache()

        def read(cells: list[tuple[int, int]]) -> list[_WindowData | None]:
            r = getattr(local, "reader", None)
            if r is None:
                r = cfg.source.reader()
                local.reader = r
                with lock:
                    readers.append(r)
            return _read_strip(cfg, r, cells, tiles)

        pool = None
        try:
            if cfg.read_threads > 1:
                from concurrent.futures import ThreadPoolExecutor

                pool = ThreadPoolExecutor(cfg.read_threads, thread_name_prefix="dinov3geo-read")
                map_fn = pool.map
            else:
                map_fn = map
            for block in self.done:
                self._put(self.q_in, ("done", block))
            for block in self.todo:
                if self.stop.is_set():
                    return
                n = 0
                for batch in _block_batches(cfg, read, *block, map_fn=map_fn):
                    self._put(self.q_in, ("batch", batch))
                    n += len(batch.cells)
                self._put(self.q_in, ("end", block, n))
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            self._fail(exc)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
            for r in readers:
                with contextlib.suppress(Exception):
                    r.close()
            self.reader_cpu = time.thread_time()
            self._put(self.q_in, None)

    # -- writer thread
    def _writer(self) -> None:
        cfg = self.cfg
        self._lower_priority()
        accs: dict[tuple[int, int], _Accumulator] = {}
        try:
            while True:
                item = self._get(self.q_out)
                if item is None or item is _STOP:
                    self.writer_cpu = time.thread_time()
                    return
                kind = item[0]
                if kind == "out":
                    _, batch, y = item
                    acc = accs.get(batch.block)
                    if acc is None:
                        acc = accs[batch.block] = _Accumulator(cfg, batch.block)
                    for k, cell in enumerate(batch.cells):
                        acc.add(cell, y[k], batch.valid_out[k])
                elif kind == "end":
                    _, block, _n = item
                    acc = accs.pop(block, None) or _Accumulator(cfg, block)
                    status = _save_block(cfg.parts, acc)
                    self.manifest.mark(block, status)
                    self.tiles.block_finished(block, status, acc)
                    acc = None  # freed before the next block's accumulator is allocated
                    self.bar.update(len(cfg.layout.block_cells(*block)))
                elif kind == "done":
                    _, block = item
                    self.tiles.block_finished(block, self.manifest.done[_Manifest.key(block)])
                    self.bar.update(len(cfg.layout.block_cells(*block)))
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)

    # -- calling thread
    def run(self) -> None:
        cfg = self.cfg
        device = resolve_device(cfg.device)
        amp = resolve_amp(cfg.amp, device)
        rt = threading.Thread(target=self._reader, name="dinov3geo-reader", daemon=True)
        wt = threading.Thread(target=self._writer, name="dinov3geo-writer", daemon=True)
        user_threads = torch.get_num_threads()
        tuner = None
        # other processes' load caps the threads (the reader and writer threads are ours: the tuner weighs them)
        fair = FairThreads(user_threads, interval=0.5, probe=0.0, apply=False)
        if device.type == "cpu" and self.model_threads == "auto":
            tuner = _ThreadTuner(user_threads)
            fair.__enter__()
        elif device.type == "cpu" and isinstance(self.model_threads, int):
            torch.set_num_threads(max(1, self.model_threads))
        rt.start()
        wt.start()
        try:
            while True:
                item = self._get(self.q_in)
                if item is None or item is _STOP:
                    break
                if item[0] == "batch":
                    batch = item[1]
                    cap = fair.tick() if tuner is not None else 0
                    if tuner is not None and torch.get_num_threads() != min(tuner.threads(), cap):
                        torch.set_num_threads(min(tuner.threads(), cap))
                    t0 = time.perf_counter()
                    y = _run_model(self.model, batch, device, amp, cfg.out_bands, cfg.layout.window_out)
                    dt = time.perf_counter() - t0
                    self.model_seconds += dt
                    self.model_windows += len(batch.cells)
                    if tuner is not None and cap >= tuner.threads():  # a trial capped by others' load waits
                        tuner.done(len(batch.cells), dt)
                    self._put(self.q_out, ("out", batch, y))
                else:
                    self._put(self.q_out, item)
            self._put(self.q_out, None)
        except BaseException as exc:
            self._fail(exc)
        finally:
            self.threads_used = tuner.chosen if tuner is not None and tuner.chosen else torch.get_num_threads()
            fair.__exit__(None, None, None)
            torch.set_num_threads(user_threads)
            if self.errors:
                self.stop.set()
            wt.join()
            self.stop.set()
            rt.join()
        if self.errors:
            raise self.errors[0]


# ---------------------------------------------------------------------------------------------- API
class _FeatureCOGWriter(COGWriter):
    """:class:`COGWriter` that can skip internal overviews.

    GDAL builds overviews of a pixel-interleaved COG with hundreds of bands (patch embeddings) extremely
    slowly (measured: 40 s for a 192 x 192 x 384 float32 output, minutes for 400 x 400), and averaged
    embeddings are of little use as a preview, so many-band outputs skip them by default.
    """

    def __init__(self, *args: Any, overviews: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("whole_blocks", True)  # tiles are written whole, on the COG's tile grid
        super().__init__(*args, **kwargs)
        self._overviews = overviews

    def overview_factors(self) -> list[int]:
        return super().overview_factors() if self._overviews else []


#: Bytes (uncompressed, all bands) of one COG tile of the engine's output at most, down to 16 px tiles. GDAL
#: holds whole pixel-interleaved tiles when it writes and reads them: the 128 px floor this replaced made one
#: tile of four ViT-S layers' features (4608 float32 bands) 288 MiB, decoded again for every small window read.
TILE_BYTES = 32 * 2**20


def cog_blocksize(out_bands: int, dtype: Any = np.float32) -> int:
    """COG tile side of an engine output with ``out_bands`` bands of ``dtype``: 512, halved (down to 16) while
    one tile would exceed :data:`TILE_BYTES` (float32: 512 up to 32 bands, 256 up to 128, 128 up to 512, 64 up
    to 2048, 32 up to 8192). ``predict_raster(blocksize=)`` overrides it."""
    item = np.dtype(dtype).itemsize
    bs = 512
    while bs > 16 and bs * bs * int(out_bands) * item > TILE_BYTES:
        bs //= 2
    return bs


def _remove_stale_staging(out: Path) -> None:
    """Remove staging/temporary siblings of ``out`` left by a killed run (their process no longer exists)."""
    stem = out.stem
    try:
        names = [p for p in out.parent.iterdir() if p.name.startswith(f".{stem}.") and out.suffix in p.name]
    except OSError:
        return
    for p in names:
        parts = p.name[len(stem) + 2 :].split("-")
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        remove_if_writer_dead(p, int(parts[1]), log)


def _read_threads(requested: int | None, device: torch.device) -> int:
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"read_threads must be >= 1, got {requested}")
        return int(requested)
    return 1 if device.type == "cpu" else min(4, max(1, (os.cpu_count() or 2) // 2))


_QUEUE_BATCHES = 3  # batches waiting between reader and model, and between model and writer


def region_buffer_bytes(window: int, batch_size: int, *, in_bands: int = 4, out_bands: int = 1,
                        scale: int = 1) -> int:
    """Most host memory (bytes) the engine's own buffers take on CPU beside the model's working memory: the input
    tile cache and the strip being assembled, one block's accumulators (automatic block size), a strip of a tile
    being written, GDAL's block cache, and the batches in flight (queued inputs and outputs, the one in the model
    and the one being accumulated), inputs counted as float32.

    An upper bound for the default settings, used by :func:`dinov3geo.inference.batching.choose_batch_size` to
    keep a default run's peak RSS growth within its budget at region scale (``benchmarks/canopy_memory.py``:
    the model's estimate alone left a ViT-L 4096^2 canopy run 85 MiB over 1 GiB).
    """
    per_window = 4 * (int(in_bands) * window * window + int(out_bands) * (window // max(1, int(scale))) ** 2)
    fixed = (3 * _STRIP_BYTES // 2 + _STRIP_BYTES + BLOCK_BYTES + 4 * _TileWriter.STRIP_ELEMENTS
             + 32 * 2**20)  # tile cache, strip, accumulators, tile strip, GDAL cache (the default's least)
    return int(fixed + (2 * _QUEUE_BATCHES + 2) * int(batch_size) * per_window)


#: Block side (input pixels) of the automatic block size, for outputs whose accumulators fit :data:`BLOCK_BYTES`.
DEFAULT_BLOCK_SIZE = 2048
#: The automatic block size keeps one block's accumulators (``(out_bands + 1) x extent^2`` float32) within this
#: many bytes: 2048 px blocks for canopy maps (2 bands), 1024 px for 8-class land-cover probabilities (measured
#: with the engine alone, ``benchmarks/region_buffers.py``, 4096^2 x 8 bands: peak RSS growth 743-748 MiB with 2048 px
#: blocks, 498-540 MiB with 1024 px).
BLOCK_BYTES = 64 * 2**20


def _block_windows(block_size: int | None, stride: int, overlap: int, scale: int, out_bands: int,
                   least: int) -> int:
    """Lattice cells per block side: ``block_size / stride`` when given, else the most up to
    ``DEFAULT_BLOCK_SIZE / stride`` whose accumulators fit :data:`BLOCK_BYTES`; never below ``least``."""
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int (input pixels) or None (automatic), got "
                             f"{block_size!r}")
        return max(1, round(block_size / stride), least)
    bw = max(1, round(DEFAULT_BLOCK_SIZE / stride))
    while bw > 1 and (out_bands + 1) * 4 * ((bw * stride + overlap) // scale) ** 2 > BLOCK_BYTES:
        bw -= 1
    return max(bw, least)


def make_layout(
    model: RasterModel,
    height: int,
    width: int,
    *,
    window: int = 512,
    overlap: int | None = None,
    block_size: int | None = None,
    blocksize: int | None = None,
) -> Layout:
    """The :class:`~dinov3geo.inference.layout.Layout` :func:`predict_raster` uses for ``model`` on a grid.

    ``overlap`` defaults to a quarter window (half a window for a model with ``global_context = True``, e.g. a
    ViT, whose output depends on the whole window), and at least twice the model's receptive margin plus a
    ramp of two output pixels (:func:`~dinov3geo.inference.layout.default_overlap`). ``blocksize`` is the COG tile
    size (default: 512, smaller for many bands); blocks are at least large enough for tiles to align with it.
    ``block_size`` (input pixels) None: :data:`DEFAULT_BLOCK_SIZE`, smaller when the block's accumulators would
    exceed :data:`BLOCK_BYTES` (many output bands).

    A model may declare ``window_align`` (input pixels; e.g. 32 for a ConvNeXt, whose stage-3 cells are 32 px):
    window origins are then multiples of it (the default overlap is widened to put the lattice step on it; a
    given overlap that does not is refused with the nearest ones that do), and ``edge_fill`` (``"zeros"`` or
    ``"reflect"``), what a window sees past the grid edge (see :mod:`dinov3geo.inference.layout`).
    """
    scale = int(model.scale)
    if scale < 1:
        raise ValueError(f"model.scale must be an integer >= 1, got {model.scale}")
    margin_out = math.ceil(model.receptive_margin / scale)
    if window % scale:
        raise ValueError(f"window {window} must be a multiple of the model scale {scale}")
    default = overlap is None
    if overlap is None:
        from dinov3geo.inference.layout import default_overlap, min_window

        context = bool(getattr(model, "global_context", False))
        overlap = default_overlap(window, scale, model.receptive_margin, context)
        a = math.lcm(scale, int(getattr(model, "window_align", 1) or 1))
        if window - overlap < a:
            smallest = min_window(scale, model.receptive_margin, int(getattr(model, "window_multiple", scale)),
                                  context=context, start_align=a)
            raise ValueError(f"window {window} is too small for the model's receptive margin of "
                             f"{model.receptive_margin} px; use a window of at least {smallest} px")
    start_align = int(getattr(model, "window_align", 1) or 1)
    edge_fill = str(getattr(model, "edge_fill", "zeros"))
    a = math.lcm(scale, start_align)
    if default and (window - overlap) % a:  # widen the overlap onto the feature grid
        overlap = window - (window - overlap) // a * a
    bs = blocksize or cog_blocksize(model.out_bands, model.out_dtype)
    stride_out = (window - overlap) // scale
    if stride_out <= 0:
        raise ValueError(f"overlap {overlap} must be smaller than window {window}")
    bw = _block_windows(block_size, window - overlap, overlap, scale, int(model.out_bands),
                        math.ceil((overlap // scale + bs) / stride_out))
    return Layout(height, width, window, overlap, scale, margin_out, bw, align=bs, start_align=start_align,
                  edge_fill=edge_fill)


def _fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def predict_raster(
    model: RasterModel,
    source: Any,
    out_path: str | os.PathLike[str],
    *,
    window: int = 512,
    overlap: int | None = None,
    batch_size: int = 8,
    bands: Sequence[str | int] | None = None,
    nodata: float | None = None,
    aoi: Any = None,
    aoi_crs: Any = None,
    out_grid: GridSpec | None = None,
    device: str | torch.device = "auto",
    amp: str | bool | None = "auto",
    block_size: int | None = None,
    read_threads: int | None = None,
    threads: bool = True,
    io_nice: int = 5,
    scheduler: Any = None,
    resume: bool = True,
    keep_parts: bool = False,
    progress: bool = True,
    compress: str | None = None,
    compress_level: int | None = None,
    blocksize: int | None = None,
    overview_resampling: str = "average",
    overviews: bool | None = None,
    gdal_cachemax_mb: int | None = None,
    tags: dict[str, Any] | None = None,
    stats: dict[str, Any] | None = None,
    keep_freed_memory: bool = True,
    model_threads: int | str | None = "auto",
    protect: Sequence[Any] = (),
) -> Path:
    """Run ``model`` over a whole raster region with blended sliding windows and write a COG.

    Args:
        model: a :class:`~dinov3geo.inference.RasterModel` (e.g. :class:`TorchRasterModel`,
            :class:`BackboneFeatures`).
        source: a raster path, :class:`~dinov3geo.io.scene.Scene`, STAC item, a list of scenes/paths (a mosaic),
            a Zarr tile store folder or a :class:`~dinov3geo.inference.sources.RasterSource`.
        out_path: the output COG (written atomically; its folder is created).
        window: window side in input pixels (a multiple of the model's ``scale``).
        overlap: overlap of neighbouring windows in input pixels (default: a quarter window, and at least
            twice the model's receptive margin plus a ramp). The outer ``receptive_margin`` of each window gets
            zero weight, the rest of the overlap is a raised-cosine blend.
        batch_size: windows per model call.
        bands: input bands by name or 1-based index (default: all).
        nodata: input nodata override (for files declaring none or a wrong one).
        aoi: area of interest: a vector file (GeoJSON, GeoPackage, Shapefile...), a GeoDataFrame/GeoSeries or
            shapely geometries (then give ``aoi_crs``), in any CRS. Pixels outside it are nodata and windows
            outside it are not read.
        aoi_crs: CRS of bare shapely AOI geometries.
        out_grid: read the input on this grid (default: the input's own grid). The output grid is this grid,
            coarsened by the model's ``scale``.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda:1"``...
        amp: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU), ``"bf16"`` (also on CPU), ``"fp16"`` or None.
        block_size: approximate block side in input pixels (unit of resume and of distribution). None
            (default): 2048, less for outputs with many bands (:func:`make_layout`; the block's accumulators
            stay within :data:`BLOCK_BYTES`).
        read_threads: threads reading strips of windows. Default: 1 on CPU (the model's threads use the cores;
            reading costs about 5 % of a ViT-S's time there), half the cores (at most 4) on a GPU, where
            decoding the input is what limits the throughput. More help with remote files.
        threads: overlap reading, model and writing in background threads (False: one thread, for debugging).
        io_nice: on CPU, raise the nice value of the reader/writer threads by this much so that they use cores
            the model leaves idle rather than slowing its threads down (0: off).
        scheduler: a ``dask.distributed.Client``: blocks become tasks on its workers (which must share the
            output folder's filesystem).
        resume: continue a previous run of the same job from ``<out>.parts/manifest.json``; False starts over.
        keep_parts: keep the parts folder after success.
        progress: show a progress bar.
        compress: COG compression. Default: ``"deflate"`` (readable by every GIS) for outputs of at most 16
            bands (maps); ZSTD level 1 for more (patch embeddings: measured on a 256^2 x 384 float32 output,
            0.34 s of CPU and 82 MB against 1.5 s and 79 MB with DEFLATE; any GDAL >= 2.3 reads it).
        compress_level: the codec's level (default: GDAL's, ZSTD level 1 for the many-band default).
        blocksize, overview_resampling: COG options (``blocksize`` default: :func:`cog_blocksize`, 512 px,
            smaller for many bands).
        overviews: build internal overviews (default: only for outputs of at most 16 bands; GDAL builds them
            very slowly for hundreds of pixel-interleaved bands, e.g. patch embeddings).
        gdal_cachemax_mb: GDAL block cache (MB) for writing (default: 32, or four COG tiles of all bands when
            that is more). Small is enough (tiles are written whole) and keeps peak memory flat: measured peak
            RSS 20000^2 / 5000^2 was 1.13 with 32 MB and 1.20 with 128 MB.
        tags: extra dataset metadata for the COG.
        stats: a dict to fill with run statistics (``seconds``, ``model_seconds``: time in model calls,
            ``windows_run``, ``blocks_run``, ``blocks_resumed``, ``finish_seconds``: building the final COG).
        keep_freed_memory: during the run, freed buffers (block accumulators, model outputs) stay in the
            process for the next block instead of being unmapped and faulted in again
            (:func:`dinov3geo.utils.memory.keep_freed_memory`, glibc only; measured on the data path of an
            8192^2 raster: 4.1 s instead of 4.3-4.8 s, half the system time). Each thread's heap keeps its own
            high-water mark: peak RSS measured 20-70 MiB higher on that raster.
        model_threads: intra-op threads of the model on CPU during the run: ``"auto"`` measures the pipeline's
            throughput with torch's thread count and with one thread on the first batches and keeps the faster
            (:class:`_ThreadTuner`; one wins when the model is cheap next to reading and writing), an int
            uses that many, None leaves torch's setting. Torch's setting is restored afterwards; the choice
            is in ``stats["model_threads"]``.

        protect: more paths the output must not replace or lie inside (the model file, label files...):
            :func:`dinov3geo.utils.outputs.guard_output` checks ``out_path`` against them, the source and the
            AOI file before any work.

    With ``scale > 1`` an output pixel is valid when any of its input pixels is valid (and inside the AOI).

    Only one process at a time writes ``out_path`` (:func:`dinov3geo.utils.locks.output_lock`); a second one
    is refused with a message naming the first.

    Returns:
        ``out_path`` as an absolute path.

    Raises:
        OutputConflictError: ``out_path`` is (or lies inside) an input, the model or the AOI.
        OutputLockedError: another process is writing ``out_path``.
        NoValidDataError: no input pixel is valid (all nodata/NaN, or none inside the AOI); nothing is written.
    """
    kw = {k: v for k, v in locals().items() if k not in ("model", "source", "out_path", "protect")}
    aoi_path = [aoi] if isinstance(aoi, str | os.PathLike) else []
    out = guard_output(out_path, [source, *aoi_path, *protect], role="output")
    guard_output(parts_dir(out), [source, *aoi_path, *protect], folder=True, kind=PARTS_KIND,
                 role="parts folder")
    with _disk_full_errors(out), output_lock(out, what="predict"):
        try:
            return _predict_raster(model, source, out, **kw)
        except NoValidDataError:  # nothing to resume: leave nothing behind
            with contextlib.suppress(OSError):
                remove_owned(parts_dir(out), kinds=[PARTS_KIND])
            raise


@contextlib.contextmanager
def _disk_full_errors(out: Path) -> Iterator[None]:
    """Any other write of the run refused for lack of space (lock, markers) as the user's "disk full" error."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS or isinstance(exc, OutputError):
            raise
        raise disk_full_error(out, out.parent, quota=exc.errno == errno.EDQUOT) from exc


def _predict_raster(model: RasterModel, source: Any, out_path: Path, *, window: int, overlap: int | None,
                    batch_size: int, bands: Sequence[str | int] | None, nodata: float | None, aoi: Any,
                    aoi_crs: Any, out_grid: GridSpec | None, device: str | torch.device, amp: str | bool | None,
                    block_size: int | None, read_threads: int | None, threads: bool, io_nice: int, scheduler: Any,
                    resume: bool, keep_parts: bool, progress: bool, compress: str | None,
                    compress_level: int | None, blocksize: int | None,
                    overview_resampling: str, overviews: bool | None, gdal_cachemax_mb: int | None,
                    tags: dict[str, Any] | None, stats: dict[str, Any] | None, keep_freed_memory: bool,
                    model_threads: int | str | None) -> Path:
    """:func:`predict_raster` once the output is checked and locked."""
    if not (model_threads is None or model_threads == "auto" or (isinstance(model_threads, int)
                                                                 and model_threads >= 1)):
        raise ValueError(f"model_threads must be 'auto', None or a positive int, got {model_threads!r}")
    out = check_writable(out_path)
    _remove_stale_staging(out)
    src = as_source(source, bands=bands, grid=out_grid, nodata=nodata)
    if model.in_bands is not None and model.in_bands != src.count:
        raise ValueError(f"model expects {model.in_bands} bands but the input has {src.count} "
                         f"({', '.join(src.band_names)}); select bands with bands=[...]")
    layout = make_layout(model, src.grid.height, src.grid.width, window=window, overlap=overlap,
                         block_size=block_size, blocksize=blocksize)
    scale, overlap, bs, bw, margin_out = layout.scale, layout.overlap, layout.align, layout.block_windows, layout.margin
    out_dtype = np.dtype(model.out_dtype)

    aoi_geom = None
    if aoi is not None:
        aoi_geom = aoi_geometry(aoi, src.grid.crs, src_crs=aoi_crs)
        if not aoi_geom.intersects(shapely.box(*src.grid.bounds)):
            raise ValueError(
                f"the AOI {aoi if isinstance(aoi, str | os.PathLike) else '(geometry)'} does not overlap the input "
                f"(input bounds {tuple(round(v, 3) for v in src.grid.bounds)} in {src.grid.crs}; AOI bounds there "
                f"{tuple(round(v, 3) for v in aoi_geom.bounds)}): check the AOI file and its CRS"
            )
    parts = parts_dir(out)
    dev = resolve_device(device)
    amp_name = None if resolve_amp(amp, dev) is None else str(resolve_amp(amp, dev)).replace("torch.", "")
    cfg = InferenceConfig(
        source=src, layout=layout, out_bands=model.out_bands, parts=parts, batch_size=batch_size,
        aoi=aoi_geom, aoi_wkb=shapely.to_wkb(aoi_geom) if aoi_geom is not None else None,
        device=str(dev), amp=amp_name, read_threads=_read_threads(read_threads, dev),
    )
    config = {
        "source": src.describe(), "window": window, "overlap": overlap, "scale": scale, "margin": margin_out,
        "block_windows": bw, "align": bs, "batch_size": batch_size, "amp": amp_name,
        "aoi": hashlib.sha1(cfg.aoi_wkb).hexdigest() if cfg.aoi_wkb else None,
        "model": model.fingerprint(), "out_bands": model.out_bands, "out_dtype": out_dtype.name,
    }
    if layout.start_align > 1 or layout.edge_fill != "zeros":  # (absent by default: earlier runs still resume)
        config.update(start_align=layout.start_align, edge_fill=layout.edge_fill)
    manifest = _Manifest(parts, _fingerprint(config), config)
    if resume and manifest.load():
        log.info("resuming %s: %d of %d blocks already done", out, len(manifest.done), layout.n_blocks_total)
    else:
        if parts.exists():
            _adopt_legacy_parts(parts)
            remove_owned(parts, kinds=[PARTS_KIND])
        parts.mkdir(parents=True)
        mark_folder(parts, PARTS_KIND, output=str(out))
        manifest.save()

    out_grid_final = src.grid.scaled(scale) if scale > 1 else src.grid
    band_tags = None
    all_tags = {"dinov3geo_model": type(model).__name__, "dinov3geo_window": window,
                "dinov3geo_overlap": overlap, "dinov3geo_scale": scale, **(tags or {})}
    if overviews is None:
        overviews = model.out_bands <= 16
    level = None
    if compress is None:
        compress, level = ("deflate", None) if model.out_bands <= 16 else ("zstd", 1)
    if compress_level is not None:
        level = int(compress_level)
    if gdal_cachemax_mb is None:
        gdal_cachemax_mb = max(32, math.ceil(4 * bs * bs * model.out_bands * out_dtype.itemsize / 2**20))
    writer = _FeatureCOGWriter(out, out_grid_final, model.out_bands, out_dtype, nodata=model.nodata,
                               band_names=model.names(), tags=all_tags, band_tags=band_tags, blocksize=bs,
                               compress=compress, level=level, overview_resampling=overview_resampling,
                               gdal_cachemax_mb=gdal_cachemax_mb, overviews=overviews)
    blocks = layout.blocks()
    done_blocks = [b for b in blocks if manifest.is_done(b)]
    todo = [b for b in blocks if not manifest.is_done(b)]
    bar = progress_bar(total=layout.n_windows, desc=f"predict {out.name}", disable=not progress, unit="win")
    t_start = time.perf_counter()
    st: dict[str, Any] = {"blocks_run": len(todo), "blocks_resumed": len(done_blocks), "model_seconds": None,
                          "windows_run": None, "layout": {"window": window, "overlap": overlap, "scale": scale,
                                                          "block_windows": bw, "n_windows": layout.n_windows}}
    try:
        with rasterio.Env(GDAL_CACHEMAX=gdal_cachemax_mb), writer, _keep_freed_memory(keep_freed_memory):
            tiles = _TileWriter(cfg, model, writer, set(), set())
            if scheduler is not None:
                _run_dask(cfg, model, tiles, manifest, todo, done_blocks, bar, scheduler)
            elif threads:
                model.to(dev).eval()
                pipe = _Pipeline(cfg, model, tiles, manifest, todo, done_blocks, bar, queue_batches=_QUEUE_BATCHES,
                                 io_nice=io_nice if dev.type == "cpu" else 0, model_threads=model_threads)
                pipe.run()
                st.update(model_seconds=pipe.model_seconds, windows_run=pipe.model_windows,
                          reader_cpu_seconds=pipe.reader_cpu, writer_cpu_seconds=pipe.writer_cpu,
                          model_threads=pipe.threads_used)
            else:
                model.to(dev).eval()
                for b in done_blocks:
                    tiles.block_finished(b, manifest.done[_Manifest.key(b)])
                    bar.update(len(layout.block_cells(*b)))
                with src.reader() as reader:
                    for b in todo:
                        _, status, _n = _process_block(cfg, model, reader, b)
                        manifest.mark(b, status)
                        tiles.block_finished(b, status)
                        bar.update(len(layout.block_cells(*b)))
            missing = [t for t in blocks if t not in tiles.written]
            if missing:  # pragma: no cover - guards the dependency bookkeeping
                raise RuntimeError(f"internal error: tiles {missing[:5]} were never written")
            if blocks and all(manifest.done.get(_Manifest.key(b)) == "empty" for b in blocks):
                raise NoValidDataError(src.describe(), aoi is not None)
            t_finish = time.perf_counter()
        st["finish_seconds"] = time.perf_counter() - t_finish
    finally:
        bar.close()
    if not keep_parts:
        with contextlib.suppress(OSError):
            remove_owned(parts, kinds=[PARTS_KIND])
    st["seconds"] = time.perf_counter() - t_start
    if stats is not None:
        stats.update(st)
    return out


class _ArrayWriter:
    """In-memory stand-in for :func:`predict_raster`'s COG writer (same ``write(array, window)`` calls)."""

    def __init__(self, count: int, height: int, width: int, dtype: np.dtype, nodata: float | None) -> None:
        self.out = np.full((count, height, width), nodata if nodata is not None else 0, dtype=dtype)

    def write(self, array: np.ndarray, window: Window) -> None:
        r, c = int(window.row_off), int(window.col_off)
        self.out[:, r : r + array.shape[1], c : c + array.shape[2]] = array

    def __enter__(self) -> _ArrayWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def predict_array(
    model: RasterModel,
    data: np.ndarray | ArraySource,
    valid: np.ndarray | None = None,
    *,
    window: int = 512,
    overlap: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    amp: str | bool | None = "auto",
    threads: bool = True,
    band_names: Sequence[str] | None = None,
) -> np.ndarray:
    """:func:`predict_raster` for an in-memory ``[C, H, W]`` array: the same windows, blending, batching and
    nodata handling, with the result returned as an array instead of a COG (nothing is resumable; block
    partial sums go to a temporary folder). For non-georeferenced inputs (e.g. LEVIR-CD PNG pairs) and for
    validation inside training loops.

    Args:
        model: a :class:`~dinov3geo.inference.models.RasterModel`.
        data: ``[C, H, W]`` raw values (invalid pixels may hold anything), or an :class:`ArraySource`.
        valid: ``[H, W]`` validity (default: every finite pixel); invalid pixels are nodata in the output.
        window, overlap, batch_size, device, amp, threads: as for :func:`predict_raster`.
        band_names: names of the input bands (for models that check them).

    Returns:
        ``[K, ceil(H / scale), ceil(W / scale)]`` in ``model.out_dtype``, ``model.nodata`` where nothing valid
        contributed.
    """
    src = data if isinstance(data, ArraySource) else ArraySource(data, valid, band_names=band_names)
    if model.in_bands is not None and model.in_bands != src.count:
        raise ValueError(f"model expects {model.in_bands} bands but the array has {src.count}")
    layout = make_layout(model, src.grid.height, src.grid.width, window=window, overlap=overlap)
    dev = resolve_device(device)
    amp_t = resolve_amp(amp, dev)
    writer = _ArrayWriter(model.out_bands, layout.out_height, layout.out_width, np.dtype(model.out_dtype),
                          model.nodata)
    with tempfile.TemporaryDirectory(prefix="dinov3geo-array-") as tmp:
        cfg = InferenceConfig(source=src, layout=layout, out_bands=model.out_bands, parts=Path(tmp),
                              batch_size=batch_size, device=str(dev),
                              amp=None if amp_t is None else str(amp_t).replace("torch.", ""))
        manifest = _Manifest(Path(tmp), "in-memory", {})
        tiles = _TileWriter(cfg, model, writer, set(), set())  # type: ignore[arg-type]
        model.to(dev).eval()
        todo = layout.blocks()
        bar = progress_bar(total=layout.n_windows, disable=True)
        if threads:
            _Pipeline(cfg, model, tiles, manifest, todo, [], bar, queue_batches=_QUEUE_BATCHES).run()
        else:
            with src.reader() as reader:
                for b in todo:
                    _, status, _n = _process_block(cfg, model, reader, b)
                    manifest.mark(b, status)
                    tiles.block_finished(b, status)
        bar.close()
    return writer.out


def _run_dask(cfg: InferenceConfig, model: RasterModel, tiles: _TileWriter, manifest: _Manifest,
              todo: list[tuple[int, int]], done: list[tuple[int, int]], bar: Any, client: Any) -> None:
    from distributed import as_completed

    for b in done:
        tiles.block_finished(b, manifest.done[_Manifest.key(b)])
        bar.update(len(cfg.layout.block_cells(*b)))
    if not todo:
        return
    key = manifest.config["model"]
    [model_f] = client.scatter([model], broadcast=True, hash=False)
    [cfg_f] = client.scatter([cfg], broadcast=True, hash=False)
    futures = [client.submit(_dask_block, cfg_f, model_f, key, b, pure=False) for b in todo]
    try:
        for fut in as_completed(futures):
            block, status, _n = fut.result()
            block = tuple(block)
            manifest.mark(block, status)
            tiles.block_finished(block, status)
            bar.update(len(cfg.layout.block_cells(*block)))
    except BaseException:
        for f in futures:
            f.cancel()
        raise
