"""``dinov3geo features``: dense DINOv3 features of a raster as a georeferenced Zarr, plus a PCA picture."""

from __future__ import annotations

import argparse


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


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
    p.add_argument("--layers", type=_ints, default=[-1], help="block indices, e.g. -1 or 5,11,17,23")
    p.add_argument("--bands", default=None, help="comma-separated input bands (default: all)")
    p.add_argument("--window", type=int, default=512, help="window size in pixels (multiple of 16)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA), bf16, none")
    p.add_argument("--value-scale", type=float, default=None, help="factor to [0, 1] (default from metadata)")
    p.add_argument("--mean", type=_floats, default=None, help="per-band normalisation mean")
    p.add_argument("--std", type=_floats, default=None, help="per-band normalisation std")
    p.add_argument("--no-pca", action="store_true", help="skip the PCA rendering")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinov3geo.tasks.features import extract_features

    if args.weights is None:
        print("warning: no --weights given: features of a randomly initialised backbone", flush=True)
    res = extract_features(
        args.image, args.out, weights=args.weights, arch=args.arch, layers=args.layers,
        bands=args.bands.split(",") if args.bands else None, window=args.window, batch_size=args.batch_size,
        device=args.device, amp=None if args.amp == "none" else args.amp, pca=not args.no_pca,
        progress=not args.quiet, value_scale=args.value_scale, mean=args.mean, std=args.std,
    )
    if not args.quiet:
        print(f"features: {res.zarr} ({res.n_features} x {res.grid.height} x {res.grid.width}, "
              f"{res.grid.res[0]:g} {res.grid.crs.linear_units or 'units'} per feature pixel)")
        if res.pca_png:
            print(f"PCA: {res.pca_png}, {res.pca_tif}")
    return 0
