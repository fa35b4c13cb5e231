"""Forward API: outputs, crop-set lists, masking, RoPE jittering, drop-path, untied norms, padding."""

from __future__ import annotations

import pytest
import torch

from dinov3geo.models import CenterPadding, build_backbone, pad_to_patch_multiple
from dinov3geo.models.layers import SelfAttentionBlock

from .conftest import random_backbone


def test_forward_features_dict(tiny) -> None:
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        out = tiny.forward_features(x)
    assert set(out) == {"x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    assert out["x_norm_clstoken"].shape == (2, 64)
    assert out["x_storage_tokens"].shape == (2, 4, 64)
    assert out["x_norm_patchtokens"].shape == (2, 12, 64)
    assert out["x_prenorm"].shape == (2, 17, 64)
    assert out["masks"] is None
    normed = tiny.norm(out["x_prenorm"])
    torch.testing.assert_close(out["x_storage_tokens"], normed[:, 1:5])  # storage tokens are normed
    with torch.no_grad():
        torch.testing.assert_close(tiny(x), out["x_norm_clstoken"])
        assert tiny(x, is_training=True).keys() == out.keys()


def test_non_multiple_input_is_floored(tiny) -> None:
    x = torch.randn(1, 3, 70, 50)
    with torch.no_grad():
        a = tiny.forward_features(x)["x_norm_patchtokens"]
        b = tiny.forward_features(x[:, :, :64, :48])["x_norm_patchtokens"]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_list_forward_matches_separate_calls(tiny) -> None:
    xg, xl = torch.randn(2, 3, 64, 64), torch.randn(3, 3, 32, 48)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, ::3] = True
    with torch.no_grad():
        both = tiny.forward_features([xg, xl], [masks, None])
        g = tiny.forward_features(xg, masks)
        loc = tiny.forward_features(xl)
    assert isinstance(both, list) and len(both) == 2
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        torch.testing.assert_close(both[0][key], g[key], atol=1e-6, rtol=0)
        torch.testing.assert_close(both[1][key], loc[key], atol=1e-6, rtol=0)
    assert both[0]["masks"] is masks and both[1]["masks"] is None


def test_list_forward_with_drop_path_concatenates_crop_sets() -> None:
    """Training path with drop-path: norms/MLP run once on the concatenated tokens of all crop sets."""
    model = random_backbone("vit_tiny_test", drop_path_rate=0.5, rope_rescale_coords=None).train()
    calls = []
    model.blocks[0].norm2.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    out = model.forward_features([torch.randn(4, 3, 32, 32), torch.randn(2, 3, 16, 32)], [None, None])
    # subset sizes: max(int(4*0.5),1)=2 and max(int(2*0.5),1)=1 samples; tokens 2*(5+4) + 1*(5+2) = 25
    assert calls == [torch.Size([25, 64])]
    assert out[0]["x_prenorm"].shape == (4, 9, 64) and out[1]["x_prenorm"].shape == (2, 7, 64)


def test_list_forward_without_drop_path_concatenates_crop_sets() -> None:
    """As the official block: with several crop sets, norms / linears / MLP run once on all their tokens."""
    model = random_backbone("vit_tiny_test", rope_rescale_coords=None).train()
    calls = []
    model.blocks[0].norm2.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    model.forward_features([torch.randn(4, 3, 32, 32), torch.randn(2, 3, 16, 32)], [None, None])
    assert calls == [torch.Size([4 * 9 + 2 * 7, 64])]


def test_masks_replace_exactly_the_masked_patch_embeddings(tiny) -> None:
    x = torch.randn(2, 3, 32, 48)
    masks = torch.zeros(2, 6, dtype=torch.bool)
    masks[0, [1, 4]] = True
    masks[1, 0] = True
    seen = []
    tiny.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0][0].detach().clone()))
    with torch.no_grad():
        out = tiny.forward_features(x, masks)
        tiny.forward_features(x)
    masked_in, plain_in = seen
    patches, plain_patches = masked_in[:, 5:], plain_in[:, 5:]
    mask_token = tiny.mask_token[0]
    for b in range(2):
        for n in range(6):
            expected = mask_token if masks[b, n] else plain_patches[b, n]
            assert torch.equal(patches[b, n], expected)
    assert torch.equal(masked_in[:, :5], plain_in[:, :5])  # cls and storage untouched
    assert out["masks"] is masks
    with pytest.raises(ValueError, match="masks must have shape"):
        tiny.forward_features(x, torch.zeros(2, 5, dtype=torch.bool))


def test_mask_token_gets_gradient_without_masks() -> None:
    model = build_backbone("vit_tiny_test").train()
    model.forward_features(torch.randn(1, 3, 32, 32))["x_norm_clstoken"].sum().backward()
    assert model.mask_token.grad is not None  # cls_token + 0 * mask_token keeps it in the graph


def test_rope_jitter_only_in_training(tiny) -> None:
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = tiny.forward_features(x)["x_norm_patchtokens"]
        b = tiny.forward_features(x)["x_norm_patchtokens"]
        assert torch.equal(a, b)
        tiny.train()
        c = tiny.forward_features(x)["x_norm_patchtokens"]
        d = tiny.forward_features(x)["x_norm_patchtokens"]
        tiny.eval()
        e = tiny.forward_features(x)["x_norm_patchtokens"]
    assert not torch.allclose(c, d) and not torch.allclose(a, c)
    assert torch.equal(a, e)
    no_aug = random_backbone("vit_tiny_test", rope_rescale_coords=None).train()
    with torch.no_grad():
        assert torch.equal(no_aug.forward_features(x)["x_prenorm"], no_aug.forward_features(x)["x_prenorm"])


@pytest.mark.parametrize("depth", [2, 3])
def test_rope_drawn_per_block_in_training(depth: int) -> None:
    model = random_backbone("vit_tiny_test", depth=depth).train()
    tables = []
    model.rope_embed.register_forward_hook(lambda m, i, o: tables.append(o[1]))
    with torch.no_grad():
        model.forward_features([torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)], [None, None])
    assert len(tables) == 2 * depth  # one draw per block and crop set
    assert all(not torch.equal(tables[i], tables[j]) for i in range(len(tables)) for j in range(i))
    tables.clear()
    model.eval()
    with torch.no_grad():
        model.forward_features(torch.randn(1, 3, 32, 32))
    assert len(tables) == depth and all(torch.equal(t, tables[0]) for t in tables)


def test_rope_box_jitter_options_train_only() -> None:
    for opt in ({"rope_shift_coords": 0.1}, {"rope_jitter_coords": 1.5}, {"rope_rescale_coords": 2.0}):
        model = build_backbone("vit_tiny_test", **{"rope_rescale_coords": None, **opt})
        rope = model.rope_embed
        rope.eval()
        ref = rope(H=3, W=4)
        rope.train()
        s1, _ = rope(H=3, W=4)
        s2, _ = rope(H=3, W=4)
        assert not torch.equal(s1, s2) and not torch.equal(s1, ref[0]), opt


def test_rope_layout_y_then_x() -> None:
    model = build_backbone("vit_tiny_test").eval()
    sin, cos = model.rope_embed(H=2, W=3)
    periods = model.rope_embed.periods
    assert sin.shape == (6, 32)
    # token (row 1, col 2): y = 2*(1.5/2)-1 = 0.5, x = 2*(2.5/3)-1
    y, x = 0.5, 2 * (2.5 / 3) - 1
    expected = torch.cat([2 * torch.pi * y / periods, 2 * torch.pi * x / periods]).repeat(2)
    torch.testing.assert_close(sin[5], torch.sin(expected))
    torch.testing.assert_close(cos[5], torch.cos(expected))


def test_drop_path_is_batch_subset() -> None:
    torch.manual_seed(0)
    blk = SelfAttentionBlock(dim=32, num_heads=2, init_values=1.0, drop_path=0.5).train()
    x = torch.randn(8, 5, 32)
    torch.manual_seed(123)
    out = blk(x)
    torch.manual_seed(123)
    idx1, idx2 = torch.randperm(8)[:4], torch.randperm(8)[:4]
    touched = set(idx1.tolist()) | set(idx2.tolist())
    for b in range(8):
        assert torch.equal(out[b], x[b]) == (b not in touched)
    # the attention residual of a kept sample is scaled by B / subset = 2
    only_attn = [b for b in idx1.tolist() if b not in set(idx2.tolist())]
    for b in only_attn:
        res = blk.ls1(blk.attn(blk.norm1(x[b : b + 1])))
        torch.testing.assert_close(out[b], x[b] + 2 * res[0], atol=1e-6, rtol=0)
    blk.eval()
    torch.testing.assert_close(blk(x), blk._forward_plain(x, None))


def test_local_cls_norm_only_for_second_crop_set_in_training() -> None:
    model = random_backbone("vit_tiny_7b_test", rope_rescale_coords=None)
    xs = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    with torch.no_grad():
        model.train()
        out = model.forward_features(xs, [None, None])
        for i, norm in ((0, model.norm), (1, model.local_cls_norm)):
            torch.testing.assert_close(out[i]["x_norm_clstoken"], norm(out[i]["x_prenorm"][:, 0]))
            torch.testing.assert_close(out[i]["x_norm_patchtokens"], model.norm(out[i]["x_prenorm"][:, 5:]))
        model.eval()
        out = model.forward_features(xs, [None, None])
        torch.testing.assert_close(out[1]["x_norm_clstoken"], model.norm(out[1]["x_prenorm"][:, 0]))


def test_untied_cls_norm() -> None:
    model = random_backbone("vit_tiny_test", untie_cls_and_patch_norms=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_features(x)
        torch.testing.assert_close(out["x_norm_clstoken"], model.cls_norm(out["x_prenorm"][:, 0]))
        torch.testing.assert_close(out["x_storage_tokens"], model.cls_norm(out["x_prenorm"][:, 1:5]))
        ((patch, cls, extra),) = model.get_intermediate_layers(
            x, n=1, return_class_token=True, return_extra_tokens=True
        )
    torch.testing.assert_close(cls, out["x_norm_clstoken"])
    torch.testing.assert_close(extra, out["x_storage_tokens"])
    torch.testing.assert_close(patch, out["x_norm_patchtokens"])


def test_intermediate_layers_shapes_and_selection() -> None:
    model = random_backbone("vit_tiny_test", depth=4)
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        last = model.get_intermediate_layers(x)
        two = model.get_intermediate_layers(x, n=2, norm=False)
        picked = model.get_intermediate_layers(x, n=[0, 2], reshape=True)
        full = model.get_intermediate_layers(x, n=[1, 3], return_class_token=True, return_extra_tokens=True)
        feats = model.forward_features(x)
    assert isinstance(last, tuple) and len(last) == 1 and last[0].shape == (2, 15, 64)
    torch.testing.assert_close(last[0], feats["x_norm_patchtokens"])
    assert len(two) == 2
    torch.testing.assert_close(two[1], feats["x_prenorm"][:, 5:])
    assert all(p.shape == (2, 64, 3, 5) for p in picked)
    torch.testing.assert_close(
        picked[1], model.get_intermediate_layers(x, n=[2])[0].transpose(1, 2).reshape(2, 64, 3, 5)
    )
    (p1, c1, e1), (p3, c3, e3) = full
    assert p1.shape == (2, 15, 64) and c1.shape == (2, 64) and e1.shape == (2, 4, 64)
    torch.testing.assert_close(c3, feats["x_norm_clstoken"])
    torch.testing.assert_close(e3, feats["x_storage_tokens"])
    with pytest.raises(ValueError):
        model.get_intermediate_layers(x, n=[4])
    with pytest.raises(ValueError):
        model.get_intermediate_layers(x, n=5)


def test_center_padding() -> None:
    x = torch.randn(1, 3, 37, 50)
    y = pad_to_patch_multiple(x)
    assert y.shape == (1, 3, 48, 64)
    # 11 rows: 5 top, 6 bottom; 14 columns: 7 left, 7 right (Meta's CenterPadding)
    assert torch.equal(y[:, :, 5:42, 7:57], x)
    assert y[:, :, :5].abs().sum() == 0 and y[:, :, 42:].abs().sum() == 0
    assert torch.equal(CenterPadding(16)(x), y)
    z = torch.randn(1, 3, 32, 48)
    assert pad_to_patch_multiple(z) is z


def test_intermediate_layers_pad_option(tiny) -> None:
    x = torch.randn(1, 3, 37, 50)
    with torch.no_grad():
        (padded,) = tiny.get_intermediate_layers(x, reshape=True, pad_to_multiple=True)
        (ref,) = tiny.get_intermediate_layers(pad_to_patch_multiple(x), reshape=True)
        (floored,) = tiny.get_intermediate_layers(x, reshape=True)
    assert padded.shape == (1, 64, 3, 4) and floored.shape == (1, 64, 2, 3)
    torch.testing.assert_close(padded, ref, atol=0, rtol=0)


def test_bf16_autocast_runs(tiny) -> None:
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny.forward_features(x)
    with torch.no_grad():
        ref = tiny.forward_features(x)
    assert torch.isfinite(out["x_norm_patchtokens"]).all()
    torch.testing.assert_close(out["x_norm_clstoken"].float(), ref["x_norm_clstoken"], atol=0.1, rtol=0.05)
    # the cached eval table built under inference_mode is not reused by autograd-enabled calls
    tiny.train()
    tiny.rope_embed.rescale_coords = None
    tiny.forward_features(x)["x_norm_clstoken"].sum().backward()


@pytest.mark.parametrize(
    ("dtype", "table_dtype"),
    [(torch.float32, "fp32"), (torch.bfloat16, "fp32"), (torch.float32, "bf16"), (torch.bfloat16, "bf16")],
)
def test_fast_rope_equals_reference_formula(dtype: torch.dtype, table_dtype: str) -> None:
    """Official apply_rope: cast q/k to the table dtype, x*cos + rotate_half(x)*sin, cast back."""
    from dinov3geo.models.layers.attention import apply_rope_prefix
    from dinov3geo.models.layers.rope import rope_apply

    rope = build_backbone("vit_tiny_test", rope_dtype=table_dtype).eval().rope_embed
    sin, cos = rope(H=3, W=4)
    x = torch.randn(2, 2, 3, 5 + 12, 32).to(dtype)
    xr = x.to(sin.dtype)
    ref = torch.cat([xr[..., :5, :], rope_apply(xr[..., 5:, :], sin, cos)], dim=-2).to(dtype)
    out = apply_rope_prefix(x, (sin, cos))
    assert out.dtype == dtype
    assert torch.equal(out, ref)
    assert torch.equal(out[..., :5, :], xr[..., :5, :].to(dtype))  # prefix only goes through the cast


@pytest.mark.parametrize(
    ("dtype", "table_dtype"),
    [(torch.float32, "fp32"), (torch.bfloat16, "fp32"), (torch.float32, "bf16"), (torch.bfloat16, "bf16")],
)
def test_rope_gradients_equal_reference_autograd(dtype: torch.dtype, table_dtype: str) -> None:
    """With autograd, RoPE's hand-written backward gives the very gradients autograd computes through the
    official formula (cast to the table dtype, x*cos + rotate_half(x)*sin, concatenation, cast back)."""
    from dinov3geo.models.layers.attention import apply_rope_prefix
    from dinov3geo.models.layers.rope import rope_apply

    rope = build_backbone("vit_tiny_test", rope_dtype=table_dtype).train().rope_embed
    sin, cos = rope(H=3, W=4)
    x0 = torch.randn(2, 2, 3, 5 + 12, 32).to(dtype)
    g = torch.randn(x0.shape).to(dtype)
    x_ref = x0.clone().requires_grad_(True)
    xr = x_ref.to(sin.dtype)
    ref = torch.cat([xr[..., :5, :], rope_apply(xr[..., 5:, :], sin, cos)], dim=-2).to(dtype)
    ref.backward(g)
    x = x0.clone().requires_grad_(True)
    out = apply_rope_prefix(x * 1, (sin, cos))  # a non-leaf input, as q/k are in attention
    assert out.grad_fn is not None and "RopePrefix" in type(out.grad_fn).__name__
    out.backward(g)
    assert torch.equal(out.detach(), ref.detach())
    assert x.grad is not None and x.grad.dtype == dtype
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("arch", ["vit_tiny_test", "vit_tiny_swiglu_test"])
@pytest.mark.parametrize("bf16", [False, True])
def test_no_grad_fast_path_is_exact(arch: str, bf16: bool) -> None:
    """In-place LayerScale / SwiGLU shortcuts used without autograd give the very same numbers."""
    import contextlib

    model = random_backbone(arch)
    x = torch.randn(2, 3, 48, 64)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        with_grad = model.forward_features(x)["x_prenorm"].detach()
        with torch.inference_mode():
            fast = model.forward_features(x)["x_prenorm"]
    assert torch.equal(fast, with_grad)


def test_flat_crop_sets_equal_per_block_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """Crop sets kept concatenated across blocks give the very floats (outputs and gradients) of splitting
    and re-concatenating them around every block, RoPE jittering included."""
    from dinov3geo.models.layers.block import SelfAttentionBlock

    model = random_backbone("vit_tiny_test").train()
    g, loc = torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)

    def run() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        outs = model.forward_features([g, loc], [None, None])
        loss = sum(o["x_norm_patchtokens"].square().sum() + o["x_norm_clstoken"].sum() for o in outs)
        loss.backward()
        return ([o["x_norm_patchtokens"].detach() for o in outs],
                [p.grad.clone() for p in model.parameters() if p.grad is not None])

    calls = {"flat": 0}
    original = SelfAttentionBlock.forward_flat

    def counted(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls["flat"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(SelfAttentionBlock, "forward_flat", counted)
    flat_out, flat_grads = run()
    n_flat = calls["flat"]
    monkeypatch.setattr(SelfAttentionBlock, "flat_capable", property(lambda self: False))
    list_out, list_grads = run()
    assert n_flat == len(model.blocks)  # the flat path ran, once per block
    assert all(torch.equal(a, b) for a, b in zip(flat_out, list_out, strict=True))
    assert len(flat_grads) == len(list_grads) > 0
    assert all(torch.equal(a, b) for a, b in zip(flat_grads, list_grads, strict=True))
