"""Start-up time of the ``dinov3geo`` command line: how long until help (or ``info``) prints.

Run from the repository root::

    .venv/bin/python benchmarks/cli_startup.py              # 7 fresh processes per command
    .venv/bin/python benchmarks/cli_startup.py --repeats 11 --json startup.json

Each command runs in a fresh process (``subprocess``, no cache shared but the OS page cache, warmed by one
untimed run first), interleaved with the floor ``python -c pass`` so drift on a shared machine hits both alike.
The median wall time of each and its ratio to the floor are printed. Goal: ``dinov3geo --help`` and
``dinov3geo COMMAND --help`` in <= 1.0 s (heavy modules, torch and Lightning included, load only when a
command runs).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import environment, print_table, write_json

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 1.0


def commands(raster: str) -> dict[str, list[str]]:
    exe = str(ROOT / ".venv/bin/dinov3geo")
    return {
        "python -c pass (floor)": [sys.executable, "-c", "pass"],
        "dinov3geo --help": [exe, "--help"],
        "dinov3geo canopy predict --help": [exe, "canopy", "predict", "--help"],
        "dinov3geo change detect --help": [exe, "change", "detect", "--help"],
        "dinov3geo features --help": [exe, "features", "--help"],
        "dinov3geo ingest --help": [exe, "ingest", "--help"],
        f"dinov3geo info {Path(raster).name}": [exe, "info", raster],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--raster", default=str(ROOT / "data/landsat/rasterio_RGB.byte.tif"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cmds = commands(args.raster)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for cmd in cmds.values():  # warm the page cache
        subprocess.run(cmd, capture_output=True, check=True)
    for _ in range(args.repeats):
        for name, cmd in cmds.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True)
            times[name].append(time.perf_counter() - t0)
    floor = statistics.median(times["python -c pass (floor)"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        goal = "" if "floor" in name or "info" in name else ("met" if med <= GOAL_S else "NOT met")
        rows.append([name, med, f"{min(ts):.3f}-{max(ts):.3f}", med / floor, goal])
    print_table(rows, ["command", "median s", "range s", "x python -c pass", f"goal <= {GOAL_S} s"],
                title=f"CLI start-up, median of {args.repeats} fresh processes")
    if args.json:
        write_json(args.json, {"environment": environment(), "seconds": times})
    return 0


if __name__ == "__main__":
    sys.exit(main())
