"""Automatic default batch size (``batch_size=None``) of change detection and land-cover mapping (issue 21 b).

End to end on small crops of real Landsat scenes (Pucallpa pair, Chiapas 1999) with tiny random models: a
trained head (change head, land-cover head) gets the batch chosen from its memory estimate and maps what an
explicit run of that batch maps; the classic and zero-shot change scores (no estimate) keep 4; a resumed run
keeps the batch size it was started with (part of the engine's fingerprint); the CLIs default to it; a bad
batch size is one line, before any work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from dinov3geo.cli import main
from dinov3geo.inference.batching import choose_batch_size
from dinov3geo.inference.engine import parts_dir
from dinov3geo.models import build_backbone
from dinov3geo.tasks.change.detect import FALLBACK_BATCH_SIZE, detect_change
from dinov3geo.tasks.change.head import ChangeHead, ChangeModel, ChangeRasterModel, save_change_model
from dinov3geo.tasks.landcover.classes import ClassTable
from dinov3geo.tasks.landcover.heads import LandcoverModel, LinearHead, save_landcover_model
from dinov3geo.tasks.landcover.predict import LandcoverRasterModel, predict_landcover
from tests.conftest import REPO_ROOT
from tests.tasks.landcover.test_heads import real_backbone

PUC = REPO_ROOT / "data" / "pucallpa"  # bundled: 697 x 377 px, 4 bands (swir16, nir, red, green), uint8
NAMES = ["swir16", "nir", "red", "green"]
CHIAPAS = "landcover/ogt_landsat7_chiapas_1999_2002/LE70220491999322EDC01_stack.gtif"  # 250 x 250, 8 bands
LC_BANDS = [1, 2, 3, 4]
WINDOW = 128
AUTO = re.compile(r"batch size (\d+) \(automatic, by memory\)")


def _digest(*paths: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def _same(a: Path, b: Path) -> None:
    x, y = _read(a), _read(b)
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6, equal_nan=True)  # NaN where NaN, else within 1e-6


def _auto_batch(text: str) -> int:
    found = AUTO.findall(text)
    assert len(found) == 1, text
    return int(found[0])


def _crash_after(rm: Any, calls: int) -> Callable[[], None]:
    """Make ``rm`` raise after ``calls`` model calls (as a kill would end the run); returns the undo.

    The override lives on the instance, so the model's fingerprint (type, weights) stays that of ``rm``."""
    count = [0]
    inner = rm.forward

    def forward(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if count[0] >= calls:
            raise RuntimeError("simulated crash")
        count[0] += 1
        return inner(x, valid)

    rm.forward = forward

    def undo() -> None:
        del rm.forward

    return undo


def _count_windows(rm: Any) -> list[int]:
    """Count the windows ``rm`` computes (instance override; the fingerprint is unchanged)."""
    seen: list[int] = []
    inner = rm.forward

    def forward(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        seen.append(int(x.shape[0]))
        return inner(x, valid)

    rm.forward = forward
    return seen


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """160 x 224 px crops of the bundled Pucallpa 2000 / 2020 Landsat composites (a deforestation frontier)."""
    d = tmp_path_factory.mktemp("puc")
    out = []
    for year in (2000, 2020):
        with rasterio.open(PUC / f"pucallpa_{year}.tif") as ds:
            win = Window(300, 100, 224, 160)
            prof = ds.profile | {"width": 224, "height": 160, "transform": ds.window_transform(win)}
            data = ds.read(window=win)
        path = d / f"pucallpa_{year}.tif"
        with rasterio.open(path, "w", **prof) as dst:
            dst.write(data)
        out.append(path)
    return out[0], out[1]


def _change_model(seed: int = 0) -> ChangeRasterModel:
    """A tiny change head on a random ``vit_tiny_test`` (4 bands per date), weights perturbed so it matters."""
    torch.manual_seed(seed)
    bb = build_backbone("vit_tiny_test", in_chans=4).eval()
    head = ChangeHead(64, 2, 16, 4, hidden=32, detail_channels=8)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return ChangeRasterModel(ChangeModel(bb, head, [0, 1]).eval(), value_scale=1 / 255, bands=NAMES)


def _landcover_model(value_scale: float = 1e-4) -> LandcoverRasterModel:
    """A tiny land-cover model (linear head, 3 classes) on a random 4-band ``vit_tiny_test``."""
    table = ClassTable.from_labels(["forest", "pasture", "water"])
    head = LinearHead(64, 3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model = LandcoverModel(real_backbone(in_chans=4), head, table, metadata={"bands": ["b1", "b2", "b3", "b4"]})
    return LandcoverRasterModel(model.eval(), value_scale=value_scale)


def _detect(pair: tuple[Path, Path], out: Path, **kw: Any) -> Any:
    return detect_change(pair[0], pair[1], out, band_names=NAMES, window=WINDOW, device="cpu", progress=False,
                         sidecars=False, **kw)


def _landcover(image: Path, out: Path, model: Any, **kw: Any) -> Path:
    return predict_landcover(model, image, out, bands=LC_BANDS, window=WINDOW, device="cpu", progress=False,
                             sidecars=False, **kw)


# ---------------------------------------------------------------------------------------------- (i) change head
def test_change_head_batch_is_chosen_by_memory(pair: tuple[Path, Path], tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    rm = _change_model()
    before = _digest(*pair)
    with caplog.at_level(logging.INFO, logger="dinov3geo"):
        auto = _detect(pair, tmp_path / "auto", method="head", model=rm, threshold=0.5)
    n = _auto_batch(caplog.text)
    assert n == choose_batch_size(rm, WINDOW, "cpu")  # the chooser's answer for this model and window
    assert f"change scores (head): window {WINDOW} px, batch size {n}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dinov3geo"):
        explicit = _detect(pair, tmp_path / "explicit", method="head", model=rm, threshold=0.5, batch_size=n)
    assert "automatic" not in caplog.text
    prob = _read(auto.paths["change_prob"])
    assert np.isfinite(prob).mean() > 0.9 and float(np.nanstd(prob)) > 1e-3  # a real map, not a constant
    _same(auto.paths["change_prob"], explicit.paths["change_prob"])
    _same(auto.paths["change"], explicit.paths["change"])
    assert _digest(*pair) == before


# ---------------------------------------------------------------------------------------------- (ii) land cover
def test_landcover_batch_is_chosen_by_memory(shared_data: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    image = shared_data / CHIAPAS
    rm = _landcover_model()
    before = _digest(image)
    with caplog.at_level(logging.INFO, logger="dinov3geo"):
        auto = _landcover(image, tmp_path / "auto.tif", rm, probabilities=tmp_path / "auto_p.tif", confidence=True)
    n = _auto_batch(caplog.text)
    assert n == choose_batch_size(rm, WINDOW, "cpu")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dinov3geo"):
        explicit = _landcover(image, tmp_path / "explicit.tif", rm, probabilities=tmp_path / "explicit_p.tif",
                              confidence=True, batch_size=n)
    assert "automatic" not in caplog.text
    p = _read(tmp_path / "auto_p.tif")
    assert p.shape[0] == 3 and np.isfinite(p).all() and float(p.std()) > 1e-3
    _same(tmp_path / "auto_p.tif", tmp_path / "explicit_p.tif")
    _same(auto, explicit)
    assert _digest(image) == before


def test_landcover_intermediate_probabilities_give_the_same_map(shared_data: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``probabilities`` the class probabilities go to a hidden intermediate file written in one pass
    (no overviews, no COG conversion, ZSTD level 1; issue 21: the kept COG's overviews and conversion were most of
    the engine's system time for a small model); the map is the same as with the probabilities kept, and the
    intermediate file is gone afterwards."""
    import dinov3geo.tasks.landcover.predict as lc

    image = shared_data / CHIAPAS
    rm = _landcover_model()
    seen: list[dict[str, Any]] = []
    real = lc.predict_raster

    def spy(*args: Any, **kw: Any) -> Any:
        seen.append({k: kw.get(k) for k in ("overviews", "compress", "compress_level")})
        return real(*args, **kw)

    monkeypatch.setattr(lc, "predict_raster", spy)
    kept = _landcover(image, tmp_path / "kept.tif", rm, probabilities=tmp_path / "kept_p.tif", confidence=True)
    default = _landcover(image, tmp_path / "default.tif", rm, confidence=True)
    assert seen == [{"overviews": None, "compress": None, "compress_level": None},
                    {"overviews": False, "compress": "zstd", "compress_level": 1}]
    _same(kept, default)
    assert not list(tmp_path.glob(".default.tif.probabilities*"))
    with rasterio.open(tmp_path / "kept_p.tif") as ds:  # the kept probabilities stay a COG with overviews
        assert ds.overviews(1) or max(ds.width, ds.height) <= 512


# ---------------------------------------------------------------------------------------------- (iii) no estimate
@pytest.mark.parametrize("method", ["classic", "zeroshot"])
def test_methods_without_an_estimate_keep_batch_4(method: str, pair: tuple[Path, Path], tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    kw: dict[str, Any] = {}
    if method == "zeroshot":
        torch.manual_seed(0)
        kw = {"backbone": build_backbone("vit_tiny_test", in_chans=4).eval(), "value_scale": 1 / 255}
    with caplog.at_level(logging.INFO, logger="dinov3geo"):
        r = _detect(pair, tmp_path / method, method=method, **kw)
    assert f"change scores ({method}): window {WINDOW} px, batch size {FALLBACK_BATCH_SIZE}" in caplog.text
    assert FALLBACK_BATCH_SIZE == 4 and "automatic" not in caplog.text
    assert r.paths["change"].is_file()


# ---------------------------------------------------------------------------------------------- (iv) resume
def test_resumed_change_run_keeps_its_batch_size(pair: tuple[Path, Path], tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    rm = _change_model(seed=1)
    ref = _detect(pair, tmp_path / "ref", method="head", model=rm, threshold=0.5, batch_size=2)
    out = tmp_path / "out"
    undo = _crash_after(rm, 1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _detect(pair, out, method="head", model=rm, threshold=0.5, batch_size=2)
    undo()
    assert not (out / "change_prob.tif").exists() and (parts_dir(out / "change_prob.tif") / "manifest.json").is_file()
    with caplog.at_level(logging.INFO, logger="dinov3geo"):
        res = _detect(pair, out, method="head", model=rm, threshold=0.5)  # batch_size None
    assert "batch size 2 (as the run being resumed)" in caplog.text
    assert "change scores (head): window 128 px, batch size 2" in caplog.text
    assert "resuming" in caplog.text and "automatic" not in caplog.text  # same fingerprint: the parts are reused
    _same(res.paths["change_prob"], ref.paths["change_prob"])
    _same(res.paths["change"], ref.paths["change"])
    assert not parts_dir(out / "change_prob.tif").exists()


def test_resumed_landcover_run_keeps_its_batch_size(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    image = PUC / "pucallpa_2000.tif"  # 697 x 377 px: 6 blocks of 4 x 4 windows at these settings
    rm = _landcover_model(value_scale=1 / 255)
    blocks = {"block_size": 128, "blocksize": 128}  # small blocks (the unit of resume), COG tiles of 128 px
    seen = _count_windows(rm)
    ref = _landcover(image, tmp_path / "ref.tif", rm, batch_size=2, confidence=True, **blocks)
    total = sum(seen)
    del rm.forward
    out = tmp_path / "out.tif"
    undo = _crash_after(rm, 12)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _landcover(image, out, rm, batch_size=2, confidence=True, **blocks)
    undo()
    hidden = out.with_name(f".{out.name}.probabilities.tif")  # the probability raster the engine writes
    assert not out.exists()
    manifest = json.loads((parts_dir(hidden) / "manifest.json").read_text())
    assert manifest["config"]["batch_size"] == 2 and len(manifest["done"]) >= 1  # blocks finished before the crash
    seen = _count_windows(rm)
    with caplog.at_level(logging.INFO, logger="dinov3geo"):
        _landcover(image, out, rm, confidence=True, **blocks)  # batch_size None
    assert "batch size 2 (as the run being resumed)" in caplog.text and "automatic" not in caplog.text
    assert set(seen) <= {1, 2} and 0 < sum(seen) < total  # finished blocks were not recomputed
    _same(out, ref)
    assert not hidden.exists() and not parts_dir(hidden).exists()


# ---------------------------------------------------------------------------------------------- (v), (vi) CLI
@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    ch = _change_model(seed=2)
    lc = _landcover_model()
    return {
        "change": save_change_model(ch.model, d / "change.pt", bands=NAMES, value_scale=1 / 255, mean=None,
                                    std=None, threshold=0.5),
        "landcover": save_landcover_model(d / "landcover.pt", lc.model, bands=["b1", "b2", "b3", "b4"], mean=None,
                                          std=None, value_scale=1e-4),
    }


def test_cli_defaults_to_the_automatic_batch(pair: tuple[Path, Path], shared_data: Path,
                                             model_files: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    image = shared_data / CHIAPAS
    before = _digest(*pair, image, *model_files.values())
    rc = main(["-v", "change", "detect", "--before", str(pair[0]), "--after", str(pair[1]), "--out",
               str(tmp_path / "ch"), "--method", "head", "--model", str(model_files["change"]), "--band-names",
               ",".join(NAMES), "--window", str(WINDOW), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert _auto_batch(err) >= 1 and (tmp_path / "ch" / "change.tif").is_file()
    rc = main(["-v", "landcover", "predict", str(image), "--model", str(model_files["landcover"]), "--out",
               str(tmp_path / "lc.tif"), "--bands", "1,2,3,4", "--window", str(WINDOW), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert _auto_batch(err) >= 1 and (tmp_path / "lc.tif").is_file()
    assert _digest(*pair, image, *model_files.values()) == before


@pytest.mark.parametrize("command", ["change", "landcover"])
def test_cli_batch_size_0_is_one_line(command: str, pair: tuple[Path, Path], shared_data: Path,
                                      model_files: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    if command == "change":
        argv = ["change", "detect", "--before", str(pair[0]), "--after", str(pair[1]), "--out", str(out),
                "--method", "head", "--model", str(model_files["change"])]
    else:
        argv = ["landcover", "predict", str(shared_data / CHIAPAS), "--model", str(model_files["landcover"]),
                "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--batch-size", "0"])
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"dinov3geo {' '.join(argv[:2])}: error: "), lines
    assert "--batch-size" in lines[0] and ">= 1" in lines[0]
    assert not out.exists()


def test_api_bad_batch_size_refused_before_any_work(pair: tuple[Path, Path], shared_data: Path,
                                                    tmp_path: Path) -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"batch_size must be a positive int or None \(automatic\)"):
            _detect(pair, tmp_path / "ch", batch_size=bad)
        with pytest.raises(ValueError, match=r"batch_size must be a positive int or None \(automatic\)"):
            _landcover(shared_data / CHIAPAS, tmp_path / "lc.tif", _landcover_model(), batch_size=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder, no map, no lock file


# ---------------------------------------------------------------------------------------------- (iv) other entry points
def test_xarray_and_in_memory_entry_points_choose_the_batch_by_memory(pair: tuple[Path, Path], shared_data: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """``dinov3geo.xarray.change_probability`` / ``landcover`` and ``predict_pair`` (training validation) default to
    the automatic batch too, and equal an explicit run of that batch; zero-shot keeps 4."""
    import rioxarray

    import dinov3geo.xarray as dx
    from dinov3geo.tasks.change.datasets import predict_pair
    from dinov3geo.tasks.change.zeroshot import ZeroShotChange

    rm = _change_model()
    n = choose_batch_size(rm, WINDOW, "cpu")
    before = rioxarray.open_rasterio(pair[0], chunks={"x": 112, "y": 80})
    after = rioxarray.open_rasterio(pair[1], chunks={"x": 112, "y": 80})
    kw: dict[str, Any] = {"window": WINDOW, "device": "cpu", "block_size": 128}
    with caplog.at_level(logging.INFO, logger="dinov3geo"):
        auto = dx.change_probability(before, after, model=rm, **kw)
    assert _auto_batch(caplog.text) == n
    explicit = dx.change_probability(before, after, model=rm, batch_size=n, **kw)
    a = auto.values
    assert np.isfinite(a).mean() > 0.9 and float(np.nanstd(a)) > 1e-3
    np.testing.assert_array_equal(a, explicit.values)
    seen = _count_windows(rm)
    with rasterio.open(pair[0]) as b0, rasterio.open(pair[1]) as b1:
        x0, x1 = b0.read(), b1.read()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dinov3geo"):
        s = predict_pair(rm, x0, x1, window=WINDOW)
    assert _auto_batch(caplog.text) == n and max(seen) == min(n, sum(seen))  # calls of n windows (or all)
    assert s.shape == x0.shape[1:] and np.isfinite(s).all()
    del rm.forward
    zs = ZeroShotChange(build_backbone("vit_tiny_test", in_chans=4).eval(), bands_per_date=4, value_scale=1 / 255)
    seen = _count_windows(zs)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dinov3geo"):
        predict_pair(zs, x0, x1, window=96)
    assert "automatic" not in caplog.text and sum(seen) > FALLBACK_BATCH_SIZE == max(seen)
    lm = _landcover_model()
    with torch.no_grad():  # less decisive, so that the confidence varies over the scene
        lm.model.head.classifier.bias.zero_()
        lm.model.head.classifier.weight.mul_(0.2)
    n = choose_batch_size(lm, WINDOW, "cpu")
    da = rioxarray.open_rasterio(shared_data / CHIAPAS, chunks={"x": 125, "y": 125}).isel(band=[b - 1 for b in LC_BANDS])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dinov3geo"):
        lc = dx.landcover(da, lm, **kw).values
    assert _auto_batch(caplog.text) == n
    np.testing.assert_array_equal(lc, dx.landcover(da, lm, batch_size=n, **kw).values)
    assert len(np.unique(lc[1])) > 5  # confidences vary: a real map, not a constant
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=r"batch_size must be a positive int or None \(automatic\)"):
            dx.landcover(da, lm, batch_size=bad, **kw)
        with pytest.raises(ValueError, match=r"batch_size must be a positive int or None \(automatic\)"):
            predict_pair(zs, x0, x1, batch_size=bad)
