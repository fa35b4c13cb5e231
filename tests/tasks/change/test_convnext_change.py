"""Change detection with a ConvNeXt backbone, end to end on the real OSCD Bercy pair (Sentinel-2 L1C band files):
zero-shot feature distance through ``dinov3geo change detect --method zeroshot``, and a change head trained
with ``dinov3geo change train`` then run with ``--method head``. The weights are ``convnext_tiny_test`` with real
layer scales, saved as a Meta-format file."""

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
from dinov3geo.models import ConvNeXt
from dinov3geo.tasks.change.head import ChangeHead, ChangeModel, load_change_model
from dinov3geo.tasks.change.zeroshot import ZeroShotChange, resolve_layers
from tests.models.convnext_weights import convnext_test_backbone, save_convnext_test_weights

WIDTHS = [16, 32, 64, 128]


@pytest.fixture(scope="module")
def bercy(shared_data: Path) -> Path:
    return shared_data / "change_pairs/oscd/bercy"


def _sha(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def _red_files(city: Path) -> list[Path]:
    return sorted(city.glob("imgs_*/*_B04.tif"))


def _prob(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def test_stage_taps_and_zeroshot_distance_of_identical_dates():
    bb = convnext_test_backbone()
    assert resolve_layers(bb, 4) == [0, 1, 2, 3] and resolve_layers(bb, [-1]) == [3]
    with pytest.raises(ValueError, match="the backbone has 4 stages"):
        resolve_layers(bb, 5)
    zs = ZeroShotChange(bb, layers=4, value_scale=1 / 255)
    x = torch.rand(1, 3, 80, 112) * 255
    with torch.no_grad():
        same = zs(torch.cat([x, x], 1), torch.ones(1, 80, 112, dtype=torch.bool))
        other = zs(torch.cat([x, x.flip(-1)], 1), torch.ones(1, 80, 112, dtype=torch.bool))
    assert same.shape == (1, 1, 80, 112) and float(same.abs().max()) < 1e-5
    assert float(other.mean()) > 0.01
    head = ChangeHead(WIDTHS, 4, 16, 3, hidden=16, detail_channels=4)
    assert head.config["embed_dim"] == WIDTHS
    model = ChangeModel(bb, head, [0, 1, 2, 3])
    with torch.no_grad():
        assert model(torch.randn(2, 6, 48, 80)).shape == (2, 1, 48, 80)  # padded to 32 inside, cropped back
    with pytest.raises(ValueError, match=r"head expects D=64, the backbone's layers \[0, 1, 2, 3\] give "
                                         r"\[16, 32, 64, 128\]"):
        ChangeModel(bb, ChangeHead(64, 4, 16, 3), [0, 1, 2, 3])


def test_cli_zeroshot_with_a_convnext_weights_file(bercy, tmp_path):
    weights = save_convnext_test_weights(tmp_path / "dinov3_convnext_test.pth")
    before = _sha(weights, *_red_files(bercy))
    out = tmp_path / "zs"
    rc = main(["-q", "change", "detect", "--before", str(bercy / "imgs_1"), "--after", str(bercy / "imgs_2"),
               "--out", str(out), "--method", "zeroshot", "--backbone", str(weights), "--bands", "red,green,blue",
               "--value-scale", "0.0001", "--window", "192", "--device", "cpu"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "zeroshot" and s["bands"] == ["red", "green", "blue"]
    p = _prob(out / "change_prob.tif")
    ok = np.isfinite(p)
    assert ok.mean() > 0.95 and p[ok].min() >= 0 and p[ok].max() <= 1 and p[ok].std() > 0
    assert _sha(weights, *_red_files(bercy)) == before


def test_cli_train_a_change_head_on_convnext_stages_then_detect(bercy, tmp_path):
    weights = save_convnext_test_weights(tmp_path / "dinov3_convnext_test.pth")
    bands = ["red", "green", "blue", "nir"]  # 4 bands: the RGB stem is widened for the nir band
    config = tmp_path / "change.yaml"
    config.write_text(yaml.safe_dump({
        "output": str(tmp_path / "head.pt"),
        "data": {"train": [{"kind": "oscd", "path": str(bercy), "bands": bands}], "val_fraction": 0.25},
        "backbone": {"weights": str(weights), "layers": 4},
        "head": {"hidden": 16, "detail_channels": 4},
        "train": {"crop_size": 64, "crops": 8, "epochs": 2, "batch_size": 4, "val_window": 192},
    }))
    before = _sha(weights, config, *_red_files(bercy))
    assert main(["-q", "change", "train", str(config)]) == 0
    ck = torch.load(tmp_path / "head.pt", map_location="cpu", weights_only=True)
    assert ck["backbone"]["config"]["family"] == "convnext" and ck["backbone"]["config"]["in_chans"] == 4
    assert ck["head"]["config"]["embed_dim"] == WIDTHS and ck["layers"] == [0, 1, 2, 3]
    assert len(ck["train"]["loss_history"]) == 2 and all(np.isfinite(ck["train"]["loss_history"]))
    rm = load_change_model(tmp_path / "head.pt")
    assert isinstance(rm.model.backbone, ConvNeXt) and rm.in_bands == 8

    out = tmp_path / "det"
    rc = main(["-q", "change", "detect", "--before", str(bercy / "imgs_1"), "--after", str(bercy / "imgs_2"),
               "--out", str(out), "--method", "head", "--model", str(tmp_path / "head.pt"), "--bands",
               ",".join(bands), "--window", "192", "--device", "cpu"])
    assert rc == 0
    p = _prob(out / "change_prob.tif")
    ok = np.isfinite(p)
    assert ok.mean() > 0.95 and p[ok].min() >= 0 and p[ok].max() <= 1
    assert json.loads((out / "summary.json").read_text())["method"] == "head"
    assert _sha(weights, config, *_red_files(bercy)) == before
