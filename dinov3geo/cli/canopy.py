"""``dinov3geo canopy ...``: canopy-height actions (``evaluate``, ``summarise``; more register the same way).

Each action is a ``_register_<name>(actions)`` function adding one sub-subcommand to the ``canopy`` group and
setting its ``func``; add new actions (``train``, ``predict``) to :data:`ACTIONS`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _register_evaluate(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "evaluate",
        help="compare a predicted canopy-height raster with a reference CHM (metrics.json + plots)",
        description="Read the prediction window by window, align the reference CHM (any CRS/resolution) onto "
        "each window through the georeferencing, and write metrics.json (MAE, RMSE, R², block R², bias, nMAE, "
        "per-height-bin metrics, tree-cover IoU), pred_vs_true.png and error_by_bin.png into --out.",
    )
    p.add_argument("--pred", required=True, help="predicted canopy height raster (metres)")
    p.add_argument("--truth", required=True, help="reference canopy height model (e.g. lidar CHM)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--aoi", default=None, help="only pixels inside these polygons (GeoPackage, GeoJSON...)")
    p.add_argument("--split-mask", default=None, help="only pixels where this raster is non-zero")
    p.add_argument("--band", type=int, default=1, help="1-based height band of --pred (default 1)")
    p.add_argument("--truth-band", type=int, default=1, help="1-based height band of --truth (default 1)")
    p.add_argument("--truth-crs", default=None, help="CRS to assume when --truth has none")
    p.add_argument("--window", type=int, default=256, help="window (tile) size in pixels, one tile per block R²")
    p.add_argument("--block", type=int, default=50, help="block size in pixels for the block R² (default 50)")
    p.add_argument("--border", type=int, default=3, help="tile border dropped before the blocks (default 3)")
    p.add_argument("--bins", type=_floats, default=None, help="height-bin edges, e.g. 0,2,5,10,15,20,30,60")
    p.add_argument("--negative", choices=("clip", "invalid", "keep"), default="clip",
                   help="negative reference heights: clip to 0 (default), mark invalid, or keep")
    p.add_argument("--json", action="store_true", help="print the full metrics as JSON")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from dinov3geo.tasks.canopy.evaluate import evaluate_rasters
    from dinov3geo.tasks.canopy.metrics import DEFAULT_BINS

    m = evaluate_rasters(
        args.pred, args.truth, args.out, aoi=args.aoi, split_mask=args.split_mask, band=args.band,
        truth_band=args.truth_band, truth_crs=args.truth_crs, window=args.window, block=args.block,
        border=args.border, bins=args.bins or DEFAULT_BINS, negative=args.negative, progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(m, indent=2))
    elif not args.quiet:
        def f(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        print(f"pixels {m['n']:,}  MAE {f(m['mae'])} m  RMSE {f(m['rmse'])} m  bias {f(m['bias'])} m  "
              f"R² {f(m['r2'])}  block R² {f(m['block_r2'])} ({m['n_blocks']} blocks)")
        for k, c in m["cover"].items():
            print(f"tree cover >= {k} m: IoU {f(c['iou'])}")
        print(f"written: {m['outputs']['metrics']}, {m['outputs']['pred_vs_true']}, {m['outputs']['error_by_bin']}")
    return 0


def _register_summarise(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "summarise",
        help="per-polygon mean/p95 height, canopy cover, valid share and area -> GeoPackage + CSV",
        description="Summarise a canopy-height raster inside each AOI polygon, reading only the windows the "
        "polygons cover.",
    )
    p.add_argument("raster", help="canopy height raster (metres)")
    p.add_argument("--aoi", required=True, help="polygons (GeoPackage, GeoJSON, Shapefile...)")
    p.add_argument("--out-gpkg", default=None, help="output GeoPackage")
    p.add_argument("--out-csv", default=None, help="output CSV (no geometry)")
    p.add_argument("--band", type=int, default=1, help="1-based height band")
    p.add_argument("--cover-threshold", type=float, default=5.0, help="canopy cover height in m (default 5)")
    p.set_defaults(func=run_summarise)


def run_summarise(args: argparse.Namespace) -> int:
    from dinov3geo.tasks.canopy.summary import summarise_heights

    if args.out_gpkg is None and args.out_csv is None:
        raise ValueError("give --out-gpkg and/or --out-csv")
    gdf = summarise_heights(args.raster, args.aoi, args.out_gpkg, args.out_csv, band=args.band,
                            cover_threshold=args.cover_threshold)
    if not args.quiet:
        print(f"{len(gdf)} polygon(s) summarised -> {', '.join(p for p in (args.out_gpkg, args.out_csv) if p)}")
    return 0


def _register_train(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "train",
        help="train a canopy-height head on frozen backbone features from image + CHM rasters",
        description="Read image + canopy-height-model pairs onto one working grid, split them into spatially "
        "separate train/val/test blocks, train a DPT or light head on the frozen backbone (features cached), "
        "and write model.pt (best validation MAE), last.pt (resume), history.json and, with a test split, "
        "eval_<pair>/metrics.json + plots. See dinov3geo.tasks.canopy.train for every config key.",
    )
    p.add_argument("config", help="YAML config (sections data, split, model, train; keys out, resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--out", default=None, help="output folder (overrides the config's out)")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from dinov3geo.tasks.canopy.train import train_canopy

    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    r = train_canopy(args.config, overrides, progress=not args.quiet)
    if not args.quiet:
        v = r.best_val
        print(f"model: {r.model_path} (best epoch {r.best_epoch}"
              + (f", val MAE {v['mae']:.2f} m" if v and v.get("mae") is not None else "") + ")")
        for name, m in r.test.items():
            print(f"test blocks of {name}: MAE {m['mae']:.2f} m  RMSE {m['rmse']:.2f} m  R² {m['r2']:.3f}  "
                  f"bias {m['bias']:.2f} m  -> {m['outputs']['metrics']}")
    return 0


def _register_predict(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "predict",
        help="map canopy height of a region -> COG (height + uncertainty bands, metres)",
        description="Run a canopy model over imagery with blended sliding windows (out of core, resumable) and "
        "write a float32 COG with bands height and height_std (metres), nodata and CRS of the input. Use a "
        "dinov3geo canopy model (--model) or Meta's CHMv2 files (--chmv2-backbone + --chmv2-head).",
    )
    p.add_argument("--image", required=True, nargs="+", help="image raster(s) (several: a mosaic), STAC item or tile store")
    p.add_argument("--model", default=None, help="dinov3geo canopy model (model.pt from `canopy train`)")
    p.add_argument("--chmv2-backbone", default=None, help="Meta's dinov3_vitl16_pretrain_sat493m-*.pth")
    p.add_argument("--chmv2-head", default=None, help="Meta's CHMv2 DPT head file")
    p.add_argument("--aoi", default=None, help="only map inside these polygons (GeoPackage, GeoJSON...; any CRS)")
    p.add_argument("--summary", default=None,
                   help="with --aoi: per-polygon summary (mean/p95 height, cover >= 5 m, area ha) -> .gpkg + .csv")
    p.add_argument("--out", required=True, help="output COG")
    p.add_argument("--bands", default=None, help="comma-separated input bands (default: the model's)")
    p.add_argument("--window", type=int, default=512, help="window side in pixels (multiple of 32)")
    p.add_argument("--overlap", type=int, default=None, help="window overlap in pixels (default a quarter window)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:0...")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16 or none")
    p.add_argument("--keep-resolution", action="store_true",
                   help="do not resample the image to the model's training GSD")
    p.add_argument("--no-resume", action="store_true", help="start afresh instead of continuing a killed run")
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from dinov3geo.tasks.canopy.predict import predict_canopy

    image = args.image[0] if len(args.image) == 1 else list(args.image)
    out = predict_canopy(
        args.model, image, args.out, aoi=args.aoi, summary=args.summary, chmv2_backbone=args.chmv2_backbone,
        chmv2_head=args.chmv2_head, bands=args.bands.split(",") if args.bands else None, window=args.window,
        overlap=args.overlap, batch_size=args.batch_size, device=args.device,
        amp=None if args.amp == "none" else args.amp, resample_to_model_gsd=not args.keep_resolution,
        resume=not args.no_resume, progress=not args.quiet,
    )
    if not args.quiet:
        print(f"canopy height map: {out} (bands height, height_std; metres)")
        if args.summary:
            print(f"per-polygon summary: {Path(args.summary).with_suffix('.gpkg')}, "
                  f"{Path(args.summary).with_suffix('.csv')}")
    return 0


#: The ``canopy`` actions, in help order.
ACTIONS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_train, _register_predict, _register_evaluate, _register_summarise,
]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``canopy`` command group to the top-level subparsers."""
    p = sub.add_parser(
        "canopy",
        help="canopy height: train heads, map regions, evaluate against reference CHMs, per-polygon summaries",
        description="Canopy-height tools. Run `dinov3geo canopy ACTION --help` for each action.",
    )
    actions = p.add_subparsers(dest="canopy_action", metavar="ACTION")
    for add in ACTIONS:
        add(actions)

    def _help(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_help)
