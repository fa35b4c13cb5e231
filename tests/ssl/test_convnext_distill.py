"""Distillation of a ViT teacher into a ConvNeXt student, end to end on real tiles.

The repository's ``pipelines/configs/distill_convnext.yaml`` (shortened to a few iterations) runs a tiny ViT/16
pretraining stage and a ``distill`` stage whose student is ``convnext_tiny_test``: the student's parameters move
(every stage), the exported ``backbone.pth`` loads back as a ConvNeXt, and ``dinov3geo features`` uses it on the
NEON image. Misconfigured ConvNeXt students are refused with one line naming the key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from dinov3geo.cli import main
from dinov3geo.ingest import ingest
from dinov3geo.models import ConvNeXt, load_backbone
from dinov3geo.ssl.config import load_config
from dinov3geo.ssl.meta_arch import SSLMetaArch
from dinov3geo.ssl.train import run_stages

ROOT = Path(__file__).resolve().parents[2]
NEON = ROOT / "data/neon_bart_2019/2019_BART_5_320000_4881000_image_crop.tif"
CONFIG = ROOT / "pipelines/configs/distill_convnext.yaml"
HEADS = {"head_n_prototypes": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cx_distill") / "neon.zarr"
    ingest([NEON], out, tile_size=96, progress=False)
    return out


def _config(store: Path, out: Path) -> dict[str, Any]:
    raw = yaml.safe_load(CONFIG.read_text())
    common = raw["common"]
    common["data"].update(store=str(store), batch_size=2)
    common["dino"], common["ibot"] = dict(HEADS), dict(HEADS)
    common["optim"]["iterations"] = 3
    common["schedules"] = {"lr": {"start": 1e-3, "peak": 1e-3, "end": 1e-3, "warmup_iterations": 0}}
    common["train"].update(output_dir=str(out), checkpoint_every=10)
    raw["distill"]["optim"]["iterations"] = 3
    raw["distill"]["schedules"]["lr"] = {"start": 1e-3, "peak": 1e-3, "end": 1e-3, "warmup_iterations": 0}
    return raw


def test_vit_teacher_distils_into_a_convnext_student_whose_export_maps_features(store, tmp_path):
    raw = _config(store, tmp_path / "run")
    assert raw["distill"]["student"]["arch"] == "convnext_tiny_test"
    results = run_stages(raw)
    assert list(results) == ["pretrain", "distill"] and results["distill"].iterations == 3

    # the student learned: EMA and student start equal, so they differ only where the student moved
    ck = torch.load(results["distill"].checkpoint, map_location="cpu", weights_only=True)
    sd = ck["state_dict"]
    student = {k[len("model.student.backbone."):]: v for k, v in sd.items() if k.startswith("model.student.backbone.")}
    ema = {k[len("model.student_ema.backbone."):]: v for k, v in sd.items()
           if k.startswith("model.student_ema.backbone.")}
    assert student.keys() == ema.keys() and "downsample_layers.0.0.weight" in student
    for stage in range(4):
        moved = [k for k in student if k.startswith(f"stages.{stage}.") and not torch.equal(student[k], ema[k])]
        assert moved, f"no parameter of stage {stage} changed"
    # the frozen ViT teacher is the pretrain stage's EMA teacher, bitwise
    pre = torch.load(results["pretrain"].checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    teacher = {k: v for k, v in sd.items() if k.startswith("model.teacher.backbone.")}
    assert teacher and all(torch.equal(v, pre[k]) for k, v in teacher.items())

    # the export is a ConvNeXt (Meta's layout + sidecar) that load_backbone infers, the student's EMA
    exported = results["distill"].backbone_meta
    bb = load_backbone(exported)
    assert isinstance(bb, ConvNeXt) and bb.arch_name == "convnext_tiny_test" and not bb.tokens_on_grid
    assert all(torch.equal(bb.state_dict()[k], ema[k].float()) for k in ema)
    assert bb.metadata.bands == ["red", "green", "blue"] and bb.metadata.provenance["stage"] == "distill"

    # ... and `dinov3geo features` maps the image with it (the store's normalisation, from the sidecar)
    before = _sha(NEON), _sha(exported)
    out = tmp_path / "feats.zarr"
    rc = main(["-q", "features", str(NEON), "--weights", str(exported), "--out", str(out), "--window", "256",
               "--no-pca"])
    assert rc == 0 and (_sha(NEON), _sha(exported)) == before
    import xarray as xr

    ds = xr.open_zarr(out, consolidated=False)
    assert ds["features"].shape[0] == 128  # the last stage's width
    f = ds["features"].values
    assert np.isfinite(f).all() and float(f.std()) > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"distillation": {"enabled": False}}, "student.arch convnext_tiny_test is a ConvNeXt: it is trained by "
                                                "distillation only"),
        ({"crops": {"global_crops_size": 48}}, "crops.global_crops_size is 48: a ConvNeXt student needs global "
                                               "crops that are a multiple of 32"),
        ({"crops": {"local_crops_size": 16}}, "crops.local_crops_size is 16"),
        ({"student": {"overrides": {"patch_size": 32}}}, "student.patch_size is 16 but the ConvNeXt student's grid "
                                                         "is 32"),
    ],
)
def test_misconfigured_convnext_students_are_refused_in_one_line(change, message, tmp_path):
    raw = {"student": {"arch": "convnext_tiny_test"},
           "crops": {"global_crops_size": 64, "local_crops_size": 32, "local_crops_number": 2},
           "distillation": {"enabled": True, "teacher_checkpoint": str(tmp_path / "missing.ckpt")}}
    for k, v in change.items():
        raw[k] = {**raw.get(k, {}), **v}
    with pytest.raises(ValueError, match=message) as e:
        SSLMetaArch(load_config(raw), in_chans=3)
    assert "\n" not in str(e.value)
