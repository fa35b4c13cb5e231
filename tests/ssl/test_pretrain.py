"""The pretraining engine end to end: configs, data determinism, a tiny run on real tiles, exact resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dinov3geo.ingest import ingest
from dinov3geo.models import load_backbone
from dinov3geo.ssl.config import STAGES, ConfigError, SSLConfig, load_config
from dinov3geo.ssl.data import IterationSampler, build_dataloader
from dinov3geo.ssl.health import effective_rank, feature_health, patch_similarity_stats
from dinov3geo.ssl.module import drop_invalid_masked_patches
from dinov3geo.ssl.train import pretrain, stage_metrics

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "data": {"batch_size": 4, "num_workers": 0},
    "student": {"arch": "vit_tiny_test"},
    "crops": {"global_crops_size": 64, "local_crops_size": 32, "local_crops_number": 2},
    "dino": {"head_n_prototypes": 128, "head_hidden_dim": 64, "head_bottleneck_dim": 32},
    "ibot": {"head_n_prototypes": 128, "head_hidden_dim": 64, "head_bottleneck_dim": 32},
    "optim": {"iterations": 4},
    "schedules": {"lr": {"start": 0.0, "peak": 1e-3, "end": 1e-3, "warmup_iterations": 2},
                  "teacher_temp": {"start": 0.04, "peak": 0.07, "end": 0.07, "warmup_iterations": 2}},
    "train": {"checkpoint_every": 2, "log_every": 1, "health_every": 2, "progress_bar": False},
}


def _cfg(store: Path, out: Path, **over) -> SSLConfig:
    raw = json.loads(json.dumps(TINY))
    raw["data"]["store"] = str(store)
    raw["train"]["output_dir"] = str(out)
    for k, v in over.items():
        sec, key = k.split("__")
        raw.setdefault(sec, {})[key] = v
    return load_config(raw)


@pytest.fixture(scope="module")
def rgb_store(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("ssl") / "neon.zarr"
    ingest([shared_data / "aerial_rgb_chm/neon_bart_2019/2019_BART_5_320000_4881000_image_crop.tif"], out,
           tile_size=64, progress=False)
    return out


# ---------------------------------------------------------------------------------------------- config
def test_unknown_and_mistyped_keys_are_named():
    with pytest.raises(ConfigError, match=r"optim\.iteratons"):
        load_config({"optim": {"iteratons": 5}})
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        load_config({"data": {"batch_size": "eight"}})
    with pytest.raises(ConfigError, match="bogus"):
        load_config({"common": {}, "pretrain": {}, "bogus": {}}, section="pretrain")
    cfg = load_config({"common": {"optim": {"iterations": 7}}, "pretrain": {"data": {"batch_size": 3}}},
                      section="pretrain", overrides=["optim.clip_grad=1.5", "student.arch=vits16"])
    assert (cfg.optim.iterations, cfg.data.batch_size, cfg.optim.clip_grad, cfg.student.arch) == (7, 3, 1.5, "vits16")


def _keys(obj, prefix=""):
    out = set()
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not prefix:  # sections; schedule blocks are leaves
            out |= _keys(v, f"{prefix}{f.name}.")
        else:
            out.add(prefix + f.name)
    return out


def test_pipeline_yaml_documents_every_key():
    path = ROOT / "pipelines" / "configs" / "pretrain_satellite.yaml"
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= {"common", *STAGES}

    def flat(d, prefix=""):
        out = set()
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("overrides",) and prefix.count(".") < 1:
                out |= flat(v, f"{prefix}{k}.")
            else:
                out.add(prefix + k)
        return out

    assert flat(raw["common"]) == _keys(SSLConfig())
    text = path.read_text().split("\npretrain:")[0]  # the `common:` section documents every key
    for line in text.splitlines():  # every key line carries a comment
        s = line.strip()
        if s and not s.startswith("#") and ":" in s and not s.endswith(":") and "{" not in s.split(":")[0]:
            assert "#" in s, f"undocumented key: {s}"
    for stage in STAGES:
        if stage in raw:
            load_config(path, section=stage)


# ---------------------------------------------------------------------------------------------- data
def test_iteration_sampler_is_a_function_of_the_iteration():
    a = IterationSampler(10, 4, seed=3)
    b = IterationSampler(10, 4, seed=3, start_iteration=5)
    it_a = iter(a)
    keys_a = [next(it_a) for _ in range(4 * 8)]
    it_b = iter(b)
    assert [next(it_b) for _ in range(4 * 3)] == keys_a[20:32]
    # a pass covers every tile exactly once
    first = sorted(i for p, i, _ in keys_a[:10] if p == 0)
    assert first == list(range(10))
    # ranks get disjoint samples of each global batch
    r0, r1 = IterationSampler(16, 4, world_size=2, rank=0), IterationSampler(16, 4, world_size=2, rank=1)
    assert not set(r0.keys_for_iteration(0)) & set(r1.keys_for_iteration(0))


def test_batches_are_reproducible_and_nodata_aware(rgb_store, tmp_path):
    cfg = _cfg(rgb_store, tmp_path / "x")
    l1, _ = build_dataloader(cfg, start_iteration=3)
    l2, _ = build_dataloader(cfg, start_iteration=0)
    b1 = next(iter(l1))
    it2 = iter(l2)
    for _ in range(3):
        next(it2)
    b2 = next(it2)
    assert torch.equal(b1["collated_global_crops"], b2["collated_global_crops"])
    assert torch.equal(b1["collated_masks"], b2["collated_masks"])
    assert b1["collated_global_crops"].shape == (8, 3, 64, 64)
    assert b1["collated_local_crops"].shape == (8, 3, 32, 32)


def test_drop_invalid_masked_patches():
    masks = torch.tensor([[True, True, False, True], [False, False, False, False]])
    pv = torch.tensor([[1.0, 0.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    data = {"collated_masks": masks, "collated_global_patch_valid": pv,
            "mask_indices_list": masks.flatten().nonzero().flatten(),
            "masks_weight": torch.full((3,), 1 / 3), "n_masked_patches": torch.tensor([3])}
    out = drop_invalid_masked_patches(data)
    assert out["collated_masks"].tolist() == [[True, False, False, True], [False] * 4]
    assert out["mask_indices_list"].tolist() == [0, 3]
    assert torch.allclose(out["masks_weight"], torch.tensor([0.5, 0.5]))
    assert out["n_masked_patches"].tolist() == [2]


# ---------------------------------------------------------------------------------------------- health
def test_health_metrics_detect_collapse():
    torch.manual_seed(0)
    healthy = torch.randn(4, 16, 32)
    collapsed = torch.randn(1, 1, 32).expand(4, 16, 32) + 1e-4 * torch.randn(4, 16, 32)
    m_h, s_h = patch_similarity_stats(healthy)
    m_c, s_c = patch_similarity_stats(collapsed)
    assert abs(m_h) < 0.1 and s_h > 0.1 and m_c > 0.99 and s_c < 0.01
    assert effective_rank(healthy) > 20 and effective_rank(torch.ones(64, 32)) == 0.0
    rank1 = torch.randn(64, 1) * torch.randn(1, 32)
    assert effective_rank(rank1) == pytest.approx(1.0, abs=1e-3)
    assert set(feature_health(healthy)) == {"health/patch_sim_mean", "health/patch_sim_std", "health/effective_rank"}


# ---------------------------------------------------------------------------------------------- runs
def test_tiny_pretraining_on_real_tiles_then_exact_resume(rgb_store, tmp_path):
    full = pretrain(_cfg(rgb_store, tmp_path / "full"))
    assert full.iterations == 4
    rows = stage_metrics(tmp_path / "full")
    losses_full = [r["total_loss"] for r in rows]
    assert len(losses_full) == 4 and all(np.isfinite(losses_full))
    assert "health/effective_rank" in rows[0] and "ibot_loss" in rows[0] and "imgs_per_s" in rows[0]

    # killed after 2 iterations (the checkpoint is the state a kill would leave), then resumed
    cfg = _cfg(rgb_store, tmp_path / "resumed")
    part = pretrain(cfg, max_steps=2)
    assert part.iterations == 2
    pretrain(cfg, resume=True)
    losses_resumed = [r["total_loss"] for r in stage_metrics(tmp_path / "resumed")]
    assert losses_resumed == losses_full  # exactly the same numbers

    # checkpoints are safe to load; the exported backbone loads with its metadata
    ck = torch.load(full.checkpoint, weights_only=True)
    assert ck["global_step"] == 4 and ck["optimizer_states"] and ck["dinov3geo"]["band_names"] == ["red", "green", "blue"]
    sd = torch.load(full.backbone_meta, weights_only=True)
    assert "rope_embed.periods" in sd and "storage_tokens" in sd and not any(k.startswith("dino") for k in sd)
    bb = load_backbone(full.backbone_meta)
    assert bb.metadata.bands == ["red", "green", "blue"] and 0.05 < bb.metadata.gsd < 0.2
    assert all(0 < m < 1 for m in bb.metadata.mean)
    own = load_backbone(full.backbone)
    for k, v in own.state_dict().items():
        assert torch.equal(v, bb.state_dict()[k])


def test_bf16_params_pretraining_keeps_fp32_masters_and_resumes_exactly(rgb_store, tmp_path):
    full = pretrain(_cfg(rgb_store, tmp_path / "full", train__precision="bf16-params", optim__iterations=3))
    losses_full = [r["total_loss"] for r in stage_metrics(tmp_path / "full")]
    assert len(losses_full) == 3 and all(np.isfinite(losses_full))
    cfg = _cfg(rgb_store, tmp_path / "resumed", train__precision="bf16-params", optim__iterations=3)
    pretrain(cfg, max_steps=1)
    pretrain(cfg, resume=True)
    assert [r["total_loss"] for r in stage_metrics(tmp_path / "resumed")] == losses_full
    ck = torch.load(full.checkpoint, weights_only=True)
    assert all(v.dtype == torch.float32 for k, v in ck["state_dict"].items() if v.is_floating_point())
    assert load_backbone(full.backbone).cls_token.dtype == torch.float32
    with pytest.raises(ValueError, match="train.precision"):
        pretrain(_cfg(rgb_store, tmp_path / "bad", train__precision="bf16"))


def test_multispectral_store_trains(shared_data, tmp_path):
    store = tmp_path / "l5.zarr"
    ingest([shared_data / "landsat/rstoolbox_LT05_224063_1988"], store, tile_size=64,
           bands=["blue", "green", "red", "nir", "swir16", "swir22"], progress=False)
    res = pretrain(_cfg(store, tmp_path / "ms", optim__iterations=2))
    bb = load_backbone(res.backbone)
    assert bb.patch_embed.proj.weight.shape[1] == 6
    assert bb.metadata.bands == ["blue", "green", "red", "nir", "swir16", "swir22"]
    assert bb.metadata.gsd == pytest.approx(30.0)


def test_cli_pretrain(rgb_store, tmp_path, capsys):
    from dinov3geo.cli import main

    cfg_path = tmp_path / "c.yaml"
    raw = json.loads(json.dumps(TINY))
    raw["data"]["store"] = str(rgb_store)
    raw["train"]["output_dir"] = str(tmp_path / "cli")
    cfg_path.write_text(yaml.safe_dump({"common": raw, "pretrain": {"optim": {"iterations": 2}}}))
    assert main(["-q", "pretrain", str(cfg_path), "--set", "data.batch_size=2"]) == 0
    assert (tmp_path / "cli" / "backbone.pth").exists()
    assert main(["pretrain", str(cfg_path), "--set", "optim.nope=1"]) == 1
    assert "optim.nope" in capsys.readouterr().err


def test_pretrain_on_a_torchgeo_geodataset(shared_data, tmp_path):
    from torchgeo.datasets import RasterDataset
    from torchgeo.samplers import RandomGeoSampler

    from dinov3geo.data.torchgeo import GeoDatasetTiles

    ds = RasterDataset(paths=str(shared_data / "landsat/rasterio_RGB.byte.tif"))
    sampler = RandomGeoSampler(ds, size=64, length=12, generator=torch.Generator().manual_seed(0))
    tiles = GeoDatasetTiles(ds, sampler, band_names=["red", "green", "blue"], nodata=0)
    item = tiles[0]
    assert item["image"].shape == (3, 64, 64) and item["valid"].dtype == torch.bool
    assert (item["image"][:, ~item["valid"]] == 0).all()
    res = pretrain(_cfg(Path("unused"), tmp_path / "tg", optim__iterations=2), tiles=tiles)
    bb = load_backbone(res.backbone)
    assert bb.metadata.bands == ["red", "green", "blue"] and len(bb.metadata.mean) == 3
