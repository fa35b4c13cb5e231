"""Benchmark of tile ingestion (``dinov3geo.ingest.ingest``) against a raw read + chunk-write floor.

Run from the repository root::

    .venv/bin/python benchmarks/ingest.py                      # 16000 x 16000 x 4 uint16 (2.05 GB raw)
    .venv/bin/python benchmarks/ingest.py --size 6000 --json out.json

In one run it

1. generates (or reuses, from ``--workdir``) a tiled, deflate-compressed 4-band uint16 GeoTIFF with nodata 0
   outside a margin and a diagonal swath edge, and image-like content (smooth fields + noise); a small raster
   of the same kind is made for the memory check;
2. measures the *floor*: a bare loop that reads the same strips (one row of tiles) with rasterio and writes
   the same bytes as ingest (the tiles and their per-pixel valid masks) into Zarr v3 arrays with the tile
   store's chunking and compression (one chunk per tile), on the same number of threads, with the chunk files
   written directly by the same ``ChunkWriter`` ingest uses (the fastest way we know). Also reported for
   information: the floor writing the tiles only, and the floor through Zarr's own writer;
3. measures ``ingest`` throughput on the same raster and its ratio to the same-bytes floor (goal >= 0.8;
   floor and ingest runs interleaved, the best of ``--repeat`` of each);
4. runs both with 1 and 2 threads (goal: ingest speed-up >= 1.6; the floor's own scaling is printed since on
   two shared cores it bounds what ingest can reach);
5. measures peak RSS of ingestion (each run in its own process) on the small and the large raster (goal:
   large / small <= 1.2);
6. prints a table with every number and goal and optionally writes them as JSON (``--json``).

MB/s are megabytes (1e6) of raw pixel data written (stored tiles x bands x tile^2 x 2 bytes), the same
numerator for the floor and for ingest, so their ratio is the inverse ratio of their wall times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    child_main,
    cpu_seconds,
    current_rss_mib,
    environment,
    log,
    print_table,
    run_child,
    write_json,
)

GEN_VERSION = "1"  # bump when the generated raster changes (invalidates cached rasters)
GOAL_RATIO = 0.8
GOAL_SPEEDUP = 1.6
GOAL_RSS_RATIO = 1.2
MARGIN_FRACTION = 0.03  # nodata margin on every side, as a fraction of the raster side
SWATH_FRACTION = 0.7  # pixels with x - y >= SWATH_FRACTION * width are nodata (a diagonal swath edge)


# ---------------------------------------------------------------------------------------------- raster
def valid_mask(r0: int, r1: int, c0: int, c1: int, height: int, width: int) -> np.ndarray:
    """Where the synthetic raster holds data (rows ``r0:r1``, columns ``c0:c1``); nodata (0) elsewhere."""
    m = max(1, round(MARGIN_FRACTION * min(height, width)))
    y = np.arange(r0, r1)[:, None]
    x = np.arange(c0, c1)[None, :]
    inside = (y >= m) & (y < height - m) & (x >= m) & (x < width - m)
    return inside & (x - y < SWATH_FRACTION * width)


def _band_params(bands: int, seed: int) -> list[dict[str, Any]]:
    """Per band: an offset and a few separable sine products at scales from ~60 px to ~8000 px."""
    rng = np.random.default_rng(seed)
    wavelengths = np.array([8000.0, 2500.0, 600.0, 90.0])
    amps = np.array([900.0, 500.0, 250.0, 120.0])
    out = []
    for b in range(bands):
        out.append({
            "base": 1500.0 + 600.0 * b,
            "amp": amps * rng.uniform(0.6, 1.2, amps.size),
            "fy": 2 * np.pi / (wavelengths * rng.uniform(0.7, 1.3, amps.size)),
            "fx": 2 * np.pi / (wavelengths * rng.uniform(0.7, 1.3, amps.size)),
            "py": rng.uniform(0, 2 * np.pi, amps.size),
            "px": rng.uniform(0, 2 * np.pi, amps.size),
            "noise": 25.0 + 10.0 * b,
        })
    return out


def _content(
    r0: int, r1: int, width: int, params: list[dict[str, Any]], rng: np.random.Generator
) -> np.ndarray:
    """``[bands, r1 - r0, width]`` uint16 image-like values in ``[1, 65535]``."""
    y = np.arange(r0, r1, dtype=np.float64)
    x = np.arange(width, dtype=np.float64)
    out = np.empty((len(params), r1 - r0, width), np.uint16)
    for b, p in enumerate(params):
        field = rng.standard_normal((r1 - r0, width), dtype=np.float32)
        field *= np.float32(p["noise"])
        field += np.float32(p["base"])
        for a, fy, fx, py, px in zip(p["amp"], p["fy"], p["fx"], p["py"], p["px"], strict=True):
            sy = (a * np.sin(fy * y + py)).astype(np.float32)
            sx = np.sin(fx * x + px).astype(np.float32)
            field += sy[:, None] * sx[None, :]
        np.clip(field, 1, 65535, out=field)
        out[b] = field
    return out


def ensure_raster(
    workdir: Path, size: int, bands: int, block: int, seed: int = 0
) -> tuple[Path, float | None]:
    """The benchmark raster of side ``size`` in ``workdir``: (path, generation seconds or None when cached).

    Written window by window (one row of blocks at a time, so memory stays small) to a temporary name and
    renamed when complete, so an interrupted generation is never reused.
    """
    import rasterio
    from rasterio.transform import from_origin

    path = workdir / f"bench_{size}x{size}x{bands}_u16_b{block}_deflate.tif"
    tag = {"DINOV3GEO_BENCH": GEN_VERSION, "SIZE": str(size), "SEED": str(seed)}
    if path.exists():
        try:
            with rasterio.open(path) as ds:
                if ds.tags().get("DINOV3GEO_BENCH") == GEN_VERSION and ds.tags().get("SEED") == str(seed):
                    return path, None
        except rasterio.errors.RasterioIOError:
            pass
        path.unlink()
    tmp = path.with_suffix(".partial.tif")
    params = _band_params(bands, seed)
    profile = dict(driver="GTiff", width=size, height=size, count=bands, dtype="uint16", nodata=0,
                   crs="EPSG:32633", transform=from_origin(400000, 5200000, 10, 10), tiled=True,
                   blockxsize=block, blockysize=block, compress="deflate", predictor=2, interleave="pixel",
                   num_threads="ALL_CPUS", bigtiff="IF_SAFER")
    t0 = time.perf_counter()
    with rasterio.Env(GDAL_CACHEMAX=256), rasterio.open(tmp, "w", **profile) as ds:
        for r0 in range(0, size, block):
            r1 = min(size, r0 + block)
            rng = np.random.default_rng([seed, r0])
            arr = _content(r0, r1, size, params, rng)
            arr[:, ~valid_mask(r0, r1, 0, size, size, size)] = 0
            ds.write(arr, window=rasterio.windows.Window(0, r0, size, r1 - r0))
        ds.update_tags(**tag)
    os.replace(tmp, path)
    return path, time.perf_counter() - t0


def kept_plan(size: int, tile: int, min_valid: float) -> list[tuple[int, list[int]]]:
    """Per strip (tile row): (row offset, columns of the tiles ingest keeps), from the analytic valid mask.

    A tile's valid fraction counts its padding (past the raster edge) as invalid, as ingest does.
    """
    plan = []
    for r0 in range(0, size, tile):
        r1 = min(size, r0 + tile)
        m = valid_mask(r0, r1, 0, size, size, size)
        cols = []
        for c0 in range(0, size, tile):
            f = float(m[:, c0 : c0 + tile].sum()) / tile**2
            if f >= min_valid and f > 0:
                cols.append(c0)
        if cols:
            plan.append((r0, cols))
    return plan


# ---------------------------------------------------------------------------------------------- children
def _runs(cols: list[int], tile: int) -> list[tuple[int, int]]:
    """(index of first, count) of runs of adjacent tiles in ``cols``."""
    runs: list[tuple[int, int]] = []
    for k, c in enumerate(cols):
        if runs and cols[k - 1] + tile == c:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((k, 1))
    return runs


def child_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """The raw floor: rasterio strip reads + writes of the same tiles, on ``threads`` threads: the chunk files
    written directly with the store's :class:`ChunkWriter` (``writer="chunk"``, the fastest way we know, the
    one ingest uses) or through Zarr (``writer="zarr"``, for information)."""
    import rasterio
    from rasterio.windows import Window

    from dinov3geo.ingest.store import ChunkWriter, TileStore
    from dinov3geo.io.scene import GDAL_ENV

    path, store, tile, threads = spec["raster"], spec["store"], spec["tile"], spec["threads"]
    direct = spec.get("writer", "chunk") == "chunk"  # the chunk files written directly, as ingest does
    with_mask = bool(spec.get("mask"))
    plan = kept_plan(spec["size"], tile, spec["min_valid"])
    starts = np.cumsum([0] + [len(cols) for _, cols in plan])
    n = int(starts[-1])
    base_rss = current_rss_mib()
    local = threading.local()
    opened: list[Any] = []
    lock = threading.Lock()

    with rasterio.Env(**GDAL_ENV), rasterio.open(path) as ds0:
        height, width, nb, dtype = ds0.height, ds0.width, ds0.count, ds0.dtypes[0]

    def strip(i: int) -> int:
        ds = getattr(local, "ds", None)
        if ds is None:
            local.env = rasterio.Env(**GDAL_ENV)
            local.env.__enter__()
            ds = local.ds = rasterio.open(path)
            with lock:
                opened.append((local.env, ds))
        row_off, cols = plan[i]
        c0 = cols[0]
        w = cols[-1] + tile - c0
        h_in, w_in = min(tile, height - row_off), min(w, width - c0)
        arr = ds.read(window=Window(c0, row_off, w_in, h_in))
        if (h_in, w_in) != (tile, w):
            buf = np.zeros((nb, tile, w), dtype)
            buf[:, :h_in, :w_in] = arr
            arr = buf
        s0 = int(starts[i])
        for k0, m in _runs(cols, tile):
            x0 = cols[k0] - c0
            block = arr[:, :, x0 : x0 + m * tile].reshape(nb, tile, m, tile).transpose(2, 0, 1, 3)
            if direct:
                tiles_w.write(s0 + k0, block)
            else:
                tiles[s0 + k0 : s0 + k0 + m] = block
            if with_mask:
                valid = (block != 0).all(axis=1)
                if direct:
                    valid_w.write(s0 + k0, valid)
                else:
                    vmask[s0 + k0 : s0 + k0 + m] = valid
        return len(cols) * nb * tile * tile * np.dtype(dtype).itemsize

    t0, cpu0 = time.perf_counter(), cpu_seconds()
    ts = TileStore.create(store, [f"b{i + 1}" for i in range(nb)], tile, dtype)
    ts.begin_scene("floor", n)
    tiles, vmask = ts.group["tiles"], ts.group["valid"]
    tiles_w, valid_w = ChunkWriter(tiles), ChunkWriter(vmask)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        nbytes = sum(pool.map(strip, range(len(plan))))
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    for env, ds in opened:
        ds.close()
        del env  # environments were entered on the pool's (now finished) threads
    return {"seconds": seconds, "cpu_s": cpu, "bytes": int(nbytes), "tiles": n, "base_rss_mib": base_rss}


def child_ingest(spec: dict[str, Any]) -> dict[str, Any]:
    """``dinov3geo.ingest.ingest`` of the raster into a new store with ``workers`` threads."""
    from dinov3geo.ingest import ingest

    base_rss = current_rss_mib()
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    rep = ingest([spec["raster"]], spec["store"], tile_size=spec["tile"], min_valid=spec["min_valid"],
                 workers=spec["workers"], progress=False)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    if rep.skipped or len(rep.ingested) != 1:
        raise RuntimeError(f"ingest did not ingest the raster: {rep.summary()}")
    return {"seconds": seconds, "cpu_s": cpu, "bytes": int(rep.bytes_written), "tiles": rep.tiles_written,
            "tiles_below_min_valid": rep.tiles_below_min_valid, "base_rss_mib": base_rss}


HANDLERS = {"floor": child_floor, "ingest": child_ingest}


# ---------------------------------------------------------------------------------------------- parent
def _measure(kind: str, spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run one child measurement on a fresh store and delete the store afterwards."""
    store = workdir / f"store_{kind}_{os.getpid()}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        res = run_child(__file__, {**spec, "kind": kind, "store": str(store)})
    finally:
        wall = time.perf_counter() - t0
        # outside the timed part: drop the store and flush the page cache's dirty pages, so the next
        # measurement neither writes back nor discards this one's files
        shutil.rmtree(store, ignore_errors=True)
        os.sync()
    res["mb_s"] = res["bytes"] / 1e6 / res["seconds"]
    res["cpu_s_per_gb"] = res["cpu_s"] / (res["bytes"] / 1e9)
    log(f"  {kind:6s} threads={spec.get('threads', spec.get('workers'))} mask={bool(spec.get('mask'))}: "
        f"{res['seconds']:.2f} s ({wall:.1f} s with process start), {res['mb_s']:.1f} MB/s, "
        f"CPU {res['cpu_s']:.1f} s, peak RSS {res['peak_rss_mib']:.0f} MiB")
    return res


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated runs, with all their times and the highest peak RSS."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["all_seconds"] = [r["seconds"] for r in runs]
    best["max_peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    return best


def _warm_page_cache(path: Path) -> float:
    """Read the file once so every measurement starts from the page cache; returns seconds."""
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass
    return time.perf_counter() - t0


def _raster_info(path: Path, gen_s: float | None) -> dict[str, Any]:
    import rasterio

    with rasterio.open(path) as ds:
        raw = ds.width * ds.height * ds.count * np.dtype(ds.dtypes[0]).itemsize
        return {"path": str(path), "width": ds.width, "height": ds.height, "bands": ds.count,
                "dtype": ds.dtypes[0], "block": ds.block_shapes[0][0], "compress": str(ds.compression),
                "raw_gb": raw / 1e9, "file_gb": path.stat().st_size / 1e9, "generation_s": gen_s,
                "cached": gen_s is None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/dinov3geo-bench"),
                   help="where generated rasters are cached and temporary stores are written")
    p.add_argument("--size", type=int, default=16000, help="side in pixels of the large raster")
    p.add_argument("--small", type=int, default=4000,
                   help="side in pixels of the small raster (memory check)")
    p.add_argument("--bands", type=int, default=4, help="bands of the generated rasters (uint16)")
    p.add_argument("--block", type=int, default=512, help="GeoTIFF block size of the generated rasters")
    p.add_argument("--tile", type=int, default=256, help="tile size of the store")
    p.add_argument("--min-valid", type=float, default=0.5, help="ingest's min_valid")
    p.add_argument("--workers", type=int, default=2, help="threads of the main runs (compared with 1)")
    p.add_argument("--repeat", type=int, default=1,
                   help="repetitions of each timed run (the fastest is kept)")
    p.add_argument("--skip-scaling", action="store_true", help="skip the 1-thread runs")
    p.add_argument("--skip-rss", action="store_true", help="skip the small-raster memory run")
    p.add_argument("--json", type=Path, default=None, help="write all numbers to this JSON file")
    p.add_argument("--clean", action="store_true", help="delete the workdir (cached rasters) at the end")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 (goals that are missed are reported, not turned into an exit status)."""
    args = parse_args(argv)
    if args.child is not None:
        child_main(HANDLERS, args.child)
        return 0
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, workdir)
    finally:
        if args.clean:
            shutil.rmtree(workdir, ignore_errors=True)
            log(f"removed {workdir}")


def _run(args: argparse.Namespace, workdir: Path) -> int:
    log(f"raster {args.size}^2 x {args.bands} uint16 in {workdir}")
    large, gen_large = ensure_raster(workdir, args.size, args.bands, args.block)
    log(f"  {'cached' if gen_large is None else f'generated in {gen_large:.1f} s'}: {large}")
    info_large = _raster_info(large, gen_large)
    info_small = None
    if not args.skip_rss:
        small, gen_small = ensure_raster(workdir, args.small, args.bands, args.block)
        info_small = _raster_info(small, gen_small)
    warm_s = _warm_page_cache(large)
    log(f"  page cache warmed in {warm_s:.1f} s")

    common = {"raster": str(large), "size": args.size, "tile": args.tile, "min_valid": args.min_valid}
    w = args.workers
    floor_n: list[dict[str, Any]] = []
    ingest_n: list[dict[str, Any]] = []
    floor_1: list[dict[str, Any]] = []
    ingest_1: list[dict[str, Any]] = []
    floor_masks: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        log(f"round {rep + 1}/{args.repeat}")
        floor_n.append(_measure("floor", {**common, "threads": w}, workdir))
        floor_masks.append(_measure("floor", {**common, "threads": w, "mask": True}, workdir))
        ingest_n.append(_measure("ingest", {**common, "workers": w}, workdir))
        if not args.skip_scaling:
            floor_1.append(_measure("floor", {**common, "threads": 1}, workdir))
            ingest_1.append(_measure("ingest", {**common, "workers": 1}, workdir))
    floor_zarr = _measure("floor", {**common, "threads": w, "writer": "zarr"}, workdir)
    small_run = None
    if info_small is not None:
        _warm_page_cache(Path(info_small["path"]))
        small_run = _measure("ingest", {"raster": info_small["path"], "size": args.small, "tile": args.tile,
                                        "min_valid": args.min_valid, "workers": w}, workdir)

    fl, ing = _best(floor_n), _best(ingest_n)
    floor_mask = _best(floor_masks)
    if fl["tiles"] != ing["tiles"]:
        log(f"WARNING: floor wrote {fl['tiles']} tiles but ingest {ing['tiles']}: the comparison is off")
    # the goal's floor writes the same bytes as ingest: the tiles and their valid masks
    ratio = ing["mb_s"] / floor_mask["mb_s"]
    ratio_tiles_only = ing["mb_s"] / fl["mb_s"]
    cpu_ratio = fl["cpu_s_per_gb"] / ing["cpu_s_per_gb"]  # what the ratio would be on idle cores, roughly
    fl1 = _best(floor_1) if floor_1 else None
    ing1 = _best(ingest_1) if ingest_1 else None
    speedup = ing1["seconds"] / ing["seconds"] if ing1 else None
    floor_scaling = fl1["seconds"] / fl["seconds"] if fl1 else None
    rss_large = ing["max_peak_rss_mib"]
    rss_small = small_run["peak_rss_mib"] if small_run else None
    rss_ratio = rss_large / rss_small if rss_small else None

    def status(ok: bool | None) -> str:
        return "-" if ok is None else ("PASS" if ok else "MISS")

    rows: list[list[Any]] = [
        ["raster", f"{args.size}x{args.size}x{args.bands} uint16, {info_large['raw_gb']:.2f} GB raw, "
                   f"{info_large['file_gb']:.2f} GB deflate", "", ""],
        ["generation (s)", gen_large if gen_large is not None else "cached", "", ""],
        ["tiles written / below min-valid", f"{ing['tiles']} / {ing['tiles_below_min_valid']}", "", ""],
        [f"floor MB/s ({w} threads)", fl["mb_s"], "", ""],
        ["floor MB/s (1 thread)", fl1["mb_s"] if fl1 else None, "", ""],
        [f"floor scaling 1 -> {w} threads", floor_scaling, "", ""],
        [f"floor writing the same bytes (tiles + valid masks) MB/s ({w} threads)", floor_mask["mb_s"], "",
         "the goal's floor"],
        [f"floor through Zarr's writer MB/s ({w} threads)", floor_zarr["mb_s"], "", "info (the old floor)"],
        [f"ingest MB/s ({w} workers)", ing["mb_s"], "", ""],
        ["CPU-s per GB: floor / ingest", f"{fl['cpu_s_per_gb']:.1f} / {ing['cpu_s_per_gb']:.1f}", "", "info"],
        ["CPU efficiency floor/ingest", cpu_ratio, "", "info"],
        ["ingest / floor (same bytes)", ratio, f">= {GOAL_RATIO}", status(ratio >= GOAL_RATIO)],
        ["ingest / floor writing the tiles only", ratio_tiles_only, "", "info"],
        ["ingest MB/s (1 worker)", ing1["mb_s"] if ing1 else None, "", ""],
        [f"ingest speed-up 1 -> {w} workers", speedup, f">= {GOAL_SPEEDUP}",
         status(None if speedup is None else speedup >= GOAL_SPEEDUP)],
        ["peak RSS small (MiB)", rss_small, "", f"{args.small}^2"],
        ["peak RSS large (MiB)", rss_large, "", f"{args.size}^2"],
        ["peak RSS large / small", rss_ratio, f"<= {GOAL_RSS_RATIO}",
         status(None if rss_ratio is None else rss_ratio <= GOAL_RSS_RATIO)],
        ["RSS after imports, ingest child (MiB)", ing["base_rss_mib"], "", ""],
        ["peak RSS growth over imports: large / small (MiB)",
         f"{rss_large - ing['base_rss_mib']:.0f} / "
         f"{(small_run['peak_rss_mib'] - small_run['base_rss_mib']) if small_run else float('nan'):.0f}",
         "", "info"],
    ]
    print_table(rows, ["metric", "value", "goal", "status"], title="dinov3geo ingest benchmark")
    if args.json:
        write_json(args.json, {
            "benchmark": "ingest",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "config": {k: (str(v) if isinstance(v, Path) else v)
                       for k, v in vars(args).items() if k != "child"},
            "environment": environment(),
            "raster": info_large,
            "raster_small": info_small,
            "page_cache_warm_s": warm_s,
            "floor": {"threads": w, **fl},
            "floor_1thread": fl1,
            "floor_with_valid_mask": floor_mask,
            "floor_with_valid_mask_runs": floor_masks,
            "floor_through_zarr": floor_zarr,
            "ingest": {"workers": w, **ing},
            "ingest_1worker": ing1,
            "ingest_small": small_run,
            "results": {
                "floor_mb_s": fl["mb_s"], "floor_1thread_mb_s": fl1["mb_s"] if fl1 else None,
                "floor_scaling": floor_scaling, "floor_with_mask_mb_s": floor_mask["mb_s"],
                "ingest_mb_s": ing["mb_s"], "ingest_1worker_mb_s": ing1["mb_s"] if ing1 else None,
                "ratio_ingest_floor": ratio, "ratio_ingest_floor_tiles_only": ratio_tiles_only,
                "cpu_efficiency_floor_over_ingest": cpu_ratio,
                "speedup": speedup, "floor_cpu_s_per_gb": fl["cpu_s_per_gb"],
                "ingest_cpu_s_per_gb": ing["cpu_s_per_gb"],
                "peak_rss_small_mib": rss_small, "peak_rss_large_mib": rss_large, "peak_rss_ratio": rss_ratio,
            },
            "goals": {
                "ratio_ingest_floor": {"goal": f">= {GOAL_RATIO}", "met": ratio >= GOAL_RATIO},
                "speedup": {"goal": f">= {GOAL_SPEEDUP}",
                            "met": None if speedup is None else speedup >= GOAL_SPEEDUP},
                "peak_rss_ratio": {"goal": f"<= {GOAL_RSS_RATIO}",
                                   "met": None if rss_ratio is None else rss_ratio <= GOAL_RSS_RATIO},
            },
        })
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
