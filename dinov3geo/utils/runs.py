"""Runs of consecutive integers (slots of a store, tile columns of a file) for reading or writing in one call."""

from __future__ import annotations

from collections.abc import Iterable


def consecutive_runs(items: Iterable[int]) -> list[tuple[int, int]]:
    """``[(start, length)]`` of the runs of consecutive integers in ``items``, in their order:
    ``[3, 4, 5, 9, 10]`` -> ``[(3, 3), (9, 2)]``."""
    runs: list[tuple[int, int]] = []
    for x in items:
        if runs and runs[-1][0] + runs[-1][1] == x:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((x, 1))
    return runs
