"""``ConvNeXt``: the DINOv3 ConvNeXt backbones (tiny, small, base, large), same structure, keys and API as Meta's.

Meta released, next to the ViTs, four ConvNeXts distilled from the 7B teacher
(``dinov3_convnext_{tiny,small,base,large}_pretrain_lvd1689m-{21b726bb,296db49d,801f2ba9,61fa432d}.pth``).
This module reproduces ``dinov3/models/convnext.py`` of ``facebookresearch/dinov3``; where each fact comes
from:

* **Architecture** (Meta's ``dinov3/models/convnext.py``, itself ``facebookresearch/ConvNeXt``): stem
  ``Conv2d(in_chans, dims[0], 4, stride 4)`` + channels-first ``LayerNorm`` (eps 1e-6); three downsampling
  layers ``LayerNorm`` (channels-first, eps 1e-6) + ``Conv2d(dims[i], dims[i+1], 2, stride 2)``; blocks
  ``dwconv`` (7x7 depthwise, padding 3) -> permute to channels-last -> ``norm`` (LayerNorm eps 1e-6) ->
  ``pwconv1`` (Linear, 4x) -> GELU (exact erf) -> ``pwconv2`` -> ``gamma *`` (layer scale, init 1e-6) ->
  permute back -> per-sample drop path (``np.linspace(0, drop_path_rate, sum(depths))``) + residual;
  final ``norm = nn.LayerNorm(dims[-1], eps=1e-6)``; ``norms = [Identity, Identity, Identity, norm]``
  (the *same* module as ``norm``, so ``state_dict()`` lists it twice: ``norm.*`` and ``norms.3.*``);
  ``head = Identity``; ``embed_dim = dims[-1]``, ``embed_dims = dims``, ``n_blocks = 4``,
  ``n_storage_tokens = 0``, ``chunked_blocks = False``, ``input_pad_size = 4``. The sizes (Meta's
  ``convnext_sizes``, identical in timm's ``convnext_{tiny,small,base,large}``): tiny depths ``[3, 3, 9, 3]``
  dims ``[96, 192, 384, 768]``; small ``[3, 3, 27, 3]`` ``[96, 192, 384, 768]``; base ``[3, 3, 27, 3]``
  ``[128, 256, 512, 1024]``; large ``[3, 3, 27, 3]`` ``[192, 384, 768, 1536]``.
* **Checkpoint keys**: ``downsample_layers.0.{0,1}.{weight,bias}`` (stem conv, stem LN),
  ``downsample_layers.{1,2,3}.{0,1}.{weight,bias}`` (LN, conv), ``stages.{i}.{j}.{gamma, dwconv.weight,
  dwconv.bias, norm.weight, norm.bias, pwconv1.weight, pwconv1.bias, pwconv2.weight, pwconv2.bias}``,
  ``norm.{weight,bias}`` and ``norms.3.{weight,bias}``. Meta's hub loader (``dinov3/hub/backbones.py``,
  ``_make_dinov3_convnext``) loads the files with ``load_state_dict(strict=True)`` into that model, so the
  released files carry exactly these keys, ``norms.3`` included. timm 1.0.31's ``checkpoint_filter_fn``
  (``timm/models/convnext.py``, used for its ``convnext_*.dinov3_lvd1689m`` tags) maps the same names to
  its layout (``downsample_layers.0`` -> ``stem``, ``downsample_layers.i`` -> ``stages.i.downsample``,
  ``stages.i.j`` -> ``stages.i.blocks.j``, ``dwconv`` -> ``conv_dw``, ``pwconv`` -> ``mlp.fc``,
  ``norm`` -> ``head.norm``) and drops ``norms.*``; :func:`from_timm_convnext_state_dict` is its inverse.
* **Forward API** (Meta's code): ``forward_features`` runs the four stages, pools the last map
  (global average) into the "class token", and normalises ``[pooled, patch tokens]`` with ``norm``:
  ``x_norm_clstoken [B, C]``, ``x_storage_tokens [B, 0, C]``, ``x_norm_patchtokens [B, h*w, C]`` at the
  native stride-32 resolution (no resize there), ``x_prenorm`` = the *un-normalised patch tokens only*
  ``[B, h*w, C]`` (no pooled token, unlike the ViT), ``masks`` passed through (the ConvNeXt ignores
  them). ``forward(x)`` returns ``head(x_norm_clstoken)``; ``is_training=True`` the dict(s).
  ``get_intermediate_layers`` takes **stages** (``n`` = last n stages or 0-based stage indices); each
  stage's "class token" is the global average of its native map, its patch map is resized with
  ``F.interpolate(mode="bilinear", antialias=True)`` to ``(H // patch_size, W // patch_size)`` when
  ``patch_size`` is set; ``norm=True`` applies ``norms[i]``, i.e. **only the last stage is normalised**
  (stages 0-2 are returned raw, as in Meta's code).

What differs from Meta's class, all compatible extensions:

* ``patch_size`` defaults to **16**: Meta's ``build_model`` passes the config's ``student.patch_size`` to the
  ConvNeXt, and its distillation configs are the ``_p16`` ones
  (``dinov3/configs/train/distillation_convnext/convnext_*_p16.yaml``; the name, cited in public notes on
  the repository, not the file itself, was checked here), so a ConvNeXt gives the stride-16 grid that code
  written for a ViT/16 expects. Meta's constructor default and its hub builders leave it ``None`` (native
  stage resolutions), which ``patch_size=None`` keeps.
* Sequences ``n`` of ``get_intermediate_layers`` must be valid, distinct stage indices (Meta pairs the
  norms with ``n`` in the given order but the outputs in stage order; here outputs come in stage order,
  each with its own stage's norm, which is the same for sorted ``n``). ``return_extra_tokens`` (empty
  ``[B, 0, C]`` storage tokens) and ``pad_to_multiple`` exist for the ViT's signature.
* ``forward_features(list)`` accepts ``masks=None``; inputs smaller than 32x32 (the total stride) or with
  the wrong number of channels raise a readable ``ValueError``. ``ConvNeXt.tokens_on_grid = True`` (off by
  default, not part of the weights) makes ``forward_features`` return its patch tokens on the
  ``patch_size`` grid, the last stage map resized as ``get_intermediate_layers`` resizes it: what a ConvNeXt
  student distilled from a ViT/16 teacher needs for the iBOT loss at the teacher's patch indices.
* Numerically equivalent (float tolerance, not bitwise) faster kernels: channels-first LayerNorms run
  ``F.layer_norm`` on the channels-last view (one fused kernel instead of Meta's five elementwise ops);
  eval forwards without autograd take the input in channels-last memory layout (``ConvNeXt.channels_last``)
  and run each block as two fused oneDNN linears (``pwconv1`` + bias + GELU, ``pwconv2`` + bias + residual)
  with the layer scale folded into ``pwconv2`` (cached per block, see :meth:`Block.inference_weights`);
  about 1.5x timm's ConvNeXt-T forward on CPU in fp32 and bf16 (``benchmarks/backbone.py``). Training, or
  any forward with autograd on, runs Meta's block operation sequence. Under autocast the fast path keeps
  Meta's dtypes (bf16 matmuls and convs, fp32 residual stream).
* dinov3geo attributes shared with the ViT: ``config`` (:class:`ConvNeXtConfig`), ``metadata``,
  ``arch_name``, ``load_report``, ``num_features`` (= ``embed_dim``), and read-only views
  ``blocks`` (= ``stages``: ``len(blocks)`` is the number of tap points of ``get_intermediate_layers``, 4)
  and ``patch_embed`` (``.proj`` = the stem conv, kernel 4 / stride 4, not ``patch_size``; ``.in_chans``),
  which the multispectral widening and band checks use. There are no ``cls_token``, ``mask_token``,
  ``storage_tokens`` or ``rope_embed``, and stage widths differ (``embed_dims``): only the last stage has
  ``embed_dim`` channels.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3geo.models.padding import pad_to_patch_multiple

logger = logging.getLogger(__name__)

#: Meta's ``convnext_sizes`` (``dinov3/models/convnext.py``).
CONVNEXT_SIZES: dict[str, dict[str, tuple[int, ...]]] = {
    "tiny": {"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768)},
    "small": {"depths": (3, 3, 27, 3), "dims": (96, 192, 384, 768)},
    "base": {"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024)},
    "large": {"depths": (3, 3, 27, 3), "dims": (192, 384, 768, 1536)},
}

#: Key of the stem convolution weight ``[dims[0], in_chans, 4, 4]`` in Meta's layout.
STEM_WEIGHT_KEY = "downsample_layers.0.0.weight"
#: The total stride of the four stages (stem 4 x three 2x downsamplings).
TOTAL_STRIDE = 32

_ALIASES: dict[str, str] = {
    "layer_scale_init": "layer_scale_init_value",
    "layerscale_init": "layer_scale_init_value",
    "drop_path": "drop_path_rate",
}


@dataclass(frozen=True)
class ConvNeXtConfig:
    """Constructor arguments of :class:`ConvNeXt` (Meta's names).

    ``depths``/``dims``: blocks and channels of the four stages. ``layer_scale_init_value``: init of
    ``gamma`` (``<= 0``: no layer scale, no ``gamma`` keys). ``patch_size``: the stride of the grid that
    ``get_intermediate_layers`` resizes stage maps to (``None``: native stage resolutions); it does not
    change the weights.
    """

    family: ClassVar[str] = "convnext"

    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    in_chans: int = 3
    drop_path_rate: float = 0.0
    layer_scale_init_value: float = 1e-6
    patch_size: int | None = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if len(self.depths) != 4 or len(self.dims) != 4:
            raise ValueError(
                f"a DINOv3 ConvNeXt has 4 stages: depths and dims need 4 entries, got {list(self.depths)} "
                f"and {list(self.dims)}"
            )
        if min(self.depths) <= 0 or min(self.dims) <= 0:
            raise ValueError(f"depths and dims must be positive, got {list(self.depths)}, {list(self.dims)}")
        if self.in_chans <= 0:
            raise ValueError(f"in_chans must be positive, got {self.in_chans}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.patch_size is not None and int(self.patch_size) <= 0:
            raise ValueError(f"patch_size must be positive or None, got {self.patch_size}")

    @property
    def embed_dim(self) -> int:
        """Width of the output tokens (the last stage's)."""
        return self.dims[-1]

    @property
    def n_storage_tokens(self) -> int:
        """Always 0: a ConvNeXt has no register tokens."""
        return 0

    def replace(self, **overrides: Any) -> ConvNeXtConfig:
        """A copy with ``overrides`` applied (``layerscale_init`` / ``drop_path`` aliases accepted)."""
        fields = {f.name for f in dataclasses.fields(self)}
        resolved: dict[str, Any] = {}
        for key, value in overrides.items():
            name = _ALIASES.get(key, key)
            if name not in fields:
                raise TypeError(
                    f"unknown ConvNeXt option {key!r}; valid options: {sorted(fields | set(_ALIASES))}"
                )
            resolved[name] = value
        return dataclasses.replace(self, **resolved)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form with ``"family": "convnext"`` (primitive types: JSON and ``weights_only`` safe)."""
        out: dict[str, Any] = {"family": self.family}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConvNeXtConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``."""
        data = dict(data)
        family = data.pop("family", cls.family)
        if family != cls.family:
            raise TypeError(f"not a ConvNeXt config (family {family!r})")
        return cls().replace(**data)


# ----------------------------------------------------------------------------- layers
def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Per-sample stochastic depth, exactly Meta's ``drop_path`` (scaled Bernoulli mask)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    return x.div(keep_prob) * random_tensor


class DropPath(nn.Module):
    """Module form of :func:`drop_path`."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)


class LayerNorm(nn.Module):
    """Meta's ConvNeXt ``LayerNorm``: ``channels_last`` (``[..., C]``) or ``channels_first`` (``[B, C, H, W]``).

    The channels-first form normalises over ``C`` with the biased variance, ``(x - u) / sqrt(s + eps)``
    then ``weight * x + bias``, the same maths as ``F.layer_norm`` on the channels-last view, which is what
    runs here (one fused kernel; equal to Meta's formula within float rounding).
    """

    def __init__(
        self,
        normalized_shape: int,
        eps: float = 1e-6,
        data_format: str = "channels_last",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"data_format must be channels_last or channels_first, got {data_format!r}")
        self.weight = nn.Parameter(torch.empty(normalized_shape, device=device))
        self.bias = nn.Parameter(torch.empty(normalized_shape, device=device))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (normalized_shape,)

    def init_weights(self) -> None:
        """Ones / zeros, as Meta's ``init_weights``."""
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    reset_parameters = init_weights

    def forward(self, x: Tensor) -> Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, data_format={self.data_format}"


class _FusedLinears:
    """oneDNN's fused linear + pointwise ops (``torch.ops.mkldnn._linear_pointwise``), when this build has them.

    They are private PyTorch ops (Inductor's CPU lowering of ``linear + gelu`` / ``linear + add``); any
    failure switches them off for the process (logged once) and the plain ATen path runs instead.
    """

    def __init__(self) -> None:
        self.enabled = bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")

    def linear_pointwise(self, x: Tensor, w: Tensor, b: Tensor, attr: str, scalars: list, algo: str) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, attr, scalars, algo)

    def linear_binary(self, x: Tensor, other: Tensor, w: Tensor, b: Tensor, attr: str) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, w, b, attr)

    def disable(self, error: BaseException) -> None:
        self.enabled = False
        logger.warning("oneDNN fused linears unavailable (%s); ConvNeXt uses the plain path", error)


_MKLDNN = _FusedLinears()


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype linears run in: the autocast dtype of ``x``'s device when autocast is on, else ``x.dtype``."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _use_fused(x: Tensor, y: Tensor) -> bool:
    return (
        _MKLDNN.enabled
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and _compute_dtype(y) in (torch.float32, torch.bfloat16)
        and x.is_contiguous(memory_format=torch.channels_last)
    )


class Block(nn.Module):
    """ConvNeXt block: ``x + drop_path(gamma * pwconv2(gelu(pwconv1(norm(dwconv(x))))))`` (Meta's names)."""

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, device=device)
        self.norm = LayerNorm(dim, eps=1e-6, device=device)
        self.pwconv1 = nn.Linear(dim, 4 * dim, device=device)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim, device=device)
        self.layer_scale_init_value = layer_scale_init_value
        self.gamma = (
            nn.Parameter(layer_scale_init_value * torch.ones(dim, device=device))
            if layer_scale_init_value > 0
            else None
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self._inference_cache: dict[torch.dtype, tuple[tuple, tuple[Tensor, Tensor, Tensor, Tensor]]] = {}

    def train(self, mode: bool = True) -> Block:
        """As ``nn.Module.train``; also drops the cached inference weights."""
        self._inference_cache.clear()
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and not torch.is_grad_enabled():
            return self._forward_inference(x)
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)

    def inference_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(W1, b1, gamma W2, gamma b2)`` in ``dtype``, cached until a parameter changes (eval forwards).

        The cache lives outside the state dict; it is keyed on the parameters' storage and version counters
        (so ``load_state_dict``, optimiser steps or ``.to()`` invalidate it), holds one entry per dtype and
        is dropped by ``train()`` and :meth:`ConvNeXt.clear_inference_cache`. Parameters created under
        ``torch.inference_mode`` have no version counter: they are folded anew at every call, uncached.
        """
        params = (self.pwconv1.weight, self.pwconv1.bias, self.pwconv2.weight, self.pwconv2.bias, self.gamma)
        cacheable = not any(p is not None and p.is_inference() for p in params)
        key = tuple((p.data_ptr(), p._version) if p is not None else None for p in params) if cacheable else None
        hit = self._inference_cache.get(dtype)
        if key is not None and hit is not None and hit[0] == key:
            return hit[1]
        w1, b1, w2, b2, gamma = params
        with torch.no_grad():
            if gamma is not None:
                w2, b2 = w2 * gamma.unsqueeze(1), b2 * gamma
            weights = (w1.to(dtype), b1.to(dtype), w2.to(dtype), b2.to(dtype))
        if key is not None:
            self._inference_cache[dtype] = (key, weights)
        return weights

    def _forward_inference(self, x: Tensor) -> Tensor:
        """Eval without autograd: Meta's maths (float tolerance) in fewer passes over memory.

        ``gamma`` is folded into ``pwconv2`` (``gamma * (W h + b) = (gamma W) h + gamma b``, cached by
        :meth:`inference_weights`); on CPU with oneDNN, ``pwconv1`` + bias + GELU and ``pwconv2`` + bias +
        residual run as fused oneDNN linears (``torch.ops.mkldnn._linear_pointwise``, what Inductor emits)
        on the channels-last tokens. Under autocast the linears run in the autocast dtype and the result
        takes Meta's dtype (``x`` promoted with the fp32 ``gamma``), so the residual stream stays fp32 as in
        the reference.
        """
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))  # [B, H, W, C]
        dt = _compute_dtype(y)
        w1, b1, w2, b2 = self.inference_weights(dt)
        # Meta: shortcut + gamma * linear_out, i.e. x's dtype promoted with gamma's (or the linear's)
        out_dtype = torch.promote_types(x.dtype, self.gamma.dtype if self.gamma is not None else dt)
        if _use_fused(x, y):
            B, H, W, C = y.shape
            try:
                h = _MKLDNN.linear_pointwise(y.reshape(-1, C).to(dt), w1, b1, "gelu", [], "none")
                res = x.permute(0, 2, 3, 1).reshape(-1, C)
                if x.dtype == dt == out_dtype:
                    out = _MKLDNN.linear_binary(h, res, w2, b2, "add")
                else:  # autocast: bf16 linear, residual added in (and promoted to) Meta's dtype in one pass
                    out = torch.add(res.to(out_dtype), _MKLDNN.linear_pointwise(h, w2, b2, "none", [], ""))
                return out.view(B, H, W, C).permute(0, 3, 1, 2)
            except RuntimeError as e:  # pragma: no cover - depends on the oneDNN build
                _MKLDNN.disable(e)
        y = F.linear(F.gelu(F.linear(y.to(dt), w1, b1)), w2, b2).permute(0, 3, 1, 2)
        return x.to(out_dtype) + y.to(out_dtype)


class _StemView:
    """What the ViT's ``patch_embed`` offers the rest of the package: ``proj`` (the stem conv) and ``in_chans``."""

    def __init__(self, model: ConvNeXt) -> None:
        self._model = model

    @property
    def proj(self) -> nn.Conv2d:
        return self._model.downsample_layers[0][0]  # type: ignore[return-value]

    @proj.setter
    def proj(self, conv: nn.Conv2d) -> None:
        self._model.downsample_layers[0][0] = conv
        self._model.config = self._model.config.replace(in_chans=int(conv.in_channels))

    @property
    def in_chans(self) -> int:
        return int(self.proj.in_channels)

    @in_chans.setter
    def in_chans(self, value: int) -> None:
        if int(value) != self.in_chans:
            raise ValueError(f"replace patch_embed.proj to change in_chans (stem has {self.in_chans})")


# ----------------------------------------------------------------------------- model
class ConvNeXt(nn.Module):
    """The DINOv3 ConvNeXt. Build it with :func:`dinov3geo.models.build_backbone` (``"convnext_tiny"`` ...).

    ``ConvNeXt(config)`` or Meta-style keyword arguments (``ConvNeXt(depths=[3, 3, 9, 3], dims=[96, 192, 384,
    768], patch_size=None)``; any :class:`ConvNeXtConfig` field, applied on top of ``config``). Parameters
    are created uninitialised (``torch.empty``, as in Meta's code, except ``gamma``); call
    :meth:`init_weights` (``build_backbone`` does) or load a checkpoint.
    """

    def __init__(
        self, config: ConvNeXtConfig | None = None, *, device: Any | None = None, **kwargs: Any
    ) -> None:
        super().__init__()
        cfg = (config or ConvNeXtConfig()).replace(**kwargs) if kwargs else (config or ConvNeXtConfig())
        self.config = cfg
        depths, dims = cfg.depths, cfg.dims

        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(
            nn.Sequential(
                nn.Conv2d(cfg.in_chans, dims[0], kernel_size=4, stride=4, device=device),
                LayerNorm(dims[0], eps=1e-6, data_format="channels_first", device=device),
            )
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm(dims[i], eps=1e-6, data_format="channels_first", device=device),
                    nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2, device=device),
                )
            )
        total = sum(depths)
        step = cfg.drop_path_rate / (total - 1) if total > 1 else 0.0  # np.linspace(0, rate, total)
        dp_rates = [k * step for k in range(total)]
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(4):
            self.stages.append(
                nn.Sequential(
                    *[
                        Block(dims[i], dp_rates[cur + j], cfg.layer_scale_init_value, device=device)
                        for j in range(depths[i])
                    ]
                )
            )
            cur += depths[i]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6, device=device)

        self.head = nn.Identity()
        self.num_features = self.embed_dim = dims[-1]
        self.embed_dims = list(dims)
        self.n_blocks = len(self.downsample_layers)
        self.chunked_blocks = False
        self.n_storage_tokens = 0
        self.norms = nn.ModuleList([nn.Identity() for _ in range(3)])
        self.norms.append(self.norm)
        self.input_pad_size = 4
        #: run eval forwards in channels-last memory layout (faster on CPU; same values)
        self.channels_last = True
        #: ``forward_features`` gives patch tokens on the ``patch_size`` grid (the last stage map resized as
        #: ``get_intermediate_layers`` does) instead of Meta's native stride-32 tokens; the pooled "class token"
        #: is unchanged. Set on a ConvNeXt *student* distilled from a ViT/16 teacher, whose iBOT targets are
        #: the teacher's 16 px patch tokens (:mod:`dinov3geo.ssl.meta_arch`); not saved with the weights.
        self.tokens_on_grid = False
        self.metadata: Any = None  # BackboneMetadata attached by load_backbone
        self.arch_name: str | None = None  # registered arch name, set by build_backbone / load_backbone
        self.load_report: Any = None  # checkpoint.LoadReport, set by load_backbone

    # ------------------------------------------------------------ attributes
    @property
    def patch_size(self) -> int | None:
        """Stride of the grid stage maps are resized to (``None``: native); stored in ``config``."""
        return self.config.patch_size

    @patch_size.setter
    def patch_size(self, value: int | None) -> None:
        self.config = self.config.replace(patch_size=value)

    @property
    def blocks(self) -> nn.ModuleList:
        """The four stages (``len(blocks)`` = tap points of :meth:`get_intermediate_layers`)."""
        return self.stages

    @property
    def patch_embed(self) -> _StemView:
        """A view of the stem conv with the ViT's ``patch_embed`` attribute names (``proj``, ``in_chans``)."""
        return _StemView(self)

    def clear_inference_cache(self) -> None:
        """Free the per-block cached inference weights (see :meth:`Block.inference_weights`)."""
        for stage in self.stages:
            for block in stage:
                block._inference_cache.clear()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Meta's init: trunc-normal(0.02) conv/linear weights, zero biases, LN ones/zeros, gamma = init value."""
        self.apply(self._init_weights)
        for stage in self.stages:
            for block in stage:
                if block.gamma is not None:
                    nn.init.constant_(block.gamma, block.layer_scale_init_value)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.LayerNorm, LayerNorm)):
            module.reset_parameters()
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # -------------------------------------------------------------- forward
    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"ConvNeXt expects images [B, C, H, W], got a tensor of shape {tuple(x.shape)}")
        c_in = self.downsample_layers[0][0].in_channels
        if x.shape[1] != c_in:
            raise ValueError(f"ConvNeXt takes {c_in} input bands, got {x.shape[1]} (shape {tuple(x.shape)})")
        if min(x.shape[-2:]) < TOTAL_STRIDE:
            raise ValueError(
                f"ConvNeXt inputs must be at least {TOTAL_STRIDE}x{TOTAL_STRIDE} pixels (its total stride), "
                f"got {x.shape[-2]}x{x.shape[-1]}"
            )

    def _layout(self, x: Tensor) -> Tensor:
        if self.channels_last and not self.training:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _resize(self, x: Tensor, h: int, w: int) -> Tensor:
        p = self.patch_size
        if p is None:
            return x
        return F.interpolate(x, size=(h // p, w // p), mode="bilinear", antialias=True)

    def forward_features_list(
        self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None]
    ) -> list[dict[str, Tensor | None]]:
        """Features of several crop sets (one dict each); ``masks`` are passed through unused, as in Meta's code."""
        if len(x_list) != len(masks_list):
            raise ValueError(f"got {len(x_list)} inputs but {len(masks_list)} masks")
        output: list[dict[str, Tensor | None]] = []
        for x, masks in zip(x_list, masks_list, strict=True):
            self._check_input(x)
            h, w = x.shape[-2:]
            x = self._layout(x)
            for i in range(4):
                x = self.downsample_layers[i](x)
                x = self.stages[i](x)
            x_pool = x.mean([-2, -1])
            if self.tokens_on_grid:  # dinov3geo: patch tokens on the stride-``patch_size`` grid (SSL students)
                x = self._resize(x, h, w)
            x = torch.flatten(x, 2).transpose(1, 2)
            # Meta normalises cat([pool, patches]); LayerNorm is per token, so normalising them apart is equal
            cls = self.norm(x_pool)
            patches = self.norm(x)
            output.append(
                {
                    "x_norm_clstoken": cls,
                    "x_storage_tokens": patches[:, :0],
                    "x_norm_patchtokens": patches,
                    "x_prenorm": x,
                    "masks": masks,
                }
            )
        return output

    def forward_features(
        self, x: Tensor | list[Tensor], masks: Tensor | None | list[Tensor | None] = None
    ) -> dict[str, Tensor | None] | list[dict[str, Tensor | None]]:
        """Features of one batch (a dict) or of a list of crop sets (a list of dicts)."""
        if isinstance(x, Tensor):
            if isinstance(masks, list):
                raise TypeError("masks must be a Tensor or None when x is a single Tensor")
            return self.forward_features_list([x], [masks])[0]
        if masks is None:
            masks = [None] * len(x)
        if not isinstance(masks, list):
            raise TypeError("masks must be a list (one entry per crop set) when x is a list")
        return self.forward_features_list(x, masks)

    def forward(self, *args: Any, is_training: bool = False, **kwargs: Any) -> Any:
        """``head(x_norm_clstoken)`` (``head`` is Identity); with ``is_training=True`` the feature dict(s)."""
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        if isinstance(ret, list):
            return [self.head(r["x_norm_clstoken"]) for r in ret]
        return self.head(ret["x_norm_clstoken"])

    # ------------------------------------------------------ intermediate layers
    def _stages_to_take(self, n: int | Sequence[int]) -> list[int]:
        total = len(self.downsample_layers)
        if isinstance(n, int):
            if not 1 <= n <= total:
                raise ValueError(f"n must be between 1 and {total} (ConvNeXt stages), got {n}")
            return list(range(total - n, total))
        take = [int(i) for i in n]
        bad = [i for i in take if not 0 <= i < total]
        if bad:
            raise ValueError(f"stage indices {bad} out of range for a {total}-stage ConvNeXt (0-based)")
        if len(set(take)) != len(take):
            raise ValueError(f"duplicate stage indices in {take}")
        if not take:
            raise ValueError("n is an empty sequence")
        return sorted(take)

    def _get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1) -> list[tuple[int, Tensor, Tensor]]:
        """``(stage, pooled [B, C], patch map [B, C, h, w])`` of each taken stage (maps resized to the grid)."""
        self._check_input(x)
        h, w = x.shape[-2:]
        take = self._stages_to_take(n)
        last = take[-1]
        x = self._layout(x)
        output = []
        for i in range(len(self.downsample_layers)):
            if not self.training and i > last:
                break  # nothing left to collect; eval is deterministic so skipping changes nothing
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
            if i in take:
                output.append((i, x.mean([-2, -1]), self._resize(x, h, w)))
        return output

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
        *,
        return_extra_tokens: bool = False,
        pad_to_multiple: bool = False,
    ) -> tuple[Any, ...]:
        """Outputs of some stages, with Meta's semantics.

        Args:
            x: images ``[B, C, H, W]`` (at least 32x32).
            n: an int takes the last ``n`` stages; a sequence takes those 0-based stage indices (0-3).
            reshape: patch maps as ``[B, C_i, h, w]`` instead of tokens ``[B, h*w, C_i]``.
            return_class_token: return tuples ``(patches, pooled [B, C_i])``; the pooled token is the
                global average of the stage's native-resolution map.
            norm: apply ``norms[i]``: the final LayerNorm for stage 3, identity for stages 0-2.
            return_extra_tokens: dinov3geo extra (ViT signature): add empty ``[B, 0, C_i]`` storage tokens.
            pad_to_multiple: dinov3geo extra: centre-pad ``x`` to a multiple of ``patch_size`` (32 when
                ``patch_size`` is None) first.

        Returns:
            One entry per taken stage, in stage order. With ``patch_size`` set, maps are resized (bilinear,
            antialias) to ``(H // patch_size, W // patch_size)``; with ``None`` they keep the native
            stride 4 / 8 / 16 / 32 resolution of their stage.
        """
        if pad_to_multiple:
            x = pad_to_patch_multiple(x, self.patch_size or TOTAL_STRIDE)
        outputs = self._get_intermediate_layers(x, n)
        patches: list[Tensor] = []
        class_tokens: list[Tensor] = []
        for i, pool, maps in outputs:
            if norm:
                layer = self.norms[i]
                cls = layer(pool)
                tokens = layer(maps.flatten(-2, -1).transpose(1, 2))
                if reshape:
                    B, C, hh, ww = maps.shape
                    out = tokens.transpose(1, 2).reshape(B, C, hh, ww).contiguous()
                else:
                    out = tokens
            else:
                cls = pool
                out = maps.contiguous() if reshape else maps.flatten(-2, -1).transpose(1, 2)
            patches.append(out)
            class_tokens.append(cls)
        if return_class_token and return_extra_tokens:
            extra = [c.new_zeros(c.shape[0], 0, c.shape[-1]) for c in class_tokens]
            return tuple(zip(patches, class_tokens, extra, strict=True))
        if return_class_token:
            return tuple(zip(patches, class_tokens, strict=True))
        if return_extra_tokens:
            extra = [c.new_zeros(c.shape[0], 0, c.shape[-1]) for c in class_tokens]
            return tuple(zip(patches, extra, strict=True))
        return tuple(patches)


# ----------------------------------------------------------------------------- state dicts
_META_BLOCK = re.compile(r"stages\.(\d+)\.(\d+)\.")
_TIMM_BLOCK = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.")


def is_convnext_state_dict(sd: Mapping[str, Any]) -> bool:
    """True for a ConvNeXt state dict in Meta's layout (``downsample_layers.*``, ``stages.i.j.dwconv``) or
    timm's, even an incomplete one (so that loading it reports the ConvNeXt keys it lacks)."""
    return (
        any(k.startswith("downsample_layers.") or (_META_BLOCK.match(k) and ".dwconv." in k) for k in sd)
        or is_timm_convnext_state_dict(sd)
    )


def is_timm_convnext_state_dict(sd: Mapping[str, Any]) -> bool:
    """True for timm's ``ConvNeXt`` key names (``stem.0.weight``, ``stages.i.blocks.j.conv_dw``)."""
    return any(_TIMM_BLOCK.match(k) and ".conv_dw." in k for k in sd)


def from_timm_convnext_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Convert timm's ``convnext_*`` key layout to Meta's (the inverse of timm's ``checkpoint_filter_fn``).

    ``norms.3.*`` (absent from timm) aliases ``norm.*``; a classifier ``head.fc.*`` is dropped (logged).
    Keys that have no Meta counterpart are kept under their timm names, so that loading reports them.
    """
    out: dict[str, Tensor] = {}
    dropped = []
    for k, v in sd.items():
        if k.startswith(("head.fc.", "head.pre_logits.")):
            dropped.append(k)
            continue
        nk = k
        if nk.startswith("stem."):
            nk = "downsample_layers.0." + nk[len("stem.") :]
        nk = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", nk)
        nk = _TIMM_BLOCK.sub(r"stages.\1.\2.", nk)
        nk = nk.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc1.", ".pwconv1.").replace(".mlp.fc2.", ".pwconv2.")
        if nk.startswith("head.norm."):
            nk = "norm." + nk[len("head.norm.") :]
        if re.search(r"\.pwconv[12]\.weight$", nk) and v.ndim == 4 and v.shape[-2:] == (1, 1):
            v = v.flatten(1)  # timm's conv_mlp variant stores 1x1 convs
        out[nk] = v
    if dropped:
        logger.warning("dropping timm classifier entries not part of the DINOv3 ConvNeXt: %s", dropped)
    for leaf in ("weight", "bias"):
        if f"norm.{leaf}" in out:
            out.setdefault(f"norms.3.{leaf}", out[f"norm.{leaf}"])
    return out


def infer_convnext_config(sd: Mapping[str, Tensor]) -> ConvNeXtConfig:
    """Depths, dims, ``in_chans`` and layer scale of a Meta-layout ConvNeXt state dict.

    ``dims[i]`` from ``stages.i.0.dwconv.weight`` (``[C, 1, 7, 7]``), ``in_chans`` from the stem conv,
    ``depths[i]`` from the block indices of ``stages.i``, layer scale from the presence of ``gamma``.
    ``patch_size`` cannot be seen in the weights and takes the default 16. Raises ``CheckpointError``
    naming the missing keys when the layout is incomplete.
    """
    from dinov3geo.models.checkpoint import CheckpointError  # the checkpoint module imports this one

    required = [STEM_WEIGHT_KEY] + [f"stages.{i}.0.dwconv.weight" for i in range(4)]
    missing = [k for k in required if k not in sd]
    if missing:
        raise CheckpointError(
            "cannot infer the ConvNeXt architecture: not a complete DINOv3 ConvNeXt state dict", missing=missing
        )
    stem = sd[STEM_WEIGHT_KEY]
    if stem.ndim != 4:
        raise CheckpointError(f"{STEM_WEIGHT_KEY} should be a conv weight [C, in_chans, 4, 4], got {tuple(stem.shape)}")
    dims = tuple(int(sd[f"stages.{i}.0.dwconv.weight"].shape[0]) for i in range(4))
    depths = [0, 0, 0, 0]
    extra_stages = set()
    for k in sd:
        m = _META_BLOCK.match(k)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            if i < 4:
                depths[i] = max(depths[i], j + 1)
            else:
                extra_stages.add(k)
    if extra_stages:
        raise CheckpointError(
            "a DINOv3 ConvNeXt has 4 stages; the weights have more", unexpected=sorted(extra_stages)
        )
    has_gamma = "stages.0.0.gamma" in sd
    return ConvNeXtConfig(
        depths=tuple(depths),
        dims=dims,
        in_chans=int(stem.shape[1]),
        layer_scale_init_value=1e-6 if has_gamma else 0.0,
    )


__all__ = [
    "CONVNEXT_SIZES",
    "STEM_WEIGHT_KEY",
    "Block",
    "ConvNeXt",
    "ConvNeXtConfig",
    "DropPath",
    "LayerNorm",
    "from_timm_convnext_state_dict",
    "infer_convnext_config",
    "is_convnext_state_dict",
    "is_timm_convnext_state_dict",
]
