"""``dinov3geo change``: land-use change and deforestation between dates.

Sub-subcommands:

* ``detect``: change maps, forest loss, polygons and summaries for a pair of dates
  (:func:`dinov3geo.tasks.change.detect.detect_change`);
* ``train``: see :func:`register_train` below (added by the learned-change module);
* ``transitions``: from-to land-use transitions between two class maps
  (:func:`dinov3geo.tasks.landcover.transitions.transitions`; parser in :mod:`dinov3geo.cli.transitions`).
"""

from __future__ import annotations

import argparse

from dinov3geo.cli._types import (
    UsageError,
    check_output_parent,
    check_window_memory,
    integer,
    number,
    number_list,
    raster_size,
)
from dinov3geo.cli.transitions import add_transitions_parser

#: the valid range ``(low, high, high included)`` of ``--threshold`` per method (score's range; low excluded)
THRESHOLD_RANGE = {
    "cva": (0.0, None, False),  # change-vector magnitude, >= 0, unbounded
    "ndvi": (0.0, 2.0, True),  # NDVI decrease, in [0, 2]
    "zeroshot": (0.0, 1.0, False),  # cosine distance (1 - cos) / 2, in [0, 1]
    "head": (0.0, 1.0, False),  # probability
}


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "change",
        help="change and deforestation detection between two dates",
        description="Detect land-use change and forest loss between dates of imagery.",
    )
    csub = p.add_subparsers(dest="change_command", metavar="ACTION")
    register_detect(csub)
    register_train(csub)
    add_transitions_parser(csub)

    def _help(args: argparse.Namespace) -> int:
        p.print_help()
        raise UsageError(f"choose an ACTION: {', '.join(csub.choices)}")

    p.set_defaults(func=_help)


# ---------------------------------------------------------------------------------------------- detect
def register_detect(csub: argparse._SubParsersAction) -> None:
    d = csub.add_parser(
        "detect",
        help="change/forest-loss maps (COG), polygons (GeoPackage) and a summary for two dates",
        description="Co-register date 2 onto date 1, mask nodata/clouds, score change (classic CVA/NDVI, "
        "zero-shot DINOv3 feature distance or a trained head) window by window, threshold it (Otsu unless "
        "given), derive forest loss from canopy heights or a forest mask, and write change_prob.tif, change.tif, "
        "forest_loss.tif, loss_polygons.gpkg and summary.json into --out.",
    )
    d.add_argument("--before", required=True, help="date-1 image: raster file, band folder or STAC item")
    d.add_argument("--after", required=True, help="date-2 image (reprojected onto the date-1 grid)")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--aoi", default=None, help="area of interest (GeoPackage, GeoJSON, Shapefile...)")
    d.add_argument("--method", choices=("classic", "zeroshot", "head"), default="classic")
    d.add_argument("--classic", choices=("cva", "ndvi"), default="cva",
                   help="classic method: change-vector analysis or NDVI decrease (needs red+nir bands)")
    d.add_argument("--model", default=None, help="trained change model (method head)")
    d.add_argument("--backbone", default=None, help="backbone weights (method zeroshot)")
    d.add_argument("--threshold", type=number(), default=None,
                   help="change-score threshold (default: Otsu): > 0; classic cva: any positive score; classic "
                   "ndvi: at most 2; zeroshot (cosine distance) and head (probability): below 1")
    d.add_argument("--canopy-before", default=None, help="canopy-height raster (m) of date 1")
    d.add_argument("--canopy-after", default=None, help="canopy-height raster (m) of date 2")
    d.add_argument("--forest-mask", default=None, help="forest mask of date 1 (non-zero = forest)")
    d.add_argument("--min-height", type=number(0), default=5.0, help="forest height threshold (m, >= 0)")
    d.add_argument("--drop", type=number(0, lo_open=True), default=5.0,
                   help="canopy-height drop counted as loss (m, > 0)")
    d.add_argument("--loss-evidence", choices=("auto", "height", "prob"), default="auto")
    d.add_argument("--combine", choices=("and", "or"), default="and",
                   help="how height drop and change probability combine when both are available")
    d.add_argument("--mmu-ha", type=number(0), default=0.1, help="minimum mapping unit in hectares (>= 0)")
    d.add_argument("--connectivity", type=int, choices=(4, 8), default=8)
    d.add_argument("--date-before", default=None, help="date of date 1 (YYYY-MM-DD), overrides metadata")
    d.add_argument("--date-after", default=None, help="date of date 2 (YYYY-MM-DD), overrides metadata")
    d.add_argument("--bands", type=_names, default=None, help="comma-separated bands used from both dates")
    d.add_argument("--band-names", type=_names, default=None,
                   help="names for the bands of multi-band files, e.g. swir16,nir,red,green")
    d.add_argument("--nodata", type=number(allow_nan=True), default=None, help="input nodata override (nan allowed)")
    d.add_argument("--assume-crs", default=None, help="CRS for inputs without one (e.g. EPSG:31982)")
    d.add_argument("--scl-before", default=None, help="Sentinel-2 SCL raster of date 1 (cloud mask)")
    d.add_argument("--scl-after", default=None, help="Sentinel-2 SCL raster of date 2 (cloud mask)")
    d.add_argument("--cloud-test", action="store_true", help="also mask bright white pixels (crude cloud test)")
    d.add_argument("--value-scale", type=number(0, lo_open=True), default=None, help="zeroshot: factor to [0, 1]")
    d.add_argument("--mean", type=number_list(), default=None, help="zeroshot: per-band mean")
    d.add_argument("--std", type=number_list(0, lo_open=True), default=None, help="zeroshot: per-band std (> 0)")
    d.add_argument("--polygons", default="loss_polygons.gpkg",
                   help="polygons file name in --out (.gpkg, .parquet or .geojson)")
    d.add_argument("--window", type=integer(16), default=512,
                   help="window side in pixels (default 512)")
    d.add_argument("--batch-size", type=integer(1, 4096), default=None,
                   help="windows per model call (default: --method head: chosen from the model's memory estimate "
                   "and the memory available; classic and zeroshot: 4)")
    d.add_argument("--device", default="auto")
    d.set_defaults(func=run_detect, _check=check_detect)


def check_detect(args: argparse.Namespace) -> None:
    """Options of ``change detect`` that must agree with each other and with the inputs (before any work)."""
    key = args.classic if args.method == "classic" else args.method
    if args.threshold is not None:
        lo, hi, hi_in = THRESHOLD_RANGE[key]
        if args.threshold <= lo or (hi is not None and (args.threshold > hi if hi_in else args.threshold >= hi)):
            what = f"{args.method} ({key})" if args.method == "classic" else args.method
            rng = f"> {lo:g}" + ("" if hi is None else f" and {'<=' if hi_in else '<'} {hi:g}")
            raise UsageError(f"--threshold {args.threshold:g} is outside the score range of method {what}: it must "
                             f"be {rng}; leave it out to use Otsu's threshold")
    if args.method == "zeroshot" and not args.backbone:
        raise UsageError("--method zeroshot needs --backbone (backbone weights: Meta .pth, timm, safetensors)")
    if args.method == "head" and not args.model:
        raise UsageError("--method head needs --model (a change model from `dinov3geo change train`)")
    if args.mean is not None and args.std is not None and len(args.mean) != len(args.std):
        raise UsageError(f"--mean has {len(args.mean)} values but --std has {len(args.std)}: give one per band")
    check_output_parent("--out", args.out)
    size = raster_size(args.before, args.assume_crs)
    if size is not None:  # both dates are held for a window
        size = (size[0], size[1], 2 * size[2], size[3])
    check_window_memory("--window", args.window, args.batch_size or 1, size, minimum=16)


def run_detect(args: argparse.Namespace) -> int:
    from dinov3geo.tasks.change.detect import detect_change

    dates = None
    if args.date_before or args.date_after:
        dates = (args.date_before, args.date_after)
    res = detect_change(
        args.before, args.after, args.out, method=args.method, classic_method=args.classic, aoi=args.aoi,
        threshold=args.threshold, canopy_before=args.canopy_before, canopy_after=args.canopy_after,
        forest_mask=args.forest_mask, min_height=args.min_height, drop_threshold=args.drop,
        loss_evidence=args.loss_evidence, combine=args.combine, mmu_ha=args.mmu_ha, connectivity=args.connectivity,
        dates=dates, bands=args.bands, band_names=args.band_names, nodata=args.nodata, assume_crs=args.assume_crs,
        scl_before=args.scl_before, scl_after=args.scl_after, cloud_test=args.cloud_test, model=args.model,
        backbone=args.backbone, value_scale=args.value_scale, mean=args.mean, std=args.std,
        polygons_name=args.polygons, window=args.window, batch_size=args.batch_size, device=args.device,
        progress=not args.quiet, sidecars={"dinov3geo:command": "change detect"},  # STAC Items + QGIS styles
    )
    if not args.quiet:
        p = res.pair
        mis = p.misregistration
        print(f"change {p.date_before or '?'} -> {p.date_after or '?'} ({args.method}): overlap "
              f"{p.overlap.fraction:.1%}, misregistration "
              f"{f'{mis.shift_px:.2f} px ({mis.shift_m:.1f} m)' if mis else 'not measured'}")
        print(f"threshold {res.score_threshold:.4g} ({res.threshold_source}); change {res.change_ha:.2f} ha"
              + (f"; forest loss {res.loss_ha:.2f} ha" if res.loss_ha is not None else "")
              + f"; {res.n_polygons} polygons >= {args.mmu_ha:g} ha ({res.polygons_ha:.2f} ha)")
        print(f"outputs in {res.out_dir}: {', '.join(sorted(p.name for p in res.paths.values()))}")
    return 0


# ---------------------------------------------------------------------------------------------- train
def register_train(csub: argparse._SubParsersAction) -> None:
    """``dinov3geo change train CONFIG [--set KEY=VALUE] [--resume]``: train a change head on frozen features
    (:func:`dinov3geo.tasks.change.train.train_change_head`, imported when the command runs)."""
    add_train_parser(csub)


def add_train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train`` on the ``dinov3geo change`` sub-parsers (``sub`` = its ``add_subparsers()``)."""
    p = sub.add_parser(
        "train",
        help="train a change head on frozen DINOv3 features from a YAML config",
        description="Train the bi-temporal change head (frozen backbone, BCE + Dice, threshold chosen on "
        "validation) from a YAML config: output, data.{train,val,val_fraction,bands}, "
        "backbone.{weights,arch,layers,upscale,normalization,value_scale,include_in_checkpoint}, "
        "head.{hidden,detail_channels}, train.{crop_size,crops,epochs,batch_size,lr,...}. Unknown keys are "
        "errors. The checkpoint loads with dinov3geo.tasks.change.head.load_change_model.",
    )
    p.add_argument("config", help="YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from <output>.state.pt if present")
    p.set_defaults(func=run_train_cli)
    return p


def run_train_cli(args: argparse.Namespace) -> int:
    """``dinov3geo change train CONFIG``: train, then print the checkpoint path, threshold and validation F1."""
    from dinov3geo.tasks.change.head import read_change_checkpoint
    from dinov3geo.tasks.change.train import train_change_head

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("train.resume=true")
    if getattr(args, "quiet", False):
        overrides.append("train.progress_bar=false")
    path = train_change_head(args.config, overrides)
    ck = read_change_checkpoint(path)
    val = ck["train"].get("validation", {})
    if not getattr(args, "quiet", False):
        f1 = val.get("f1")
        print(f"change head: {path}")
        print(f"  threshold {ck['threshold']:.3f}; validation F1 {f1:.3f}" if isinstance(f1, float)
              else f"  threshold {ck['threshold']:.3f}; {val.get('note', 'no validation metrics')}")
    return 0

