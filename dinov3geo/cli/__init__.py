"""The ``dinov3geo`` command line: a thin layer over the Python API.

Each subcommand parses its arguments, calls one API function and prints a short summary. Subcommands are
registered by modules in this package (``register(subparsers)``), one per area.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from dinov3geo import __version__
from dinov3geo.utils.progress import configure_logging

log = logging.getLogger("dinov3geo")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    from dinov3geo.cli import canopy as canopy_cmd
    from dinov3geo.cli import change as change_cmd
    from dinov3geo.cli import features as features_cmd
    from dinov3geo.cli import info as info_cmd
    from dinov3geo.cli import ingest as ingest_cmd
    from dinov3geo.cli import pretrain as pretrain_cmd
    from dinov3geo.cli import run as run_cmd

    p = argparse.ArgumentParser(
        prog="dinov3geo",
        description="Remote sensing with self-supervised DINOv3 backbones: ingest scenes into a tile store, "
        "pretrain, and map canopy height and forest change.",
    )
    p.add_argument("--version", action="version", version=f"dinov3geo {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors; no progress bars")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in (ingest_cmd, info_cmd, pretrain_cmd, features_cmd, canopy_cmd, run_cmd, change_cmd):
        mod.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dinov3geo`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI reports every error in one clear line
        if args.verbose:
            raise
        print(f"dinov3geo {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
