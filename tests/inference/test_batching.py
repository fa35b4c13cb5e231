"""The shared automatic batch size (dinov3geo.inference.batching): any model with a memory estimate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dinov3geo.inference import batching
from dinov3geo.inference.batching import (
    CPU_MEMORY_BUDGET,
    CPU_PIXELS_PER_CALL,
    MAX_AUTO_BATCH,
    backbone_window_elements,
    choose_batch_size,
    memory_estimator,
    region_reserve,
    resolve_batch_size,
    resumed_batch_size,
)
from dinov3geo.models import build_backbone


class Linear:
    """A model whose working memory is ``per_window`` bytes per window of 512^2 px (scaled by area)."""

    def __init__(self, per_window: int) -> None:
        self.per_window = per_window

    def memory_estimate(self, window: int, batch: int = 1) -> int:
        return int(self.per_window * batch * (window / 512) ** 2)


class Wrapper:
    """A raster model wrapping one (as ``.model``)."""

    def __init__(self, model: object) -> None:
        self.model = model


def test_explicit_and_invalid() -> None:
    m = Linear(1)
    for explicit in (1, 5, 4096):
        assert choose_batch_size(m, 512, "cpu", explicit) == explicit
        assert choose_batch_size(object(), 512, "cpu", explicit) == explicit  # no estimate needed
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ValueError, match="batch_size must be a positive int or None"):
            choose_batch_size(m, 512, "cpu", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window"):
        choose_batch_size(m, 0, "cpu")
    with pytest.raises(TypeError, match="memory_estimate"):
        choose_batch_size(object(), 512, "cpu")


def test_cpu_cap_and_budget() -> None:
    big = 1 << 40
    small = Linear(1 << 20)
    assert choose_batch_size(small, 512, "cpu", available=big) == CPU_PIXELS_PER_CALL // 512**2
    assert choose_batch_size(Wrapper(small), 512, "cpu", available=big) == CPU_PIXELS_PER_CALL // 512**2
    assert choose_batch_size(small, 128, "cpu", available=big) == min(MAX_AUTO_BATCH,
                                                                        math.ceil(CPU_PIXELS_PER_CALL / 128**2))
    assert choose_batch_size(small, 2048, "cpu", available=big) == 1
    # the budget holds the model's windows and the engine's own buffers: 2 windows of 300 MiB fit in 1 GiB
    # beside them, 3 do not (without the reserve 3 would: 900 MiB)
    m = Linear(300 << 20)
    assert (2 << 20) * 300 + region_reserve(m, 512, 2) <= CPU_MEMORY_BUDGET < 900 * 2**20 + region_reserve(m, 512, 3)
    assert choose_batch_size(m, 512, "cpu", available=big) == 2
    # a quarter of the available memory
    two = 2 * (1 << 20) + region_reserve(small, 512, 2)
    assert choose_batch_size(small, 512, "cpu", available=4 * two) == 2
    assert choose_batch_size(small, 512, "cpu", available=4 * two - 4) == 1
    assert choose_batch_size(Linear(2 << 30), 512, "cpu", available=big) == 1  # never below 1


def test_cuda_by_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    m = Linear(100 << 20)
    assert choose_batch_size(m, 512, "cuda", available=2 * 7 * (100 << 20)) == 7
    assert choose_batch_size(m, 512, "cuda", available=1 << 50) == MAX_AUTO_BATCH
    monkeypatch.setattr(batching, "available_memory", lambda device="cpu": 2 * 5 * (100 << 20))
    assert choose_batch_size(m, 512, "cuda") == 5  # default: the free memory of the device


def test_memory_estimator_and_canopy_reexport() -> None:
    m = Linear(3)
    assert memory_estimator(m)(512, 2) == 6
    assert memory_estimator(Wrapper(m))(512, 2) == 6
    from dinov3geo.tasks.canopy import predict

    assert predict.choose_batch_size is choose_batch_size
    assert predict.available_memory is batching.available_memory
    assert predict.CPU_MEMORY_BUDGET == CPU_MEMORY_BUDGET


def test_backbone_window_elements() -> None:
    vit = build_backbone("vitl16", device="meta")
    tokens = 32 * 32 + 1 + vit.config.n_storage_tokens
    e = backbone_window_elements(vit, 512, [5, 11, 17, 23])
    assert e == tokens * (8 * 1024 + 2 * 4096) + 2 * 4 * tokens * 1024
    assert backbone_window_elements(vit, 1024, [23]) > 3.9 * backbone_window_elements(vit, 512, [23])
    cnx = build_backbone("convnext_tiny", device="meta")
    assert backbone_window_elements(cnx, 512, [0, 1, 2, 3]) > backbone_window_elements(cnx, 256, [0, 1, 2, 3]) > 0


def test_resolve_batch_size(tmp_path: Path) -> None:
    from dinov3geo.inference.engine import parts_dir

    m = Linear(300 << 20)
    out = tmp_path / "map.tif"
    big = 1 << 40
    assert resolve_batch_size(m, 512, "cpu", out=out, available=big) == 2  # automatic: no interrupted run
    assert resolve_batch_size(m, 512, "cpu", 7, out=out) == 7  # explicit
    with pytest.raises(ValueError, match="batch_size"):
        resolve_batch_size(m, 512, "cpu", 0)
    assert resumed_batch_size(out) is None
    parts = parts_dir(out)
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"config": {"batch_size": 5}}))
    assert resumed_batch_size(out) == 5
    assert resolve_batch_size(m, 512, "cpu", out=out, available=big) == 5  # the interrupted run's batch
    assert resolve_batch_size(m, 512, "cpu", out=None, available=big) == 2  # not resuming
    assert resolve_batch_size(m, 512, "cpu", 2, out=out) == 2
    (parts / "manifest.json").write_text(json.dumps({"config": {"batch_size": True}}))
    assert resumed_batch_size(out) is None
    # models without an estimate: the fallback, else a TypeError
    assert resolve_batch_size(object(), 512, "cpu", fallback=4) == 4
    with pytest.raises(TypeError, match="memory_estimate"):
        resolve_batch_size(object(), 512, "cpu")


def test_region_reserve_follows_the_bands_and_the_batch() -> None:
    """The engine's buffers grow with the batches in flight and the bands they carry; the raster model's bands
    are used (a bare model without them counts 4 input bands, 1 output band)."""

    class Raster:
        in_bands, out_bands, scale = 3, 2, 1

    class Many(Raster):
        in_bands, out_bands = 13, 8

    r1, r4 = region_reserve(Raster(), 512, 1), region_reserve(Raster(), 512, 4)
    assert r4 > r1 > 200 * 2**20
    assert region_reserve(Many(), 512, 4) - region_reserve(Many(), 512, 1) > r4 - r1
    assert region_reserve(Linear(1), 512, 2) == region_reserve(type("P", (), {"in_bands": 4, "out_bands": 1,
                                                                              "scale": 1})(), 512, 2)


def test_available_memory_override_reaches_the_automatic_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """DINOV3GEO_AVAILABLE_MEMORY (a share of a machine) bounds the automatic batch as the CLI's checks see it."""
    from dinov3geo.cli._types import available_memory as cli_available

    small = Linear(1 << 20)
    two = 2 * (1 << 20) + region_reserve(small, 512, 2)
    monkeypatch.setenv("DINOV3GEO_AVAILABLE_MEMORY", str(4 * two))
    assert batching.available_memory("cpu") == cli_available() == 4 * two
    assert choose_batch_size(small, 512, "cpu") == 2
    monkeypatch.setenv("DINOV3GEO_AVAILABLE_MEMORY", str(4 * two - 4))
    assert choose_batch_size(small, 512, "cpu") == 1
