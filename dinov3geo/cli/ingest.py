"""``dinov3geo ingest``: chip scenes into a Zarr v3 tile store."""

from __future__ import annotations

import argparse
import json
import os
import sys

from dinov3geo.cli._types import check_window_memory, integer, number, raster_size

EXIT_STATUS = (
    "exit status: 0 when every source was ingested (or was already in the store); 1 when a source was "
    "skipped (unreadable or truncated file, missing band, ...: each one is named on stderr, even with -q; the "
    "scenes that could be read are kept in the store) or on an error (e.g. the store is in use by another "
    "run, or the disk is full); 130 when interrupted (Ctrl-C). After an interruption, a kill or a full disk, "
    "re-run the same command: it undoes the unfinished scene and completes the store."
)


def _bands(text: str) -> list[str]:
    return [b.strip() for b in text.split(",") if b.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``ingest`` subcommand to ``sub``."""
    p = sub.add_parser(
        "ingest",
        help="chip scenes (GeoTIFF/COG, band folders, STAC items) into a Zarr v3 tile store",
        description="Chip scenes into a Zarr v3 tile store (one chunk per tile, per-tile georeferencing, "
        "per-band statistics over valid pixels). Re-running on the same store skips scenes already ingested "
        "and completes an interrupted run.",
        epilog=EXIT_STATUS,
    )
    p.add_argument("sources", nargs="+", help="raster files, Landsat/Sentinel-2 band folders, STAC item JSON, "
                   "or folders to search")
    p.add_argument("--out", required=True, help="tile store path (e.g. tiles.zarr): a new path, an empty folder "
                   "or an existing tile store (appended to); never an input or a folder holding one")
    p.add_argument("--tile", type=integer(1), default=256, help="tile size in pixels (default 256)")
    p.add_argument("--bands", type=_bands, default=None,
                   help="comma-separated band names or aliases to keep, e.g. red,green,blue,nir")
    p.add_argument("--res", type=number(0, lo_open=True), default=None, help="target resolution in CRS units")
    p.add_argument("--crs", default=None, help="target CRS, e.g. EPSG:32633 (default: each scene's own)")
    p.add_argument("--assume-crs", default=None, help="CRS for files that have none (refused otherwise)")
    p.add_argument("--nodata", type=number(allow_nan=True), default=None, help="nodata value overriding the files' own")
    p.add_argument("--min-valid", type=number(0, 1), default=0.5,
                   help="skip tiles with a smaller fraction of valid pixels (default 0.5)")
    p.add_argument("--resampling", default="bilinear", help="resampling for reprojection (default bilinear)")
    p.add_argument("--scheduler", default=None,
                   help="dask.distributed scheduler address (default: local threads)")
    p.add_argument("--workers", type=integer(1, 1024), default=None, help="threads for the local scheduler")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run, _check=check)


def check(args: argparse.Namespace) -> None:
    """Before any work: a tile (times the tiles read at once) must fit in memory for each source file."""
    for src in args.sources:
        check_window_memory("--tile", args.tile, args.workers or os.cpu_count() or 1,
                            raster_size(src, args.assume_crs), batch_option="--workers", multiple=1)


def run(args: argparse.Namespace) -> int:
    """Run ``dinov3geo ingest``; the exit status is described in :data:`EXIT_STATUS`."""
    from dinov3geo.ingest import ingest

    rep = ingest(
        args.sources, args.out, tile_size=args.tile, bands=args.bands, res=args.res, crs=args.crs,
        assume_crs=args.assume_crs, nodata=args.nodata, min_valid=args.min_valid, resampling=args.resampling,
        scheduler=args.scheduler, workers=args.workers, progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(rep.__dict__, indent=2, default=str))
    elif not args.quiet:
        print(rep.summary())
    if args.quiet or args.json:  # the summary (with its skipped lines) was not printed: errors still are
        for src, why in rep.skipped:
            print(f"dinov3geo ingest: skipped {src}: {why}", file=sys.stderr)
    if not (rep.ingested or rep.already):
        what = f"all {len(rep.skipped)} source(s) were skipped" if rep.skipped else "no scene found in the sources"
        print(f"dinov3geo ingest: error: nothing was ingested into {args.out} ({what}); fix or replace the "
              "sources named above and re-run", file=sys.stderr)
        return 1
    if rep.skipped:
        print(f"dinov3geo ingest: error: {len(rep.skipped)} source(s) skipped (named above); the other scenes are "
              f"in {args.out}: fix or replace the skipped ones and re-run the same command to add them",
              file=sys.stderr)
        return 1
    return 0
