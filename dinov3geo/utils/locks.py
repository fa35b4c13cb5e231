"""Output locks: one dinov3geo process at a time writes an output (tile store, COG, features, pipeline outputs).

:func:`output_lock` takes an exclusive, non-blocking ``flock`` on a hidden lock file next to the output
(``.<name>.lock`` in the same folder). The lock file records who holds it (process id, host, command, start
time), so a second process that wants the same output is refused with a message naming the holder, before it
writes anything::

    with output_lock("tiles.zarr", what="ingest"):
        ...  # write the store

Stale locks are impossible by construction: the kernel releases an ``flock`` when the holding process dies
(``kill -9`` included), and the next process simply takes the file over. The lock file is removed on release;
a process that opened the file just before it was removed notices (the inode changed) and retries.

Locks are re-entrant within a thread (a pipeline stage that calls ``ingest`` on the store the stage already
holds takes the same lock again). Processes forked while a lock is held (dask or DataLoader workers) share it.

On a filesystem without ``flock`` support the output is written unlocked, with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dinov3geo.io.errors import OutputError

__all__ = ["OutputLockedError", "lock_path", "output_lock", "read_holder"]

log = logging.getLogger(__name__)

_HELD: dict[str, list[int]] = {}  # lock path -> [fd, depth, owner thread id]
_HELD_GUARD = threading.Lock()
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # flock unsupported here


class OutputLockedError(OutputError):
    """Another process holds the lock of an output."""

    def __init__(self, path: Any, holder: dict[str, Any] | None) -> None:
        who = describe_holder(holder)
        super().__init__(path, f"another dinov3geo run is writing it ({who})",
                         "Wait for that run to finish (or stop it), then re-run; or choose another output.")
        self.holder = holder or {}


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of ``target``: ``.<name>.lock`` in the same folder."""
    t = Path(target).expanduser().absolute()
    return t.with_name(f".{t.name}.lock")


def read_holder(lock: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What a lock file says about its holder (None when missing or unreadable)."""
    try:
        text = Path(lock).read_text()
        data = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe_holder(holder: dict[str, Any] | None) -> str:
    """``pid 123 on host, since 2026-12-07T01:02:03Z: `dinov3geo ingest ...``` (or what is known of it)."""
    if not holder:
        return "holder unknown"
    parts = [f"pid {holder.get('pid', '?')}"]
    if holder.get("host"):
        parts.append(f"on {holder['host']}")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    text = " ".join(parts)
    if holder.get("command"):
        cmd = str(holder["command"])
        text += f": `{cmd if len(cmd) <= 160 else cmd[:157] + '...'}`"
    return text


def _holder_info(what: str) -> bytes:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    if prog == "__main__.py":  # python -m dinov3geo / python -m dinov3geo.cli
        prog = "dinov3geo"
    argv = [prog, *sys.argv[1:]]
    info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "since": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "command": shlex.join(argv)}
    return (json.dumps(info) + "\n").encode()


def _try_lock(lock: Path, what: str) -> int | None:
    """The fd of ``lock`` locked by us, None when another process holds it."""
    import fcntl

    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:  # the file may have been removed (released) between our open and our flock: retry on a new one
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder_info(what), 0)
        except OSError as exc:  # a full disk: the lock holds without the holder's record
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                os.close(fd)
                raise
        return fd


@contextlib.contextmanager
def output_lock(target: str | os.PathLike[str], what: str = "", wait: float = 0.0) -> Iterator[Path]:
    """Hold the exclusive lock of ``target`` (a file or folder path) for the body.

    Args:
        target: the output to protect. Its folder must exist or be creatable.
        what: a word for the holder record (``"ingest"``, ``"predict"``...).
        wait: seconds to wait for another holder before refusing (0: refuse at once).
            ``DINOV3GEO_LOCK_WAIT`` (seconds) in the environment raises the default.

    Raises:
        OutputLockedError: another process holds it (the message names pid, host, time and command).
    """
    lock = lock_path(target)
    key = str(lock)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held[2] != threading.get_ident():
            raise OutputLockedError(Path(target).expanduser().absolute(), read_holder(lock))
        if held is not None:
            held[1] += 1
        reentered = held is not None
    if reentered:
        try:
            yield lock
        finally:
            with _HELD_GUARD:
                _HELD[key][1] -= 1
        return
    with contextlib.suppress(ValueError):
        wait = max(wait, float(os.environ.get("DINOV3GEO_LOCK_WAIT", "0") or 0))
    created: list[Path] = []  # folders made for the lock file: removed again on release if still empty
    anc = lock.parent
    while not anc.exists():
        created.append(anc)
        anc = anc.parent
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield from _hold(lock, key, target, what, wait)
    finally:
        for d in created:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()


def _hold(lock: Path, key: str, target: str | os.PathLike[str], what: str, wait: float) -> Iterator[Path]:
    """Take the lock file (waiting up to ``wait`` s), yield, release."""
    deadline = time.monotonic() + wait
    fd: int | None
    while True:
        try:
            fd = _try_lock(lock, what)
        except OSError as exc:  # no flock on this filesystem (some network/FUSE mounts)
            if exc.errno not in _NO_FLOCK:
                raise
            log.warning("cannot lock %s (%s); writing %s without a lock", lock, exc.strerror or exc, target)
            fd = -1
        if fd is not None:
            break
        if time.monotonic() >= deadline:
            raise OutputLockedError(Path(target).expanduser().absolute(), read_holder(lock))
        time.sleep(min(0.5, max(0.05, deadline - time.monotonic())))
    with _HELD_GUARD:
        _HELD[key] = [fd, 1, threading.get_ident()]
    try:
        yield lock
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(lock)  # before unlocking: a waiter that opened the old file sees the inode change
            os.close(fd)
