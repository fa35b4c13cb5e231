"""Change-head training: a short real run on LEVIR-CD / OSCD crops, config errors, resume, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from dinov3geo.tasks.change.head import load_change_model, read_change_checkpoint
from dinov3geo.tasks.change.train import (
    bce_dice_loss,
    load_change_config,
    train_change_head,
)


def _levir_cfg(shared_data, tmp_path, **train):
    root = shared_data / "change_pairs/levir_cd_samples"
    t = {"crop_size": 64, "crops": 16, "epochs": 4, "batch_size": 8, "lr": 3e-3, "progress_bar": False, **train}
    return {
        "output": str(tmp_path / "head.pt"),
        "data": {"train": [{"kind": "levir", "path": str(root), "names": ["train_36_0512_0512"]}],
                 "val": [{"kind": "levir", "path": str(root), "names": ["val_27_0000_0256"]}]},
        "backbone": {"arch": "vit_tiny_test", "layers": 2},
        "head": {"hidden": 32, "detail_channels": 8},
        "train": t,
    }


def test_short_levir_run_reduces_loss_and_round_trips(shared_data, tmp_path):
    path = train_change_head(_levir_cfg(shared_data, tmp_path))
    ck = read_change_checkpoint(path)
    hist = ck["train"]["loss_history"]
    assert len(hist) == 4 and hist[-1] < hist[0]
    assert 0 < ck["threshold"] < 1
    assert ck["train"]["validation"]["pairs"] == ["val_27_0000_0256"]
    assert ck["train"]["normalization_kind"] == "data"  # random backbone: no metadata
    assert not (tmp_path / "head.pt.state.pt").exists()
    model = load_change_model(path)
    from dinov3geo.tasks.change.datasets import load_levir, predict_pair

    pair = load_levir(shared_data / "change_pairs/levir_cd_samples", ["test_7_0256_0512"])[0]
    prob = predict_pair(model, pair, window=128)
    assert prob.shape == (256, 256) and np.isfinite(prob).all() and 0 <= prob.min() <= prob.max() <= 1


def test_oscd_multiband_run_with_upscale_and_val_split(shared_data, tmp_path):
    """13 S2 bands on the 10 m grid, 4x upscaled, validation = bottom rows of the training city."""
    cfg = {
        "output": str(tmp_path / "oscd.pt"),
        "data": {"train": [{"kind": "oscd", "path": str(shared_data / "change_pairs/oscd/bercy"),
                            "bands": ["red", "green", "blue", "nir"]}], "val_fraction": 0.25},
        "backbone": {"arch": "vit_tiny_test", "layers": [-1], "upscale": 4},
        "head": {"hidden": 16, "detail_channels": 4},
        "train": {"crop_size": 32, "crops": 8, "epochs": 2, "batch_size": 4, "progress_bar": False,
                  "cache_features": False, "val_window": 128},
    }
    ck = read_change_checkpoint(train_change_head(cfg))
    assert ck["bands"] == ["red", "green", "blue", "nir"] and ck["upscale"] == 4
    assert ck["train"]["validation"]["pairs"] == ["bercy[val]"]
    assert len(ck["normalization"]["mean"]) == 4 and ck["normalization"]["mean"][0] > 100  # raw TOA DN stats
    m = load_change_model(tmp_path / "oscd.pt")
    assert m.in_bands == 8 and m.model.stride == 4


@pytest.mark.parametrize("cache_features", [True, False])
def test_resume_after_an_interrupt_mid_run_equals_an_uninterrupted_run(shared_data, tmp_path, cache_features):
    """Interrupted right after epoch 1 of 3 (the state file of epoch 1 is written, then Ctrl-C), resumed: the
    final head weights are bitwise those of an uninterrupted 3-epoch run (cached features, or fresh crops
    drawn every epoch from the (seed, epoch) RNG)."""
    import contextlib

    from dinov3geo.utils import atomic

    torch.set_num_threads(1)  # same reduction order in both runs
    over = {"epochs": 3, "crops": 8, "cache_features": cache_features}
    full = read_change_checkpoint(train_change_head(_levir_cfg(shared_data, tmp_path / "full", **over)))

    cfg = _levir_cfg(shared_data, tmp_path / "cut", **over)
    (tmp_path / "cut").mkdir()
    state = tmp_path / "cut/head.pt.state.pt"
    orig = atomic.atomic_path
    saved = []

    @contextlib.contextmanager
    def interrupt_after_first_epoch(final, *a, **k):
        with orig(final, *a, **k) as tmp:
            yield tmp
        if str(final).endswith(".state.pt"):
            saved.append(torch.load(final, weights_only=True)["epoch"])
            if len(saved) == 1:
                raise KeyboardInterrupt  # at the epoch boundary, once epoch 1 is safely on disk

    atomic.atomic_path = interrupt_after_first_epoch
    try:
        with pytest.raises(KeyboardInterrupt):
            train_change_head(cfg)
    finally:
        atomic.atomic_path = orig
    assert saved == [1]
    st = torch.load(state, weights_only=True)
    assert st["epoch"] == 1 and len(st["history"]) == 1 and not (tmp_path / "cut/head.pt").exists()
    # the interrupted run's head differs from the finished one: the resume has real work left to do
    assert any(not torch.equal(v, full["head"]["state_dict"][k]) for k, v in st["head"].items())

    resumed = read_change_checkpoint(train_change_head(cfg, ["train.resume=true"]))
    assert resumed["train"]["loss_history"] == full["train"]["loss_history"]
    assert len(full["train"]["loss_history"]) == 3
    a, b = resumed["head"]["state_dict"], full["head"]["state_dict"]
    assert set(a) == set(b) and len(a) > 5
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert resumed["threshold"] == full["threshold"]
    assert not state.exists()


def test_config_errors_name_the_key(tmp_path, shared_data):
    cfg = _levir_cfg(shared_data, tmp_path)
    cfg["train"]["lrr"] = 1
    with pytest.raises(ValueError, match="'train.lrr'"):
        load_change_config(cfg)
    cfg = _levir_cfg(shared_data, tmp_path)
    cfg["colour"] = "red"
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"c.yaml.*'colour'"):
        load_change_config(p)
    cfg = _levir_cfg(shared_data, tmp_path)
    cfg["data"]["train"][0]["labels"] = "x"
    with pytest.raises(ValueError, match=r"data.train\[0\].'labels'"):
        load_change_config(cfg)
    cfg = _levir_cfg(shared_data, tmp_path)
    cfg["data"]["train"] = [{"kind": "sentinel"}]
    with pytest.raises(ValueError, match="kind 'sentinel' is unknown"):
        load_change_config(cfg)
    with pytest.raises(ValueError, match="multiple of the patch stride"):
        train_change_head(_levir_cfg(shared_data, tmp_path, crop_size=40))


def test_loss_ignores_unlabelled_pixels():
    logits = torch.tensor([[[[5.0, -5.0], [0.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    valid = torch.tensor([[[[True, True], [False, False]]]])
    good = bce_dice_loss(logits, target, valid)
    assert float(good) < 0.02
    valid2 = torch.ones_like(valid)
    assert float(bce_dice_loss(logits, target, valid2)) > float(good) + 0.2


def test_cli_train(shared_data, tmp_path, capsys):
    from dinov3geo.cli import main

    cfg = _levir_cfg(shared_data, tmp_path, epochs=1, crops=8)
    cfg["output"] = "rel/head.pt"  # relative to the config file's folder
    p = tmp_path / "change.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["change", "train", str(p), "--set", "train.seed=3"]) == 0
    out = capsys.readouterr().out
    assert "threshold" in out and (tmp_path / "rel/head.pt").exists()
    assert read_change_checkpoint(tmp_path / "rel/head.pt")["train"]["config"]["train"]["seed"] == 3
    assert main(["change", "train", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml does not exist" in capsys.readouterr().err
    cfg["train"]["epoch"] = 2
    p.write_text(yaml.safe_dump(cfg))
    assert main(["change", "train", str(p)]) == 1
    assert "'train.epoch'" in capsys.readouterr().err
