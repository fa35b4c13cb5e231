"""The inference engine's own memory and kernel time at region scale, without a model's cost (issue 21).

Run from the repository root::

    .venv/bin/python benchmarks/region_buffers.py                 # 4096^2, 2 and 8 output bands
    .venv/bin/python benchmarks/region_buffers.py --size 8192 --bands 2 8 16 --repeats 2

A cheap model (per-pixel band mean scaled into ``K`` output bands, float32; declared like a ViT: global context,
so the default overlap is half a window) runs through :func:`dinov3geo.inference.predict_raster` (window 512,
batch 4, the defaults otherwise) over a ``--size``\\ :sup:`2` mosaic of mirrored copies of the NEON RGB image
(``canopy_memory.py``'s big image). Each run is a fresh process: peak RSS growth over the RSS after imports
(``/proc/self/clear_refs``), user and system CPU time, bytes read through system calls (``/proc/self/io``
``rchar``: the staging file re-read while GDAL builds overviews and converts it), the block side chosen. With
``--block-size`` the automatic block size is compared with explicit ones (2048: the engine's fixed default
before).

What is left is the engine: input tile cache and strips, batches in flight, one block's accumulators, tile
strips being blended, GDAL's cache, the COG's overviews and conversion. Those are the buffers
:func:`dinov3geo.inference.batching.region_reserve` keeps out of the automatic batch's memory budget.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path
from typing import Any

from _common import child_main, current_rss_mib, environment, log, print_table, run_child, write_json

HERE = Path(__file__).resolve()


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def child_run(spec: dict[str, Any]) -> dict[str, Any]:
    """One engine run (see the module docstring)."""
    import torch

    from dinov3geo.inference import predict_raster
    from dinov3geo.inference.models import RasterModel

    class Cheap(RasterModel):
        in_bands = 3
        global_context = True
        receptive_margin = 32

        def __init__(self, k: int) -> None:
            self.out_bands = k
            self.scales = torch.linspace(0.5, 1.5, k).view(1, -1, 1, 1)

        def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            return x.mean(1, keepdim=True) * self.scales

    model = Cheap(int(spec["bands"]))
    gc.collect()
    base = current_rss_mib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    ru0, r0, t0 = resource.getrusage(resource.RUSAGE_SELF), _rchar(), time.perf_counter()
    stats: dict[str, Any] = {}
    predict_raster(model, spec["image"], spec["out"], window=512, batch_size=4, device="cpu", progress=False,
                   resume=False, block_size=spec["block_size"], stats=stats)
    wall = time.perf_counter() - t0
    ru1, r1 = resource.getrusage(resource.RUSAGE_SELF), _rchar()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    lay = stats["layout"]
    return {"wall_s": wall, "user_s": ru1.ru_utime - ru0.ru_utime, "sys_s": ru1.ru_stime - ru0.ru_stime,
            "growth_mib": hwm - base, "read_mib": (r1 - r0) / 2**20, "finish_s": stats.get("finish_seconds"),
            "block_px": lay["block_windows"] * (lay["window"] - lay["overlap"])}


HANDLERS = {"run": child_run}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--bands", nargs="+", type=int, default=[2, 8], help="output bands K of the cheap model")
    ap.add_argument("--block-size", nargs="+", default=["auto", "2048"],
                    help="block sizes compared (input px; auto: the engine's default)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/dinov3geo-region-buffers")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(HANDLERS, args.child)
        return
    sys.path.insert(0, str(HERE.parent))
    from canopy_memory import make_image

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    image = make_image(work / f"neon_{args.size}.tif", args.size)
    env = environment()
    log(f"CPU: {env.get('cpu', '?')}")
    results: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for k in args.bands:
            for bs in args.block_size:
                spec = {"kind": "run", "bands": k, "block_size": None if bs == "auto" else int(bs),
                        "image": str(image), "out": str(work / f"out_{k}_{bs}.tif")}
                r = run_child(HERE, spec)
                r.update(bands=k, block=bs, repeat=rep)
                results.append(r)
                log(f"[{rep + 1}/{args.repeats}] K={k} block {bs} ({r['block_px']} px): {r['wall_s']:.1f} s, growth "
                    f"{r['growth_mib']:.0f} MiB, user {r['user_s']:.1f} s, sys {r['sys_s']:.2f} s, read "
                    f"{r['read_mib']:.0f} MiB")
    rows = [[r["bands"], r["block"], r["block_px"], r["repeat"] + 1, r["wall_s"], r["user_s"], r["sys_s"],
             100 * r["sys_s"] / max(r["user_s"], 1e-9), r["read_mib"], r["growth_mib"]] for r in results]
    print_table(rows, ["K", "block", "block px", "repeat", "wall s", "user s", "sys s", "sys/user %", "read MiB",
                       "RSS growth MiB"], title=f"engine only, {args.size}^2 NEON mosaic, window 512, batch 4")
    if args.json:
        write_json(args.json, {"environment": env, "results": results})


if __name__ == "__main__":
    main()
