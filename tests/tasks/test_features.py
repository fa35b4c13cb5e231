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


def test_batch_is_chosen_by_memory_and_a_loaded_backbone_gives_the_same_store(neon, tmp_path, caplog, capsys):
    """``batch_size=None`` (the default) picks the batch from the features model's memory estimate, maps what an
    explicit run of that batch maps (bit for bit), and ``weights`` may be a loaded backbone (same store as its
    file); the CLI defaults to it; a bad batch size is refused before any work."""
    import logging
    import re

    import torch

    from dinov3geo.inference.batching import choose_batch_size
    from dinov3geo.tasks.features import MultiLayerFeatures
    from tests.tasks.landcover.test_heads import real_backbone

    bb = real_backbone(in_chans=3)  # LayerScale 0.1-1: the blocks matter
    w = save_backbone(bb, tmp_path / "w.pt")
    n = choose_batch_size(MultiLayerFeatures(bb, [0, -1]), 256, "cpu")
    with caplog.at_level(logging.INFO, logger="dinov3geo"):
        auto = extract_features(neon, tmp_path / "auto.zarr", weights=w, layers=[0, -1], window=256, progress=False,
                                pca=False, sidecars=False)
    assert [int(x) for x in re.findall(r"batch size (\d+) \(automatic, by memory\)", caplog.text)] == [n]
    explicit = extract_features(neon, tmp_path / "explicit.zarr", weights=bb, layers=[0, -1], window=256,
                                batch_size=n, progress=False, pca=False, sidecars=False)
    fa = xr.open_zarr(auto.zarr, consolidated=False)["features"].values
    fe = xr.open_zarr(explicit.zarr, consolidated=False)["features"].values
    assert fa.shape[0] == 128 and float(fa.std()) > 0.1
    np.testing.assert_array_equal(fa, fe)
    assert xr.open_zarr(explicit.zarr, consolidated=False).attrs["weights"] == "in-memory DinoVisionTransformer"
    assert isinstance(bb, torch.nn.Module) and not bb.training
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=r"batch_size must be a positive int or None \(automatic\)"):
            extract_features(neon, tmp_path / "bad.zarr", weights=w, batch_size=bad, progress=False)
    assert not (tmp_path / "bad.zarr").exists()
    capsys.readouterr()
    rc = main(["-v", "features", str(neon), "--out", str(tmp_path / "cli.zarr"), "--weights", str(w),
               "--layers", "0,-1", "--window", "256", "--no-pca"])
    err = capsys.readouterr().err
    assert rc == 0 and f"batch size {n} (automatic, by memory)" in err, err
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "cli.zarr", consolidated=False)["features"].values, fa)


def test_features_memory_estimate_counts_the_tapped_maps_and_the_batch():
    """The estimate grows with the batch (linearly), the window, the tapped layers and upsampling, so the
    automatic batch shrinks for many-layer ViT features where one layer's fits."""
    from dinov3geo.inference import BackboneFeatures
    from dinov3geo.inference.batching import choose_batch_size, region_reserve
    from dinov3geo.tasks.features import MultiLayerFeatures

    bb = build_backbone("vits16").eval()
    one, four = MultiLayerFeatures(bb, [-1]), MultiLayerFeatures(bb, [2, 5, 8, 11])
    e = one.memory_estimate
    assert e(512, 4) == 4 * e(512, 1) and e(1024, 1) > 3.5 * e(512, 1)
    assert four.memory_estimate(512, 1) > e(512, 1)
    up = BackboneFeatures(bb, upsample=True)
    assert up.memory_estimate(512, 1) - BackboneFeatures(bb).memory_estimate(512, 1) == 384 * 512 * 512 * 4
    # a budget where one layer's batch of 4 fits but four layers' does not
    need1 = e(512, 4) + region_reserve(one, 512, 4)
    need4 = four.memory_estimate(512, 4) + region_reserve(four, 512, 4)
    assert need4 > need1
    avail = 4 * need1  # the CPU budget is a quarter of the available memory (below 1 GiB)
    assert choose_batch_size(one, 512, "cpu", available=avail) == 4
    assert choose_batch_size(four, 512, "cpu", available=avail) < 4


def test_store_chunks_and_pca_blocks_are_bounded_in_bytes(neon, tmp_path, monkeypatch):
    """The engine's feature GeoTIFF tiles, the Zarr chunks and the PCA's read blocks are one and the same square of
    at most ``TILE_BYTES`` whatever the band count (a 128 px floor made a tile of four ViT-S layers 288 MiB; 512^2
    feature pixels of ViT-L were 1 GiB per Zarr chunk); the values do not depend on it."""
    import dinov3geo.inference.engine as engine
    from dinov3geo.tasks.features import feature_chunk_side

    assert [feature_chunk_side(n) for n in (64, 384, 1024, 4096, 4608)] == [256, 128, 64, 32, 32]
    assert all(feature_chunk_side(n) ** 2 * n * 4 <= engine.TILE_BYTES for n in (1, 64, 100, 384, 1024, 4608, 8192))
    w = save_backbone(build_backbone("vit_tiny_test"), tmp_path / "w.pt")
    ref = extract_features(neon, tmp_path / "ref.zarr", weights=w, layers=[0, -1], window=256, progress=False,
                           sidecars=False)
    reads, tiles = [], []
    real_read = rasterio.io.DatasetReader.read

    def read(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        arr = real_read(self, *a, **k)
        if self.count == 128:  # the feature GeoTIFF
            reads.append(arr.shape[-2:])
            tiles.append(self.block_shapes[0])
        return arr

    monkeypatch.setattr(engine, "TILE_BYTES", 128 * 4 * 16 * 16)  # 16 x 16 feature pixels of 128 features
    monkeypatch.setattr(rasterio.io.DatasetReader, "read", read)
    small = extract_features(neon, tmp_path / "small.zarr", weights=w, layers=[0, -1], window=256, progress=False,
                             sidecars=False)
    ds, dr = xr.open_zarr(small.zarr, consolidated=False), xr.open_zarr(ref.zarr, consolidated=False)
    assert ds["features"].encoding["chunks"] == (128, 16, 16)
    assert dr["features"].encoding["chunks"] == (128, *ds["features"].shape[1:])  # the whole 70 x 76 grid
    np.testing.assert_allclose(ds["features"].values, dr["features"].values, rtol=0, atol=1e-5)
    assert reads and max(max(r) for r in reads) == 16 and set(tiles) == {(16, 16)}  # whole tiles read
    with rasterio.open(small.pca_tif) as a, rasterio.open(ref.pca_tif) as b:
        pa, pb = a.read().astype(int), b.read().astype(int)
    ok = pa[0] > 0
    assert np.array_equal(ok, pb[0] > 0) and ok.mean() > 0.9  # the same valid pixels
    for k in range(3):  # the components fitted on another sample: the same up to sign
        assert abs(np.corrcoef(pa[k][ok], pb[k][ok])[0, 1]) > 0.9


@pytest.mark.parametrize(("n", "d"), [(300, 40), (2000, 600), (700, 3000)])
def test_top_components_equal_the_full_svd_with_a_fixed_sign(n, d):
    """The PCA's components (exact SVD for small matrices, seeded subspace iteration above 256) equal numpy's
    full SVD up to 1e-10 on a decaying spectrum, as patch features have, with the largest entry of each positive;
    on a flat spectrum (no well-defined components) they still capture the top-3 variance."""
    from dinov3geo.tasks.features import top_components

    rng = np.random.default_rng(n + d)
    r = min(60, d)
    x = (rng.standard_normal((n, r)) * np.exp(-np.arange(r) / 3)) @ rng.standard_normal((r, d))
    x += 1e-3 * rng.standard_normal((n, d))
    x -= x.mean(0)
    got = top_components(x, 3)
    ref = np.linalg.svd(x, full_matrices=False)[2][:3]
    ref *= np.sign(ref[np.arange(3), np.argmax(np.abs(ref), axis=1)])[:, None]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)
    assert np.all(got[np.arange(3), np.argmax(np.abs(got), axis=1)] > 0)
    np.testing.assert_array_equal(top_components(x, 3), got)  # seeded: the same every run
    flat = rng.standard_normal((n, d))
    flat -= flat.mean(0)
    s = np.linalg.svd(flat, compute_uv=False)
    captured = np.linalg.norm(flat @ top_components(flat, 3).T) ** 2
    assert captured >= 0.95 * float((s[:3] ** 2).sum())  # (3 random directions: 0.1-0.4 here)


def test_pca_sample_is_bounded_in_bytes():
    from dinov3geo.tasks.features import PCA_SAMPLE_BYTES, pca_sample_size

    assert pca_sample_size(64) == pca_sample_size(384) == 20000
    assert pca_sample_size(4608) == PCA_SAMPLE_BYTES // (4 * 4608) < 20000
    assert all(pca_sample_size(d) * d * 4 <= PCA_SAMPLE_BYTES or pca_sample_size(d) == 1000 for d in (1, 900, 4608,
                                                                                                    20000, 10**6))
    assert pca_sample_size(10**6) == 1000 and pca_sample_size(10, n_fit=500) == 500
