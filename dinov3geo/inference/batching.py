"""Default batch size of region inference, chosen from a model's memory estimate and the memory there is.

A model that knows its working memory has a ``memory_estimate(window, batch) -> bytes`` method (the peak of one
inference call on ``batch`` windows of ``window`` x ``window`` pixels, weights excluded):
:meth:`~dinov3geo.tasks.canopy.model.CanopyHeightModel.memory_estimate`,
:meth:`~dinov3geo.tasks.change.head.ChangeModel.memory_estimate`,
:meth:`~dinov3geo.tasks.landcover.heads.LandcoverModel.memory_estimate`. :func:`choose_batch_size` turns it
into the number of windows per model call when the user gives none (``batch_size=None``):

* **CUDA**: the most windows (up to :data:`MAX_AUTO_BATCH`) whose estimate fits in
  :data:`CUDA_MEMORY_FRACTION` of the free device memory.
* **CPU**: batching saves a little CPU time (up to 10 % with ViT-L backbones, ``benchmarks/canopy_memory.py``,
  ``benchmarks/head_memory.py``) but costs memory, so windows are added up to :data:`CPU_PIXELS_PER_CALL` pixels
  per call (4 windows of 512 px), and only while the estimate plus the engine's own region-scale buffers
  (:func:`region_reserve`: tile cache, block accumulators, batches in flight) stays within
  :data:`CPU_MEMORY_BUDGET` and a quarter of the available memory.

:func:`resolve_batch_size` is what a task's ``batch_size=None`` means as a whole: an explicit batch as given, the
batch of the interrupted run being resumed (:func:`resumed_batch_size`: it is part of the run's fingerprint),
the automatic choice, or a fixed fallback for models without an estimate. :func:`backbone_window_elements` is
the backbone's share of the estimates (shared by the task models).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "CPU_MEMORY_BUDGET",
    "CPU_PIXELS_PER_CALL",
    "CUDA_MEMORY_FRACTION",
    "MAX_AUTO_BATCH",
    "available_memory",
    "backbone_window_elements",
    "check_batch_size",
    "choose_batch_size",
    "memory_estimator",
    "region_reserve",
    "resolve_batch_size",
    "resumed_batch_size",
]

log = logging.getLogger("dinov3geo.inference")

#: CPU: windows are added to a call while it holds fewer pixels than this (4 windows of 512^2 px). Measured
#: on 2 cores with canopy mapping (``benchmarks/canopy_memory.py``, 1024^2 NEON crop, window 512): batches of 2
#: and 4 took 9-10 % less CPU time than single windows with the ViT-L layout and 2-4 % less with a tiny one.
CPU_PIXELS_PER_CALL = 4 * 512 * 512
#: CPU: memory (bytes) a default batch may take: the model's ``memory_estimate`` plus the engine's own buffers
#: (:func:`region_reserve`) (issue 21's goal: at most 1 GiB of peak RSS growth at the defaults with ViT-L backbones).
CPU_MEMORY_BUDGET = 1 << 30
#: CUDA: share of the free device memory a default batch may take (the rest: allocator slack, engine buffers).
CUDA_MEMORY_FRACTION = 0.5
#: Largest batch size chosen automatically.
MAX_AUTO_BATCH = 32


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes available for a run: free device memory on CUDA; on CPU
    :func:`dinov3geo.utils.memory.host_available_memory` (``DINOV3GEO_AVAILABLE_MEMORY`` when set, ``psutil``,
    ``/proc/meminfo``; the CLI's memory checks read the same), else the physical memory (``os.sysconf``).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    from dinov3geo.utils.memory import host_available_memory

    avail = host_available_memory()
    if avail is not None:
        return avail
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def memory_estimator(model: Any) -> Callable[[int, int], int]:
    """The ``memory_estimate(window, batch)`` of ``model``, or of the task model a raster model wraps
    (its ``.model``).

    Raises:
        TypeError: neither has one (pass an explicit batch size for such models).
    """
    for obj in (model, getattr(model, "model", None)):
        fn = getattr(obj, "memory_estimate", None)
        if callable(fn):
            return fn  # type: ignore[no-any-return]
    raise TypeError(f"{type(model).__name__} has no memory_estimate(window, batch): give an explicit batch size")


def check_batch_size(batch_size: int | None) -> int | None:
    """``batch_size`` unchanged when it is a positive int or None (automatic), checked before any work.

    Raises:
        ValueError: anything else (0, negative, float, bool, str).
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None (automatic), got {batch_size!r}")
    return batch_size


def choose_batch_size(
    model: Any,
    window: int,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    *,
    available: int | None = None,
) -> int:
    """Windows per model call: ``batch_size`` when given, else chosen by memory (and, on CPU, throughput).

    Args:
        model: a model with ``memory_estimate(window, batch)``, or a raster model wrapping one as ``.model``
            (:func:`memory_estimator`).
        window: window side in pixels.
        device: where the model runs.
        batch_size: an explicit choice (a positive int), returned unchanged.
        available: bytes available (default :func:`available_memory` of ``device``).

    Returns:
        CUDA: the largest batch (at most :data:`MAX_AUTO_BATCH`) whose estimate fits in
        :data:`CUDA_MEMORY_FRACTION` of the free memory; CPU: the largest batch up to
        ``ceil(CPU_PIXELS_PER_CALL / window^2)`` whose estimate plus the engine's own buffers
        (:func:`region_reserve`) fits in ``min(CPU_MEMORY_BUDGET, available / 4)``. Always at least 1.

    Raises:
        ValueError: ``batch_size`` is not a positive int or None, or ``window`` is not positive.
        TypeError: ``batch_size`` is None and the model has no memory estimate.
    """
    if batch_size is not None:
        return check_batch_size(batch_size)
    if window < 1:
        raise ValueError(f"window must be positive, got {window}")
    estimate = memory_estimator(model)
    dev = torch.device(device)
    avail = available_memory(dev) if available is None else int(available)
    if dev.type == "cuda":
        budget, cap = CUDA_MEMORY_FRACTION * avail, MAX_AUTO_BATCH

        def need(b: int) -> float:
            return estimate(window, b)
    else:
        budget = min(CPU_MEMORY_BUDGET, avail / 4)
        cap = min(MAX_AUTO_BATCH, max(1, math.ceil(CPU_PIXELS_PER_CALL / (window * window))))

        def need(b: int) -> float:  # the model's working memory and the engine's own buffers share the budget
            return estimate(window, b) + region_reserve(model, window, b)
    batch = 1
    while batch < cap and need(batch + 1) <= budget:
        batch += 1
    return batch


def region_reserve(model: Any, window: int, batch: int) -> int:
    """Host memory (bytes) the inference engine's own buffers take beside a model of ``batch`` windows on CPU:
    :func:`dinov3geo.inference.engine.region_buffer_bytes` with the model's ``in_bands`` / ``out_bands`` /
    ``scale`` where it declares them (a raster model does), else 4 input bands, 1 output band, scale 1.
    """
    from dinov3geo.inference.engine import region_buffer_bytes

    return region_buffer_bytes(window, batch, in_bands=getattr(model, "in_bands", None) or 4,
                               out_bands=getattr(model, "out_bands", None) or 1, scale=getattr(model, "scale", None) or 1)


def resumed_batch_size(out: str | os.PathLike[str]) -> int | None:
    """The batch size recorded by an interrupted engine run writing ``out`` (``<out>.parts/manifest.json``;
    None when there is none). A resumed run must keep it: it is part of the run's fingerprint."""
    from dinov3geo.inference.engine import parts_dir

    try:
        doc = json.loads((parts_dir(out) / "manifest.json").read_text())
        value = doc["config"]["batch_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def resolve_batch_size(
    model: Any,
    window: int,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    fallback: int | None = None,
    available: int | None = None,
) -> int:
    """What ``batch_size=None`` means for a region run (``predict_raster`` into ``out``): an explicit batch size
    as given (validated); else the batch size of the interrupted run being resumed into ``out`` (pass
    ``out=None`` when not resuming); else :func:`choose_batch_size` for a model with a memory estimate; else
    ``fallback`` (models without one: classic change scores, zero-shot distances).

    Raises:
        ValueError: an invalid ``batch_size`` or ``window``.
        TypeError: no estimate and no ``fallback``.
    """
    if batch_size is not None:
        return choose_batch_size(model, window, device, batch_size)
    resumed = resumed_batch_size(out) if out is not None else None
    if resumed is not None:
        log.info("batch size %d (as the run being resumed)", resumed)
        return resumed
    try:
        memory_estimator(model)
    except TypeError:
        if fallback is None:
            raise
        return choose_batch_size(model, window, device, fallback)
    batch = choose_batch_size(model, window, device, available=available)
    log.info("batch size %d (automatic, by memory)", batch)
    return batch


def backbone_window_elements(backbone: nn.Module, side: int, layers: Sequence[int]) -> int:
    """Elements (multiply by the item size) of the activations a backbone keeps alive for one ``side`` x ``side``
    window (padded to its input multiple): the block being computed and the tapped ``layers``' maps, twice
    (normed and reshaped).

    ViT: tokens x (8 width + 2 MLP width) for the block (attention through ``scaled_dot_product_attention``, no
    tokens^2 matrix) plus ``2 x len(layers) x tokens x width``. ConvNeXt: the widest stage's block (about 10
    maps of its width: input, depthwise conv, norm, 4x hidden, output, residual) plus the tapped maps resized
    to the 16 px grid, twice.
    """
    from dinov3geo.models.taps import is_convnext, tap_widths

    cfg = backbone.config  # type: ignore[attr-defined]
    px = int(side) * int(side)
    if is_convnext(backbone):
        grid = px // (16 * 16)
        strides = [4 * 2**i for i in range(len(cfg.dims))]
        block = max(10 * int(c) * px // (s * s) for c, s in zip(cfg.dims, strides, strict=True))
        return int(block + 2 * sum(tap_widths(backbone, list(layers))) * grid)
    tokens = px // int(backbone.patch_size) ** 2 + 1 + int(cfg.n_storage_tokens)  # type: ignore[attr-defined]
    width, mlp = int(cfg.embed_dim), int(cfg.ffn_hidden_dim)
    return int(tokens * (8 * width + 2 * mlp) + 2 * len(layers) * tokens * width)
