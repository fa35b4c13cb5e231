"""Helpers shared by the benchmark scripts in this folder: subprocess runs, peak memory, tables, JSON.

Benchmarks here are plain scripts (not pytest tests). Each measurement that needs its own peak memory runs
in a fresh Python process started with :func:`run_child`: the child calls the measured function, then prints
one result line (``BENCH_RESULT {json}``) that includes its own peak RSS (see :func:`peak_rss_mib`), so peaks
of different runs never mix (``RUSAGE_CHILDREN`` would only give the maximum over all children so far).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: the high-water mark of this process image only.
    ``ru_maxrss`` is not used there because Linux carries the parent's RSS over into a child (it is the
    maximum over fork and exec), so a child started by a big parent would report the parent's size.
    Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS) is the fallback.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) this process has used so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def current_rss_mib() -> float:
    """Current resident set size of this process in MiB (from /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


def child_main(handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]], spec_json: str) -> None:
    """Entry point of a child process: run ``handlers[spec["kind"]](spec)`` and print its result line.

    The result gets ``peak_rss_mib`` (peak of the whole child process) added.
    """
    spec = json.loads(spec_json)
    result = handlers[spec["kind"]](spec)
    result["peak_rss_mib"] = peak_rss_mib()
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_child(script: str | Path, spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python script --child <spec>`` in a fresh process and return the dict it printed.

    Raises:
        RuntimeError: the child failed or printed no result line (its stderr tail is in the message).
    """
    cmd = [sys.executable, str(script), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            if proc.returncode != 0:
                break
            return dict(json.loads(line[len(RESULT_PREFIX):]))
    tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
    raise RuntimeError(f"benchmark child {spec.get('kind')!r} failed (exit {proc.returncode}):\n{tail}")


class Timer:
    """``with Timer() as t: ...``; then ``t.seconds`` is the wall time of the block."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0


def environment() -> dict[str, Any]:
    """Machine and library versions, for the JSON output."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    from dinov3geo.utils.cpu import cpu_info

    info["cpu"] = cpu_info()
    for mod in ("numpy", "rasterio", "zarr", "dask", "numcodecs"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        import rasterio

        info["gdal"] = rasterio.__gdal_version__
    except ImportError:
        pass
    info["gpu"] = gpu_info()
    return info


def gpu_info() -> dict[str, Any]:
    """The GPUs as torch and the driver see them: ``{"cuda_available", "torch", "torch_cuda", "cudnn", "devices":
    [{"name", "memory_gib", "capability", "multiprocessors", "bf16"}], "driver", "nvidia_smi"}``.

    Never raises: what cannot be read is None (no torch, no CUDA build, no ``nvidia-smi``)."""
    info: dict[str, Any] = {"cuda_available": False, "torch": None, "torch_cuda": None, "cudnn": None,
                            "devices": [], "driver": None, "nvidia_smi": None}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = bool(torch.cuda.is_available())
        if info["cuda_available"]:
            info["cudnn"] = torch.backends.cudnn.version()
            info["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32,
                            "cudnn": torch.backends.cudnn.allow_tf32}
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                info["devices"].append({
                    "index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 2),
                    "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                    "bf16": bool(torch.cuda.is_bf16_supported())})
    except Exception as e:  # noqa: BLE001 - informational
        info["error"] = f"{type(e).__name__}: {e}"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            rows = [r.strip() for r in out.stdout.splitlines() if r.strip()]
            info["nvidia_smi"] = rows
            info["driver"] = rows[0].rsplit(",", 1)[-1].strip() if rows else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats with ``digits`` decimals, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], title: str | None = None) -> str:
    """Print (and return) a Markdown table; cells go through :func:`fmt`."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(parts: Sequence[str]) -> str:
        return "| " + " | ".join(p.ljust(w) for p, w in zip(parts, widths, strict=True)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in cells)]
    from dinov3geo.utils.cpu import cpu_summary

    text = ("\n" + title + "\n" + cpu_summary() + "\n\n" if title else "") + "\n".join(out)
    print(text, flush=True)
    return text


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (parent folders created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def default_amp() -> str:
    """The benchmarks' default autocast on CPU: ``"bf16"`` where this CPU runs bf16 natively, else
    ``"none"`` (emulated bf16 is 4-5x slower than fp32 on AVX2-only CPUs)."""
    from dinov3geo.utils.cpu import native_bf16

    return "bf16" if native_bf16() else "none"


def log(msg: str) -> None:
    """A progress line on stderr, timestamped."""
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()
