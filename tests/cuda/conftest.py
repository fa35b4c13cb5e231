"""Fixtures of the CUDA tests: the device, a small real RGB tile store, tiny models and pretraining configs.

Every test here is marked ``cuda`` and skipped (by the hook in ``tests/conftest.py``) when torch sees no CUDA
GPU. ``DINOV3GEO_CUDA_TESTS_ON_CPU=1`` runs them on the CPU instead, which checks the tests themselves (not the
GPU paths) where no GPU is available: the ``device`` fixture is then the CPU, and tests that cannot run on a CPU
at all skip with their reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
#: a small real RGB image in the repository (NEON BART 2019, 10 cm, 1106 x 1213, uint8): no shared data needed
NEON_RGB = REPO / "data" / "neon_bart_2019" / "2019_BART_5_320000_4881000_image_crop.tif"


def on_cpu() -> bool:
    """The CUDA tests were asked to run on the CPU (``DINOV3GEO_CUDA_TESTS_ON_CPU=1``)."""
    return os.environ.get("DINOV3GEO_CUDA_TESTS_ON_CPU") == "1"


@pytest.fixture
def device() -> torch.device:
    """``cuda`` (or the CPU under ``DINOV3GEO_CUDA_TESTS_ON_CPU=1``)."""
    return torch.device("cpu") if on_cpu() else torch.device("cuda")


@pytest.fixture
def accelerator() -> str:
    """The Lightning accelerator of ``device``."""
    return "cpu" if on_cpu() else "gpu"


@pytest.fixture(scope="module")
def rgb_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The NEON RGB crop ingested as 64 px tiles."""
    from dinov3geo.ingest import ingest

    out = tmp_path_factory.mktemp("cuda_ssl") / "neon.zarr"
    ingest([NEON_RGB], out, tile_size=64, progress=False)
    return out


#: tiny pretraining (as tests/ssl/test_pretrain.py)
TINY_SSL: dict[str, Any] = {
    "data": {"batch_size": 4, "num_workers": 0},
    "student": {"arch": "vit_tiny_test"},
    "crops": {"global_crops_size": 64, "local_crops_size": 32, "local_crops_number": 2},
    "dino": {"head_n_prototypes": 128, "head_hidden_dim": 64, "head_bottleneck_dim": 32},
    "ibot": {"head_n_prototypes": 128, "head_hidden_dim": 64, "head_bottleneck_dim": 32},
    "optim": {"iterations": 4},
    "schedules": {"lr": {"start": 0.0, "peak": 1e-3, "end": 1e-3, "warmup_iterations": 2},
                  "teacher_temp": {"start": 0.04, "peak": 0.07, "end": 0.07, "warmup_iterations": 2}},
    "train": {"checkpoint_every": 2, "log_every": 1, "health_every": 2, "progress_bar": False, "devices": 1},
}


def ssl_config(store: Path, out: Path, accelerator: str, **over: Any) -> Any:
    """:data:`TINY_SSL` on ``store`` writing to ``out`` on ``accelerator``; ``section__key=value`` overrides."""
    from dinov3geo.ssl.config import load_config

    raw = json.loads(json.dumps(TINY_SSL))
    raw["data"]["store"] = str(store)
    raw["train"]["output_dir"] = str(out)
    raw["train"]["accelerator"] = accelerator
    for k, v in over.items():
        sec, key = k.split("__")
        raw.setdefault(sec, {})[key] = v
    return load_config(raw)


def tiny_chmv2(seed: int = 0) -> Any:
    """A random CHMv2 of the release's layout at a tiny size (4 blocks, 64 dims, 4 heads, DPT head, 32 bins)."""
    from dinov3geo.models import build_backbone
    from dinov3geo.tasks.canopy.chmv2 import CHMv2
    from dinov3geo.tasks.canopy.dpt import DPTHead

    torch.manual_seed(seed)
    bb = build_backbone("vit_tiny_test", depth=4, num_heads=4, in_chans=3)
    with torch.no_grad():  # non-trivial layer scales, so the blocks matter
        for name, p in bb.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(0.2)
    head = DPTHead(64, [8, 16, 32, 64], channels=16, n_hidden_channels=8, n_bins=32)
    return CHMv2(bb, head).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius norms) in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
