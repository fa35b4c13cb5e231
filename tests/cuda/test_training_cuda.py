"""Pretraining on one GPU with Lightning: fit, exact resume, ``bf16-params`` and FSDP with one process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cuda.conftest import on_cpu, ssl_config

pytestmark = pytest.mark.cuda  # the package is imported inside the tests: collecting them (and skipping) is cheap


def _losses(out: Path) -> list[float]:
    from dinov3geo.ssl.train import stage_metrics

    return [r["total_loss"] for r in stage_metrics(out)]


def test_lightning_fit_on_one_gpu_then_exact_resume(rgb_store, tmp_path, accelerator):
    """4 fp32 iterations in one go vs 2 + resume + 2: the same losses. Bitwise on the CPU; on a GPU within
    1e-5 (relative), since atomics in some CUDA backward kernels may change the summation order run to run."""
    from dinov3geo.models import load_backbone
    from dinov3geo.ssl.train import pretrain, stage_metrics

    full = pretrain(ssl_config(rgb_store, tmp_path / "full", accelerator, train__precision="32-true"))
    assert full.iterations == 4
    rows = stage_metrics(tmp_path / "full")
    losses = [r["total_loss"] for r in rows]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert "imgs_per_s" in rows[0] and "health/effective_rank" in rows[0]

    cfg = ssl_config(rgb_store, tmp_path / "resumed", accelerator, train__precision="32-true")
    assert pretrain(cfg, max_steps=2).iterations == 2
    pretrain(cfg, resume=True)
    resumed = _losses(tmp_path / "resumed")
    if on_cpu():
        assert resumed == losses
    else:
        np.testing.assert_allclose(resumed, losses, rtol=1e-5, atol=0)

    ck = torch.load(full.checkpoint, weights_only=True, map_location="cpu")
    assert ck["global_step"] == 4 and ck["optimizer_states"]
    assert all(v.device.type == "cpu" for v in ck["state_dict"].values())  # loadable anywhere
    bb = load_backbone(full.backbone)  # exported on the CPU, in fp32
    assert bb.cls_token.dtype == torch.float32 and bb.metadata.bands == ["red", "green", "blue"]


def test_bf16_mixed_and_bf16_params_pretraining(rgb_store, tmp_path, accelerator):
    """The two bf16 precisions train (finite losses) and keep fp32 master weights in the checkpoint; the
    default precision on a GPU is bf16-mixed."""
    from dinov3geo.models import load_backbone
    from dinov3geo.ssl.train import _precision, pretrain

    auto = ssl_config(rgb_store, tmp_path / "auto", accelerator)
    if not on_cpu():
        assert _precision(auto) == "bf16-mixed"
    for precision in ("bf16-mixed", "bf16-params"):
        out = tmp_path / precision
        res = pretrain(ssl_config(rgb_store, out, accelerator, train__precision=precision, optim__iterations=3))
        losses = _losses(out)
        assert len(losses) == 3 and all(np.isfinite(losses)), (precision, losses)
        ck = torch.load(res.checkpoint, weights_only=True, map_location="cpu")
        floats = [v for v in ck["state_dict"].values() if v.is_floating_point()]
        assert floats and all(v.dtype == torch.float32 for v in floats), precision
        assert load_backbone(res.backbone).cls_token.dtype == torch.float32


def test_fsdp_with_one_process(rgb_store, tmp_path, accelerator):
    """``train.strategy=fsdp`` on one GPU (one process): Lightning wraps the module in FSDP; 3 iterations train
    and the exported backbone loads."""
    if on_cpu():
        pytest.skip("Lightning's FSDP strategy requires a GPU accelerator (ValueError: The strategy `fsdp` "
                    "requires a GPU accelerator, but received `accelerator='cpu'`)")
    from dinov3geo.models import load_backbone
    from dinov3geo.ssl.train import pretrain

    out = tmp_path / "fsdp"
    res = pretrain(ssl_config(rgb_store, out, accelerator, train__strategy="fsdp", train__precision="32-true",
                              optim__iterations=3))
    losses = _losses(out)
    assert res.iterations == 3 and len(losses) == 3 and all(np.isfinite(losses))
    bb = load_backbone(res.backbone)
    assert bb.metadata.bands == ["red", "green", "blue"]
    # the same run without FSDP starts from the same state: the first loss agrees
    plain = tmp_path / "plain"
    pretrain(ssl_config(rgb_store, plain, accelerator, train__precision="32-true", optim__iterations=1))
    np.testing.assert_allclose(losses[0], _losses(plain)[0], rtol=1e-4)
