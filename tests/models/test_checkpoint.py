"""Checkpoint formats, arch inference, errors, dinov3geo save/load and Meta export."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from dinov3geo.models import (
    ARCHS,
    RELEASED_ARCHS,
    BackboneMetadata,
    CheckpointError,
    build_backbone,
    export_meta,
    infer_config,
    load_backbone,
    save_backbone,
    to_timm_state_dict,
)
from dinov3geo.models.checkpoint import from_timm_state_dict

from .conftest import make_timm_eva, random_backbone

X = torch.randn(1, 3, 32, 48)


def _same_outputs(a, b) -> None:
    with torch.no_grad():
        torch.testing.assert_close(
            a.forward_features(X)["x_prenorm"], b.forward_features(X)["x_prenorm"], atol=0, rtol=0
        )


class NotAllowed:  # a pickle that weights_only refuses
    def __init__(self) -> None:
        self.value = 1


# ------------------------------------------------------------------ arch inference
@pytest.mark.parametrize("arch", list(ARCHS))
def test_infer_config_roundtrip(arch: str) -> None:
    sd = build_backbone(arch, device="meta").state_dict()
    assert infer_config(sd) == ARCHS[arch]


@pytest.mark.parametrize("arch", RELEASED_ARCHS)
def test_infer_config_from_timm_names(arch: str) -> None:
    """timm files have no periods: the released head dims (64, 128 for 7B) are assumed."""
    sd = build_backbone(arch, device="meta").state_dict()
    back = from_timm_state_dict(to_timm_state_dict(sd))
    assert infer_config(back) == ARCHS[arch].replace(untie_global_and_local_cls_norm=False)


def test_infer_config_other_options() -> None:
    for overrides in (
        {"in_chans": 4, "n_storage_tokens": 0},
        {"layerscale_init": None, "ffn_bias": False},
        {"ffn_layer": "swiglu128", "ffn_ratio": 5.0},
        {"untie_cls_and_patch_norms": True},
        {"ffn_ratio": 3.5, "norm_layer": "rmsnorm"},
        {"qkv_bias": True, "mask_k_bias": False},
    ):
        cfg = ARCHS["vit_tiny_test"].replace(**overrides)
        sd = build_backbone(cfg, device="meta").state_dict()
        inferred = infer_config(sd)
        assert inferred.ffn_hidden_dim == cfg.ffn_hidden_dim
        assert inferred.replace(ffn_ratio=cfg.ffn_ratio, ffn_layer=cfg.ffn_layer) == cfg, overrides


# ------------------------------------------------------------------ formats
def test_meta_state_dict_file(tmp_path) -> None:
    model = random_backbone("vit_tiny_swiglu_test")
    path = tmp_path / "dinov3_tiny.pth"
    torch.save(model.state_dict(), path)
    loaded = load_backbone(path)
    assert loaded.load_report.source_format == "meta" and loaded.arch_name == "vit_tiny_swiglu_test"
    assert not loaded.training
    assert loaded.metadata is None
    assert all(p.requires_grad and p.dtype == torch.float32 for p in loaded.parameters())
    _same_outputs(model, loaded)


def test_training_checkpoint_format() -> None:
    model = random_backbone("vit_tiny_test")
    teacher = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    teacher["dino_head.mlp.0.weight"] = torch.zeros(4, 64)
    teacher["ibot_head.last_layer.weight"] = torch.zeros(4, 4)
    loaded = load_backbone({"teacher": teacher})
    assert loaded.load_report.source_format == "meta-training"
    _same_outputs(model, loaded)
    _same_outputs(model, load_backbone({k: v for k, v in teacher.items()}))  # flat, prefixed


def test_safetensors(tmp_path) -> None:
    from safetensors.torch import save_file

    model = random_backbone("vit_tiny_test")
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    _same_outputs(model, load_backbone(path))


def test_timm_model_state_dict_file(tmp_path) -> None:
    model = random_backbone("vit_tiny_test")
    eva = make_timm_eva(model.config)
    timm_eva = pytest.importorskip("timm.models.eva")
    eva.load_state_dict(timm_eva.checkpoint_filter_fn(dict(model.state_dict()), eva))
    path = tmp_path / "timm.pth"
    torch.save(eva.state_dict(), path)
    loaded = load_backbone(path, arch="vit_tiny_test")
    assert loaded.load_report.source_format == "timm"
    _same_outputs(model, loaded)


def test_local_cls_norm_accepted_with_named_arch() -> None:
    src = random_backbone("vit_tiny_test", untie_global_and_local_cls_norm=True)
    sd = src.state_dict()
    assert "local_cls_norm.weight" in sd
    loaded = load_backbone(sd, arch="vit_tiny_test")
    assert loaded.local_cls_norm is not None
    assert torch.equal(loaded.local_cls_norm.weight, sd["local_cls_norm.weight"])
    _same_outputs(src, loaded)


def test_in_memory_dict_is_not_aliased() -> None:
    model = random_backbone("vit_tiny_test")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = load_backbone(sd)
    with torch.no_grad():
        loaded.cls_token.add_(1.0)
    assert torch.equal(sd["cls_token"], model.state_dict()["cls_token"])


# ------------------------------------------------------------------ errors
def test_error_not_a_dict(tmp_path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_backbone(path)
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_backbone(path)


def test_error_pickle_refused_by_weights_only(tmp_path) -> None:
    path = tmp_path / "obj.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 64), "x": NotAllowed()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_backbone(path)


def test_error_garbage_file(tmp_path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_backbone(path)
    with pytest.raises(FileNotFoundError):
        load_backbone(tmp_path / "missing.pth")


def test_error_non_tensor_entries() -> None:
    with pytest.raises(CheckpointError, match="non-tensor entries: epoch"):
        load_backbone({"cls_token": torch.zeros(1, 1, 64), "epoch": 3})


def test_error_wrong_shapes_lists_keys() -> None:
    sd = dict(random_backbone("vit_tiny_test").state_dict())
    with pytest.raises(CheckpointError) as err:
        load_backbone(sd, arch="vit_tiny_swiglu_test")
    msg = str(err.value)
    assert "missing keys" in msg and "blocks.0.mlp.w1.weight" in msg
    assert "unexpected keys" in msg and "blocks.0.mlp.fc1.weight" in msg
    sd["blocks.1.attn.proj.weight"] = torch.zeros(64, 32)
    with pytest.raises(
        CheckpointError, match=r"blocks\.1\.attn\.proj\.weight: checkpoint \(64, 32\) vs model \(64, 64\)"
    ):
        load_backbone(sd)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_backbone(sd, strict=False)


def test_missing_keys_strict_and_non_strict() -> None:
    model = random_backbone("vit_tiny_test")
    sd = dict(model.state_dict())
    del sd["blocks.1.ls2.gamma"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks\.1\.ls2\.gamma") as err:
        load_backbone(sd, arch="vit_tiny_test")
    assert err.value.missing == ["blocks.1.ls2.gamma"]
    sd["extra.thing"] = torch.zeros(2)
    loaded = load_backbone(sd, arch="vit_tiny_test", strict=False)
    assert loaded.load_report.missing == ["blocks.1.ls2.gamma"]
    assert loaded.load_report.unexpected == ["extra.thing"]
    assert torch.equal(loaded.blocks[1].ls2.gamma, torch.full((64,), 1e-5))  # official init kept
    assert torch.equal(loaded.blocks[0].ls2.gamma, model.blocks[0].ls2.gamma)


def test_error_not_a_backbone() -> None:
    with pytest.raises(CheckpointError, match="cannot infer the architecture"):
        load_backbone({"weight": torch.zeros(3)})


# ------------------------------------------------------------------ dinov3geo format
def test_save_backbone_roundtrip_weights_only(tmp_path) -> None:
    model = random_backbone("vit_tiny_test", in_chans=4, norm_eps=1e-6)
    meta = BackboneMetadata(
        bands=["red", "green", "blue", "nir"],
        mean=[0.4, 0.4, 0.3, 0.5],
        std=[0.2, 0.15, 0.14, 0.2],
        gsd=10.0,
        provenance={"source": "unit-test", "step": 3},
    )
    path = tmp_path / "ckpt.pt"
    assert save_backbone(model, path, meta) == path
    assert not (tmp_path / "ckpt.pt.tmp").exists()
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "dinov3geo.backbone" and raw["version"] == 1
    assert raw["metadata"]["bands"] == ["red", "green", "blue", "nir"]
    loaded = load_backbone(path)
    assert loaded.load_report.source_format == "dinov3geo"
    assert loaded.config == model.config  # exact config, including norm eps
    assert loaded.metadata == meta
    assert loaded.norm.eps == 1e-6
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_save_backbone_checks_metadata(tmp_path) -> None:
    model = random_backbone("vit_tiny_test")
    with pytest.raises(ValueError, match="4 bands but the model has in_chans=3"):
        save_backbone(model, tmp_path / "x.pt", BackboneMetadata(bands=["a", "b", "c", "d"]))
    with pytest.raises(ValueError):
        BackboneMetadata(bands=["r", "g"], mean=[0.1])
    with pytest.raises(ValueError):
        BackboneMetadata(std=[0.0, 1.0])


def test_newer_version_rejected(tmp_path) -> None:
    model = random_backbone("vit_tiny_test")
    path = tmp_path / "c.pt"
    save_backbone(model, path)
    raw = torch.load(path, weights_only=True)
    raw["version"] = 99
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="version 99"):
        load_backbone(path)


# ------------------------------------------------------------------ Meta export
def test_export_meta_roundtrip_and_sidecar(tmp_path) -> None:
    model = random_backbone("vit_tiny_7b_test")
    meta = BackboneMetadata(
        bands=["red", "green", "blue"], mean=[0.43, 0.411, 0.296], std=[0.213, 0.156, 0.143]
    )
    path = tmp_path / "export.pth"
    export_meta(model, path, meta)
    sd = torch.load(path, weights_only=True)
    assert list(sd) == list(build_backbone("vit_tiny_7b_test", device="meta").state_dict())
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    side = json.loads((tmp_path / "export.pth.json").read_text())
    assert side["metadata"]["mean"] == [0.43, 0.411, 0.296] and side["arch"] == "vit_tiny_7b_test"
    loaded = load_backbone(path)
    assert loaded.metadata == meta and loaded.config == model.config
    _same_outputs(model, loaded)
    # a plain Meta module (strict load) accepts the file
    fresh = build_backbone("vit_tiny_7b_test")
    assert not fresh.load_state_dict(sd, strict=True).missing_keys


def test_export_meta_safetensors(tmp_path) -> None:
    model = random_backbone("vit_tiny_test")
    path = export_meta(model, tmp_path / "m.safetensors")
    _same_outputs(model, load_backbone(path))


def test_exported_file_loads_in_timm(tmp_path) -> None:
    timm_eva = pytest.importorskip("timm.models.eva")
    model = random_backbone("vit_tiny_swiglu_test")
    path = export_meta(model, tmp_path / "e.pth")
    sd = torch.load(path, weights_only=True, map_location="cpu")
    eva = make_timm_eva(model.config)
    eva.load_state_dict(timm_eva.checkpoint_filter_fn(sd, eva), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(eva(X), model(X), atol=1e-5, rtol=0)


def test_to_timm_rejects_what_timm_cannot_hold() -> None:
    sd = dict(random_backbone("vit_tiny_test", untie_cls_and_patch_norms=True).state_dict())
    with pytest.raises(CheckpointError, match="cls_norm"):
        to_timm_state_dict(sd)
    sd = dict(random_backbone("vit_tiny_test", mask_k_bias=False).state_dict())
    with pytest.raises(CheckpointError, match="non-zero k bias"):
        to_timm_state_dict(sd)


def test_weights_only_pickle_class_is_refused_by_torch(tmp_path) -> None:
    """Guard: the refusal above really comes from torch's weights_only unpickler."""
    path = tmp_path / "o.pth"
    torch.save(NotAllowed(), path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
