"""GPU readiness check: one prepared script that proves the GPU paths and measures them in under 8 minutes.

Run from the repository root on a CUDA machine (``make gpu-check`` runs the first line)::

    .venv/bin/python benchmarks/gpu_check.py --json gpu_check.json
    .venv/bin/python benchmarks/gpu_check.py --parts region,torchgeo      # again, only some parts
    .venv/bin/python benchmarks/gpu_check.py --smoke                      # CPU, tiny sizes, seconds (CI)

Parts, in order, each with its own time budget (``--budget part=seconds``; all of them also stop at the global
``--time-limit``). A part that would run past its budget is cut (the step that did not fit is reported), one
that raises is reported with its error, and the script goes on; the table and the JSON are always written,
also on Ctrl-C / SIGTERM (the JSON is also rewritten after every part, so even a killed run leaves one):

0. ``data``: generates an 8192 x 8192 RGB uint8 COG (``dinov3geo.io.cog.COGWriter``: tiled 512, deflate,
   overviews) and a 2048 x 2048 one ingested as a tile store of 256 px tiles for the SSL runs, in a temporary
   folder (``--workdir``); nothing is downloaded, every model has random weights.
1. ``cuda_tests``: ``pytest -m cuda tests/cuda`` (bf16 autocast numerics, ``bf16-params``, the engine and CHMv2
   on ``cuda`` vs the CPU, Lightning 1-GPU fit + exact resume, FSDP with one process); counts and failures.
2. ``region``: region mapping with a CHMv2-shaped model (ViT-L/16 SAT-493M layout + the release's DPT head,
   random weights, bf16 autocast) on the 8192^2 COG: ``predict_raster`` on the GPU vs the model alone on the
   same windows already in GPU memory (same batches; goal >= 0.9), km^2 per minute at 0.6 m, GPU utilisation
   sampled during the run (NVML through ``pynvml`` when importable, else ``nvidia-smi -lms``) and the share of
   the run spent in model calls (``torch.cuda``-synchronised timing of the engine).
3. ``torchgeo``: the same region the torchgeo way (``RasterDataset`` + ``GridGeoSampler`` + ``DataLoader`` with
   workers + stitching + the engine's COG writer, ``benchmarks/inference.py``'s ``child_torchgeo``), the same
   model on the GPU: engine speed-up (the open ">= 3x with a backbone" point).
4. ``ssl``: SSL step time, ViT-L/16 student, batch 32, 2 x 224 + 8 x 96 crops, bf16-mixed, without and with the
   Gram loss (Gram teacher crops 448): ``dinov3geo.ssl.train.pretrain`` vs a bare loop floor (the same
   backbone, heads, masks and crops; plain losses, AdamW; goal engine / floor <= 1.0) and peak GPU memory.
5. ``data_path``: the data path alone (the stand-in model of ``inference.py --arch none``: a 16x16 average pool
   and a fixed 1x1 projection to 384 bands) on the GPU: engine vs the torchgeo way, for reference.
6. ``convnext``: the ConvNeXt-T feature forward of ``dinov3geo features`` (batch 8, 224 and 512 px, random
   weights with real layer scales) in channels-last / NCHW x fp32 / bf16 autocast on the GPU
   (``benchmarks/backbone.py --settings``, in this process): images/s, speed-up over the default, deviation.

Every measurement runs in a fresh process (``benchmarks/_common.py``: its own CUDA context and peak memory)
with the part's remaining budget as its timeout; ``--smoke`` runs the same steps in this process with tiny
sizes on the CPU (the CUDA tests then skip, or run on the CPU with ``--tests-on-cpu``), so that the script
cannot rot between the rare moments a GPU is available (``tests/test_gpu_check_smoke.py``).

Outputs: a Markdown table on stdout, ``--json`` (every number, the environment with the GPU, each part's status,
budget and time); with ``$OUT`` set, ``$OUT/gpu_check.json`` and ``$OUT/gpu_check.md`` as well. Exit status 0
when every selected part ran (goals met or not), 1 when a part failed, timed out or was skipped, 2 without a GPU
(and no ``--smoke``/``--device cpu``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
if str(ROOT) not in sys.path:  # dinov3geo from this checkout where it is not installed (a bare GPU machine)
    sys.path.insert(1, str(ROOT))

import inference as inf  # noqa: E402  (benchmarks/inference.py)
import ssl_speed  # noqa: E402  (benchmarks/ssl_speed.py)
from _common import RESULT_PREFIX, child_main, environment, log, peak_rss_mib, print_table, write_json  # noqa: E402

from dinov3geo.inference.models import RasterModel  # noqa: E402

PARTS = ("data", "cuda_tests", "region", "torchgeo", "ssl", "data_path", "convnext")
TITLES = {"data": "0 data", "cuda_tests": "1 CUDA tests", "region": "2 region: engine vs model alone",
          "torchgeo": "3 region: torchgeo way", "ssl": "4 SSL step", "data_path": "5 data path (stand-in model)",
          "convnext": "6 ConvNeXt layouts"}
#: seconds per part on a GPU (sum + start-up within the 470 s default --time-limit, i.e. under 8 minutes)
BUDGETS = {"data": 35.0, "cuda_tests": 90.0, "region": 90.0, "torchgeo": 50.0, "ssl": 115.0, "data_path": 50.0,
           "convnext": 25.0}
SMOKE_BUDGET = 600.0  # per part in --smoke (a slow CI machine must not cut a part)
GOAL_ENGINE = 0.9
GOAL_TORCHGEO = 3.0
GOAL_SSL = 1.0
GSD_M = 0.6  # km^2 per minute is reported at this ground sample distance (CHMv2's imagery)


# ---------------------------------------------------------------------------------------------- sizes
@dataclass
class Sizes:
    """Everything that differs between a GPU run and ``--smoke``."""

    region: int = 8192
    window: int = 512
    batch: int = 8
    model: str = "release"  #: "release": ViT-L/16 SAT + the release's DPT head; "tiny": the same layout, tiny
    ssl_raster: int = 2048
    ssl_tile: int = 256
    ssl_arch: str = "vitl16"
    ssl_batch: int = 32
    global_size: int = 224
    local_size: int = 96
    local_number: int = 8
    gram_size: int = 448
    prototypes: int = 65536
    hidden: int = 2048
    bottleneck: int = 256
    warmup: int = 3
    iters: int = 5
    region_repeats: int = 2
    convnext_arch: str = "convnext_tiny"
    convnext_sizes: tuple[int, ...] = (224, 512)
    convnext_batch: int = 8
    convnext_repeat: int = 5
    # first-run estimates (s, process start included) of each step, for the budget checks
    est: dict[str, float] = field(default_factory=lambda: {
        "region_model_only": 20.0, "region_engine": 25.0, "region_torchgeo": 30.0, "ssl_engine": 30.0,
        "ssl_floor": 15.0})


def smoke_sizes() -> Sizes:
    """The ``--smoke`` sizes: every step in seconds on two CPU cores."""
    return Sizes(region=160, window=128, batch=4, model="tiny", ssl_raster=256, ssl_tile=64,
                 ssl_arch="vit_tiny_test", ssl_batch=2, global_size=32, local_size=16, local_number=2, gram_size=48,
                 prototypes=64, hidden=32, bottleneck=16, warmup=1, iters=1, region_repeats=1,
                 convnext_arch="convnext_tiny_test", convnext_sizes=(64,), convnext_batch=2, convnext_repeat=1, est={})


# ---------------------------------------------------------------------------------------------- budget
class BudgetSpent(Exception):
    """A step does not fit in what is left of its part's budget."""


class Budget:
    """A part's time budget (``time.monotonic``), capped by the global deadline."""

    def __init__(self, seconds: float, deadline: float) -> None:
        self.start = time.monotonic()
        self.seconds = seconds
        self.deadline = min(self.start + seconds, deadline)

    def left(self) -> float:
        """Seconds left (may be negative)."""
        return self.deadline - time.monotonic()

    def need(self, seconds: float, what: str) -> None:
        """Raise :class:`BudgetSpent` when less than ``seconds`` are left for ``what``."""
        left = self.left()
        if left < seconds:
            raise BudgetSpent(f"{what} needs ~{seconds:.1f} s but {max(left, 0):.1f} s are left of the budget")

    def timeout(self) -> float:
        """The timeout of a step started now (at least 1 s)."""
        return max(1.0, self.left())


@dataclass
class PartResult:
    """What one part reports: a status, rows for the table and everything measured."""

    name: str
    status: str = "not run"  #: ok, failed, cut, timeout, skipped, interrupted, not run
    seconds: float = 0.0
    budget_s: float = 0.0
    rows: list[list[str]] = field(default_factory=list)  #: [what, result, goal]
    data: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": TITLES.get(self.name, self.name), "status": self.status,
                "seconds": round(self.seconds, 2), "budget_s": self.budget_s, "rows": self.rows,
                "message": self.message, "data": self.data}


def one_line(exc: BaseException) -> str:
    """An exception as one line (the first and the last line of its text)."""
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    msg = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(exc).__name__}: {msg}"[:400]


PartFn = Callable[[Budget, PartResult], None]


def run_parts(parts: list[tuple[str, PartFn]], budgets: dict[str, float], deadline: float,
              on_done: Callable[[list[PartResult]], None] | None = None) -> list[PartResult]:
    """Run ``parts`` in order, each under its :class:`Budget`; never raises (Ctrl-C ends the loop).

    A part fills the :class:`PartResult` it is given as it goes (what it measured survives a later error) and
    may set its ``status`` (``failed`` for a step that failed while others ran); otherwise it is ``ok``.
    :class:`BudgetSpent` gives ``skipped`` (or ``cut`` when something was measured before),
    ``subprocess.TimeoutExpired`` ``timeout``, any other exception ``failed`` (one-line message, traceback in
    ``data``). ``on_done`` gets the results so far after every part (to rewrite the JSON)."""
    results = [PartResult(name, budget_s=budgets.get(name, 0.0)) for name, _ in parts]
    for (name, fn), res in zip(parts, results, strict=True):
        budget = Budget(budgets.get(name, 0.0), deadline)
        log(f"part {name}: budget {min(budget.seconds, max(budget.left(), 0)):.0f} s")
        try:
            if budget.left() <= 0:
                raise BudgetSpent("the global time limit is spent")
            fn(budget, res)
            if res.status in ("", "not run"):
                res.status = "ok"
        except BudgetSpent as e:
            res.status = "cut" if res.rows else "skipped"
            res.message = "; ".join(m for m in (res.message, f"budget spent: {e}") if m)
        except subprocess.TimeoutExpired as e:
            res.status = "timeout"
            res.message = "; ".join(m for m in (res.message, f"a step ran past the part's budget ({e.timeout:.0f} s)"
                                                             " and was stopped") if m)
        except KeyboardInterrupt:
            res.status, res.message = "interrupted", "interrupted (Ctrl-C / SIGTERM)"
            res.seconds = time.monotonic() - budget.start
            for later in results[results.index(res) + 1:]:
                later.message = "not run: interrupted"
            break
        except Exception as e:  # noqa: BLE001 - a part's failure is reported, the next part runs
            res.status, res.message = "failed", one_line(e)
            res.data["traceback"] = traceback.format_exc()[-4000:]
        res.seconds = time.monotonic() - budget.start
        log(f"part {name}: {res.status} in {res.seconds:.1f} s {res.message}")
        if on_done is not None:
            with contextlib.suppress(Exception):
                on_done(results)
    return results


# ---------------------------------------------------------------------------------------------- helpers
def _torch_device(spec: dict[str, Any]) -> Any:
    import torch

    return torch.device(spec["device"])


def _amp_dtype(spec: dict[str, Any]) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.get("amp") or "")


def _autocast(spec: dict[str, Any]) -> Any:
    import torch

    dtype = _amp_dtype(spec)
    return torch.autocast(spec["device"].split(":")[0], dtype=dtype) if dtype else contextlib.nullcontext()


def _reset_peak(spec: dict[str, Any]) -> None:
    import torch

    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gpu_mib(spec: dict[str, Any]) -> float | None:
    import torch

    if not spec["device"].startswith("cuda"):
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def _sync(spec: dict[str, Any]) -> None:
    import torch

    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()


class GpuSampler:
    """GPU utilisation (%) sampled every ``interval_ms`` while the ``with`` block runs: NVML through ``pynvml``
    when importable, else ``nvidia-smi --query-gpu=utilization.gpu -lms``; nothing on a CPU."""

    def __init__(self, device: str, interval_ms: int = 200) -> None:
        self.index: int | None = None
        if device.startswith("cuda"):
            idx = int(device.split(":")[1]) if ":" in device else 0
            visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
            self.index = int(visible[idx]) if idx < len(visible) and visible[idx].strip().isdigit() else idx
        self.interval = interval_ms
        self.samples: list[float] = []
        self.method: str | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[str] | None = None
        self.t0 = self.t1 = 0.0

    def __enter__(self) -> GpuSampler:
        self.t0 = time.monotonic()
        if self.index is None:
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            self.method = "nvml"

            def poll() -> None:
                while not self._stop.wait(self.interval / 1000):
                    with contextlib.suppress(Exception):
                        self.samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

            self._thread = threading.Thread(target=poll, daemon=True, name="gpu-sampler")
            self._thread.start()
        except Exception:  # noqa: BLE001 - no pynvml (or no NVML): nvidia-smi
            try:
                self._proc = subprocess.Popen(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                     f"--id={self.index}", f"-lms={self.interval}"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                self.method = "nvidia-smi"
            except OSError as e:
                self.error = f"no pynvml and no nvidia-smi: {e}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.t1 = time.monotonic()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._proc is not None:
            self._proc.terminate()
            try:
                out, _ = self._proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                out, _ = self._proc.communicate()
            for line in (out or "").splitlines():
                with contextlib.suppress(ValueError):
                    self.samples.append(float(line.strip()))

    def summary(self) -> dict[str, Any]:
        """``{"method", "samples", "mean_pct", "median_pct", "p10_pct", "max_pct", "seconds"}``."""
        s = sorted(self.samples)
        out: dict[str, Any] = {"method": self.method, "samples": len(s), "seconds": round(self.t1 - self.t0, 2),
                               "error": self.error}
        if s:
            out.update(mean_pct=statistics.fmean(s), median_pct=statistics.median(s),
                       p10_pct=s[len(s) // 10], max_pct=s[-1])
        return out


#: import name -> distribution name of what the parts need (reported; a missing one fails only its parts)
PACKAGES = {"torch": "torch", "lightning": "lightning", "timm": "timm", "rasterio": "rasterio", "zarr": "zarr",
            "numcodecs": "numcodecs", "dask": "dask", "shapely": "shapely", "pyproj": "pyproj",
            "geopandas": "geopandas", "torchgeo": "torchgeo", "pynvml": "nvidia-ml-py", "pytest": "pytest"}


def packages() -> dict[str, str | None]:
    """Versions of :data:`PACKAGES` (None: not importable here)."""
    import importlib.util
    from importlib import metadata

    out: dict[str, str | None] = {}
    for mod, dist in PACKAGES.items():
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        version = None
        if found:
            try:
                version = metadata.version(dist)
            except metadata.PackageNotFoundError:
                version = "?"
        out[mod] = version
    return out


def km2_per_min(size: int, seconds: float, gsd_m: float = GSD_M) -> float:
    """Area mapped per minute: a ``size x size`` raster at ``gsd_m`` metres in ``seconds``."""
    return (size * gsd_m / 1000) ** 2 / (seconds / 60)


# ---------------------------------------------------------------------------------------------- models
def build_region_model(spec: dict[str, Any]) -> Any:
    """The region model of ``spec["model"]``: ``"release"`` (CHMv2 layout: ViT-L/16 SAT-493M + the release's DPT
    head, 256 bins), ``"tiny"`` (the same layout, 4 blocks of 64 dims) or ``"datapath"`` (the stand-in), random
    weights, on ``spec["device"]``."""
    import torch

    device = spec["device"]
    if spec["model"] == "datapath":
        return DataPathModel(3).to(device)
    from dinov3geo.models import build_backbone
    from dinov3geo.tasks.canopy.chmv2 import CHMv2
    from dinov3geo.tasks.canopy.dpt import DPTHead
    from dinov3geo.tasks.canopy.model import CanopyRasterModel

    torch.manual_seed(0)
    if spec["model"] == "release":
        bb = build_backbone("vitl16_sat493m", in_chans=3, device=device)
        head = DPTHead(device=device)
    else:
        bb = build_backbone("vit_tiny_test", depth=4, num_heads=4, in_chans=3, device=device)
        head = DPTHead(64, [8, 16, 32, 64], channels=16, n_hidden_channels=8, n_bins=32, device=device)
    return CanopyRasterModel.from_chmv2(CHMv2(bb, head)).to(device).eval()


class DataPathModel(RasterModel):
    """``inference.py``'s ``--arch none`` stand-in (16x16 average pool + a fixed random 1x1 projection to 384
    bands, ``sin``), for any number of bands and on any device (the original is CPU-only and 4-band)."""

    out_bands = 384
    scale = 16
    receptive_margin = 32

    def __init__(self, in_bands: int) -> None:
        import torch

        self.in_bands = in_bands
        self.proj = torch.randn(self.out_bands, in_bands, generator=torch.Generator().manual_seed(0)) / 255

    def to(self, device: Any) -> DataPathModel:
        self.proj = self.proj.to(device)
        return self

    def forward(self, x: Any, valid: Any) -> Any:
        import torch

        p = torch.nn.functional.avg_pool2d(x, 16)
        return torch.einsum("kc,bchw->bkhw", self.proj.to(p.dtype), p).sin()


class OnDevice(RasterModel):
    """A raster model run on ``device`` under autocast for callers that hand it CPU tensors (the torchgeo way):
    inputs go to the device, outputs come back as CPU float32."""

    def __init__(self, inner: Any, spec: dict[str, Any]) -> None:
        self.inner = inner.to(spec["device"]).eval()
        self.spec = spec
        for name in ("in_bands", "out_bands", "band_names", "out_dtype", "nodata", "scale", "receptive_margin"):
            setattr(self, name, getattr(inner, name))

    def forward(self, x: Any, valid: Any) -> Any:
        import torch

        dev = _torch_device(self.spec)
        x, valid = x.to(dev, non_blocking=True), valid.to(dev, non_blocking=True)
        with torch.inference_mode(), _autocast(self.spec):
            y = self.inner(x, valid)
        return y.float().cpu()


def _warm_up(model: Any, spec: dict[str, Any], bands: int = 3) -> None:
    """One batch of the engine's shape through ``model`` on the device (CUDA context, cuBLAS/cuDNN set-up),
    so that no side of a comparison pays it inside its timing."""
    import torch

    w, n = spec["window"], spec["batch"]
    x = torch.zeros(n, bands, w, w, device=spec["device"])
    v = torch.ones(n, w, w, dtype=torch.bool, device=spec["device"])
    with torch.inference_mode(), _autocast(spec):
        model(x, v)
    _sync(spec)


def resolved_overlap(model_kind: str, window: int) -> int:
    """The overlap ``predict_raster`` picks by default for the region model (every side uses it)."""
    from types import SimpleNamespace

    from dinov3geo.inference import make_layout

    stub = (SimpleNamespace(scale=16, receptive_margin=32, out_bands=384, out_dtype="float32")
            if model_kind == "datapath" else
            SimpleNamespace(scale=1, receptive_margin=32, out_bands=2, out_dtype="float32"))
    return int(make_layout(stub, window * 4, window * 4, window=window).overlap)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- children
def child_region_model_only(spec: dict[str, Any]) -> dict[str, Any]:
    """The model alone on the engine's batches of windows already in device memory (uint8, like the engine's
    transfers), outputs copied back to the host as the engine does; after a warm-up batch."""
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    model = build_region_model(spec)
    sizes = inf._batch_sizes(spec, model, spec["size"])
    w, dev = spec["window"], spec["device"]
    gen = torch.Generator().manual_seed(1)
    xs = {n: torch.randint(0, 256, (n, 3, w, w), dtype=torch.uint8, generator=gen).to(dev) for n in set(sizes)}
    vs = {n: torch.ones(n, w, w, dtype=torch.bool, device=dev) for n in set(sizes)}
    _warm_up(model, spec)
    _reset_peak(spec)
    with inf._allocator(spec):  # the engine's allocator setting (fair floor)
        t0 = time.perf_counter()
        for n in sizes:
            with torch.inference_mode(), _autocast(spec):
                y = model(xs[n].float(), vs[n])
            np.asarray(y.float().cpu().numpy())
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "windows": sum(sizes), "batches": len(sizes), "peak_gpu_mib": _peak_gpu_mib(spec)}


def child_region_engine(spec: dict[str, Any]) -> dict[str, Any]:
    """``predict_raster`` on the device (after a warm-up batch), GPU utilisation sampled during the run."""
    import torch

    from dinov3geo.inference import predict_raster

    torch.set_num_threads(spec["threads"])
    model = build_region_model(spec)
    _warm_up(model, spec)
    _reset_peak(spec)
    out = Path(spec["out"])
    stats: dict[str, Any] = {}
    with GpuSampler(spec["device"]) as sampler:
        t0 = time.perf_counter()
        predict_raster(model, spec["raster"], out, window=spec["window"], overlap=spec["overlap"],
                       batch_size=spec["batch"], amp=spec["amp"], device=spec["device"], progress=False,
                       resume=False, stats=stats, read_threads=spec.get("read_threads"))
        seconds = time.perf_counter() - t0
    size_mb = out.stat().st_size / 1e6
    out.unlink()
    return {"seconds": seconds, "out_mb": size_mb, "stats": stats, "gpu_util": sampler.summary(),
            "peak_gpu_mib": _peak_gpu_mib(spec)}


def child_region_torchgeo(spec: dict[str, Any]) -> dict[str, Any]:
    """``inference.child_torchgeo`` (RasterDataset + GridGeoSampler + DataLoader workers + stitching + the
    engine's COG writer) with the region model on the device (:class:`OnDevice`, after a warm-up batch)."""
    model = OnDevice(build_region_model(spec), spec)
    _warm_up(model, spec)
    _reset_peak(spec)
    original = inf.build_model
    inf.build_model = lambda _spec: model  # child_torchgeo builds its model through this name
    try:
        with GpuSampler(spec["device"]) as sampler:
            res = inf.child_torchgeo({**spec, "amp": None})  # autocast happens on the device, in OnDevice
    finally:
        inf.build_model = original
    res.update(gpu_util=sampler.summary(), peak_gpu_mib=_peak_gpu_mib(spec))
    return res


def _ssl_args(spec: dict[str, Any]) -> argparse.Namespace:
    return argparse.Namespace(**spec["ssl"])


def child_ssl_engine(spec: dict[str, Any]) -> dict[str, Any]:
    """``pretrain`` (Lightning, the SSLModule) for warm-up + timed iterations; s/it from its per-step log."""
    import logging

    import torch

    from dinov3geo.ssl.config import load_config
    from dinov3geo.ssl.train import pretrain, stage_metrics

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(spec["threads"])
    a = _ssl_args(spec)
    out = Path(spec["out"])
    n = a.warmup + a.iters
    raw = ssl_speed.engine_cfg(a, Path(spec["store"]), out, spec["precision"], n).to_dict()
    raw["student"]["arch"] = a.arch
    raw["train"]["accelerator"] = "gpu" if spec["device"].startswith("cuda") else "cpu"
    raw["train"]["devices"] = 1
    if spec["gram"]:
        raw["gram"].update(use_loss=True, loss_weight=1.0)
        raw["crops"]["gram_teacher_crops_size"] = a.gram_size
    cfg = load_config(raw)
    _reset_peak(spec)
    t0 = time.perf_counter()
    pretrain(cfg)
    wall = time.perf_counter() - t0
    rows = [r for r in stage_metrics(out) if "imgs_per_s" in r]
    timed = [r for r in rows if r["step"] >= a.warmup] or rows
    times = [a.batch / r["imgs_per_s"] for r in timed]
    waits = [r["data_wait_s"] for r in timed]
    shutil.rmtree(out, ignore_errors=True)
    return {"s_per_it": statistics.median(times), "times": times, "data_wait_s_mean": statistics.fmean(waits),
            "data_wait_s_max": max(waits), "wall_s_incl_setup_and_export": wall, "peak_gpu_mib": _peak_gpu_mib(spec),
            "gram_loss_logged": any("gram_loss" in r for r in rows)}


def child_ssl_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """The bare loop floor on the device (``ssl_speed.floor_loop``'s definition with the engine's backbone):
    student forward + backward on all crops (global crops with iBOT masks), frozen teacher forward on the global
    crops, DINO and iBOT heads of the engine's size, plain cross-entropy losses, fused AdamW; with ``gram`` also a
    frozen Gram teacher on the Gram crops, its patch tokens resized to the student's grid, and a Gram loss
    (MSE of patch-similarity matrices). Synthetic crops, no data loading; synchronised per step."""
    import copy

    import torch
    import torch.nn.functional as F

    from dinov3geo.models import build_backbone

    torch.set_num_threads(spec["threads"])
    a = _ssl_args(spec)
    dev = spec["device"]
    torch.manual_seed(0)
    bb = build_backbone(a.arch, in_chans=3, device=dev)
    student = torch.nn.ModuleDict({"backbone": bb, "dino": ssl_speed._head(bb.embed_dim, a),
                                   "ibot": ssl_speed._head(bb.embed_dim, a)}).to(dev)
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    gram_teacher = copy.deepcopy(bb).requires_grad_(False).eval() if spec["gram"] else None
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)
    B, g, lc = a.batch, a.global_size, a.local_size
    gl = torch.randn(2 * B, 3, g, g, device=dev)
    lo = torch.randn(a.local_number * B, 3, lc, lc, device=dev)
    gimg = torch.randn(2 * B, 3, a.gram_size, a.gram_size, device=dev) if spec["gram"] else None
    side = g // 16
    n_patch = side * side
    masks = torch.rand(2 * B, n_patch, device=dev) < 0.15  # about the engine's masked share
    idx = masks.flatten().nonzero().flatten()
    bf16 = spec["precision"].startswith("bf16")
    ctx = (lambda: torch.autocast(dev.split(":")[0], dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    _reset_peak(spec)
    times = []
    for it in range(a.warmup + a.iters):
        _sync(spec)
        t0 = time.perf_counter()
        with ctx():
            with torch.no_grad():
                tg = teacher["backbone"].forward_features(gl)
                t_cls = F.softmax(teacher["dino"](tg["x_norm_clstoken"]).float() / 0.07, -1)
                t_ib = F.softmax(teacher["ibot"](tg["x_norm_patchtokens"].flatten(0, 1)[idx]).float() / 0.07, -1)
                if gram_teacher is not None:
                    gp = gram_teacher.forward_features(gimg)["x_norm_patchtokens"]
                    gs = a.gram_size // 16
                    gp = gp.transpose(1, 2).unflatten(2, (gs, gs))
                    gp = F.interpolate(gp.float(), size=(side, side), mode="bicubic", align_corners=False)
                    gp = gp.flatten(2).transpose(1, 2)
            sg, sl = student["backbone"].forward_features([gl, lo], masks=[masks, None])
            s_cls = student["dino"](torch.cat([sg["x_norm_clstoken"], sl["x_norm_clstoken"]])).float() / 0.1
            s_ib = student["ibot"](sg["x_norm_patchtokens"].flatten(0, 1)[idx]).float() / 0.1
            tgt = t_cls.repeat(1 + a.local_number // 2, 1)[: s_cls.shape[0]]
            loss = -(tgt * F.log_softmax(s_cls, -1)).sum(-1).mean() - (t_ib * F.log_softmax(s_ib, -1)).sum(-1).mean()
            if gram_teacher is not None:
                sp = F.normalize(sg["x_norm_patchtokens"].float(), dim=-1)
                tp = F.normalize(gp, dim=-1)
                loss = loss + F.mse_loss(sp @ sp.transpose(1, 2), tp @ tp.transpose(1, 2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())  # synchronises, as the engine's finiteness check does
        if not math.isfinite(value):
            raise FloatingPointError(f"floor loss is {value} at iteration {it}")
        dt = time.perf_counter() - t0
        if it >= a.warmup:
            times.append(dt)
    return {"s_per_it": statistics.median(times), "times": times, "peak_gpu_mib": _peak_gpu_mib(spec)}


HANDLERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "region_model_only": child_region_model_only, "region_engine": child_region_engine,
    "region_torchgeo": child_region_torchgeo, "ssl_engine": child_ssl_engine, "ssl_floor": child_ssl_floor,
}


# ---------------------------------------------------------------------------------------------- context
@dataclass
class Ctx:
    """One run: options, sizes, the work folder, the data made by part 0 and results other parts use."""

    args: argparse.Namespace
    sizes: Sizes
    device: str
    work: Path
    in_process: bool
    region_cog: Path | None = None
    ssl_store: Path | None = None
    engine_best_s: float | None = None
    step_log: list[dict[str, Any]] = field(default_factory=list)

    def base_spec(self) -> dict[str, Any]:
        """Spec keys every region step shares."""
        threads = max(1, (os.cpu_count() or 2) // 2) if self.device.startswith("cuda") else self.args.threads
        return {"device": self.device, "amp": None if self.args.amp == "none" else self.args.amp,
                "window": self.sizes.window, "batch": self.sizes.batch, "threads": threads,
                "size": self.sizes.region, "raster": str(self.region_cog), "fair_allocator": True,
                "tg_workers": self.args.tg_workers, "read_threads": self.args.read_threads}

    def run_step(self, kind: str, spec: dict[str, Any], budget: Budget) -> dict[str, Any]:
        """Run one measurement (a fresh process unless ``in_process``), with the part's remaining budget as
        its timeout; the spec goes through JSON either way."""
        budget.need(self.sizes.est.get(kind, 0.0), kind.replace("_", " "))
        spec = json.loads(json.dumps({**spec, "kind": kind}))
        t0 = time.monotonic()
        if self.in_process:
            res = HANDLERS[kind](spec)
            res["peak_rss_mib"] = peak_rss_mib()  # of this whole process (in-process runs: information only)
        else:
            res = run_child_group(HERE, spec, timeout=budget.timeout())
        res["step_wall_s"] = time.monotonic() - t0
        self.sizes.est[kind] = res["step_wall_s"] * 1.1  # the next run of this kind needs about as long
        self.step_log.append({"kind": kind, "wall_s": round(res["step_wall_s"], 2)})
        log(f"  {kind}: {res['step_wall_s']:.1f} s")
        return res


def run_child_group(script: Path, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``_common.run_child`` in its own process group, so a timeout (or Ctrl-C) also stops its workers.

    Raises:
        subprocess.TimeoutExpired: the child ran past ``timeout`` (its whole group was killed).
        RuntimeError: the child failed (its stderr tail is in the message).
    """
    cmd = [sys.executable, str(script), "--child", json.dumps(spec)]
    with _group(cmd) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise subprocess.TimeoutExpired(cmd[:3], timeout) from e
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX) and proc.returncode == 0:
            return dict(json.loads(line[len(RESULT_PREFIX):]))
    tail = "\n".join((stderr or stdout).splitlines()[-25:])
    raise RuntimeError(f"step {spec.get('kind')!r} failed (exit {proc.returncode}):\n{tail}")


@contextlib.contextmanager
def _group(cmd: list[str], **kw: Any) -> Iterator[subprocess.Popen[str]]:
    """Popen in a new session; the whole group is killed if the block raises (timeout, Ctrl-C, error)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kw)
    try:
        yield proc
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.communicate(timeout=10)
        raise
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------------- parts
def make_rgb_cog(path: Path, size: int) -> None:
    """A ``size``\\ :sup:`2` RGB uint8 COG at 0.6 m (smooth fields at two scales + noise; compresses about as
    well as imagery), written strip by strip with ``dinov3geo.io.cog.COGWriter`` (tiled 512, deflate,
    overviews)."""
    import numpy as np
    from rasterio.windows import Window

    from dinov3geo.io.cog import COGWriter
    from dinov3geo.io.grid import GridSpec

    grid = GridSpec.from_bounds(500000.0, 5000000.0 - size * GSD_M, 500000.0 + size * GSD_M, 5000000.0, GSD_M,
                                "EPSG:32618")
    rng = np.random.default_rng(0)
    strip = 512
    noise = rng.integers(0, 48, (3, strip, size + strip), dtype=np.uint8)  # shifted per strip
    xx = np.arange(size, dtype=np.float32)[None, :]
    with COGWriter(path, grid, 3, "uint8", band_names=["red", "green", "blue"], blocksize=512,
                   num_threads=max(2, os.cpu_count() or 2), gdal_cachemax_mb=512) as w:
        for r in range(0, size, strip):
            h = min(strip, size - r)
            yy = np.arange(r, r + h, dtype=np.float32)[:, None]
            block = np.empty((3, h, size), dtype=np.uint8)
            for b in range(3):
                fine = np.sin(yy / (7 + 2 * b)) * np.cos(xx / (9 + 3 * b))  # crown-sized texture
                coarse = np.sin(yy / (301 + 17 * b)) * np.cos(xx / (433 + 11 * b))
                off = (r // strip * 131) % strip
                block[b] = (100 + 40 * fine + 50 * coarse).astype(np.uint8) + noise[b, :h, off : off + size]
            w.write(block, Window(0, r, size, h))


def part_data(ctx: Ctx, budget: Budget, res: PartResult) -> None:
    from dinov3geo.ingest import ingest

    s = ctx.sizes
    t0 = time.monotonic()
    cog = ctx.work / f"region_{s.region}.tif"
    make_rgb_cog(cog, s.region)
    ctx.region_cog = cog
    t_cog = time.monotonic() - t0
    budget.need(1.0, "the SSL tile store")
    t1 = time.monotonic()
    ssl_tif = ctx.work / f"ssl_{s.ssl_raster}.tif"
    make_rgb_cog(ssl_tif, s.ssl_raster)
    store = ctx.work / "ssl_tiles.zarr"
    report = ingest([str(ssl_tif)], store, tile_size=s.ssl_tile, progress=False, workers=min(8, os.cpu_count() or 2))
    ctx.ssl_store = store
    tiles = getattr(report, "tiles_written", None)
    res.data = {"region_cog": str(cog), "region_mb": cog.stat().st_size / 1e6, "region_s": t_cog,
                "ssl_store": str(store), "ssl_tiles": tiles, "ssl_s": time.monotonic() - t1}
    res.rows = [[f"{s.region}^2 RGB uint8 COG ({res.data['region_mb']:.0f} MB) in {t_cog:.1f} s; "
                 f"SSL store ({s.ssl_raster}^2, {s.ssl_tile} px tiles) in {res.data['ssl_s']:.1f} s", "-"]]


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and per-test outcomes of a pytest ``--junitxml`` file."""
    root = ET.parse(path).getroot()
    tests: list[dict[str, Any]] = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".split("tests.cuda.")[-1]
        outcome, msg = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                lines = (child.get("message") or child.text or "").strip().splitlines()
                msg = lines[0][:300] if lines else ""
                break
        tests.append({"test": name, "outcome": outcome, "seconds": float(case.get("time") or 0), "message": msg})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": tests}


def part_cuda_tests(ctx: Ctx, budget: Budget, res: PartResult) -> None:
    budget.need(5.0, "pytest")
    xml = ctx.work / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/cuda", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={xml}", f"--basetemp={ctx.work / 'pytest'}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if ctx.args.tests_on_cpu:
        env["DINOV3GEO_CUDA_TESTS_ON_CPU"] = "1"
    timeout = budget.timeout()
    with _group(cmd, cwd=str(ROOT), env=env) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise subprocess.TimeoutExpired(cmd[:4], timeout) from e
    res.data["returncode"] = proc.returncode
    res.data["output_tail"] = "\n".join((stdout + stderr).splitlines()[-30:])
    if not xml.exists():
        raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {res.data['output_tail'][-300:]}")
    res.data.update(parse_junit(xml))
    c = res.data["counts"]
    total = sum(c.values())
    res.rows = [[f"{total} collected: {c['passed']} passed, {c['failed']} failed, {c['error']} errors, "
                 f"{c['skipped']} skipped", "all pass"]]
    skips: dict[str, int] = {}
    for t in res.data["tests"]:
        if t["outcome"] == "skipped":
            skips[t["message"]] = skips.get(t["message"], 0) + 1
        elif t["outcome"] != "passed":
            res.rows.append([f"  {t['test']}: {t['outcome']} ({t['message'][:200]})", ""])
    for why, n in skips.items():
        res.rows.append([f"  {n} skipped: {why[:200]}", ""])
    if total == 0:
        res.status, res.message = "failed", "no CUDA tests collected (is the `cuda` marker on tests/cuda?)"
    elif c["failed"] or c["error"] or proc.returncode not in (0,):
        res.status = "failed"
        res.message = f"pytest exit {proc.returncode}: " + ", ".join(
            t["test"] for t in res.data["tests"] if t["outcome"] in ("failed", "error"))
    elif c["skipped"]:
        res.message = f"{c['skipped']} skipped" + (" (no CUDA GPU)" if not ctx.device.startswith("cuda") else "")


def _need_data(ctx: Ctx, what: str = "region") -> None:
    if (what == "region" and ctx.region_cog is None) or (what == "ssl" and ctx.ssl_store is None):
        raise BudgetSpent(f"no {what} data: part 0 (data) did not finish")


def _util_text(u: dict[str, Any] | None) -> str:
    if not u or u.get("method") is None:
        return "GPU utilisation: not sampled" + (f" ({u['error']})" if u and u.get("error") else "")
    if not u.get("samples"):
        return f"GPU utilisation: no samples ({u['method']})"
    return (f"GPU utilisation {u['mean_pct']:.0f} % mean, {u['median_pct']:.0f} % median ({u['method']}, "
            f"{u['samples']} samples)")


def _mps(megapixels: float, seconds: float) -> str:
    """Megapixels per second, 3 significant digits."""
    return f"{megapixels / seconds:.3g} MP/s"


def _gib(mib: float | None) -> str:
    return "-" if mib is None else f"{mib / 1024:.1f} GiB"


def _failed(res: PartResult, what: str, exc: Exception) -> None:
    """Record a failed step in ``res`` (status ``failed``, one line per step) and go on with the part."""
    line = f"{what}: {one_line(exc)}"
    res.status = "failed"
    res.message = "; ".join(m for m in (res.message, line) if m)
    res.data.setdefault("errors", []).append({"step": what, "error": line, "traceback": traceback.format_exc()[-4000:]})
    res.rows.append([f"  {line[:300]}", "FAILED"])
    log(f"  {line}")


def _try(ctx: Ctx, res: PartResult, kind: str, spec: dict[str, Any], budget: Budget) -> dict[str, Any] | None:
    """:meth:`Ctx.run_step`, a failure recorded in ``res`` (None) so that the part's other steps still run;
    budget, timeout and interrupt exceptions go through."""
    try:
        return ctx.run_step(kind, spec, budget)
    except (BudgetSpent, subprocess.TimeoutExpired, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - reported, the part goes on
        _failed(res, kind, e)
        return None


def part_region(ctx: Ctx, budget: Budget, res: PartResult) -> None:
    _need_data(ctx)
    s = ctx.sizes
    spec = {**ctx.base_spec(), "model": s.model, "overlap": resolved_overlap(s.model, s.window),
            "out": str(ctx.work / "region_engine.tif")}
    floors: list[dict[str, Any]] = []
    engines: list[dict[str, Any]] = []
    res.data.update(spec=spec, model_only=floors, engine=engines)
    mp = s.region**2 / 1e6
    try:
        for rep in range(s.region_repeats):
            if rep and not (floors and engines):
                break  # a side failed: no point in repeating
            if rep:
                budget.need(s.est.get("region_model_only", 0) + s.est.get("region_engine", 0), "another repeat")
            f = _try(ctx, res, "region_model_only", spec, budget)
            e = _try(ctx, res, "region_engine", spec, budget)
            floors += [f] if f else []
            engines += [e] if e else []
    except BudgetSpent as e:
        if not engines:
            raise
        res.data["note"] = f"{len(engines)} repeat(s): {e}"
    rows: list[list[str]] = []
    f_s = min(r["seconds"] for r in floors) if floors else None
    if f_s is not None:
        rows.append([f"model alone, same {floors[0]['windows']} windows in device memory: {_mps(mp, f_s)} "
                     f"({f_s:.2f} s); peak GPU {_gib(floors[0].get('peak_gpu_mib'))}", "floor"])
    if engines:
        best = min(engines, key=lambda r: r["seconds"])
        e_s = best["seconds"]
        ctx.engine_best_s = e_s
        st = best["stats"]
        busy = (st.get("model_seconds") or 0) / max(st.get("seconds") or e_s, 1e-9)
        km2 = km2_per_min(s.region, e_s)
        ratio = f_s / e_s if f_s is not None else None
        res.data.update(ratio=ratio, megapixels=mp, km2_per_min_at_0_6m=km2, engine_model_share=busy,
                        gpu_util=best.get("gpu_util"))
        goal = f">= {GOAL_ENGINE}: " + ("-" if ratio is None else "met" if ratio >= GOAL_ENGINE else "NOT met")
        rows.append([f"engine predict_raster -> COG: {_mps(mp, e_s)} ({e_s:.2f} s) = {km2:.3g} km^2/min at "
                     f"{GSD_M} m; engine / model alone " + ("-" if ratio is None else f"{ratio:.2f}"), goal])
        rows.append([f"  {_util_text(best.get('gpu_util'))}; model calls {busy:.0%} of the run; COG finish "
                     f"{st.get('finish_seconds', float('nan')):.1f} s; peak GPU {_gib(best.get('peak_gpu_mib'))}, "
                     f"peak RSS {best.get('peak_rss_mib', 0):.0f} MiB", "(information)"])
    if "note" in res.data:
        rows.append([f"  {res.data['note']}", ""])
    res.rows[:0] = rows  # measurements first, failures after


def part_torchgeo(ctx: Ctx, budget: Budget, res: PartResult) -> None:
    _need_data(ctx)
    s = ctx.sizes
    spec = {**ctx.base_spec(), "model": s.model, "overlap": resolved_overlap(s.model, s.window),
            "out": str(ctx.work / "region_tg.tif")}
    res.data["spec"] = spec
    tg = ctx.run_step("region_torchgeo", spec, budget)
    mp = s.region**2 / 1e6
    res.data["torchgeo"] = tg
    row = f"torchgeo way (DataLoader workers: {spec['tg_workers']}): {_mps(mp, tg['seconds'])} ({tg['seconds']:.2f} s)"
    if ctx.engine_best_s:
        speedup = tg["seconds"] / ctx.engine_best_s
        res.data["engine_speedup"] = speedup
        res.rows.append([f"{row}; engine {speedup:.2f}x faster",
                         f">= {GOAL_TORCHGEO}: {'met' if speedup >= GOAL_TORCHGEO else 'NOT met'}"])
    else:
        res.rows.append([f"{row}; no engine time from part 2 to compare", f">= {GOAL_TORCHGEO}: -"])
    res.rows.append([f"  {_util_text(tg.get('gpu_util'))}; write {tg['write_seconds']:.1f} s; "
                     f"{tg['missing_px']} output px not covered; peak GPU {_gib(tg.get('peak_gpu_mib'))}",
                     "(information)"])


def part_ssl(ctx: Ctx, budget: Budget, res: PartResult) -> None:
    _need_data(ctx, "ssl")
    s = ctx.sizes
    workers = ctx.args.ssl_workers if ctx.args.ssl_workers is not None else (
        min(12, max(2, (os.cpu_count() or 2) - 3)) if ctx.device.startswith("cuda") else 0)
    ssl = {"arch": s.ssl_arch, "batch": s.ssl_batch, "global_size": s.global_size, "local_size": s.local_size,
           "local_number": s.local_number, "gram_size": s.gram_size, "prototypes": s.prototypes,
           "hidden": s.hidden, "bottleneck": s.bottleneck, "warmup": s.warmup, "iters": s.iters,
           "workers": workers}
    threads = max(1, (os.cpu_count() or 2) // 2) if ctx.device.startswith("cuda") else ctx.args.threads
    base = {"device": ctx.device, "store": str(ctx.ssl_store), "precision": ctx.args.ssl_precision, "ssl": ssl,
            "threads": threads}
    variants: dict[str, Any] = {}
    res.data.update(config=base, variants=variants)
    for gram in (False, True):
        label = "with Gram" if gram else "no Gram"
        spec = {**base, "gram": gram, "out": str(ctx.work / f"ssl_{'gram' if gram else 'plain'}")}
        eng = _try(ctx, res, "ssl_engine", spec, budget)
        if gram and eng is not None and not eng.get("gram_loss_logged"):
            _failed(res, "ssl_engine", RuntimeError("the Gram run logged no gram_loss: the Gram loss was not active"))
        flo = _try(ctx, res, "ssl_floor", spec, budget)
        variants[label] = {"engine": eng, "floor": flo}
        if eng is None or flo is None:
            continue
        ratio = eng["s_per_it"] / flo["s_per_it"]
        variants[label]["ratio"] = ratio
        res.rows.insert(sum(1 for v in variants.values() if "ratio" in v) - 1, [
            f"{label}: engine {eng['s_per_it']:.3f} s/it, floor {flo['s_per_it']:.3f} s/it, engine / floor "
            f"{ratio:.2f}; data wait {eng['data_wait_s_mean']:.3f} s/it; peak GPU engine "
            f"{_gib(eng.get('peak_gpu_mib'))}, floor {_gib(flo.get('peak_gpu_mib'))}",
            f"<= {GOAL_SSL}: {'met' if ratio <= GOAL_SSL else 'NOT met'}"])


def part_data_path(ctx: Ctx, budget: Budget, res: PartResult) -> None:
    _need_data(ctx)
    s = ctx.sizes
    spec = {**ctx.base_spec(), "model": "datapath", "overlap": resolved_overlap("datapath", s.window),
            "out": str(ctx.work / "dp.tif")}
    res.data["spec"] = spec
    eng = ctx.run_step("region_engine", spec, budget)
    res.data["engine"] = eng
    mp = s.region**2 / 1e6
    res.rows.append([f"engine {_mps(mp, eng['seconds'])} ({eng['seconds']:.2f} s, "
                     f"{eng['stats'].get('finish_seconds', 0):.1f} s COG finish; "
                     f"{_util_text(eng.get('gpu_util'))})", "(reference)"])
    tg = ctx.run_step("region_torchgeo", {**spec, "out": str(ctx.work / "dp_tg.tif")}, budget)
    speedup = tg["seconds"] / eng["seconds"]
    res.data.update(torchgeo=tg, engine_speedup=speedup)
    res.rows.append([f"torchgeo way {_mps(mp, tg['seconds'])} ({tg['seconds']:.2f} s): engine {speedup:.2f}x faster",
                     "(reference)"])


def part_convnext(ctx: Ctx, budget: Budget, res: PartResult) -> None:
    """ConvNeXt feature forward (what ``dinov3geo features`` runs per window) in channels-last / NCHW x fp32 /
    bf16 autocast on the device (issue 18: "channels-last and bf16 on CPU and CUDA where they help"), with
    the largest deviation from fp32 NCHW; :func:`backbone.settings_bench`, in this process."""
    import backbone  # benchmarks/backbone.py

    s = ctx.sizes
    res.data["runs"] = []
    for size in s.convnext_sizes:
        budget.need(6.0 if ctx.args.smoke else 8.0, f"{s.convnext_arch} {size} px")
        rows, runs = backbone.settings_bench(s.convnext_arch, size, s.convnext_batch, warmup=2,
                                             repeat=s.convnext_repeat, device=ctx.device)
        res.data["runs"] += runs
        base = runs[0]["img_s_fastest"]
        for r in runs:
            res.rows.append([f"{s.convnext_arch} {size} px batch {s.convnext_batch} {r['setting']}: "
                             f"{r['img_s_fastest']:.1f} img/s ({r['img_s_fastest'] / base:.2f}x the default), "
                             f"max |dev| vs fp32 NCHW {r['max_abs_dev_vs_fp32_nchw']:.1e}", "(information)"])


PART_FUNCS: dict[str, Callable[[Ctx, Budget, PartResult], None]] = {
    "data": part_data, "cuda_tests": part_cuda_tests, "region": part_region, "torchgeo": part_torchgeo,
    "ssl": part_ssl, "data_path": part_data_path, "convnext": part_convnext,
}


# ---------------------------------------------------------------------------------------------- report
def table_rows(results: list[PartResult]) -> list[list[Any]]:
    """One row per part (status, time / budget, first result) and one per further result line."""
    rows: list[list[Any]] = []
    for r in results:
        lines = r.rows or [[r.message or "-", "-"]]
        msg = r.message if r.rows and r.message else ""
        rows.append([TITLES.get(r.name, r.name), r.status + (f": {msg}" if msg else ""),
                     f"{r.seconds:.0f} / {r.budget_s:.0f}", lines[0][0], lines[0][1]])
        rows += [["", "", "", ln[0], ln[1]] for ln in lines[1:]]
    return rows


def report(results: list[PartResult], ctx: Ctx, env: dict[str, Any], t_start: float, final: bool) -> dict[str, Any]:
    """The JSON document (and, when ``final``, the printed table and the ``$OUT`` copies)."""
    doc = {"script": "benchmarks/gpu_check.py", "smoke": ctx.args.smoke, "device": ctx.device, "work": str(ctx.work),
           "wall_s": round(time.monotonic() - t_start, 2), "time_limit_s": ctx.args.time_limit, "final": final,
           "parts": {r.name: r.to_dict() for r in results}, "steps": ctx.step_log, "env": env,
           "args": {k: v for k, v in vars(ctx.args).items() if k != "child"}}
    outs = [Path(ctx.args.json)] if ctx.args.json else []
    if os.environ.get("OUT"):
        outs.append(Path(os.environ["OUT"]) / "gpu_check.json")
    text = ""
    if final:
        gpu = env.get("gpu") or {}
        card = ", ".join(f"{d['name']} ({d['memory_gib']} GiB)" for d in gpu.get("devices", [])) or "no CUDA GPU"
        title = (f"## GPU check{' (smoke: tiny sizes)' if ctx.args.smoke else ''}: {card}; device {ctx.device}; "
                 f"torch {gpu.get('torch')} (CUDA {gpu.get('torch_cuda')}, driver {gpu.get('driver')}); "
                 f"{doc['wall_s']:.0f} s of {ctx.args.time_limit:.0f} s")
        missing = [m for m, v in (env.get("packages") or {}).items() if v is None]
        if missing:
            title += f"; not importable: {', '.join(missing)}"
        text = print_table(table_rows(results), ["part", "status", "s / budget", "result", "goal"], title=title)
        doc["table"] = text
    for p in outs:
        write_json(p, doc)
    if final and os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_check.md").write_text(text + "\n")
    return doc


# ---------------------------------------------------------------------------------------------- main
def _scratch(smoke: bool) -> str | None:
    """Where the work folder goes: ``/dev/shm`` (memory) on a full run when it has 24 GiB free, since the SSL
    runs write multi-GB checkpoints and exports that only cost time there; else the system's temporary folder."""
    shm = "/dev/shm"
    if not smoke and os.path.isdir(shm):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(shm).free > 24 * 2**30 and os.access(shm, os.W_OK):
                return shm
    return None


def _parse_budgets(items: list[str], base: dict[str, float]) -> dict[str, float]:
    out = dict(base)
    for item in items:
        name, _, value = item.partition("=")
        if name not in PARTS or not value:
            raise SystemExit(f"--budget {item!r}: use part=seconds with part one of {', '.join(PARTS)}")
        out[name] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, in this process (seconds)")
    ap.add_argument("--device", help="default: cuda (cpu with --smoke)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--budget", action="append", default=[], metavar="PART=S", help="a part's budget in seconds")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="global wall-clock limit in seconds (default 470; 3600 with --smoke)")
    ap.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"], help="autocast of the region runs")
    ap.add_argument("--ssl-precision", default="bf16-mixed", choices=["bf16-mixed", "bf16-params", "32-true"])
    ap.add_argument("--tg-workers", type=int, default=None, help="torchgeo DataLoader workers (default: "
                    "min(8, cores / 2) on a GPU, 1 in --smoke)")
    ap.add_argument("--ssl-workers", type=int, default=None, help="engine data.num_workers (default: min(12, "
                    "cores - 3) on a GPU, 0 in --smoke)")
    ap.add_argument("--read-threads", type=int, default=None, help="engine read threads (default: the engine's)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads in --smoke")
    ap.add_argument("--repeats", type=int, default=None, help="engine / model-only pairs in part 2 (default 2)")
    ap.add_argument("--tests-on-cpu", action="store_true",
                    help="run the CUDA tests on the CPU (DINOV3GEO_CUDA_TESTS_ON_CPU=1) instead of skipping them")
    ap.add_argument("--in-process", action="store_true", help="run the steps in this process (implied by --smoke; "
                    "a step in this process cannot be stopped: budgets are then checked between steps only)")
    ap.add_argument("--children", action="store_true", help="with --smoke: run each step in its own process, as "
                    "on a GPU (checks that path)")
    ap.add_argument("--workdir", help="where to generate data (default: a new temporary folder, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", help="write the results here (also $OUT/gpu_check.json when $OUT is set)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(HANDLERS, args.child)
        return 0
    t_start = time.monotonic()
    if args.time_limit is None:
        args.time_limit = 3600.0 if args.smoke else 470.0
    deadline = t_start + args.time_limit - 3.0  # the report's own seconds
    import torch

    cuda = torch.cuda.is_available()
    device = args.device or ("cpu" if args.smoke or not cuda else "cuda")
    if args.tg_workers is None:
        args.tg_workers = 1 if args.smoke or not device.startswith("cuda") else min(8, max(1, (os.cpu_count() or 2) // 2))
    sizes = smoke_sizes() if args.smoke else Sizes()
    if args.repeats is not None:
        sizes.region_repeats = max(1, args.repeats)
    budgets = {k: SMOKE_BUDGET for k in PARTS} if args.smoke else dict(BUDGETS)
    budgets = _parse_budgets(args.budget, budgets)
    selected = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in selected if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    if any(p in selected for p in ("region", "torchgeo", "ssl", "data_path")) and "data" not in selected:
        selected.insert(0, "data")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dinov3geo-gpu-check-",
                                                                          dir=_scratch(args.smoke)))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(args, sizes, device, work, in_process=args.in_process or (args.smoke and not args.children))
    env = environment()
    env["packages"] = packages()
    log(f"GPU check on {device} ({'smoke' if args.smoke else 'full'}), work folder {work}, time limit "
        f"{args.time_limit:.0f} s")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old_term = signal.signal(signal.SIGTERM, on_term)
    results: list[PartResult] = [PartResult(p, budget_s=budgets[p]) for p in selected]
    try:
        if not device.startswith("cuda") and not args.smoke and args.device is None:
            for r in results:
                r.status, r.message = "skipped", "no CUDA GPU (torch.cuda.is_available() is False): use --smoke"
            return 2
        parts: list[tuple[str, PartFn]] = [(p, (lambda b, r, f=PART_FUNCS[p]: f(ctx, b, r))) for p in selected]
        results = run_parts(parts, budgets, deadline,
                            on_done=lambda rs: report(rs, ctx, env, t_start, final=False))
    except KeyboardInterrupt:
        for r in results:
            if r.status == "not run":
                r.message = "interrupted"
    finally:
        signal.signal(signal.SIGTERM, old_term)
        report(results, ctx, env, t_start, final=True)
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
