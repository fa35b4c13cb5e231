"""``dinov3geo info``: describe a scene (bands, grid, CRS, nodata, date) or a tile store."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a scene or a tile store",
                       description="Print what dinov3geo sees in a raster, band folder, STAC item or tile store.")
    p.add_argument("source", help="raster file, band folder, STAC item JSON or tile store (.zarr)")
    p.add_argument("--assume-crs", default=None, help="CRS for files that have none")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def describe(source: str, assume_crs: str | None = None) -> dict[str, Any]:
    """A JSON-friendly description of a scene or tile store."""
    if (Path(source) / "zarr.json").exists():
        from dinov3geo.ingest.store import TileStore  # only here: importing it loads Zarr and dask (~1.5 s)

        ts = TileStore.open(source)
        return {
            "kind": "tile_store", "path": str(ts.path), "tiles": ts.n_tiles, "tile_size": ts.tile_size,
            "bands": ts.band_names, "dtype": str(ts.dtype), "scenes": [s["id"] for s in ts.scenes],
            "stats": {k: v for k, v in (ts.stats or {}).items() if k != "state"},
        }
    from dinov3geo.io.sources import open_scene

    sc = open_scene(source, crs=assume_crs)
    return {
        "kind": "scene", "id": sc.id, "bands": [{"name": b.name, "aliases": list(b.aliases), "file": b.path,
                                                 "index": b.index} for b in sc.bands],
        "dtype": sc.dtype, "grid": sc.grid.to_dict() | {"crs": sc.grid.crs.to_string()},
        "res": sc.grid.res, "bounds": sc.grid.bounds,
        "datetime": sc.datetime.isoformat() if sc.datetime else None,
    }


def run(args: argparse.Namespace) -> int:
    d = describe(args.source, args.assume_crs)
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    for k, v in d.items():
        if k == "bands" and d["kind"] == "scene":
            print("bands:")
            for b in v:
                print(f"  {b['name']:<10} aliases={','.join(b['aliases'])} <- {b['file']}#{b['index']}")
        else:
            print(f"{k}: {v}")
    return 0
