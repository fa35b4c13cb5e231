"""Canopy height from frozen features vs the classic per-pixel baseline, on real image + CHM pairs.

What one run does (see ``benchmarks/README.md``):

1. **Sites.** NEON BART (10 cm RGB averaged to ``--neon-res``, default 0.25 m; NEON lidar CHM 1 m
   interpolated onto that grid) and the Kootenay drone pair (0.5 m RGB + photogrammetric CHM, native grid).
   Each site grid is cut into square blocks assigned to train / val / test (60/20/20 %, seeded) with a pixel
   buffer between splits (:func:`dinov3geo.tasks.canopy.splits.block_split`): every method sees exactly the
   same split, and the test blocks are never seen in training.
2. **Baseline.** Per-pixel gradient boosting on band values + texture
   (:mod:`dinov3geo.tasks.canopy.baseline`), fit on train + val pixels.
3. **Frozen features.** ``dinov3geo canopy train`` (:func:`dinov3geo.tasks.canopy.train.train_canopy`) with a
   DPT head (binned, CHMv2 mixed-log bins) and a light head on the frozen backbone ``--backbone`` (default:
   the Gram-stage backbone that ``benchmarks/ssl_quality.py`` exports), model selection on val, and the same
   heads on a **random-init** copy of that backbone (same architecture) as a control.
4. **Metrics** on the test blocks, pooled: MAE, RMSE, R², bias, block R² (20 px blocks inside the test area:
   the sites are too small for Tolan et al.'s 50 px blocks), tree-cover IoU at 2 and 5 m
   (:func:`dinov3geo.tasks.canopy.baseline.evaluate_split`, identical for every method).

Prints a Markdown table; ``--json`` writes every number. ``--quick`` is a smoke run (numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SITES = {
    "neon_bart": (DATA / "aerial_rgb_chm/neon_bart_2019/2019_BART_5_320000_4881000_image_crop.tif",
                  DATA / "aerial_rgb_chm/neon_bart_2019/NEON_D01_BART_DP3_320000_4881000_CHM_crop.tif"),
    "kootenay": (DATA / "aerial_rgb_chm/kootenay_drone_2016/kootenayOrtho.tif",
                 DATA / "aerial_rgb_chm/kootenay_drone_2016/kootenayCHM.tif"),
}
DEFAULT_BACKBONE = Path("/tmp/dinov3geo-ssl-quality/run_gram/backbone.pth")
FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
KEYS = ("mae", "rmse", "r2", "bias", "block_r2")


def random_copy(backbone: Path, out: Path, seed: int) -> Path:
    """The same architecture with the official random init (the control without pretraining)."""
    from dinov3geo.models import load_backbone, save_backbone

    torch.manual_seed(seed)
    model = load_backbone(backbone)
    model.init_weights()
    save_backbone(model, out, metadata=model.metadata)
    return out


def run_site(name: str, args: argparse.Namespace, backbones: dict[str, Path], work: Path) -> dict[str, Any]:
    from dinov3geo.tasks.canopy.baseline import (
        evaluate_split,
        fit_baseline,
        predict_baseline,
        prepare_benchmark,
    )
    from dinov3geo.tasks.canopy.train import train_canopy

    image, chm = SITES[name]
    res = args.neon_res if name == "neon_bart" else None
    block, buffer = args.block, args.buffer
    pair, split = prepare_benchmark(image, chm, res=res, block=block, buffer=buffer, fractions=FRACTIONS,
                                    seed=args.seed)
    counts = {n: int((split.mask(n) & pair.valid).sum()) for n in split.names}
    rows: dict[str, Any] = {"grid": pair.info, "split_pixels": counts}

    t0 = time.perf_counter()
    fit_mask = split.mask("train") | split.mask("val")
    base = fit_baseline(pair.image, pair.heights, pair.valid, fit_mask, seed=args.seed)
    pred = predict_baseline(base, pair.image, pair.valid)
    rows["baseline (gradient boosting)"] = _metrics(evaluate_split(pred, pair, split, "test", block=20),
                                                    time.perf_counter() - t0)

    for bname, bpath in backbones.items():
        for head in args.heads:
            out = work / name / f"{bname}_{head}"
            cfg = {
                "data": {"pairs": [{"image": str(image), "chm": str(chm), "name": name}], "target_res": res},
                "split": {"block": block, "buffer": buffer, "fractions": FRACTIONS, "seed": args.seed},
                "model": {"backbone": str(bpath), "head": head, "n_bins": args.bins, "hidden": args.hidden,
                          "output": "bins"},
                "train": {"tile": args.tile, "stride": args.stride, "epochs": args.epochs,
                          "batch_size": args.batch, "lr": args.lr, "augment": not args.no_augment,
                          "eval_window": args.eval_window},
                "out": str(out),
                "resume": False,
            }
            t0 = time.perf_counter()
            r = train_canopy(cfg, progress=not args.quiet)
            with rasterio.open(out / f"eval_{name}" / "chm_pred.tif") as ds:
                hpred = ds.read(1)
            m = evaluate_split(np.nan_to_num(hpred, nan=0.0), pair, split, "test", block=20)
            rows[f"{bname} features + {head} head"] = _metrics(m, time.perf_counter() - t0) | {
                "best_epoch": r.best_epoch}
    return rows


def _metrics(m: dict[str, Any], seconds: float) -> dict[str, Any]:
    out = {k: m.get(k) for k in KEYS}
    out["iou_2m"] = m["cover"]["2"]["iou"] if "2" in m.get("cover", {}) else None
    out["iou_5m"] = m["cover"]["5"]["iou"] if "5" in m.get("cover", {}) else None
    out["n"] = m.get("n")
    out["seconds"] = round(seconds, 1)
    return out


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method and metric: (mean, std) over the seeds."""
    out: dict[str, dict[str, Any]] = {}
    for method in runs[0]:
        if not isinstance(runs[0][method], dict) or "mae" not in runs[0][method]:
            continue
        out[method] = {}
        for k, v in runs[0][method].items():
            vals = [r[method][k] for r in runs if isinstance(r[method].get(k), int | float)]
            if isinstance(v, int | float) and len(vals) == len(runs):
                out[method][k] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan"))
    return out


def _fmt_ms(v: Any) -> str:
    if v is None:
        return "–"
    mean, std = v
    return f"{mean:.2f}" if std == 0 else f"{mean:.2f} ± {std:.2f}"


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", type=Path, default=DEFAULT_BACKBONE,
                    help="pretrained backbone (default: the Gram-stage export of benchmarks/ssl_quality.py)")
    ap.add_argument("--sites", nargs="+", default=list(SITES), choices=list(SITES))
    ap.add_argument("--heads", nargs="+", default=["dpt", "light"], choices=["dpt", "light"])
    ap.add_argument("--no-random", action="store_true", help="skip the random-init control")
    ap.add_argument("--neon-res", type=float, default=0.25)
    ap.add_argument("--block", type=int, default=96, help="split block side (px)")
    ap.add_argument("--buffer", type=int, default=16, help="gap between splits (px)")
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--stride", type=int, default=32, help="training tile stride (px)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--bins", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--eval-window", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="first seed (split + training)")
    ap.add_argument("--seeds", type=int, default=3, help="repeat with seeds seed..seed+N-1; mean ± std reported")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dinov3geo-canopy-quality"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, no augmentation")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.no_augment = 2, True
    torch.set_num_threads(args.threads)
    if not args.backbone.exists():
        print(f"backbone {args.backbone} not found: run `.venv/bin/python benchmarks/ssl_quality.py` first "
              "(it exports it) or pass --backbone PATH", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    backbones = {"SSL": args.backbone}
    if not args.no_random:
        backbones["random-init"] = random_copy(args.backbone, args.workdir / "random_backbone.pth", args.seed)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "sites": {}, "runs": {}}
    first = args.seed
    for site in args.sites:
        runs = []
        for seed in range(first, first + args.seeds):
            args.seed = seed
            runs.append(run_site(site, args, backbones, args.workdir / f"seed{seed}"))
        results["runs"][site] = runs
        results["sites"][site] = _aggregate(runs)
    args.seed = first
    cols = ("mae", "rmse", "r2", "bias", "block_r2", "iou_2m", "iou_5m", "seconds")
    print(f"\n{args.seeds} seed(s); mean ± std over seeds where > 1")
    print("| site | method | MAE (m) | RMSE (m) | R² | bias (m) | block R² (20 px) | IoU ≥2 m | IoU ≥5 m | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for site, rows in results["sites"].items():
        for method, m in rows.items():
            print(f"| {site} | {method} | " + " | ".join(_fmt_ms(m.get(k)) for k in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
