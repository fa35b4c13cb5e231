"""``make demo`` per stage on an idle machine and beside one CPU-bound process: do our thread pools share?

Users run dinov3geo on laptops and shared servers, next to other work. With 2 cores and one busy process beside
it, a fair share is half the machine: a stage should take at most ~2x its idle time. A stage much slower than
that has thread pools fighting each other (torch/OpenMP intra-op threads spinning, DataLoader workers, GDAL and
dask threads oversubscribing the cores).

Run from the repository root::

    .venv/bin/python benchmarks/busy_machine.py                 # idle, busy, idle, busy (2 rounds)
    .venv/bin/python benchmarks/busy_machine.py --rounds 1 --json busy.json

Each run executes ``dinov3geo run pipelines/demo.yaml --force`` into its own fresh outputs folder (in a fresh
process, nothing cached) and reads the per-stage seconds from the pipeline manifest. The "busy" runs start a
plain Python busy loop (``while True: pass``, one core) before the pipeline and stop it after. Idle and busy
runs are interleaved, so drift on a shared machine hits both alike; the fastest of each per stage is used and
the ratio busy / idle is printed per stage with the goal (<= 2.5x). ``--threads 2`` fixes torch's threads
(``DINOV3GEO_THREADS``) to show what the stages do without the free-core policy of dinov3geo.utils.threads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import environment, log, print_table, write_json

GOAL = 2.5
ROOT = Path(__file__).resolve().parents[1]
BUSY_LOOP = "while True: pass"


def run_demo(outputs: Path, busy: bool, pipeline: str, threads: str | None = None) -> dict[str, float]:
    """Per-stage seconds of one forced demo run into ``outputs`` (a busy loop beside it when ``busy``)."""
    hog = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        if hog is not None:
            time.sleep(0.5)  # the loop is running before the first stage starts
        t0 = time.perf_counter()
        env = dict(os.environ)
        if threads is not None:
            env["DINOV3GEO_THREADS"] = threads
        r = subprocess.run([str(ROOT / ".venv/bin/dinov3geo"), "-q", "run", pipeline, "--force",
                            "--set", f"outputs={outputs}"], cwd=ROOT, capture_output=True, text=True, env=env)
        total = time.perf_counter() - t0
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if r.returncode != 0:
        raise RuntimeError(f"the demo failed ({'busy' if busy else 'idle'}):\n{r.stdout}\n{r.stderr}")
    manifest = json.loads(next(outputs.glob("pipeline-*.json")).read_text())
    out = {name: float(rec["seconds"]) for name, rec in manifest["stages"].items()}
    out["(whole run)"] = total
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="idle/busy pairs (interleaved; fastest used)")
    ap.add_argument("--pipeline", default="pipelines/demo.yaml")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", default=None,
                    help="DINOV3GEO_THREADS for the runs: 'auto' (default: torch's threads follow the free cores) "
                         "or a fixed count, e.g. 2 to see what the demo does without the policy")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dinov3geo-busy-"))
    runs: dict[str, list[dict[str, float]]] = {"idle": [], "busy": []}
    try:
        for r in range(args.rounds):
            for kind in ("idle", "busy"):
                out = work / f"{kind}{r}"
                res = run_demo(out, kind == "busy", args.pipeline, args.threads)
                runs[kind].append(res)
                log(f"round {r + 1}/{args.rounds} {kind}: {res['(whole run)']:.1f} s")
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stages = list(runs["idle"][0])
    rows: list[list[Any]] = []
    ratios: dict[str, float] = {}
    for st in stages:
        idle = min(x[st] for x in runs["idle"])
        busy = min(x[st] for x in runs["busy"])
        ratios[st] = busy / idle if idle > 0 else float("nan")
        rows.append([st, idle, busy, ratios[st], "met" if ratios[st] <= GOAL else "NOT met"])
    print_table(rows, ["stage", "idle s (best)", "beside a busy loop s (best)", "busy / idle",
                       f"goal <= {GOAL}"],
                title=f"`make demo` per stage, idle vs beside one CPU-bound process; best of {args.rounds} "
                      f"interleaved rounds; DINOV3GEO_THREADS={args.threads or os.environ.get('DINOV3GEO_THREADS', 'auto')}")
    if args.json:
        write_json(args.json, {"environment": environment(), "runs": runs, "ratios": ratios, "goal": GOAL,
                               "threads": args.threads or os.environ.get("DINOV3GEO_THREADS", "auto")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
