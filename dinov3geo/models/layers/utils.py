"""Small tensor/module helpers shared by the layers (``cat_keep_shapes`` etc., as in ``dinov3/utils``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def cat_keep_shapes(x_list: Sequence[Tensor]) -> tuple[Tensor, list[torch.Size], list[int]]:
    """Flatten every tensor of ``x_list`` to ``[tokens, C]`` and concatenate them.

    Returns the flat tensor, the original shapes and the token count of each entry, which
    :func:`uncat_with_shapes` uses to undo the operation.
    """
    shapes = [x.shape for x in x_list]
    num_tokens = [x.select(dim=-1, index=0).numel() for x in x_list]
    flattened = torch.cat([x.flatten(0, -2) for x in x_list])
    return flattened, shapes, num_tokens


def uncat_with_shapes(
    flattened: Tensor, shapes: Sequence[torch.Size], num_tokens: Sequence[int]
) -> list[Tensor]:
    """Inverse of :func:`cat_keep_shapes`; the last dimension may have changed in between."""
    parts = torch.split_with_sizes(flattened, list(num_tokens), dim=0)
    return [p.reshape(s[:-1] + torch.Size([flattened.shape[-1]])) for p, s in zip(parts, shapes, strict=True)]


def named_apply(
    fn: Callable[..., None],
    module: nn.Module,
    name: str = "",
    depth_first: bool = True,
    include_root: bool = False,
) -> nn.Module:
    """Apply ``fn(module=..., name=...)`` to every sub-module (depth first by default), as Meta's helper."""
    if not depth_first and include_root:
        fn(module=module, name=name)
    for child_name, child in module.named_children():
        full = f"{name}.{child_name}" if name else child_name
        named_apply(fn=fn, module=child, name=full, depth_first=depth_first, include_root=True)
    if depth_first and include_root:
        fn(module=module, name=name)
    return module


def per_sample(fn: Callable[..., Tensor], x: Tensor, *extras: Tensor | None) -> Tensor:
    """``fn(x, *extras)`` computed one sample at a time and stacked: the same result as the batched call for
    layers that treat samples independently (convolutions, GroupNorm), with only one sample's intermediate
    maps alive at a time (heads that upsample to full resolution, at inference). ``extras`` are batch-aligned
    tensors or None (passed as None). A batch of one, or a call that records gradients, runs as one call.
    """
    n = x.shape[0]
    if n == 1 or x.requires_grad:
        return fn(x, *extras)

    def one(i: int) -> Tensor:
        return fn(x[i : i + 1], *(None if e is None else e[i : i + 1] for e in extras))

    first = one(0)
    out = first.new_empty((n, *first.shape[1:]))
    out[:1] = first
    for i in range(1, n):
        out[i : i + 1] = one(i)
    return out
