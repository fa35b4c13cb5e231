"""Mixed precision of the pretraining engine: ``bf16-params`` (the official recipe's bf16 parameter copies)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dinov3geo.models import build_backbone
from dinov3geo.ssl.heads import DINOHead
from dinov3geo.ssl.precision import PRECISIONS, cast_call, lightning_precision, param_dtype


def test_cast_call_equals_a_bf16_copy_and_returns_fp32_gradients():
    torch.manual_seed(0)
    bb = build_backbone("vit_tiny_test", in_chans=3).train()
    head = DINOHead(in_dim=bb.embed_dim, out_dim=64, hidden_dim=32, bottleneck_dim=16)
    x = [torch.randn(2, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    masks = [torch.rand(2, 4) < 0.3, None]

    # reference: the same module with bf16 parameters and fp32 buffers (what FSDP2 all-gathers with
    # param_dtype=bf16: buffers such as the RoPE periods are not cast)
    ref_bb, ref_head = copy.deepcopy(bb), copy.deepcopy(head)
    for p in list(ref_bb.parameters()) + list(ref_head.parameters()):
        p.data = p.data.to(torch.bfloat16)
    torch.manual_seed(1)
    ref = ref_bb([t.to(torch.bfloat16) for t in x], masks=masks, is_training=True)
    ref_logits = ref_head(ref[0]["x_norm_clstoken"])
    (ref_logits.float().square().sum() + ref[1]["x_norm_clstoken"].float().sum()).backward()

    torch.manual_seed(1)  # same RoPE jitter / drop-path draws
    out = cast_call(bb, torch.bfloat16, x, masks=masks, is_training=True)
    logits = cast_call(head, torch.bfloat16, out[0]["x_norm_clstoken"])
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, ref_logits)
    (logits.float().square().sum() + out[1]["x_norm_clstoken"].float().sum()).backward()

    ref_params = dict(ref_bb.named_parameters()) | {f"h.{k}": v for k, v in ref_head.named_parameters()}
    for name, p in list(bb.named_parameters()) + [(f"h.{k}", v) for k, v in head.named_parameters()]:
        assert p.dtype == torch.float32  # the module itself is untouched: fp32 master weights
        r = ref_params[name]
        if r.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.equal(p.grad, r.grad.float()), name  # the bf16 gradient, handed over as fp32



def test_precision_names():
    assert lightning_precision("bf16-params") == "32-true"  # it casts by itself, no autocast on top
    assert lightning_precision("bf16-mixed") == "bf16-mixed" and lightning_precision("32-true") == "32-true"
    assert param_dtype("bf16-params") == torch.bfloat16 and param_dtype("bf16-mixed") is None
    with pytest.raises(ValueError, match="bf16-params"):
        lightning_precision("bf16")
    assert "auto" in PRECISIONS


def test_cast_call_leaves_integer_inputs_and_buffers():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)
            self.register_buffer("scale", torch.tensor([2.0]))

        def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            assert idx.dtype == torch.long and self.scale.dtype == torch.float32
            y = self.lin(x[idx])
            assert y.dtype == torch.bfloat16
            return y * self.scale  # promoted by the fp32 buffer, as under FSDP2

    m = M()
    y = cast_call(m, torch.bfloat16, torch.randn(3, 4), torch.tensor([0, 2]))
    assert y.shape == (2, 2) and m.lin.weight.dtype == torch.float32
