"""Benchmark of region inference (``dinov3geo.inference.predict_raster``) against two references.

Run from the repository root::

    .venv/bin/python benchmarks/inference.py --size 4096 --small-size 1024          # quick (~3 min)
    .venv/bin/python benchmarks/inference.py                                          # 20000^2 (3.2 GB raw)
    .venv/bin/python benchmarks/inference.py --size 20000 --skip-torchgeo --json out.json

In one run it

1. generates (or reuses from ``--workdir``) a tiled (512), deflate-compressed, 4-band uint16 GeoTIFF of
   ``--size``\\ :sup:`2` pixels, window by window (never whole in memory), and a ``--small-size`` one;
2. measures the **model-only floor**: the same backbone model (random DINOv3 weights, ``--arch``, features at
   1/16 resolution, optional 1x1 head) called on tensors already in memory, with exactly the engine's batch
   shapes (the same number of windows of the same size, batched the same way);
3. runs the **engine** (``predict_raster``: lazy windowed reads, blending, block manifest, COG output with
   overviews) on the same raster; throughput in input megapixels/s and its ratio to the floor (goal >= 0.95);
4. does the same region **the torchgeo way** (``RasterDataset`` + ``GridGeoSampler`` with the same window and
   stride + ``DataLoader`` + hand-written stitching into in-memory arrays + a GeoTIFF write; goal: engine
   >= 3x faster), unless ``--skip-torchgeo``; with a backbone on a CPU both ways spend their time in the same
   model calls, so the engine and the torchgeo way are also compared with the stand-in model (``--arch none``)
   on a ``--data-path-size`` raster: the regime of a GPU, where the data path is what remains;
   steps 2-4 are repeated ``--repeats`` times, interleaved, each in a fresh process; the best time of each is
   used (other processes on a shared machine only ever add time) and medians are reported too;
5. runs the engine on the small raster (and, with ``--rss-arch``, on the large one) in fresh processes: peak
   RSS large / small (goal <= 1.2);
6. prints a table with every number and goal, and optionally writes them as JSON.

``--arch none`` swaps the backbone for a near-free stand-in with the same output shape (the data path alone,
the regime of a fast GPU); ``--rss-only`` runs only step 5 (e.g. ``--size 20000 --small-size 5000``).

Generated rasters are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import child_main, default_amp, environment, log, print_table, run_child, write_json

GOAL_RATIO = 0.95
GOAL_RSS = 1.2
GOAL_TORCHGEO = 3.0
HERE = Path(__file__).resolve()


# ---------------------------------------------------------------------------------------------- raster
def generate(path: Path, size: int, bands: int = 4, strip: int = 512) -> None:
    """A smooth-plus-noise uint16 raster written strip by strip (tiled 512, deflate, predictor 2)."""
    import rasterio
    from rasterio.transform import from_origin

    if path.exists():
        return
    tmp = path.with_name(path.name + ".tmp.tif")
    rng = np.random.default_rng(0)
    profile = dict(driver="GTiff", width=size, height=size, count=bands, dtype="uint16", crs="EPSG:32633",
                   transform=from_origin(400000.0, 5000000.0, 0.5, 0.5), tiled=True, blockxsize=512,
                   blockysize=512, compress="deflate", predictor=2, num_threads=2, bigtiff="IF_SAFER")
    xx = np.arange(size, dtype=np.float32)[None, :]
    with rasterio.Env(GDAL_CACHEMAX=256), rasterio.open(tmp, "w", **profile) as ds:
        for r in range(0, size, strip):
            h = min(strip, size - r)
            yy = np.arange(r, r + h, dtype=np.float32)[:, None]
            block = np.empty((bands, h, size), dtype=np.uint16)
            for b in range(bands):
                base = 3000 + 1500 * np.sin(yy / (97 + 13 * b)) * np.cos(xx / (131 + 7 * b))
                block[b] = (base + rng.integers(0, 400, (h, size))).astype(np.uint16)
            ds.write(block, window=rasterio.windows.Window(0, r, size, h))
    tmp.rename(path)


# ---------------------------------------------------------------------------------------------- model
def build_model(spec: dict[str, Any]) -> Any:
    import torch

    from dinov3geo.inference import BackboneFeatures
    from dinov3geo.inference.models import RasterModel
    from dinov3geo.models import build_backbone

    torch.manual_seed(0)
    if spec["arch"] == "none":

        class DataPath(RasterModel):
            """Data path only: 16x16 average pool + a fixed random 1x1 projection to ViT-S's 384 bands.

            Costs next to nothing, so a run measures reading, batching, stitching and writing (the share of
            the time that remains when a GPU runs the backbone), with output values that compress like
            features (not constants)."""

            out_bands = spec["head_bands"] or 384
            scale = 16
            receptive_margin = 32

            def __init__(self) -> None:
                self.proj = torch.randn(self.out_bands, 4) * 1e-4

            def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
                p = torch.nn.functional.avg_pool2d(x, 16)
                return torch.einsum("kc,bchw->bkhw", self.proj, p).sin()

        return DataPath()
    bb = build_backbone(spec["arch"], in_chans=4).eval()
    head = None
    if spec["head_bands"]:
        head = torch.nn.Conv2d(bb.embed_dim, spec["head_bands"], 1).eval()
    return BackboneFeatures(bb, value_scale=1e-4, head=head, out_bands=spec["head_bands"] or None)


def _setup_threads(spec: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(spec["threads"])


def _allocator(spec: dict[str, Any]) -> Any:
    """The engine's allocator setting (``predict_raster(keep_freed_memory=True)``: glibc keeps freed buffers),
    given to every side of a comparison unless ``--no-fair-allocator``."""
    import contextlib

    from dinov3geo.utils.memory import keep_freed_memory

    return keep_freed_memory() if spec.get("fair_allocator", True) else contextlib.nullcontext()


def output_settings(model: Any, size: int, spec: dict[str, Any]) -> dict[str, Any]:
    """The COG settings ``predict_raster`` picks for ``model``'s output (codec, level, predictor, block size,
    overviews, GDAL cache, 2 GDAL compression threads): the torchgeo way writes with exactly these."""
    import math as _m

    import numpy as _np

    from dinov3geo.inference import make_layout

    layout = make_layout(model, size, size, window=spec["window"], overlap=spec["overlap"])
    bands = model.out_bands
    compress, level = ("deflate", None) if bands <= 16 else ("zstd", 1)
    bs = layout.align
    return {"compress": compress, "level": level, "blocksize": bs, "overviews": bands <= 16, "num_threads": 2,
            "gdal_cachemax_mb": max(32, _m.ceil(4 * bs * bs * bands * _np.dtype("float32").itemsize / 2**20))}


def _batch_sizes(spec: dict[str, Any], model: Any, size: int) -> list[int]:
    """The engine's batch sizes on a fully valid ``size x size`` raster (batches never span blocks)."""
    from dinov3geo.inference import make_layout

    layout = make_layout(model, size, size, window=spec["window"], overlap=spec["overlap"])
    sizes: list[int] = []
    for b in layout.blocks():
        n = len(layout.block_cells(*b))
        sizes += [spec["batch"]] * (n // spec["batch"]) + ([n % spec["batch"]] if n % spec["batch"] else [])
    return sizes


# ---------------------------------------------------------------------------------------------- children
def child_engine(spec: dict[str, Any]) -> dict[str, Any]:
    _setup_threads(spec)
    from _common import current_rss_mib

    from dinov3geo.inference import predict_raster

    model = build_model(spec)
    base_rss = current_rss_mib()  # after imports and model load: the growth is measured from here
    out = Path(spec["out"])
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    predict_raster(model, spec["raster"], out, window=spec["window"], overlap=spec["overlap"],
                   batch_size=spec["batch"], amp=spec["amp"], device="cpu", progress=False, resume=False,
                   stats=stats, read_threads=spec.get("read_threads"),
                   keep_freed_memory=spec.get("fair_allocator", True))
    seconds = time.perf_counter() - t0
    size_mb = out.stat().st_size / 1e6
    out.unlink()
    return {"seconds": seconds, "out_mb": size_mb, "stats": stats, "base_rss_mib": base_rss}


def child_model_only(spec: dict[str, Any]) -> dict[str, Any]:
    _setup_threads(spec)
    import contextlib

    import torch

    model = build_model(spec).eval()
    sizes = _batch_sizes(spec, model, spec["size"])
    w = spec["window"]
    rng = np.random.default_rng(1)
    tensors = {n: torch.from_numpy(rng.integers(1000, 6000, (n, 4, w, w)).astype(np.float32)) for n in set(sizes)}
    valid = {n: torch.ones(n, w, w, dtype=torch.bool) for n in set(sizes)}
    amp = torch.bfloat16 if spec["amp"] == "bf16" else None
    ctx = (lambda: torch.autocast("cpu", dtype=amp)) if amp else contextlib.nullcontext

    def one_pass() -> float:
        t0 = time.perf_counter()
        for n in sizes:
            with torch.inference_mode(), ctx():
                y = model(tensors[n], valid[n])
            y.float().cpu().numpy()
        return time.perf_counter() - t0

    with torch.inference_mode(), ctx():  # warm-up
        model(tensors[sizes[0]], valid[sizes[0]])
    with _allocator(spec):  # the engine's allocator setting (fair floor)
        return {"seconds": one_pass(), "windows": sum(sizes), "batches": len(sizes)}


def child_torchgeo(spec: dict[str, Any]) -> dict[str, Any]:
    """The torchgeo way: RasterDataset + GridGeoSampler + DataLoader, stitched by hand in memory."""
    _setup_threads(spec)
    import contextlib

    import rasterio
    import torch
    from torch.utils.data import DataLoader
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import GridGeoSampler

    raster = Path(spec["raster"])

    class Region(RasterDataset):
        filename_glob = raster.name
        is_image = True

    model = build_model(spec).eval()
    scale = model.scale
    alloc = _allocator(spec)
    alloc.__enter__()
    t0 = time.perf_counter()
    ds = Region(paths=str(raster.parent))
    sampler = GridGeoSampler(ds, size=spec["window"], stride=spec["window"] - spec["overlap"])
    loader = DataLoader(ds, sampler=sampler, batch_size=spec["batch"], collate_fn=stack_samples,
                        num_workers=spec["tg_workers"])
    with rasterio.open(raster) as src:
        left, top, res, height, width = src.bounds.left, src.bounds.top, src.res[0], src.height, src.width
        profile = src.profile
    oh, ow = math.ceil(height / scale), math.ceil(width / scale)
    k = model.out_bands
    acc = np.zeros((k, oh, ow), dtype=np.float32)
    cnt = np.zeros((oh, ow), dtype=np.float32)
    amp = torch.bfloat16 if spec["amp"] == "bf16" else None
    ctx = (lambda: torch.autocast("cpu", dtype=amp)) if amp else contextlib.nullcontext
    n = 0
    for batch in loader:
        x = batch["image"].float()
        with torch.inference_mode(), ctx():
            y = model(x, torch.ones(x.shape[0], *x.shape[2:], dtype=torch.bool)).float().numpy()
        for b, (xs, ys, _t) in enumerate(batch["bounds"]):
            # chips are laid out from the bottom-left corner; the last ones may reach past the top/right
            c = round((xs.start - left) / res) // scale
            r = round((top - ys.stop) / res) // scale
            r0, c0 = max(r, 0), max(c, 0)
            r1, c1 = min(r + y.shape[2], oh), min(c + y.shape[3], ow)
            acc[:, r0:r1, c0:c1] += y[b, :, r0 - r : r1 - r, c0 - c : c1 - c]
            cnt[r0:r1, c0:c1] += 1
        n += x.shape[0]
    out = np.divide(acc, cnt, out=np.full_like(acc, np.nan), where=cnt > 0)
    t_write = time.perf_counter()
    # the same output as the engine's: a COG written by the same writer with the same codec, predictor, block
    # size, overviews, GDAL cache and compression threads (the settings are in the JSON output)
    from rasterio.windows import Window

    from dinov3geo.inference.engine import _FeatureCOGWriter as COGWriter  # the engine's own writer
    from dinov3geo.io.grid import GridSpec

    st = output_settings(model, max(height, width), spec)
    grid = GridSpec(profile["crs"], profile["transform"] * rasterio.Affine.scale(scale), ow, oh)
    with rasterio.Env(GDAL_CACHEMAX=st["gdal_cachemax_mb"]), COGWriter(
            spec["out"], grid, k, "float32", nodata=float("nan"), compress=st["compress"], level=st["level"],
            blocksize=st["blocksize"], overviews=st["overviews"], num_threads=st["num_threads"],
            gdal_cachemax_mb=st["gdal_cachemax_mb"]) as wr:
        wr.write(out, Window(0, 0, ow, oh))
    end = time.perf_counter()
    alloc.__exit__(None, None, None)
    Path(spec["out"]).unlink()
    return {"seconds": end - t0, "write_seconds": end - t_write, "windows": n,
            "missing_px": int((cnt == 0).sum()), "output_settings": st}


HANDLERS = {"engine": child_engine, "model_only": child_model_only, "torchgeo": child_torchgeo}


# ---------------------------------------------------------------------------------------------- main
def _best(runs: list[dict[str, Any]]) -> float:
    return min(r["seconds"] for r in runs)


def _median(runs: list[dict[str, Any]]) -> float:
    return statistics.median(r["seconds"] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=20000, help="side of the large raster (px)")
    ap.add_argument("--small-size", type=int, default=5000, help="side of the small raster for the RSS ratio")
    ap.add_argument("--workdir", default="/tmp/dinov3geo-bench-inference")
    ap.add_argument("--arch", default="vits16", help="DINOv3 arch (random weights); 'none': data path only (a "
                    "near-free stand-in model with the same output shape), the regime of a fast GPU")
    ap.add_argument("--rss-arch", help="arch for the RSS runs on both rasters (default: --arch; the throughput "
                    "engine runs then give the large-raster RSS)")
    ap.add_argument("--head-bands", type=int, default=0, help="1x1 conv head to this many bands (0: features)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--amp", default=default_amp(), choices=["bf16", "none"],
                    help="autocast on CPU (default: bf16 only where the CPU runs it natively)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the timed runs (best is used)")
    ap.add_argument("--tg-workers", type=int, default=1, help="DataLoader workers for the torchgeo run")
    ap.add_argument("--read-threads", type=int, help="engine reader threads (default: the engine's, 1 on CPU)")
    ap.add_argument("--skip-torchgeo", action="store_true")
    ap.add_argument("--data-path-size", type=int, default=8192,
                    help="with a backbone (--arch other than none): also compare engine and torchgeo with the "
                         "stand-in model on a raster of this side, the regime of a GPU, where both are not "
                         "model-bound (0: skip)")
    ap.add_argument("--rss-only", action="store_true", help="only the two RSS runs (engine on the large and the "
                    "small raster), e.g. for 20000^2 vs 5000^2 with a ViT-S, where a throughput run takes minutes")
    ap.add_argument("--no-fair-allocator", action="store_true",
                    help="run the floors without the engine's allocator setting (glibc keeps freed memory); by "
                         "default every side gets it")
    ap.add_argument("--keep", action="store_true", help="keep the generated rasters")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(HANDLERS, args.child)
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    big, small = work / f"region_{args.size}.tif", work / f"region_{args.small_size}.tif"
    base = {"arch": args.arch, "head_bands": args.head_bands, "window": args.window, "overlap": args.overlap,
            "batch": args.batch, "amp": None if args.amp == "none" else args.amp, "threads": args.threads,
            "tg_workers": args.tg_workers, "read_threads": args.read_threads,
            "fair_allocator": not args.no_fair_allocator}
    try:
        for p, s in ((big, args.size), (small, args.small_size)):
            log(f"generating {p} ({s}^2 x 4 uint16, {s * s * 8 / 1e9:.2f} GB raw)")
            generate(p, s)
        mp = args.size**2 / 1e6
        res: dict[str, Any] = {"env": environment(), "args": vars(args), "megapixels": mp}
        floor_runs: list[dict[str, Any]] = []
        eng_runs: list[dict[str, Any]] = []
        tg_runs: list[dict[str, Any]] = []
        if args.rss_only:
            spec = {**base, "arch": args.rss_arch or args.arch, "kind": "engine"}
            runs = {s: run_child(HERE, {**spec, "raster": str(p), "out": str(work / f"rss_{s}.tif")})
                    for p, s in ((big, args.size), (small, args.small_size))}
            for s, r in runs.items():
                log(f"RSS run ({spec['arch']}) on {s}^2: {r['peak_rss_mib']:.0f} MiB, {r['seconds']:.0f} s")
            ratio = runs[args.size]["peak_rss_mib"] / runs[args.small_size]["peak_rss_mib"]
            growth = {s: r["peak_rss_mib"] - r["base_rss_mib"] for s, r in runs.items()}
            print_table([[f"engine {s}^2", s * s / 1e6 / r["seconds"], r["peak_rss_mib"], None,
                          f"growth over imports + model load {growth[s]:.0f} MiB"]
                         for s, r in runs.items()] + [["large / small", None, None, ratio,
                                                       f"<= {GOAL_RSS}: {'met' if ratio <= GOAL_RSS else 'NOT met'}"],
                                                      ["  growth large / small", None, None,
                                                       growth[args.size] / growth[args.small_size], "(information)"]],
                        ["run", "MP/s", "peak RSS MiB", "ratio", "goal"],
                        title=f"peak RSS, {spec['arch']} {args.amp}, window {args.window}, batch {args.batch}")
            if args.json:
                write_json(args.json, {**res, "rss_large": runs[args.size], "rss_small": runs[args.small_size],
                                       "rss_ratio": ratio,
                                       "rss_growth_ratio": growth[args.size] / growth[args.small_size]})
            return
        for rep in range(args.repeats):
            # interleaved, so that load from other processes on a shared machine hits all of them alike
            floor_runs.append(run_child(HERE, {**base, "kind": "model_only", "size": args.size}))
            log(f"[{rep + 1}/{args.repeats}] model only {floor_runs[-1]['seconds']:.1f} s "
                f"({floor_runs[-1]['windows']} windows)")
            eng_runs.append(run_child(HERE, {**base, "kind": "engine", "raster": str(big),
                                             "out": str(work / "engine.tif")}))
            log(f"[{rep + 1}/{args.repeats}] engine {eng_runs[-1]['seconds']:.1f} s")
            if not args.skip_torchgeo:
                tg_runs.append(run_child(HERE, {**base, "kind": "torchgeo", "raster": str(big),
                                                "out": str(work / "tg.tif")}))
                log(f"[{rep + 1}/{args.repeats}] torchgeo {tg_runs[-1]['seconds']:.1f} s")
        dp_eng: list[dict[str, Any]] = []
        dp_tg: list[dict[str, Any]] = []
        if args.data_path_size and args.arch != "none" and not args.skip_torchgeo:
            dp = work / f"region_{args.data_path_size}.tif"
            generate(dp, args.data_path_size)
            dp_base = {**base, "arch": "none", "raster": str(dp)}
            for rep in range(args.repeats):
                dp_eng.append(run_child(HERE, {**dp_base, "kind": "engine", "out": str(work / "dp_engine.tif")}))
                dp_tg.append(run_child(HERE, {**dp_base, "kind": "torchgeo", "out": str(work / "dp_tg.tif")}))
                log(f"[{rep + 1}/{args.repeats}] data path {args.data_path_size}^2: engine "
                    f"{dp_eng[-1]['seconds']:.1f} s, torchgeo {dp_tg[-1]['seconds']:.1f} s")
        rss_spec = {**base, "arch": args.rss_arch or args.arch, "kind": "engine"}
        if args.rss_arch and args.rss_arch != args.arch:
            rss_big = run_child(HERE, {**rss_spec, "raster": str(big), "out": str(work / "rss.tif")})
            log(f"RSS run ({rss_spec['arch']}) on {args.size}^2: {rss_big['peak_rss_mib']:.0f} MiB")
        else:
            rss_big = max(eng_runs, key=lambda r: r["peak_rss_mib"])
        rss_small = run_child(HERE, {**rss_spec, "raster": str(small), "out": str(work / "rss_small.tif")})
        log(f"RSS run ({rss_spec['arch']}) on {args.small_size}^2: {rss_small['peak_rss_mib']:.0f} MiB")
        res.update(model_only=floor_runs, engine=eng_runs, torchgeo=tg_runs, rss_large=rss_big, rss_small=rss_small)

        floor_s, eng_s = _best(floor_runs), _best(eng_runs)
        ratio, ratio_med = floor_s / eng_s, _median(floor_runs) / _median(eng_runs)
        rss_ratio = rss_big["peak_rss_mib"] / rss_small["peak_rss_mib"]
        growth_big = rss_big["peak_rss_mib"] - rss_big["base_rss_mib"]
        growth_small = rss_small["peak_rss_mib"] - rss_small["base_rss_mib"]
        growth_ratio = growth_big / max(growth_small, 1e-9)
        busy = [r["stats"]["model_seconds"] / r["seconds"] for r in eng_runs]
        rows: list[list[Any]] = [
            ["model only (tensors in memory, same windows)", mp / floor_s, None, None, "floor"],
            ["engine: predict_raster -> COG", mp / eng_s, max(r["peak_rss_mib"] for r in eng_runs), ratio,
             f">= {GOAL_RATIO}: {'met' if ratio >= GOAL_RATIO else 'NOT met'} (medians: {ratio_med:.3f})"],
            ["engine: time in model calls / wall", None, None, max(busy),
             f"COG finish {min(r['stats']['finish_seconds'] for r in eng_runs):.1f} s"],
            [f"RSS runs ({rss_spec['arch']}): {args.size}^2 vs {args.small_size}^2", None,
             f"{rss_big['peak_rss_mib']:.0f} / {rss_small['peak_rss_mib']:.0f}", rss_ratio,
             f"<= {GOAL_RSS}: {'met' if rss_ratio <= GOAL_RSS else 'NOT met'}"],
            ["  growth over imports + model load", None, f"{growth_big:.0f} / {growth_small:.0f}", growth_ratio,
             "(information)"],
        ]
        res.update(ratio_best=ratio, ratio_median=ratio_med, rss_ratio=rss_ratio, engine_model_busy=busy,
                   rss_growth_ratio=growth_ratio, fair_allocator=not args.no_fair_allocator)
        if tg_runs:
            speedup, speed_med = _best(tg_runs) / eng_s, _median(tg_runs) / _median(eng_runs)
            res.update(torchgeo_speedup_best=speedup, torchgeo_speedup_median=speed_med)
            tg_write = min(r["write_seconds"] for r in tg_runs)
            eng_finish = min(r["stats"]["finish_seconds"] for r in eng_runs)
            rows.append(["torchgeo: RasterDataset + GridGeoSampler + stitch + the engine's COG writer",
                         mp / _best(tg_runs), max(r["peak_rss_mib"] for r in tg_runs), None,
                         f"engine {speedup:.2f}x faster (median {speed_med:.2f}x; goal >= {GOAL_TORCHGEO}: "
                         f"{'met' if speedup >= GOAL_TORCHGEO else 'NOT met'})"])
            rows.append(["  output step alone: torchgeo write / engine COG finish", None, None, None,
                         f"{tg_write:.1f} s / {eng_finish:.1f} s (settings: {tg_runs[0]['output_settings']})"])
        if dp_eng:
            dmp = args.data_path_size**2 / 1e6
            dsp, dsp_med = _best(dp_tg) / _best(dp_eng), _median(dp_tg) / _median(dp_eng)
            res.update(data_path_engine=dp_eng, data_path_torchgeo=dp_tg, data_path_speedup_best=dsp,
                       data_path_speedup_median=dsp_med)
            rows.append([f"data path ({args.data_path_size}^2, stand-in model): engine vs torchgeo",
                         f"{dmp / _best(dp_eng):.2f} vs {dmp / _best(dp_tg):.2f}", None, dsp,
                         f"engine {dsp:.2f}x faster (median {dsp_med:.2f}x; goal >= {GOAL_TORCHGEO}: "
                         f"{'met' if dsp >= GOAL_TORCHGEO else 'NOT met'})"])
        print_table(rows, ["run", "MP/s (best)", "peak RSS MiB", "ratio", "goal"],
                    title=f"{args.size}^2 x 4 uint16, {args.arch} {args.amp}, window {args.window}, overlap "
                          f"{args.overlap}, batch {args.batch}, {args.threads} threads, best of {args.repeats}; "
                          f"allocator setting on every side: {not args.no_fair_allocator}")
        if args.json:
            write_json(args.json, res)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
