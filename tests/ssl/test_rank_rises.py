"""A short pretraining run on real tiles raises the effective rank of the patch features.

The tiles are those of ``benchmarks/ssl_quality.py`` (Landsat 5, Sentinel-2 L2A, NEON 10 cm, NAIP, drone RGB
from ``../shared/data``, 128 px): several sensors and scales, so that an untrained ViT's patch features of them
span few directions (effective rank ~45-55 of 128 on the first training crops), unlike the single NEON scene of
``test_learning.py`` whose features start near full rank. With the recipe of that benchmark (ViT 128-d, depth 4,
1024 prototypes, batch 16, 2 x 64 px + 4 x 32 px crops, LR 2e-3 (sqrt scaling), teacher temperature 0.04 -> 0.07)
the DINO loss falls and the rank (of the student's patch tokens, logged every 5 iterations by ``health_every``)
rises within 100 iterations. Measured, fp32, seeds 0 / 1 / 2 (mean of the last 10 logs minus mean of the first
2): +7.8, +15.4, +11.6 (e.g. seed 0: 52.0 -> 59.8); the test asks for +5 with seed 0. About 20 s on 2 cores.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from dinov3geo.ingest import ingest
from dinov3geo.ssl.config import load_config
from dinov3geo.ssl.train import pretrain, stage_metrics

ROOT = Path(__file__).resolve().parents[2]
RISE = 5.0


@pytest.fixture(scope="module")
def multi_store(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import ssl_quality  # the benchmark's scene preparation (stretch, upsampling, 8-bit RGB)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    work = tmp_path_factory.mktemp("rank")
    scenes = ssl_quality.prepare_scenes(work / "scenes", 4.0, 0.25)
    store = work / "multi.zarr"
    ingest([str(p) for p in scenes.values()], store, tile_size=128, progress=False)
    return store


def test_effective_rank_rises_and_dino_loss_falls(multi_store: Path, tmp_path: Path) -> None:
    head = {"head_n_prototypes": 1024, "head_hidden_dim": 512, "head_bottleneck_dim": 128}
    raw = {"data": {"store": str(multi_store), "batch_size": 16, "num_workers": 0},
           "student": {"arch": "vit_tiny_test", "overrides": {"embed_dim": 128, "depth": 4, "num_heads": 4}},
           "crops": {"global_crops_size": 64, "local_crops_size": 32, "local_crops_number": 4},
           "dino": dict(head), "ibot": dict(head), "optim": {"iterations": 100},
           "schedules": {"lr": {"start": 0.0, "peak": 2e-3, "end": 2e-3, "warmup_iterations": 10},
                         "teacher_temp": {"start": 0.04, "peak": 0.07, "end": 0.07, "warmup_iterations": 25},
                         "momentum": {"start": 0.992, "peak": 0.992, "end": 0.992, "warmup_iterations": 0}},
           "train": {"output_dir": str(tmp_path / "run"), "precision": "32-true", "checkpoint_every": 10**9,
                     "log_every": 5, "health_every": 5, "progress_bar": False, "seed": 0}}
    pretrain(load_config(raw))
    rows = [r for r in stage_metrics(tmp_path / "run") if math.isfinite(r.get("health/effective_rank", math.nan))]
    assert len(rows) == 20
    ranks = [r["health/effective_rank"] for r in rows]
    start, end = float(np.mean(ranks[:2])), float(np.mean(ranks[-10:]))
    assert end >= start + RISE, (start, end, ranks)
    dino = [r["dino_global_crops_loss"] for r in rows]
    assert float(np.mean(dino[-5:])) < float(np.mean(dino[:2])), dino
