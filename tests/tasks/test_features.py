"""Dense features of a real scene: georeferencing, Zarr layout, PCA outputs, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401
import xarray as xr

from dinov3geo.cli import main
from dinov3geo.io.cog import validate_cog
from dinov3geo.models import build_backbone, save_backbone
from dinov3geo.tasks.features import extract_features, normalisation_for, pca_rgb


@pytest.fixture(scope="module")
def neon(shared_data):
    return shared_data / "aerial_rgb_chm/neon_bart_2019/2019_BART_5_320000_4881000_image_crop.tif"


def test_feature_grid_is_the_image_grid_scaled_by_16(neon, tmp_path):
    res = extract_features(neon, tmp_path / "f.zarr", arch="vit_tiny_test", layers=[0, -1], window=256,
                           progress=False)
    with rasterio.open(neon) as src:
        t, h, w = src.transform, src.height, src.width
    ds = xr.open_zarr(res.zarr, consolidated=False)
    assert ds["features"].dims == ("feature", "y", "x")
    assert ds["features"].shape == (128, -(-h // 16), -(-w // 16))
    assert ds.rio.crs.to_epsg() == 32619
    assert ds.rio.transform() == t * rasterio.Affine.scale(16)
    f = ds["features"].values
    assert np.isfinite(f).all()  # the whole image is valid
    ok, errors, _ = validate_cog(res.pca_tif)
    assert ok, errors
    with rasterio.open(res.pca_tif) as p:
        assert p.transform == ds.rio.transform() and p.count == 3 and p.nodata == 0
    assert res.pca_png.stat().st_size > 0


def test_windowed_equals_whole_image_at_patch_level(neon, tmp_path):
    """Away from window borders, windowed features equal a single-window run (same model, same pixels)."""
    w = save_backbone(build_backbone("vit_tiny_test"), tmp_path / "w.pt")
    a = extract_features(neon, tmp_path / "a.zarr", weights=w, window=1024 + 256, progress=False, pca=False)
    b = extract_features(neon, tmp_path / "b.zarr", weights=w, window=512, progress=False, pca=False)
    fa = xr.open_zarr(a.zarr, consolidated=False)["features"].values
    fb = xr.open_zarr(b.zarr, consolidated=False)["features"].values
    assert fa.shape == fb.shape
    # a ViT sees its whole window, so features differ with context; they stay strongly correlated
    corr = np.corrcoef(fa.reshape(fa.shape[0], -1).ravel(), fb.reshape(fb.shape[0], -1).ravel())[0, 1]
    assert corr > 0.9


def test_normalisation_from_metadata(tmp_path):
    bb = build_backbone("vit_tiny_test")
    assert normalisation_for(bb, "uint8")[0] == pytest.approx(1 / 255)
    save_backbone(bb, tmp_path / "b.pt", metadata={"bands": ["red", "green", "blue"], "mean": [0.5] * 3,
                                                     "std": [0.2] * 3,
                                                     "provenance": {"normalization_units": "[0, 1] (raw / 255)"}})
    from dinov3geo.models import load_backbone

    vs, m, s = normalisation_for(load_backbone(tmp_path / "b.pt"), "uint8")
    assert vs == pytest.approx(1 / 255) and m == [0.5] * 3 and s == [0.2] * 3


def test_pca_rgb_marks_invalid():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(8, 10, 12)).astype(np.float32)
    valid = np.ones((10, 12), bool)
    valid[0, 0] = False
    rgb = pca_rgb(f, valid)
    assert rgb.shape == (3, 10, 12) and (rgb[:, 0, 0] == 0).all() and (rgb[:, valid] >= 1).all()


def test_cli_features(neon, tmp_path, capsys):
    rc = main(["-q", "features", str(neon), "--out", str(tmp_path / "c.zarr"), "--arch", "vit_tiny_test",
               "--window", "256"])
    assert rc == 0 and (tmp_path / "c.zarr").exists() and (tmp_path / "c_pca.png").exists()
