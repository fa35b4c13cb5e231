"""``benchmarks/landcover_quality.py``'s backbone preparation (the matched random control of a custom-arch backbone
file, ``--norm image``), its over-seed statistics, and the Landsat SSL recipe it is run with
(``benchmarks/configs/landsat_ssl.yaml`` + ``benchmarks/landsat_ssl_prep.py``)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
BANDS = ["blue", "green", "red", "nir", "swir16", "swir22"]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import landcover_quality as mod
    finally:
        sys.path.remove(str(BENCH))
    return mod


@pytest.fixture()
def backbone_file(tmp_path):
    from dinov3geo.models import BackboneMetadata, build_backbone, save_backbone

    torch.manual_seed(123)
    m = build_backbone("vit_tiny_test", in_chans=6, embed_dim=48, num_heads=3, depth=3)
    path = tmp_path / "custom.pt"
    save_backbone(m, path, metadata=BackboneMetadata(bands=BANDS, mean=[0.1] * 6, std=[2.0] * 6, gsd=30.0))
    return path


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_random_control_of_a_file_has_its_arch_fresh_weights_and_no_statistics(bench, backbone_file, tmp_path):
    from dinov3geo.models import load_backbone

    before = _sha(backbone_file)
    work = tmp_path / "work"
    work.mkdir()
    src = load_backbone(backbone_file)
    out = Path(bench.prepare_backbone(f"random:{backbone_file}", "image", work, init_seed=0))
    assert out.parent == work and _sha(backbone_file) == before
    ctrl = load_backbone(out)
    assert ctrl.config.to_dict() == src.config.to_dict()  # same arch, 6 input channels, depth 3, 48-d
    assert ctrl.metadata is None or (ctrl.metadata.mean is None and ctrl.metadata.std is None)
    sd_src, sd_ctrl = src.state_dict(), ctrl.state_dict()
    assert sd_src.keys() == sd_ctrl.keys()
    assert not torch.equal(sd_src["patch_embed.proj.weight"], sd_ctrl["patch_embed.proj.weight"])
    # the init seed makes the control reproducible, and another seed gives another control
    again = load_backbone(bench.prepare_backbone(f"random:{backbone_file}", "image", work, init_seed=0))
    assert torch.equal(again.state_dict()["blocks.0.attn.qkv.weight"], sd_ctrl["blocks.0.attn.qkv.weight"])
    other = load_backbone(bench.prepare_backbone(f"random:{backbone_file}", "image", work, init_seed=1))
    assert not torch.equal(other.state_dict()["blocks.0.attn.qkv.weight"], sd_ctrl["blocks.0.attn.qkv.weight"])


def test_norm_image_drops_only_the_recorded_statistics(bench, backbone_file, tmp_path):
    from dinov3geo.models import load_backbone

    assert bench.prepare_backbone(str(backbone_file), "backbone", tmp_path) == str(backbone_file)
    assert bench.prepare_backbone("random:vits16", "image", tmp_path) == "random:vits16"  # built by train_landcover
    out = bench.prepare_backbone(str(backbone_file), "image", tmp_path)
    assert out != str(backbone_file)
    src, cp = load_backbone(backbone_file), load_backbone(out)
    assert cp.metadata.mean is None and cp.metadata.std is None
    assert cp.metadata.bands == BANDS and cp.metadata.gsd == 30.0
    for k, v in src.state_dict().items():
        assert torch.equal(v, cp.state_dict()[k]), k


def test_seed_stats_mean_and_sample_sd(bench):
    s = bench.seed_stats([0.2, None, 0.4, 0.9])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.5)
    assert s["sd"] == pytest.approx(float(np.std([0.2, 0.4, 0.9], ddof=1)))
    assert bench.seed_stats([0.3])["sd"] is None and bench.seed_stats([None])["mean"] is None


def test_landsat_ssl_recipe_loads_as_a_6_band_vit16():
    from dinov3geo.ssl.config import load_config

    cfg = load_config(BENCH / "configs" / "landsat_ssl.yaml", section="pretrain")
    assert cfg.student.patch_size == 16 and cfg.student.overrides["embed_dim"] == 192
    assert cfg.data.normalize == "none" and cfg.crops.global_crops_size % 16 == 0


def test_prep_standardises_each_scene_per_band(tmp_path):
    import rasterio

    sys.path.insert(0, str(BENCH))
    try:
        import landsat_ssl_prep as prep
    finally:
        sys.path.remove(str(BENCH))
    if not prep.SCENES["para_1988_LT5"][0][0].exists():
        pytest.skip("../shared/data is not here")
    rec = prep.standardise("para_1988_LT5", tmp_path)  # 6 per-band files, uint8 DN, nodata 255
    with rasterio.open(rec["file"]) as ds:
        z = ds.read()
        assert ds.count == 6 and list(ds.descriptions) == BANDS and ds.nodata == prep.NODATA
    v = (z != prep.NODATA).all(axis=0)
    vals = z[:, v].astype(np.float64)
    assert np.allclose(vals.mean(axis=1), 0, atol=1e-4) and np.allclose(vals.std(axis=1), 1, atol=1e-3)
