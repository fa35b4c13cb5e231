"""Region inference on the GPU: the engine on ``cuda`` equals the CPU in fp32, bf16 is close, ``read_threads``
changes nothing, and CHMv2 heights on the GPU are within 1 cm of the CPU's."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.cuda.conftest import NEON_RGB, on_cpu, rel_err, tiny_chmv2

pytestmark = pytest.mark.cuda  # the package is imported inside the tests: collecting them (and skipping) is cheap


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def rgb_crop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 320 x 288 crop of the NEON RGB image (uint8, real texture), with a nodata corner."""
    import rasterio
    from rasterio.windows import Window

    from tests.conftest import write_raster

    with rasterio.open(NEON_RGB) as src:
        win = Window(200, 300, 288, 320)
        arr = src.read(window=win)
        transform = src.window_transform(win)
        crs = src.crs
    arr[:, :40, :56] = 0  # nodata corner
    return write_raster(tmp_path_factory.mktemp("cuda_inf") / "rgb.tif", arr, crs=crs, transform=transform,
                        nodata=0, tiled=True)


def _read(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as ds:
        return ds.read()


def _features() -> Any:
    from dinov3geo.inference import BackboneFeatures
    from dinov3geo.models import build_backbone

    torch.manual_seed(0)
    bb = build_backbone("vit_tiny_test", in_chans=3).eval()
    return BackboneFeatures(bb, value_scale=1 / 255)


def test_engine_on_cuda_matches_cpu_fp32(device, rgb_crop, tmp_path):
    from dinov3geo.inference import predict_raster

    before = _digest(rgb_crop)
    kw = {"window": 128, "overlap": 64, "batch_size": 3, "progress": False, "resume": False}
    cpu = predict_raster(_features(), rgb_crop, tmp_path / "cpu.tif", device="cpu", amp=None, **kw)
    gpu = predict_raster(_features(), rgb_crop, tmp_path / "gpu.tif", device=device, amp=None, **kw)
    a, b = _read(gpu), _read(cpu)
    assert a.shape == b.shape and a.shape[0] == 64
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    assert np.array_equal(nan_a, nan_b) and nan_a.any() and not nan_a.all()  # same nodata pixels
    # fp32 on the GPU (cuDNN may use TF32 for the patch-embedding convolution): 1 % of the features' norm
    err = rel_err(torch.from_numpy(np.nan_to_num(a)), torch.from_numpy(np.nan_to_num(b)))
    assert err < 1e-2, f"fp32 features on {device} are {err:.2e} (relative) off the CPU's"
    # the engine's default on a GPU: bf16 autocast
    auto = predict_raster(_features(), rgb_crop, tmp_path / "auto.tif", device=device, amp="auto", **kw)
    c = _read(auto)
    assert np.array_equal(np.isnan(c), nan_b)
    err_bf16 = rel_err(torch.from_numpy(np.nan_to_num(c)), torch.from_numpy(np.nan_to_num(b)))
    assert err_bf16 < 5e-2, f"bf16 features on {device} are {err_bf16:.2e} (relative) off the CPU's fp32"
    # several reader threads (the GPU default) give the same map as one
    threaded = predict_raster(_features(), rgb_crop, tmp_path / "rt4.tif", device=device, amp=None,
                              read_threads=4, **kw)
    d = _read(threaded)
    assert np.array_equal(np.isnan(d), nan_a)
    np.testing.assert_allclose(np.nan_to_num(d), np.nan_to_num(a), rtol=1e-5, atol=1e-6)
    assert _digest(rgb_crop) == before  # the input is untouched


@pytest.mark.parametrize("tf32", ["off", "torch-default"])
def test_chmv2_on_cuda_within_1cm_of_cpu_fp32(device, rgb_crop, tmp_path, tf32):
    """CHMv2 (tiny random model of the release's layout) through ``predict_raster`` in fp32: heights (and their
    std) on the GPU within 1 cm of the CPU's. ``tf32="off"`` disables TF32 in matmuls and cuDNN convolutions
    (true fp32); ``"torch-default"`` keeps torch's defaults (TF32 convolutions), which is what a user gets."""
    import rasterio
    from rasterio.windows import Window

    from dinov3geo.inference import predict_raster
    from dinov3geo.tasks.canopy.model import CanopyRasterModel

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    kw = {"window": 128, "overlap": 64, "batch_size": 2, "progress": False, "resume": False, "amp": None}
    with rasterio.open(rgb_crop) as ds:
        x = torch.from_numpy(ds.read(window=Window(64, 96, 128, 128)).astype(np.float32))[None] / 255
    try:
        if tf32 == "off":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        cpu = predict_raster(CanopyRasterModel.from_chmv2(tiny_chmv2()), rgb_crop, tmp_path / "cpu.tif",
                             device="cpu", **kw)
        gpu = predict_raster(CanopyRasterModel.from_chmv2(tiny_chmv2()), rgb_crop, tmp_path / "gpu.tif",
                             device=device, **kw)
        model = tiny_chmv2()  # and the model alone (no engine) on one window, aligned output
        with torch.inference_mode():
            ref = model(x, output="aligned")
            out = model.to(device)(x.to(device), output="aligned").cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    a, b = _read(gpu), _read(cpu)
    assert a.shape == b.shape == (2, 320, 288)
    valid = ~np.isnan(b[0])
    assert np.array_equal(~np.isnan(a[0]), valid) and 0 < valid.sum() < valid.size
    h = b[0][valid]
    assert h.max() - h.min() > 0.1 and (h >= 0).all()  # non-trivial heights in metres
    diff = np.abs(a[:, valid] - b[:, valid])
    assert diff[0].max() < 1e-2, f"height on {device} up to {diff[0].max():.4f} m off the CPU's (TF32 {tf32})"
    assert diff[1].max() < 1e-2, f"height std on {device} up to {diff[1].max():.4f} m off the CPU's (TF32 {tf32})"
    assert out.shape == ref.shape == (1, 1, 128, 128) and not math.isnan(out.sum().item())
    assert (out - ref).abs().max().item() < 1e-2, f"model alone: {(out - ref).abs().max().item():.4f} m"
    if on_cpu():
        assert torch.equal(out, ref)
