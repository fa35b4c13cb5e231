"""Memory and kernel time of the change and land-cover heads and of feature extraction at region scale on CPU
(issue 21, last bullet).

Run from the repository root::

    .venv/bin/python benchmarks/head_memory.py                         # tiny + ViT-L, 1024^2, batches 1 2 4
    .venv/bin/python benchmarks/head_memory.py --models tiny --big     # + 4096^2 at the defaults (tiny)
    .venv/bin/python benchmarks/head_memory.py --tasks change --models vitl --big --big-models vitl   # long
    .venv/bin/python benchmarks/head_memory.py --tasks features --models vitl --layers 5 11 17 23

The companion of ``canopy_memory.py`` (same measurement, same helpers) for the two other heads that upsample
to full resolution:

1. **Models** (cached in ``--workdir``), random weights, saved in the formats their loaders read. ``tiny``: a
   4-block, 64-wide DINOv3 backbone (``vit_tiny_test``); ``vitl``: ViT-L/16 (``vitl16``, 24 blocks, 1024 wide).
   ``change``: :class:`~dinov3geo.tasks.change.head.ChangeHead` with ``dinov3geo change train``'s defaults
   (4 blocks, hidden 64, learned x2 upsampling 64 -> 32 -> 16 -> 16 -> 16 channels, 16-channel full-resolution
   detail branch), written by ``save_change_model`` (backbone embedded). ``landcover``: the dense head with
   image detail (:class:`~dinov3geo.tasks.landcover.heads.DenseHead`, ``landcover train``'s defaults: 4 levels,
   hidden 64, 16 detail channels; 8 classes), written by ``save_landcover_model``. ``features``: the backbone
   alone (``save_backbone``), its ``--layers`` (default the last) tapped by ``extract_features``.
2. **Images**: a ``--size``\\ :sup:`2` crop (default 1024) of the NEON RGB in ``data/`` (or ``../shared/data``),
   and with ``--big`` a ``--big-size``\\ :sup:`2` (default 4096) mosaic of mirrored copies of it. The change
   runs pair it with an "after" date on the same grid: the same pixels with the central quarter (side / 2)
   mirrored top-bottom and darkened, so there is change to find and no misregistration.
3. **Runs**, each in a fresh process: load the model (``load_change_model`` / ``LandcoverRasterModel
   .from_checkpoint``), reset the peak-RSS mark (``/proc/self/clear_refs``), then the task's region call:
   ``detect_change(method="head")`` (coregistration, the engine, thresholding, regions, polygons, summary) or
   ``predict_landcover(image_detail dense head)`` (probabilities through the engine into an intermediate file,
   then the class map; ``--keep-probabilities``: also kept as a COG with overviews, as ``--probabilities`` does), or
   ``extract_features(pca=True)`` (the engine into a feature GeoTIFF, its copy into the Zarr store, the PCA COG
   and PNG; the loaded backbone passed as ``weights``), window
   ``--window``. Measured: wall time, the engine's part of it (``engine s``: the model over all windows and the
   blended probability COG; the rest is coregistration and post-processing, or the class map), throughput
   (image px / s), user and system CPU time and minor page faults of the process during the call, and the
   **peak RSS growth** over the RSS after imports and model load. At the
   **defaults** and at every ``--batches`` size. The defaults (column ``run``: ``defaults (auto)``) are the
   automatic batch, :func:`dinov3geo.inference.batching.choose_batch_size` from the model's
   ``memory_estimate`` and the engine's own buffers (what ``batch_size=None`` does). With ``--big`` the defaults also run
   on the big image for each of ``--big-models``.
   A random-weight change head gives salt-and-pepper probabilities around 0.5 (1-99 % quantiles 0.35-0.66 on the
   1024^2 pair): at its own threshold (0.5) half the pixels are "change", in ~376,000 regions at 4096^2, and the
   region / polygon post-processing (not the head) then takes most of the time (over 25 minutes single-threaded
   at 4096^2). ``--threshold 0.9`` maps the little change a trained model would find, so that the post-processing
   costs what it does in practice; the head's part is the same at any threshold.
4. **Same map**: every output (change probability, class probabilities) is compared with the first one of its
   task, model and size (max absolute difference).
5. **Goals** (printed): peak RSS growth <= 1 GiB at the defaults with the ViT-L layout; system time <= 10 % of
   user time; throughput at the defaults at least that of every other batch size tried (ratio >= 1 up to the
   run-to-run noise, printed with ``--repeats`` > 1; the explicit run of the defaults' own batch size is the
   same computation and is pooled with the defaults).

``--repeats N`` runs everything N times, interleaved; the fastest run of each configuration is reported with
the spread (slowest / fastest) and the 1-minute load average at its end (``load``: on a machine shared with
other jobs wall and even user time grow with it).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import child_main, current_rss_mib, environment, log, print_table, run_child, write_json
from canopy_memory import _reset_peak, cpu_model, make_image

HERE = Path(__file__).resolve()
GOAL_GROWTH_MIB = 1024.0
GOAL_SYS_USER = 0.10
CLASSES = ["forest", "grass", "water", "built", "crop", "bare", "wetland", "shrub"]
TASKS = ("change", "landcover", "features")


# ---------------------------------------------------------------------------------------------- inputs
def make_after(before: Path) -> Path:
    """The "after" date of ``before``: its central quarter mirrored top-bottom and darkened (same grid)."""
    import rasterio

    path = before.with_name(before.stem + "_after.tif")
    if path.exists():
        return path
    with rasterio.open(before) as ds:
        arr = ds.read()
        profile = ds.profile
    _, h, w = arr.shape
    r0, r1, c0, c1 = h // 4, h - h // 4, w // 4, w - w // 4
    arr[:, r0:r1, c0:c1] = (arr[:, r0:r1, c0:c1][:, ::-1, :] * 0.6).astype(arr.dtype)
    tmp = path.with_suffix(".tmp.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(arr)
    os.replace(tmp, path)
    return path


def _backbone(name: str) -> Any:
    from dinov3geo.models import build_backbone

    if name == "tiny":
        return build_backbone("vit_tiny_test", depth=4, num_heads=4).eval()
    if name == "vitl":
        return build_backbone("vitl16").eval()
    raise ValueError(f"unknown model {name!r}; choose tiny or vitl")


def make_model(work: Path, task: str, name: str) -> Path:
    """A ``task`` model file with random weights for backbone ``name`` (see the module docstring)."""
    import torch

    path = work / f"{task}_{name}{'.pth' if task == 'features' else '.pt'}"
    if path.exists():
        return path
    torch.manual_seed(0)
    bb = _backbone(name)
    if task == "change":
        from dinov3geo.models.taps import tap_widths
        from dinov3geo.tasks.change.head import ChangeHead, ChangeModel, save_change_model
        from dinov3geo.tasks.change.zeroshot import resolve_layers

        layers = resolve_layers(bb, 4)
        widths = tap_widths(bb, layers)
        head = ChangeHead(widths[0], len(layers), int(bb.patch_size), 3, hidden=64, detail_channels=16)
        model = ChangeModel(bb, head, layers).eval()
        save_change_model(model, path, bands=["red", "green", "blue"], value_scale=1 / 255,
                          mean=[0.43, 0.44, 0.34], std=[0.2, 0.18, 0.18], threshold=0.5)
    elif task == "landcover":
        from dinov3geo.tasks.landcover.classes import ClassTable
        from dinov3geo.tasks.landcover.heads import (
            DenseHead,
            LandcoverModel,
            default_taps,
            level_channels,
            save_landcover_model,
        )

        layers = default_taps(bb, 4)
        head = DenseHead(level_channels(bb, layers), len(CLASSES), n_levels=4, hidden=64,
                         patch_size=int(bb.patch_size), image_detail=True, in_bands=3, detail_channels=16)
        model = LandcoverModel(bb, head, ClassTable.from_labels(CLASSES), layers).eval()
        save_landcover_model(path, model, bands=["red", "green", "blue"], mean=[0.43, 0.44, 0.34],
                             std=[0.2, 0.18, 0.18], value_scale=1 / 255, gsd=0.1, backbone_source=f"random:{name}")
    elif task == "features":
        from dinov3geo.models import save_backbone

        save_backbone(bb, path)
        model = bb
    else:
        raise ValueError(f"unknown task {task!r}")
    del bb, model
    gc.collect()
    return path


# ---------------------------------------------------------------------------------------------- child
def _resolved_batch(rm: Any, window: int, batch: int | None) -> tuple[int, float, str]:
    """The batch a run uses, the model's memory estimate for it (MiB) and where it came from: ``auto`` (what the
    task's ``batch_size=None`` chooses: :func:`dinov3geo.inference.batching.choose_batch_size`) or ``explicit``."""
    from dinov3geo.inference.batching import choose_batch_size, memory_estimator

    used = choose_batch_size(rm, window, "cpu", batch)  # every task's model has a memory estimate
    return used, memory_estimator(rm)(window, used) / 2**20, "explicit" if batch is not None else "auto"


def child_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the model, then time the task's region call on the image (see the module docstring)."""
    import rasterio
    import torch

    window, batch = int(spec["window"]), spec["batch"]
    if spec["task"] == "change":
        from dinov3geo.tasks.change.detect import detect_change
        from dinov3geo.tasks.change.head import load_change_model

        rm = load_change_model(spec["model"])
    elif spec["task"] == "landcover":
        from dinov3geo.tasks.landcover.predict import LandcoverRasterModel, predict_landcover

        rm, _ = LandcoverRasterModel.from_checkpoint(spec["model"])
    else:
        from dinov3geo.models import load_backbone
        from dinov3geo.tasks.features import MultiLayerFeatures, extract_features, normalisation_for

        bb = load_backbone(spec["model"]).eval()  # loaded before the measurement, as the other tasks' models
        vs, m, s = normalisation_for(bb, "uint8")
        rm = MultiLayerFeatures(bb, spec.get("layers") or [-1], value_scale=vs, mean=m, std=s)
    used, estimate, source = _resolved_batch(rm, window, batch)
    gc.collect()
    base = current_rss_mib()
    reset = _reset_peak()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    kw: dict[str, Any] = {"window": window, "device": "cpu", "progress": False}
    if source == "explicit":  # else the task chooses the same batch itself (batch_size=None)
        kw["batch_size"] = used
    if spec["task"] == "change":
        res = detect_change(spec["image"], spec["after"], spec["out"], method="head", model=rm, sidecars=False,
                            threshold=spec.get("threshold"), **kw)
        engine_s = res.timings.get("model")
    elif spec["task"] == "features":
        extract_features(spec["image"], spec["out"], weights=bb, layers=spec.get("layers") or [-1],
                         pca=True, sidecars=False, **kw)
        engine_s = None
    else:
        stats: dict[str, Any] = {}
        predict_landcover(rm, spec["image"], spec["out"], probabilities=spec.get("probs"), resume=False, stats=stats,
                          sidecars=False, **kw)
        engine_s = stats.get("seconds")
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    with rasterio.open(spec["image"]) as ds:
        pixels = ds.width * ds.height
    return {
        "wall_s": wall, "user_s": ru1.ru_utime - ru0.ru_utime, "sys_s": ru1.ru_stime - ru0.ru_stime,
        "minflt": ru1.ru_minflt - ru0.ru_minflt, "base_rss_mib": base, "growth_mib": hwm - base,
        "peak_reset": reset, "px_per_s": pixels / wall, "engine_s": engine_s, "batch": used, "estimate_mib": estimate,
        "default_source": source, "torch_threads": torch.get_num_threads(), "load1": os.getloadavg()[0],
    }


HANDLERS = {"run": child_run}


def compare(a: str, b: str) -> float:
    """Max |a - b| over all bands and the pixels finite in both (rasters, or feature Zarr stores)."""
    import rasterio

    if a.endswith(".zarr"):
        import xarray as xr

        with xr.open_zarr(a, consolidated=False) as da, xr.open_zarr(b, consolidated=False) as db:
            x, y = da["features"].values.astype(np.float64), db["features"].values.astype(np.float64)
    else:
        with rasterio.open(a) as ra, rasterio.open(b) as rb:
            x, y = ra.read().astype(np.float64), rb.read().astype(np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    return float(np.abs(x[ok] - y[ok]).max()) if ok.any() else float("nan")


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--models", nargs="+", default=["tiny", "vitl"], choices=["tiny", "vitl"])
    ap.add_argument("--size", type=int, default=1024, help="side of the NEON crop for all runs (default 1024)")
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 2, 4], help="explicit batch sizes tried")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threshold", type=float, default=None,
                    help="change: probability threshold (default: the model's, 0.5; see the module docstring)")
    ap.add_argument("--big", action="store_true", help="also run the defaults on a --big-size image")
    ap.add_argument("--big-size", type=int, default=4096)
    ap.add_argument("--big-models", nargs="+", default=["tiny"], choices=["tiny", "vitl"],
                    help="models run on the big image (ViT-L at 4096^2 takes hours on 2 cores)")
    ap.add_argument("--keep-probabilities", action="store_true",
                    help="land cover: also keep the class probabilities (a COG with overviews; compared across runs) "
                    "instead of the default intermediate file (the class maps are compared)")
    ap.add_argument("--layers", nargs="+", type=int, default=[-1],
                    help="features: the blocks tapped (default the last; e.g. 5 11 17 23 for four ViT-L blocks)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/dinov3geo-head-memory")
    ap.add_argument("--json", default=None, help="write every number here")
    ap.add_argument("--clean", action="store_true", help="delete the workdir (models, images) at the end")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(HANDLERS, args.child)
        return

    import torch

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cpu, cap = cpu_model(), torch.backends.cpu.get_cpu_capability()
    print(f"CPU: {cpu}; torch {torch.__version__}, CPU capability {cap}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} logical CPUs", flush=True)
    sizes = [args.size] + ([args.big_size] if args.big else [])
    images = {s: make_image(work / f"neon_{s}.tif", s) for s in sizes}
    afters = {s: make_after(p) for s, p in images.items()} if "change" in args.tasks else {}
    names = sorted(set(args.models) | (set(args.big_models) if args.big else set()))
    files = {(t, m): make_model(work, t, m) for t in args.tasks for m in names}

    configs: list[dict[str, Any]] = []
    for t in args.tasks:
        for m in args.models:
            runs = [("defaults", None)] + [(f"batch {b}", b) for b in args.batches]
            configs += [{"task": t, "model": m, "size": args.size, "label": lab, "batch": b} for lab, b in runs]
        if args.big:
            configs += [{"task": t, "model": m, "size": args.big_size, "label": "defaults", "batch": None}
                        for m in args.big_models]

    results: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(configs))}
    for rep in range(args.repeats):
        order = list(range(len(configs)))
        order = order[rep % len(order):] + order[: rep % len(order)]  # rotated: no configuration always runs first
        for i in order:
            c = configs[i]
            keep = work / (f"out_{i}_r{rep}.zarr" if c["task"] == "features" else f"out_{i}_r{rep}.tif")
            spec = {"kind": "run", "task": c["task"], "model": str(files[(c["task"], c["model"])]),
                    "image": str(images[c["size"]]), "window": args.window, "batch": c["batch"]}
            if c["task"] == "change":
                out = work / f"change_{i}"
                shutil.rmtree(out, ignore_errors=True)
                spec.update(after=str(afters[c["size"]]), out=str(out), threshold=args.threshold)
            elif c["task"] == "features":
                out = work / f"features_{i}.zarr"
                spec.update(out=str(out), layers=args.layers)
            else:
                out = work / f"classes_{i}.tif"
                spec.update(out=str(out), probs=str(work / f"probs_{i}.tif") if args.keep_probabilities else None)
            try:
                r = run_child(HERE, spec)
            except RuntimeError as e:  # one failed run does not lose the others
                log(f"[{rep + 1}/{args.repeats}] {c['task']} {c['model']} {c['size']}^2 {c['label']} FAILED: {e}")
                continue
            shutil.rmtree(keep, ignore_errors=True)
            os.replace(out / "change_prob.tif" if c["task"] == "change"
                       else work / f"probs_{i}.tif" if c["task"] == "landcover" and args.keep_probabilities
                       else out, keep)
            if c["task"] == "change":
                shutil.rmtree(out, ignore_errors=True)
            for extra in (work / f"features_{i}_pca.png", work / f"features_{i}_pca.tif"):
                extra.unlink(missing_ok=True)
            r["out"] = str(keep)
            results[i].append(r)
            log(f"[{rep + 1}/{args.repeats}] {c['task']} {c['model']} {c['size']}^2 {c['label']} (batch "
                f"{r['batch']}, {r['default_source']}): {r['wall_s']:.1f} s, growth {r['growth_mib']:.0f} MiB, user {r['user_s']:.1f} s, "
                f"sys {r['sys_s']:.1f} s, minflt {r['minflt'] / 1e6:.2f} M, load {r['load1']:.1f}")

    rows, records = [], []
    first: dict[tuple[str, str, int], str] = {}
    for i, c in enumerate(configs):
        rs = results[i]
        if not rs:
            continue
        best = min(rs, key=lambda r: r["wall_s"])
        ref = first.setdefault((c["task"], c["model"], c["size"]), best["out"])
        diff = compare(ref, best["out"]) if ref != best["out"] else 0.0
        spread = max(r["wall_s"] for r in rs) / best["wall_s"]
        growth = max(r["growth_mib"] for r in rs)
        rec = {**c, **best, "growth_mib": growth, "spread": spread, "max_diff": diff}
        records.append(rec)
        label = f"defaults ({best['default_source']})" if c["label"] == "defaults" else c["label"]
        rows.append([c["task"], c["model"], f"{c['size']}^2", label, best["batch"], best["wall_s"],
                     best.get("engine_s"), best["px_per_s"] / 1e3, best["user_s"], best["sys_s"],
                     100 * best["sys_s"] / max(best["user_s"], 1e-9), best["minflt"] / 1e6, growth,
                     best["estimate_mib"], spread, best.get("load1"), f"{diff:.1e}"])
    print_table(rows, ["task", "model", "image", "run", "batch", "wall s", "engine s", "kpx/s", "user s", "sys s", "sys/user %",
                       "minflt M", "RSS growth MiB", "estimate MiB", "spread", "load", "max |diff|"],
                title=f"detect_change(method='head') / predict_landcover(dense + image detail) / extract_features, window "
                      f"{args.window}, CPU ({cpu}, {cap})")

    goals = []
    for t in args.tasks:
        for m in args.models:
            mine = [r for r in records if r["task"] == t and r["model"] == m and r["size"] == args.size]
            default = next((r for r in mine if r["label"] == "defaults"), None)
            if default is None:
                continue
            same = [r for r in mine if r["label"] != "defaults" and r["batch"] == default["batch"]]
            others = [r for r in mine if r["label"] != "defaults" and r["batch"] != default["batch"]]
            if others:
                best_default = max([default, *same], key=lambda r: r["px_per_s"])
                fastest = max(others, key=lambda r: r["px_per_s"])
                ratio = best_default["px_per_s"] / fastest["px_per_s"]
                spread = max(best_default["spread"], fastest["spread"])
                goals.append([f"{t} {m}", f"defaults (batch {default['batch']}) px/s / best other "
                              f"({fastest['label']})", f"{ratio:.2f}", ">= 1 (noise: spread)",
                              "met" if ratio >= 1.0 else f"NOT met (spread {spread:.2f})"])
    worst = max(records, key=lambda r: r["sys_s"] / max(r["user_s"], 1e-9)) if records else None
    sys_ratio = worst["sys_s"] / max(worst["user_s"], 1e-9) if worst else float("nan")
    if worst:
        goals.append(["all", f"max sys/user ({worst['task']} {worst['model']} {worst['size']}^2 {worst['label']})",
                      f"{100 * sys_ratio:.1f} %", "<= 10 %", "met" if sys_ratio <= GOAL_SYS_USER else "NOT met"])
    for r in records:
        if r["model"] == "vitl" and r["label"] == "defaults":
            goals.append([f"{r['task']} vitl {r['size']}^2", "RSS growth at defaults", f"{r['growth_mib']:.0f} MiB",
                          f"<= {GOAL_GROWTH_MIB:.0f} MiB", "met" if r["growth_mib"] <= GOAL_GROWTH_MIB else "NOT met"])
    print_table(goals, ["task / model", "measure", "value", "goal", "status"], title="goals")
    if args.json:
        write_json(args.json, {"environment": {**environment(), "cpu": cpu, "cpu_capability": cap,
                                               "torch": torch.__version__},
                               "args": vars(args), "runs": records, "all_runs": results})
    if args.clean:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
