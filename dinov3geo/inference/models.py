"""The model interface of the inference engine, and adapters for torch modules and DINOv3 backbones.

A :class:`RasterModel` maps a batch of image windows ``[B, C, H, W]`` (raw raster values as ``float32``,
invalid pixels filled with 0) plus their valid masks ``[B, H, W]`` to ``[B, K, H / scale, W / scale]``
outputs, and declares what the engine needs to tile and blend it:

* ``out_bands`` / ``band_names`` / ``out_dtype`` / ``nodata``: the output raster;
* ``scale``: input pixels per output pixel (1 for dense heads, 16 for ViT/16 patch features);
* ``receptive_margin``: how far (input pixels) padding at a window edge can influence the output. The
  engine gives that edge margin zero weight and blends only beyond it, so for a model with a finite
  receptive field tiled inference equals whole-image inference. Global-attention models (ViTs) have no
  finite receptive field; their adapters declare a practical margin (edge tokens are the least reliable).

Normalisation belongs to the model (``preprocess``), so the engine stays model-agnostic: backbone features,
canopy heads and change heads all plug in the same way (a change head takes the stacked bands of both dates).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BackboneFeatures", "MeanFilter", "RasterModel", "TorchRasterModel"]


class RasterModel(ABC):
    """Base class of models the inference engine can run (see the module docstring).

    Subclasses set the attributes (as class attributes or in ``__init__``) and implement :meth:`forward`.

    Attributes:
        in_bands: number of input bands expected (None: any).
        out_bands: number of output bands ``K``.
        band_names: names of the output bands (written as COG band descriptions).
        out_dtype: output raster dtype (``"float32"`` unless the model emits classes).
        nodata: value written where the input is nodata or outside the AOI.
        scale: input pixels per output pixel (an integer >= 1).
        receptive_margin: edge margin in input pixels that gets zero blend weight.
        global_context: the output at a pixel depends on the whole window (a ViT's global attention), not
            only on its ``receptive_margin`` neighbourhood: the engine's default overlap is then half a window
            (wide blend ramps) instead of a quarter (:func:`~dinov3geo.inference.layout.default_overlap`).
    """

    in_bands: int | None = None
    out_bands: int = 1
    band_names: Sequence[str] = ()
    out_dtype: str = "float32"
    nodata: float | None = math.nan
    scale: int = 1
    receptive_margin: int = 0
    global_context: bool = False

    def preprocess(self, x: Tensor, valid: Tensor) -> Tensor:
        """Normalise raw values (default: unchanged). ``x`` is ``float32`` on the model's device."""
        return x

    @abstractmethod
    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """``[B, C, H, W]`` preprocessed windows, ``[B, H, W]`` bool masks -> ``[B, K, H/scale, W/scale]``."""

    def __call__(self, x: Tensor, valid: Tensor) -> Tensor:
        return self.forward(self.preprocess(x, valid), valid)

    def to(self, device: torch.device | str) -> RasterModel:
        """Move parameters to ``device`` (default: nothing to move); returns ``self``."""
        return self

    def eval(self) -> RasterModel:
        """Switch to inference mode (default: nothing to do); returns ``self``."""
        return self

    def names(self) -> list[str]:
        """Output band names, generated (``band_1``...) when not declared."""
        names = list(self.band_names)
        if len(names) != self.out_bands:
            names = [f"band_{k + 1}" for k in range(self.out_bands)]
        return names

    def fingerprint(self) -> str:
        """A string identifying the model's configuration and weights (resume refuses a different model).

        Hashing the weights is not free (a ViT-L CHMv2 model: 1.35 GB, seconds; on a GPU they are copied off
        first), so the result is cached until a weight changes (checked through the tensors' version
        counters and data pointers, which change with any in-place update or replacement)."""
        tensors = self._state_tensors()
        stamp = (self._fingerprint_config(), tuple((id(t), t.data_ptr(), t._version) for t in tensors))
        cached = getattr(self, "_fingerprint_cache", None)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        h = hashlib.sha1()
        h.update(repr(stamp[0]).encode())
        for t in tensors:
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digest = h.hexdigest()
        self._fingerprint_cache = (stamp, digest)
        return digest

    def _fingerprint_config(self) -> tuple[Any, ...]:
        return (type(self).__qualname__, self.in_bands, self.out_bands, tuple(self.names()), self.out_dtype,
                repr(self.nodata), self.scale, self.receptive_margin)

    def _state_tensors(self) -> list[Tensor]:
        return []


class _Normalise:
    """``((x * value_scale) - mean) / std`` per band; both optional."""

    def __init__(
        self, value_scale: float = 1.0, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ) -> None:
        self.value_scale = float(value_scale)
        self.mean = None if mean is None else torch.as_tensor(list(mean), dtype=torch.float32)[:, None, None]
        self.std = None if std is None else torch.as_tensor(list(std), dtype=torch.float32)[:, None, None]
        if self.mean is not None and self.std is not None and self.mean.shape != self.std.shape:
            raise ValueError("mean and std must have one value per band")

    def __call__(self, x: Tensor) -> Tensor:
        if self.value_scale != 1.0:
            x = x * self.value_scale
        if self.mean is not None:
            if x.shape[1] != self.mean.shape[0]:
                raise ValueError(f"input has {x.shape[1]} bands but the normalisation has {self.mean.shape[0]}")
            x = x - self.mean.to(x.device)
        if self.std is not None:
            x = x / self.std.to(x.device)
        return x


class TorchRasterModel(RasterModel):
    """Any ``nn.Module`` (``[B, C, H, W] -> [B, K, H/scale, W/scale]``) as a :class:`RasterModel`.

    Args:
        module: the network (put in eval mode by the engine).
        out_bands: ``K``.
        band_names: output band names (default ``band_1``...).
        scale: input pixels per output pixel.
        receptive_margin: edge margin in input pixels (the module's receptive field radius).
        in_bands: expected input bands (checked against the source).
        value_scale, mean, std: input normalisation ``(x * value_scale - mean) / std`` per band.
        out_dtype, nodata: output raster type and nodata value.
        pass_valid: call ``module(x, valid)`` instead of ``module(x)``.
    """

    def __init__(
        self,
        module: nn.Module,
        out_bands: int,
        band_names: Sequence[str] | None = None,
        *,
        scale: int = 1,
        receptive_margin: int = 0,
        in_bands: int | None = None,
        value_scale: float = 1.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        out_dtype: str = "float32",
        nodata: float | None = math.nan,
        pass_valid: bool = False,
    ) -> None:
        self.module = module
        self.out_bands = int(out_bands)
        self.band_names = tuple(band_names) if band_names is not None else ()
        self.scale = int(scale)
        self.receptive_margin = int(receptive_margin)
        self.in_bands = in_bands
        self.out_dtype = out_dtype
        self.nodata = nodata
        self.pass_valid = pass_valid
        self._norm = _Normalise(value_scale, mean, std)

    def preprocess(self, x: Tensor, valid: Tensor) -> Tensor:
        return self._norm(x)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        return self.module(x, valid) if self.pass_valid else self.module(x)

    def to(self, device: torch.device | str) -> TorchRasterModel:
        self.module.to(device)
        return self

    def eval(self) -> TorchRasterModel:
        self.module.eval()
        return self

    def _state_tensors(self) -> list[Tensor]:
        return list(self.module.state_dict().values())


class BackboneFeatures(RasterModel):
    """DINOv3 patch features (or a head on them) of a ``dinov3geo`` backbone, as a :class:`RasterModel`.

    The output is one band per feature channel at the patch resolution (``scale = patch_size``), i.e. the
    grid ``input_grid.scaled(16)``; with ``upsample=True`` the features are bilinearly resized back to input
    resolution (``scale = 1``; large outputs). An optional ``head`` (``[B, D, h, w] -> [B, K, h, w]``, e.g. a
    1x1 conv regression head) turns the features into ``K`` bands.

    **ConvNeXt backbones** (:class:`~dinov3geo.models.ConvNeXt`) work the same way: ``layer`` picks one of
    the four stages (``-1``: the last, ``embed_dim`` channels; stage ``i`` has ``embed_dims[i]``), whose map
    is resized to the 16 px grid by the backbone. Windows (multiples of 16) are padded at the bottom/right by
    reflection to a multiple of 32, the ConvNeXt's total stride, and the features cropped back
    (:func:`dinov3geo.models.taps.tap_maps`); windows whose origins are multiples of 32 then give the same
    features where they overlap, away from the window edges (the engine's lattice puts origins on multiples
    of 32 when the window and the overlap are, except the last row/column of windows, shifted to end at the
    grid edge: aligned too when the raster side minus the window is a multiple of 32, else their stage-3
    cells sit 16 px off those of their neighbours, which the blend ramp hides). Eval forwards run in
    channels-last memory layout from the stem on (``ConvNeXt.channels_last``, the default: bitwise the same
    features as NCHW input, as fast or faster: ``benchmarks/backbone.py --settings``) with oneDNN's fused
    linears; precision follows the engine's ``amp``: fp32 on CPU unless asked (``amp="bf16"``, only worth it on
    CPUs with native bf16, :func:`dinov3geo.utils.cpu.native_bf16`, and not exact: about 3e-2 absolute on the
    normalised features of ConvNeXt-T).

    Args:
        backbone: a :class:`~dinov3geo.models.DinoVisionTransformer` or :class:`~dinov3geo.models.ConvNeXt`
            (``get_intermediate_layers`` API).
        value_scale: factor taking raw values to ``[0, 1]`` (e.g. ``1/255`` for uint8, ``1e-4`` for S2 L2A).
        mean, std: per-band normalisation after ``value_scale`` (default, for 3 input channels: the backbone
            family's RGB statistics, :func:`dinov3geo.models.taps.default_normalization`: SAT-493M for a
            ViT, LVD-1689M (ImageNet) for a ConvNeXt; else none).
        layer: which block's (ConvNeXt: stage's) output (``-1`` last).
        head: optional module applied to the ``[B, D, h, w]`` features.
        out_bands, band_names: when a head is given, its output bands (default ``feat_000``... otherwise).
        receptive_margin: edge margin in input pixels (default :func:`dinov3geo.models.taps.edge_margin`: 2
            patches for a ViT, 2 stage-3 cells, 64 px, for a ConvNeXt; ViTs see the whole window, so this
            is the zone whose tokens are most affected by the window edge, not a strict receptive field; a
            ConvNeXt's theoretical field is far wider, :func:`dinov3geo.models.taps.receptive_radius`, but
            its effective one is narrow, and the default half-window overlap blends over a wide ramp).
        upsample: resize outputs to input resolution.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        value_scale: float = 1.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        layer: int = -1,
        head: nn.Module | None = None,
        out_bands: int | None = None,
        band_names: Sequence[str] | None = None,
        receptive_margin: int | None = None,
        upsample: bool = False,
    ) -> None:
        from dinov3geo.models.taps import default_normalization, edge_margin, inference_alignment, tap_widths

        self.backbone = backbone
        self.head = head
        # a ViT attends to the whole window (a ConvNeXt only to its receptive field, but a wide one)
        self.global_context = True
        patch = getattr(backbone, "patch_size", 16)
        self.patch = int(patch) if patch is not None else 32  # a ConvNeXt with patch_size=None: stride 32
        in_chans = getattr(getattr(backbone, "patch_embed", None), "in_chans", None)
        if in_chans is None:
            proj = getattr(getattr(backbone, "patch_embed", None), "proj", None)
            in_chans = getattr(proj, "in_channels", None)
        self.in_bands = int(in_chans) if in_chans is not None else None
        if mean is None and std is None and self.in_bands == 3:
            norm = default_normalization(backbone)
            mean, std = norm.mean, norm.std
        self._norm = _Normalise(value_scale, mean, std)
        self.layer = layer
        if hasattr(backbone, "blocks"):
            embed = tap_widths(backbone, [self._layer_index()])[0]
        else:
            embed = int(getattr(backbone, "embed_dim", 0))
        if head is None:
            self.out_bands = embed
            self.band_names = tuple(band_names) if band_names else tuple(f"feat_{k:03d}" for k in range(embed))
        else:
            if out_bands is None:
                raise ValueError("give out_bands for the head's output")
            self.out_bands = int(out_bands)
            self.band_names = tuple(band_names) if band_names else ()
        self.upsample = upsample
        self.scale = 1 if upsample else self.patch
        self.receptive_margin = edge_margin(backbone) if receptive_margin is None else int(receptive_margin)
        self.window_align, self.edge_fill = inference_alignment(backbone)

    def preprocess(self, x: Tensor, valid: Tensor) -> Tensor:
        return self._norm(x)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % self.patch or w % self.patch:
            raise ValueError(f"window {h}x{w} is not a multiple of the patch size {self.patch}")
        from dinov3geo.models.taps import tap_maps

        feats = tap_maps(self.backbone, x, [self._layer_index()])[0]
        if self.head is not None:
            feats = self.head(feats)
        if self.upsample:
            feats = F.interpolate(feats.float(), size=(h, w), mode="bilinear", align_corners=False)
        return feats

    def _layer_index(self) -> int:
        depth = len(getattr(self.backbone, "blocks", [])) or 1
        return self.layer % depth

    def _tapped_layers(self) -> list[int]:
        return [self._layer_index()]

    def memory_estimate(self, window: int, batch: int = 1, itemsize: int | None = None) -> int:
        """Estimated peak working memory (bytes, weights excluded) of one call on ``batch`` windows, what the
        automatic batch (:func:`~dinov3geo.inference.batching.choose_batch_size`) sizes calls by.

        Per ``window`` x ``window`` window (padded to the backbone's input multiple): the input (raw,
        normalised, padded: ``3 x C`` maps), the backbone's activations
        (:func:`~dinov3geo.inference.batching.backbone_window_elements` for the tapped layers), the output
        maps on the 16 px grid twice (the tapped maps and their concatenation; a head's output once more) and,
        with ``upsample``, the output at input resolution. ``itemsize`` defaults to the backbone's parameters'.
        Checked against measured peak RSS growth by ``benchmarks/head_memory.py --tasks features``.
        """
        from dinov3geo.inference.batching import backbone_window_elements
        from dinov3geo.models.taps import grid_stride, input_multiple

        if window < 1 or batch < 1:
            raise ValueError(f"window and batch must be positive, got {window}, {batch}")
        item = int(itemsize or next(self.backbone.parameters()).element_size())
        mult = int(input_multiple(self.backbone))
        side = -(-int(window) // mult) * mult
        px = side * side
        grid = px // int(grid_stride(self.backbone)) ** 2
        chans = int(self.in_bands or 3)
        per_window = 3 * chans * px + backbone_window_elements(self.backbone, side, self._tapped_layers())
        per_window += (3 if self.head is not None else 2) * int(self.out_bands) * grid
        if self.upsample:
            per_window += int(self.out_bands) * px
        return int(per_window * batch * item)

    def to(self, device: torch.device | str) -> BackboneFeatures:
        self.backbone.to(device)
        if self.head is not None:
            self.head.to(device)
        return self

    def eval(self) -> BackboneFeatures:
        self.backbone.eval()
        if self.head is not None:
            self.head.eval()
        return self

    def _state_tensors(self) -> list[Tensor]:
        ts = list(self.backbone.state_dict().values())
        if self.head is not None:
            ts += list(self.head.state_dict().values())
        return ts


class MeanFilter(RasterModel):
    """A ``size x size`` moving average of each band (zero padding): an analytic model for tests and checks.

    Its receptive margin is ``size // 2``, so tiled inference must equal :meth:`whole_image` exactly.

    Args:
        size: odd filter size.
        bands: number of input (= output) bands.
        fn: optional element-wise function applied after the filter (e.g. to make a nonlinear model).
    """

    def __init__(self, size: int = 3, bands: int = 1, fn: Callable[[Tensor], Tensor] | None = None) -> None:
        if size < 1 or size % 2 == 0:
            raise ValueError(f"size must be odd, got {size}")
        self.size = size
        self.in_bands = bands
        self.out_bands = bands
        self.band_names = tuple(f"mean{size}_{k + 1}" for k in range(bands))
        self.receptive_margin = size // 2
        self.fn = fn

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        y = F.avg_pool2d(x.float(), self.size, stride=1, padding=self.size // 2, count_include_pad=True)
        return self.fn(y) if self.fn is not None else y

    def whole_image(self, image: Any) -> Any:
        """The filter applied to a whole ``[C, H, W]`` numpy image at once (reference result)."""
        x = torch.as_tensor(image, dtype=torch.float32)[None]
        return self.forward(x, torch.ones(x.shape[0], *x.shape[2:], dtype=torch.bool))[0].numpy()
