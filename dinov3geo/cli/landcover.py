"""``dinov3geo landcover ...``: land-cover classification on frozen DINOv3 features (``train``, ``predict``,
``evaluate``).

Each action is a ``_register_<name>(actions)`` function adding one sub-subcommand and setting its ``func`` (and
``_check``: options that must agree, checked before anything is read); :data:`ACTIONS` lists them in help order.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from dinov3geo.cli._types import (
    UsageError,
    check_output_parent,
    check_window_memory,
    integer,
    integer_list,
    multiple_of,
    raster_size,
)
from dinov3geo.cli.transitions import add_landcover_area_parsers

#: land-cover models take windows that are a multiple of the ViT patch size
WINDOW_MULTIPLE = 16
#: the edge margin (px) with zero blend weight (LandcoverRasterModel's default)
RECEPTIVE_MARGIN = 32
#: the smallest window with the default overlap (as for the canopy models, same margin and multiple)
MIN_WINDOW = 80


def _split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def _bands(text: str | None) -> list[Any] | None:
    items = _split_list(text)
    if items is None:
        return None
    return [int(t) if t.isdigit() else t for t in items]


# ---------------------------------------------------------------------------------------------- train
def _register_train(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "train",
        help="train a land-cover head on frozen backbone features from an image and sparse labels",
        description="Put labels (polygons with a class column, or a class raster; any CRS) onto the image grid, "
        "split them by polygon into spatially separate train/val/test blocks (with a buffer), train a linear "
        "or light dense head on the frozen backbone (features cached; class-weighted cross-entropy), and write "
        "model.pt (best validation macro-F1), last.pt (resume), history.json, split.json, map.tif and the test "
        "scores of the head and of a random-forest baseline on bands + indices (eval_test/, baseline_test/, "
        "summary.json). Give a YAML CONFIG (see dinov3geo.tasks.landcover.train), or --image, --labels, "
        "--backbone and --out; options override the config.",
    )
    p.add_argument("config", nargs="?", default=None, help="YAML config (sections data, split, model, train, baseline)")
    p.add_argument("--image", default=None, help="image raster (band folder, STAC item)")
    p.add_argument("--labels", default=None, help="polygons (.gpkg, .shp, .geojson, .parquet) or a class raster")
    p.add_argument("--column", default=None, help="class column of the polygons (default: guessed)")
    p.add_argument("--ignore", type=integer_list(0, 65535), default=None,
                   help="class-raster values meaning unlabelled, e.g. 0 (its nodata and 255 always are)")
    p.add_argument("--bands", default=None, help="comma-separated image bands (names or 1-based positions)")
    p.add_argument("--band-names", default=None, help="comma-separated names for those bands (e.g. blue,green,red,nir)")
    p.add_argument("--backbone", default=None, help="backbone file, or random:<arch> (a control without pretraining)")
    p.add_argument("--head", choices=("linear", "dense"), default=None, help="head kind (default linear)")
    p.add_argument("--image-detail", action="store_true",
                   help="dense head: add the full-resolution image branch (the head then uses image pixels)")
    p.add_argument("--epochs", type=integer(0, 100000), default=None, help="training epochs")
    p.add_argument("--block", type=integer(1), default=None, help="split block side in pixels")
    p.add_argument("--buffer", type=integer(0), default=None, help="pixels dropped between splits")
    p.add_argument("--tile", type=integer(16, 8192), default=None, help="training tile side in pixels")
    p.add_argument("--device", default=None, help="auto (CUDA when present), cpu, cuda:0...")
    p.add_argument("--no-baseline", action="store_true", help="skip the random-forest baseline")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=0.01 (repeatable)")
    p.add_argument("--out", default=None, help="output folder (overrides the config's out)")
    p.set_defaults(func=run_train, _check=check_train)


def check_train(args: argparse.Namespace) -> None:
    """Without a config, the image, labels, backbone and output are needed."""
    if args.config is None:
        missing = [o for o, v in (("--image", args.image), ("--labels", args.labels), ("--backbone", args.backbone),
                                  ("--out", args.out)) if not v]
        if missing:
            raise UsageError(f"give a CONFIG file, or {', '.join(missing)}")
    if args.image_detail and args.head == "linear":
        raise UsageError("--image-detail needs --head dense")
    if args.out:
        check_output_parent("--out", args.out)


def train_config(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The config source (file or dict) and overrides of ``landcover train``'s options."""
    source: Any = args.config if args.config is not None else {"data": {}, "model": {}}
    ov: list[str] = list(args.overrides)

    def put(key: str, value: Any) -> None:
        if value is not None:
            import json

            ov.append(f"{key}={json.dumps(value)}")

    put("data.image", args.image)
    put("data.labels", args.labels)
    put("data.column", args.column)
    put("data.ignore", args.ignore)
    put("data.bands", _bands(args.bands))
    put("data.band_names", _split_list(args.band_names))
    put("model.backbone", args.backbone)
    put("model.head", "dense" if args.image_detail and args.head is None else args.head)
    if args.image_detail:
        put("model.image_detail", True)
    put("train.epochs", args.epochs)
    put("train.tile", args.tile)
    put("train.device", args.device)
    put("split.block", args.block)
    put("split.buffer", args.buffer)
    if args.no_baseline:
        put("baseline.enabled", False)
    put("out", args.out)
    return source, ov


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def run_train(args: argparse.Namespace) -> int:
    from dinov3geo.tasks.landcover.train import train_landcover

    source, ov = train_config(args)
    r = train_landcover(source, ov, progress=not args.quiet)
    if not args.quiet:
        v = r.best_val
        detail = " (uses full-resolution image pixels)" if r.summary.get("uses_image_pixels") else ""
        print(f"model: {r.model_path} ({r.summary['head']} head{detail}, best epoch {r.best_epoch}"
              + (f", val macro-F1 {_f(v['macro_f1'])}" if v else "") + ")")
        if r.test:
            print(f"head on {r.test['split']} polygons ({r.test['n']} px): macro-F1 {_f(r.test['macro_f1'])}  "
                  f"OA {_f(r.test['overall_accuracy'])}  kappa {_f(r.test['kappa'])}  mIoU {_f(r.test['miou'])}")
        if r.baseline:
            b = r.baseline
            print(f"random forest on {b['split']} polygons ({b['n']} px): macro-F1 {_f(b['macro_f1'])}  "
                  f"OA {_f(b['overall_accuracy'])}  kappa {_f(b['kappa'])}  mIoU {_f(b['miou'])}")
        print(f"written: {r.out_dir}")
    return 0


# ---------------------------------------------------------------------------------------------- predict
def _register_predict(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "predict",
        help="map land cover of an image -> coloured class COG (colour table, category names, QGIS style)",
        description="Run a land-cover model over an image with blended sliding windows (class probabilities "
        "averaged across overlapping windows: no seams; out of core, resumable) and write a uint8 COG of class "
        "codes (255 = no data) with a colour table, category names (.aux.xml), a QGIS style (.qml) and the "
        "class table tag; --confidence adds band 2, the maximum class probability in percent.",
    )
    p.add_argument("image", help="image raster (band folder, STAC item)")
    p.add_argument("--model", required=True, help="land-cover model (model.pt of `landcover train`)")
    p.add_argument("--out", required=True, help="output COG")
    p.add_argument("--aoi", default=None, help="only map inside these polygons (GeoPackage, GeoJSON...; any CRS)")
    p.add_argument("--confidence", action="store_true", help="add band 2: maximum class probability (percent)")
    p.add_argument("--probabilities", default=None, help="also keep the class probabilities (float32 COG) here")
    p.add_argument("--bands", default=None, help="comma-separated input bands in the model's order (default: matched)")
    p.add_argument("--assume-crs", default=None, help="CRS for an image that has none, e.g. EPSG:32615")
    p.add_argument("--window", type=multiple_of(WINDOW_MULTIPLE, MIN_WINDOW), default=512,
                   help=f"window side in pixels: a multiple of {WINDOW_MULTIPLE}, at least {MIN_WINDOW} (default 512)")
    p.add_argument("--overlap", type=integer(0), default=None,
                   help=f"window overlap in pixels, at least {2 * RECEPTIVE_MARGIN} (default: half a window)")
    p.add_argument("--batch-size", type=integer(1, 4096), default=None,
                   help="windows per model call (default: chosen from the model's memory estimate and the memory "
                   "available)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:0...")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16 or none")
    p.add_argument("--no-resume", action="store_true", help="start afresh instead of continuing a killed run")
    p.set_defaults(func=run_predict, _check=check_predict)


def check_predict(args: argparse.Namespace) -> None:
    """Options of ``landcover predict`` that must agree (before any work)."""
    if args.overlap is not None:
        if args.overlap < 2 * RECEPTIVE_MARGIN:
            raise UsageError(f"--overlap {args.overlap} is smaller than the model's edge margins ({RECEPTIVE_MARGIN} "
                             f"px on each side): use --overlap {2 * RECEPTIVE_MARGIN} or more")
        if args.overlap >= args.window:
            raise UsageError(f"--overlap {args.overlap} must be smaller than --window {args.window}")
    check_output_parent("--out", args.out)
    if args.probabilities:
        check_output_parent("--probabilities", args.probabilities)
    size = raster_size(args.image, args.assume_crs)
    check_window_memory("--window", args.window, args.batch_size or 1, size, out_bands=8, multiple=WINDOW_MULTIPLE,
                        minimum=MIN_WINDOW)


def run_predict(args: argparse.Namespace) -> int:
    from dinov3geo.tasks.landcover.predict import predict_landcover

    out = predict_landcover(
        args.model, args.image, args.out, aoi=args.aoi, confidence=args.confidence, probabilities=args.probabilities,
        bands=_bands(args.bands), assume_crs=args.assume_crs, window=args.window, overlap=args.overlap,
        batch_size=args.batch_size, device=args.device, amp=None if args.amp == "none" else args.amp,
        resume=not args.no_resume, progress=not args.quiet,
        sidecars={"dinov3geo:command": "landcover predict"},  # STAC Items + QGIS styles (io.sidecars), tagged
    )
    if not args.quiet:
        print(f"land-cover map: {out} (class codes; colour table, category names in {out}.aux.xml, QGIS style "
              f"{out.with_suffix('.qml')})" + ("; band 2: confidence, percent" if args.confidence else ""))
    return 0


# ---------------------------------------------------------------------------------------------- evaluate
def _register_evaluate(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "evaluate",
        help="score a land-cover map on reference labels -> metrics.json, confusion.csv, confusion.png",
        description="Put the reference labels (polygons or a class raster, any CRS) onto the map's grid and score "
        "the labelled pixels only: overall accuracy, Cohen's kappa, per-class producer's and user's accuracy, "
        "F1 and IoU, macro-F1, mIoU and the confusion matrix (CSV + picture).",
    )
    p.add_argument("map", help="class map written by `landcover predict`")
    p.add_argument("--labels", required=True, help="reference polygons or class raster")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--column", default=None, help="class column of the polygons (default: guessed)")
    p.add_argument("--ignore", type=integer_list(0, 65535), default=None, help="class-raster values meaning unlabelled")
    p.add_argument("--aoi", default=None, help="only pixels inside these polygons")
    p.add_argument("--window", type=integer(16, 65536), default=2048, help="reading window in pixels (default 2048)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run_evaluate, _check=check_evaluate)


def check_evaluate(args: argparse.Namespace) -> None:
    """The output folder must be creatable."""
    check_output_parent("--out", args.out)


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from dinov3geo.tasks.landcover.evaluate import evaluate_map

    m = evaluate_map(args.map, args.labels, args.out, column=args.column, ignore=args.ignore, aoi=args.aoi,
                     window=args.window, progress=not args.quiet)
    if args.json:
        print(json.dumps(m, indent=2, default=str))
    elif not args.quiet:
        print(f"pixels {m['n']:,}  OA {_f(m['overall_accuracy'])}  kappa {_f(m['kappa'])}  macro-F1 "
              f"{_f(m['macro_f1'])}  mIoU {_f(m['miou'])}" + (f"  ({m['n_map_missing']} labelled px without a "
                                                              "class on the map)" if m["n_map_missing"] else ""))
        for name, c in m["per_class"].items():
            print(f"  {name}: producer's {_f(c['producers_accuracy'])}  user's {_f(c['users_accuracy'])}  "
                  f"F1 {_f(c['f1'])}  ({c['reference_pixels']} px)")
        print(f"written: {m['outputs']['metrics']}, {m['outputs']['confusion_csv']}, {m['outputs']['confusion_png']}")
    return 0


#: The ``landcover`` actions, in help order.
ACTIONS: list[Callable[[argparse._SubParsersAction], None]] = [_register_train, _register_predict, _register_evaluate,
                                                               add_landcover_area_parsers]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``landcover`` command group to the top-level subparsers."""
    p = sub.add_parser(
        "landcover",
        help="land cover: train heads on frozen features from sparse labels, map classes, evaluate maps",
        description="Land-cover tools. Run `dinov3geo landcover ACTION --help` for each action.",
    )
    actions = p.add_subparsers(dest="landcover_action", metavar="ACTION")
    for add in ACTIONS:
        add(actions)

    def _help(args: argparse.Namespace) -> int:
        p.print_help()
        raise UsageError(f"choose an ACTION: {', '.join(actions.choices)}")

    p.set_defaults(func=_help)


__all__ = ["ACTIONS", "check_predict", "check_train", "register", "train_config"]
