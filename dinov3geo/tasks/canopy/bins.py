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

Difference to Meta/transformers: they multiply by 8 whenever the *normalisation* is ``chmv2_mixlog``, whatever the
bin strategy; here the x8 belongs to the ``chmv2_mixlog`` *bins*. The released combination (mixlog bins + mixlog
norm) is identical; Meta's other normalisations (``linear`` with eps 0.1, ``sigmoid``) are not implemented.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BIN_STRATEGIES", "NORM_STRATEGIES", "HeightBins"]

BIN_STRATEGIES = ("linear", "log", "chmv2_mixlog")
NORM_STRATEGIES = ("chmv2_mixlog", "softmax")

_MIXLOG_MAX_SHIFT = 1e-4
_MIXLOG_EPS_SHIFT = 1e-8
_EPS = 1e-12
_CHMV2_SCALE = 8.0


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
