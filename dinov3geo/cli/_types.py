"""Validating ``argparse`` types and pre-flight checks shared by the ``dinov3geo`` subcommands.

Every numeric option gets a ``type=`` from here, so a bad value is refused while the arguments are parsed,
before anything is read or allocated, with one line naming the option::

    dinov3geo change detect: error: argument --threshold: must be a finite number, got 'nan'

* :func:`integer` / :func:`number`: ranges (``lo``/``hi``, open or closed); numbers must be finite (``nan``
  and ``inf`` refused unless ``allow_nan``);
* :func:`multiple_of`: window sizes (a positive multiple of the patch size; the message proposes the two
  nearest valid values);
* :func:`number_list` / :func:`integer_list`: comma-separated lists (``--mean``, ``--bins``, ``--layers``);
* :func:`size_wxh`: ``WIDTHxHEIGHT``.

Checks that need more than one option, or the input's size, raise :class:`UsageError` (exit status 2) from
a subcommand's ``check`` hook or run function: :func:`check_window_memory` estimates what one batch of
windows needs against the memory available (:func:`available_memory`, ``psutil`` or ``/proc/meminfo``), and
:func:`check_output_parent` refuses an output whose folder cannot be created, before any work.

Nothing here imports more than the standard library at module level (``dinov3geo --help`` stays fast).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "UsageError",
    "available_memory",
    "check_output_parent",
    "check_window_memory",
    "format_bytes",
    "integer",
    "integer_list",
    "multiple_of",
    "number",
    "number_list",
    "raster_size",
    "round_up",
    "size_wxh",
]


class UsageError(ValueError):
    """Options that do not work together, or do not fit the input (the CLI exits with status 2)."""


# ---------------------------------------------------------------------------------------------- scalars
def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    return " and ".join(parts)


def _check_range(x: float, text: str, what: str, lo: float | None, hi: float | None, lo_open: bool,
                 hi_open: bool) -> None:
    bad = (lo is not None and (x <= lo if lo_open else x < lo)) or (hi is not None and (x >= hi if hi_open else x > hi))
    if bad:
        raise argparse.ArgumentTypeError(f"must be {what} {_range_text(lo, hi, lo_open, hi_open)}, got {text!r}")


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An ``int`` option in ``[lo, hi]`` (either bound optional)."""

    def parse(text: str) -> int:
        try:
            x = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        _check_range(x, text, "an integer", lo, hi, False, False)
        return x

    parse.__name__ = "integer"
    return parse


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           allow_nan: bool = False) -> Callable[[str], float]:
    """A finite ``float`` option in the range ``lo``..``hi`` (open ends with ``lo_open``/``hi_open``).

    ``allow_nan`` accepts ``nan`` (a nodata value), never ``inf``.
    """

    def parse(text: str) -> float:
        try:
            x = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if math.isnan(x) and allow_nan:
            return x
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        _check_range(x, text, "a number", lo, hi, lo_open, hi_open)
        return x

    parse.__name__ = "number"
    return parse


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= value`` (and >= ``multiple``)."""
    return max(multiple, -(-int(value) // multiple) * multiple)


def multiple_of(multiple: int, lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """A window-size option: a positive integer multiple of ``multiple`` (at least ``lo`` when given)."""
    lo = max(multiple, round_up(lo, multiple)) if lo else multiple

    def parse(text: str) -> int:
        try:
            x = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer (a multiple of {multiple}), got {text!r}") from None
        if x < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo} (a multiple of {multiple}), got {text!r}")
        if x % multiple:
            down, up = x // multiple * multiple, round_up(x, multiple)
            near = f"{down} or {up}" if down >= lo else f"{up}"
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple}, got {text!r}: use {near}")
        if hi is not None and x > hi:
            raise argparse.ArgumentTypeError(f"must be at most {hi}, got {text!r}")
        return x

    parse.__name__ = "window"
    return parse


# ---------------------------------------------------------------------------------------------- lists
def number_list(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False, increasing: bool = False,
                length: int | None = None) -> Callable[[str], list[float]]:
    """A comma-separated list of finite numbers (each in the range; strictly increasing when asked)."""
    one = number(lo, hi, lo_open=lo_open, hi_open=hi_open)

    def parse(text: str) -> list[float]:
        items = [x for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of numbers, got {text!r}")
        out = []
        for x in items:
            try:
                out.append(one(x))
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"item {x.strip()!r} of {text!r}: {e}") from None
        if increasing and any(b <= a for a, b in zip(out, out[1:], strict=False)):
            raise argparse.ArgumentTypeError(f"must be strictly increasing, got {text!r}")
        if length is not None and len(out) != length:
            raise argparse.ArgumentTypeError(f"must have {length} values, got {len(out)} in {text!r}")
        return out

    parse.__name__ = "number list"
    return parse


def integer_list(lo: int | None = None, hi: int | None = None) -> Callable[[str], list[int]]:
    """A comma-separated list of integers in ``[lo, hi]``."""
    one = integer(lo, hi)

    def parse(text: str) -> list[int]:
        items = [x for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of integers, got {text!r}")
        out = []
        for x in items:
            try:
                out.append(one(x))
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"item {x.strip()!r} of {text!r}: {e}") from None
        return out

    parse.__name__ = "integer list"
    return parse


def size_wxh(lo: int = 1, hi: int = 20000) -> Callable[[str], tuple[int, int]]:
    """``WIDTHxHEIGHT`` in pixels, each in ``[lo, hi]``."""

    def parse(text: str) -> tuple[int, int]:
        parts = text.lower().replace(" ", "").split("x")
        try:
            w, h = (int(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must look like WIDTHxHEIGHT (e.g. 1200x1800), got {text!r}") from None
        if not (lo <= w <= hi and lo <= h <= hi):
            raise argparse.ArgumentTypeError(f"width and height must be in [{lo}, {hi}], got {text!r}")
        return w, h

    parse.__name__ = "size"
    return parse


# ---------------------------------------------------------------------------------------------- memory
def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``psutil``, else ``/proc/meminfo``); None if unknown.

    ``DINOV3GEO_AVAILABLE_MEMORY`` (bytes) overrides it (tests, or a share of a machine):
    :func:`dinov3geo.utils.memory.host_available_memory`, which the automatic batch size uses too.
    """
    from dinov3geo.utils.memory import host_available_memory

    return host_available_memory()


def format_bytes(n: float) -> str:
    """``1.5 GiB``, ``320 MiB``..."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB", "MiB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def raster_size(source: Any, assume_crs: Any = None) -> tuple[int, int, int, int] | None:
    """``(height, width, bands, bytes per sample)`` of what ``source`` names, read from its header only.

    None when it cannot be told cheaply (a tile store, a list, something that does not open): the command
    then reports its own error.
    """
    if isinstance(source, list | tuple):
        if len(source) != 1:
            return None
        source = source[0]
    if not isinstance(source, str | os.PathLike) or (Path(source) / "zarr.json").exists():
        return None
    try:
        import numpy as np

        from dinov3geo.io.sources import open_scene

        sc = open_scene(source, crs=assume_crs)
        h, w = sc.grid.shape
        return int(h), int(w), len(sc.bands), int(np.dtype(sc.dtype).itemsize)
    except Exception:  # noqa: BLE001 - the command itself will name what is wrong with the input
        return None


def check_window_memory(
    option: str,
    window: int,
    batch_size: int,
    size: tuple[int, int, int, int] | None,
    *,
    out_bands: int = 1,
    scale: int = 1,
    batch_option: str = "--batch-size",
    multiple: int = 16,
    minimum: int = 1,
) -> None:
    """Refuse a window (and batch) whose buffers cannot fit in the available memory, before allocating.

    The estimate is a lower bound: per window the raw samples, their float32 copy and the valid mask
    (``bands * window^2 * (itemsize + 5)`` bytes) plus the float32 output and its blend weights
    (``(out_bands + 1) * (window / scale)^2 * 4``), times the windows of one batch (at most as many as the
    raster holds). The model's own activations come on top.

    Args:
        option: the window option's name in messages (``--window``, ``--tile``).
        size: ``(height, width, bands, itemsize)`` of the input (:func:`raster_size`); None skips the check.
        out_bands, scale: output bands and input pixels per output pixel of the model.
        multiple, minimum: what the window option accepts (for the size the message proposes).

    Raises:
        UsageError: naming the option, the raster size, the estimate and the memory available.
    """
    if size is None:
        return
    avail = available_memory()
    if avail is None:
        return
    h, w, bands, itemsize = size
    n_windows = math.ceil(h / window) * math.ceil(w / window)
    batch = max(1, min(batch_size, n_windows))
    per_window = bands * window * window * (itemsize + 5) + (out_bands + 1) * (window // max(scale, 1)) ** 2 * 4
    need = batch * per_window
    if need <= avail:
        return
    fit = max(round_up(max(h, w), multiple), round_up(minimum, multiple))
    what = f"{batch} windows of {window} x {window} px x {bands} band(s) need" if batch > 1 else \
        f"one window of {window} x {window} px x {bands} band(s) needs"
    advice = (f"the raster is {w} x {h} px, so {option} {fit} covers it in one window"
              if fit < window else f"use a smaller {option}" + (f" or {batch_option}" if batch > 1 else ""))
    raise UsageError(
        f"{option} {window}: {what} at least {format_bytes(need)} of memory, but {format_bytes(avail)} is available; {advice}")


# ---------------------------------------------------------------------------------------------- outputs
def check_output_parent(option: str, out: str | os.PathLike[str]) -> None:
    """Refuse an output whose folder cannot be created or written (a file in the way, no permission).

    Raises:
        UsageError: naming the option, the path and the part of it that is in the way.
    """
    p = Path(out).expanduser().absolute()
    parent = p.parent
    while not parent.exists():
        if parent.is_symlink():
            raise UsageError(f"{option} {os.fspath(out)!r}: {str(parent)!r} is a broken symbolic link; choose "
                             "another output path")
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {os.fspath(out)!r}: {str(parent)!r} is a file, not a folder; choose an "
                         "output path whose folders exist or can be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {os.fspath(out)!r}: no permission to write in {str(parent)!r}; choose "
                         "another output path")

