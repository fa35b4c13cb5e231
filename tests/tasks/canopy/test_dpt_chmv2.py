"""DPT head key layout (spec section 8), CHMv2 forward/output sizes, loaders, and equivalence with transformers."""

from __future__ import annotations

import json

import pytest
import torch

from dinov3geo.models import CheckpointError, build_backbone
from dinov3geo.models.padding import pad_to_patch_multiple
from dinov3geo.tasks.canopy.bins import HeightBins
from dinov3geo.tasks.canopy.chmv2 import (
    CHMv2,
    default_layers,
    export_hf,
    from_hf_state_dict,
    load_chmv2,
    to_hf_config,
    to_hf_state_dict,
)
from dinov3geo.tasks.canopy.dpt import DPTHead, dpt_config_from_state_dict

PPC = (128, 256, 512, 1024)


def spec_head_shapes() -> dict[str, tuple[int, ...]]:
    """The released ViT-L CHMv2 head's keys and shapes as listed in chmv2-spec.md section 8."""
    s: dict[str, tuple[int, ...]] = {}
    for i, c in enumerate(PPC):
        s[f"reassemble_blocks.projects.{i}.conv.weight"] = (c, 1024, 1, 1)
        s[f"reassemble_blocks.projects.{i}.conv.bias"] = (c,)
    s["reassemble_blocks.resize_layers.0.weight"] = (128, 128, 4, 4)
    s["reassemble_blocks.resize_layers.0.bias"] = (128,)
    s["reassemble_blocks.resize_layers.1.weight"] = (256, 256, 2, 2)
    s["reassemble_blocks.resize_layers.1.bias"] = (256,)
    s["reassemble_blocks.resize_layers.3.weight"] = (1024, 1024, 3, 3)
    s["reassemble_blocks.resize_layers.3.bias"] = (1024,)
    for i in range(4):
        s[f"reassemble_blocks.readout_projects.{i}.0.weight"] = (1024, 2048)
        s[f"reassemble_blocks.readout_projects.{i}.0.bias"] = (1024,)
    for i, c in enumerate(PPC):
        s[f"convs.{i}.conv.weight"] = (256, c, 3, 3)
    for i in range(4):
        s[f"fusion_blocks.{i}.project.conv.weight"] = (256, 256, 1, 1)
        s[f"fusion_blocks.{i}.project.conv.bias"] = (256,)
        for u in ((1, 2) if i else (2,)):
            for j in (1, 2):
                s[f"fusion_blocks.{i}.res_conv_unit{u}.conv{j}.conv.weight"] = (256, 256, 3, 3)
                s[f"fusion_blocks.{i}.res_conv_unit{u}.conv{j}.conv.bias"] = (256,)
    s["conv_depth.head.0.weight"] = (128, 256, 3, 3)
    s["conv_depth.head.0.bias"] = (128,)
    s["conv_depth.head.2.weight"] = (128, 128, 3, 3)
    s["conv_depth.head.2.bias"] = (128,)
    s["conv_depth.head.4.weight"] = (256, 128, 1, 1)
    s["conv_depth.head.4.bias"] = (256,)
    return s


def test_vitl_head_keys_shapes_and_params_equal_release():
    sd = DPTHead(device="meta").state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items()}
    assert got == spec_head_shapes()
    assert len(sd) == 68
    assert sum(v.numel() for v in sd.values()) == 33_747_200
    cfg = dpt_config_from_state_dict(sd)
    assert cfg == {"in_channels": 1024, "post_process_channels": list(PPC), "channels": 256,
                   "n_hidden_channels": 128, "n_bins": 256, "readout": "project"}
    assert default_layers(24) == [5, 11, 17, 23]


def test_readout_ignore_has_no_readout_keys():
    head = DPTHead(32, [4, 8, 16, 32], 8, 4, 10, use_cls_token=False)
    assert head.readout == "ignore" and not any("readout" in k for k in head.state_dict())
    feats = [torch.randn(1, 32, 3, 5) for _ in range(4)]  # odd grid, no class tokens
    assert head(feats).shape == (1, 10, 64, 96)  # 32 * ceil(3/2), 32 * ceil(5/2)
    with pytest.raises(ValueError, match="needs \\(patch_map, cls\\)"):
        DPTHead(32, [4, 8, 16, 32], 8, 4, 10)(feats)


def tiny_chmv2(depth: int = 4, seed: int = 0, **bb_kw) -> CHMv2:
    """Random tiny CHMv2 (embed 64, 4 heads, 4 storage tokens) with non-trivial LayerScale/biases."""
    torch.manual_seed(seed)
    bb = build_backbone("vit_tiny_test", depth=depth, num_heads=4, **bb_kw)  # init_weights sets bias_mask
    with torch.no_grad():
        for name, p in bb.named_parameters():
            if name.endswith(".gamma"):
                p.normal_(0, 0.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    head = DPTHead(64, [8, 16, 32, 64], channels=16, n_hidden_channels=8, n_bins=32)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.1)
    return CHMv2(bb, head)


def test_output_size_rules():
    m = tiny_chmv2()
    x = torch.randn(1, 3, 250, 200)
    with torch.no_grad():
        native = m(x)
        assert native.shape == (1, 1, 256, 224)  # padded 256x208 -> 16x13 grid -> 32*ceil(13/2) = 224
        assert native.dtype == torch.float32
        for mode in ("resize", "aligned"):
            h, s = m.forward_with_uncertainty(x, output=mode)
            assert h.shape == s.shape == (1, 1, 250, 200)
            assert torch.all(s >= 0)
        # resize mode: the native map resized to the padded 256x208, padding (3 px top, 4 px left) cropped
        ref = torch.nn.functional.interpolate(native, size=(256, 208), mode="bilinear", align_corners=False)
        torch.testing.assert_close(m(x, output="resize"), ref[..., 3:253, 4:204])
        # multiples of 32: all modes are Meta's output
        y = torch.randn(1, 3, 64, 96)
        outs = [m(y, output=mode) for mode in ("native", "resize", "aligned")]
    assert outs[0].shape == (1, 1, 64, 96)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    with pytest.raises(ValueError, match="unknown output mode"):
        m(y, output="crop")


@pytest.mark.parametrize("hw", [(64, 64), (80, 48), (72, 56)])
def test_equivalence_with_transformers(hw):
    import transformers  # a dev dependency (>= 5.4, which has CHMv2): a missing one fails, never skips

    assert hasattr(transformers, "CHMv2ForDepthEstimation"), transformers.__version__
    m = tiny_chmv2()
    cfg = to_hf_config(m)
    assert cfg["backbone_config"]["layer_norm_eps"] == 1e-5  # HF's CHMv2 default would be 1e-6
    hf = transformers.CHMv2ForDepthEstimation(transformers.CHMv2Config(**cfg)).eval()
    hf.load_state_dict(to_hf_state_dict(m), strict=True)
    torch.manual_seed(1)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ours = m(x)
        theirs = hf(pixel_values=pad_to_patch_multiple(x, 16)).predicted_depth  # HF pads in its processor
    assert ours.dtype == torch.float32
    assert ours.shape[-2:] == theirs.shape[-2:]
    diff = float((ours[:, 0] - theirs).abs().max())
    assert diff <= 3e-5, diff  # the bound the README states (measured: at most 1.5e-5 m over 5 seeds x 3 sizes)
    assert float(ours.std()) > 1e-3  # outputs are not constant, so the comparison means something


def test_hf_key_map_round_trip():
    m = tiny_chmv2(untie_global_and_local_cls_norm=True)
    hf = to_hf_state_dict(m)
    assert not any("local_cls_norm" in k or "bias_mask" in k or "periods" in k for k in hf)
    assert all(k.startswith(("backbone.", "head.")) for k in hf)
    b, h = from_hf_state_dict(hf, num_heads=4)
    ref_b = {k: v for k, v in m.backbone.state_dict().items() if not k.startswith("local_cls_norm")}
    assert set(b) == set(ref_b)
    for k, v in ref_b.items():
        if k.endswith("qkv.bias"):  # the K part is stored with the mask applied (it is zero)
            n = v.shape[0] // 3
            torch.testing.assert_close(b[k][:n], v[:n])
            torch.testing.assert_close(b[k][2 * n :], v[2 * n :])
            assert torch.all(b[k][n : 2 * n] == 0)
        else:
            torch.testing.assert_close(b[k], v, msg=k)
    assert {k: tuple(v.shape) for k, v in h.items()} == {k: tuple(v.shape) for k, v in m.head.state_dict().items()}


def test_load_chmv2_meta_two_files(tmp_path):
    m = tiny_chmv2(untie_global_and_local_cls_norm=True)  # like SAT-493M: local_cls_norm in the file
    bb_path = tmp_path / "my_renamed_backbone.pth"  # Meta's hub would need the -eadcf0ff name; we do not
    head_path = tmp_path / "head.pth"
    torch.save(m.backbone.state_dict(), bb_path)
    torch.save(m.head.state_dict(), head_path)
    loaded = load_chmv2(bb_path, head_path)
    assert loaded.head.config() == m.head.config()  # dims read from the file
    assert loaded.layers == [0, 1, 2, 3] and loaded.bins.n_bins == 32
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
        assert loaded(x).dtype == torch.float32
        l64 = load_chmv2(m.backbone.state_dict(), m.head.state_dict(), dtype=torch.float64)
        y = l64(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.float(), m(x), rtol=0, atol=1e-3)


def test_load_chmv2_strict_errors(tmp_path):
    m = tiny_chmv2()
    sd = m.head.state_dict()
    bb = m.backbone.state_dict()
    missing = {k: v for k, v in sd.items() if k != "fusion_blocks.2.project.conv.bias"}
    with pytest.raises(CheckpointError, match="missing keys.*fusion_blocks.2.project.conv.bias"):
        load_chmv2(bb, missing)
    extra = {**sd, "fusion_blocks.0.res_conv_unit1.conv1.conv.weight": torch.zeros(16, 16, 3, 3)}
    with pytest.raises(CheckpointError, match="unexpected keys.*fusion_blocks.0.res_conv_unit1"):
        load_chmv2(bb, extra)
    bad = {**sd, "convs.1.conv.weight": torch.zeros(16, 7, 3, 3)}
    with pytest.raises(CheckpointError, match="shape mismatches.*convs.1.conv.weight"):
        load_chmv2(bb, bad)
    path = tmp_path / "not_a_head.pth"
    torch.save({"foo": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not_a_head.pth is not a DPT head"):
        load_chmv2(bb, path)
    with pytest.raises(CheckpointError, match="not a Hugging Face CHMv2 checkpoint"):
        load_chmv2(bb)


def test_load_chmv2_hf_single_file(tmp_path):
    m = tiny_chmv2(depth=8)
    assert m.layers == [1, 3, 5, 7]
    folder = export_hf(m, tmp_path / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["backbone_config"]["out_indices"] == [2, 4, 6, 8]
    loaded = load_chmv2(folder / "model.safetensors")  # config.json beside it: 4 heads, eps, out_indices
    assert loaded.layers == [1, 3, 5, 7]
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=1e-5)
    # the same as an in-memory dict with an explicit config
    sd = to_hf_state_dict(m)
    loaded2 = load_chmv2(sd, config=cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded2(x), m(x), rtol=0, atol=1e-5)
    del sd["head.fusion_layers.1.projection.bias"]
    with pytest.raises(CheckpointError, match="missing keys.*fusion_blocks.1.project.conv.bias"):
        load_chmv2(sd, config=cfg)
    del sd["head.convs.0.weight"]
    with pytest.raises(CheckpointError, match="missing keys \\(1\\): convs.0.conv.weight"):
        load_chmv2(sd, config=cfg)


def test_chmv2_rejects_mismatched_parts():
    bb = build_backbone("vit_tiny_test", depth=4, num_heads=4)
    with pytest.raises(ValueError, match="head takes 32 channels"):
        CHMv2(bb, DPTHead(32, [4, 8, 16, 32], 8, 4, 16))
    with pytest.raises(ValueError, match="bins 8"):
        CHMv2(bb, DPTHead(64, [4, 8, 16, 32], 8, 4, 16), HeightBins(8))
