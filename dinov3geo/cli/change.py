"""``dinov3geo change``: land-use change and deforestation between dates.

Sub-subcommands:

* ``detect``: change maps, forest loss, polygons and summaries for a pair of dates
  (:func:`dinov3geo.tasks.change.detect.detect_change`);
* ``train``: see :func:`register_train` below (added by the learned-change module).
"""

from __future__ import annotations

import argparse


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


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
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


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
    d.add_argument("--threshold", type=float, default=None, help="change-score threshold (default: Otsu)")
    d.add_argument("--canopy-before", default=None, help="canopy-height raster (m) of date 1")
    d.add_argument("--canopy-after", default=None, help="canopy-height raster (m) of date 2")
    d.add_argument("--forest-mask", default=None, help="forest mask of date 1 (non-zero = forest)")
    d.add_argument("--min-height", type=float, default=5.0, help="forest height threshold (m)")
    d.add_argument("--drop", type=float, default=5.0, help="canopy-height drop counted as loss (m)")
    d.add_argument("--loss-evidence", choices=("auto", "height", "prob"), default="auto")
    d.add_argument("--combine", choices=("and", "or"), default="and",
                   help="how height drop and change probability combine when both are available")
    d.add_argument("--mmu-ha", type=float, default=0.1, help="minimum mapping unit in hectares")
    d.add_argument("--connectivity", type=int, choices=(4, 8), default=8)
    d.add_argument("--date-before", default=None, help="date of date 1 (YYYY-MM-DD), overrides metadata")
    d.add_argument("--date-after", default=None, help="date of date 2 (YYYY-MM-DD), overrides metadata")
    d.add_argument("--bands", type=_names, default=None, help="comma-separated bands used from both dates")
    d.add_argument("--band-names", type=_names, default=None,
                   help="names for the bands of multi-band files, e.g. swir16,nir,red,green")
    d.add_argument("--nodata", type=float, default=None, help="input nodata override")
    d.add_argument("--assume-crs", default=None, help="CRS for inputs without one (e.g. EPSG:31982)")
    d.add_argument("--scl-before", default=None, help="Sentinel-2 SCL raster of date 1 (cloud mask)")
    d.add_argument("--scl-after", default=None, help="Sentinel-2 SCL raster of date 2 (cloud mask)")
    d.add_argument("--cloud-test", action="store_true", help="also mask bright white pixels (crude cloud test)")
    d.add_argument("--value-scale", type=float, default=None, help="zeroshot: factor to [0, 1]")
    d.add_argument("--mean", type=_floats, default=None, help="zeroshot: per-band mean")
    d.add_argument("--std", type=_floats, default=None, help="zeroshot: per-band std")
    d.add_argument("--polygons", default="loss_polygons.gpkg",
                   help="polygons file name in --out (.gpkg, .parquet or .geojson)")
    d.add_argument("--window", type=int, default=512)
    d.add_argument("--batch-size", type=int, default=4)
    d.add_argument("--device", default="auto")
    d.set_defaults(func=run_detect)


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
        progress=not args.quiet,
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
    (:func:`dinov3geo.tasks.change.train.train_change_head`; the parser lives next to it)."""
    from dinov3geo.tasks.change.train import add_train_parser

    add_train_parser(csub)
