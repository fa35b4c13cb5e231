"""Change head at region scale: the full-resolution part runs one sample at a time (same logits), the dates run
through the backbone one after the other (same features), and the memory estimate that picks the batch size."""

from __future__ import annotations

import pytest
import torch

from dinov3geo.inference.batching import CPU_MEMORY_BUDGET, choose_batch_size, region_reserve
from dinov3geo.models import build_backbone
from dinov3geo.tasks.change.head import ChangeHead, ChangeModel, ChangeRasterModel
from dinov3geo.tasks.change.zeroshot import date_features, resolve_layers

# float32 rounding of logits up to ~5 after a few convs and GroupNorms (measured <= 8e-6: batched and single
# convolutions sum in different orders); a sample mixed up with another one, or a GroupNorm over the wrong
# samples, is off by ~1
TOL = {"rtol": 1e-5, "atol": 1e-4}


def _model(detail: int = 8, seed: int = 0) -> ChangeModel:
    """A tiny change model whose backbone blocks and head weights matter (LayerScale gammas U(0.1, 1) instead of
    the official 1e-5; GroupNorm affines and convs perturbed)."""
    torch.manual_seed(seed)
    bb = build_backbone("vit_tiny_test").eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in bb.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.9 + 0.1)
        head = ChangeHead(64, 2, 16, 3, hidden=32, detail_channels=detail)
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return ChangeModel(bb, head, [0, 1]).eval()


def _record_calls(head: ChangeHead) -> list[int]:
    calls: list[int] = []
    inner = head._full_resolution

    def spy(y: torch.Tensor, x1: torch.Tensor | None, x2: torch.Tensor | None) -> torch.Tensor:
        calls.append(int(y.shape[0]))
        return inner(y, x1, x2)

    head._full_resolution = spy  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("detail", [8, 0])
def test_per_sample_head_equals_batched(detail: int) -> None:
    m = _model(detail)
    calls = _record_calls(m.head)
    x = torch.randn(3, 6, 40, 56)  # padded to 48 x 64 inside, cropped back
    x[1, 3:] = x[1, :3]  # sample 1: no change between the dates
    with torch.no_grad():
        m.head.per_sample = False
        ref = m(x)
        m.head.per_sample = True
        got = m(x)
    assert calls == [3, 1, 1, 1]  # batched, then one sample at a time
    assert got.shape == ref.shape == (3, 1, 40, 56)
    torch.testing.assert_close(got, ref, **TOL)
    assert float((ref[0] - ref[1]).abs().max()) > 0.1  # the samples differ: a mix-up would show
    # training records gradients: the whole batch at once (per-sample would only cost time)
    calls.clear()
    m.train()
    m(x).mean().backward()
    assert calls == [3]
    assert all(p.grad is not None for p in m.head.parameters())


def test_dates_run_one_after_the_other() -> None:
    m = _model()
    x = torch.randn(2, 6, 32, 48)
    f1, f2 = m.features(x)
    both = date_features(m.backbone, torch.cat([x[:, :3], x[:, 3:]]), m.layers)  # the dates as one batch
    for a, b, ab in zip(f1, f2, both, strict=True):
        torch.testing.assert_close(a, ab[:2], **TOL)
        torch.testing.assert_close(b, ab[2:], **TOL)
    assert float((f1[-1] - f2[-1]).abs().max()) > 0.1


def test_memory_estimate_and_automatic_batch() -> None:
    m = _model(detail=16)
    e = [m.memory_estimate(256, b) for b in (1, 2, 4)]
    assert 0 < e[0] < e[1] < e[2]
    assert m.memory_estimate(512) > e[0]
    m.head.per_sample = False
    assert m.memory_estimate(256, 4) > e[2]  # full-resolution maps for every window
    m.head.per_sample = True
    assert m.memory_estimate(256, 4) == e[2]
    with pytest.raises(ValueError, match="positive"):
        m.memory_estimate(0)
    rm = ChangeRasterModel(m)
    big = 64 << 30
    assert choose_batch_size(rm, 512, "cpu", available=big) == 4
    tight = 4 * (m.memory_estimate(512, 2) + region_reserve(rm, 512, 2))  # with the engine's buffers
    assert choose_batch_size(rm, 512, "cpu", available=tight) == 2
    assert choose_batch_size(rm, 512, "cpu", available=tight - 4) == 2 - 1
    assert choose_batch_size(rm, 512, "cpu", 3) == 3
    # the ViT-L layout (meta tensors: no memory): 4 windows of 512 px fit the CPU budget alone, 2 of 1024 px do not
    bb = build_backbone("vitl16", device="meta")
    layers = resolve_layers(bb, 4)
    vitl = ChangeModel(bb, ChangeHead(1024, 4, 16, 3), layers)
    assert vitl.memory_estimate(512, 4) <= CPU_MEMORY_BUDGET
    # with the engine's region buffers (benchmarks/head_memory.py: ViT-L land cover at 4096^2 grew 1288 MiB at 4)
    auto = choose_batch_size(vitl, 512, "cpu", available=big)
    assert 2 <= auto < 4
    assert vitl.memory_estimate(512, auto) + region_reserve(vitl, 512, auto) <= CPU_MEMORY_BUDGET
    assert vitl.memory_estimate(512, auto + 1) + region_reserve(vitl, 512, auto + 1) > CPU_MEMORY_BUDGET
    assert choose_batch_size(vitl, 1024, "cpu", available=big) == 1
