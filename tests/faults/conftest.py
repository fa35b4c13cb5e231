"""Shared pieces of the fault tests: tiny models, strips of the bundled NEON image, real CLI processes.

Every run here, in this process or in a child, computes with one torch thread: results are then bitwise
reproducible between processes (the thread count decides how float sums are split), and two processes on a
busy 2-core machine do not fight over the cores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch

REPO = Path(__file__).resolve().parents[2]
#: the bundled NEON BART image (10 cm RGB, 1213 x 1106) and its lidar CHM (1 m): always present in the checkout
NEON_RGB = REPO / "data" / "neon_bart_2019" / "2019_BART_5_320000_4881000_image_crop.tif"
NEON_CHM = REPO / "data" / "neon_bart_2019" / "NEON_D01_BART_DP3_320000_4881000_CHM_crop.tif"
#: what the CLI prints on Ctrl-C (dinov3geo.cli.INTERRUPTED)
INTERRUPTED = "interrupted; re-run the same command to resume"
#: environment of the CLI child processes: one compute thread (see the module docstring)
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DINOV3GEO_NO_PROGRESS": "1"}


@pytest.fixture(scope="module")
def canopy_model(tmp_path_factory) -> Path:
    """A tiny canopy model (2-block ViT + DPT head): cheap windows, real engine path."""
    from dinov3geo.models import build_backbone
    from dinov3geo.tasks.canopy.bins import HeightBins
    from dinov3geo.tasks.canopy.dpt import DPTHead
    from dinov3geo.tasks.canopy.model import CanopyHeightModel, save_canopy_model

    torch.manual_seed(0)
    bb = build_backbone("vit_tiny_test", depth=2, num_heads=4)
    head = DPTHead(64, [8, 16, 32, 64], channels=16, n_hidden_channels=8, n_bins=8)
    model = CanopyHeightModel(bb, head, HeightBins(8, "linear", "softmax", 0.5, 40.0))
    return save_canopy_model(tmp_path_factory.mktemp("model") / "model.pt", model, bands=["red", "green", "blue"],
                             mean=[0.4, 0.4, 0.3], std=[0.2, 0.2, 0.2], value_scale=1 / 255)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo what ``dinov3geo.cli.main`` run in this process does to logging (its stderr handler is bound to the
    test's captured stream, closed after the test: later tests would log into a closed file)."""
    import logging
    import warnings

    from dinov3geo.utils import progress

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libs = {n: logging.getLogger(n).level for n in getattr(progress, "NOISY_LOGGERS", ())}
    showwarning, quiet, factory = warnings.showwarning, getattr(progress, "_QUIET", False), logging.getLogRecordFactory()
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    for n, lvl in libs.items():
        logging.getLogger(n).setLevel(lvl)
    warnings.showwarning = showwarning
    logging.setLogRecordFactory(factory)
    progress.set_quiet(quiet)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch uses one thread in this process for the test (as the CLI children do)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (hidden files included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def neon_strip(path: Path, height: int, copies: int) -> Path:
    """A strip of the NEON image: its top ``height`` rows, repeated ``copies`` times side by side (mirrored
    every other time, so the seams are continuous). Real pixels, and as many engine blocks as wanted."""
    with rasterio.open(NEON_RGB) as src:
        top = src.read(window=((0, height), (0, src.width)))
        profile = src.profile
    strip = np.concatenate([top if i % 2 == 0 else top[:, :, ::-1] for i in range(copies)], axis=2)
    profile.update(height=height, width=strip.shape[2], tiled=True, blockxsize=256, blockysize=height // 16 * 16,
                   compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(strip)
    return path


def cli(*args: str) -> list[str]:
    """The command line of ``dinov3geo ARGS`` run by this Python."""
    return [sys.executable, "-m", "dinov3geo.cli", *args]


@contextlib.contextmanager
def _sigint_not_ignored() -> Iterator[None]:
    """A child inherits an ignored SIGINT (pytest started in the background by a shell): un-ignore it for the
    child, whose Python then installs its KeyboardInterrupt handler."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        yield


def signal_when(cmd: list[str], ready: Callable[[], bool], sig: int, *, cwd: Path,
                timeout: float = 600.0) -> subprocess.CompletedProcess:
    """Run ``cmd``; as soon as ``ready()`` (evidence of progress on disk) is true, send ``sig``; wait for the end.

    Returns the finished process (with its ``pid``).

    No timed sleep decides when the signal lands: the files are polled every 10 ms. The test fails if the run
    ends before the evidence appears (then the signal could not land mid-run).
    """
    out, err = cwd / f".{os.getpid()}-{time.monotonic_ns()}.out", cwd / f".{os.getpid()}-{time.monotonic_ns()}.err"
    with open(out, "w") as fo, open(err, "w") as fe, _sigint_not_ignored():
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, cwd=cwd, env=CHILD_ENV)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"{cmd[3:]} ended (status {proc.returncode}) before any evidence of progress, so the "
                            f"signal could not land mid-run; stderr: {err.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no evidence of progress from {cmd[3:]} within {timeout:.0f} s")
            time.sleep(0.01)
        proc.send_signal(sig)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(), err.read_text())
    result.pid = proc.pid  # type: ignore[attr-defined]
    out.unlink()
    err.unlink()
    return result


def assert_interrupted(res: subprocess.CompletedProcess) -> None:
    """Ctrl-C: exit status 130 and exactly one line on stderr, no traceback."""
    assert res.returncode == 130, (res.returncode, res.stderr[-3000:])
    assert res.stderr == INTERRUPTED + "\n", res.stderr[-3000:]


def assert_killed(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-3000:])


def manifest_done(parts: Path) -> int:
    """How many blocks the engine's manifest in ``parts`` records as finished (0 when there is none yet)."""
    try:
        return len(json.loads((parts / "manifest.json").read_text()).get("done", {}))
    except (OSError, ValueError):
        return 0


def assert_same_objects(a: Any, b: Any, where: str = "") -> None:
    """``a`` and ``b`` (nested dicts/lists of tensors, arrays and plain values) are bitwise equal (NaN = NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b) if isinstance(b, dict) else b)
        for k in a:
            assert_same_objects(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_objects(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"tensors differ at {where}")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), where
    else:
        assert a == b or (isinstance(a, float) and np.isnan(a) and np.isnan(b)), (where, a, b)
