"""Land-cover dense head at region scale: the full-resolution part (upsampling, image detail, classifier) runs one
sample at a time with the batched logits, and the memory estimate that picks the batch size."""

from __future__ import annotations

import pytest
import torch

from dinov3geo.inference.batching import CPU_MEMORY_BUDGET, choose_batch_size, region_reserve
from dinov3geo.models.registry import build_backbone
from dinov3geo.tasks.landcover.classes import ClassTable
from dinov3geo.tasks.landcover.heads import (
    DenseHead,
    LandcoverModel,
    LinearHead,
    default_taps,
    level_channels,
)
from dinov3geo.tasks.landcover.predict import LandcoverRasterModel

from .test_heads import real_backbone

TABLE = ClassTable.from_labels(["forest", "pasture", "water"])
# float32 rounding of logits up to ~20 after a few convs and GroupNorms (measured <= 1.6e-5: batched and single
# convolutions sum in different orders); a mixed-up sample is off by ~1
TOL = {"rtol": 1e-5, "atol": 1e-4}


def _model(image_detail: bool) -> LandcoverModel:
    bb = real_backbone(in_chans=4)
    head = DenseHead([64] * 4, 3, hidden=32, image_detail=image_detail, in_bands=4, detail_channels=8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return LandcoverModel(bb, head, TABLE).eval()


@pytest.mark.parametrize("image_detail", [True, False])
def test_per_sample_dense_head_equals_batched(image_detail: bool) -> None:
    m = _model(image_detail)
    calls: list[int] = []
    inner = m.head._full_resolution

    def spy(x: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        calls.append(int(x.shape[0]))
        return inner(x, image)

    m.head._full_resolution = spy  # type: ignore[method-assign]
    x = torch.randn(3, 4, 40, 56)  # padded to 48 x 64 inside, cropped back
    with torch.no_grad():
        m.head.per_sample = False
        ref = m(x)
        m.head.per_sample = True
        got = m(x)
    assert calls == [3, 1, 1, 1]
    assert got.shape == ref.shape == (3, 3, 40, 56)
    torch.testing.assert_close(got, ref, **TOL)
    assert float((ref[0] - ref[1]).abs().max()) > 0.1  # the samples differ: a mix-up would show
    calls.clear()
    m.train()
    m(x).mean().backward()  # training: the whole batch at once
    assert calls == [3]
    assert all(p.grad is not None for p in m.head.parameters())
    if image_detail:
        with pytest.raises(ValueError, match="does not match the upsampled grid"):
            m.head([torch.randn(1, 64, 3, 4)] * 4, torch.randn(1, 4, 32, 32))


def test_memory_estimate_and_automatic_batch() -> None:
    m = _model(image_detail=True)
    e = [m.memory_estimate(256, b) for b in (1, 2, 4)]
    assert 0 < e[0] < e[1] < e[2]
    m.head.per_sample = False
    assert m.memory_estimate(256, 4) > e[2]
    m.head.per_sample = True
    with pytest.raises(ValueError, match="positive"):
        m.memory_estimate(512, 0)
    linear = LandcoverModel(real_backbone(in_chans=4), LinearHead(64, 3), TABLE)
    assert 0 < linear.memory_estimate(256, 1) < linear.memory_estimate(256, 2)
    rm = LandcoverRasterModel(m)
    big = 64 << 30
    assert choose_batch_size(rm, 512, "cpu", available=big) == 4
    tight = 4 * (m.memory_estimate(512, 3) + region_reserve(rm, 512, 3))  # with the engine's buffers
    assert choose_batch_size(rm, 512, "cpu", available=tight) == 3
    assert choose_batch_size(rm, 512, "cpu", available=tight - 4) == 3 - 1
    # the ViT-L layout (meta tensors): 4 windows of 512 px fit the CPU budget alone, 2 of 1024 px do not
    bb = build_backbone("vitl16", device="meta")
    layers = default_taps(bb, 4)
    head = DenseHead(level_channels(bb, layers), 8, image_detail=True, in_bands=3)
    vitl = LandcoverModel(bb, head, ClassTable.from_labels([str(i) for i in range(8)]), layers)
    assert vitl.memory_estimate(512, 4) <= CPU_MEMORY_BUDGET
    # with the engine's region buffers (benchmarks/head_memory.py: ViT-L land cover at 4096^2 grew 1288 MiB at 4)
    auto = choose_batch_size(vitl, 512, "cpu", available=big)
    assert 2 <= auto < 4
    assert vitl.memory_estimate(512, auto) + region_reserve(vitl, 512, auto) <= CPU_MEMORY_BUDGET
    assert vitl.memory_estimate(512, auto + 1) + region_reserve(vitl, 512, auto + 1) > CPU_MEMORY_BUDGET
    assert choose_batch_size(vitl, 1024, "cpu", available=big) == 1
