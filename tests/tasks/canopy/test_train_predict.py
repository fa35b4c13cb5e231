"""Canopy head training, resume, checkpoint metadata and region mapping on the real NEON BART pair."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from dinov3geo.tasks.canopy.model import load_canopy_model
from dinov3geo.tasks.canopy.predict import predict_canopy
from dinov3geo.tasks.canopy.train import canopy_loss, load_canopy_config, train_canopy
from dinov3geo.utils.config import ConfigError

NEON = "aerial_rgb_chm/neon_bart_2019"
RGB = "2019_BART_5_320000_4881000_image_crop.tif"
CHM = "NEON_D01_BART_DP3_320000_4881000_CHM_crop.tif"


def _config(shared_data: Path, out: Path, **train: object) -> dict:
    return {
        "data": {"pairs": [{"image": str(shared_data / NEON / RGB), "chm": str(shared_data / NEON / CHM),
                            "name": "bart"}], "target_res": 1.0},
        "split": {"block": 40, "buffer": 4, "fractions": {"train": 0.5, "val": 0.25, "test": 0.25}, "seed": 1},
        "model": {"backbone": "random:vit_tiny_test", "head": "light", "output": "bins", "n_bins": 16,
                  "hidden": 32},
        "train": {"tile": 32, "stride": 16, "epochs": 2, "batch_size": 16, "augment": False, "lr": 3e-3,
                  "eval_window": 128, **train},
        "out": str(out),
    }


def test_config_errors_name_the_key(shared_data: Path, tmp_path: Path) -> None:
    cfg = _config(shared_data, tmp_path)
    cfg["train"]["epoch"] = 3
    with pytest.raises(ConfigError, match="train.epoch"):
        load_canopy_config(cfg)
    cfg = _config(shared_data, tmp_path)
    cfg["model"]["head"] = "unet"
    with pytest.raises(ConfigError, match="model.head"):
        load_canopy_config(cfg)
    cfg = _config(shared_data, tmp_path)
    cfg["model"]["output"] = "regression"
    with pytest.raises(ConfigError, match="bin_ce"):
        load_canopy_config(cfg)


def test_losses_ignore_invalid_pixels() -> None:
    h = torch.tensor([[[[1.0, 5.0], [2.0, 100.0]]]])
    t = torch.tensor([[[2.0, 5.0], [2.0, float("nan")]]])
    v = torch.tensor([[[True, True], [True, False]]])
    out = {"height": h, "std": None, "logits": None}
    assert canopy_loss(out, t, v, ["l1"]).item() == pytest.approx(1 / 3)
    assert canopy_loss(out, t, torch.zeros_like(v), ["l1"]).item() == 0.0
    silog = canopy_loss(out, t, v, ["silog"], silog_lambda=0.0).item()
    d = np.log1p([1.0, 5.0, 2.0]) - np.log1p([2.0, 5.0, 2.0])
    assert silog == pytest.approx(float(np.sqrt(np.mean(d**2))), rel=1e-5)


def test_train_resume_predict_evaluate(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _config(shared_data, out, epochs=1)
    r1 = train_canopy(cfg, progress=False)
    assert (out / "last.pt").exists() and (out / "model.pt").exists()
    # "killed" after epoch 1: asking for 2 epochs resumes at epoch 1 instead of starting over
    r2 = train_canopy(_config(shared_data, out, epochs=2), progress=False)
    assert [h["epoch"] for h in r2.history] == [0, 1]
    assert r2.history[0] == r1.history[0]
    assert r2.history[1]["loss"] < r2.history[0]["loss"]
    hist = json.loads((out / "history.json").read_text())
    assert len(hist) == 2 and all("val_mae" in h for h in hist)

    model, meta = load_canopy_model(out / "model.pt")
    assert meta["bands"] == ["red", "green", "blue"]
    assert meta["gsd"] == pytest.approx(1.0)
    assert meta["value_scale"] == pytest.approx(1 / 255)
    assert meta["backbone"]["source"] == "random:vit_tiny_test" and len(meta["backbone"]["sha256"]) == 64

    # test-block evaluation went through the engine and evaluate_rasters
    m = r2.test["bart"]
    assert m["n"] > 100 and np.isfinite(m["mae"])
    assert Path(m["outputs"]["metrics"]).exists()
    split = json.loads((out / "split_bart.json").read_text())
    assert split["names"] == ["train", "val", "test"]


def test_predict_canopy_nodata_and_crs(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_canopy(_config(shared_data, out, epochs=1), progress=False)
    # a 1 m copy of the scene with a nodata corner: the map is NaN there and keeps the CRS
    src = shared_data / NEON / RGB
    img = tmp_path / "scene_1m.tif"
    with rasterio.open(src) as ds:
        data = ds.read(out_shape=(3, ds.height // 10, ds.width // 10), resampling=rasterio.enums.Resampling.average)
        transform = ds.transform * ds.transform.scale(ds.width / data.shape[2], ds.height / data.shape[1])
        crs = ds.crs
    data[:, :20, :20] = 0
    with rasterio.open(img, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=3,
                       dtype="uint8", crs=crs, transform=transform, nodata=0) as dst:
        dst.write(data)
    chm = predict_canopy(out / "model.pt", img, tmp_path / "chm.tif", window=128, progress=False)
    with rasterio.open(chm) as ds:
        assert ds.count == 2 and ds.descriptions == ("height", "height_std")
        assert ds.crs == crs and ds.dtypes[0] == "float32"
        h = ds.read(1)
        assert np.isnan(h[:20, :20]).all()
        assert np.isfinite(h[30:, 30:]).all() and (h[30:, 30:] >= 0).all()
        assert np.isfinite(ds.read(2)[30:, 30:]).all()


def test_train_windows_inside_split_and_cover_every_block() -> None:
    from dinov3geo.tasks.canopy.splits import block_split
    from dinov3geo.tasks.canopy.train import train_windows

    for seed in range(4):
        sp = block_split((218, 287), block=96, fractions={"train": 0.6, "val": 0.2, "test": 0.2}, buffer=16,
                         seed=seed)
        mask = sp.mask("train")
        wins = train_windows(sp, "train", 64, 32)
        assert set(wins) >= {(int(w.row_off), int(w.col_off)) for w in sp.tiles("train", 64, 32)}
        for r, c in wins:
            assert mask[r:r + 64, c:c + 64].all()
        # every full-size train block whose interior holds a tile contributes at least one
        for bi, bj in zip(*((sp.assignment == 0).nonzero()), strict=True):
            r0, c0 = bi * 96, bj * 96
            if r0 + 96 <= 218 and c0 + 96 <= 287:
                assert any(r0 <= r < r0 + 96 and c0 <= c < c0 + 96 for r, c in wins), (seed, bi, bj)


def test_predict_refuses_absurd_resampling(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_canopy(_config(shared_data, out, epochs=1), progress=False)   # model trained at 1 m
    naip = next((shared_data / "aerial_timeseries/naip_m_4709963_se_14").glob("*2009*.tif"))  # 5 m pixels
    with pytest.raises(ValueError, match="keep-resolution"):
        predict_canopy(out / "model.pt", naip, tmp_path / "x.tif", bands=["1", "2", "3"], progress=False)
