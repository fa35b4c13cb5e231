"""Land-use transitions and honest areas on the command line.

* ``dinov3geo change transitions MAP1 MAP2 --out DIR [--change RASTER --change-threshold T] [--mmu-ha X]``:
  transition raster, matrices in hectares and polygons between two class maps
  (:func:`dinov3geo.tasks.landcover.transitions.transitions`);
* ``dinov3geo landcover sample MAP --n N --out points.gpkg``: a stratified random reference sample to label
  (:func:`dinov3geo.tasks.landcover.sampling.stratified_sample`);
* ``dinov3geo landcover areas MAP --reference SAMPLE.gpkg --column reference --out DIR``: error-adjusted areas
  with 95 % confidence intervals and accuracies with standard errors (Olofsson et al. 2014;
  :func:`dinov3geo.tasks.landcover.accuracy.area_report`).

The parsers are added by :func:`add_transitions_parser` (to the ``change`` actions) and
:func:`add_landcover_area_parsers` (to the ``landcover`` actions). Nothing heavy is imported until a command
runs.
"""

from __future__ import annotations

import argparse
import math

from dinov3geo.cli._types import UsageError, check_output_parent, integer, number

__all__ = ["add_landcover_area_parsers", "add_transitions_parser"]


# ---------------------------------------------------------------------------------------------- transitions
def add_transitions_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``transitions`` on the ``dinov3geo change`` actions (``subparsers`` = its ``add_subparsers()``)."""
    p = subparsers.add_parser(
        "transitions",
        help="from-to transitions between two class maps: raster, matrix in hectares, polygons",
        description="Compare the class maps of two dates (same class table; date 2 reprojected onto date 1's grid "
        "with nearest resampling) and write into --out: transitions.tif (code = from_index * K + to_index, colour "
        "table, category names like 'forest -> herbaceous'), transition_matrix.csv (hectares, rows from, columns "
        "to; geodesic pixel areas in geographic CRSs), with --change also transitions_gated.tif and "
        "transition_matrix_gated.csv (a pixel changes class only where change was detected), "
        "transition_polygons.gpkg (from/to classes, area_ha, dates, mean confidence; regions below --mmu-ha "
        "dropped) and summary.json. Pixel counts are biased areas: use `dinov3geo landcover sample` and "
        "`dinov3geo landcover areas` for areas with confidence intervals.",
    )
    p.add_argument("map1", help="class map of date 1 (from)")
    p.add_argument("map2", help="class map of date 2 (to)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--change", default=None,
                   help="change probability or binary change raster (change_prob.tif / change.tif of "
                   "`dinov3geo change detect`) gating the transitions")
    p.add_argument("--change-threshold", type=number(0, lo_open=True), default=0.5,
                   help="values >= this are change (default 0.5; > 0)")
    p.add_argument("--mmu-ha", type=number(0), default=0.0,
                   help="minimum mapping unit of the transition polygons in hectares (default 0: keep all)")
    p.add_argument("--connectivity", type=int, choices=(4, 8), default=8)
    p.add_argument("--no-polygons", action="store_true", help="skip transition_polygons.gpkg")
    p.add_argument("--classes", default=None, help="class table JSON for maps without one")
    p.add_argument("--date1", default=None, help="date of map 1 (YYYY-MM-DD), overrides metadata")
    p.add_argument("--date2", default=None, help="date of map 2 (YYYY-MM-DD), overrides metadata")
    p.add_argument("--tile", type=integer(16, 65536), default=2048,
                   help="tile size in pixels (memory bound; results do not depend on it; default 2048)")
    p.set_defaults(func=run_transitions, _check=check_transitions)
    return p


def check_transitions(args: argparse.Namespace) -> None:
    """Options of ``change transitions`` that must agree (before anything is read)."""
    if args.change is None and args.change_threshold != 0.5:
        raise UsageError("--change-threshold needs --change (the change raster it applies to)")
    check_output_parent("--out", args.out)


def run_transitions(args: argparse.Namespace) -> int:
    """``dinov3geo change transitions``: write the outputs, print the matrix totals and the largest transitions."""
    from dinov3geo.tasks.landcover.transitions import transitions

    dates = (args.date1, args.date2) if (args.date1 or args.date2) else None
    res = transitions(args.map1, args.map2, args.out, change=args.change, change_threshold=args.change_threshold,
                      mmu_ha=args.mmu_ha, polygons=not args.no_polygons, connectivity=args.connectivity,
                      classes=args.classes, dates=dates, tile=args.tile, progress=not args.quiet,
                      sidecars={"dinov3geo:command": "change transitions"})  # STAC Items + QGIS styles, tagged
    if not args.quiet:
        s = res.summary
        d = s["dates"]
        print(f"transitions {d['date1'] or '?'} -> {d['date2'] or '?'}: {len(res.table)} classes, mapped "
              f"{s['ungated']['mapped_ha']:.2f} ha, changed {s['ungated']['changed_ha']:.2f} ha"
              + (f"; with change gating {s['gated']['changed_ha']:.2f} ha ({s['gated']['suppressed_ha']:.2f} ha "
                 "not confirmed by the detector)" if "gated" in s else ""))
        rows = (s.get("gated") or s["ungated"])["transitions"][:5]
        for r in rows:
            print(f"  {r['from']} -> {r['to']}: {r['area_ha']:.2f} ha")
        if not args.no_polygons:
            print(f"{res.n_polygons} polygons >= {args.mmu_ha:g} ha")
        print(f"outputs in {res.out_dir}: {', '.join(sorted(p.name for p in res.paths.values()))}")
    return 0


# ---------------------------------------------------------------------------------------------- landcover
def add_landcover_area_parsers(landcover_subparsers: argparse._SubParsersAction) -> None:
    """Register ``sample`` and ``areas`` on the ``dinov3geo landcover`` actions."""
    s = landcover_subparsers.add_parser(
        "sample",
        help="draw a stratified random sample of a class map (points to label with reference classes)",
        description="Draw a stratified random sample (strata = map classes) as points at pixel centres, with an "
        "empty 'reference' column to fill in: at least --min-per-class points per class (Olofsson et al. 2014 "
        "advise >= 50), the rest proportional to the mapped area. The same map, sizes and --seed give the same "
        "points. Label them, then run `dinov3geo landcover areas`.",
    )
    s.add_argument("map", help="class map (uint8 codes, 255 = nodata)")
    size = s.add_mutually_exclusive_group(required=True)
    size.add_argument("--n", type=integer(1), default=None, help="total sample size")
    size.add_argument("--n-per-class", type=integer(1), default=None, help="the same sample size for every class")
    s.add_argument("--min-per-class", type=integer(1), default=50,
                   help="smallest sample of a class with --n (default 50; a class with fewer pixels gives them all)")
    s.add_argument("--seed", type=integer(0), default=0, help="random seed (default 0)")
    s.add_argument("--out", required=True, help="output points (.gpkg, .geojson, .parquet, .fgb)")
    s.add_argument("--classes", default=None, help="class table JSON for maps without one")
    s.set_defaults(func=run_sample, _check=check_sample)

    a = landcover_subparsers.add_parser(
        "areas",
        help="error-adjusted areas with confidence intervals and accuracies from a labelled reference sample",
        description="Estimate the area of each class with a 95 % confidence interval, user's, producer's and "
        "overall accuracy with standard errors, and the error matrix of area proportions, from the class map "
        "(strata) and a reference sample (points, or polygons taking the map's majority class) with the "
        "stratified estimator of Olofsson et al. (2014). Writes areas.csv, error_matrix.csv, "
        "error_matrix_counts.csv and accuracy.json into --out.",
    )
    a.add_argument("map", help="class map (uint8 codes, 255 = nodata)")
    a.add_argument("--reference", required=True, help="labelled sample points or polygons (vector file)")
    a.add_argument("--column", default="reference", help="column with the reference classes (names or codes)")
    a.add_argument("--layer", default=None, help="layer of a multi-layer reference file")
    a.add_argument("--classes", default=None, help="class table JSON for maps without one")
    a.add_argument("--confidence", type=number(0, 1, lo_open=True, hi_open=True), default=0.95,
                   help="confidence level of the intervals (default 0.95)")
    a.add_argument("--out", required=True, help="output folder")
    a.set_defaults(func=run_areas, _check=check_areas)


def check_sample(args: argparse.Namespace) -> None:
    """Options of ``landcover sample`` that must agree."""
    check_output_parent("--out", args.out)


def run_sample(args: argparse.Namespace) -> int:
    """``dinov3geo landcover sample``: draw and write the points, print the allocation."""
    from dinov3geo.tasks.landcover.sampling import stratified_sample

    gdf = stratified_sample(args.map, args.out, n_total=args.n, n_per_class=args.n_per_class,
                            min_per_class=args.min_per_class, seed=args.seed, classes=args.classes,
                            progress=not args.quiet)
    if not args.quiet:
        alloc = gdf.attrs.get("allocation", {})
        print(f"{len(gdf)} sample points in {args.out} (seed {args.seed}): "
              + ", ".join(f"{k} {v}" for k, v in alloc.items()))
        print("fill in the 'reference' column (class names or codes), then run "
              f"`dinov3geo landcover areas {args.map} --reference {args.out} --out DIR`")
    return 0


def check_areas(args: argparse.Namespace) -> None:
    """Options of ``landcover areas`` that must agree."""
    check_output_parent("--out", args.out)


def _z(level: float) -> float:
    """The two-sided normal quantile of a confidence level (0.95 -> 1.96, as in Olofsson et al.)."""
    if abs(level - 0.95) < 1e-12:
        return 1.96
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def run_areas(args: argparse.Namespace) -> int:
    """``dinov3geo landcover areas``: estimate, write the report files, print the per-class table."""
    from dinov3geo.tasks.landcover.accuracy import area_report

    layer = int(args.layer) if args.layer is not None and args.layer.isdigit() else args.layer
    est, paths = area_report(args.map, args.reference, args.out, column=args.column, layer=layer,
                             classes=args.classes, z=_z(args.confidence), progress=not args.quiet)
    if not args.quiet:
        pct = f"{100 * args.confidence:g} %"

        def f(x: float, nd: int = 2) -> str:
            return "n/a" if not math.isfinite(x) else f"{x:.{nd}f}"

        dropped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in est.dropped.items() if v)
        print(f"{est.n_used} sample units used" + (f" ({dropped} dropped)" if dropped else ""))
        print(f"{'class':<20} {'mapped ha':>12} {'estimated ha':>14} {f'+/- {pct}':>12} {'user':>6} {'+/-':>5} "
              f"{'prod.':>6} {'+/-':>5}")
        for i, name in enumerate(est.names):
            print(f"{name[:20]:<20} {est.mapped_area_ha[i]:>12.2f} {est.area_ha[i]:>14.2f} "
                  f"{f(est.area_ci_ha[i]):>12} {f(est.user[i]):>6} {f(est.z * est.user_se[i]):>5} "
                  f"{f(est.producer[i]):>6} {f(est.z * est.producer_se[i]):>5}")
        print(f"overall accuracy {f(est.overall)} +/- {f(est.z * est.overall_se)} ({pct})")
        print(f"outputs in {args.out}: {', '.join(p.name for p in paths.values())}")
    return 0
