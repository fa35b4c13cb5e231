"""``dinov3geo features``: dense DINOv3 features of a raster as a georeferenced Zarr, plus a PCA picture."""

from __future__ import annotations

import argparse
import logging

from dinov3geo.cli._types import (
    UsageError,
    check_output_parent,
    check_window_memory,
    integer,
    integer_list,
    multiple_of,
    number,
    number_list,
    raster_size,
)

log = logging.getLogger("dinov3geo.features")

#: the ViT patch size: windows are a multiple of it, and the features grid is the image grid coarsened by it
PATCH = 16
#: the edge margin (px) the features of a window get zero blend weight on (BackboneFeatures: two patches)
RECEPTIVE_MARGIN = 2 * PATCH
#: the smallest window with the default overlap:
#: ``dinov3geo.inference.layout.min_window(PATCH, RECEPTIVE_MARGIN, PATCH)`` (a test keeps them equal)
MIN_WINDOW = 112


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "features",
        help="dense backbone features of a raster -> Zarr (feature, y, x) with CRS, plus PCA PNG/GeoTIFF",
        description="Compute DINOv3 patch features window by window (overlapping, blended, resumable) on the "
        "image grid coarsened by the patch size (16), write them as a Zarr v3 xarray dataset with CRS and "
        "transform, and render a 3-component PCA as PNG and GeoTIFF.",
    )
    p.add_argument("image", help="raster file, band folder or STAC item")
    p.add_argument("--out", required=True, help="output .zarr")
    p.add_argument("--weights", default=None, help="backbone weights (Meta .pth, timm, safetensors, dinov3geo)")
    p.add_argument("--arch", default="vits16", help="architecture when no weights are given (random init)")
    p.add_argument("--layers", type=integer_list(-64, 63), default=[-1],
                   help="block indices of a ViT, e.g. -1 or 5,11,17,23, or stage indices 0-3 of a ConvNeXt (several: "
                        "their features are concatenated); negative: from the last")
    p.add_argument("--bands", default=None, help="comma-separated input bands (default: all)")
    p.add_argument("--assume-crs", default=None,
                   help="CRS for an image that has none, e.g. EPSG:31982 (refused otherwise)")
    p.add_argument("--window", type=multiple_of(PATCH, MIN_WINDOW), default=512,
                   help=f"window size in pixels: a multiple of {PATCH}, at least {MIN_WINDOW} (default 512)")
    p.add_argument("--batch-size", type=integer(1, 4096), default=None,
                   help="windows per model call (default: chosen from the model's memory estimate and the memory "
                   "available)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA), bf16, none")
    p.add_argument("--value-scale", type=number(0, lo_open=True), default=None,
                   help="factor to [0, 1] (default from metadata)")
    p.add_argument("--mean", type=number_list(), default=None, help="per-band normalisation mean")
    p.add_argument("--std", type=number_list(0, lo_open=True), default=None,
                   help="per-band normalisation std (> 0)")
    p.add_argument("--no-pca", action="store_true", help="skip the PCA rendering")
    p.set_defaults(func=run, _check=check)


def check(args: argparse.Namespace) -> None:
    """Options of ``features`` that must agree with each other and with the image (before any work)."""
    if args.mean is not None and args.std is not None and len(args.mean) != len(args.std):
        raise UsageError(f"--mean has {len(args.mean)} values but --std has {len(args.std)}: give one per band")
    check_output_parent("--out", args.out)  # (extract_features guards the output against the inputs first)
    size = raster_size(args.image, args.assume_crs)
    if size is not None and args.bands:
        size = (size[0], size[1], len([b for b in args.bands.split(",") if b.strip()]), size[3])
    check_window_memory("--window", args.window, args.batch_size or 1, size, out_bands=64 * len(args.layers),
                        scale=PATCH, multiple=PATCH, minimum=MIN_WINDOW)  # 64: the narrowest backbone (a lower bound)


def run(args: argparse.Namespace) -> int:
    from dinov3geo.tasks.features import extract_features

    image = args.image
    bands = args.bands.split(",") if args.bands else None
    if args.assume_crs:
        from dinov3geo.io.sources import open_scene

        image = open_scene(args.image, crs=args.assume_crs)  # extract_features reads scenes as they are
    res = extract_features(
        image, args.out, weights=args.weights, arch=args.arch, layers=args.layers,
        bands=bands, window=args.window, batch_size=args.batch_size,
        device=args.device, amp=None if args.amp == "none" else args.amp, pca=not args.no_pca,
        progress=not args.quiet, value_scale=args.value_scale, mean=args.mean, std=args.std,
        sidecars={"dinov3geo:command": "features"},  # STAC Items + QGIS style (io.sidecars), tagged
    )
    if args.weights is None:  # said after the run: a refused output stays a one-line error
        log.warning("no --weights given: these are features of a randomly initialised %s backbone (only useful "
                    "for testing)", args.arch)
    if not args.quiet:
        print(f"features: {res.zarr} ({res.n_features} x {res.grid.height} x {res.grid.width}, "
              f"{res.grid.res[0]:g} {res.grid.crs.linear_units or 'units'} per feature pixel)")
        if res.pca_png:
            print(f"PCA: {res.pca_png}, {res.pca_tif}")
    return 0
