"""Intra-op threads follow the cores other processes leave free (dinov3geo.utils.threads), with real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch

from dinov3geo.utils.threads import FairThreads, fair_threads, fair_threads_setting, other_load, tick_threads

CPUS = len(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(CPUS < 2, reason="needs at least 2 cores to leave one free")


@pytest.fixture
def hog() -> Iterator[subprocess.Popen]:
    """A plain Python busy loop on one core (what a user's other job looks like)."""
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)
    try:
        yield p
    finally:
        p.kill()
        p.wait()


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(CPUS)
    yield
    torch.set_num_threads(n)


@needs_two
def test_other_load_sees_a_busy_process_and_not_ourselves(hog: subprocess.Popen) -> None:
    load = other_load(0.5)
    assert load is not None and 0.7 < load < 1.6
    # our own work is not "others": spin in this process while measuring
    hog.kill()
    hog.wait()
    import threading

    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    t = threading.Thread(target=spin)
    t.start()
    try:
        mine = other_load(0.5)
    finally:
        stop.set()
        t.join()
    assert mine is not None and mine < 0.5


@needs_two
def test_threads_drop_beside_a_busy_process_and_come_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DINOV3GEO_THREADS", raising=False)
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)
    try:
        with FairThreads(interval=0.3, probe=0.3) as ft:
            assert torch.get_num_threads() == CPUS - 1  # one core is taken
            p.kill()
            p.wait()
            time.sleep(0.4)
            ft.tick()
            assert torch.get_num_threads() == CPUS  # free again
            assert [h[2] for h in ft.history] == [CPUS - 1, CPUS]
        assert torch.get_num_threads() == CPUS  # restored
    finally:
        p.kill()
        p.wait()


@needs_two
def test_nested_fair_threads_share_one_governor_and_tick_reaches_it(hog: subprocess.Popen,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DINOV3GEO_THREADS", raising=False)
    torch.set_num_threads(CPUS)
    with fair_threads(interval=0.2) as outer:
        with fair_threads() as inner:
            assert inner is outer
        hog.kill()
        hog.wait()
        time.sleep(0.3)
        tick_threads()
        assert torch.get_num_threads() == CPUS
    tick_threads()  # no governor: nothing happens


def test_fixed_setting_and_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(CPUS)
    monkeypatch.setenv("DINOV3GEO_THREADS", "1")
    assert fair_threads_setting() == 1
    with FairThreads() as ft:
        assert torch.get_num_threads() == 1
        assert ft.tick() == 1
    assert torch.get_num_threads() == CPUS
    with FairThreads(fixed=1):  # a config's explicit `threads`
        assert torch.get_num_threads() == 1
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv("DINOV3GEO_THREADS", bad)
        with pytest.raises(ValueError, match="DINOV3GEO_THREADS=.*'auto' or a positive number"):
            fair_threads_setting()
    monkeypatch.setenv("DINOV3GEO_THREADS", "auto")
    assert fair_threads_setting() == "auto"


def test_apply_false_only_computes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DINOV3GEO_THREADS", "1")
    torch.set_num_threads(CPUS)
    with FairThreads(apply=False) as ft:
        assert ft.tick() == 1
        assert torch.get_num_threads() == CPUS  # the caller decides


@needs_two
def test_a_niced_process_leaves_the_threads_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `nice -n 19` job yields its core: it must not cost us a thread (unless we are niced ourselves, or the
    kernel's session autogroups make nice meaningless across sessions: then it is counted)."""
    import dinov3geo.utils.threads as T

    monkeypatch.delenv("DINOV3GEO_THREADS", raising=False)
    monkeypatch.setattr(T, "_autogroup", lambda: False)
    p = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)
    try:
        load = other_load(0.5)
        assert load is not None and load < 0.4
        with FairThreads(probe=0.3):
            assert torch.get_num_threads() == CPUS
    finally:
        p.kill()
        p.wait()


@needs_two
def test_with_autogroups_a_niced_process_of_another_session_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    import dinov3geo.utils.threads as T

    monkeypatch.setattr(T, "_autogroup", lambda: True)
    p = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "while True: pass"], start_new_session=True)
    time.sleep(0.3)
    try:
        load = other_load(0.5)
        assert load is not None and load > 0.3  # it runs (nothing else competes with it for its core)
    finally:
        p.kill()
        p.wait()
