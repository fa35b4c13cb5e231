"""DPT head with the module tree (hence ``state_dict`` keys and shapes) of Meta's released CHMv2 head.

Written from the description in ``shared/reference/chmv2-spec.md`` sections 5 and 8 (not a copy of Meta's code).
With the ViT-L defaults the state dict has 68 tensors and 33,747,200 parameters, key for key equal to
``dinov3_vitl16_chmv2_dpt_head-3703d643.pth``.

Data flow for features ``[(patch_map_i [B, D, h, w], cls_i [B, D])]`` of 4 backbone levels (``h, w`` = patch grid;
``D`` may differ per level, ``D_i``, for a ConvNeXt's four stages: ``in_channels`` is then a list):

1. readout: ``project`` (``GELU(Linear(2D -> D)(concat(patch, cls)))`` per token), ``add`` (patch + cls) or
   ``ignore`` (cls unused);
2. ``projects.i``: 1x1 conv ``D -> C_i``; ``resize_layers.i``: factor 4 / 2 (transposed conv, kernel = stride),
   1 (identity), 0.5 (3x3 conv, stride 2, padding 1), giving ``4h, 2h, h, ceil(h/2)``;
3. ``convs.i``: 3x3 conv ``C_i -> channels`` without bias;
4. fusion deepest first: ``out = fusion_blocks[0](x3)``, then ``out = fusion_blocks[k](out, x[3-k])``. A fusion
   block resizes the skip to ``out`` (bilinear, ``align_corners=False``) when sizes differ, adds
   ``RCU1(skip)``, applies ``RCU2``, upsamples x2 (bilinear, ``align_corners=True``) and a 1x1 conv.
   RCU = ``x + conv(relu(conv(relu(x))))`` with biased 3x3 convs;
5. ``conv_depth``: 3x3 conv ``channels -> channels/2``, bilinear x2 (``align_corners=True``), 3x3 conv
   ``-> n_hidden_channels``, ReLU, 1x1 conv ``-> n_bins`` (raw logits, no activation).

Output side: ``16 * ceil(h / 2) * 2`` = ``32 * ceil(h / 2)`` pixels (= ``16 h`` when the grid is even).
Batch norm (Meta's ``use_batchnorm``) is not supported: CHMv2 does not use it.

Memory (inference): :meth:`DPTHead.forward` returns the full-resolution logits, ``[B, n_bins, H, W]`` (1 GiB for
4 windows of 512^2 px with 256 bins), and the tail of ``conv_depth`` before it holds two more full-resolution
``n_hidden_channels`` maps. :meth:`DPTHead.forward_binned` gives the height and std directly: one sample at a time
it runs the head up to ``conv_depth``'s first conv (half resolution), then the full-resolution tail (bilinear x2,
3x3 conv, ReLU, 1x1 conv to the bins) and :meth:`~dinov3geo.tasks.canopy.bins.HeightBins.readout_` over blocks of
rows (logits of 16 MiB on CPU: 32 rows of a 512 px window; the 3x3 conv's one-row halo is recomputed only for the
cheap upsampling). Same numbers as ``bins.mean_and_std(head(features))`` up to float32 rounding
(:func:`upsample_rows_x2` reproduces the bilinear weights of ``F.interpolate``; the readout sums in float64).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3geo.tasks.canopy.bins import HeightBins, chunk_bytes_for, chunk_rows, readout_dtype, sum_dtype

__all__ = ["READOUTS", "DPTHead", "dpt_config_from_state_dict", "level_channels", "upsample_rows_x2"]

READOUTS = ("project", "add", "ignore")
DEFAULT_FACTORS = (4.0, 2.0, 1.0, 0.5)

Features = Sequence[tuple[Tensor, Tensor] | Tensor]


class _Conv(nn.Module):
    """A conv under the attribute name ``conv`` (key layout ``<name>.conv.weight``)."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit ``x + conv2(relu(conv1(relu(x))))`` (3x3 convs with bias)."""

    def __init__(self, channels: int, device: Any = None) -> None:
        super().__init__()
        self.conv1 = _Conv(nn.Conv2d(channels, channels, 3, padding=1, bias=True, device=device))
        self.conv2 = _Conv(nn.Conv2d(channels, channels, 3, padding=1, bias=True, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """DPT feature fusion: ``project(up2(RCU2(x + RCU1(resize(skip)))))``; the first block has no skip unit."""

    def __init__(self, channels: int, with_skip: bool, device: Any = None) -> None:
        super().__init__()
        self.project = _Conv(nn.Conv2d(channels, channels, 1, bias=True, device=device))
        self.res_conv_unit1 = ResidualConvUnit(channels, device) if with_skip else None
        self.res_conv_unit2 = ResidualConvUnit(channels, device)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None:
            if self.res_conv_unit1 is None:
                raise ValueError("the first fusion block takes no skip input")
            if skip.shape[-2:] != x.shape[-2:]:
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.res_conv_unit1(skip)
        x = self.res_conv_unit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.project(x)


def level_channels(in_channels: int | Sequence[int], n_levels: int) -> list[int]:
    """Per-level input widths: one ``int`` for every level (a ViT), or one width per level (a ConvNeXt's
    stages); a sequence must have ``n_levels`` entries."""
    if isinstance(in_channels, int | float):
        return [int(in_channels)] * n_levels
    widths = [int(c) for c in in_channels]
    if len(widths) != n_levels:
        raise ValueError(f"in_channels gives {len(widths)} widths {widths} for {n_levels} feature levels")
    return widths


class ReassembleBlocks(nn.Module):
    """Readout, 1x1 projections and resizing of each level (keys ``reassemble_blocks.*``).

    ``in_channels``: the backbone width, or one width per level (ConvNeXt stages).
    """

    def __init__(
        self,
        in_channels: int | Sequence[int],
        post_process_channels: Sequence[int],
        readout: str,
        factors: Sequence[float],
        device: Any = None,
    ) -> None:
        super().__init__()
        self.readout = readout
        widths = level_channels(in_channels, len(post_process_channels))
        self.projects = nn.ModuleList(
            _Conv(nn.Conv2d(d, c, 1, bias=True, device=device))
            for d, c in zip(widths, post_process_channels, strict=True)
        )
        resize: list[nn.Module] = []
        for c, f in zip(post_process_channels, factors, strict=True):
            if f > 1:
                k = int(f)
                resize.append(nn.ConvTranspose2d(c, c, k, stride=k, device=device))
            elif f == 1:
                resize.append(nn.Identity())
            else:
                resize.append(nn.Conv2d(c, c, 3, stride=round(1 / f), padding=1, device=device))
        self.resize_layers = nn.ModuleList(resize)
        if readout == "project":
            self.readout_projects = nn.ModuleList(
                nn.Sequential(nn.Linear(2 * d, d, device=device), nn.GELU()) for d in widths
            )
        else:
            self.readout_projects = None

    def forward(self, features: Features) -> list[Tensor]:
        out = []
        for i, item in enumerate(features):
            if isinstance(item, (tuple, list)):
                x, cls = item[0], item[1]
            else:
                x, cls = item, None
            if self.readout != "ignore":
                if cls is None:
                    raise ValueError(f"readout {self.readout!r} needs (patch_map, cls) tuples for every level")
                B, D, h, w = x.shape
                if self.readout == "project":
                    tokens = x.flatten(2).transpose(1, 2)
                    tokens = torch.cat([tokens, cls[:, None, :].expand_as(tokens)], dim=-1)
                    tokens = self.readout_projects[i](tokens)  # type: ignore[index]
                    x = tokens.transpose(1, 2).reshape(B, D, h, w)
                else:
                    x = x + cls[:, :, None, None]
            x = self.projects[i](x)
            out.append(self.resize_layers[i](x))
        return out


class UpConvHead(nn.Module):
    """``conv_depth``: conv3x3 -> bilinear x2 -> conv3x3 -> ReLU -> conv1x1 to the output channels."""

    def __init__(self, channels: int, n_hidden_channels: int, n_outputs: int, device: Any = None) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels // 2, 3, padding=1, device=device),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(channels // 2, n_hidden_channels, 3, padding=1, device=device),
            nn.ReLU(),
            nn.Conv2d(n_hidden_channels, n_outputs, 1, device=device),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)

    def forward_rows(self, z: Tensor, r0: int, r1: int) -> Tensor:
        """Output rows ``[r0, r1)`` of :meth:`forward` from ``z`` = the first conv's output (half resolution).

        Upsamples only rows ``r0 - 1 .. r1`` (the 3x3 conv's halo; zeros beyond the image edges, where the full
        conv pads) and convolves without vertical padding.
        """
        up_conv, out_conv = self.head[2], self.head[4]
        x = upsample_rows_x2(z, r0 - 1, r1 + 1, zero_outside=True)  # zero rows where the full conv pads
        x = F.conv2d(x, up_conv.weight, up_conv.bias, padding=(0, 1)).relu_()
        return out_conv(x)


def upsample_rows_x2(z: Tensor, r0: int, r1: int, zero_outside: bool = False) -> Tensor:
    """Rows ``[r0, r1)`` of ``F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=True)``.

    The source rows are interpolated along the width by ``F.interpolate`` itself (a height-preserving resize is
    exact), then along the height by a small ``[rows, source rows]`` matrix holding torch's bilinear weights
    (``scale = (H - 1) / (2H - 1)`` in float32, ``src = scale * row``, two non-zeros per row). Agrees with the
    full upsampling to float32 rounding and reads only the source rows it needs. With ``zero_outside``, rows
    outside ``[0, 2H)`` may be asked for and are zeros (a following conv's zero padding, at no extra pass).
    """
    hin, win = int(z.shape[-2]), int(z.shape[-1])
    hout = 2 * hin
    lo, hi = (max(r0, 0), min(r1, hout)) if zero_outside else (r0, r1)
    if not 0 <= lo < hi <= hout or r0 >= r1:
        raise ValueError(f"rows [{r0}, {r1}) outside an upsampled height of {hout}")
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    scale = torch.tensor(float(hin - 1), dtype=acc) / torch.tensor(float(max(hout - 1, 1)), dtype=acc)
    src = torch.arange(lo, hi, dtype=acc) * scale
    i0 = src.floor().long()
    lam1 = (src - i0.to(acc)).clamp_(0.0, 1.0)
    i1 = torch.where(i0 < hin - 1, i0 + 1, i0)
    s0, s1 = int(i0[0]), int(i1[-1]) + 1
    band = F.interpolate(z[:, :, s0:s1], size=(s1 - s0, 2 * win), mode="bilinear", align_corners=True)
    rows = torch.arange(lo - r0, hi - r0)
    weights = torch.zeros(r1 - r0, s1 - s0, dtype=acc)
    weights.index_put_((rows, i0 - s0), 1.0 - lam1, accumulate=True)
    weights.index_put_((rows, i1 - s0), lam1, accumulate=True)
    return torch.matmul(weights.to(device=z.device, dtype=z.dtype), band)


class DPTHead(nn.Module):
    """Meta's DPT depth head as used by CHMv2 (see the module docstring for the data flow).

    Args:
        in_channels: backbone width ``D`` (1024 for ViT-L), or one width per level for backbones whose tapped
            levels differ in width (a ConvNeXt's four stages, e.g. ``[96, 192, 384, 768]`` for ConvNeXt-T).
        post_process_channels: per-level channels ``C_i`` after the 1x1 projections.
        channels: fusion width.
        n_hidden_channels: hidden width of ``conv_depth``.
        n_bins: output channels (bin logits, or 1 for direct regression).
        readout: ``"project"`` / ``"add"`` / ``"ignore"``; default from ``use_cls_token`` (project / ignore),
            as in Meta's ``build_depther``.
        use_cls_token: see ``readout``.
        factors: per-level resize factors (Meta: 4, 2, 1, 0.5).
        device: where to allocate (``"meta"`` for shape-only heads).
    """

    def __init__(
        self,
        in_channels: int | Sequence[int] = 1024,
        post_process_channels: Sequence[int] = (128, 256, 512, 1024),
        channels: int = 256,
        n_hidden_channels: int = 128,
        n_bins: int = 256,
        readout: str | None = None,
        use_cls_token: bool = True,
        factors: Sequence[float] = DEFAULT_FACTORS,
        device: Any = None,
    ) -> None:
        super().__init__()
        if readout is None:
            readout = "project" if use_cls_token else "ignore"
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}; choose one of {READOUTS}")
        if len(post_process_channels) != len(factors):
            raise ValueError(
                f"{len(post_process_channels)} post_process_channels but {len(factors)} resize factors"
            )
        self.post_process_channels = [int(c) for c in post_process_channels]
        #: per-level input widths; ``in_channels`` is their common value, or the list when they differ
        self.level_channels = level_channels(in_channels, len(self.post_process_channels))
        uniform = len(set(self.level_channels)) == 1
        self.in_channels: int | list[int] = self.level_channels[0] if uniform else list(self.level_channels)
        self.channels = int(channels)
        self.n_hidden_channels = int(n_hidden_channels)
        self.n_bins = int(n_bins)
        self.readout = readout
        self.factors = [float(f) for f in factors]
        self.reassemble_blocks = ReassembleBlocks(
            self.in_channels, self.post_process_channels, readout, self.factors, device
        )
        self.convs = nn.ModuleList(
            _Conv(nn.Conv2d(c, self.channels, 3, padding=1, bias=False, device=device))
            for c in self.post_process_channels
        )
        self.fusion_blocks = nn.ModuleList(
            FusionBlock(self.channels, with_skip=i > 0, device=device)
            for i in range(len(self.post_process_channels))
        )
        self.conv_depth = UpConvHead(self.channels, self.n_hidden_channels, self.n_bins, device)

    @property
    def use_cls_token(self) -> bool:
        """Whether the head reads the class token (readout other than ``ignore``)."""
        return self.readout != "ignore"

    @property
    def n_levels(self) -> int:
        """Number of backbone levels the head takes."""
        return len(self.post_process_channels)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (primitive types), for checkpoints."""
        return {
            "in_channels": self.in_channels if isinstance(self.in_channels, int) else list(self.in_channels),
            "post_process_channels": list(self.post_process_channels),
            "channels": self.channels,
            "n_hidden_channels": self.n_hidden_channels,
            "n_bins": self.n_bins,
            "readout": self.readout,
            "factors": list(self.factors),
        }

    @staticmethod
    def output_size(h: int, w: int) -> tuple[int, int]:
        """Output side (pixels) for a ``h x w`` patch grid: ``32 * ceil(h / 2)`` (factors 4, 2, 1, 0.5)."""
        return 32 * -(-h // 2), 32 * -(-w // 2)

    def _fused(self, features: Features) -> Tensor:
        """Reassemble + fusion: ``[B, channels, H/2, W/2]``."""
        if len(features) != self.n_levels:
            raise ValueError(f"the head takes {self.n_levels} feature levels, got {len(features)}")
        xs = self.reassemble_blocks(features)
        xs = [conv(x) for conv, x in zip(self.convs, xs, strict=True)]
        out = self.fusion_blocks[0](xs[-1])
        for k in range(1, self.n_levels):
            out = self.fusion_blocks[k](out, xs[-1 - k])
        return out

    def forward(self, features: Features) -> Tensor:
        """Logits ``[B, n_bins, 32 ceil(h/2), 32 ceil(w/2)]`` from one ``(patch_map, cls)`` per level."""
        return self.conv_depth(self._fused(features))

    def forward_binned(
        self,
        features: Features,
        bins: HeightBins,
        with_std: bool = True,
        chunk_bytes: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``(height, std or None)`` ``[B, 1, 32 ceil(h/2), 32 ceil(w/2)]`` in metres, without full-size logits.

        Equals ``bins.mean_and_std(self(features))`` up to float32 rounding (see the module docstring); the
        full-resolution tensors are one row block (``chunk_bytes``, default
        :func:`~dinov3geo.tasks.canopy.bins.chunk_bytes_for` the device) of one sample. Half-precision logits
        (bf16/fp16 autocast) are read out in float32, block by block. For inference: use :meth:`forward` when
        gradients are needed.
        """
        if len(features) != self.n_levels:
            raise ValueError(f"the head takes {self.n_levels} feature levels, got {len(features)}")
        if bins.n_bins != self.n_bins:
            raise ValueError(f"head has {self.n_bins} outputs but the bins {bins.n_bins}")
        first = features[0][0] if isinstance(features[0], (tuple, list)) else features[0]
        n = int(first.shape[0])
        height = std = scratch = None
        for i in range(n):
            one = [(f[0][i : i + 1], f[1][i : i + 1]) if isinstance(f, (tuple, list)) else f[i : i + 1]
                   for f in features]
            z = self.conv_depth.head[0](self._fused(one))
            h, w = 2 * int(z.shape[-2]), 2 * int(z.shape[-1])
            if height is None:
                out_dtype = readout_dtype(z.dtype)
                height = z.new_empty((n, 1, h, w), dtype=out_dtype)
                std = z.new_empty((n, 1, h, w), dtype=out_dtype) if with_std else None
            widest = max(self.n_bins, self.n_hidden_channels, int(z.shape[1]))
            rows = chunk_rows(widest, w, z.element_size(), chunk_bytes or chunk_bytes_for(z.device), h)
            if scratch is None:  # the readout's float64 block, reused by every block of every sample
                scratch = z.new_empty(self.n_bins * rows * w, dtype=sum_dtype(z.device))
            for r0 in range(0, h, rows):
                r1 = min(h, r0 + rows)
                logits = self.conv_depth.forward_rows(z, r0, r1).to(out_dtype)
                m, s = bins.readout_(logits, with_std, scratch)
                height[i : i + 1, :, r0:r1] = m
                if std is not None:
                    std[i : i + 1, :, r0:r1] = s
            del z
        assert height is not None
        return height, std


def dpt_config_from_state_dict(sd: Mapping[str, Tensor], what: str = "the head state dict") -> dict[str, Any]:
    """:class:`DPTHead` arguments read from a head state dict's tensor shapes (Meta key layout, no prefix).

    ``in_channels`` (one int, or one per level when they differ) / ``post_process_channels`` from
    ``reassemble_blocks.projects.i.conv.weight``, ``channels``
    from ``convs.0``, ``n_hidden_channels`` / ``n_bins`` from ``conv_depth.head.{2,4}``, readout ``project``
    when ``readout_projects`` weights exist (else ``ignore``). Raises ``KeyError`` naming a missing key.
    """
    levels = sorted(
        {int(m.group(1)) for k in sd if (m := re.match(r"reassemble_blocks\.projects\.(\d+)\.conv\.weight$", k))}
    )
    needed = ["reassemble_blocks.projects.0.conv.weight", "convs.0.conv.weight",
              "conv_depth.head.2.weight", "conv_depth.head.4.weight"]
    missing = [k for k in needed if k not in sd]
    if missing or not levels:
        raise KeyError(f"{what} is not a DPT head state dict: missing {missing or needed[:1]}")
    if levels != list(range(len(levels))):
        raise KeyError(f"{what}: projection levels {levels} are not 0..{len(levels) - 1}")
    ppc = [int(sd[f"reassemble_blocks.projects.{i}.conv.weight"].shape[0]) for i in levels]
    widths = [int(sd[f"reassemble_blocks.projects.{i}.conv.weight"].shape[1]) for i in levels]
    cfg: dict[str, Any] = {
        "in_channels": widths[0] if len(set(widths)) == 1 else widths,
        "post_process_channels": ppc,
        "channels": int(sd["convs.0.conv.weight"].shape[0]),
        "n_hidden_channels": int(sd["conv_depth.head.2.weight"].shape[0]),
        "n_bins": int(sd["conv_depth.head.4.weight"].shape[0]),
        "readout": "project" if "reassemble_blocks.readout_projects.0.0.weight" in sd else "ignore",
    }
    if len(ppc) != len(DEFAULT_FACTORS):
        raise KeyError(f"{what} has {len(ppc)} levels; only 4-level heads (factors 4, 2, 1, 0.5) are supported")
    return cfg
