"""``dinov3geo ingest``: chip scenes into a Zarr v3 tile store."""

from __future__ import annotations

import argparse
import json

from dinov3geo.ingest import ingest


def _bands(text: str) -> list[str]:
    return [b.strip() for b in text.split(",") if b.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="chip scenes (GeoTIFF/COG, band folders, STAC items) into a Zarr v3 tile store",
        description="Chip scenes into a Zarr v3 tile store (one chunk per tile, per-tile georeferencing, "
        "per-band statistics over valid pixels). Re-running on the same store skips scenes already ingested "
        "and completes an interrupted run.",
    )
    p.add_argument("sources", nargs="+", help="raster files, Landsat/Sentinel-2 band folders, STAC item JSON, "
                   "or folders to search")
    p.add_argument("--out", required=True, help="tile store path (e.g. tiles.zarr)")
    p.add_argument("--tile", type=int, default=256, help="tile size in pixels (default 256)")
    p.add_argument("--bands", type=_bands, default=None,
                   help="comma-separated band names or aliases to keep, e.g. red,green,blue,nir")
    p.add_argument("--res", type=float, default=None, help="target resolution in CRS units")
    p.add_argument("--crs", default=None, help="target CRS, e.g. EPSG:32633 (default: each scene's own)")
    p.add_argument("--assume-crs", default=None, help="CRS for files that have none (refused otherwise)")
    p.add_argument("--nodata", type=float, default=None, help="nodata value overriding the files' own")
    p.add_argument("--min-valid", type=float, default=0.5,
                   help="skip tiles with a smaller fraction of valid pixels (default 0.5)")
    p.add_argument("--resampling", default="bilinear", help="resampling for reprojection (default bilinear)")
    p.add_argument("--scheduler", default=None,
                   help="dask.distributed scheduler address (default: local threads)")
    p.add_argument("--workers", type=int, default=None, help="threads for the local scheduler")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rep = ingest(
        args.sources, args.out, tile_size=args.tile, bands=args.bands, res=args.res, crs=args.crs,
        assume_crs=args.assume_crs, nodata=args.nodata, min_valid=args.min_valid, resampling=args.resampling,
        scheduler=args.scheduler, workers=args.workers, progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(rep.__dict__, indent=2, default=str))
    elif not args.quiet:
        print(rep.summary())
    return 0 if (rep.ingested or rep.already) else 1
