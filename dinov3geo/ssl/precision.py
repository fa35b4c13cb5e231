"""Compute precision of a pretraining stage.

Three modes (``train.precision``):

* ``"32-true"``: fp32 everywhere (the CPU default; exactness and resume-equality tests use it).
* ``"bf16-mixed"``: ``torch.autocast`` to bf16 (Lightning's plugin): matmuls in bf16, fp32 parameters and a
  fp32 residual stream; norms, softmax and the element-wise ops between the matmuls stay in fp32.
* ``"bf16-params"``: the official recipe's mixed precision (``compute_precision: param_dtype bf16,
  reduce_dtype fp32`` through FSDP2's ``MixedPrecisionPolicy``), without sharding: the student, teacher
  and Gram teacher run on bf16 *copies* of their fp32 parameters, with bf16 inputs, so the whole forward
  and backward is bf16; gradients reach the fp32 parameters as fp32 (the backward of the cast), and the
  optimiser, gradient clipping and EMA work on fp32 master weights. Buffers (RoPE periods) keep their
  dtype, as under FSDP2. The losses cast their inputs to fp32 (Sinkhorn-Knopp, log-softmax, Gram).

:func:`cast_call` is the ``bf16-params`` forward: it runs a module with its parameters replaced by
differentiable casts (``torch.func.functional_call``), so nothing about the module changes and the
checkpoint holds the fp32 master weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

PRECISIONS = ("auto", "32-true", "bf16-mixed", "bf16-params")


def lightning_precision(precision: str) -> str:
    """The Lightning precision plugin of a dinov3geo precision (``bf16-params`` casts by itself: fp32)."""
    if precision not in PRECISIONS or precision == "auto":
        raise ValueError(f"train.precision must be one of {PRECISIONS[1:]} here, got {precision!r}")
    return "32-true" if precision == "bf16-params" else precision


def param_dtype(precision: str) -> torch.dtype | None:
    """The dtype of the parameter copies a precision computes with (``None``: the parameters themselves)."""
    return torch.bfloat16 if precision == "bf16-params" else None


def cast_call(module: nn.Module, dtype: torch.dtype, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with every floating parameter and floating input tensor cast to ``dtype``.

    The casts are part of the autograd graph: a parameter that requires grad receives its gradient in its
    own dtype (fp32), computed from the bf16 backward (FSDP2's ``reduce_dtype=float32``). Non-floating
    tensors (masks, indices) and buffers are left as they are.
    """
    params = {n: (p.to(dtype) if p.is_floating_point() else p) for n, p in module.named_parameters()}

    def cast(x: Any) -> Any:
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    return functional_call(module, params, tree_map(cast, args), tree_map(cast, kwargs), strict=False)
