"""Peak memory of :mod:`dinov3geo.xarray` on chunked arrays far larger than memory would hold in one piece.

Run from the repository root (niced on a shared machine)::

    nice -n 19 .venv/bin/python benchmarks/xarray_memory.py                   # 40000^2 and 20000^2 x 3 uint8
    .venv/bin/python benchmarks/xarray_memory.py --sizes 8000 4000           # a quick run
    .venv/bin/python benchmarks/xarray_memory.py --blocksize 64              # smaller engine blocks

What one run does, in a fresh process per size:

1. **Input**: a ``3 x N x N`` uint8 dask array (``--chunk`` px chunks, 2048 by default) generated chunk by chunk
   (a cheap deterministic pattern), with a UTM CRS and 1 m pixels. It never exists as a whole: 40000^2 x 3 is
   4.5 GiB of input and would need 18 GiB as the float32 the model sees.
2. **Model**: a 16 x 16 patch mean (``TorchRasterModel(AvgPool2d(16), scale=16)``, 3 bands), the shape of a
   ViT's patch features at a fraction of the cost, so that the data path dominates.
3. **Run**: ``dinov3geo.xarray.predict(model, da, window=512, reads=--reads)`` (engine defaults otherwise;
   ``--blocksize`` changes the engine blocks), then ``.to_zarr(...)`` on dask's threaded scheduler with
   ``--workers`` threads (default 2). Measured: wall time,
   CPU time, throughput (input megapixels per second), RSS after imports and model, and **peak RSS** of the
   whole process (``VmHWM``).
4. **Check**: output pixels away from the raster edge must equal the 16 x 16 mean of the pattern (every window
   covering a patch sees the same patch, so the blend is exact); 2000 random pixels are compared.
5. **Goal** (printed): peak RSS of the largest size / peak RSS of the smallest <= 1.3.

``--json PATH`` writes every number and the environment.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import child_main, current_rss_mib, environment, log, print_table, run_child, write_json

HERE = Path(__file__).resolve()
GOAL_RATIO = 1.3


def _pattern(block: Any, block_info: dict | None = None) -> Any:
    """Deterministic uint8 pixels of one chunk (a function of band, row and column only)."""
    import numpy as np

    loc = block_info[None]["array-location"]
    (b0, b1), (r0, r1), (c0, c1) = loc
    r = np.arange(r0, r1, dtype=np.int64)[:, None]
    c = np.arange(c0, c1, dtype=np.int64)[None, :]
    out = np.empty((b1 - b0, r1 - r0, c1 - c0), dtype=np.uint8)
    for k, b in enumerate(range(b0, b1)):
        out[k] = ((r * 7 + c * 13 + (r // 64) * (c // 64) + 50 * b) % 251).astype(np.uint8)
    return out


def generated_array(size: int, chunk: int) -> Any:
    """A lazily generated ``3 x size x size`` uint8 DataArray with a CRS and 1 m pixels."""
    import dask.array as dsa
    import numpy as np
    import rioxarray  # noqa: F401
    import xarray as xr
    from affine import Affine

    template = dsa.empty((3, size, size), chunks=(3, chunk, chunk), dtype=np.uint8)
    data = template.map_blocks(_pattern, dtype=np.uint8)
    tr = Affine(1.0, 0.0, 300000.0, 0.0, -1.0, 5000000.0)
    da = xr.DataArray(data, dims=("band", "y", "x"),
                      coords={"band": [1, 2, 3], "y": tr.f + (np.arange(size) + 0.5) * tr.e,
                              "x": tr.c + (np.arange(size) + 0.5) * tr.a})
    return da.rio.write_crs("EPSG:32633").rio.write_transform(tr)


def child_run(spec: dict[str, Any]) -> dict[str, Any]:
    import dask
    import numpy as np
    import torch
    import xarray as xr

    import dinov3geo.xarray as dx
    from dinov3geo.inference import TorchRasterModel, make_layout

    size, chunk = int(spec["size"]), int(spec["chunk"])
    model = TorchRasterModel(torch.nn.AvgPool2d(16), 3, ("r", "g", "b"), scale=16, value_scale=1 / 255)
    da = generated_array(size, chunk)
    kw = {"window": spec["window"], "batch_size": 8, "reads": spec["reads"]}
    if spec.get("blocksize"):
        kw["blocksize"] = int(spec["blocksize"])
    t_build = time.perf_counter()
    res = dx.predict(model, da, **kw)
    build_s = time.perf_counter() - t_build
    lay = make_layout(model, size, size, window=spec["window"], blocksize=kw.get("blocksize"))
    rss0 = current_rss_mib()
    out = Path(spec["out"])
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=int(spec["workers"])):
        res.to_zarr(out, mode="w", consolidated=False)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    z = xr.open_zarr(out, consolidated=False)[res.name]
    h, w = z.shape[1:]
    rng = np.random.default_rng(0)
    rows = rng.integers(2, h - 2, 2000)
    cols = rng.integers(2, w - 2, 2000)
    got = z.values[:, rows, cols]
    want = np.empty_like(got)
    for k, (r, c) in enumerate(zip(rows, cols, strict=True)):
        px = _pattern(None, {None: {"array-location": [(0, 3), (16 * r, 16 * r + 16), (16 * c, 16 * c + 16)]}})
        want[:, k] = px.reshape(3, -1).astype(np.float64).mean(axis=1) / 255
    err = float(np.abs(got - want).max())
    return {"size": size, "chunk": chunk, "window": spec["window"], "workers": spec["workers"],
            "blocksize": kw.get("blocksize"), "reads": res.attrs["dinov3geo_reads"], "input_gib": 3 * size * size / 2**30,
            "output_mib": 3 * h * w * 4 / 2**20, "n_windows": lay.n_windows, "n_blocks": lay.n_blocks_total,
            "block_px": lay.block_windows * lay.stride + lay.overlap, "out_chunks": [len(c) for c in res.chunks],
            "build_seconds": build_s, "seconds": wall,
            "cpu_seconds": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
            "mpx_per_s": size * size / wall / 1e6, "rss_before_mib": rss0, "max_abs_error": err,
            "load_1min": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[40000, 20000], help="raster sides (px)")
    ap.add_argument("--chunk", type=int, default=2048, help="input chunk side (px)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2, help="dask threads")
    ap.add_argument("--reads", default="auto", choices=["auto", "per-block", "shared"],
                    help="how block tasks get their input (dinov3geo.xarray.predict's reads)")
    ap.add_argument("--blocksize", type=int, default=None, help="engine tile alignment (output px; default the engine's)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the Zarr outputs go (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child_main({"run": child_run}, args.child)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dinov3geo-xarray-mem-"))
    results = []
    try:
        for size in sorted(args.sizes):
            log(f"{size}^2 x 3 uint8, chunks {args.chunk}, {args.workers} dask threads")
            out = work / f"out_{size}.zarr"
            r = run_child(HERE, {"kind": "run", "size": size, "chunk": args.chunk, "window": args.window,
                                 "workers": args.workers, "blocksize": args.blocksize, "reads": args.reads,
                                 "out": str(out)})
            shutil.rmtree(out, ignore_errors=True)
            results.append(r)
            log(f"  {r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, max error {r['max_abs_error']:.2e}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    rows = [[f"{r['size']}^2", f"{r['input_gib']:.2f}", r["n_windows"], r["n_blocks"], r["block_px"],
             r["seconds"], r["cpu_seconds"], r["mpx_per_s"], r["rss_before_mib"], r["peak_rss_mib"],
             f"{r['max_abs_error']:.1e}", r["load_1min"]] for r in results]
    print_table(rows, ["size", "input GiB", "windows", "blocks", "block px", "wall s", "CPU s", "MP/s",
                       "RSS before MiB", "peak RSS MiB", "max error", "load"],
                title=f"dinov3geo.xarray.predict(...).to_zarr: patch-mean model, window {args.window}, "
                      f"chunks {args.chunk}, {args.workers} dask threads, reads={results[0]['reads']}")
    ratio = results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"] if len(results) > 1 else None
    if ratio is not None:
        ok = "met" if ratio <= GOAL_RATIO else "NOT met"
        print(f"\npeak RSS {results[-1]['size']}^2 / {results[0]['size']}^2 = {ratio:.2f} "
              f"(goal <= {GOAL_RATIO}: {ok})")
    bad = [r for r in results if r["max_abs_error"] > 1e-6]
    if bad:
        print(f"WRONG OUTPUT: max error {max(r['max_abs_error'] for r in bad):.2e}", file=sys.stderr)
    if args.json:
        write_json(args.json, {"results": results, "peak_ratio": ratio, "goal_ratio": GOAL_RATIO,
                               "environment": environment()})
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
