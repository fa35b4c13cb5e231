"""Progress bars (tqdm, with ETA) and logging set-up shared by the CLI and long-running APIs.

:func:`configure_logging` sends log records to stderr as one clean line each (``LEVEL logger: message``,
terminal colour codes removed) and routes Python warnings through the same path (logger ``py.warnings``):
warnings raised by dinov3geo's own code are shown as ``WARNING`` lines, those of other libraries (shapely,
numpy, rasterio, Lightning deprecations...) as ``INFO`` lines, visible with ``-v``. Lightning's own console
handler is removed once Lightning is imported, so its messages are shown once, at the CLI's verbosity.

The last warnings and errors are remembered even when ``--quiet`` hides them (:func:`recent_problems`), so
the CLI can still explain a command that failed without printing anything.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import sys
import warnings
from typing import Any

from tqdm.auto import tqdm

__all__ = [
    "ANSI_RE",
    "configure_logging",
    "progress_bar",
    "recent_problems",
    "set_quiet",
    "strip_ansi",
]

_QUIET = False

#: terminal escape sequences (colours, cursor moves, OSC hyperlinks)
ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")

#: libraries whose records are shown only with ``-vv`` (their warnings are mostly harmless GDAL quirks)
NOISY_LOGGERS = ("rasterio", "rasterio._env", "distributed", "lightning", "lightning.pytorch", "lightning.fabric")

_DINOV3GEO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_state: dict[str, Any] = {"library_level": logging.ERROR, "factory": None}
_recent: collections.deque[tuple[int, str, bool]] = collections.deque(maxlen=50)


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences (colours, bold...)."""
    return ANSI_RE.sub("", text)


def set_quiet(quiet: bool) -> None:
    """Globally silence (or re-enable) progress bars, e.g. from ``dinov3geo --quiet``."""
    global _QUIET
    _QUIET = quiet


def progress_bar(total: int | None = None, desc: str = "", disable: bool = False, **kw: Any) -> tqdm:
    """A tqdm bar with elapsed time and ETA; disabled by :func:`set_quiet` or ``DINOV3GEO_NO_PROGRESS=1``."""
    off = disable or _QUIET or os.environ.get("DINOV3GEO_NO_PROGRESS") == "1"
    return tqdm(total=total, desc=desc, disable=off, dynamic_ncols=True, file=sys.stderr, **kw)


class _CleanFormatter(logging.Formatter):
    """The usual format, with terminal escape codes removed from the whole line."""

    def format(self, record: logging.LogRecord) -> str:
        return strip_ansi(super().format(record))


class _Recorder(logging.Handler):
    """Remembers recent WARNING+ records, and whether the stderr handler showed them."""

    def __init__(self, shown_level: int) -> None:
        super().__init__(logging.WARNING)
        self.shown_level = shown_level

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = strip_ansi(record.getMessage())
        except Exception:  # noqa: BLE001 - a bad format string must not break the command
            msg = str(record.msg)
        _recent.append((record.levelno, msg, record.levelno >= self.shown_level))


def recent_problems() -> list[tuple[int, str, bool]]:
    """``(level, message, shown)`` of the warnings and errors logged since :func:`configure_logging`."""
    return list(_recent)


def _showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` replacement: one log line ``Category: message (file:line)``."""
    if file is not None:  # an explicit destination: keep Python's behaviour
        _state["orig_showwarning"](message, category, filename, lineno, file, line)
        return
    text = " ".join(strip_ansi(str(message)).split())
    path = os.path.abspath(filename) if filename else ""
    ours = path.startswith(_DINOV3GEO_DIR + os.sep)
    where = os.path.relpath(path, os.path.dirname(_DINOV3GEO_DIR)) if ours else _short_path(path)
    dev = issubclass(category, DeprecationWarning | PendingDeprecationWarning | FutureWarning)
    level = logging.WARNING if ours and not dev else logging.INFO
    logging.getLogger("py.warnings").log(level, "%s: %s (%s:%s)", category.__name__, text, where, lineno)


def _short_path(path: str) -> str:
    """``shapely/set_operations.py`` for a file inside site-packages, else the file name."""
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if marker in path:
            return path.split(marker, 1)[1]
    return os.path.basename(path) or "?"


def _tame_lightning() -> None:
    """Lightning adds its own stderr handler (and INFO level) to its loggers when imported: remove the
    handler and apply the CLI's level, so its messages appear once, at the CLI's verbosity."""
    if "lightning" not in sys.modules:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):  # its console handler: a plain StreamHandler on (some) stderr
            if type(h) is logging.StreamHandler and getattr(h, "stream", None) is not sys.stdout:
                lg.removeHandler(h)
        lg.propagate = True
        lg.setLevel(_state["library_level"])


def _install_record_factory() -> None:
    """Tame Lightning's loggers as soon as the first Lightning record is made (it is imported lazily)."""
    if _state["factory"] is not None:
        return
    base = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        if record.name.startswith("lightning"):  # rare: re-apply (a subpackage may have been imported since)
            _tame_lightning()
        return record

    _state["factory"] = factory
    logging.setLogRecordFactory(factory)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler writing to whatever ``sys.stderr`` is when a record is emitted (not the stream of the
    moment it was made: a caller that swaps ``sys.stderr``, e.g. pytest's capture, never gets records written to
    a closed stream)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ / setStream assign it: ignored
        pass


def configure_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Log to stderr: WARNING by default, INFO with ``-v``, DEBUG with ``-vv``; ERROR only with ``--quiet``.

    Python warnings become log lines (see the module docstring); warnings and errors hidden by ``--quiet``
    are still remembered for :func:`recent_problems`.
    """
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    stream = _StderrHandler()
    stream.setLevel(level)
    stream.setFormatter(_CleanFormatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(stream)
    root.addHandler(_Recorder(level))
    root.setLevel(min(level, logging.WARNING))  # warnings are made (and remembered) even with --quiet
    _recent.clear()
    # GDAL's harmless TIFF quirk warnings (e.g. ExtraSamples), Lightning's banners: only with -vv
    _state["library_level"] = logging.DEBUG if verbose >= 2 else max(level, logging.ERROR)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(_state["library_level"])
    _tame_lightning()
    _install_record_factory()
    if warnings.showwarning is not _showwarning:
        _state["orig_showwarning"] = warnings.showwarning
        warnings.showwarning = _showwarning
    set_quiet(quiet)
