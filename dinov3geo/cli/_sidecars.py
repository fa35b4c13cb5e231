"""Moved to :mod:`dinov3geo.io.sidecars` (the task functions write their products' sidecars themselves; the CLI
commands pass ``sidecars={"dinov3geo:command": ...}`` through). Kept as a re-export for old imports."""

from __future__ import annotations

from dinov3geo.io.sidecars import write_sidecars

__all__ = ["write_sidecars"]
