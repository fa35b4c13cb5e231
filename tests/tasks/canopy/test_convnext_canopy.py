"""Canopy heads on a ConvNeXt backbone: DPT taps on the 4 stages, train -> predict through the CLI on the real
NEON BART pair, the saved model rebuilds the ConvNeXt, and CHMv2 refuses a ConvNeXt in one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml

from dinov3geo.cli import main
from dinov3geo.models import ConvNeXt, build_backbone
from dinov3geo.tasks.canopy.chmv2 import CHMv2
from dinov3geo.tasks.canopy.dpt import DPTHead
from dinov3geo.tasks.canopy.model import load_canopy_model
from dinov3geo.tasks.canopy.train import build_model, load_canopy_config
from tests.models.convnext_weights import convnext_test_backbone, save_convnext_test_weights

ROOT = Path(__file__).resolve().parents[3]
RGB = ROOT / "data/neon_bart_2019/2019_BART_5_320000_4881000_image_crop.tif"
CHM = ROOT / "data/neon_bart_2019/NEON_D01_BART_DP3_320000_4881000_CHM_crop.tif"
WIDTHS = [16, 32, 64, 128]  # convnext_tiny_test's stages


def _sha(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def _config(weights: Path, out: Path, head: str = "dpt") -> dict:
    return {
        "data": {"pairs": [{"image": str(RGB), "chm": str(CHM), "name": "bart"}], "target_res": 1.0},
        "split": {"block": 40, "buffer": 4, "fractions": {"train": 0.6, "val": 0.4}, "seed": 1},
        "model": {"backbone": str(weights), "head": head, "n_bins": 16, "hidden": 32},
        "train": {"tile": 32, "stride": 16, "epochs": 2, "batch_size": 16, "augment": False, "lr": 3e-3},
        "out": str(out),
    }


@pytest.mark.parametrize("head", ["dpt", "light"])
def test_heads_take_one_width_per_stage_and_map_any_input_size(head):
    cfg = load_canopy_config({**_config(Path("w.pth"), Path("o"), head), "model": {
        "backbone": "random:convnext_tiny_test", "head": head, "n_bins": 16, "hidden": 32}})
    model = build_model(cfg, convnext_test_backbone())
    assert model.layers == [0, 1, 2, 3] and model.pad_multiple == 32  # ConvNeXt: its 4 stages, multiples of 32
    assert model.head.config()["in_channels"] == WIDTHS
    x = torch.randn(2, 3, 80, 112)  # neither side a multiple of 32: centre-padded and cropped back
    with torch.no_grad():
        out = model(x)
    assert out["height"].shape == (2, 1, 80, 112) and torch.isfinite(out["height"]).all()
    assert model.memory_estimate(512, 2) > model.memory_estimate(256, 2) > 0
    with pytest.raises(ValueError, match=r"head takes \[16, 32, 64, 128\] channels per level but the backbone's "
                                         r"layers \[0, 1, 2, 3\] give 64"):
        type(model)(build_backbone("vit_tiny_test", depth=4), model.head, model.bins)


def test_cli_train_then_predict_on_neon_with_a_convnext_weights_file(tmp_path):
    weights = save_convnext_test_weights(tmp_path / "dinov3_convnext_test.pth")
    config = tmp_path / "canopy.yaml"
    config.write_text(yaml.safe_dump(_config(weights, tmp_path / "run")))
    inputs = [RGB, CHM, weights, config]
    before = _sha(*inputs)
    assert main(["-q", "canopy", "train", str(config)]) == 0
    run = tmp_path / "run"
    hist = json.loads((run / "history.json").read_text())
    assert len(hist) == 2 and all(np.isfinite(h["loss"]) for h in hist)

    # the checkpoint records the ConvNeXt and its per-stage DPT head; loading rebuilds both
    ck = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert ck["backbone"]["config"]["family"] == "convnext" and ck["backbone"]["arch"] == "convnext_tiny_test"
    assert ck["head"]["in_channels"] == WIDTHS and ck["layers"] == [0, 1, 2, 3]
    model, meta = load_canopy_model(run / "model.pt")
    assert isinstance(model.backbone, ConvNeXt) and model.head.level_channels == WIDTHS
    assert meta["backbone"]["source"] == str(weights) and meta["value_scale"] == pytest.approx(1 / 255)
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406])  # LVD-1689M: a Meta ConvNeXt's default

    out = tmp_path / "chm.tif"
    assert main(["-q", "canopy", "predict", "--image", str(RGB), "--model", str(run / "model.pt"), "--out",
                 str(out), "--window", "192", "--device", "cpu"]) == 0
    with rasterio.open(out) as ds, rasterio.open(CHM) as lab:
        assert ds.count == 2 and ds.descriptions == ("height", "height_std") and ds.crs == lab.crs
        assert ds.res == pytest.approx(lab.res)  # mapped at the model's 1 m GSD
        h, s = ds.read(1), ds.read(2)
    ok = np.isfinite(h)
    assert ok[:, :121].all() and ok.mean() > 0.99  # the 1 m grid's last column lies past the 0.1 m image's edge
    assert (h[ok] >= 0).all() and h[ok].std() > 0 and np.isfinite(s[ok]).all()
    assert _sha(*inputs) == before


def test_chmv2_refuses_a_convnext_backbone_in_one_line(tmp_path, capsys):
    weights = save_convnext_test_weights(tmp_path / "convnext.pth")
    head_file = tmp_path / "head.pth"
    torch.save(DPTHead(128, [16, 32, 64, 128], 16, 8, 16).state_dict(), head_file)
    with pytest.raises(ValueError, match="ConvNeXt backbone, but CHMv2 is defined on the ViT-L/16 SAT-493M"):
        CHMv2(convnext_test_backbone(), DPTHead(128, [16, 32, 64, 128], 16, 8, 16))
    before = _sha(weights, head_file, RGB)
    out = tmp_path / "chm.tif"
    rc = main(["canopy", "predict", "--image", str(RGB), "--chmv2-backbone", str(weights), "--chmv2-head",
               str(head_file), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err
    assert f"{weights} is a ConvNeXt backbone, but CHMv2" in lines[0] and "sat493m" in lines[0]
    assert not out.exists() and _sha(weights, head_file, RGB) == before
