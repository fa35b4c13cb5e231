"""Loading, converting, inferring and saving DINOv3 backbone weights.

Accepted inputs of :func:`load_backbone` (a path or an in-memory dict):

* **Meta's released format**: the plain backbone ``state_dict`` of the hub ``.pth`` files (keys of spec
  section 1.3), including ``rope_embed.periods`` and qkv ``bias_mask`` buffers (loaded from the file) and the
  ``local_cls_norm.*`` weights of the SAT-493M ViT-L / 7B files (accepted; unused at eval).
* **Meta's training format**: ``{"teacher": {"backbone.xxx": ...}}`` (``eval/<it>/teacher_checkpoint.pth``),
  or any dict whose keys carry a ``backbone.`` prefix; heads are ignored.
* **timm's format** (``timm/models/eva.py`` ``vit_*_patch16_dinov3*``): ``reg_token``, ``gamma_1/2``,
  ``q_bias``/``v_bias``, ``fc1_g``/``fc1_x``/``fc2``. timm files have no ``periods``: they are recomputed in
  fp32 (timm's values), which differs from Meta's bf16-rounded released periods by about 1e-3 in outputs.
* **dinov3geo's own checkpoint** written by :func:`save_backbone` (config + state dict + metadata).
* **ConvNeXt weights** (:mod:`dinov3geo.models.convnext`): Meta's ``dinov3_convnext_*_pretrain_lvd1689m``
  files (``downsample_layers.*``, ``stages.i.j.*``, ``norm.*``, ``norms.3.*``; ``norms.3`` may be absent and
  then aliases ``norm``), the same inside a training checkpoint, timm's ``convnext_*`` layout (``stem.*``,
  ``stages.i.blocks.j.*``, ``head.norm.*``), or dinov3geo's own format; the family and size (depths, dims,
  ``in_chans``, layer scale) are inferred from the tensors.

``.safetensors`` files are read with ``safetensors``; everything else with
``torch.load(weights_only=True, map_location="cpu")``. A bad file raises :class:`CheckpointError` listing
the missing / unexpected / shape-mismatched keys; nothing is ever partially loaded silently.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dinov3geo.models.config import BackboneConfig
from dinov3geo.models.convnext import (
    STEM_WEIGHT_KEY,
    ConvNeXt,
    ConvNeXtConfig,
    from_timm_convnext_state_dict,
    infer_convnext_config,
    is_convnext_state_dict,
    is_timm_convnext_state_dict,
)
from dinov3geo.models.layers.ffn import FFN_LAYERS, ffn_hidden_features
from dinov3geo.models.layers.rope import compute_periods
from dinov3geo.models.metadata import BackboneMetadata
from dinov3geo.models.multispectral import widen_patch_embed
from dinov3geo.models.registry import arch_name, config_from_dict, get_config
from dinov3geo.models.vision_transformer import DinoVisionTransformer

logger = logging.getLogger(__name__)

FORMAT = "dinov3geo.backbone"
SIDECAR_FORMAT = "dinov3geo.backbone-sidecar"
VERSION = 1

_WRAPPER_KEYS = ("teacher", "model_ema", "student", "model", "state_dict", "module")
_STRIP_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint could not be read, recognised or loaded; the message says why (and which keys)."""

    def __init__(
        self,
        message: str,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        super().__init__(message + _describe_keys(self.missing, self.unexpected, self.mismatched))


def _short(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _describe_keys(missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[tuple]) -> str:
    parts = []
    if missing:
        parts.append(f"\n  missing keys ({len(missing)}): {_short(list(missing))}")
    if unexpected:
        parts.append(f"\n  unexpected keys ({len(unexpected)}): {_short(list(unexpected))}")
    if mismatched:
        shown = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched[:12]]
        more = f"; ... ({len(mismatched) - 12} more)" if len(mismatched) > 12 else ""
        parts.append(f"\n  shape mismatches ({len(mismatched)}): " + "; ".join(shown) + more)
    return "".join(parts)


@dataclass
class LoadReport:
    """What :func:`load_backbone` did: detected format, arch, and keys it could not match (``strict=False``)."""

    source_format: str
    arch: str | None
    config: BackboneConfig
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading
def read_checkpoint(source: str | os.PathLike[str] | Mapping[str, Any]) -> Any:
    """Read ``source`` into Python objects (a dict for every supported format), without interpreting it."""
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover
            raise CheckpointError("reading .safetensors needs the `safetensors` package") from e
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign/corrupt files (IndexError, EOFError...)
        raise CheckpointError(describe_load_error(path, e)) from e


# ----------------------------------------------------------------------------- load-error texts
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
#: torch's text around a refused weights-only load: advice to load unsafely, links, "file an issue"
_TORCH_ADVICE = re.compile(
    r"Weights only load failed\.|This file can still be loaded[^.]*\.|[^.]*do those steps only if you trust[^.]*\.|"
    r"\(\d\)|In PyTorch 2\.6[^.]*\.|Re-running `torch\.load`[^.]*\.|Do it only if you got the file[^.]*\.|"
    r"Alternatively, to load with[^.]*\.|Please file an issue[^:]*:|Please use `torch\.serialization[^.]*\.|"
    r"Check the documentation of torch\.load[^\n]*|WeightsUnpickler error:|"
    r"[^.]*weights_only=False[^.]*\.|[^.]*`weights_only` set to `False`[^.]*\.",
)
#: what to do instead (never: load it with weights_only=False)
SAFE_ADVICE = ("dinov3geo reads checkpoints weights-only (tensors, numbers, strings, lists, dicts) and never "
               "unpickles other Python objects: save a weights-only copy with the program that wrote it "
               "(torch.save(model.state_dict(), 'weights.pt')), or check that this is the right file")


def _sniff(path: Path) -> str | None:
    """What the first bytes of ``path`` say it is not (None: a zip archive or a pickle, as torch writes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    if not head:
        return "the file is empty"
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return None
    return (f"it is not a torch checkpoint (it starts with {head[:8]!r}, neither a zip archive nor a pickle); "
            "check that this is the right file")


def clean_load_message(text: str) -> str:
    """``text`` (a message that may embed torch's weights-only load error) without terminal codes and without
    torch's advice to re-run ``torch.load`` with ``weights_only=False``; our safe advice is added instead."""
    text = _ANSI.sub("", text)
    torch_text = ("Weights only load failed", "weights_only=False", "`weights_only` set to `False`")
    if not any(t in text for t in torch_text):  # nothing of torch's (or already cleaned): as it is
        return text
    glob = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    operand = re.search(r"Unsupported operand (\d+)", text)
    head = text.split("Weights only load failed", 1)[0].rstrip(" :;,")
    if glob:
        why = f"it holds a pickled Python object ({glob.group(1)}) besides tensors"
    elif operand:
        why = f"it is a pickle that is not a weights file (unsupported pickle operation {operand.group(1)})"
    else:
        rest = " ".join(_TORCH_ADVICE.sub(" ", text.split("Weights only load failed", 1)[-1]).split())
        why = rest or "it is not a weights-only torch file"
    return f"{head}: {why}. {SAFE_ADVICE}" if head else f"{why}. {SAFE_ADVICE}"


def describe_load_error(path: str | os.PathLike[str], exc: BaseException) -> str:
    """One readable sentence on why ``torch.load(path, weights_only=True)`` failed, and what to do.

    Never relays torch's advice to load the file with ``weights_only=False`` (that can run arbitrary code).
    """
    p = Path(path)
    sniff = _sniff(p)
    if sniff is not None:
        return f"{p} could not be loaded: {sniff}"
    text = _ANSI.sub("", str(exc))
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text or "Weights only" in text:
        return clean_load_message(f"{p} could not be loaded with torch.load(weights_only=True): "
                                  f"{text or type(exc).__name__}")
    first = " ".join(text.split(". ")[0].split()) if text else ""
    if "zip archive" in text or "central directory" in text or isinstance(exc, EOFError):
        return (f"{p} could not be loaded: the file is damaged or incomplete ({first or type(exc).__name__}); "
                "copy or download it again")
    return f"{p} is not a readable torch checkpoint ({type(exc).__name__}: {first or 'no details'})"


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _strip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = dict(sd)
    for prefix in _STRIP_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    if any(k.startswith("backbone.") for k in out):
        dropped = sorted({k.split(".", 1)[0] for k in out if not k.startswith("backbone.")})
        if dropped:
            logger.info("ignoring non-backbone entries of a training checkpoint: %s", dropped)
        out = {k[len("backbone.") :]: v for k, v in out.items() if k.startswith("backbone.")}
    return out


def is_timm_state_dict(sd: Mapping[str, Tensor]) -> bool:
    """True for timm Eva (DINOv3) key names (``reg_token``, ``gamma_1``, ``q_bias``, ``fc1_g``)."""
    return "reg_token" in sd or any(k.endswith((".gamma_1", ".attn.q_bias", ".mlp.fc1_g.weight")) for k in sd)


@dataclass
class _Extracted:
    state_dict: dict[str, Tensor]
    kind: str
    config: BackboneConfig | None = None
    arch: str | None = None
    metadata: BackboneMetadata | None = None
    notes: list[str] = field(default_factory=list)


def _extract(obj: Any, what: str) -> _Extracted:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{what} is not a state dict (a dict of tensors); it holds a {type(obj).__name__}"
        )
    if obj.get("format") == FORMAT:
        version = obj.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise CheckpointError(
                f"{what}: unsupported dinov3geo checkpoint version {version!r} (this is v{VERSION})"
            )
        sd = obj.get("state_dict")
        if not _is_tensor_dict(sd):
            raise CheckpointError(f"{what}: dinov3geo checkpoint without a valid 'state_dict'")
        cfg_data = obj.get("config")
        arch = obj.get("arch")
        config = None
        if isinstance(cfg_data, Mapping):
            config = config_from_dict(dict(cfg_data))
        elif isinstance(arch, Mapping):
            config = config_from_dict(dict(arch))
        elif isinstance(arch, str):
            try:
                config = get_config(arch)
            except KeyError as e:
                raise CheckpointError(f"{what}: {e.args[0]}") from e
        meta = obj.get("metadata")
        metadata = BackboneMetadata.from_dict(dict(meta)) if isinstance(meta, Mapping) else None
        return _Extracted(dict(sd), "dinov3geo", config, arch if isinstance(arch, str) else None, metadata)
    inner: Any = obj
    for _ in range(3):  # unwrap {"teacher": {...}}, {"model": {"module": ...}} ...
        if _is_tensor_dict(inner):
            break
        key = next((k for k in _WRAPPER_KEYS if isinstance(inner.get(k), Mapping)), None)
        if key is None:
            break
        inner = inner[key]
    if not _is_tensor_dict(inner):
        non_tensor = (
            [k for k, v in inner.items() if not isinstance(v, Tensor)] if isinstance(inner, Mapping) else []
        )
        raise CheckpointError(
            f"{what} is not a recognised backbone state dict: expected a dict of tensors (Meta / timm / "
            f"dinov3geo format); non-tensor entries: {_short([str(k) for k in non_tensor])}"
        )
    training = inner is not obj or any(str(k).startswith("backbone.") for k in inner)
    sd = _strip(inner)
    if is_timm_state_dict(sd):
        return _Extracted(sd, "timm")
    return _Extracted(sd, "meta-training" if training else "meta")


# ----------------------------------------------------------------------------- converters
def _default_head_dim(embed_dim: int) -> int:
    return 128 if embed_dim == 4096 else 64


def from_timm_state_dict(
    sd: Mapping[str, Tensor], head_dim: int | None = None, rope_base: float = 100.0
) -> dict[str, Tensor]:
    """Convert a timm Eva DINOv3 state dict to Meta's key layout (reverse of timm's ``checkpoint_filter_fn``).

    ``q_bias``/``v_bias`` become ``qkv.bias`` with a zero k third and ``bias_mask = [1, 0, 1]``; ``mask_token``
    (absent from timm) is zero, its official init value; ``rope_embed.periods`` is computed in fp32 from
    ``rope_base`` and ``head_dim`` (default: 64, or 128 when the width is 4096, the released head dims).
    A classifier ``head.*`` / ``fc_norm.*`` is dropped (logged).
    """
    out: dict[str, Tensor] = {}
    dropped = []
    for k, v in sd.items():
        if k.startswith(("head.", "fc_norm.")) or k in ("pos_embed",) or ".k_bias" in k:
            if k.startswith(("head.", "fc_norm.")):
                dropped.append(k)
            continue
        if k.endswith(".attn.v_bias"):
            continue
        if k.endswith(".attn.q_bias"):
            base = k[: -len("q_bias")]
            q, vb = v, sd.get(base + "v_bias")
            if vb is None:
                raise CheckpointError(f"timm state dict has {k} but no {base}v_bias")
            out[base + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), vb])
            mask = torch.ones(3 * q.shape[0], dtype=q.dtype)
            mask[q.shape[0] : 2 * q.shape[0]] = 0
            out[base + "qkv.bias_mask"] = mask
            continue
        nk = k.replace("reg_token", "storage_tokens")
        nk = re.sub(r"\.gamma_1$", ".ls1.gamma", nk)
        nk = re.sub(r"\.gamma_2$", ".ls2.gamma", nk)
        nk = nk.replace(".mlp.fc1_g.", ".mlp.w1.").replace(".mlp.fc1_x.", ".mlp.w2.")
        if re.search(r"\.mlp\.fc2\.", nk) and (k.split(".mlp.")[0] + ".mlp.fc1_g.weight") in sd:
            nk = nk.replace(".mlp.fc2.", ".mlp.w3.")
        out[nk] = v
    if dropped:
        logger.warning("dropping timm classifier entries not part of the DINOv3 backbone: %s", dropped)
    if "cls_token" not in out:
        raise CheckpointError("timm state dict has no cls_token", missing=["cls_token"])
    dim = out["cls_token"].shape[-1]
    out.setdefault("mask_token", torch.zeros(1, dim, dtype=out["cls_token"].dtype))
    if "rope_embed.periods" not in out:
        hd = head_dim or _default_head_dim(dim)
        out["rope_embed.periods"] = compute_periods(hd, rope_base, dtype=torch.float32)
    return _meta_order(out)


def to_timm_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Convert a Meta-layout state dict to timm Eva names (what timm's ``checkpoint_filter_fn`` produces).

    Drops ``rope_embed.periods`` (timm recomputes them in fp32), ``bias_mask``, ``mask_token`` and
    ``local_cls_norm.*``. Raises :class:`CheckpointError` for what timm cannot represent: ``cls_norm``
    (untied cls/patch norms) or a non-zero effective k bias.
    """
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if (
            k.endswith((".bias_mask", "rope_embed.periods"))
            or k == "mask_token"
            or k.startswith("local_cls_norm.")
        ):
            continue
        if k.startswith("cls_norm."):
            raise CheckpointError(
                "timm's Eva has no separate cls_norm (untie_cls_and_patch_norms)", unexpected=[k]
            )
        if k.endswith(".attn.qkv.bias"):
            base = k[: -len("qkv.bias")]
            q, kb, vb = v.chunk(3)
            mask = sd.get(base + "qkv.bias_mask")
            k_eff = kb * mask.chunk(3)[1] if mask is not None else kb
            if not k_eff.is_meta and bool(torch.any(k_eff != 0)):
                raise CheckpointError(f"{k} has a non-zero k bias, which timm's Eva cannot represent")
            out[base + "q_bias"] = q
            out[base + "v_bias"] = vb
            continue
        nk = k.replace("storage_tokens", "reg_token")
        nk = nk.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        nk = (
            nk.replace(".mlp.w1.", ".mlp.fc1_g.")
            .replace(".mlp.w2.", ".mlp.fc1_x.")
            .replace(".mlp.w3.", ".mlp.fc2.")
        )
        out[nk] = v
    return out


_ORDER_ROOT = (
    "cls_token",
    "storage_tokens",
    "mask_token",
    "patch_embed.",
    "rope_embed.",
    "blocks.",
    "norm.",
    "cls_norm.",
    "local_cls_norm.",
)
_ORDER_BLOCK = (
    "norm1.",
    "attn.qkv.",
    "attn.proj.",
    "ls1.",
    "norm2.",
    "mlp.fc1.",
    "mlp.fc2.",
    "mlp.w1.",
    "mlp.w2.",
    "mlp.w3.",
    "ls2.",
)
_ORDER_LEAF = ("weight", "bias", "bias_mask")


def _meta_order(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Reorder keys like Meta's ``state_dict()`` (cosmetic; loading does not depend on order)."""

    def index(name: str, order: Sequence[str]) -> int:
        return next((i for i, p in enumerate(order) if name == p or name.startswith(p)), len(order))

    def rank(key: str) -> tuple[int, int, int, int]:
        leaf = key.rsplit(".", 1)[-1]
        leaf_rank = _ORDER_LEAF.index(leaf) if leaf in _ORDER_LEAF else len(_ORDER_LEAF)
        m = re.match(r"blocks\.(\d+)\.(.*)", key)
        if m:
            return (
                index("blocks.", _ORDER_ROOT),
                int(m.group(1)),
                index(m.group(2), _ORDER_BLOCK),
                leaf_rank,
            )
        return (index(key, _ORDER_ROOT), 0, 0, leaf_rank)

    return {k: sd[k] for k in sorted(sd, key=rank)}


# ----------------------------------------------------------------------------- inference
def _solve_ffn(hidden: int, dim: int, swiglu: bool) -> tuple[str, float]:
    if not swiglu:
        for r in (hidden / dim, (hidden + 0.5) / dim):
            if int(dim * r) == hidden:
                return "mlp", r
        raise CheckpointError(f"cannot express an MLP hidden width {hidden} for width {dim}")
    # released combinations first
    for name, r in (("swiglu", 6.0), ("swiglu64", 3.0), ("swiglu", 4.0)):
        if ffn_hidden_features(name, dim, r) == hidden:
            return name, r
    for name, align in FFN_LAYERS.items():
        if align is None or hidden % align:
            continue
        target = int(1.5 * hidden)
        for x in range(max(target - 2 * align, 1), target + 2 * align):
            for r in (x / dim, (x + 0.5) / dim):
                if ffn_hidden_features(name, dim, r) == hidden:
                    return name, r
    raise CheckpointError(f"cannot express a SwiGLU hidden width {hidden} for width {dim}")


def infer_config(sd: Mapping[str, Tensor], head_dim: int | None = None) -> BackboneConfig | ConvNeXtConfig:
    """Infer the architecture of a Meta-layout state dict (see :func:`from_timm_state_dict` for timm files).

    A ConvNeXt state dict (Meta's or timm's layout) gives a :class:`ConvNeXtConfig`
    (:func:`~dinov3geo.models.convnext.infer_convnext_config`: depths, dims, ``in_chans``, layer scale).

    Width from ``cls_token``; depth from the block indices; head dim from ``rope_embed.periods`` (``Dh/4``
    entries; ``head_dim`` overrides, and without periods the released head dims 64 / 128 for width 4096
    are assumed); FFN kind and size, storage tokens, qkv / proj / FFN biases, LayerScale, extra norms,
    patch size and ``in_chans`` from the keys and shapes. RoPE options and norm eps cannot be seen in the
    weights and take the released defaults (base 100, ``rescale_coords=2``, LayerNorm eps 1e-5).
    """
    if is_convnext_state_dict(sd):
        return infer_convnext_config(from_timm_convnext_state_dict(sd) if is_timm_convnext_state_dict(sd) else sd)
    required = ("cls_token", "patch_embed.proj.weight", "blocks.0.norm1.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise CheckpointError(
            "cannot infer the architecture: not a DINOv3 backbone state dict (neither a ViT: cls_token, "
            "patch_embed.proj.weight, blocks.0.norm1.weight; nor a ConvNeXt: downsample_layers.0.0.weight)",
            missing=missing,
        )
    dim = int(sd["cls_token"].shape[-1])
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    if "rope_embed.periods" in sd and head_dim is None:
        head_dim = 4 * int(sd["rope_embed.periods"].numel())
    elif head_dim is None:
        head_dim = _default_head_dim(dim)
        logger.warning(
            "no rope_embed.periods in the weights; assuming head dim %d (num_heads=%d)",
            head_dim,
            dim // head_dim,
        )
    if dim % head_dim:
        raise CheckpointError(
            f"width {dim} is not a multiple of the head dim {head_dim} implied by the periods"
        )
    pw = sd["patch_embed.proj.weight"]
    if "blocks.0.mlp.fc1.weight" in sd:
        ffn_layer, ffn_ratio = _solve_ffn(int(sd["blocks.0.mlp.fc1.weight"].shape[0]), dim, swiglu=False)
        ffn_bias = "blocks.0.mlp.fc1.bias" in sd
    elif "blocks.0.mlp.w1.weight" in sd:
        ffn_layer, ffn_ratio = _solve_ffn(int(sd["blocks.0.mlp.w1.weight"].shape[0]), dim, swiglu=True)
        ffn_bias = "blocks.0.mlp.w1.bias" in sd
    else:
        raise CheckpointError(
            "cannot infer the FFN: no blocks.0.mlp.fc1 / blocks.0.mlp.w1 weight",
            missing=["blocks.0.mlp.fc1.weight"],
        )
    qkv_bias = "blocks.0.attn.qkv.bias" in sd
    storage = sd.get("storage_tokens")
    cfg = BackboneConfig(
        embed_dim=dim,
        depth=depth,
        num_heads=dim // head_dim,
        ffn_ratio=ffn_ratio,
        ffn_layer=ffn_layer,
        patch_size=int(pw.shape[-1]),
        in_chans=int(pw.shape[1]),
        qkv_bias=qkv_bias,
        proj_bias="blocks.0.attn.proj.bias" in sd,
        ffn_bias=ffn_bias,
        mask_k_bias="blocks.0.attn.qkv.bias_mask" in sd or not qkv_bias,
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in sd else None,
        norm_layer="layernormbf16" if "norm.bias" in sd else "rmsnorm",
        n_storage_tokens=int(storage.shape[1]) if storage is not None else 0,
        untie_cls_and_patch_norms="cls_norm.weight" in sd,
        untie_global_and_local_cls_norm="local_cls_norm.weight" in sd,
    )
    return cfg


# ----------------------------------------------------------------------------- loading
def _diff(
    expected: Mapping[str, Tensor], sd: Mapping[str, Tensor]
) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        (k, tuple(sd[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, mismatched


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    side = Path(str(path) + ".json")
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"sidecar {side} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(f"{side} is not a dinov3geo sidecar (format {SIDECAR_FORMAT!r})")
    return data


def load_backbone(
    source: str | os.PathLike[str] | Mapping[str, Any],
    arch: str | BackboneConfig | dict[str, Any] | None = None,
    strict: bool = True,
    *,
    bands: Sequence[str] | None = None,
    rgb_bands: Sequence[str] | None = None,
    widen_rescale: bool = False,
    metadata: BackboneMetadata | Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    **overrides: Any,
) -> DinoVisionTransformer | ConvNeXt:
    """Load a DINOv3 backbone from a file or an in-memory state dict (Meta, Meta training, timm or dinov3geo).

    ViT or ConvNeXt: the family is taken from ``arch`` / the saved config, else recognised from the keys
    (a :class:`~dinov3geo.models.convnext.ConvNeXt` is returned for ConvNeXt weights; ``bands`` widen its
    stem conv, ``**overrides`` are :class:`~dinov3geo.models.convnext.ConvNeXtConfig` fields such as
    ``patch_size``).

    Args:
        source: path to a ``.pth``/``.pt``/``.safetensors`` file or a state dict / checkpoint dict.
        arch: architecture name or config; ``None`` infers it from the weights (:func:`infer_config`).
            With a name, ``local_cls_norm.*`` weights in the file switch on ``untie_global_and_local_cls_norm``
            (the norm is unused at eval).
        strict: raise :class:`CheckpointError` on any missing or unexpected key. With ``strict=False``
            missing/unexpected keys are tolerated (missing ones keep the official random init) and
            reported in ``model.load_report`` and the log. Shape mismatches always raise.
        bands: band names of the input the model will see. When the weights are RGB and ``bands`` differ,
            the patch embedding is widened with :func:`~dinov3geo.models.multispectral.widen_patch_embed`
            (RGB-named bands keep their kernel, others get the RGB mean; ``widen_rescale`` applies 3/N).
        rgb_bands: names of the checkpoint's 3 channels (default: the metadata's bands or red/green/blue).
        metadata: metadata to attach (overrides what the checkpoint or its ``.json`` sidecar holds).
        device: where the loaded model lives.
        **overrides: config overrides (e.g. ``drop_path_rate``, ``num_heads`` for timm files of non-standard
            head dim, ``norm_eps``, RoPE options).

    Returns:
        The model in **eval mode** (train-time RoPE jittering off), with ``model.metadata``
        (:class:`BackboneMetadata` or ``None``) and ``model.load_report`` (:class:`LoadReport`).
    """
    path = None if isinstance(source, Mapping) else Path(source)
    what = str(path) if path is not None else "the given object"
    ext = _extract(read_checkpoint(source), what)
    sidecar = _read_sidecar(path) if path is not None else None
    notes: list[str] = []
    sd = ext.state_dict

    cfg: BackboneConfig | ConvNeXtConfig | None
    if arch is not None:
        cfg = get_config(arch)
    elif ext.config is not None:
        cfg = ext.config
    elif sidecar is not None and isinstance(sidecar.get("config"), Mapping):
        cfg = config_from_dict(dict(sidecar["config"]))
    else:
        cfg = None

    if isinstance(cfg, ConvNeXtConfig) or (cfg is None and is_convnext_state_dict(sd)):
        return _load_convnext(
            ext, sd, cfg, what=what, sidecar=sidecar, strict=strict, bands=bands, rgb_bands=rgb_bands,
            widen_rescale=widen_rescale, metadata=metadata, device=device, overrides=overrides,
            copy=path is None,
        )

    if ext.kind == "timm":
        if cfg is not None:
            head_dim = cfg.replace(**overrides).head_dim
        elif "num_heads" in overrides:
            head_dim = int(sd["cls_token"].shape[-1]) // int(overrides["num_heads"])
        else:
            head_dim = None
            dim = int(sd["cls_token"].shape[-1]) if "cls_token" in sd else 0
            notes.append(
                f"timm weights carry no RoPE periods: assumed head dim {_default_head_dim(dim)}; "
                "pass num_heads= to override"
            )
        sd = from_timm_state_dict(sd, head_dim=head_dim)
        notes.append("RoPE periods recomputed in fp32 (timm files have none)")

    if cfg is None:
        try:
            cfg = infer_config(sd)
        except CheckpointError as e:
            raise CheckpointError(f"{what}: {e}") from None
        notes.append("architecture inferred from the weights")
    elif "local_cls_norm.weight" in sd and not cfg.untie_global_and_local_cls_norm:
        cfg = cfg.replace(untie_global_and_local_cls_norm=True)
        notes.append(
            "local_cls_norm found in the weights: enabled untie_global_and_local_cls_norm (unused at eval)"
        )
    if overrides:
        cfg = cfg.replace(**overrides)

    meta_obj: BackboneMetadata | None = ext.metadata
    if meta_obj is None and sidecar is not None and isinstance(sidecar.get("metadata"), Mapping):
        meta_obj = BackboneMetadata.from_dict(dict(sidecar["metadata"]))
    if metadata is not None:
        meta_obj = (
            metadata if isinstance(metadata, BackboneMetadata) else BackboneMetadata.from_dict(dict(metadata))
        )

    weight = sd.get("patch_embed.proj.weight")
    if bands is not None and weight is not None:
        bands = list(bands)
        src_bands = (
            list(rgb_bands)
            if rgb_bands is not None
            else (meta_obj.bands if meta_obj is not None and meta_obj.bands else ["red", "green", "blue"])
        )
        if [b.lower() for b in bands] != [b.lower() for b in src_bands]:
            if weight.shape[1] != 3 or len(src_bands) != 3:
                raise CheckpointError(
                    f"cannot adapt a {weight.shape[1]}-band patch embedding ({src_bands}) to bands {bands}; "
                    "widening starts from RGB weights"
                )
            sd = widen_patch_embed(sd, bands, rgb_bands=src_bands, rescale=widen_rescale)  # type: ignore[assignment]
            notes.append(f"patch embedding widened from {src_bands} to {bands} (rescale={widen_rescale})")
            if meta_obj is not None:
                meta_obj = BackboneMetadata(
                    bands=bands, gsd=meta_obj.gsd, provenance=dict(meta_obj.provenance)
                )
            else:
                meta_obj = BackboneMetadata(bands=bands)
        cfg = cfg.replace(in_chans=int(sd["patch_embed.proj.weight"].shape[1]))
    if meta_obj is not None:
        meta_obj.check_channels(cfg.in_chans)

    shell = DinoVisionTransformer(cfg, device="meta")
    expected = shell.state_dict()
    missing, unexpected, mismatched = _diff(expected, sd)
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointError(
            f"{what} ({ext.kind} format) does not fit the {arch_name(cfg) or 'configured'} architecture "
            f"(D={cfg.embed_dim}, depth={cfg.depth}, heads={cfg.num_heads}, ffn={cfg.ffn_layer})",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    copy = path is None  # never alias tensors of a caller's dict
    if not missing:
        tensors = {}
        for k, ref in expected.items():
            v = sd[k].to(dtype=ref.dtype) if sd[k].is_floating_point() else sd[k]
            tensors[k] = v.clone() if copy and v is sd[k] else v
        model = shell
        model.load_state_dict(tensors, strict=True, assign=True)
        model = model.to(device)
    else:
        model = DinoVisionTransformer(cfg, device=device)
        model.init_weights()
        model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
    if missing or unexpected:
        logger.warning("loaded %s with strict=False:%s", what, _describe_keys(missing, unexpected, []))
    model.arch_name = arch_name(cfg)
    model.metadata = meta_obj
    model.load_report = LoadReport(ext.kind, model.arch_name, cfg, missing, unexpected, notes)
    for note in notes:
        logger.info("%s: %s", what, note)
    return model.eval()


def _load_convnext(
    ext: _Extracted,
    sd: Mapping[str, Tensor],
    cfg: ConvNeXtConfig | None,
    *,
    what: str,
    sidecar: Mapping[str, Any] | None,
    strict: bool,
    bands: Sequence[str] | None,
    rgb_bands: Sequence[str] | None,
    widen_rescale: bool,
    metadata: BackboneMetadata | Mapping[str, Any] | None,
    device: torch.device | str,
    overrides: Mapping[str, Any],
    copy: bool,
) -> ConvNeXt:
    """:func:`load_backbone` for ConvNeXt weights (Meta's layout, timm's ``convnext_*`` layout, dinov3geo)."""
    notes: list[str] = []
    kind = ext.kind
    if is_timm_convnext_state_dict(sd):
        sd = from_timm_convnext_state_dict(sd)
        kind = "timm"
        notes.append("timm ConvNeXt key names converted to Meta's (norms.3 = norm)")
    sd = dict(sd)
    # Meta's ``norms[3]`` *is* ``norm``: its state dict lists the final LayerNorm under both names
    for leaf in ("weight", "bias"):
        a, b = sd.get(f"norm.{leaf}"), sd.get(f"norms.3.{leaf}")
        if a is not None and b is None:
            sd[f"norms.3.{leaf}"] = a
        elif b is not None and a is None:
            sd[f"norm.{leaf}"] = b
        elif (
            a is not None
            and b is not None
            and not (a.is_meta or b.is_meta)
            and (a.shape != b.shape or not torch.equal(a, b))
        ):
            raise CheckpointError(
                f"{what}: norm.{leaf} and norms.3.{leaf} differ, but in Meta's ConvNeXt they are one "
                "tensor (the final LayerNorm); the file is damaged or was edited: use the original file"
            )
    if cfg is None:
        try:
            cfg = infer_convnext_config(sd)
        except CheckpointError as e:
            raise CheckpointError(
                f"{what}: {str(e).splitlines()[0]}", missing=e.missing, unexpected=e.unexpected
            ) from e
        notes.append("architecture inferred from the weights")
    if overrides:
        cfg = cfg.replace(**overrides)

    meta_obj: BackboneMetadata | None = ext.metadata
    if meta_obj is None and sidecar is not None and isinstance(sidecar.get("metadata"), Mapping):
        meta_obj = BackboneMetadata.from_dict(dict(sidecar["metadata"]))
    if metadata is not None:
        meta_obj = (
            metadata if isinstance(metadata, BackboneMetadata) else BackboneMetadata.from_dict(dict(metadata))
        )
    weight = sd.get(STEM_WEIGHT_KEY)
    if bands is not None and weight is not None:
        bands = list(bands)
        src_bands = (
            list(rgb_bands)
            if rgb_bands is not None
            else (meta_obj.bands if meta_obj is not None and meta_obj.bands else ["red", "green", "blue"])
        )
        if [b.lower() for b in bands] != [b.lower() for b in src_bands]:
            if weight.shape[1] != 3 or len(src_bands) != 3:
                raise CheckpointError(
                    f"cannot adapt a {weight.shape[1]}-band ConvNeXt stem ({src_bands}) to bands {bands}; "
                    "widening starts from RGB weights"
                )
            sd = widen_patch_embed(sd, bands, rgb_bands=src_bands, rescale=widen_rescale)  # type: ignore[assignment]
            notes.append(f"stem conv widened from {src_bands} to {bands} (rescale={widen_rescale})")
            meta_obj = (
                BackboneMetadata(bands=bands, gsd=meta_obj.gsd, provenance=dict(meta_obj.provenance))
                if meta_obj is not None
                else BackboneMetadata(bands=bands)
            )
        cfg = cfg.replace(in_chans=int(sd[STEM_WEIGHT_KEY].shape[1]))
    if meta_obj is not None:
        meta_obj.check_channels(cfg.in_chans)

    shell = ConvNeXt(cfg, device="meta")
    expected = shell.state_dict()
    missing, unexpected, mismatched = _diff(expected, sd)
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointError(
            f"{what} ({kind} format) does not fit the {arch_name(cfg) or 'configured'} ConvNeXt "
            f"(depths={list(cfg.depths)}, dims={list(cfg.dims)}, in_chans={cfg.in_chans})",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    if not missing:
        tensors = {}
        for k, ref in expected.items():
            v = sd[k].to(dtype=ref.dtype) if sd[k].is_floating_point() else sd[k]
            tensors[k] = v.clone() if copy and v is sd[k] else v  # never alias a caller's dict
        tensors["norms.3.weight"], tensors["norms.3.bias"] = tensors["norm.weight"], tensors["norm.bias"]
        model = shell
        model.load_state_dict(tensors, strict=True, assign=True)
        model = model.to(device)
    else:
        model = ConvNeXt(cfg, device=device)
        model.init_weights()
        model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
    if missing or unexpected:
        logger.warning("loaded %s with strict=False:%s", what, _describe_keys(missing, unexpected, []))
    model.arch_name = arch_name(cfg)
    model.metadata = meta_obj
    model.load_report = LoadReport(kind, model.arch_name, cfg, missing, unexpected, notes)  # type: ignore[arg-type]
    for note in notes:
        logger.info("%s: %s", what, note)
    return model.eval()


# ----------------------------------------------------------------------------- saving
def _atomic_write(path: Path, write) -> None:
    tmp = Path(str(path) + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _plain_state_dict(model: DinoVisionTransformer) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def _resolve_metadata(
    model: Any, metadata: BackboneMetadata | Mapping[str, Any] | None
) -> BackboneMetadata | None:
    if metadata is None:
        metadata = getattr(model, "metadata", None)
    if metadata is None:
        return None
    meta = metadata if isinstance(metadata, BackboneMetadata) else BackboneMetadata.from_dict(dict(metadata))
    meta.check_channels(model.config.in_chans)
    return meta


def save_backbone(
    model: DinoVisionTransformer,
    path: str | os.PathLike[str],
    metadata: BackboneMetadata | Mapping[str, Any] | None = None,
) -> Path:
    """Write dinov3geo's own checkpoint (atomically: ``path.tmp`` then ``os.replace``).

    The file is ``{"format": "dinov3geo.backbone", "version": 1, "arch": name-or-config-dict,
    "config": config-dict, "state_dict": Meta-layout tensors, "metadata": dict-or-None}``, primitive types
    only, so ``torch.load(weights_only=True)`` reads it. ``metadata`` defaults to ``model.metadata``.
    """
    path = Path(path)
    meta = _resolve_metadata(model, metadata)
    name = getattr(model, "arch_name", None) or arch_name(model.config)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": name if name is not None else model.config.to_dict(),
        "config": model.config.to_dict(),
        "state_dict": _plain_state_dict(model),
        "metadata": meta.to_dict() if meta is not None else None,
    }
    _atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def export_meta(
    model: DinoVisionTransformer,
    path: str | os.PathLike[str],
    metadata: BackboneMetadata | Mapping[str, Any] | None = None,
) -> Path:
    """Write the plain state dict in Meta's exact key layout, plus a ``<path>.json`` sidecar.

    The weights file loads with ``DinoVisionTransformer(...).load_state_dict(sd, strict=True)`` in Meta's
    code and through timm's ``checkpoint_filter_fn``; a ``.safetensors`` suffix writes safetensors. The
    sidecar (config + metadata) is picked up by :func:`load_backbone`. Both writes are atomic.
    """
    path = Path(path)
    meta = _resolve_metadata(model, metadata)
    sd = _plain_state_dict(model)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        _atomic_write(path, lambda tmp: save_file(sd, str(tmp)))
    else:
        _atomic_write(path, lambda tmp: torch.save(sd, tmp))
    sidecar = {
        "format": SIDECAR_FORMAT,
        "version": VERSION,
        "arch": getattr(model, "arch_name", None) or arch_name(model.config),
        "config": model.config.to_dict(),
        "metadata": meta.to_dict() if meta is not None else None,
    }
    side = Path(str(path) + ".json")
    _atomic_write(side, lambda tmp: tmp.write_text(json.dumps(sidecar, indent=2)))
    return path


__all__ = [
    "CheckpointError",
    "clean_load_message",
    "describe_load_error",
    "LoadReport",
    "export_meta",
    "from_timm_state_dict",
    "infer_config",
    "is_timm_state_dict",
    "load_backbone",
    "read_checkpoint",
    "save_backbone",
    "to_timm_state_dict",
]
