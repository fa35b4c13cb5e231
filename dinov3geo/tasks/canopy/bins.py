"""Height bins: from per-pixel bin logits to canopy height (metres) and its spread, and back for training.

A binned head predicts ``n_bins`` logits per pixel. :class:`HeightBins` turns them into a distribution over
bin centres (``normalize``), its expectation (the height, :meth:`HeightBins.expectation`) and its standard
deviation (an uncertainty band, :meth:`HeightBins.std`). For training it encodes reference heights as soft
two-hot targets over the two neighbouring bin centres (:meth:`HeightBins.encode`) and gives the matching
bin cross-entropy (:meth:`HeightBins.cross_entropy`).

Strategies for the centres (``min_height`` to ``max_height``):

* ``"linear"``: ``linspace(min, max, N)``;
* ``"log"``: ``exp(linspace(ln min, ln max, N))``;
* ``"chmv2_mixlog"``: Meta CHMv2 (``create_chmv2_mixlog_bins``): with ``a = min`` and ``b = max / 8``,
  ``t = linspace(1, 0, N)``, bins ``= t * logspace(a, b) + (1 - t) * linspace(a, b)`` and the result is
  multiplied by 8 (``output_scale``): training targets were heights / 8. The defaults (256 bins, 0.001 to
  96 m) give centres 0.008 ... 96 m, log-spaced near 0 and linear near the top.

Normalisations of the logits over the bin axis:

* ``"chmv2_mixlog"``: Meta's linear normalisation (not a softmax): ``y = relu(logits)``,
  ``shift = clamp(-min_c y, 0, 1e-4) + 1e-8``, ``w = (y + shift) / clamp(nan_to_num(sum_c (y + shift)), 1e-12)``;
  the expectation is ``clamp(sum_c w * clamp(bins, 1e-12), 1e-12) * output_scale`` exactly as Meta computes it;
* ``"softmax"``: ``softmax(logits)``.

Memory: :meth:`HeightBins.mean_and_std` is the reference; it materialises several tensors of the logits' full
size (``[B, N, H, W]`` in fp32: 1 GiB each for 4 windows of 512^2 px and 256 bins). :meth:`HeightBins.readout_`
computes the same expectation and std from one block in three passes (in place, then a float64 copy into a
reused scratch block and one small matrix product: the same numbers up to float32 rounding, closer to a float64
computation than the reference), and :meth:`HeightBins.mean_and_std_chunked` runs it over
blocks of :func:`chunk_rows` rows of one sample at a time (a few MiB, cache-resident on CPU). The heads'
``forward_binned`` (:class:`~dinov3geo.tasks.canopy.dpt.DPTHead`, :class:`~dinov3geo.tasks.canopy.heads.LightHead`)
go further and never build the full-resolution logits at all.

Difference to Meta/transformers: they multiply by 8 whenever the *normalisation* is ``chmv2_mixlog``, whatever the
bin strategy; here the x8 belongs to the ``chmv2_mixlog`` *bins*. The released combination (mixlog bins + mixlog
norm) is identical; Meta's other normalisations (``linear`` with eps 0.1, ``sigmoid``) are not implemented.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BIN_STRATEGIES", "CHUNK_BYTES_CPU", "CHUNK_BYTES_CUDA", "NORM_STRATEGIES", "HeightBins", "chunk_bytes_for",
           "chunk_rows", "readout_dtype", "sum_dtype"]

BIN_STRATEGIES = ("linear", "log", "chmv2_mixlog")
NORM_STRATEGIES = ("chmv2_mixlog", "softmax")

_MIXLOG_MAX_SHIFT = 1e-4
_MIXLOG_EPS_SHIFT = 1e-8
_EPS = 1e-12
_CHMV2_SCALE = 8.0

#: Size of the widest tensor (the ``n_bins`` logits) of one row block of a chunked readout / head tail on CPU.
#: Below glibc's largest dynamic mmap threshold (32 MiB), so freed blocks are reused from the heap instead of
#: being unmapped and faulted in again; 32 rows of a 512 px window with 256 bins. Smaller blocks measured no
#: faster on one thread and slower on two busy cores (more parallel regions to synchronise).
CHUNK_BYTES_CPU = 16 * 2**20
#: The same on CUDA, where every block costs kernel launches: 4 blocks for a 512^2 window with 256 bins.
CHUNK_BYTES_CUDA = 128 * 2**20


def chunk_bytes_for(device: torch.device | str) -> int:
    """Default row-block size in bytes for tensors on ``device`` (:data:`CHUNK_BYTES_CPU` / ``_CUDA``)."""
    return CHUNK_BYTES_CUDA if torch.device(device).type == "cuda" else CHUNK_BYTES_CPU


def readout_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of heights read out from logits of ``dtype``: half precision (autocast) is read out in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sum_dtype(device: torch.device | str) -> torch.dtype:
    """Dtype of :meth:`HeightBins.readout_`'s sums: float64, except on MPS (which has none): float32."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def chunk_rows(
    channels: int, width: int, itemsize: int = 4, chunk_bytes: int = CHUNK_BYTES_CPU, height: int | None = None
) -> int:
    """Rows per block so that one ``[1, channels, rows, width]`` block takes at most ``chunk_bytes`` (at least 1).

    With ``height``, the blocks of ``height`` rows are balanced: as few blocks as that bound allows, of equal
    size up to one row (e.g. 512 rows at 48 rows per block: 11 blocks of 47 rows, not 10 of 48 and one of 32).
    """
    rows = max(1, int(chunk_bytes) // max(1, channels * width * itemsize))
    if height is not None and height > 0:
        n = -(-int(height) // rows)
        rows = -(-int(height) // n)
    return rows


def make_bins(strategy: str, n_bins: int, min_height: float, max_height: float) -> tuple[Tensor, float]:
    """Internal bin values (fp32) and the factor that takes them to metres, for ``strategy``."""
    if strategy == "linear":
        return torch.linspace(min_height, max_height, n_bins), 1.0
    if strategy == "log":
        lo, hi = torch.log(torch.tensor(min_height)), torch.log(torch.tensor(max_height))
        return torch.exp(torch.linspace(lo, hi, n_bins)), 1.0
    if strategy == "chmv2_mixlog":
        top = max_height / _CHMV2_SCALE
        lin = torch.linspace(min_height, top, n_bins)
        log = torch.exp(
            torch.linspace(torch.log(torch.tensor(min_height)), torch.log(torch.tensor(top)), n_bins)
        )
        t = torch.linspace(1.0, 0.0, n_bins)
        return t * log + (1.0 - t) * lin, _CHMV2_SCALE
    raise ValueError(f"unknown bin strategy {strategy!r}; choose one of {BIN_STRATEGIES}")


class HeightBins(nn.Module):
    """Bin centres in metres plus the logit normalisation of a binned height head.

    Args:
        n_bins: number of bins (the head's output channels), at least 2.
        strategy: ``"linear"``, ``"log"`` or ``"chmv2_mixlog"`` (see the module docstring).
        norm: ``"chmv2_mixlog"`` (Meta's ReLU-linear normalisation) or ``"softmax"``.
        min_height: lowest centre (metres; for ``chmv2_mixlog`` the internal minimum, i.e. ``min * 8`` m).
        max_height: highest centre in metres (at least 96 m is recommended for tall forests).

    The module has no parameters; ``centres`` (metres) and ``bins`` (internal values) are non-persistent
    buffers so ``.to(device)`` moves them. All computations run in the logits' dtype (fp32 stays fp32).
    """

    bins: Tensor
    centres: Tensor

    def __init__(
        self,
        n_bins: int = 256,
        strategy: str = "chmv2_mixlog",
        norm: str = "chmv2_mixlog",
        min_height: float = 0.001,
        max_height: float = 96.0,
    ) -> None:
        super().__init__()
        if n_bins < 2:
            raise ValueError(f"n_bins must be at least 2, got {n_bins}")
        if norm not in NORM_STRATEGIES:
            raise ValueError(f"unknown bin normalisation {norm!r}; choose one of {NORM_STRATEGIES}")
        if not 0 < min_height < max_height:
            raise ValueError(f"need 0 < min_height < max_height, got {min_height}, {max_height}")
        bins, scale = make_bins(strategy, n_bins, float(min_height), float(max_height))
        self.n_bins = int(n_bins)
        self.strategy = strategy
        self.norm = norm
        self.min_height = float(min_height)
        self.max_height = float(max_height)
        self.output_scale = scale
        self.register_buffer("bins", bins, persistent=False)
        self.register_buffer("centres", bins * scale, persistent=False)

    # ------------------------------------------------------------------ config
    def config(self) -> dict[str, Any]:
        """Constructor arguments (primitive types), for checkpoints."""
        return {
            "n_bins": self.n_bins,
            "strategy": self.strategy,
            "norm": self.norm,
            "min_height": self.min_height,
            "max_height": self.max_height,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HeightBins:
        """Inverse of :meth:`config`; unknown keys raise ``ValueError`` naming them."""
        known = {"n_bins", "strategy", "norm", "min_height", "max_height"}
        bad = sorted(set(config) - known)
        if bad:
            raise ValueError(f"unknown HeightBins option(s) {bad}; known: {sorted(known)}")
        return cls(**config)

    def extra_repr(self) -> str:
        return (
            f"n_bins={self.n_bins}, strategy={self.strategy!r}, norm={self.norm!r}, "
            f"range=[{float(self.centres[0]):.4g}, {float(self.centres[-1]):.4g}] m"
        )

    # ------------------------------------------------------------------ logits -> distribution
    def _check(self, logits: Tensor) -> None:
        if logits.ndim < 2 or logits.shape[1] != self.n_bins:
            raise ValueError(
                f"expected logits [B, {self.n_bins}, ...] (one channel per bin), got {tuple(logits.shape)}"
            )

    def _view(self, t: Tensor, like: Tensor) -> Tensor:
        return t.to(device=like.device, dtype=like.dtype).view(1, -1, *([1] * (like.ndim - 2)))

    def normalize(self, logits: Tensor) -> Tensor:
        """Bin probabilities (summing to 1 over dim 1) from logits ``[B, N, ...]``."""
        self._check(logits)
        if self.norm == "softmax":
            return torch.softmax(logits, dim=1)
        y = torch.relu(logits)
        shift = (-y.amin(dim=1, keepdim=True)).clamp(0.0, _MIXLOG_MAX_SHIFT) + _MIXLOG_EPS_SHIFT
        y = y + shift
        denom = torch.nan_to_num(y.sum(dim=1, keepdim=True), nan=1.0, posinf=1.0, neginf=1.0)
        return y / denom.clamp_min(_EPS)

    def expectation_from_probs(self, probs: Tensor) -> Tensor:
        """Height in metres ``[B, 1, ...]`` of a distribution over the bins (e.g. an :meth:`encode` target)."""
        bins = self._view(self.bins, probs).clamp_min(_EPS)
        return (probs * bins).sum(dim=1, keepdim=True).clamp_min(_EPS) * self.output_scale

    def expectation(self, logits: Tensor) -> Tensor:
        """Height in metres ``[B, 1, H, W]``: the bin-weighted mean (Meta's ``FeaturesToDepth`` for CHMv2)."""
        return self.expectation_from_probs(self.normalize(logits))

    def std(self, logits: Tensor) -> Tensor:
        """Standard deviation in metres ``[B, 1, H, W]`` of the bin distribution (>= 0): the uncertainty band."""
        return self.mean_and_std(logits)[1]

    def mean_and_std(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """``(expectation, std)`` from one normalisation (both ``[B, 1, ...]``, metres)."""
        probs = self.normalize(logits)
        mean = self.expectation_from_probs(probs)
        centres = self._view(self.centres, probs)
        var = (probs * (centres - mean) ** 2).sum(dim=1, keepdim=True)
        return mean, var.clamp_min(0.0).sqrt()

    def readout_(
        self, logits: Tensor, with_std: bool = True, scratch: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``(expectation, std or None)`` (``[B, 1, ...]``, metres) of ``logits``, overwriting ``logits``.

        The fused form of :meth:`mean_and_std` for a block the caller owns (e.g. a row block of the head's output),
        in three passes over the block instead of five to seven logits-sized temporaries and about ten passes:

        1. the normalisation's numerator in place (``relu``; ``softmax`` makes one new block);
        2. a float64 copy (into ``scratch`` when given: a flat tensor of :func:`sum_dtype` and at least
           ``logits.numel()`` elements; float32 on MPS);
        3. one small matrix product giving, per pixel, ``sum_c u``, ``sum_c u b_c``, ``sum_c u c_c`` and
           ``sum_c u c_c^2`` (``b``: bin values, ``c``: centres in metres).

        Meta's shift ``clamp(-min_c y, 0, 1e-4) + 1e-8`` is exactly ``1e-8`` (``relu(logits) >= 0``; pixels with a NaN
        logit come out NaN either way) and enters the sums analytically; the normaliser gets Meta's ``nan_to_num``
        and clamp. Then ``mean = clamp(S_b / D, 1e-12) * scale`` and
        ``var = (S_cc - 2 mean S_c + mean^2 S_1) / D``, which is ``sum_c p_c (c_c - mean)^2`` expanded; the float64
        sums make the expansion exact to float32 rounding. The same values as :meth:`mean_and_std` to float32
        rounding (measured <= 2.3e-5 m on heights up to 96 m). Not for tensors that need gradients.
        """
        self._check(logits)
        n, nb = int(logits.shape[0]), int(logits.shape[1])
        rest = tuple(logits.shape[2:])
        if self.norm == "softmax":
            u, shift = torch.softmax(logits, dim=1), 0.0
        else:
            u, shift = logits.relu_(), _MIXLOG_EPS_SHIFT
        acc = sum_dtype(u.device)
        if scratch is not None and scratch.dtype == acc and scratch.numel() >= u.numel() and scratch.is_contiguous():
            u64 = scratch[: u.numel()].view(u.shape).copy_(u)
        else:
            u64 = u.to(acc)
        b = self.bins.to(device=u.device, dtype=acc).clamp_min(_EPS)
        c = self.centres.to(device=u.device, dtype=acc)
        rows = torch.stack([torch.ones_like(b), b, c, c * c]) if with_std else torch.stack([torch.ones_like(b), b])
        sums = torch.matmul(rows, u64.reshape(n, nb, -1))  # [n, 2 or 4, pixels]
        if shift:
            sums += shift * rows.sum(dim=1)[:, None]
        denom = torch.nan_to_num(sums[:, 0], nan=1.0, posinf=1.0, neginf=1.0).clamp_min_(_EPS)
        mean = (sums[:, 1] / denom).clamp_min_(_EPS)
        if self.output_scale != 1.0:
            mean.mul_(self.output_scale)
        out_mean = mean.to(u.dtype).view(n, 1, *rest)
        if not with_std:
            return out_mean, None
        var = (sums[:, 3] - 2.0 * mean * sums[:, 2] + mean * mean * sums[:, 0]) / denom
        return out_mean, var.clamp_min_(0.0).sqrt_().to(u.dtype).view(n, 1, *rest)

    def mean_and_std_chunked(
        self, logits: Tensor, with_std: bool = True, chunk_bytes: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`mean_and_std` of ``[B, N, H, W]`` logits, one sample and a few rows at a time.

        Each block (``chunk_bytes``, default :func:`chunk_bytes_for` the logits' device) is copied and read out with
        :meth:`readout_`: the extra memory is a block and its float64 scratch instead of several copies of
        ``logits``. ``logits`` is not modified. Other ranks, and tensors that need gradients, go through :meth:`mean_and_std`.
        """
        self._check(logits)
        if logits.ndim != 4 or (logits.requires_grad and torch.is_grad_enabled()):
            mean, std = self.mean_and_std(logits)
            return mean, (std if with_std else None)
        b, _, h, w = logits.shape
        mean = logits.new_empty((b, 1, h, w))
        std = logits.new_empty((b, 1, h, w)) if with_std else None
        rows = chunk_rows(self.n_bins, w, logits.element_size(), chunk_bytes or chunk_bytes_for(logits.device), h)
        scratch = logits.new_empty(self.n_bins * rows * w, dtype=sum_dtype(logits.device))
        for i in range(b):
            for r0 in range(0, h, rows):
                r1 = min(h, r0 + rows)
                m, s = self.readout_(logits[i : i + 1, :, r0:r1].clone(), with_std, scratch)
                mean[i : i + 1, :, r0:r1] = m
                if std is not None:
                    std[i : i + 1, :, r0:r1] = s
        return mean, std

    # ------------------------------------------------------------------ training targets
    def encode(self, height: Tensor) -> Tensor:
        """Soft two-hot targets ``[B, N, H, W]`` for heights ``[B, 1, H, W]`` or ``[B, H, W]`` (metres).

        Each height is split between its two neighbouring centres, linearly, so that the expectation of the
        target equals the height (clamped to the centre range). Non-finite heights give an all-zero target.
        """
        if height.ndim == 4 and height.shape[1] == 1:
            height = height[:, 0]
        centres = self.centres.to(device=height.device, dtype=torch.float32)
        h = height.float()
        finite = torch.isfinite(h)
        h = torch.where(finite, h, torch.zeros_like(h)).clamp(float(centres[0]), float(centres[-1]))
        hi = torch.searchsorted(centres, h.reshape(-1).contiguous(), right=False).clamp(1, self.n_bins - 1)
        lo = hi - 1
        c_lo, c_hi = centres[lo], centres[hi]
        w_hi = ((h.reshape(-1) - c_lo) / (c_hi - c_lo)).clamp(0.0, 1.0)
        fin = finite.reshape(-1).float()
        target = torch.zeros(h.numel(), self.n_bins, device=h.device, dtype=torch.float32)
        target.scatter_add_(1, lo[:, None], ((1.0 - w_hi) * fin)[:, None])
        target.scatter_add_(1, hi[:, None], (w_hi * fin)[:, None])
        return target.view(*h.shape, self.n_bins).movedim(-1, 1)

    def cross_entropy(self, logits: Tensor, height: Tensor, valid: Tensor | None = None) -> Tensor:
        """Mean bin cross-entropy over valid pixels between logits ``[B, N, H, W]`` and two-hot height targets.

        ``valid`` (``[B, H, W]`` or ``[B, 1, H, W]`` bool) masks pixels out; non-finite heights are always
        excluded. With the ``chmv2_mixlog`` normalisation the log of the linear-normalised probabilities is used
        (so the loss trains the same distribution the expectation reads); its ReLU passes no gradient to negative
        logits, so bins whose logits fall below 0 stop learning: prefer ``norm="softmax"`` for heads trained from
        scratch with this loss. No valid pixel gives a zero loss that
        still depends on ``logits`` (``backward`` works).
        """
        self._check(logits)
        if height.ndim == 4:
            height = height[:, 0]
        if height.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"height {tuple(height.shape)} does not match logits {tuple(logits.shape)}")
        mask = torch.isfinite(height)
        if valid is not None:
            if valid.ndim == 4:
                valid = valid[:, 0]
            mask = mask & valid.to(torch.bool)
        target = self.encode(height).to(logits.dtype)
        if self.norm == "softmax":
            logp = F.log_softmax(logits, dim=1)
        else:
            logp = torch.log(self.normalize(logits).clamp_min(_EPS))
        per_pixel = -(target * logp).sum(dim=1)
        n = mask.sum()
        if n == 0:
            return (logits * 0.0).sum()
        return per_pixel[mask].sum() / n
