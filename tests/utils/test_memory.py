"""keep_freed_memory: big freed buffers stay in the heap inside the context, go back to mmap outside."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from dinov3geo.utils.memory import _glibc, keep_freed_memory


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mmapped_bytes() -> int:
    libc = _glibc()
    libc.mallinfo2.restype = _Mallinfo2
    return int(libc.mallinfo2().hblkhd)


@pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc() is None, reason="glibc only")
def test_big_allocations_come_from_the_heap_inside_the_context():
    n = 48 * 2**20 // 4  # 48 MiB: above glibc's largest dynamic mmap threshold (32 MiB)
    before = _mmapped_bytes()
    t = torch.empty(n)
    outside = _mmapped_bytes() - before
    del t
    with keep_freed_memory() as changed:
        assert changed
        before = _mmapped_bytes()
        t = torch.empty(n)
        inside = _mmapped_bytes() - before
        del t
    after_exit = _mmapped_bytes()
    t = torch.empty(n)
    restored = _mmapped_bytes() - after_exit
    del t
    assert outside >= n * 4  # a fresh mmap per buffer by default ...
    assert inside == 0  # ... from the heap (and reused) inside the context
    assert restored >= n * 4  # defaults back after the context


@pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc() is None, reason="glibc only")
def test_nested_contexts_keep_the_settings_until_the_last_exits():
    n = 48 * 2**20 // 4
    with keep_freed_memory():
        with keep_freed_memory() as inner:
            assert inner
        before = _mmapped_bytes()
        t = torch.empty(n)
        assert _mmapped_bytes() - before == 0  # still from the heap: the outer context is open
        del t
    before = _mmapped_bytes()
    t = torch.empty(n)
    assert _mmapped_bytes() - before >= n * 4
    del t


def test_disabled_is_a_no_op():
    with keep_freed_memory(enabled=False) as changed:
        assert changed is False
