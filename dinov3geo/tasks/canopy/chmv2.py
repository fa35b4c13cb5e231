"""Meta CHMv2 canopy-height model: loading the released weights and reproducing Meta's forward pass.

:func:`load_chmv2` accepts

* **Meta's two files** (``torch.hub`` layout): the DINOv3 ViT-L/16 SAT-493M backbone
  (``dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth``, read through :func:`dinov3geo.models.load_backbone`, which
  infers the architecture, ``local_cls_norm`` included, whatever the file is called) and the DPT head
  (``dinov3_vitl16_chmv2_dpt_head-3703d643.pth``, keys without prefix). The head's dimensions are read from
  the file's tensor shapes and it is loaded strictly.
* **the Hugging Face single checkpoint** (``facebook/dinov3-vitl16-chmv2-dpt-head``: ``backbone.*`` keys of
  transformers' ``DINOv3ViTBackbone`` and ``head.*`` keys of ``CHMv2Head``), converted by
  :func:`from_hf_state_dict`; a ``config.json`` beside the file (or ``config=``) gives the number of heads,
  LayerNorm eps, tapped layers and bin settings. :func:`to_hf_state_dict` / :func:`to_hf_config` /
  :func:`export_hf` go the other way (transformers' ``CHMv2ForDepthEstimation`` loads the result strictly).

:class:`CHMv2` reproduces Meta's ``Depther``: ``CenterPadding(16)`` of the *normalised* image, the backbone's
``get_intermediate_layers(n=[5, 11, 17, 23], reshape=True, return_class_token=True, norm=True)``, the DPT head
and the mixlog bins (metres). It runs in the dtype it was loaded in (fp32 by default) and never autocasts;
Meta's ``Depther`` silently runs bf16 autocast on CPU (up to 0.19 m off), which is deliberately not copied.
Without gradients the bins are read out by :meth:`~dinov3geo.tasks.canopy.dpt.DPTHead.forward_binned` (no
full-resolution ``[B, 256, H, W]`` logits; Meta's numbers up to float32 rounding); :meth:`CHMv2.logits` gives
the logits.

Output size (spec section 5): Meta's output side is ``32 * ceil(Hp / 32)`` for the padded side ``Hp``; it equals
the input only for sides that are multiples of 32. ``output=`` chooses what to return:

* ``"native"``: Meta's exact output (e.g. 250x200 -> padded 256x208 -> 256x224);
* ``"resize"``: the native output bilinearly resized (``align_corners=False``) to the padded size, then the
  centre padding cropped off: input-sized, Meta's numbers wherever no resize is needed, approximately
  aligned otherwise (the notebook resizes to the input size directly, which mixes in the padding);
* ``"aligned"``: the image is centre-padded to a multiple of **32** instead of 16, so the output grid equals the
  padded input pixel for pixel, and the padding is cropped: exactly georeferenced, at the price of a few more
  zero-padded context pixels than Meta's forward for sides that are not multiples of 32.

For sides that are multiples of 32 all three are identical; tile georeferenced rasters in multiples of 32.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3geo.models import CheckpointError, ConvNeXt, DinoVisionTransformer, load_backbone, read_checkpoint
from dinov3geo.models.checkpoint import _diff
from dinov3geo.models.layers.rope import compute_periods
from dinov3geo.models.padding import _pad_amounts, pad_to_patch_multiple
from dinov3geo.tasks.canopy.bins import HeightBins
from dinov3geo.tasks.canopy.dpt import DPTHead, dpt_config_from_state_dict

__all__ = [
    "CHMV2_LAYERS",
    "OUTPUT_MODES",
    "CHMv2",
    "default_layers",
    "export_hf",
    "from_hf_state_dict",
    "load_chmv2",
    "needs_grad",
    "to_hf_config",
    "to_hf_state_dict",
]

#: The 0-based blocks CHMv2 taps on ViT-L (HF ``out_indices`` are these + 1).
CHMV2_LAYERS = (5, 11, 17, 23)
OUTPUT_MODES = ("native", "resize", "aligned")


def default_layers(depth: int, n: int = 4) -> list[int]:
    """Evenly spaced taps ending at the last block: ``[5, 11, 17, 23]`` for 24 blocks, ``[2, 5, 8, 11]`` for 12."""
    if depth < n:
        raise ValueError(f"a {depth}-block backbone cannot give {n} distinct layers")
    return [(k + 1) * depth // n - 1 for k in range(n)]


def needs_grad(module: nn.Module, features: Sequence[Any]) -> bool:
    """Whether a forward of ``module`` on ``features`` (tensors or tuples of tensors) would record gradients."""
    if not torch.is_grad_enabled():
        return False
    if any(p.requires_grad for p in module.parameters()):
        return True
    return any(t.requires_grad for f in features for t in (f if isinstance(f, (tuple, list)) else (f,)))


def convnext_refusal(backbone: Any, what: str = "") -> str:
    """The one-line refusal of a non-ViT (ConvNeXt) backbone for CHMv2."""
    kind = "a ConvNeXt" if isinstance(backbone, ConvNeXt) else f"a {type(backbone).__name__}"
    src = f"{what} is " if what else "the backbone is "
    return (f"{src}{kind} backbone, but CHMv2 is defined on the ViT-L/16 SAT-493M backbone's blocks "
            f"{list(CHMV2_LAYERS)}: give dinov3_vitl16_pretrain_sat493m-*.pth as the CHMv2 backbone, or train a "
            "canopy head on the ConvNeXt with `dinov3geo canopy train` (model.backbone: the ConvNeXt file)")


def centre_crop_box(size: int, multiple: int) -> tuple[int, int]:
    """``(start, stop)`` of the original ``size`` pixels inside its centre padding to ``multiple``."""
    left, _ = _pad_amounts(size, multiple)
    return left, left + size


def crop_padding(y: Tensor, hw: tuple[int, int], multiple: int) -> Tensor:
    """Remove the centre padding (to ``multiple``) of an ``hw`` image from ``y`` (whose size is the padded one)."""
    (t, b), (left, r) = centre_crop_box(hw[0], multiple), centre_crop_box(hw[1], multiple)
    return y[..., t:b, left:r]


class CHMv2(nn.Module):
    """Meta's CHMv2 depther: frozen DINOv3 backbone + DPT head + mixlog bins; heights in metres.

    Args:
        backbone: a :class:`~dinov3geo.models.DinoVisionTransformer` (a ConvNeXt is refused: CHMv2 is defined
            on the ViT-L/16 SAT-493M blocks; train a head on a ConvNeXt with :mod:`dinov3geo.tasks.canopy.train`).
        head: a :class:`~dinov3geo.tasks.canopy.dpt.DPTHead` (its ``n_bins`` must match ``bins``).
        bins: default: Meta's ``HeightBins(head.n_bins, "chmv2_mixlog", "chmv2_mixlog", 0.001, 96)``.
        layers: 0-based backbone blocks to tap (default ``[5, 11, 17, 23]`` for 24 blocks, evenly spaced
            otherwise, see :func:`default_layers`).

    Attributes:
        chunk_bytes: row-block size of the readout without gradients (:meth:`DPTHead.forward_binned`; None: the
            device's default).
    """

    chunk_bytes: int | None = None

    def __init__(
        self,
        backbone: DinoVisionTransformer,
        head: DPTHead,
        bins: HeightBins | None = None,
        layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, DinoVisionTransformer):
            raise ValueError(convnext_refusal(backbone))
        self.backbone = backbone
        self.head = head
        self.bins = bins if bins is not None else HeightBins(head.n_bins)
        if self.bins.n_bins != head.n_bins:
            raise ValueError(f"head has {head.n_bins} outputs but the bins {self.bins.n_bins}")
        depth = len(backbone.blocks)
        self.layers = list(layers) if layers is not None else default_layers(depth, head.n_levels)
        if len(self.layers) != head.n_levels:
            raise ValueError(f"{len(self.layers)} layers given for a {head.n_levels}-level head")
        if head.in_channels != backbone.embed_dim:
            raise ValueError(f"head takes {head.in_channels} channels, backbone gives {backbone.embed_dim}")
        self.patch_size = int(backbone.patch_size)
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the head's weights (inputs are cast to it)."""
        return next(self.head.parameters()).dtype

    def features(self, x: Tensor, multiple: int | None = None) -> list[tuple[Tensor, Tensor]]:
        """Centre-pad ``x`` to ``multiple`` (default: the patch size) and tap the backbone: 4 ``(patch_map, cls)``."""
        x = pad_to_patch_multiple(x.to(self.dtype), multiple or self.patch_size)
        out = self.backbone.get_intermediate_layers(
            x, n=self.layers, reshape=True, return_class_token=True, norm=True
        )
        return [(p, c) for p, c in out]

    def logits(self, x: Tensor, multiple: int | None = None) -> Tensor:
        """Bin logits ``[B, n_bins, 32 ceil(Hp/32), 32 ceil(Wp/32)]`` of normalised images ``[B, 3, H, W]``."""
        return self.head(self.features(x, multiple))

    def _run(self, x: Tensor, output: str, with_std: bool) -> tuple[Tensor, Tensor | None]:
        if output not in OUTPUT_MODES:
            raise ValueError(f"unknown output mode {output!r}; choose one of {OUTPUT_MODES}")
        if x.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got {tuple(x.shape)}")
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        multiple = 2 * self.patch_size if output == "aligned" else self.patch_size
        feats = self.features(x, multiple)
        if needs_grad(self.head, feats):
            logits = self.head(feats)
            if with_std:
                height, std = self.bins.mean_and_std(logits)
            else:
                height, std = self.bins.expectation(logits), None
        else:  # no [B, n_bins, H, W] logits: row blocks of one image at a time (same numbers to fp32 rounding)
            height, std = self.head.forward_binned(feats, self.bins, with_std, self.chunk_bytes)
        if output == "native":
            return height, std
        padded = tuple(-(-s // multiple) * multiple for s in hw)
        outs = []
        for y in (height, std):
            if y is None:
                outs.append(None)
                continue
            if tuple(y.shape[-2:]) != padded:
                y = F.interpolate(y, size=padded, mode="bilinear", align_corners=False)
            outs.append(crop_padding(y, hw, multiple))
        return outs[0], outs[1]

    def forward(self, x: Tensor, output: str = "native") -> Tensor:
        """Canopy height in metres ``[B, 1, H', W']`` of normalised images (see the module docstring for ``output``)."""
        return self._run(x, output, with_std=False)[0]

    def forward_with_uncertainty(self, x: Tensor, output: str = "native") -> tuple[Tensor, Tensor]:
        """``(height, std)`` in metres, ``std`` being the standard deviation of the bin distribution."""
        h, s = self._run(x, output, with_std=True)
        assert s is not None
        return h, s


# ----------------------------------------------------------------------------- loading
def _head_state_dict(obj: Any, what: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{what} is not a state dict (a dict of tensors); it holds a {type(obj).__name__}")
    inner: Any = obj
    for key in ("state_dict", "model", "decoder"):
        if not all(isinstance(v, Tensor) for v in inner.values()) and isinstance(inner.get(key), Mapping):
            inner = inner[key]
    bad = [str(k) for k, v in inner.items() if not isinstance(v, Tensor)]
    if bad or not inner:
        raise CheckpointError(f"{what} is not a head state dict of tensors; non-tensor entries: {bad[:12]}")
    sd = dict(inner)
    for prefix in ("module.", "decoder.", "head."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _build_head(sd: Mapping[str, Tensor], what: str, factors: Sequence[float] | None = None) -> DPTHead:
    try:
        cfg = dpt_config_from_state_dict(sd, what)
    except KeyError as e:
        needed = ("reassemble_blocks.projects.0.conv.weight", "convs.0.conv.weight",
                  "conv_depth.head.2.weight", "conv_depth.head.4.weight")
        raise CheckpointError(str(e.args[0]), missing=[k for k in needed if k not in sd]) from e
    if factors is not None:
        cfg["factors"] = list(factors)
    shell = DPTHead(**cfg, device="meta")
    missing, unexpected, mismatched = _diff(shell.state_dict(), sd)
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{what} does not fit a DPT head with the dimensions read from it ({cfg})",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    head = DPTHead(**cfg)
    head.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return head


def _read_hf_config(config: Any, source: Any) -> dict[str, Any]:
    if config is None:
        if isinstance(source, (str, os.PathLike)):
            side = Path(source).with_name("config.json")
            if side.is_file():
                config = side
        if config is None:
            return {}
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    path = Path(config)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the Hugging Face config {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def is_hf_state_dict(sd: Mapping[str, Any]) -> bool:
    """True for transformers ``CHMv2ForDepthEstimation`` key names (``backbone.embeddings.*``, ``head.*``)."""
    return any(k.startswith("backbone.embeddings.") for k in sd) and any(k.startswith("head.") for k in sd)


def load_chmv2(
    backbone: str | os.PathLike[str] | Mapping[str, Any],
    head: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    layers: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CHMv2:
    """Load Meta's CHMv2 from its two released files, or from the Hugging Face single checkpoint.

    Args:
        backbone: Meta's backbone file / state dict; or, with ``head=None``, the HF checkpoint
            (``model.safetensors`` / ``.pth`` / a state dict with ``backbone.*`` and ``head.*`` keys).
        head: Meta's DPT head file / state dict (keys without prefix; a ``decoder.`` prefix is stripped).
        config: HF only: ``config.json`` (path or dict; default: ``config.json`` beside the file) giving
            ``num_attention_heads``, ``layer_norm_eps``, ``out_indices``, ``rope_theta`` and bin settings.
            Without one the released values are assumed (head dim 64, eps 1e-5, Meta's bins).
        layers: override the tapped blocks (0-based).
        device, dtype: where and in which precision the model runs (fp32 default; no autocast).

    Raises:
        CheckpointError: unreadable files or keys/shapes that do not fit, with the missing / unexpected /
            mismatched keys listed.
    """
    bins_kw: dict[str, Any] = {}
    factors = None
    if head is None:
        what = str(backbone) if not isinstance(backbone, Mapping) else "the given state dict"
        sd = read_checkpoint(backbone)
        if not isinstance(sd, Mapping) or not is_hf_state_dict(sd):
            raise CheckpointError(
                f"{what} is not a Hugging Face CHMv2 checkpoint (no backbone.embeddings.* / head.* keys); "
                "for Meta's release give both files: load_chmv2(backbone_path, head_path)"
            )
        cfg = _read_hf_config(config, backbone)
        bcfg = dict(cfg.get("backbone_config") or {})
        b_sd, h_sd = from_hf_state_dict(
            sd, num_heads=bcfg.get("num_attention_heads"), rope_base=float(bcfg.get("rope_theta", 100.0))
        )
        overrides = {"norm_eps": float(bcfg["layer_norm_eps"])} if "layer_norm_eps" in bcfg else {}
        bb = load_backbone(b_sd, device="cpu", **overrides)
        if layers is None and bcfg.get("out_indices"):
            layers = [int(i) - 1 for i in bcfg["out_indices"]]
        elif layers is None and bcfg.get("out_features"):  # ["stage6", ...]: stage N = block N - 1
            layers = [int(str(f).removeprefix("stage")) - 1 for f in bcfg["out_features"]]
        for ours, theirs in (("min_height", "min_depth"), ("max_height", "max_depth"),
                             ("strategy", "bins_strategy"), ("norm", "norm_strategy")):
            if theirs in cfg:
                bins_kw[ours] = cfg[theirs]
        if cfg.get("reassemble_factors"):
            factors = [float(f) for f in cfg["reassemble_factors"]]
        if cfg.get("readout_type") not in (None, "project", "ignore"):
            raise CheckpointError(f"{what}: readout_type {cfg['readout_type']!r} is not supported")
        dpt = _build_head(h_sd, f"{what} (head.* keys)", factors)
    else:
        bb = load_backbone(backbone, device="cpu")
        if not isinstance(bb, DinoVisionTransformer):
            where = str(backbone) if not isinstance(backbone, Mapping) else "the given backbone state dict"
            raise CheckpointError(convnext_refusal(bb, where))
        what = str(head) if not isinstance(head, Mapping) else "the given head state dict"
        dpt = _build_head(_head_state_dict(read_checkpoint(head), what), what)
    bins = HeightBins(dpt.n_bins, **bins_kw)
    model = CHMv2(bb, dpt, bins, layers)
    periods = model.backbone.rope_embed.periods.detach().clone()
    model = model.to(device=device, dtype=dtype)
    model.backbone.rope_embed.periods.data = periods.to(device)  # RoPE periods stay as loaded (fp32)
    return model.eval()


# ----------------------------------------------------------------------------- Hugging Face key map
_HEAD_RULES = [
    (r"reassemble_blocks\.projects\.(\d+)\.conv\.", r"reassemble_stage.layers.\1.projection."),
    (r"reassemble_blocks\.resize_layers\.(\d+)\.", r"reassemble_stage.layers.\1.resize."),
    (r"reassemble_blocks\.readout_projects\.(\d+)\.0\.", r"reassemble_stage.readout_projects.\1.0."),
    (r"convs\.(\d+)\.conv\.", r"convs.\1."),
    (r"fusion_blocks\.(\d+)\.project\.conv\.", r"fusion_layers.\1.projection."),
    (r"fusion_blocks\.(\d+)\.res_conv_unit(\d)\.conv(\d)\.conv\.", r"fusion_layers.\1.residual_layer\2.convolution\3."),
    (r"conv_depth\.head\.(\d+)\.", r"conv_depth.head.\1."),
]
_HEAD_RULES_BACK = [
    (r"reassemble_stage\.layers\.(\d+)\.projection\.", r"reassemble_blocks.projects.\1.conv."),
    (r"reassemble_stage\.layers\.(\d+)\.resize\.", r"reassemble_blocks.resize_layers.\1."),
    (r"reassemble_stage\.readout_projects\.(\d+)\.0\.", r"reassemble_blocks.readout_projects.\1.0."),
    (r"convs\.(\d+)\.", r"convs.\1.conv."),
    (r"fusion_layers\.(\d+)\.projection\.", r"fusion_blocks.\1.project.conv."),
    (r"fusion_layers\.(\d+)\.residual_layer(\d)\.convolution(\d)\.", r"fusion_blocks.\1.res_conv_unit\2.conv\3.conv."),
    (r"conv_depth\.head\.(\d+)\.", r"conv_depth.head.\1."),
]
_BLOCK_RULES = [  # Meta block suffix -> HF layer suffix (qkv handled apart)
    ("norm1.", "norm1."),
    ("norm2.", "norm2."),
    ("attn.proj.", "attention.o_proj."),
    ("ls1.gamma", "layer_scale1.lambda1"),
    ("ls2.gamma", "layer_scale2.lambda1"),
    ("mlp.fc1.", "mlp.up_proj."),
    ("mlp.fc2.", "mlp.down_proj."),
    ("mlp.w1.", "mlp.gate_proj."),
    ("mlp.w2.", "mlp.up_proj."),
    ("mlp.w3.", "mlp.down_proj."),
]
_TOP_RULES = [
    ("cls_token", "embeddings.cls_token"),
    ("storage_tokens", "embeddings.register_tokens"),
    ("patch_embed.proj.weight", "embeddings.patch_embeddings.weight"),
    ("patch_embed.proj.bias", "embeddings.patch_embeddings.bias"),
    ("norm.weight", "norm.weight"),
    ("norm.bias", "norm.bias"),
]


def _map_head(sd: Mapping[str, Tensor], rules: list[tuple[str, str]], what: str) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            if re.match(pat, k):
                out[re.sub("^" + pat, rep, k)] = v
                break
        else:
            raise CheckpointError(f"{what}: no Hugging Face/Meta counterpart for head key {k!r}", unexpected=[k])
    return out


def _backbone_to_hf(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    swiglu = any(".mlp.w1." in k for k in sd)
    for k, v in sd.items():
        if k in ("rope_embed.periods",) or k.endswith(".bias_mask") or k.startswith("local_cls_norm."):
            continue  # HF recomputes the periods; bias_mask is folded into k_proj.bias; local_cls_norm is training-only
        if k.startswith("cls_norm."):
            raise CheckpointError("transformers' DINOv3 has no separate cls_norm", unexpected=[k])
        if k == "mask_token":
            out["embeddings.mask_token"] = v.reshape(1, 1, -1)
            continue
        top = dict(_TOP_RULES).get(k)
        if top is not None:
            out[top] = v
            continue
        m = re.match(r"blocks\.(\d+)\.(.+)$", k)
        if m is None:
            raise CheckpointError(f"no Hugging Face counterpart for backbone key {k!r}", unexpected=[k])
        n, rest = m.group(1), m.group(2)
        pre = f"model.layer.{n}."
        if rest == "attn.qkv.weight":
            for name, part in zip("qkv", v.chunk(3), strict=True):
                out[f"{pre}attention.{name}_proj.weight"] = part
        elif rest == "attn.qkv.bias":
            mask = sd.get(f"blocks.{n}.attn.qkv.bias_mask")
            b = v * mask.to(v.dtype) if mask is not None else v
            for name, part in zip("qkv", b.chunk(3), strict=True):
                out[f"{pre}attention.{name}_proj.bias"] = part
        else:
            for a, b_ in _BLOCK_RULES:
                if rest.startswith(a) and (swiglu or not a.startswith("mlp.w")):
                    out[pre + b_ + rest[len(a) :]] = v
                    break
            else:
                raise CheckpointError(f"no Hugging Face counterpart for backbone key {k!r}", unexpected=[k])
    if not any(".layer_scale1." in k for k in out):  # HF always has LayerScale: identity
        depth = 1 + max(int(m.group(1)) for k in out if (m := re.match(r"model\.layer\.(\d+)\.", k)))
        dim = out["embeddings.cls_token"].shape[-1]
        for n in range(depth):
            for i in (1, 2):
                out[f"model.layer.{n}.layer_scale{i}.lambda1"] = torch.ones(dim)
    return out


def _backbone_from_hf(sd: Mapping[str, Tensor], num_heads: int | None, rope_base: float) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    swiglu = any(".mlp.gate_proj." in k for k in sd)
    inv_top = {b: a for a, b in _TOP_RULES}
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"model\.layer\.(\d+)\.", k))})
    for k, v in sd.items():
        if k == "embeddings.mask_token":
            out["mask_token"] = v.reshape(1, -1)
        elif k in inv_top:
            out[inv_top[k]] = v
        elif k.startswith("rope_embeddings."):
            continue
        elif not re.match(r"model\.layer\.\d+\.", k):
            raise CheckpointError(f"no Meta counterpart for Hugging Face backbone key {k!r}", unexpected=[k])
    for n in layers:
        pre, new = f"model.layer.{n}.", f"blocks.{n}."
        try:
            out[new + "attn.qkv.weight"] = torch.cat([sd[f"{pre}attention.{c}_proj.weight"] for c in "qkv"])
        except KeyError as e:
            raise CheckpointError(f"Hugging Face layer {n} lacks {e.args[0]}", missing=[str(e.args[0])]) from e
        if f"{pre}attention.q_proj.bias" in sd:
            q, v_ = sd[f"{pre}attention.q_proj.bias"], sd[f"{pre}attention.v_proj.bias"]
            kb = sd.get(f"{pre}attention.k_proj.bias")
            k_used = kb is not None and bool(kb.abs().max() > 0)
            kb = kb if kb is not None else torch.zeros_like(q)
            out[new + "attn.qkv.bias"] = torch.cat([q, kb, v_])
            mask = torch.ones(3 * q.shape[0], dtype=q.dtype)
            if not k_used:
                mask[q.shape[0] : 2 * q.shape[0]] = 0
            out[new + "attn.qkv.bias_mask"] = mask
        for k, v in sd.items():
            if not k.startswith(pre) or ".attention.q_proj." in k or ".attention.k_proj." in k or ".attention.v_proj." in k:
                continue
            rest = k[len(pre) :]
            for a, b_ in _BLOCK_RULES:
                if rest.startswith(b_) and (a.startswith("mlp.w") == swiglu or not a.startswith("mlp.")):
                    out[new + a + rest[len(b_) :]] = v
                    break
            else:
                raise CheckpointError(f"no Meta counterpart for Hugging Face key {k!r}", unexpected=[k])
    if "cls_token" not in out:
        raise CheckpointError("Hugging Face backbone without embeddings.cls_token", missing=["embeddings.cls_token"])
    dim = int(out["cls_token"].shape[-1])
    heads = int(num_heads) if num_heads else max(dim // 64, 1)
    if dim % heads:
        raise CheckpointError(f"width {dim} is not divisible by num_attention_heads={heads}")
    out["rope_embed.periods"] = compute_periods(dim // heads, rope_base, dtype=torch.float32)
    return out


def to_hf_state_dict(model: CHMv2) -> dict[str, Tensor]:
    """State dict for transformers' ``CHMv2ForDepthEstimation`` (``backbone.*`` and ``head.*``) of ``model``.

    The k bias is stored with the ``bias_mask`` applied; RoPE periods and ``local_cls_norm`` are dropped
    (transformers recomputes / does not use them).
    """
    b = _backbone_to_hf(model.backbone.state_dict())
    h = _map_head(model.head.state_dict(), _HEAD_RULES, "CHMv2 head")
    out = {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in b.items()}
    out.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in h.items()})
    return out


def from_hf_state_dict(
    sd: Mapping[str, Tensor], *, num_heads: int | None = None, rope_base: float = 100.0
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a transformers CHMv2 state dict into ``(Meta backbone state dict, Meta head state dict)``.

    ``num_heads`` (HF ``num_attention_heads``) sets the RoPE periods, which HF files do not store; default
    width / 64 (the released head dim). The K part of ``bias_mask`` is 0 unless the file has a non-zero
    key bias.
    """
    b = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    h = {k[len("head.") :]: v for k, v in sd.items() if k.startswith("head.")}
    other = [k for k in sd if not k.startswith(("backbone.", "head."))]
    if other:
        raise CheckpointError("Hugging Face CHMv2 state dict with keys outside backbone.*/head.*", unexpected=other)
    return _backbone_from_hf(b, num_heads, rope_base), _map_head(h, _HEAD_RULES_BACK, "Hugging Face CHMv2 head")


def to_hf_config(model: CHMv2) -> dict[str, Any]:
    """``config.json`` content (a ``CHMv2Config`` dict) describing ``model`` for transformers."""
    cfg = model.backbone.config
    if cfg.ffn_layer not in ("mlp", "swiglu"):
        raise ValueError(f"transformers' DINOv3 supports mlp and swiglu FFNs, not {cfg.ffn_layer!r}")
    eps = cfg.norm_eps if cfg.norm_eps is not None else 1e-5
    backbone = {
        "model_type": "dinov3_vit",
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.ffn_hidden_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "num_register_tokens": cfg.n_storage_tokens,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "query_bias": cfg.qkv_bias,
        "key_bias": cfg.qkv_bias,
        "value_bias": cfg.qkv_bias,
        "proj_bias": cfg.proj_bias,
        "mlp_bias": cfg.ffn_bias,
        "use_gated_mlp": cfg.ffn_layer == "swiglu",
        "hidden_act": "silu" if cfg.ffn_layer == "swiglu" else "gelu",
        "layer_norm_eps": eps,
        "layerscale_value": cfg.layerscale_init if cfg.layerscale_init is not None else 1.0,
        "rope_theta": cfg.pos_embed_rope_base if cfg.pos_embed_rope_base is not None else 100.0,
        "out_indices": [i + 1 for i in model.layers],
        "reshape_hidden_states": True,
        "apply_layernorm": True,
        "return_class_token": True,
    }
    head = model.head
    return {
        "model_type": "chmv2",
        "backbone_config": backbone,
        "patch_size": cfg.patch_size,
        "reassemble_factors": [int(f) if float(f).is_integer() else f for f in head.factors],
        "post_process_channels": list(head.post_process_channels),
        "fusion_hidden_size": head.channels,
        "head_hidden_size": head.n_hidden_channels,
        "number_output_channels": head.n_bins,
        "readout_type": head.readout,
        "min_depth": model.bins.min_height,
        "max_depth": model.bins.max_height,
        "bins_strategy": model.bins.strategy,
        "norm_strategy": model.bins.norm,
    }


def export_hf(model: CHMv2, folder: str | os.PathLike[str]) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (transformers layout) into ``folder``, atomically per file."""
    from safetensors.torch import save_file

    from dinov3geo.utils.atomic import atomic_path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.float().contiguous() for k, v in to_hf_state_dict(model).items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(to_hf_config(model), indent=2))
    return out
