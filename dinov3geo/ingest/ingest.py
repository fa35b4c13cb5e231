"""Chip scenes into a tile store, in parallel through dask, resumably.

Each scene is cut into ``tile x tile`` windows aligned on its grid (the last row/column padded and masked,
never dropped). Tiles whose valid fraction is below ``min_valid`` are skipped and counted. The work of a
scene is split into blocks of tiles (as many tile rows as one block row of the files, at most
``SEGMENT_PX`` columns, so memory does not grow with the scene) that dask runs on threads (default) or on a
``dask.distributed`` cluster. Every block is read once: its task counts the valid pixels of each tile and
writes each strip's (tile row's) kept tiles straight into their Zarr chunks (one chunk per tile, so tasks
never touch the same chunk), into a range of slots reserved for the block's candidate tiles, returning the
kept tiles and partial statistics. The client then closes the gaps left by skipped tiles by renaming chunk
files (no re-encoding), so the scene's tiles are consecutive, in block order (row-major within a block).
Statistics samples are drawn at a fixed rate of the scene's pixels, so no task needs the scene's totals.

A scene is committed to the store's ledger only after all its tiles are written; a run killed midway is
undone (truncated) by the next run, which then redoes that scene. Scenes already in the ledger (same id,
same files) are skipped, so re-running on the same store is cheap and never duplicates tiles.

Hostile input and failures:

* the run holds the store's output lock from before recovery to the end (a second ``ingest`` of the same
  store is refused with a message naming the running one; it never undoes the live run's pending scene);
* the store path is checked before any work (:func:`dinov3geo.utils.outputs.guard_output`): never an input,
  a folder holding an input, a path inside an input folder, or an existing folder that is not a tile store;
* a scene whose pixels cannot be read while it is chipped (a truncated or damaged file) is undone (its
  partial tiles deleted, as recovery does), reported as skipped with the reason, and the run goes on;
* a full disk stops the run with an :class:`~dinov3geo.io.errors.OutputError` naming the store; the scenes
  committed before stay intact and a re-run after space is freed completes the store;
* a store (and parent folders) created by a run that commits nothing is removed again; a folder that
  existed before the run is never removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.threaded
import numpy as np
import rasterio
from rasterio.windows import Window

from dinov3geo.ingest.stats import BandStats
from dinov3geo.ingest.store import ChunkWriter, TileStore, TileStoreError
from dinov3geo.io.errors import DinoGeoIOError, OutputError, RasterReadError
from dinov3geo.io.scene import GDAL_ENV, Scene
from dinov3geo.io.sources import _S2_FILE, RASTER_SUFFIXES, open_scene
from dinov3geo.io.windows import tile_windows
from dinov3geo.utils.atomic import check_writable
from dinov3geo.utils.locks import output_lock
from dinov3geo.utils.outputs import guard_output
from dinov3geo.utils.progress import progress_bar
from dinov3geo.utils.runs import consecutive_runs

log = logging.getLogger("dinov3geo.ingest")


@dataclass
class IngestReport:
    """What an ingestion run did."""

    store: str
    ingested: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    recovered: str | None = None
    removed: bool = False
    tiles_written: int = 0
    tiles_below_min_valid: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """A few human-readable lines."""
        mb = self.bytes_written / 1e6
        rate = mb / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"tile store {self.store}",
            f"  scenes ingested: {len(self.ingested)}, already in store: {len(self.already)}, "
            f"skipped: {len(self.skipped)}",
            f"  tiles written: {self.tiles_written}, below min-valid (not stored): {self.tiles_below_min_valid}",
            f"  {mb:.1f} MB of pixels in {self.seconds:.1f} s ({rate:.1f} MB/s)",
        ]
        if self.recovered:
            lines.append(f"  recovered from an interrupted run (scene {self.recovered} redone)")
        if self.removed:
            lines.append("  no scene could be ingested: the new store was not kept")
        lines += [f"  skipped {src}: {why}" for src, why in self.skipped]
        return "\n".join(lines)


class SceneReadError(DinoGeoIOError):
    """The pixels of a scene could not be read while it was chipped (a truncated or damaged file): the scene
    is undone and skipped, the run goes on."""

    def __init__(self, message: str, path: Any = None) -> None:
        super().__init__(message, path)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable for dask.distributed workers
        return (type(self), (str(self), self.path))


def _read_error(scene: Scene, exc: BaseException) -> SceneReadError:
    """A :class:`SceneReadError` naming the file that failed and GDAL's own reason."""
    path = getattr(exc, "path", None) or (scene.paths[0] if scene.paths else scene.id)
    msgs: list[str] = []
    # a RasterReadError's own text repeats the path and a generic hint: GDAL's messages below it say more
    e: BaseException | None = (exc.__cause__ or exc.__context__) if isinstance(exc, RasterReadError) else exc
    for _ in range(10):
        if e is None:
            break
        m = " ".join(str(e).split())
        if m and "See previous exception" not in m and m not in msgs:
            msgs.append(m)
        e = e.__cause__ or e.__context__
    if not msgs:
        msgs = [" ".join(str(exc).split()) or type(exc).__name__]
    detail = msgs[0] if len(msgs) == 1 else f"{msgs[0]} ({msgs[-1]})"
    return SceneReadError(
        f"cannot read the pixels of {str(path)!r}: {detail}. The file is truncated or damaged: check it with "
        "`gdalinfo -checksum` and download or export it again; its partial tiles were removed", path)


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the disk or the quota is full."""
    e: BaseException | None = exc
    for _ in range(10):
        if e is None:
            return False
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


#: test hook (used by the test suite to stop a run at a known point): after this process has written
#: ``$DINOV3GEO_TEST_HOLD_AFTER_TILES`` tiles, the writing task creates ``$DINOV3GEO_TEST_HOLD_FILE`` and
#: waits while that file exists, until the run is interrupted (Ctrl-C, a failed task), at most 5 minutes.
HOLD_TILES_ENV = "DINOV3GEO_TEST_HOLD_AFTER_TILES"
HOLD_FILE_ENV = "DINOV3GEO_TEST_HOLD_FILE"
_hold_guard = threading.Lock()
_hold_count = [0]
_aborting = threading.Event()  # set while a failed or interrupted computation drains its running tasks


def _test_hold(n_tiles: int) -> None:
    """The test hook described at :data:`HOLD_TILES_ENV` (no effect unless both variables are set)."""
    limit, flag = os.environ.get(HOLD_TILES_ENV), os.environ.get(HOLD_FILE_ENV)
    if not limit or not flag:
        return
    with _hold_guard:
        before = _hold_count[0]
        _hold_count[0] += n_tiles
        after = _hold_count[0]
    if not before < int(limit) <= after:
        return
    Path(flag).write_text(f"{os.getpid()}\n")
    deadline = time.monotonic() + 300
    while os.path.exists(flag) and not _aborting.is_set() and time.monotonic() < deadline:
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- discovery
def discover_sources(sources: Iterable[str | os.PathLike]) -> list[str]:
    """Expand user sources into scene sources.

    A file or STAC JSON is one scene; a Landsat folder (``*_MTL.txt``) or a Sentinel-2 band folder (band ids in
    the file names) is one scene; any other folder is searched recursively and each raster in it is a scene.
    """
    out: list[str] = []
    for src in sources:
        p = Path(src)
        if not p.is_dir():
            out.append(str(src))
            continue
        if _is_band_folder(p):
            out.append(str(p))
            continue
        for child in sorted(p.iterdir()):
            if child.is_dir():
                out.extend(discover_sources([child]))
            elif child.suffix.lower() in RASTER_SUFFIXES or child.name.lower().endswith("item.json"):
                out.append(str(child))
    return out


def _is_band_folder(p: Path) -> bool:
    if any(p.glob("*_MTL.txt")):
        return True
    rasters = [f for f in p.iterdir() if f.suffix.lower() in (".tif", ".tiff", ".jp2")]
    return len(rasters) >= 2 and all(_S2_FILE.search(f.name) for f in rasters)


def _fingerprint(scene: Scene) -> list[list[Any]]:
    out = []
    for path in scene.paths:
        try:
            st = os.stat(path)
            out.append([path, st.st_size, st.st_mtime_ns])
        except OSError:  # remote (/vsicurl/) or virtual path
            out.append([path, None, None])
    return out


# ---------------------------------------------------------------------------------------------- tasks
# Tasks read windows of whole tile rows/columns: as many tile rows as one block row of the files holds (so no
# compressed block is decoded twice), at most MAX_TASK_ROWS_PX rows, and at most SEGMENT_PX columns, so a
# task's memory does not grow with the scene's width.
SEGMENT_PX = 4096
MAX_TASK_ROWS_PX = 1024


def _task_layout(scene: Scene, tile: int) -> tuple[int, int]:
    """(tile rows, tile columns) of the block of tiles one task reads at once."""
    cols = max(1, SEGMENT_PX // tile)
    bh = bw = 0
    try:
        with rasterio.Env(**GDAL_ENV):
            for path in scene.paths:
                with rasterio.open(path) as ds:
                    if ds.crs != scene.grid.crs or ds.transform != scene.grid.transform:
                        return 1, cols  # read through a warp: file blocks do not map onto tiles
                    for b in scene.bands:
                        if b.path == path:
                            h, w = ds.block_shapes[b.index - 1]
                            bh, bw = max(bh, h), max(bw, w)
    except (rasterio.errors.RasterioIOError, OSError, IndexError):
        return 1, cols
    rows = bh // tile if bh > tile and bh % tile == 0 else 1
    rows = max(1, min(rows, MAX_TASK_ROWS_PX // tile))
    if bw > tile and bw % tile == 0:  # segments start on block boundaries
        step = bw // tile
        cols = max(step, cols // step * step)
    return rows, cols


def _block_ingest(
    scene: Scene,
    store_path: str,
    row_offs: list[int],
    cols: list[int],
    tile: int,
    dtype: str,
    slot0: int,
    min_valid: float,
    sample_rate: float,
) -> tuple[list[tuple[int, int, float]], BandStats, int]:
    """Read a block of tiles (consecutive tile rows ``row_offs`` x tile columns ``cols``) once, keep the tiles
    with at least ``min_valid`` valid pixels, and write them (row-major) to slots ``slot0, slot0 + 1, ...``.

    Statistics: each strip's kept valid pixels go into the sample at ``sample_rate`` (a fixed share of the
    scene's pixels, so strips need no scene totals and their samples join into a proportional one).

    Returns ``[(row_off, col_off, valid_fraction)]`` of the kept tiles, their statistics, bytes written.
    """
    import zarr

    r0, c0 = row_offs[0], cols[0]
    try:
        with scene.reader() as r:
            chip = r.read(Window(c0, r0, cols[-1] + tile - c0, row_offs[-1] + tile - r0))
    except (DinoGeoIOError, rasterio.errors.RasterioError, OSError) as e:
        raise _read_error(scene, e) from e
    counts = chip.valid.reshape(len(row_offs), tile, len(cols), tile).sum(axis=(1, 3), dtype=np.int64)
    frac = counts / tile**2
    arrays = None
    stats = BandStats(len(scene.bands))
    kept: list[tuple[int, int, float]] = []
    nbytes = 0
    for i, row_off in enumerate(row_offs):
        keep = (frac[i] >= min_valid) & (frac[i] > 0)
        if not keep.any():
            continue
        slots = []
        for j, c in enumerate(cols):
            if keep[j]:
                slots.append(slot0 + len(kept))
                kept.append((row_off, c, float(frac[i, j])))
            else:
                slots.append(-1)
        if arrays is None:
            arrays = (ChunkWriter(zarr.open_array(os.path.join(store_path, "tiles"), mode="r+")),
                      ChunkWriter(zarr.open_array(os.path.join(store_path, "valid"), mode="r+")))
        y = slice(row_off - r0, row_off - r0 + tile)
        quota = int(sample_rate * int(counts[i][keep].sum()))
        st, nb = _strip_write(scene, cols, slots, tile, dtype, zlib.crc32(f"{scene.id}:{row_off}:{cols[0]}".encode()),
                              quota=quota, strip=(chip.data[:, y], chip.valid[y], c0), arrays=arrays)
        stats.join(st)
        nbytes += nb
    _test_hold(len(kept))
    return kept, stats, nbytes


def _strip_write(
    scene: Scene,
    cols: list[int],
    slots: list[int],
    tile: int,
    dtype: str,
    seed: int,
    quota: int,
    strip: tuple[np.ndarray, np.ndarray, int],
    arrays: tuple[Any, Any],
) -> tuple[BandStats, int]:
    """Write the kept tiles of one strip (tile row) into their slots, return statistics of their valid pixels.

    ``slots``: one per column, -1 for tiles not kept. ``strip``: the strip's pixels as ``(data [bands, tile, w],
    valid [tile, w], col_off of column 0)``. ``quota``: sample share of these pixels (see
    :meth:`BandStats.update`). ``arrays``: writers of the store's ``tiles`` and ``valid`` arrays.
    """
    stats = BandStats(len(scene.bands))
    keep = [(c, s) for c, s in zip(cols, slots, strict=True) if s >= 0]
    if not keep:
        return stats, 0
    sdata, svalid, x0 = strip
    rng = np.random.default_rng(seed)
    data = np.empty((len(keep), len(scene.bands), tile, tile), dtype=dtype)
    valid = np.empty((len(keep), tile, tile), dtype=bool)
    for k, (c, _) in enumerate(keep):
        sl = slice(c - x0, c - x0 + tile)
        data[k] = sdata[:, :, sl]
        valid[k] = svalid[:, sl]
    # statistics of the whole strip at once (one sample draw, not one per tile)
    stats.update(data.transpose(1, 0, 2, 3), valid, rng, quota=quota)
    tiles, vmask = arrays
    # keep slots are consecutive (row-major order of kept tiles): write runs in one call each
    slots = [s for _, s in keep]
    k0 = 0
    for s0, n in consecutive_runs(slots):
        tiles.write(s0, data[k0 : k0 + n])
        k0 += n
    # masks only where a tile has invalid pixels: an all-valid mask equals the fill value (True), which Zarr
    # would not store either; the reserved slots are fresh (no stale chunk to overwrite)
    for k in np.flatnonzero(~valid.reshape(len(keep), -1).all(axis=1)):
        vmask.write(slots[k], valid[k : k + 1])
    return stats, int(data.nbytes)


# ---------------------------------------------------------------------------------------------- scheduling
def _compute(tasks: list[Any], client: Any, workers: int | None, desc: str, show: bool) -> list[Any]:
    """Run delayed tasks on the threaded scheduler or a distributed client, with a progress bar.

    Returns only once no task runs any more, also when one fails or the run is interrupted (the threads'
    pool is drained, the cluster's futures are waited for or cancelled): the caller may then undo the
    scene's partial tiles without a task still writing into the store.
    """
    if not tasks:
        return []
    bar = progress_bar(total=len(tasks), desc=desc, disable=not show, unit="strip")
    try:
        if client is not None:
            from distributed import as_completed

            futures = client.compute(tasks)
            try:
                for _ in as_completed(futures):  # every task ends (done or failed) before a result raises
                    bar.update(1)
            except BaseException:
                client.cancel(futures)
                raise
            return [f.result() for f in futures]
        from concurrent.futures import ThreadPoolExecutor

        from dask.callbacks import Callback

        keys = {t.key for t in tasks}

        class _Tick(Callback):
            def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
                if key in keys:
                    bar.update(1)

        executor = getattr(dask.threaded, "ContextAwareThreadPoolExecutor", ThreadPoolExecutor)
        pool = executor(max_workers=workers or os.cpu_count() or 1)
        try:
            with _Tick():
                return list(dask.compute(*tasks, scheduler="threads", pool=pool))
        except BaseException:  # a failed task or Ctrl-C: let the running tasks end (queued ones are dropped)
            _aborting.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)
            _aborting.clear()
    finally:
        bar.close()


def _client_for(scheduler: Any) -> tuple[Any, bool]:
    """(client or None, whether we created it). ``scheduler`` is None/"threads", an address or a Client."""
    if scheduler is None or scheduler in ("threads", "local"):
        return None, False
    from distributed import Client

    if isinstance(scheduler, Client):
        return scheduler, False
    return Client(scheduler), True


# ---------------------------------------------------------------------------------------------- main API
def ingest(
    sources: Sequence[str | os.PathLike],
    store: str | os.PathLike,
    *,
    tile_size: int = 256,
    bands: Sequence[str | int] | None = None,
    res: float | None = None,
    crs: Any = None,
    assume_crs: Any = None,
    nodata: float | None = None,
    min_valid: float = 0.5,
    resampling: str = "bilinear",
    scheduler: Any = None,
    workers: int | None = None,
    progress: bool = True,
    on_scene_done: Callable[[str], None] | None = None,
) -> IngestReport:
    """Chip scenes into a Zarr v3 tile store (created if missing, appended to otherwise).

    Args:
        sources: files, band folders, STAC item JSONs, or folders to search (see :func:`discover_sources`).
        store: path of the ``.zarr`` store.
        tile_size: tile side in pixels.
        bands: band names (or 1-based positions) to keep, in order; default: all bands of the first scene
            (or the store's bands when appending). A scene missing one of them is skipped and reported.
        res, crs: reproject every scene onto this resolution / CRS (default: each scene's own grid).
        assume_crs: CRS for files that have none (they are refused otherwise).
        nodata: nodata override for all files.
        min_valid: tiles with a smaller fraction of valid pixels are not stored (counted in the report).
        resampling: resampling for reprojection and for bands at another resolution.
        scheduler: None / ``"threads"`` for dask's threaded scheduler, or a ``dask.distributed`` scheduler
            address (``"tcp://..."``) or ``Client``.
        workers: threads for the threaded scheduler (default: all cores).
        progress: show progress bars.
        on_scene_done: called with the scene id after each committed scene (used by tests and pipelines).

    Returns:
        An :class:`IngestReport`. Sources that cannot be opened or read (a truncated file included), lack a
        band, or clash with a scene in the store are skipped and listed in ``skipped``; a store created by
        this call that ends up with no scene is removed (``removed``).

    Raises:
        OutputConflictError: ``store`` is an input, holds one, lies inside an input folder, or is an
            existing folder that is not a tile store (checked before any work).
        OutputLockedError: another process is writing ``store`` (the message names it).
        OutputError: the store cannot be written, or the disk is full (the scenes committed before stay
            intact; re-run to complete the store).
        TileStoreError: the store holds tiles of another size.
    """
    t_start = time.perf_counter()
    store_path = Path(store).expanduser().absolute()
    if not 0.0 <= min_valid <= 1.0:
        raise ValueError(f"min_valid must be within [0, 1], got {min_valid}")
    if tile_size < 16:
        raise ValueError(f"tile_size must be at least 16 pixels, got {tile_size}")
    sources = list(sources)
    guard_output(store_path, sources, folder=True, kind="tile-store")
    new_parents = _missing_parents(store_path)
    try:
        _check_store_writable(store_path)
        with output_lock(store_path, what="ingest"):
            # checked again now that no other run can change it
            guard_output(store_path, sources, folder=True, kind="tile-store")
            report = _ingest_locked(sources, store_path, tile_size=tile_size, bands=bands, res=res, crs=crs,
                                    assume_crs=assume_crs, nodata=nodata, min_valid=min_valid,
                                    resampling=resampling, scheduler=scheduler, workers=workers,
                                    progress=progress, on_scene_done=on_scene_done)
    finally:
        for folder in reversed(new_parents):  # the folders this run made, when nothing was kept in them
            with contextlib.suppress(OSError):
                folder.rmdir()
    report.seconds = time.perf_counter() - t_start
    return report


def _missing_parents(path: Path) -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, outermost first."""
    out: list[Path] = []
    p = path.parent
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out[::-1]


def _discard_new_store(path: Path, folder_existed: bool) -> None:
    """Remove a store this run created and committed nothing to (keeping a folder that existed before)."""
    if not folder_existed:
        shutil.rmtree(path, ignore_errors=True)
        return
    for child in list(path.iterdir()):
        with contextlib.suppress(OSError):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def _ingest_locked(
    sources: list[str | os.PathLike],
    store_path: Path,
    *,
    tile_size: int,
    bands: Sequence[str | int] | None,
    res: float | None,
    crs: Any,
    assume_crs: Any,
    nodata: float | None,
    min_valid: float,
    resampling: str,
    scheduler: Any,
    workers: int | None,
    progress: bool,
    on_scene_done: Callable[[str], None] | None,
) -> IngestReport:
    """The body of :func:`ingest`, run while holding the store's lock."""
    report = IngestReport(str(store_path))
    TileStore.remove_stale_creations(store_path)
    folder_existed = store_path.exists()
    ts: TileStore | None = None
    created = False
    if (store_path / "zarr.json").exists():
        ts = TileStore.open(store_path, mode="r+")
        if ts.tile_size != tile_size:
            raise TileStoreError(
                f"{store_path} holds {ts.tile_size}px tiles but --tile {tile_size} was asked; "
                "use the same tile size or a new store"
            )
        pending = ts.recover()
        if pending:
            report.recovered = pending["id"]
            log.warning("store %s: undid interrupted scene %s; it will be redone", store_path, pending["id"])
    select = list(bands) if bands is not None else (ts.band_names if ts is not None else None)
    client, own_client = _client_for(scheduler)
    current = ""
    try:
        for src in discover_sources(sources):
            current = str(src)
            try:
                scene = open_scene(src, bands=select, crs=assume_crs, nodata=nodata, target_crs=crs, res=res,
                                   resampling=resampling)
                if ts is not None and not np.can_cast(np.dtype(scene.dtype), ts.dtype, casting="safe"):
                    raise DinoGeoIOError(
                        f"{src}: pixel type {scene.dtype} does not fit the store's {ts.dtype}; ingest it into "
                        "a separate store", src)
            except (DinoGeoIOError, ValueError, OSError) as e:
                _skip(report, ts, src, e)
                continue
            current = f"scene {scene.id!r}"
            if ts is None:
                ts = TileStore.create(store_path, list(scene.band_names), tile_size, scene.dtype)
                created = True
                if select is None:  # later scenes must provide the first scene's bands
                    select = list(scene.band_names)
            fp = _fingerprint(scene)
            rec = ts.scene_record(scene.id)
            if rec is not None:
                if rec.get("fingerprint") == fp:
                    report.already.append(scene.id)
                    continue
                why = f"a different scene with id {scene.id!r} is already in the store (from {rec['sources']})"
                _skip(report, ts, src, why)
                continue
            try:
                _ingest_scene(scene, ts, tile_size, min_valid, client, workers, progress, report, fp)
            except SceneReadError as e:  # every task has ended: undo the scene's partial tiles, go on
                ts.recover()
                _skip(report, ts, src, e)
                continue
            except OSError as e:
                if _disk_full(e):
                    with contextlib.suppress(Exception):  # give the partial scene's space back at once
                        ts.recover()
                raise
            report.ingested.append(scene.id)
            if on_scene_done is not None:
                on_scene_done(scene.id)
    except BaseException as e:
        if created and not report.ingested:
            _discard_new_store(store_path, folder_existed)
        if isinstance(e, OSError) and not isinstance(e, OutputError) and _disk_full(e):
            raise OutputError(
                store_path, f"disk full (no space left on device) while writing {current}",
                "The scenes ingested before are intact; free some space (or choose another disk), then re-run "
                "the same command to complete the store.") from e
        raise
    finally:
        if own_client:
            client.close()
    if created and not report.ingested:
        _discard_new_store(store_path, folder_existed)
        report.removed = True
    return report


def _skip(report: IngestReport, ts: TileStore | None, src: Any, why: BaseException | str) -> None:
    """Report ``src`` as skipped (log, report, the store's ledger of skipped sources)."""
    text = " ".join(str(why).split())
    log.warning("skipping %s: %s", src, text)
    report.skipped.append((str(src), text))
    if ts is not None:
        ts.record_skip(str(src), text)


def _check_store_writable(path: Path) -> None:
    if path.exists():
        if not path.is_dir():
            raise OutputError(path, "a file (not a Zarr store folder) exists at that path")
        if not os.access(path, os.W_OK):
            raise OutputError(path, "the store folder is not writable")
    else:
        check_writable(path)


def _ingest_scene(
    scene: Scene,
    ts: TileStore,
    tile: int,
    min_valid: float,
    client: Any,
    workers: int | None,
    progress: bool,
    report: IngestReport,
    fingerprint: list[list[Any]],
) -> None:
    g = scene.grid
    windows = tile_windows(g.height, g.width, tile)
    rows = sorted({int(w.row_off) for w in windows})
    cols = sorted({int(w.col_off) for w in windows})
    n_rows, n_cols = _task_layout(scene, tile)
    row_groups = [rows[i : i + n_rows] for i in range(0, len(rows), n_rows)]
    col_groups = [cols[j : j + n_cols] for j in range(0, len(cols), n_cols)]
    blocks = [(rg, cg) for rg in row_groups for cg in col_groups]
    n_candidates = len(rows) * len(cols)
    start = ts.begin_scene(scene.id, n_candidates)  # an upper bound; given back after compaction
    reserved, off = [], start
    for rg, cg in blocks:
        reserved.append(off)
        off += len(rg) * len(cg)
    sample_rate = BandStats(len(scene.bands)).sample_size / float(g.height * g.width)
    tasks = [dask.delayed(_block_ingest)(scene, str(ts.path), rg, cg, tile, str(ts.dtype), slot0, min_valid,
                                         sample_rate) for (rg, cg), slot0 in zip(blocks, reserved, strict=True)]
    results = _compute(tasks, client, workers, f"{scene.id[:28]} tiles", progress)
    kept: list[tuple[int, int, float]] = []
    stats = BandStats(len(scene.bands))
    nbytes = 0
    for slot0, (kept_b, st, nb) in zip(reserved, results, strict=True):
        ts.move_tiles(slot0, start + len(kept), len(kept_b))
        kept.extend(kept_b)
        stats.join(st)
        nbytes += nb
    n = len(kept)
    ts.shrink_pending(n)
    report.tiles_below_min_valid += n_candidates - n
    # per-tile metadata
    crs_str = scene.grid.crs.to_string() if scene.grid.crs.to_epsg() else scene.grid.crs.to_wkt()
    transforms = np.zeros((n, 6))
    bounds = np.zeros((n, 4))
    for i, (r, c, _) in enumerate(kept):
        sub = g.window_grid(Window(c, r, tile, tile))
        transforms[i] = list(sub.transform)[:6]
        bounds[i] = sub.bounds
    dt = np.datetime64(scene.datetime.replace(tzinfo=None), "ns") if scene.datetime else np.datetime64("NaT", "ns")
    if n:
        ts.write_meta(start, {
            "scene_id": np.asarray([scene.id] * n),
            "datetime": np.full(n, dt, dtype="datetime64[ns]"),
            "crs": np.asarray([crs_str] * n),
            "transform": transforms,
            "bounds": bounds,
            "valid_fraction": np.asarray([f for _, _, f in kept], np.float32),
            "row_off": np.asarray([r for r, _, _ in kept], np.int32),
            "col_off": np.asarray([c for _, c, _ in kept], np.int32),
        })
    rng = np.random.default_rng(0)
    record = {
        "id": scene.id,
        "sources": list(scene.paths),
        "fingerprint": fingerprint,
        "datetime": scene.datetime.isoformat() if scene.datetime else None,
        "crs": crs_str,
        "grid": g.to_dict(),
        "tile_start": start,
        "tile_count": n,
        "tiles_below_min_valid": n_candidates - n,
        "band_mean": [float(v) for v in stats.mean],
        "metadata": {k: v for k, v in scene.metadata.items() if k != "tags"},
    }
    ts.commit_scene(record, stats, rng)
    report.tiles_written += n
    report.bytes_written += nbytes
    log.info("ingested %s: %d tiles (%d below min-valid)", scene.id, n, n_candidates - n)
