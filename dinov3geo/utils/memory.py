"""Host memory: what is available (:func:`host_available_memory`), and keeping freed memory in the process
during CPU training (glibc ``mallopt``, :func:`keep_freed_memory`).

A training step allocates and frees the same large buffers every iteration (activations, logits over
65,536 prototypes, gradients). glibc serves every allocation above its mmap threshold (128 KiB, adjusted
up to 32 MiB) with a fresh ``mmap`` and unmaps it on free, so each step faults the same pages in again and
the kernel zeroes them: on the 2-core development machine about 2.5 s of system time per 11 bare SSL steps,
7 % of the step time. CUDA has PyTorch's caching allocator for this; on CPU, PyTorch's tuning guide
recommends jemalloc/tcmalloc. :func:`keep_freed_memory` gets the same effect without a preloaded library:
it raises glibc's mmap and trim thresholds so freed blocks stay in the heap and are reused by the next
step. Peak memory stays close to one step's peak (the same blocks are reused; each thread's heap keeps its own
high-water mark: measured +1-3 % peak RSS for the SSL step, +20-70 MiB for a region-inference run); the
memory is returned to the system when the context exits (``malloc_trim``).

Linux with glibc only; elsewhere (macOS, Windows, musl) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("dinov3geo")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# On exit: setting either threshold turns glibc's dynamic threshold off for good, so "restoring" its initial
# 128 KiB would leave every allocation above 128 KiB mmapped and unmapped on free for the rest of the
# process (measured: the demo's canopy training 18.6 s -> 44.7 s, system time 3 s -> 44 s). Instead both are
# set to where the dynamic rule settles once large blocks have been freed (mallopt(3): mmap threshold up to
# 32 MiB on 64-bit systems, trim threshold twice the mmap threshold).
_RESTORE_MMAP = 32 * 1024 * 1024
_RESTORE_TRIM = 2 * _RESTORE_MMAP
# allocations up to this size come from the heap (the logits and gradients of a 65,536-prototype head are
# 32-64 MiB: a threshold of 32 MiB, the documented maximum of older glibc, measured no gain)
_MMAP_THRESHOLD = 1 << 30
_TRIM_THRESHOLD = 2**31 - 1  # free bytes at the top of the heap kept before trimming: all of them
_lock = threading.Lock()
_active = 0  # contexts currently open (the settings are process-wide: set by the first, restored by the last)


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError on musl
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the context, freed heap memory stays in the process for reuse (see module docstring).

    The allocator settings are process-wide: nested or concurrent contexts (e.g. two region runs in
    threads) share them; the last one to exit sets glibc's thresholds to where its dynamic rule settles
    (see ``_RESTORE_MMAP``) and returns free memory to the system.

    Args:
        enabled: ``False`` makes this a no-op (the context yields ``False``).

    Yields:
        Whether the settings are in effect (``False`` off glibc or when disabled).
    """
    global _active
    libc = _glibc() if enabled else None
    ok = False
    if libc is not None:
        with _lock:
            ok = _active > 0 or (bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
                                 and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)))
            if not ok:  # one of the two refused: put both back where the exit would
                libc.mallopt(_M_MMAP_THRESHOLD, _RESTORE_MMAP)
                libc.mallopt(_M_TRIM_THRESHOLD, _RESTORE_TRIM)
            _active += ok
        if not ok:
            log.debug("mallopt refused the thresholds; the allocator keeps its settings")
    elif enabled:
        log.debug("keep_freed_memory: not glibc, nothing changed")
    try:
        yield ok
    finally:
        if libc is not None and ok:
            with _lock:
                _active -= 1
                if _active == 0:
                    libc.mallopt(_M_MMAP_THRESHOLD, _RESTORE_MMAP)
                    libc.mallopt(_M_TRIM_THRESHOLD, _RESTORE_TRIM)
                    libc.malloc_trim(0)


def host_available_memory() -> int | None:
    """Bytes of host memory available to new allocations: ``DINOV3GEO_AVAILABLE_MEMORY`` (bytes; tests, or a
    share of a machine) when set, else ``psutil``'s available memory, else ``MemAvailable`` of ``/proc/meminfo``;
    None when unknown. Standard library only at import (the CLI's checks use it before loading torch).
    """
    env = os.environ.get("DINOV3GEO_AVAILABLE_MEMORY")
    if env:
        try:
            return int(float(env))
        except ValueError:
            pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - not installed, or no access: fall back
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
