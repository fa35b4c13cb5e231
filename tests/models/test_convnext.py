"""DINOv3 ConvNeXt backbones: parity with timm's ConvNeXt (same weights through timm's own DINOv3 checkpoint
filter), Meta's key layout for the four released sizes, the forward / get_intermediate_layers API, loading
(Meta, timm, dinov3geo formats; strictness), multispectral widening and the eval fast paths."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from dinov3geo.models import (
    CONVNEXT_ARCHS,
    RELEASED_CONVNEXT_ARCHS,
    BackboneMetadata,
    CheckpointError,
    ConvNeXt,
    ConvNeXtConfig,
    build_backbone,
    export_meta,
    get_config,
    infer_config,
    list_archs,
    load_backbone,
    save_backbone,
    widen_patch_embed,
)
from dinov3geo.models import convnext as convnext_mod
from dinov3geo.models.registry import arch_name, config_from_dict

timm_convnext = pytest.importorskip("timm.models.convnext")

# Meta's ``convnext_sizes`` (dinov3/models/convnext.py), written out independently of the package
META_SIZES = {
    "convnext_tiny": ([3, 3, 9, 3], [96, 192, 384, 768]),
    "convnext_small": ([3, 3, 27, 3], [96, 192, 384, 768]),
    "convnext_base": ([3, 3, 27, 3], [128, 256, 512, 1024]),
    "convnext_large": ([3, 3, 27, 3], [192, 384, 768, 1536]),
}
SIZES = [(64, 64), (96, 160), (100, 75), (45, 70)]  # incl. sides that are not multiples of 32


def meta_layout(depths, dims, in_chans: int = 3, gamma: bool = True) -> dict[str, tuple[int, ...]]:
    """Key -> shape of Meta's ``ConvNeXt.state_dict()``, in its order (module registration order)."""
    keys: dict[str, tuple[int, ...]] = {
        "downsample_layers.0.0.weight": (dims[0], in_chans, 4, 4),
        "downsample_layers.0.0.bias": (dims[0],),
        "downsample_layers.0.1.weight": (dims[0],),
        "downsample_layers.0.1.bias": (dims[0],),
    }
    for i in range(1, 4):
        keys[f"downsample_layers.{i}.0.weight"] = (dims[i - 1],)
        keys[f"downsample_layers.{i}.0.bias"] = (dims[i - 1],)
        keys[f"downsample_layers.{i}.1.weight"] = (dims[i], dims[i - 1], 2, 2)
        keys[f"downsample_layers.{i}.1.bias"] = (dims[i],)
    for i in range(4):
        d = dims[i]
        for j in range(depths[i]):
            p = f"stages.{i}.{j}."
            if gamma:
                keys[p + "gamma"] = (d,)
            keys.update(
                {
                    p + "dwconv.weight": (d, 1, 7, 7),
                    p + "dwconv.bias": (d,),
                    p + "norm.weight": (d,),
                    p + "norm.bias": (d,),
                    p + "pwconv1.weight": (4 * d, d),
                    p + "pwconv1.bias": (4 * d,),
                    p + "pwconv2.weight": (d, 4 * d),
                    p + "pwconv2.bias": (d,),
                }
            )
    for name in ("norm", "norms.3"):
        keys[f"{name}.weight"] = (dims[-1],)
        keys[f"{name}.bias"] = (dims[-1],)
    return keys


def random_meta_state_dict(depths, dims, seed: int = 0, in_chans: int = 3) -> dict[str, torch.Tensor]:
    """A Meta-layout state dict with random weights where the blocks matter (layer scale 0.1-1, not 1e-6)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for k, shape in meta_layout(depths, dims, in_chans).items():
        if k.startswith("norms.3."):
            continue
        if k.endswith("gamma"):
            sd[k] = torch.rand(shape, generator=g) * 0.9 + 0.1
        elif k.endswith("weight") and len(shape) == 1:  # LayerNorm scales
            sd[k] = 1 + 0.2 * torch.randn(shape, generator=g)
        elif k.endswith("bias"):
            sd[k] = 0.05 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
            sd[k] = torch.randn(shape, generator=g) / fan_in**0.5
    sd["norms.3.weight"], sd["norms.3.bias"] = sd["norm.weight"], sd["norm.bias"]
    return sd


def timm_twin(sd: dict[str, torch.Tensor], depths, dims, in_chans: int = 3, gamma: bool = True):
    """timm's ConvNeXt loaded from the Meta-layout ``sd`` through timm's own ``checkpoint_filter_fn``."""
    model = timm_convnext.ConvNeXt(
        in_chans=in_chans,
        depths=tuple(depths),
        dims=tuple(dims),
        num_classes=0,
        ls_init_value=1e-6 if gamma else None,
    )
    model.load_state_dict(timm_convnext.checkpoint_filter_fn(dict(sd), model), strict=True)
    return model.eval()


def timm_reference(tm, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What Meta's forward_features gives, computed from timm's modules."""
    f = tm.forward_features(x)
    norm = tm.head.norm
    tokens = f.flatten(2).transpose(1, 2)
    return {
        "x_norm_clstoken": tm.forward_head(f, pre_logits=True),
        "x_norm_patchtokens": F.layer_norm(tokens, (f.shape[1],), norm.weight, norm.bias, norm.eps),
        "x_prenorm": tokens,
    }


@pytest.fixture(scope="module")
def tiny_pair():
    """(our convnext_tiny_test loaded from a random Meta-layout dict, timm's twin, the dict)."""
    depths, dims = [1, 1, 2, 1], [16, 32, 64, 128]
    sd = random_meta_state_dict(depths, dims)
    ours = load_backbone(sd)
    return ours, timm_twin(sd, depths, dims), sd


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 2e-5) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=1e-5)


# ------------------------------------------------------------------ parity with timm
@pytest.mark.parametrize("size", SIZES)
def test_forward_features_match_timm(tiny_pair, size) -> None:
    ours, tm, _ = tiny_pair
    assert ours.arch_name == "convnext_tiny_test" and not ours.training
    x = torch.randn(2, 3, *size)
    with torch.inference_mode():
        ref = timm_reference(tm, x)
        fast = ours.forward_features(x)  # eval + no autograd: channels-last, fused oneDNN linears
        cls = ours(x)
    with torch.no_grad():
        ours.train()  # Meta's exact operation sequence (drop path 0)
        try:
            exact = ours.forward_features(x)
        finally:
            ours.eval()
    for out in (fast, exact):
        for k, v in ref.items():
            close(out[k], v)
        assert out["x_storage_tokens"].shape == (2, 0, 128)
        assert out["masks"] is None
    assert ref["x_prenorm"].shape[1] == (size[0] // 32) * (size[1] // 32)  # native stride 32, no resize
    close(cls, ref["x_norm_clstoken"])


def test_forward_with_autograd_matches_timm(tiny_pair) -> None:
    """Eval with gradients on (e.g. fine-tuning a head through the backbone) runs Meta's path; grads flow."""
    ours, tm, _ = tiny_pair
    model = copy.deepcopy(ours)
    x = torch.randn(2, 3, 64, 96)
    out = model.forward_features(x)
    with torch.no_grad():
        ref = timm_reference(tm, x)
    close(out["x_norm_patchtokens"], ref["x_norm_patchtokens"])
    (out["x_norm_patchtokens"].square().mean() + out["x_norm_clstoken"].sum()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


@pytest.mark.parametrize("size", [(64, 64), (100, 75)])
def test_intermediate_layers_match_timm(tiny_pair, size) -> None:
    ours, tm, _ = tiny_pair
    model = copy.deepcopy(ours)
    H, W = size
    x = torch.randn(2, 3, H, W)
    with torch.inference_mode():
        stages = tm.forward_intermediates(x, indices=4, intermediates_only=True)  # raw NCHW maps
        final = tm.head.norm
        model.patch_size = None
        native = model.get_intermediate_layers(x, n=4, reshape=True, return_class_token=True, norm=False)
        normed = model.get_intermediate_layers(x, n=4, reshape=True, return_class_token=True)
        model.patch_size = 16
        grid = model.get_intermediate_layers(x, n=4, reshape=True, return_class_token=True)
        tokens = model.get_intermediate_layers(x, n=[1, 3])
    for i, ref in enumerate(stages):
        ref = ref.clone()  # a normal tensor (made under inference_mode above)
        assert ref.shape[-2:] == (H // 4 // 2**i, W // 4 // 2**i)
        close(native[i][0], ref)
        close(native[i][1], ref.mean((-2, -1)))
        resized = F.interpolate(ref, size=(H // 16, W // 16), mode="bilinear", antialias=True)
        if i < 3:  # Meta's norms[i] is Identity for stages 0-2
            close(normed[i][0], ref)
            close(grid[i][0], resized)
            close(grid[i][1], ref.mean((-2, -1)))
        else:  # the final LayerNorm, applied per token
            c = (ref.shape[1],)
            close(normed[i][0], F.layer_norm(ref.permute(0, 2, 3, 1), c, final.weight, final.bias, final.eps).permute(0, 3, 1, 2))
            close(grid[i][0], F.layer_norm(resized.permute(0, 2, 3, 1), c, final.weight, final.bias, final.eps).permute(0, 3, 1, 2))
            close(grid[i][1], F.layer_norm(ref.mean((-2, -1)), c, final.weight, final.bias, final.eps))
        assert grid[i][0].shape == (2, model.embed_dims[i], H // 16, W // 16)
    close(tokens[0], grid[1][0].flatten(2).transpose(1, 2))
    close(tokens[1], grid[3][0].flatten(2).transpose(1, 2))


def test_bf16_autocast_error_no_worse_than_timm(tiny_pair) -> None:
    """Under bf16 autocast the fast path keeps Meta's dtypes (fp32 residual stream) and timm's accuracy."""
    ours, tm, _ = tiny_pair
    model = copy.deepcopy(ours)
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        ref = model.forward_features(x)["x_norm_patchtokens"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model.forward_features(x)
            fast_stages = model.get_intermediate_layers(x, n=4, norm=False)
            timm_bf = timm_reference(tm, x)["x_norm_patchtokens"].float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()  # Meta's exact operation sequence under autocast
        exact = model.forward_features(x)
        exact_stages = model.get_intermediate_layers(x, n=4, norm=False)
        model.eval()
    assert fast["x_prenorm"].dtype == exact["x_prenorm"].dtype == torch.float32
    assert [t.dtype for t in fast_stages] == [t.dtype for t in exact_stages]
    ours_bf = fast["x_norm_patchtokens"].float()
    err_ours = (ours_bf - ref).abs().mean().item()
    err_timm = (timm_bf - ref).abs().mean().item()
    assert 0 < err_ours <= 1.25 * err_timm, (err_ours, err_timm)
    assert F.cosine_similarity(ours_bf.flatten(), ref.flatten(), dim=0) > 0.999


def test_eval_fast_paths_agree_and_cache_follows_weights(tiny_pair, monkeypatch) -> None:
    ours, _, sd = tiny_pair
    model = copy.deepcopy(ours)
    x = torch.randn(2, 3, 64, 80)
    with torch.inference_mode():
        ref = model.forward_features(x)["x_norm_patchtokens"]
        model.channels_last = False
        close(model.forward_features(x)["x_norm_patchtokens"], ref)
        model.channels_last = True
        monkeypatch.setattr(convnext_mod._MKLDNN, "enabled", False)  # plain ATen path
        close(model.forward_features(x)["x_norm_patchtokens"], ref)
        monkeypatch.undo()
    # the cached folded weights must follow in-place weight changes
    other = random_meta_state_dict([1, 1, 2, 1], [16, 32, 64, 128], seed=1)
    with torch.inference_mode():
        model.forward_features(x)
    model.load_state_dict(other)
    with torch.inference_mode():
        got = model.forward_features(x)["x_norm_patchtokens"]
        want = load_backbone(other).forward_features(x)["x_norm_patchtokens"]
    close(got, want)
    assert not torch.allclose(got, ref)
    model.clear_inference_cache()
    assert all(not blk._inference_cache for stage in model.stages for blk in stage)


def test_no_layer_scale_variant_matches_timm() -> None:
    depths, dims = [1, 1, 2, 1], [16, 32, 64, 128]
    sd = {k: v for k, v in random_meta_state_dict(depths, dims, seed=3).items() if not k.endswith("gamma")}
    model = load_backbone(sd)
    assert model.arch_name == "convnext_tiny_nols_test" and model.stages[0][0].gamma is None
    tm = timm_twin(sd, depths, dims, gamma=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        close(model.forward_features(x)["x_norm_patchtokens"], timm_reference(tm, x)["x_norm_patchtokens"])


# ------------------------------------------------------------------ forward API
def test_forward_api_lists_masks_and_training_dicts(tiny_pair) -> None:
    ours, _, _ = tiny_pair
    a, b = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 96, 64)
    masks = torch.zeros(2, 4, dtype=torch.bool)
    with torch.inference_mode():
        outs = ours.forward_features([a, b], [masks, None])
        assert isinstance(outs, list) and len(outs) == 2
        assert outs[0]["masks"] is masks and outs[1]["masks"] is None  # passed through, unused (as Meta)
        assert outs[1]["x_norm_patchtokens"].shape == (2, 6, 128)
        assert len(ours.forward_features([a, b])) == 2
        heads = ours([a, b])
        close(heads[1], ours(b))
        d = ours(a, is_training=True)
        assert set(d) == {"x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    with pytest.raises(TypeError, match="masks must be a list"):
        ours.forward_features([a], masks)


def test_intermediate_layers_options_and_errors(tiny_pair) -> None:
    ours, _, _ = tiny_pair
    x = torch.randn(2, 3, 70, 90)
    assert len(ours.blocks) == ours.n_blocks == 4 and ours.patch_size == 16
    with torch.inference_mode():
        last2 = ours.get_intermediate_layers(x, n=2, return_class_token=True, return_extra_tokens=True)
        assert [tuple(p.shape) for p, _, _ in last2] == [(2, 4 * 5, 64), (2, 4 * 5, 128)]
        assert [tuple(e.shape) for _, _, e in last2] == [(2, 0, 64), (2, 0, 128)]
        picked = ours.get_intermediate_layers(x, n=[3, 2], return_class_token=True)  # returned in stage order
        close(picked[0][0], last2[0][0])
        close(picked[1][1], last2[1][1])
        padded = ours.get_intermediate_layers(x, n=1, reshape=True, pad_to_multiple=True)
        assert padded[0].shape == (2, 128, 5, 6)  # 70x90 centre-padded to 80x96
    for bad in (0, 5, [4], [1, 1], []):
        with pytest.raises(ValueError):
            ours.get_intermediate_layers(x, n=bad)
    with pytest.raises(ValueError, match="at least 32x32"):
        ours.forward_features(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match="takes 3 input bands, got 4"):
        ours.forward_features(torch.randn(1, 4, 64, 64))


# ------------------------------------------------------------------ released sizes and the registry
@pytest.mark.parametrize("arch", RELEASED_CONVNEXT_ARCHS)
def test_released_sizes_key_layout_and_param_counts(arch: str) -> None:
    depths, dims = META_SIZES[arch]
    model = build_backbone(arch, device="meta")
    sd = model.state_dict()
    layout = meta_layout(depths, dims)
    assert list(sd) == list(layout)
    assert {k: tuple(v.shape) for k, v in sd.items()} == layout
    tm = getattr(timm_convnext, arch)(num_classes=0, device="meta")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tm.parameters())
    assert model.embed_dim == dims[-1] and model.embed_dims == dims and model.n_storage_tokens == 0
    assert infer_config(sd) == CONVNEXT_ARCHS[arch] == get_config(f"dinov3_{arch}")


@pytest.mark.parametrize("arch", RELEASED_CONVNEXT_ARCHS)
def test_released_zero_weights_load_and_run(arch: str) -> None:
    """Zero weights of the real shapes in Meta's layout load strictly, with the size inferred."""
    depths, dims = META_SIZES[arch]
    sd = {k: torch.zeros(s) for k, s in meta_layout(depths, dims).items()}
    model = load_backbone(sd)
    assert isinstance(model, ConvNeXt) and model.arch_name == arch
    assert model.config == ConvNeXtConfig(depths=tuple(depths), dims=tuple(dims))
    assert model.load_report.source_format == "meta" and not model.load_report.missing
    with torch.inference_mode():
        out = model.forward_features(torch.randn(1, 3, 32, 32))
    assert out["x_norm_patchtokens"].shape == (1, 1, dims[-1])
    del model, sd


def test_released_file_name_loads(tmp_path) -> None:
    depths, dims = META_SIZES["convnext_tiny"]
    sd = {k: torch.zeros(s) for k, s in meta_layout(depths, dims).items()}
    path = tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth"
    torch.save(sd, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = load_backbone(path)
    assert model.arch_name == "convnext_tiny" and model.patch_size == 16
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("arch", sorted(CONVNEXT_ARCHS))
def test_infer_config_roundtrip(arch: str) -> None:
    sd = build_backbone(arch, device="meta").state_dict()
    assert infer_config(sd) == CONVNEXT_ARCHS[arch]


def test_registry_and_config() -> None:
    assert set(RELEASED_CONVNEXT_ARCHS) <= set(list_archs(family="convnext")) <= set(list_archs())
    assert not set(list_archs(family="vit")) & set(list_archs(family="convnext"))
    assert list_archs(released_only=True, family="convnext") == list(RELEASED_CONVNEXT_ARCHS)
    cfg = get_config("convnext_small", patch_size=None, drop_path_rate=0.1)
    assert arch_name(cfg) == "convnext_small"  # resize grid and drop path do not change the weights
    assert arch_name(cfg.replace(in_chans=4)) is None
    data = cfg.to_dict()
    assert data["family"] == "convnext" and json.loads(json.dumps(data)) == data
    assert config_from_dict(data) == cfg == ConvNeXtConfig.from_dict(data)
    model = build_backbone("convnext_tiny_test", drop_path_rate=0.2, layerscale_init=0.5)
    assert model.stages[3][0].drop_path.drop_prob == pytest.approx(0.2) and model.stages[0][0].gamma[0] == 0.5
    for bad in ({"depths": (1, 1, 1)}, {"dims": (16, 32, 64, 0)}, {"drop_path_rate": 1.0}, {"patch_size": 0}):
        with pytest.raises(ValueError):
            ConvNeXtConfig(**bad)
    with pytest.raises(TypeError, match="unknown ConvNeXt option"):
        build_backbone("convnext_tiny_test", num_heads=2)


# ------------------------------------------------------------------ formats and strictness
def test_timm_layout_loads(tiny_pair) -> None:
    ours, tm, sd = tiny_pair
    timm_sd = dict(tm.state_dict())
    timm_sd["head.fc.weight"], timm_sd["head.fc.bias"] = torch.randn(10, 128), torch.zeros(10)  # a classifier
    model = load_backbone(timm_sd)
    assert model.load_report.source_format == "timm" and model.arch_name == "convnext_tiny_test"
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        close(model(x), ours(x))
    # Meta's layout without the norms.3 alias (as some converters write it) loads strictly too
    no_alias = {k: v for k, v in sd.items() if not k.startswith("norms.")}
    again = load_backbone(no_alias, strict=True)
    assert torch.equal(again.norms[3].weight, sd["norm.weight"]) and again.norms[3] is again.norm


def test_training_checkpoint_and_dinov3geo_roundtrip(tiny_pair, tmp_path) -> None:
    ours, _, sd = tiny_pair
    training = {"teacher": {f"backbone.{k}": v for k, v in sd.items()} | {"dino_head.w": torch.zeros(2)}}
    assert load_backbone(training).load_report.source_format == "meta-training"

    model = copy.deepcopy(ours)
    model.patch_size = None
    meta = BackboneMetadata(bands=["red", "green", "blue"], gsd=0.5, provenance={"src": "test"})
    path = save_backbone(model, tmp_path / "cx.pt", metadata=meta)
    torch.load(path, weights_only=True)
    back = load_backbone(path)
    assert isinstance(back, ConvNeXt) and back.config == model.config and back.patch_size is None
    assert back.metadata == meta and back.arch_name == "convnext_tiny_test"
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        a = model.get_intermediate_layers(x, n=4, reshape=True)
        b = back.get_intermediate_layers(x, n=4, reshape=True)
    assert a[0].shape[-2:] == (16, 16)  # native stage-0 resolution kept through the round trip
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)

    exported = export_meta(model, tmp_path / "cx_meta.pth", metadata=meta)
    raw = torch.load(exported, weights_only=True)
    assert list(raw) == list(meta_layout([1, 1, 2, 1], [16, 32, 64, 128]))
    side = json.loads((tmp_path / "cx_meta.pth.json").read_text())
    assert side["config"]["family"] == "convnext"
    again = load_backbone(exported)
    assert again.patch_size is None and again.metadata.gsd == 0.5
    st = load_backbone(export_meta(model, tmp_path / "cx.safetensors"))
    with torch.inference_mode():
        close(st(x), model(x), atol=0)


def _save(tmp_path, sd, name="weights.pth"):
    path = tmp_path / name
    torch.save(sd, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_strict_errors_name_file_and_keys(tiny_pair, tmp_path) -> None:
    _, _, sd = tiny_pair
    missing = {k: v for k, v in sd.items() if k != "stages.2.1.gamma"}
    path, digest = _save(tmp_path, missing)
    with pytest.raises(CheckpointError) as e:
        load_backbone(path, arch="convnext_tiny_test")
    msg = str(e.value)
    assert str(path) in msg and "stages.2.1.gamma" in msg and "missing keys (1)" in msg
    assert e.value.missing == ["stages.2.1.gamma"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest

    loose = load_backbone(path, arch="convnext_tiny_test", strict=False)
    assert loose.load_report.missing == ["stages.2.1.gamma"]
    assert torch.equal(loose.stages[2][1].gamma, torch.full((64,), 1e-6))  # Meta's init for what is missing

    extra = dict(sd) | {"stages.0.0.grn.gamma": torch.zeros(1, 1, 1, 16)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): stages.0.0.grn.gamma"):
        load_backbone(extra)

    wrong = dict(sd)
    wrong["stages.1.0.pwconv1.weight"] = torch.zeros(64, 32)
    with pytest.raises(CheckpointError, match=r"stages.1.0.pwconv1.weight: checkpoint \(64, 32\) vs model \(128, 32\)"):
        load_backbone(wrong, strict=False)


def test_damaged_and_foreign_files(tiny_pair, tmp_path) -> None:
    _, _, sd = tiny_pair
    no_stem = {k: v for k, v in sd.items() if not k.startswith("downsample_layers.0.0.")}
    path, digest = _save(tmp_path, no_stem)
    with pytest.raises(CheckpointError) as e:
        load_backbone(path)
    assert str(path) in str(e.value) and "downsample_layers.0.0.weight" in str(e.value)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest

    edited = dict(sd)
    edited["norms.3.weight"] = sd["norm.weight"] + 1
    with pytest.raises(CheckpointError, match="norm.weight and norms.3.weight differ"):
        load_backbone(edited)

    vit = build_backbone("vit_tiny_test").state_dict()
    with pytest.raises(CheckpointError, match="does not fit the convnext_tiny_test ConvNeXt") as e:
        load_backbone(vit, arch="convnext_tiny_test")
    assert "cls_token" in e.value.unexpected and "downsample_layers.0.0.weight" in e.value.missing
    with pytest.raises(CheckpointError, match="does not fit"):
        load_backbone(sd, arch="vit_tiny_test")

    five = dict(sd) | {"stages.4.0.dwconv.weight": torch.zeros(8, 1, 7, 7)}
    with pytest.raises(CheckpointError, match="4 stages"):
        load_backbone(five)


# ------------------------------------------------------------------ multispectral
def test_widened_stem_keeps_rgb_outputs(tiny_pair) -> None:
    ours, _, sd = tiny_pair
    wide = load_backbone(sd, bands=["blue", "green", "red", "nir"])
    assert wide.config.in_chans == 4 and wide.patch_embed.in_chans == 4
    assert wide.metadata.bands == ["blue", "green", "red", "nir"]
    w = wide.patch_embed.proj.weight
    assert torch.equal(w[:, 0], sd["downsample_layers.0.0.weight"][:, 2])
    close(w[:, 3], sd["downsample_layers.0.0.weight"].mean(1), atol=1e-7)
    x = torch.randn(2, 3, 64, 96)
    bgrn = torch.cat([x.flip(1), torch.zeros(2, 1, 64, 96)], dim=1)
    in_place = widen_patch_embed(copy.deepcopy(ours), ["red", "green", "blue", "swir"])
    with torch.inference_mode():
        ref = ours.get_intermediate_layers(x, n=4, return_class_token=True)
        got = wide.get_intermediate_layers(bgrn, n=4, return_class_token=True)
        got2 = in_place.get_intermediate_layers(torch.cat([x, torch.zeros(2, 1, 64, 96)], 1), n=4)
    for (p, c), (q, d), r in zip(ref, got, got2, strict=True):
        close(p, q)
        close(c, d)
        close(p, r)
    assert in_place.config.in_chans == 4 and in_place.patch_embed.proj.in_channels == 4
    with pytest.raises(CheckpointError, match="cannot adapt a 4-band ConvNeXt stem"):
        load_backbone(wide.state_dict(), bands=["a", "b"])
