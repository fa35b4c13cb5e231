"""``dinov3geo canopy ...``: canopy-height actions (``evaluate``, ``summarise``; more register the same way).

Each action is a ``_register_<name>(actions)`` function adding one sub-subcommand to the ``canopy`` group and
setting its ``func``; add new actions (``train``, ``predict``) to :data:`ACTIONS`.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from pathlib import Path

from dinov3geo.cli._types import (
    UsageError,
    check_output_parent,
    check_window_memory,
    integer,
    multiple_of,
    number,
    number_list,
    raster_size,
)

#: canopy models take windows that are a multiple of the ViT patch size (they pad to their own multiple)
WINDOW_MULTIPLE = 16
#: the edge margin (px) a canopy model's windows get zero blend weight on (CanopyRasterModel's default)
RECEPTIVE_MARGIN = 32
#: the smallest window a canopy model runs with the default overlap:
#: ``dinov3geo.inference.layout.min_window(1, RECEPTIVE_MARGIN, WINDOW_MULTIPLE)`` (a test keeps them equal)
MIN_WINDOW = 80


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
    p.add_argument("--band", type=integer(1), default=1, help="1-based height band of --pred (default 1)")
    p.add_argument("--truth-band", type=integer(1), default=1, help="1-based height band of --truth (default 1)")
    p.add_argument("--truth-crs", default=None, help="CRS to assume when --truth has none")
    p.add_argument("--window", type=integer(1, 65536), default=256,
                   help="window (tile) size in pixels, one tile per block R² (default 256)")
    p.add_argument("--block", type=integer(1), default=50, help="block size in pixels for the block R² (default 50)")
    p.add_argument("--border", type=integer(0), default=3, help="tile border dropped before the blocks (default 3)")
    p.add_argument("--bins", type=number_list(0, increasing=True), default=None,
                   help="height-bin edges in metres, increasing, e.g. 0,2,5,10,15,20,30,60")
    p.add_argument("--negative", choices=("clip", "invalid", "keep"), default="clip",
                   help="negative reference heights: clip to 0 (default), mark invalid, or keep")
    p.add_argument("--json", action="store_true", help="print the full metrics as JSON")
    p.set_defaults(func=run_evaluate, _check=check_evaluate)


def check_evaluate(args: argparse.Namespace) -> None:
    """Options of ``canopy evaluate`` that must agree (before anything is read)."""
    if 2 * args.border >= args.window:
        raise UsageError(f"--border {args.border} leaves nothing of a --window {args.window} tile: use a border "
                         f"below {(args.window + 1) // 2}")
    check_output_parent("--out", args.out)


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
    p.add_argument("--band", type=integer(1), default=1, help="1-based height band")
    p.add_argument("--cover-threshold", type=number(0), default=5.0, help="canopy cover height in m (default 5)")
    p.set_defaults(func=run_summarise, _check=check_summarise)


def check_summarise(args: argparse.Namespace) -> None:
    """``canopy summarise`` needs an output; its folders must be creatable."""
    if args.out_gpkg is None and args.out_csv is None:
        raise UsageError("give --out-gpkg and/or --out-csv")
    for opt, path in (("--out-gpkg", args.out_gpkg), ("--out-csv", args.out_csv)):
        if path is not None:
            check_output_parent(opt, path)


def run_summarise(args: argparse.Namespace) -> int:
    from dinov3geo.tasks.canopy.summary import summarise_heights

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
    p.add_argument("--assume-crs", default=None,
                   help="CRS for images that have none, e.g. EPSG:31982 (refused otherwise)")
    p.add_argument("--window", type=multiple_of(WINDOW_MULTIPLE, MIN_WINDOW), default=512,
                   help=f"window side in pixels: a multiple of {WINDOW_MULTIPLE}, at least {MIN_WINDOW} (default 512)")
    p.add_argument("--overlap", type=integer(0), default=None,
                   help=f"window overlap in pixels, at least {2 * RECEPTIVE_MARGIN} (default: half a window for these ViT / ConvNeXt models, "
                   f"at least {2 * RECEPTIVE_MARGIN + 2})")
    p.add_argument("--batch-size", type=integer(1, 4096), default=None,
                   help="windows per model call (default: chosen from the model's memory estimate and the memory available)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:0...")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16 or none")
    p.add_argument("--keep-resolution", action="store_true",
                   help="do not resample the image to the model's training GSD")
    p.add_argument("--no-resume", action="store_true", help="start afresh instead of continuing a killed run")
    p.set_defaults(func=run_predict, _check=check_predict)


def check_predict(args: argparse.Namespace) -> None:
    """Options of ``canopy predict`` that must agree with each other and with the image (before any work)."""
    if args.model is None and not (args.chmv2_backbone and args.chmv2_head):
        raise UsageError("give --model, or both --chmv2-backbone and --chmv2-head")
    if args.summary and not args.aoi:
        raise UsageError("--summary needs --aoi (the polygons to summarise)")
    if args.overlap is not None:
        if args.overlap < 2 * RECEPTIVE_MARGIN:
            raise UsageError(f"--overlap {args.overlap} is smaller than the canopy model's edge margins "
                             f"({RECEPTIVE_MARGIN} px on each side): use --overlap {2 * RECEPTIVE_MARGIN} or more")
        if args.overlap >= args.window:
            need = args.overlap + WINDOW_MULTIPLE - args.overlap % WINDOW_MULTIPLE
            raise UsageError(f"--overlap {args.overlap} must be smaller than --window {args.window}: use --window "
                             f"{need} or more (a multiple of {WINDOW_MULTIPLE}), or a smaller --overlap")
    check_output_parent("--out", args.out)
    if args.summary:
        check_output_parent("--summary", args.summary)
    size = raster_size(args.image, args.assume_crs)
    check_window_memory("--window", args.window, args.batch_size or 1, size, out_bands=2, multiple=WINDOW_MULTIPLE,
                        minimum=MIN_WINDOW)


def _open_images(images: list[str], assume_crs: str) -> object:
    """The images as scenes with ``assume_crs`` for files without a CRS (one scene, or a list: a mosaic)."""
    from dinov3geo.io.sources import open_scene

    scenes = [open_scene(i, crs=assume_crs) for i in images]
    return scenes[0] if len(scenes) == 1 else scenes


def run_predict(args: argparse.Namespace) -> int:
    from dinov3geo.tasks.canopy.predict import predict_canopy

    image = args.image[0] if len(args.image) == 1 else list(args.image)
    extra = {}
    if args.assume_crs:
        params = inspect.signature(predict_canopy).parameters
        if "assume_crs" in params and params["assume_crs"].kind is not inspect.Parameter.VAR_KEYWORD:
            extra["assume_crs"] = args.assume_crs
        else:  # an API without the parameter: hand it scenes opened with the CRS
            image = _open_images(list(args.image), args.assume_crs)
    out = predict_canopy(
        args.model, image, args.out, aoi=args.aoi, summary=args.summary, chmv2_backbone=args.chmv2_backbone,
        chmv2_head=args.chmv2_head, bands=args.bands.split(",") if args.bands else None, window=args.window,
        overlap=args.overlap, batch_size=args.batch_size, device=args.device,
        amp=None if args.amp == "none" else args.amp, resample_to_model_gsd=not args.keep_resolution,
        resume=not args.no_resume, progress=not args.quiet, sidecars={"dinov3geo:command": "canopy predict"},
        **extra,
    )  # predict_canopy writes the STAC Items and QGIS style (io.sidecars), tagged with the command
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
        raise UsageError(f"choose an ACTION: {', '.join(actions.choices)}")

    p.set_defaults(func=_help)
