"""Progress bars (tqdm, with ETA) and logging set-up shared by the CLI and long-running APIs."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from tqdm.auto import tqdm

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Globally silence (or re-enable) progress bars, e.g. from ``dinov3geo --quiet``."""
    global _QUIET
    _QUIET = quiet


def progress_bar(total: int | None = None, desc: str = "", disable: bool = False, **kw: Any) -> tqdm:
    """A tqdm bar with elapsed time and ETA; disabled by :func:`set_quiet` or ``DINOV3GEO_NO_PROGRESS=1``."""
    off = disable or _QUIET or os.environ.get("DINOV3GEO_NO_PROGRESS") == "1"
    return tqdm(total=total, desc=desc, disable=off, dynamic_ncols=True, file=sys.stderr, **kw)


def configure_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Log to stderr: WARNING by default, INFO with ``-v``, DEBUG with ``-vv``; ERROR only with ``--quiet``."""
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    # GDAL's harmless TIFF quirk warnings (e.g. ExtraSamples) only with -vv
    for name in ("rasterio", "rasterio._env", "distributed", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 2 else max(level, logging.ERROR))
    set_quiet(quiet)
