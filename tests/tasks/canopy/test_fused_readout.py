"""Fused, row-chunked bin readout (no full-resolution logits) and the automatic batch size of canopy mapping.

The chunked paths must give the reference numbers (``HeightBins.mean_and_std`` of the head's full logits) up to
float32 rounding, never build a full-resolution ``n_bins`` tensor, and leave the maps of ``predict_canopy`` and
``dinov3geo canopy predict`` as they were.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F

from dinov3geo.inference.batching import CPU_MEMORY_BUDGET, region_reserve, resumed_batch_size
from dinov3geo.models import build_backbone
from dinov3geo.tasks.canopy.bins import HeightBins, chunk_bytes_for, chunk_rows
from dinov3geo.tasks.canopy.chmv2 import CHMv2
from dinov3geo.tasks.canopy.dpt import DPTHead, upsample_rows_x2
from dinov3geo.tasks.canopy.heads import LightHead
from dinov3geo.tasks.canopy.model import CanopyHeightModel, CanopyRasterModel
from dinov3geo.tasks.canopy.predict import (
    CPU_PIXELS_PER_CALL,
    MAX_AUTO_BATCH,
    choose_batch_size,
    predict_canopy,
)

# float32 rounding of heights up to ~100 m. The fused readout sums in float64: it is within 1e-5 m of the reference
# computed in float64 and within the reference's own float32 error (measured <= 4.2e-5 m) of the float32 reference.
# After a head whose convs run in row blocks: measured <= 7.4e-5 m. A misplaced row or halo is off by metres.
TOL = {"rtol": 0.0, "atol": 1e-5}
HEAD_TOL = {"rtol": 1e-5, "atol": 1e-4}


def _logits(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x[0, :, 0, 0] = -1.0  # all bins negative: mixlog's uniform fallback
    x[-1, :, -1, -1] = 0.0
    x[-1, 5, -1, -1] = 50.0  # nearly one-hot
    return x


@pytest.mark.parametrize("norm", ["chmv2_mixlog", "softmax"])
@pytest.mark.parametrize("strategy", ["chmv2_mixlog", "log"])
def test_chunked_readout_equals_reference(norm: str, strategy: str) -> None:
    bins = HeightBins(48, strategy, norm, 0.1 if strategy == "log" else 0.001, 96.0)
    logits = _logits((3, 48, 37, 53))
    before = logits.clone()
    ref_mean, ref_std = bins.mean_and_std(logits)
    exact_mean, exact_std = (t.float() for t in bins.mean_and_std(logits.double()))
    n_px_row = 48 * 53 * 4
    for chunk in (1, n_px_row * 3 - 1, n_px_row * 36, 10**9):  # 1 row, 2 rows, 36 of 37 rows, whole samples
        mean, std = bins.mean_and_std_chunked(logits, chunk_bytes=chunk)
        assert mean.dtype == std.dtype == torch.float32
        torch.testing.assert_close(mean, exact_mean, **TOL)
        torch.testing.assert_close(std, exact_std, **TOL)
        torch.testing.assert_close(mean, ref_mean, **HEAD_TOL)
        torch.testing.assert_close(std, ref_std, **HEAD_TOL)
        only, none = bins.mean_and_std_chunked(logits, with_std=False, chunk_bytes=chunk)
        assert none is None
        torch.testing.assert_close(only, exact_mean, **TOL)
    assert torch.equal(logits, before)  # the chunked readout copies its blocks
    # the in-place kernel on a block the caller owns, with and without a scratch block
    for scratch in (None, torch.empty(48 * 5 * 53, dtype=torch.float64)):
        m, s = bins.readout_(logits[1:2, :, 4:9].clone(), scratch=scratch)
        torch.testing.assert_close(m, exact_mean[1:2, :, 4:9], **TOL)
        torch.testing.assert_close(s, exact_std[1:2, :, 4:9], **TOL)
    assert float(ref_std.min()) >= 0 and float(ref_std.max()) > 1.0  # non-trivial spreads compared
    # the NaN of a NaN logit stays in its pixel, as in the reference
    bad = logits.clone()
    bad[2, 7, 10, 11] = float("nan")
    m, s = bins.mean_and_std_chunked(bad)
    r, q = bins.mean_and_std(bad)
    assert torch.isnan(m[2, 0, 10, 11]) and torch.isnan(r[2, 0, 10, 11]) and torch.isnan(s[2, 0, 10, 11])
    assert int(torch.isnan(m).sum()) == int(torch.isnan(r).sum()) == 1


def test_chunk_rows() -> None:
    assert chunk_rows(256, 512, 4, 16 * 2**20) == 32
    assert chunk_rows(256, 512, 4, 1) == 1
    assert chunk_rows(256, 512, 4, 48 * 2**19, height=512) == 47  # 11 balanced blocks, not 10 x 48 + 32
    assert chunk_rows(256, 512, 4, 10**12, height=100) == 100
    assert chunk_bytes_for("cpu") < chunk_bytes_for("cuda")


@pytest.mark.parametrize("hw", [(1, 3), (5, 7), (16, 16), (13, 9)])
def test_upsample_rows_equals_interpolate(hw: tuple[int, int]) -> None:
    z = torch.randn(2, 6, *hw)
    ref = F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=True)
    h = 2 * hw[0]
    ranges = [(0, h), (0, 1), (h - 1, h)] + [(a, min(h, a + k)) for k in (1, 2, 5) for a in range(0, h, 3)]
    for r0, r1 in ranges:
        torch.testing.assert_close(upsample_rows_x2(z, r0, r1), ref[:, :, r0:r1], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        upsample_rows_x2(z, 0, h + 1)


def _dpt_head(n_bins: int = 24) -> DPTHead:
    torch.manual_seed(0)
    head = DPTHead(32, [4, 8, 16, 32], channels=16, n_hidden_channels=8, n_bins=n_bins).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.15)
    return head


def _record_rows(module: torch.nn.Module) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    module.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    return shapes


@pytest.mark.parametrize("grid", [(3, 5), (2, 2), (1, 3)])
def test_dpt_forward_binned_equals_reference(grid: tuple[int, int]) -> None:
    head = _dpt_head()
    bins = HeightBins(24, "log", "chmv2_mixlog", 0.1, 100.0)
    feats = [(torch.randn(2, 32, *grid), torch.randn(2, 32)) for _ in range(4)]
    with torch.no_grad():
        logits = head(feats)
        ref_mean, ref_std = bins.mean_and_std(logits)
        h, w = logits.shape[-2:]
        shapes = _record_rows(head.conv_depth.head[4])  # the 1x1 conv to the bins
        for rows in (1, 5, h - 1, h):
            shapes.clear()
            mean, std = head.forward_binned(feats, bins, chunk_bytes=rows * 24 * w * 4)
            assert mean.shape == std.shape == (2, 1, h, w)
            torch.testing.assert_close(mean, ref_mean, **HEAD_TOL)
            torch.testing.assert_close(std, ref_std, **HEAD_TOL)
            # never the full logits: one sample and at most `rows` rows per block (balanced blocks)
            assert max(s[0] for s in shapes) == 1
            assert max(s[2] for s in shapes) == chunk_rows(24, w, 4, rows * 24 * w * 4, h) <= rows
            assert sum(s[2] for s in shapes) == 2 * h
        mean, none = head.forward_binned(feats, bins, with_std=False)
    assert none is None
    torch.testing.assert_close(mean, ref_mean, **HEAD_TOL)
    assert float(ref_mean.std()) > 0.1 and float(ref_std.mean()) > 0.1  # outputs vary: the comparison means something
    with pytest.raises(ValueError, match="bins 8"):
        head.forward_binned(feats, HeightBins(8))


def test_light_forward_binned_equals_reference() -> None:
    torch.manual_seed(1)
    head = LightHead(32, n_levels=2, hidden=32, output="bins", n_bins=20).eval()
    bins = HeightBins(20, "linear", "softmax", 0.5, 60.0)
    feats = [(torch.randn(2, 32, 3, 5), torch.randn(2, 32)) for _ in range(4)]
    with torch.no_grad():
        ref_mean, ref_std = bins.mean_and_std(head(feats))
        shapes = _record_rows(head.out)
        for chunk in (1, 20 * 80 * 4 * 7, 10**9):
            mean, std = head.forward_binned(feats, bins, chunk_bytes=chunk)
            torch.testing.assert_close(mean, ref_mean, **HEAD_TOL)
            torch.testing.assert_close(std, ref_std, **HEAD_TOL)
        assert min(s[2] for s in shapes) == 1 and max(s[0] for s in shapes) == 1
    with pytest.raises(ValueError, match="output='bins'"):
        LightHead(32).forward_binned(feats, bins)


def _tiny_model(kind: str = "dpt") -> CanopyHeightModel:
    torch.manual_seed(0)
    bb = build_backbone("vit_tiny_test", depth=4, num_heads=4)
    if kind == "light":
        return CanopyHeightModel(bb, LightHead(64, hidden=32, output="bins", n_bins=16),
                                 HeightBins(16, "linear", "softmax", 0.5, 60.0)).eval()
    head = DPTHead(64, [8, 16, 32, 64], channels=16, n_hidden_channels=8, n_bins=32)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.1)
    return CanopyHeightModel(bb, head, HeightBins(32)).eval()


@pytest.mark.parametrize("kind", ["dpt", "light"])
def test_model_fused_path_equals_reference_path(kind: str) -> None:
    model = _tiny_model(kind)
    x = torch.randn(2, 3, 72, 40)  # padded and cropped
    out_layer = model.head.conv_depth.head[4] if kind == "dpt" else model.head.out
    shapes = _record_rows(out_layer)
    with torch.no_grad():
        fused = model(x)
        assert max(s[0] for s in shapes) == 1  # the fused path ran: one sample per block
        model.fused_readout = False
        shapes.clear()
        ref = model(x)
        assert shapes[0][0] == 2  # the reference path: the whole batch's logits
        model.fused_readout = True
        with_logits = model(x, return_logits=True)
    for key in ("height", "std"):
        assert fused[key].shape == (2, 1, 72, 40)
        torch.testing.assert_close(fused[key], ref[key], **HEAD_TOL)
        torch.testing.assert_close(with_logits[key], ref[key], **HEAD_TOL)
    assert fused["logits"] is None and with_logits["logits"].shape == (2, model.bins.n_bins, 72, 40)
    # with gradients the reference path runs (training is unchanged)
    model.train()
    shapes.clear()
    model(x)["height"].mean().backward()
    assert shapes[0][0] == 2 and any(p.grad is not None for p in model.head.parameters())


def test_chmv2_fused_equals_logits_path() -> None:
    m = _tiny_model("dpt")
    chm = CHMv2(m.backbone, m.head, m.bins, m.layers)
    x = torch.randn(1, 3, 250, 200)  # odd patch grid: native output 256x224
    chm.chunk_bytes = 40 * 32 * 224 * 4  # blocks of 40 rows
    shapes = _record_rows(chm.head.conv_depth.head[4])
    with torch.no_grad():
        ref_mean, ref_std = chm.bins.mean_and_std(chm.logits(x))
        n_full = len(shapes)
        h, s = chm.forward_with_uncertainty(x)
        only = chm(x)
    assert max(sh[2] for sh in shapes[n_full:]) == chunk_rows(32, 224, 4, chm.chunk_bytes, 256) == 37  # blocks
    torch.testing.assert_close(h, ref_mean, **HEAD_TOL)
    torch.testing.assert_close(s, ref_std, **HEAD_TOL)
    torch.testing.assert_close(only, ref_mean, **HEAD_TOL)


def test_memory_estimate_orders() -> None:
    m = _tiny_model("dpt")
    e = [m.memory_estimate(256, b) for b in (1, 2, 4)]
    assert 0 < e[0] < e[1] < e[2]
    assert m.memory_estimate(512) > e[0]
    m.fused_readout = False
    assert m.memory_estimate(256, 4) > e[2]  # full logits and temporaries per window
    with pytest.raises(ValueError, match="positive"):
        m.memory_estimate(0)


def test_choose_batch_size() -> None:
    m = _tiny_model("dpt")
    rm = CanopyRasterModel(m)
    for explicit in (1, 3, 64):
        assert choose_batch_size(rm, 512, "cpu", explicit) == explicit
        assert choose_batch_size(rm, 512, "cuda", explicit, available=1) == explicit
    for bad in (0, -2, 2.5, True, "4"):
        with pytest.raises(ValueError, match="batch_size"):
            choose_batch_size(rm, 512, "cpu", bad)  # type: ignore[arg-type]
    big = 64 << 30
    # CPU: windows are batched up to CPU_PIXELS_PER_CALL pixels per call
    assert choose_batch_size(rm, 512, "cpu", available=big) == CPU_PIXELS_PER_CALL // 512**2 == 4
    assert choose_batch_size(rm, 1024, "cpu", available=big) == 1
    small = choose_batch_size(rm, 256, "cpu", available=big)
    assert small == min(MAX_AUTO_BATCH, math.ceil(CPU_PIXELS_PER_CALL / 256**2)) == 16
    assert choose_batch_size(m, 256, "cpu", available=big) == small  # the bare model works too
    # memory bounds it: the budget, and a quarter of the available memory
    assert choose_batch_size(rm, 256, "cpu", available=1) == 1
    tight = 4 * (m.memory_estimate(256, 3) + region_reserve(rm, 256, 3))  # with the engine's own buffers
    assert choose_batch_size(rm, 256, "cpu", available=tight) == 3
    vitl = CanopyHeightModel(build_backbone("vitl16_sat493m", device="meta"), DPTHead(1024, device="meta"),
                             HeightBins(256))
    # ViT-L layout: 2 windows and the engine's region buffers within 1 GiB (the estimate alone would allow 4,
    # which measured 1109 MiB of RSS growth at 4096^2: benchmarks/canopy_memory.py)
    assert choose_batch_size(CanopyRasterModel(vitl), 512, "cpu", available=big) == 2
    assert vitl.memory_estimate(512, 4) <= CPU_MEMORY_BUDGET
    assert choose_batch_size(vitl, 1024, "cpu", available=big) == 1
    # CUDA: by free memory, at most MAX_AUTO_BATCH
    assert choose_batch_size(rm, 512, "cuda", available=1) == 1
    assert choose_batch_size(rm, 512, "cuda", available=2 * m.memory_estimate(512, 5)) == 5
    assert choose_batch_size(rm, 512, "cuda", available=1 << 50) == MAX_AUTO_BATCH
    assert choose_batch_size(rm, 512, "cpu") >= 1  # this machine's available memory


@pytest.fixture(scope="module")
def before_map(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A NEON crop with a nodata corner, a tiny CHMv2 as Meta's two files, and its map by the pre-change path."""
    tmp = tmp_path_factory.mktemp("canopy_map")
    src = shared_data / "aerial_rgb_chm/neon_bart_2019/2019_BART_5_320000_4881000_image_crop.tif"
    win = ((300, 428), (200, 360))
    with rasterio.open(src) as ds:
        data = ds.read(window=win)
        profile = ds.profile | {"height": 128, "width": 160, "tiled": False, "nodata": 0,
                                "transform": ds.window_transform(win)}
    profile.pop("blockxsize", None)
    profile.pop("blockysize", None)
    data[:, :16, :24] = 0
    img = tmp / "neon_small.tif"
    with rasterio.open(img, "w", **profile) as dst:
        dst.write(data)
    m = _tiny_model("dpt")
    chm = CHMv2(m.backbone, m.head, m.bins, m.layers)
    torch.save(chm.backbone.state_dict(), tmp / "bb.pth")
    torch.save(chm.head.state_dict(), tmp / "head.pth")
    before = CanopyRasterModel.from_chmv2(chm)
    before.model.fused_readout = False  # the path before the fused readout, at the old default batch of 4
    ref = predict_canopy(before, img, tmp / "before.tif", window=96, batch_size=4, progress=False)
    return {"image": img, "backbone": tmp / "bb.pth", "head": tmp / "head.pth", "before": ref}


def _assert_same_map(path: Path, before: Path) -> None:
    with rasterio.open(before) as a, rasterio.open(path) as b:
        expect, got = a.read(), b.read()
    assert np.isnan(expect[:, :16, :24]).all() and np.isfinite(expect).mean() > 0.9
    assert float(np.nanstd(expect[0])) > 0.01  # a map with structure, not a constant
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expect))
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-4)


def test_predict_canopy_map_unchanged(before_map: dict[str, Path], tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """The default run (fused readout, automatic batch size) maps what the pre-change path mapped."""
    with caplog.at_level(logging.INFO, logger="dinov3geo"):  # (the batch is chosen by dinov3geo.inference.batching)
        new = predict_canopy(None, before_map["image"], tmp_path / "new.tif", chmv2_backbone=before_map["backbone"],
                             chmv2_head=before_map["head"], window=96, progress=False)
    assert "automatic" in caplog.text
    _assert_same_map(new, before_map["before"])


def test_cli_chmv2_map_unchanged(before_map: dict[str, Path], tmp_path: Path) -> None:
    from dinov3geo.cli import main

    out = tmp_path / "cli.tif"
    assert main(["-q", "canopy", "predict", "--image", str(before_map["image"]), "--chmv2-backbone",
                 str(before_map["backbone"]), "--chmv2-head", str(before_map["head"]), "--out", str(out),
                 "--window", "96", "--batch-size", "3"]) == 0
    _assert_same_map(out, before_map["before"])


def test_resumed_run_keeps_its_batch_size(tmp_path: Path) -> None:
    from dinov3geo.inference.engine import parts_dir

    out = tmp_path / "map.tif"
    assert resumed_batch_size(out) is None
    parts = parts_dir(out)
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"config": {"batch_size": 3}}))
    assert resumed_batch_size(out) == 3
    (parts / "manifest.json").write_text("{not json")
    assert resumed_batch_size(out) is None


def test_half_precision_logits_read_out_in_float32() -> None:
    head = _dpt_head()
    bins = HeightBins(24)
    feats = [(torch.randn(2, 32, 3, 5), torch.randn(2, 32)) for _ in range(4)]
    with torch.no_grad():
        ref, _ = bins.mean_and_std(head(feats))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mean, std = head.forward_binned(feats, bins)
            old, _ = bins.mean_and_std(head(feats))  # the unfused path reads bf16 logits out in bf16
    assert mean.dtype == std.dtype == torch.float32 and old.dtype == torch.bfloat16
    assert float((mean - ref).abs().max()) <= float((old.float() - ref).abs().max())
