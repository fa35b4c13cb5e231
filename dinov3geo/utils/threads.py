"""Torch's intra-op threads follow the cores that other processes leave free.

Users run dinov3geo beside other work. torch starts one OpenMP thread per core and every parallel region waits
for its slowest thread, so when another process keeps one of two cores busy, a second intra-op thread makes a
step *slower* than one thread would (measured on the demo's canopy head, 2 cores, a Python busy loop beside:
4.6-5.6 s per epoch with two threads, 2.2-2.6 s with one, 1.3-1.4 s with two on idle cores). Passive OpenMP
waiting helps less (3.4 s busy) and costs on idle cores (2.5-2.9 s), so it is not used.

:class:`FairThreads` measures, every ``interval`` seconds, how much CPU *other* processes used on the cores this
process may run on (``/proc/stat`` for those cores minus this process's own time from ``/proc/self/stat``; our
DataLoader workers and other children count as others, so the intra-op threads leave room for them; niced
processes do not, since they yield their core, unless the kernel's session autogroups are on, where a niced job
of another session gets an equal share anyway) and sets
``torch.set_num_threads`` to the free cores (rounded, at least 1, at most the threads torch had on entry).
Loops call :meth:`FairThreads.tick` once per step (cheap: it reads two small files at most once per interval).
On entry it takes one short sample so that the first steps already run with the right count.

``DINOV3GEO_THREADS`` sets the policy: ``auto`` (default), or a number of threads to use throughout (as does
``OMP_NUM_THREADS``, which caps ``auto``). Without ``/proc`` (macOS, Windows) torch's setting is kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

__all__ = ["FairThreads", "fair_threads", "fair_threads_setting", "other_load", "tick_threads"]

log = logging.getLogger(__name__)

_ENV = "DINOV3GEO_THREADS"
_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def fair_threads_setting() -> str | int:
    """``"auto"`` or the fixed thread count from ``DINOV3GEO_THREADS`` (a clear error for anything else)."""
    raw = os.environ.get(_ENV, "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{_ENV}={os.environ.get(_ENV)!r}: use 'auto' or a positive number of threads")
    return n


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _busy_ticks(cpus: set[int], nice: bool = False) -> int | None:
    """Busy ticks (user, system, irq, softirq, steal; ``nice`` too when asked) summed over ``cpus``.

    Time of niced processes is left out unless ``nice``: a ``nice -n 19`` job yields its core to us (CFS gives
    it ~1.5 % of a core beside a normal thread), so it does not take a core away. None without /proc/stat.
    """
    try:
        text = Path("/proc/stat").read_text()
    except OSError:
        return None
    total = 0
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *vals = line.split()
        try:
            idx = int(name[3:])
        except ValueError:
            continue
        if idx in cpus:
            v = [int(x) for x in vals[:8]] + [0] * 8
            total += v[0] + (v[1] if nice else 0) + v[2] + v[5] + v[6] + v[7]
    return total


def _own_ticks() -> int | None:
    """This process's user + system ticks (all threads); None without /proc."""
    try:
        text = Path("/proc/self/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; field 3 (state) is fields[0]
    return int(fields[11]) + int(fields[12])


def _autogroup() -> bool:
    """True when the kernel schedules by session groups (nice then only ranks processes within a group)."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False


def _own_nice() -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (AttributeError, OSError):
        return 0


class _Sampler:
    def __init__(self, cpus: list[int]) -> None:
        self.cpus = set(cpus)
        # niced time counts as load when we are niced ourselves (our own time is then under "nice") and when the
        # kernel groups processes by session (autogroup: a niced job of another session is not niced against us)
        self.nice = _own_nice() > 0 or _autogroup()
        self.t = time.monotonic()
        self.busy = _busy_ticks(self.cpus, self.nice)
        self.own = _own_ticks()

    @property
    def available(self) -> bool:
        return self.busy is not None and self.own is not None

    def sample(self) -> float | None:
        """Cores used by other processes since the previous sample (None when too short to tell)."""
        t, busy, own = time.monotonic(), _busy_ticks(self.cpus, self.nice), _own_ticks()
        if busy is None or own is None or self.busy is None or self.own is None:
            return None
        dt = t - self.t
        if dt * _CLK < 5:  # under 5 ticks: too coarse
            return None
        others = max(0.0, ((busy - self.busy) - (own - self.own)) / (dt * _CLK))
        self.t, self.busy, self.own = t, busy, own
        return others


def other_load(seconds: float = 0.25) -> float | None:
    """Cores that other processes keep busy (measured over ``seconds``); None where it cannot be measured."""
    s = _Sampler(_cpus())
    if not s.available:
        return None
    time.sleep(seconds)
    return s.sample()


class FairThreads:
    """Context manager: torch's intra-op threads follow the free cores (see the module docstring).

    ``max_threads`` caps the count (default: torch's setting on entry, itself capped by ``OMP_NUM_THREADS``);
    ``interval`` is the seconds between measurements; ``fixed`` (a count the user chose, e.g. a config's
    ``threads``) or ``DINOV3GEO_THREADS=N`` turn the adaptation off and use that count throughout. With
    ``apply=False`` the count is only computed (:attr:`threads`, returned by :meth:`tick`) for a caller that
    combines it with its own choice (the inference engine's thread tuner); ``probe`` is the seconds of the
    first measurement on entry (0: the first one comes after ``interval``). :attr:`history` keeps ``(seconds, other cores, threads)``
    of every change for diagnostics. On exit torch's setting is restored.
    """

    def __init__(self, max_threads: int | None = None, interval: float = 1.0, *, probe: float = 0.05,
                 fixed: int | None = None, apply: bool = True) -> None:
        self.fixed = fixed
        self.apply = apply
        self.interval = interval
        self.probe = probe
        self.max_threads = max_threads
        self.history: list[tuple[float, float, int]] = []
        self._sampler: _Sampler | None = None
        self._entry_threads: int | None = None
        self._t0 = 0.0
        self.threads = 0

    def _target(self, others: float, ncpu: int) -> int:
        # floor(free + 0.4): a core another process uses more than 40 % of is not ours
        return max(1, min(self._cap, int(ncpu - others + 0.4)))

    def __enter__(self) -> FairThreads:
        import torch

        self._entry_threads = torch.get_num_threads()
        _stack().append(self)
        setting = self.fixed if self.fixed else fair_threads_setting()
        self._t0 = time.monotonic()
        cpus = _cpus()
        self._ncpu = len(cpus)
        if setting != "auto":
            self._cap = int(setting)
            self._set(int(setting), None)
            return self
        self._cap = max(1, self.max_threads or self._entry_threads)
        self.threads = torch.get_num_threads()
        if self._cap <= 1 and self.threads <= 1:
            return self
        sampler = _Sampler(cpus)
        if not sampler.available:
            return self
        self._sampler = sampler
        if self.probe > 0:
            time.sleep(self.probe)
            others = sampler.sample()
            if others is not None:
                self._set(self._target(others, self._ncpu), others)
        return self

    def _set(self, n: int, others: float | None) -> None:
        import torch

        if self.apply and n != torch.get_num_threads():
            torch.set_num_threads(n)
            if others is not None:
                log.debug("intra-op threads -> %d (other processes use %.2f of %d cores)", n, others, self._ncpu)
        if n != self.threads or not self.history:
            self.history.append((round(time.monotonic() - self._t0, 3), round(others or 0.0, 3), n))
        self.threads = n

    def tick(self) -> int:
        """Re-measure when ``interval`` has passed and adjust the threads; returns the current count."""
        s = self._sampler
        if s is not None and time.monotonic() - s.t >= self.interval:
            others = s.sample()
            if others is not None:
                self._set(self._target(others, self._ncpu), others)
        return self.threads

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        import torch

        st = _stack()
        if self in st:
            st.remove(self)
        if self.apply and self._entry_threads is not None and torch.get_num_threads() != self._entry_threads:
            torch.set_num_threads(self._entry_threads)
        self._sampler = None


_local = threading.local()


def _stack() -> list[FairThreads]:
    st = getattr(_local, "stack", None)
    if st is None:
        st = _local.stack = []
    return st


def tick_threads() -> None:
    """Tick the innermost :class:`FairThreads` of this thread (nothing when none is active)."""
    st = _stack()
    if st:
        st[-1].tick()


@contextlib.contextmanager
def fair_threads(max_threads: int | None = None, interval: float = 1.0,
                 fixed: int | None = None) -> Iterator[FairThreads]:
    """:class:`FairThreads` unless one is already active in this thread (then that one goes on)."""
    st = _stack()
    if st and not fixed:
        yield st[-1]
        return
    with FairThreads(max_threads, interval, fixed=fixed) as ft:
        yield ft
