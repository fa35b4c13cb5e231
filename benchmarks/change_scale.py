"""Benchmark: peak memory of a whole two-date change run (``detect_change``) does not grow with the region.

Run from the repository root::

    .venv/bin/python benchmarks/change_scale.py                    # 40000^2 vs 5000^2 (long: see README)
    .venv/bin/python benchmarks/change_scale.py --size 12000 --small 3000 --json out.json

In one run it

1. generates (or reuses, from ``--workdir``) two dates of a 2-band (red, nir) uint8 GeoTIFF of ``--size``^2
   pixels (10 m UTM pixels), tiled 512, ZSTD level 1 + horizontal predictor, written window by window (one
   row of tiles at a time): smooth image-like fields plus noise, the second date with synthetic loss patches
   (red up, nir down: 0-2 patches of 4-600 pixels per 512^2 cell, some elongated, many across tile edges),
   so that the change map has regions on both sides of the 0.1 ha MMU and polygons exist; a small pair
   (``--small``^2) of the same kind too;
2. runs ``detect_change`` (``method="classic"``, NDVI difference by default: the cheapest model, so the run
   measures the data path and the post-processing) on the small and on the large pair, each in its own
   child process, and reports for each the peak RSS, the RSS after imports, the growth (peak minus that),
   the wall time and the steps' wall times (``ChangeResult.timings``), the threshold, hectares and polygons;
   the peak is also split into the model step's and the post-processing's (the high-water mark is reset
   between the two through ``/proc/self/clear_refs`` on Linux);
3. checks the goal: peak RSS large / small <= 1.2 (memory bounded by windows and tiles, not by the grid).

The outputs of each run are deleted after it (``--keep`` keeps them); the generated inputs are kept in the
workdir for the next run (``--clean`` deletes the workdir at the end).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    Timer,
    child_main,
    current_rss_mib,
    environment,
    log,
    peak_rss_mib,
    print_table,
    run_child,
    write_json,
)

GEN_VERSION = "1"  # bump when the generated rasters change (invalidates cached ones)
GOAL_RSS_RATIO = 1.2
BLOCK = 512
CELL = 512  # one cell of the patch lattice


# ---------------------------------------------------------------------------------------------- rasters
def _fields(r0: int, r1: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth red and nir fields (float32) of rows ``r0:r1``: separable sines at a few scales."""
    rng = np.random.default_rng(seed)
    y = np.arange(r0, r1, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    out = []
    for base in (60.0, 150.0):  # red, nir (uint8 reflectance-like: vegetated, NDVI ~ 0.4)
        f = np.full((r1 - r0, width), base, np.float32)
        for wl, amp in ((3000.0, 18.0), (400.0, 8.0)):
            fy, fx = 2 * np.pi / (wl * rng.uniform(0.8, 1.2)), 2 * np.pi / (wl * rng.uniform(0.8, 1.2))
            py, px = rng.uniform(0, 2 * np.pi, 2)
            f += (amp * np.sin(fy * y + py)).astype(np.float32) * np.sin(fx * x + px).astype(np.float32)
        out.append(f)
    return out[0], out[1]


def _patches(r0: int, r1: int, width: int, seed: int) -> list[tuple[int, int, int, int]]:
    """Loss patches ``(row0, row1, col0, col1)`` (clipped to rows ``r0:r1``) from the cells that can reach them.

    Each ``CELL``^2 cell draws 0-2 patches from its own seed, so any strip can be generated on its own.
    """
    out = []
    for ci in range(max(0, r0 // CELL - 1), (r1 - 1) // CELL + 2):
        for cj in range((width + CELL - 1) // CELL):
            rng = np.random.default_rng([seed, 7, ci, cj])
            for _ in range(int(rng.integers(0, 3))):
                if rng.random() < 0.25:  # elongated (a road, a strip clearing)
                    h, w = (int(rng.integers(2, 4)), int(rng.integers(20, 200)))
                    if rng.random() < 0.5:
                        h, w = w, h
                else:
                    h, w = int(rng.integers(2, 25)), int(rng.integers(2, 25))
                pr, pc = ci * CELL + int(rng.integers(0, CELL)), cj * CELL + int(rng.integers(0, CELL))
                a, b = max(pr, r0), min(pr + h, r1)
                if a < b and pc < width:
                    out.append((a, b, pc, min(pc + w, width)))
    return out


def ensure_pair(workdir: Path, size: int, seed: int = 0) -> tuple[Path, Path, float | None]:
    """The two dates of side ``size`` in ``workdir``: (before, after, generation seconds or None if cached)."""
    import rasterio
    from rasterio.transform import from_origin

    paths = [workdir / f"change_{size}_{d}.tif" for d in ("20190601", "20210601")]
    if all(p.exists() for p in paths):
        try:
            ok = True
            for p in paths:
                with rasterio.open(p) as ds:
                    ok &= ds.tags().get("DINOV3GEO_BENCH") == GEN_VERSION and ds.tags().get("SEED") == str(seed)
            if ok:
                return paths[0], paths[1], None
        except rasterio.errors.RasterioIOError:
            pass
    for p in paths:
        p.unlink(missing_ok=True)
    tmps = [p.with_suffix(".partial.tif") for p in paths]
    profile = dict(driver="GTiff", width=size, height=size, count=2, dtype="uint8", nodata=0, crs="EPSG:32633",
                   transform=from_origin(400000, 5200000, 10, 10), tiled=True, blockxsize=BLOCK,
                   blockysize=BLOCK, compress="zstd", zstd_level=1, predictor=2, interleave="pixel",
                   num_threads="ALL_CPUS", bigtiff="IF_SAFER")
    noise = np.random.default_rng([seed, 1]).integers(-2, 3, (2, 2, BLOCK, 4096), dtype=np.int8)
    t0 = time.perf_counter()
    with rasterio.Env(GDAL_CACHEMAX=128), rasterio.open(tmps[0], "w", **profile) as db, \
            rasterio.open(tmps[1], "w", **profile) as da:
        for ds in (db, da):
            ds.descriptions = ("red", "nir")
            ds.update_tags(DINOV3GEO_BENCH=GEN_VERSION, SEED=str(seed), SIZE=str(size))
        for r0 in range(0, size, BLOCK):
            r1 = min(size, r0 + BLOCK)
            red, nir = _fields(r0, r1, size, seed)
            k = (r0 // BLOCK) % 4096
            for d, ds in enumerate((db, da)):
                img = np.empty((2, r1 - r0, size), np.float32)
                for b, f in enumerate((red, nir)):
                    nz = np.roll(noise[d, b, : r1 - r0], k * 37, axis=1)
                    reps = -(-size // nz.shape[1])
                    img[b] = f + np.tile(nz, (1, reps))[:, :size]
                if d == 1:
                    for a, bb, c0, c1 in _patches(r0, r1, size, seed):
                        img[0, a - r0 : bb - r0, c0:c1] += 70.0  # bare soil: red up
                        img[1, a - r0 : bb - r0, c0:c1] -= 90.0  # nir down
                np.clip(img, 1, 255, out=img)
                ds.write(img.astype(np.uint8), window=rasterio.windows.Window(0, r0, size, r1 - r0))
    for t, p in zip(tmps, paths, strict=True):
        os.replace(t, p)
    return paths[0], paths[1], time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- child
def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux ``/proc/self/clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: one ``detect_change`` run, with the peak RSS of the model step and of the post-processing."""
    import logging

    import dinov3geo.tasks.change.detect as detect

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    base = current_rss_mib()
    phases: dict[str, float] = {}
    engine = detect.predict_raster

    def predict_and_split(*a: Any, **k: Any) -> Any:
        res = engine(*a, **k)
        phases["peak_model_mib"] = peak_rss_mib()
        if _reset_peak():  # from here on the high-water mark is the post-processing's
            phases["rss_after_model_mib"] = current_rss_mib()
        return res

    detect.predict_raster = predict_and_split
    out = Path(spec["out"])
    with Timer() as t:
        r = detect.detect_change(spec["before"], spec["after"], out, method="classic",
                                 classic_method=spec["method"], band_names=["red", "nir"], mmu_ha=spec["mmu_ha"],
                                 window=spec["window"], batch_size=spec["batch"], post_tile=spec["post_tile"],
                                 progress=False, device="cpu", sidecars=False)
    if "rss_after_model_mib" in phases:
        phases["peak_post_mib"] = peak_rss_mib()
    disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"seconds": t.seconds, "base_rss_mib": base, "timings": r.timings, "n_polygons": r.n_polygons,
            "change_ha": r.change_ha, "polygons_ha": r.polygons_ha, "score_threshold": r.score_threshold,
            "valid_ha": r.summary["valid_ha"], "outputs_gb": disk / 1e9,
            "peak_total_mib": max(phases.get("peak_model_mib", 0.0), peak_rss_mib()), **phases}


def _measure(size: int, before: Path, after: Path, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out = workdir / f"out_{size}"
    shutil.rmtree(out, ignore_errors=True)
    spec = {"kind": "run", "before": str(before), "after": str(after), "out": str(out), "method": args.method,
            "mmu_ha": args.mmu_ha, "window": args.window, "batch": args.batch, "post_tile": args.post_tile}
    log(f"detect_change on {size}^2 (post_tile {args.post_tile}) ...")
    res = run_child(Path(__file__), spec)
    res["peak_rss_mib"] = res.pop("peak_total_mib")  # child_main's figure is the post-processing's after a reset
    res["growth_mib"] = res["peak_rss_mib"] - res["base_rss_mib"]
    log(f"  {res['seconds']:.1f} s, peak RSS {res['peak_rss_mib']:.0f} MiB (after imports "
        f"{res['base_rss_mib']:.0f}; model step {res.get('peak_model_mib', float('nan')):.0f}, post-processing "
        f"{res.get('peak_post_mib', float('nan')):.0f}), {res['n_polygons']} polygons, steps {res['timings']}")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=40000, help="side of the large pair (default 40000)")
    ap.add_argument("--small", type=int, default=5000, help="side of the small pair (default 5000)")
    ap.add_argument("--method", choices=["ndvi", "cva"], default="ndvi", help="classic change method")
    ap.add_argument("--post-tile", type=int, default=2048, help="detect_change post_tile (default 2048)")
    ap.add_argument("--window", type=int, default=1024, help="inference window (default 1024)")
    ap.add_argument("--batch", type=int, default=4, help="inference batch size (default 4)")
    ap.add_argument("--mmu-ha", type=float, default=0.1, help="minimum mapping unit (default 0.1 ha)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dinov3geo-change-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the outputs of the runs")
    ap.add_argument("--clean", action="store_true", help="delete the workdir (generated inputs) at the end")
    ap.add_argument("--json", type=Path, help="write every number as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main({"run": _run}, args.child)
        return 0
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    # inputs ~0.6 byte/px (2 dates, ZSTD), outputs ~6 byte/px (two float32 COGs + staging), transiently more
    need_gb = args.size**2 * 7.5 / 1e9
    free_gb = shutil.disk_usage(workdir).free / 1e9
    log(f"disk: {free_gb:.0f} GB free in {workdir}, the {args.size}^2 run needs about {need_gb:.0f} GB")
    if free_gb < need_gb:
        log("WARNING: probably not enough disk space; try a smaller --size")
    small_b, small_a, gen_small = ensure_pair(workdir, args.small)
    log(f"small pair {args.small}^2: " + (f"generated in {gen_small:.0f} s" if gen_small else "cached"))
    large_b, large_a, gen_large = ensure_pair(workdir, args.size)
    log(f"large pair {args.size}^2: " + (f"generated in {gen_large:.0f} s" if gen_large else "cached"))
    small = _measure(args.small, small_b, small_a, args, workdir)
    large = _measure(args.size, large_b, large_a, args, workdir)
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    met = ratio <= GOAL_RSS_RATIO
    inputs_gb = sum(p.stat().st_size for p in (large_b, large_a)) / 1e9
    rows: list[list[Any]] = []
    for name, r, n in (("small", small, args.small), ("large", large, args.size)):
        rows += [
            [f"{name}: {n}^2 wall (s)", r["seconds"], "", ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())],
            [f"{name}: peak RSS / after imports / growth (MiB)",
             f"{r['peak_rss_mib']:.0f} / {r['base_rss_mib']:.0f} / {r['growth_mib']:.0f}", "", ""],
            [f"{name}: peak RSS of the model step / of the post-processing (MiB)",
             f"{r.get('peak_model_mib', float('nan')):.0f} / {r.get('peak_post_mib', float('nan')):.0f}", "",
             f"RSS after the model step {r.get('rss_after_model_mib', float('nan')):.0f}"],
            [f"{name}: Mpx/s", n * n / 1e6 / r["seconds"], "", ""],
            [f"{name}: polygons / change ha / polygons ha",
             f"{r['n_polygons']} / {r['change_ha']:.1f} / {r['polygons_ha']:.1f}", "",
             f"score threshold {r['score_threshold']:.4g}"],
        ]
    rows += [
        ["inputs (GB, 2 dates, large) / outputs (GB, large)", f"{inputs_gb:.2f} / {large['outputs_gb']:.2f}", "", ""],
        ["peak RSS large / small", ratio, f"<= {GOAL_RSS_RATIO}", "PASS" if met else "MISS"],
        ["growth large / small", large["growth_mib"] / max(small["growth_mib"], 1e-9), "", "info"],
        ["post-processing peak large / small",
         large.get("peak_post_mib", float("nan")) / small.get("peak_post_mib", float("nan")), "", "info"],
        [f"wall large / small (pixels x {args.size**2 / args.small**2:.0f})", large["seconds"] / small["seconds"],
         "", "info"],
    ]
    print_table(rows, ["metric", "value", "goal", "note"], title="dinov3geo change detection at region scale")
    if args.json:
        write_json(args.json, {
            "benchmark": "change_scale",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
            "environment": environment(),
            "generation_s": {"small": gen_small, "large": gen_large},
            "small": small, "large": large,
            "results": {"peak_rss_ratio": ratio, "growth_ratio": large["growth_mib"] / max(small["growth_mib"], 1e-9),
                        "post_peak_ratio": large.get("peak_post_mib", float("nan"))
                        / small.get("peak_post_mib", float("nan")),
                        "wall_ratio": large["seconds"] / small["seconds"]},
            "goals": {"peak_rss_ratio": {"goal": f"<= {GOAL_RSS_RATIO}", "met": met}},
        })
        log(f"wrote {args.json}")
    if args.clean:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
