"""keep_freed_memory: big freed buffers stay in the heap inside the context, go back to mmap outside."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dinov3geo.utils import memory
from dinov3geo.utils.memory import _glibc, keep_freed_memory

_PROBE = textwrap.dedent("""
    import ctypes, torch
    from dinov3geo.utils.memory import _glibc, keep_freed_memory

    class M(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = _glibc()
    libc.mallinfo2.restype = M

    def mmapped_growth(n):  # bytes of new mmapped chunks for one allocation of n floats
        before = libc.mallinfo2().hblkhd
        t = torch.empty(n)
        grown = libc.mallinfo2().hblkhd - before
        del t
        return grown

    n = 48 * 2**20 // 4  # 48 MiB: above glibc's largest dynamic mmap threshold (32 MiB)
    outside = mmapped_growth(n)
    with keep_freed_memory() as on:
        inside = mmapped_growth(n)
    after = mmapped_growth(n)
    after_small = mmapped_growth(2**20 // 4)  # 1 MiB
    print(on, outside, inside, after, after_small)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc() is None, reason="glibc only")
def test_big_allocations_come_from_the_heap_inside_the_context():
    # in a fresh process: the heap of this test process may hold free chunks of earlier tests
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout.split()
    on, outside, inside, after, after_small = out[0], *map(int, out[1:])
    assert on == "True"
    assert outside >= 48 * 2**20  # a fresh mmap per buffer by default ...
    assert inside == 0  # ... from the heap (and reused) inside the context
    assert after >= 48 * 2**20  # big buffers are mmapped again after the context ...
    assert after_small == 0  # ... but not every buffer above 128 KiB (glibc's initial threshold, static for
    # good once set: it made the demo's canopy training 2.5x slower, all of it system time)


class _FakeLibc:
    def __init__(self, refuse: int | None = None) -> None:
        self.calls: list[tuple] = []
        self.refuse = refuse  # a parameter whose first setting is refused

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 0 if param == self.refuse and len(self.calls) <= 2 else 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim", pad))
        return 1


def test_nested_contexts_keep_the_settings_until_the_last_exits(monkeypatch: pytest.MonkeyPatch):
    fake = _FakeLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: fake)
    with keep_freed_memory() as outer:
        assert outer and len(fake.calls) == 2  # both thresholds raised
        with keep_freed_memory() as inner:
            assert inner and len(fake.calls) == 2  # already in effect: nothing changed
        assert len(fake.calls) == 2  # the inner exit does not restore while the outer is open
    # not glibc's initial 128 KiB (that would keep every later allocation above it mmapped): the values its
    # dynamic rule settles at
    assert fake.calls[2:] == [("mallopt", memory._M_MMAP_THRESHOLD, 32 * 2**20),
                              ("mallopt", memory._M_TRIM_THRESHOLD, 64 * 2**20), ("trim", 0)]
    assert memory._active == 0


def test_a_refused_threshold_leaves_both_at_the_exit_values(monkeypatch: pytest.MonkeyPatch):
    fake = _FakeLibc(refuse=memory._M_TRIM_THRESHOLD)
    monkeypatch.setattr(memory, "_glibc", lambda: fake)
    with keep_freed_memory() as on:
        assert on is False
    assert fake.calls[2:] == [("mallopt", memory._M_MMAP_THRESHOLD, 32 * 2**20),
                              ("mallopt", memory._M_TRIM_THRESHOLD, 64 * 2**20)]
    assert memory._active == 0


def test_disabled_is_a_no_op():
    with keep_freed_memory(enabled=False) as changed:
        assert changed is False
