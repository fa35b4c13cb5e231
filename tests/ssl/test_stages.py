"""Gram anchoring, high-resolution adaptation and distillation stages."""

from __future__ import annotations

import json

import pytest
import torch

from dinov3geo.ingest import ingest
from dinov3geo.models import export_meta, load_backbone
from dinov3geo.ssl.config import load_config
from dinov3geo.ssl.data import build_dataloader
from dinov3geo.ssl.meta_arch import SSLMetaArch
from dinov3geo.ssl.module import drop_invalid_masked_patches
from dinov3geo.ssl.train import run_stages

HEADS = {"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16}


@pytest.fixture(scope="module")
def store(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("stages") / "neon.zarr"
    ingest([shared_data / "aerial_rgb_chm/neon_bart_2019/2019_BART_5_320000_4881000_image_crop.tif"], out,
           tile_size=96, progress=False)
    return out


def _common(store, out):
    return {
        "data": {"store": str(store), "batch_size": 2, "num_workers": 0},
        "student": {"arch": "vit_tiny_test"},
        "crops": {"global_crops_size": 48, "local_crops_size": 32, "local_crops_number": 2},
        "dino": dict(HEADS), "ibot": dict(HEADS),
        "optim": {"iterations": 3},
        "train": {"output_dir": str(out), "checkpoint_every": 10, "log_every": 1, "health_every": 1,
                  "progress_bar": False},
    }


def test_gram_teacher_is_frozen_and_changes_only_at_refresh_points(store, tmp_path):
    raw = _common(store, tmp_path)
    raw["crops"]["gram_teacher_crops_size"] = 96  # 2x the student's global crops
    raw["gram"] = {"use_loss": True, "loss_weight": 2.0, "rep_update": True, "update_frequency": 2,
                   "it_first_update": 2, "max_updates": 1}
    cfg = load_config(raw)
    torch.manual_seed(0)
    m = SSLMetaArch(cfg, in_chans=3)
    opt = torch.optim.AdamW([p for p in m.student.parameters() if p.requires_grad], lr=1e-2)
    loader, _ = build_dataloader(cfg)
    it_loader = iter(loader)

    def gram_params():
        return [p.detach().clone() for p in m.gram_teacher.parameters()]

    history, refreshed = [], []
    for it in range(6):
        changed = m.maybe_update_gram(it)
        refreshed.append(changed)
        snap = gram_params()
        if changed:  # a refresh is a hard copy of the EMA teacher
            for a, b in zip(snap, m.model_ema["backbone"].parameters(), strict=True):
                assert torch.equal(a, b)
        data = drop_invalid_masked_patches(next(it_loader))
        assert data["collated_gram_teacher_crops"].shape[-1] == 96
        m.train()
        loss, logs = m.forward_losses(data, teacher_temp=0.05, iteration=it)
        assert "gram_loss" in logs and logs["gram_loss_weight"] == 2.0
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in m.gram_teacher.parameters())
        opt.step()
        m.update_ema(0.9)
        after = gram_params()
        assert all(torch.equal(a, b) for a, b in zip(snap, after, strict=True))  # never moved by the step
        history.append(after)
    # loaded from the EMA teacher at iteration 0 (no gram.ckpt), refreshed once at (it+1) % 2 == 0 >= 2
    assert refreshed == [True, True, False, False, False, False]
    assert m.gram_updates_done == 1
    assert all(torch.equal(a, b) for a, b in zip(history[1], history[5], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(history[0], history[1], strict=True))


def test_high_resolution_crops_flow_through_rope(store, tmp_path):
    """Larger crops need no position-embedding retraining: the same weights process 48 and 96 px crops."""
    raw = _common(store, tmp_path)
    raw["crops"]["resolution_mix"] = [{"global_crops_size": 48, "local_crops_size": 32, "share": 0.5},
                                      {"global_crops_size": 96, "local_crops_size": 48, "share": 0.5}]
    cfg = load_config(raw)
    m = SSLMetaArch(cfg, in_chans=3)
    n_params = sum(p.numel() for p in m.student["backbone"].parameters())
    loader, _ = build_dataloader(cfg)
    sizes = set()
    for _, data in zip(range(8), loader, strict=False):
        m.train()
        loss, _ = m.forward_losses(drop_invalid_masked_patches(data), teacher_temp=0.05)
        assert torch.isfinite(loss)
        sizes.add(data["collated_global_crops"].shape[-1])
    assert sizes == {48, 96}
    assert sum(p.numel() for p in m.student["backbone"].parameters()) == n_params
    assert not any("pos_embed" in k for k in m.student["backbone"].state_dict())


def test_all_stages_in_order_and_distilled_student(store, tmp_path):
    common = _common(store, tmp_path / "run")
    cfg = {
        "common": common,
        "pretrain": {},
        "gram": {"crops": {"gram_teacher_crops_size": 96},
                 "gram": {"use_loss": True, "loss_weight_schedule": {"start": 0, "peak": 0, "end": 2.0,
                                                                     "warmup_iterations": 1},
                          "rep_update": False},
                 "dino": {"reweight_dino_local_loss": True,
                          "local_loss_weight_schedule": {"start": 1.0, "peak": 1.0, "end": 0.5,
                                                         "warmup_iterations": 1}},
                 "schedules": {"momentum": {"start": 0.999, "peak": 0.999, "end": 0.999}}},
        "highres": {"crops": {"resolution_mix": [
            {"global_crops_size": 64, "local_crops_size": 32, "gram_teacher_crops_size": 96, "share": 0.5},
            {"global_crops_size": 96, "local_crops_size": 48, "gram_teacher_crops_size": 96, "share": 0.5}]},
            "gram": {"use_loss": True, "loss_weight": 1.5, "rep_update": False}},
        "distill": {"student": {"arch": "vit_tiny_test", "overrides": {"embed_dim": 32, "num_heads": 1,
                                                                      "depth": 1}},
                    "distillation": {"enabled": True}},
    }
    results = run_stages(cfg)
    assert list(results) == ["pretrain", "gram", "highres", "distill"]
    for name, r in results.items():
        assert r.iterations == 3 and r.backbone_meta.exists(), name
    from dinov3geo.ssl.train import stage_metrics

    gram_rows = stage_metrics(tmp_path / "run" / "gram")
    # official v2 schedule: 0 during warm-up, cosine from peak (0) to end (2.0) over the remaining iterations
    assert [round(r["gram_loss_weight"], 6) for r in gram_rows] == [0.0, 0.0, 2.0]
    assert gram_rows[-1]["dino_local_loss_weight"] == pytest.approx(0.5)
    # the gram stage's student started from the pretrain stage's teacher
    ck = torch.load(tmp_path / "run" / "gram" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["dinov3geo"]["config"]["student"]["resume_from_teacher_chkpt"].endswith("pretrain/checkpoints/last.ckpt")
    # the distilled student: smaller, loads with load_backbone, exports to Meta's format
    student = load_backbone(results["distill"].backbone_meta)
    assert student.embed_dim == 32 and len(student.blocks) == 1
    teacher = load_backbone(results["highres"].backbone_meta)
    assert teacher.embed_dim == 64
    out = export_meta(student, tmp_path / "student_meta.pth")
    sd = torch.load(out, weights_only=True)
    assert set(sd) == set(student.state_dict())
    meta = json.loads((tmp_path / "student_meta.pth.json").read_text())
    assert meta["metadata"]["bands"] == ["red", "green", "blue"]
    assert meta["metadata"]["provenance"]["stage"] == "distill"
    # re-running the stages does nothing: all are complete
    assert run_stages(cfg) == {}
