"""Tests of the optimizer parameter groups (layer-wise decay, weight-decay exclusions, last layer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dinov3geo.models import build_backbone
from dinov3geo.ssl.heads import DINOHead
from dinov3geo.ssl.param_groups import (
    apply_optim_scheduler,
    build_optimizer,
    clip_grad_norm_per_module,
    get_params_groups,
    get_params_groups_with_decay,
    get_vit_lr_decay_rate,
)

DEPTH = 3
DECAY = 0.9


def _parts() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "backbone": build_backbone("vit_tiny_test", depth=DEPTH),
        "dino_head": DINOHead(64, 32, hidden_dim=16, bottleneck_dim=8),
        "ibot_head": DINOHead(64, 24, hidden_dim=16, bottleneck_dim=8),
    }


def _expected_lr_mult(name: str) -> float:
    if name.startswith("patch_embed"):
        return 0.2 * DECAY ** (DEPTH + 1)
    if name in ("cls_token", "storage_tokens", "mask_token"):
        return DECAY ** (DEPTH + 1)
    if name.startswith("blocks."):
        i = int(name.split(".")[1])
        return DECAY ** (DEPTH - i)
    return 1.0  # norm, local_cls_norm, heads


def _expected_wd_mult(name: str) -> float:
    if name.endswith("bias") or "norm" in name or "gamma" in name:
        return 0.0
    return 1.0


def test_per_parameter_multipliers_of_a_tiny_vit() -> None:
    parts = _parts()
    groups = get_params_groups_with_decay(parts["backbone"], lr_decay_rate=DECAY, patch_embed_lr_mult=0.2)
    names = [g["name"] for g in groups]
    assert names == [n for n, _ in parts["backbone"].named_parameters()]
    assert "rope_embed.periods" not in names and not any("bias_mask" in n for n in names)  # buffers
    by_name = {g["name"]: g for g in groups}
    for name, g in by_name.items():
        assert g["lr_multiplier"] == pytest.approx(_expected_lr_mult(name)), name
        assert g["wd_multiplier"] == _expected_wd_mult(name), name
        assert g["is_last_layer"] is False
    # spot checks against the spec wording
    assert by_name["patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.2 * 0.9**4)
    assert by_name["blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.9**3)
    assert by_name["blocks.2.mlp.fc2.weight"]["lr_multiplier"] == pytest.approx(0.9)
    assert by_name["norm.weight"]["lr_multiplier"] == 1.0
    for tok in ("cls_token", "storage_tokens", "mask_token"):
        assert by_name[tok]["wd_multiplier"] == 1.0  # tokens ARE weight-decayed
    for n in ("blocks.1.ls1.gamma", "blocks.1.norm2.weight", "blocks.1.attn.qkv.bias", "norm.bias"):
        assert by_name[n]["wd_multiplier"] == 0.0
    for head in ("dino_head", "ibot_head"):
        hg = {g["name"]: g for g in get_params_groups_with_decay(parts[head], lr_decay_rate=DECAY)}
        assert all(g["lr_multiplier"] == 1.0 for g in hg.values())
        assert [n for n, g in hg.items() if g["is_last_layer"]] == ["last_layer.weight"]
        assert hg["last_layer.weight"]["wd_multiplier"] == 1.0 and hg["mlp.0.bias"]["wd_multiplier"] == 0.0


def test_untied_local_cls_norm_is_top_layer_without_wd() -> None:
    bb = build_backbone("vit_tiny_7b_test")
    g = {d["name"]: d for d in get_params_groups_with_decay(bb, lr_decay_rate=0.98)}
    assert (
        g["local_cls_norm.weight"]["lr_multiplier"] == 1.0
        and g["local_cls_norm.weight"]["wd_multiplier"] == 0.0
    )


def test_official_decay_rate_with_prefixed_names() -> None:
    d, depth = 0.9, 12
    assert get_vit_lr_decay_rate("backbone.cls_token", d, depth) == pytest.approx(d**13)
    assert get_vit_lr_decay_rate("backbone.patch_embed.proj.weight", d, depth) == pytest.approx(d**13)
    assert get_vit_lr_decay_rate("backbone.blocks.2.attn.qkv.weight", d, depth) == pytest.approx(d**10)
    assert get_vit_lr_decay_rate("backbone.blocks.11.ls2.gamma", d, depth) == pytest.approx(d)
    assert get_vit_lr_decay_rate("backbone.norm.weight", d, depth) == 1.0
    assert get_vit_lr_decay_rate("dino_head.mlp.0.weight", d, depth) == 1.0
    # FSDP chunked blocks: blocks.<chunk>.<i>
    assert get_vit_lr_decay_rate(
        "blocks.0.5.mlp.fc1.weight", d, depth, True, chunked_blocks=True
    ) == pytest.approx(d**7)
    # wrapper prefixes are stripped before matching
    bb = build_backbone("vit_tiny_test")
    compiled = torch.compile(bb)  # only wraps; adds the _orig_mod. prefix to the names
    assert all("_orig_mod" not in g["name"] for g in get_params_groups_with_decay(compiled, 0.9))


def test_fused_groups_cover_every_parameter_once() -> None:
    parts = _parts()
    groups = get_params_groups(parts, layerwise_decay=DECAY, patch_embed_lr_mult=0.2)
    seen = [id(p) for g in groups for p in g["params"]]
    all_params = [id(p) for m in parts.values() for p in m.parameters()]
    assert sorted(seen) == sorted(all_params) and len(seen) == len(set(seen))
    for part in parts:
        keys = [
            (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups if g["part"] == part
        ]
        assert len(keys) == len(set(keys))
    # backbone: tokens, patch_embed w, patch_embed b, 2 per block, final norm
    assert sum(g["part"] == "backbone" for g in groups) == 3 + 2 * DEPTH + 1
    assert all(g["foreach"] is True for g in groups)
    last = [g for g in groups if g["is_last_layer"]]
    assert len(last) == 2 and all(g["names"] == ["last_layer.weight"] for g in last)
    whd = get_params_groups(parts, dino_head_wd_multiplier=0.5)
    assert {g["wd_multiplier"] for g in whd if g["part"] == "dino_head"} == {0.5, 0.0}
    assert {g["wd_multiplier"] for g in whd if g["part"] == "ibot_head"} == {1.0, 0.0}
    unfused = get_params_groups(parts, fuse=False)
    assert len(unfused) == sum(1 for m in parts.values() for _ in m.parameters())


def test_optimizer_step_applies_the_multipliers() -> None:
    parts = _parts()
    opt = build_optimizer(parts, betas=(0.9, 0.99), layerwise_decay=DECAY, patch_embed_lr_mult=0.2)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.99)
    lr, wd = 0.01, 0.05
    apply_optim_scheduler(opt, lr=lr, wd=wd, last_layer_lr=0.0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.0 if g["is_last_layer"] else lr * g["lr_multiplier"])
        assert g["weight_decay"] == pytest.approx(wd * g["wd_multiplier"])
    named = {f"{k}.{n}": p for k, m in parts.items() for n, p in m.named_parameters()}
    before = {n: p.detach().clone() for n, p in named.items()}
    for p in named.values():
        p.grad = torch.ones_like(p)
    opt.step()
    # AdamW first step with a constant gradient: p <- p * (1 - lr_g * wd_g) - lr_g (Adam update = lr_g)
    for n, p in named.items():
        short = n.split(".", 1)[1]
        if n.startswith("backbone."):
            lr_g, wd_g = lr * _expected_lr_mult(short), wd * _expected_wd_mult(short)
        elif short == "last_layer.weight":
            lr_g, wd_g = 0.0, wd
        else:
            lr_g, wd_g = lr, wd * _expected_wd_mult(short)
        expected = before[n] * (1 - lr_g * wd_g) - lr_g
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6, msg=n)


def test_clip_grad_norm_per_module() -> None:
    parts = _parts()
    for name, m in parts.items():
        scale = 100.0 if name == "backbone" else 1e-3
        for p in m.parameters():
            p.grad = torch.full_like(p, scale)
    pre = {k: float(torch.cat([p.grad.flatten() for p in m.parameters()]).norm()) for k, m in parts.items()}
    norms = clip_grad_norm_per_module(parts, max_norm=3.0)
    assert set(norms) == {"backbone_grad_norm", "dino_head_grad_norm", "ibot_head_grad_norm"}
    for k, m in parts.items():
        assert norms[f"{k}_grad_norm"] == pytest.approx(pre[k], rel=1e-5)
        post = float(torch.cat([p.grad.flatten() for p in m.parameters()]).norm())
        assert post == pytest.approx(min(pre[k], 3.0), rel=1e-4)  # each module clipped on its own
    none = clip_grad_norm_per_module(parts, max_norm=None)
    assert none["dino_head_grad_norm"] == pytest.approx(pre["dino_head"], rel=1e-5)


@pytest.mark.parametrize("scale", [1e-4, 10.0])
def test_clip_grad_norm_per_module_equals_torch_bitwise(scale: float) -> None:
    """Below the limit nothing is touched, above it the gradients are torch's ``clip_grad_norm_`` exactly."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(50, 40), torch.nn.Linear(50, 40)
    b.load_state_dict(a.state_dict())
    (a(torch.randn(8, 50)).pow(2).sum() * scale).backward()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        pb.grad = pa.grad.clone()
    norms = clip_grad_norm_per_module({"backbone": a}, max_norm=3.0)
    ref = torch.nn.utils.clip_grad_norm_(b.parameters(), 3.0)
    assert norms["backbone_grad_norm"] == float(ref)
    assert (norms["backbone_grad_norm"] > 3.0) == (scale > 1)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad)
