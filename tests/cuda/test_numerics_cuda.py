"""bf16 on the GPU: autocast numerics of the backbone vs fp32, and the ``bf16-params`` forward/backward."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.cuda.conftest import rel_err

pytestmark = pytest.mark.cuda  # the package is imported inside the tests: collecting them (and skipping) is cheap


def _backbone(device: torch.device) -> torch.nn.Module:
    from dinov3geo.models import build_backbone

    torch.manual_seed(0)
    bb = build_backbone("vits16", in_chans=3)
    with torch.no_grad():  # layer scales of a trained model (~0.1), so all 12 blocks shape the output
        for name, p in bb.named_parameters():
            if name.endswith(".gamma"):
                p.normal_(0.1, 0.02)
    return bb.to(device).eval()


def test_bf16_autocast_backbone_matches_fp32(device):
    """ViT-S/16 at 224 px: bf16 autocast features within 3 % (relative norm) and 0.995 cosine of fp32."""
    bb = _backbone(device)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        ref = bb.forward_features(x)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = bb.forward_features(x)
    for key in ("x_norm_clstoken", "x_norm_patchtokens"):
        a, b = out[key].float(), ref[key]
        assert a.shape == b.shape and torch.isfinite(a).all(), key
        assert out[key].dtype in (torch.bfloat16, torch.float32), key
        err = rel_err(a, b)
        cos = torch.nn.functional.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).min().item()
        assert err < 0.03, f"{key}: bf16 autocast is {err:.4f} (relative) off fp32"
        assert cos > 0.995, f"{key}: worst cosine similarity {cos:.4f}"
        assert err > 0, f"{key}: autocast changed nothing (bf16 not applied?)"


def test_bf16_params_step_on_device(device):
    """``cast_call`` (the ``bf16-params`` forward) on the GPU: equal to a module with bf16 parameter copies,
    fp32 gradients on the fp32 master weights, and an optimiser step that changes them."""
    from dinov3geo.models import build_backbone
    from dinov3geo.ssl.heads import DINOHead
    from dinov3geo.ssl.precision import cast_call

    torch.manual_seed(0)
    bb = build_backbone("vit_tiny_test", in_chans=3).to(device).train()
    head = DINOHead(in_dim=bb.embed_dim, out_dim=64, hidden_dim=32, bottleneck_dim=16).to(device)
    x = [torch.randn(2, 3, 32, 32, device=device), torch.randn(4, 3, 16, 16, device=device)]
    masks = [torch.rand(2, 4, device=device) < 0.3, None]

    ref_bb, ref_head = copy.deepcopy(bb), copy.deepcopy(head)
    for p in list(ref_bb.parameters()) + list(ref_head.parameters()):
        p.data = p.data.to(torch.bfloat16)
    torch.manual_seed(1)
    ref = ref_bb([t.to(torch.bfloat16) for t in x], masks=masks, is_training=True)
    ref_logits = ref_head(ref[0]["x_norm_clstoken"])
    (ref_logits.float().square().sum() + ref[1]["x_norm_clstoken"].float().sum()).backward()

    torch.manual_seed(1)
    out = cast_call(bb, torch.bfloat16, x, masks=masks, is_training=True)
    logits = cast_call(head, torch.bfloat16, out[0]["x_norm_clstoken"])
    assert logits.dtype == torch.bfloat16 and logits.device.type == device.type
    # the same bf16 kernels on the same inputs; GPU reductions may differ in the last bit
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=1e-2, atol=1e-2)
    (logits.float().square().sum() + out[1]["x_norm_clstoken"].float().sum()).backward()

    ref_params = dict(ref_bb.named_parameters()) | {f"h.{k}": v for k, v in ref_head.named_parameters()}
    n_grads = 0
    for name, p in list(bb.named_parameters()) + [(f"h.{k}", v) for k, v in head.named_parameters()]:
        assert p.dtype == torch.float32, name  # fp32 master weights, untouched by the casts
        r = ref_params[name]
        if r.grad is None or not r.grad.any():
            continue
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert rel_err(p.grad, r.grad.float()) < 0.05, name
        n_grads += 1
    assert n_grads > 10
    before = [p.detach().clone() for p in bb.parameters()]
    torch.optim.AdamW(list(bb.parameters()) + list(head.parameters()), lr=1e-3, fused=device.type == "cuda").step()
    assert any(not torch.equal(b, p) for b, p in zip(before, bb.parameters(), strict=True))
    assert all(p.dtype == torch.float32 for p in bb.parameters())
