"""``dinov3geo run``: run a multi-stage pipeline YAML; ``dinov3geo report``: check/screenshot a report."""

from __future__ import annotations

import argparse
import inspect

from dinov3geo.cli._types import UsageError, size_wxh


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a multi-stage pipeline (pipelines/*.yaml); up-to-date stages are skipped",
        description="Run the stages of a pipeline YAML in order (each one a call of the Python API). Stages "
        "whose parameters, input files and outputs are unchanged since their last run are skipped (manifest "
        "<outputs>/pipeline-<name>.json); a changed stage re-runs with everything downstream of it. Every key "
        "is documented in pipelines/demo.yaml; unknown keys are errors.",
    )
    p.add_argument("pipeline", nargs="?", help="pipeline YAML, e.g. pipelines/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key: vars.NAME=..., outputs=..., STAGE.PARAM=... or stages.STAGE.PARAM=... "
                   "(value parsed as YAML; repeatable)")
    p.add_argument("--force", action="append", nargs="?", const="*", default=None, metavar="STAGE",
                   help="re-run STAGE (and what depends on it) even if up to date; without STAGE every stage "
                   "(put it after the pipeline path, or write --force=STAGE)")
    p.add_argument("--dry-run", action="store_true", help="only say which stages would run and why")
    p.add_argument("--summary", action="store_true", help="after the run, print the key numbers each stage "
                   "returned (also those of stages skipped as up to date) and the report's path")
    p.add_argument("--list-stages", action="store_true", help="list the registered stage types and their "
                   "parameters, then exit")
    p.set_defaults(func=run)

    r = sub.add_parser(
        "report",
        help="open an HTML report in headless Chromium: check its images load, optionally take a screenshot",
        description="Render a report (e.g. outputs/demo/report.html) in headless Chromium, check that every "
        "image loads, and optionally save a PNG screenshot of the top of the page (for a README picture).",
    )
    r.add_argument("html", help="report HTML file")
    r.add_argument("--screenshot", default=None, metavar="PNG", help="write a screenshot to this PNG")
    r.add_argument("--size", type=size_wxh(16, 16384), default=(1200, 1800),
                   help="screenshot size WIDTHxHEIGHT (default 1200x1800)")
    r.set_defaults(func=report)


def _list_stages() -> int:
    from dinov3geo.pipelines import list_stages

    for name, kind in list_stages().items():
        print(f"{name}: {kind.description}")
        for pname, prm in kind.parameters.items():
            default = "required" if prm.default is inspect.Parameter.empty else f"default {prm.default!r}"
            print(f"    {pname} ({default})")
    return 0


def run(args: argparse.Namespace) -> int:
    from dinov3geo.pipelines import run_pipeline

    if args.list_stages:
        return _list_stages()
    if not args.pipeline:
        raise UsageError("give a pipeline YAML (or --list-stages)")
    force: list[str] | bool = False
    if args.force:
        force = True if "*" in args.force else list(args.force)
    runs = run_pipeline(args.pipeline, args.overrides, force=force, dry_run=args.dry_run,
                        echo=None if args.quiet else (lambda m: print(m, flush=True)))
    if not args.quiet and not args.dry_run:
        ran = sum(r.status == "done" for r in runs.values())
        print(f"pipeline done: {ran} stage(s) ran, {len(runs) - ran} up to date")
    if args.summary and not args.dry_run:
        print_summary(runs)
    return 0


def print_summary(runs: dict) -> None:
    """Print each stage's ``summary`` numbers (label: value), its time, and the HTML reports written."""
    from dinov3geo.report.html import fmt

    print("summary:")
    for name, r in runs.items():
        res = r.result or {}
        secs = "" if r.seconds is None else f", {r.seconds:.1f} s"
        print(f"  {name} ({r.type}, {r.status}{secs})")
        for k, v in (res.get("summary") or {}).items():
            print(f"      {k}: {fmt(v)}")
        if res.get("html"):
            print(f"      report: {res['html']}")


def report(args: argparse.Namespace) -> int:
    from dinov3geo.report.browser import check_images, screenshot

    chk = check_images(args.html)
    print(f"{args.html}: {chk.total - len(chk.failed)}/{chk.total} images loaded"
          + (f"; failed: {chk.failed}" if chk.failed else ""))
    if args.screenshot:
        w, h = args.size
        print(f"screenshot: {screenshot(args.html, args.screenshot, width=w, height=h)}")
    if not chk.ok:
        raise RuntimeError(f"{len(chk.failed)} of {chk.total} images of {args.html} did not load: "
                           f"{', '.join(map(str, chk.failed[:5]))}{' ...' if len(chk.failed) > 5 else ''}")
    return 0
