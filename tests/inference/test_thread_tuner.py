"""The intra-op thread tuner of the inference pipeline (``_ThreadTuner``), on a fake clock, and its use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from dinov3geo.inference import MeanFilter, predict_raster
from dinov3geo.inference import engine as eng
from tests.conftest import write_raster
from tests.inference.conftest import smooth_field


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _run(monkeypatch: pytest.MonkeyPatch, wall: dict[int, float], model: dict[int, float], n: int = 40) -> tuple[int, list[int]]:
    """Feed the tuner ``n`` batches of 8 windows: per batch ``wall[threads]`` seconds of pipeline time of which
    ``model[threads]`` in the model call. Returns the choice and the thread counts used, batch by batch."""
    clock = _Clock()
    monkeypatch.setattr(eng.time, "perf_counter", clock)
    tuner = eng._ThreadTuner(2)
    used = []
    for _ in range(n):
        th = tuner.threads()
        used.append(th)
        clock.t += wall[th]
        tuner.done(8, model[th])
    assert tuner.chosen is not None
    return tuner.chosen, used


def test_model_bound_keeps_all_threads_without_trying_one(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen, used = _run(monkeypatch, wall={2: 1.0, 1: 1.9}, model={2: 0.95, 1: 1.85})
    assert chosen == 2 and set(used) == {2}


def test_io_bound_cheap_model_takes_one_thread_without_a_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen, used = _run(monkeypatch, wall={2: 0.05, 1: 0.04}, model={2: 0.01, 1: 0.012})
    assert chosen == 1 and used[:6] == [2] * 6 and set(used[6:]) == {1}


def test_middle_case_is_decided_by_a_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    # the model fills 60 % of the time: one thread is tried; here it is faster overall -> kept
    chosen, used = _run(monkeypatch, wall={2: 0.10, 1: 0.09}, model={2: 0.06, 1: 0.08})
    assert chosen == 1 and used[6:10] == [1] * 4
    # ... and here it is much slower -> given up after two timed batches
    chosen, used = _run(monkeypatch, wall={2: 0.10, 1: 0.16}, model={2: 0.06, 1: 0.15})
    assert chosen == 2 and used[6:9] == [1, 1, 1] and set(used[9:]) == {2}


def test_predict_raster_restores_torch_threads_and_reports_the_choice(tmp_path: Path) -> None:
    img = smooth_field(200, 260, bands=2)
    src = write_raster(tmp_path / "in.tif", img, transform=from_origin(500000.0, 4000000.0, 10.0, 10.0))
    before = torch.get_num_threads()
    results = {}
    for mt in ("auto", 1, None):
        stats: dict = {}
        out = predict_raster(MeanFilter(5, bands=2), src, tmp_path / f"out_{mt}.tif", window=64, overlap=16,
                             block_size=96, blocksize=128, progress=False, model_threads=mt, stats=stats)
        assert torch.get_num_threads() == before
        assert stats["model_threads"] in {1, before}
        if mt == 1:
            assert stats["model_threads"] == 1
        with rasterio.open(out) as ds:
            results[mt] = ds.read()
    np.testing.assert_allclose(results["auto"], results[1], rtol=1e-6)  # the same result with any thread count
    np.testing.assert_allclose(results[None], results[1], rtol=1e-6)
    with pytest.raises(ValueError, match="model_threads"):
        predict_raster(MeanFilter(5, bands=2), src, tmp_path / "bad.tif", model_threads=0, progress=False)
