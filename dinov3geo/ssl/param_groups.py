"""Optimizer parameter groups: layer-wise LR decay, weight-decay exclusions, last-layer flag.

Mirrors the official ``dinov3/train/param_groups.py`` (``get_vit_lr_decay_rate``,
``get_params_groups_with_decay_fsdp``, ``fuse_params_groups``, ``remove_fsdp_compile_names``), the
per-submodule grouping of ``dinov3/train/ssl_meta_arch.py::SSLMetaArch.get_params_groups`` and, from
``dinov3/train/train.py``, ``build_optimizer`` (AdamW), ``apply_optim_scheduler`` and the per-submodule
gradient clipping of the train loop.

As official, groups are built per student submodule (``backbone``, ``dino_head``, ``ibot_head``) with
parameter names *relative to that submodule* (``cls_token``, ``blocks.3.attn.qkv.weight``, ``last_layer.weight``):

* LR multiplier ``decay ** (depth + 1 - layer_id)`` with ``layer_id`` 0 for ``patch_embed``, ``cls_token``,
  ``storage_tokens``, ``mask_token`` (and ``pos_embed``), ``i + 1`` for ``blocks.i``, ``depth + 1`` for
  everything else (``norm``, ``local_cls_norm``, heads). ``rope_embed.periods`` is a buffer, not a
  parameter, so it gets no group. A module without ``blocks`` (a head) has depth 0, so multiplier 1.
* ``patch_embed`` parameters get ``patch_embed_lr_mult`` (0.2) on top.
* No weight decay (``wd_multiplier = 0``) on names ending in ``bias``, containing ``norm``, ``gamma``
  (LayerScale) or ``fourier_w``; the learned tokens **are** weight-decayed.
* ``is_last_layer`` for names containing ``last_layer`` (the heads' prototype layer), whose LR follows the
  last-layer schedule (0 while frozen).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "apply_optim_scheduler",
    "build_optimizer",
    "clip_grad_norm_per_module",
    "describe_param_groups",
    "fuse_params_groups",
    "get_params_groups",
    "get_params_groups_with_decay",
    "get_vit_lr_decay_rate",
    "remove_fsdp_compile_names",
]

logger = logging.getLogger(__name__)

FUSE_KEYS: tuple[str, ...] = ("lr_multiplier", "wd_multiplier", "is_last_layer")
#: Backbone parameters at layer 0 (official list; the RoPE periods are a buffer, not a parameter).
_LAYER0_NAMES: tuple[str, ...] = ("pos_embed", "patch_embed", "mask_token", "cls_token", "storage_tokens")


def remove_fsdp_compile_names(name: str) -> str:
    """Strip wrapper prefixes added by FSDP, activation checkpointing and ``torch.compile`` (official)."""
    name = name.replace("_fsdp_wrapped_module.", "")
    name = name.replace("_checkpoint_wrapped_module.", "")
    name = name.replace("parametrizations.", "")
    name = name.removesuffix(".original")
    name = name.replace("module.", "")
    name = name.replace("_orig_mod.", "")
    return name


def get_vit_lr_decay_rate(
    name: str,
    lr_decay_rate: float = 1.0,
    num_layers: int = 12,
    force_is_backbone: bool = False,
    chunked_blocks: bool = False,
) -> float:
    """Layer-wise LR multiplier of one parameter, a copy of the official ``get_vit_lr_decay_rate``.

    Args:
        name: Parameter name (prefixed with ``backbone.`` or relative to the backbone with
            ``force_is_backbone``).
        lr_decay_rate: Per-layer decay (0.9 default, 0.98 for 7B, 0.99 for distillation).
        num_layers: Number of blocks (depth).
        force_is_backbone: Treat un-prefixed names as backbone names.
        chunked_blocks: Names look like ``blocks.<chunk>.<i>`` (official FSDP block chunks).

    Returns:
        ``lr_decay_rate ** (num_layers + 1 - layer_id)``.
    """
    layer_id = num_layers + 1
    if name.startswith("backbone") or force_is_backbone:
        if any(f".{k}" in name for k in _LAYER0_NAMES) or (
            force_is_backbone and any(k in name for k in _LAYER0_NAMES)
        ):
            layer_id = 0
        elif ".blocks." in name and ".residual." not in name:
            layer_id = int(name[name.find(".blocks.") :].split(".")[2]) + 1
        elif chunked_blocks and "blocks." in name and "residual." not in name:
            layer_id = int(name[name.find("blocks.") :].split(".")[2]) + 1
        elif "blocks." in name and "residual." not in name:
            layer_id = int(name[name.find("blocks.") :].split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def _n_blocks(model: nn.Module) -> tuple[int, bool]:
    if hasattr(model, "n_blocks") and hasattr(model, "chunked_blocks"):
        return int(model.n_blocks), bool(model.chunked_blocks)
    if hasattr(model, "module") and hasattr(model.module, "blocks"):  # wrapped (DDP / SimpleFSDP)
        return len(model.module.blocks), False
    if hasattr(model, "blocks"):
        return len(model.blocks), False
    return 0, False


def get_params_groups_with_decay(
    model: nn.Module,
    lr_decay_rate: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    dino_head_wd_multiplier: float = 1.0,
    *,
    is_dino_head: bool = False,
) -> list[dict[str, Any]]:
    """One group per trainable parameter of ``model`` (official ``get_params_groups_with_decay_fsdp``).

    ``model`` is one student submodule; a module with ``blocks`` is a backbone (layer-wise decay over its
    depth), any other module gets depth 0 (multiplier 1). Each group dict has ``name``, ``params``,
    ``lr_multiplier``, ``wd_multiplier`` and ``is_last_layer``.

    ``dino_head_wd_multiplier`` applies to parameters whose name contains ``dino_head`` or, when
    ``is_dino_head`` is set, to every parameter. (Upstream only checks the name, which is relative to the
    submodule in the FSDP path, so there the multiplier never applies; the default 1.0 makes both equal.)
    """
    n_blocks, chunked = _n_blocks(model)
    groups: list[dict[str, Any]] = []
    for raw_name, param in model.named_parameters():
        name = remove_fsdp_compile_names(raw_name)
        if not param.requires_grad:
            continue
        d: dict[str, Any] = {
            "name": name,
            "params": param,
            "is_last_layer": False,
            "lr_multiplier": get_vit_lr_decay_rate(
                name,
                lr_decay_rate,
                num_layers=n_blocks,
                force_is_backbone=n_blocks > 0,
                chunked_blocks=chunked,
            ),
            "wd_multiplier": 1.0,
        }
        if is_dino_head or "dino_head" in name:
            d["wd_multiplier"] = dino_head_wd_multiplier
        if "last_layer" in name:
            d["is_last_layer"] = True
        # No weight decay on biases, norm parameters, LayerScale gamma (the tokens are decayed).
        if name.endswith("bias") or "norm" in name or "gamma" in name or "fourier_w" in name:
            d["wd_multiplier"] = 0.0
        if "patch_embed" in name:
            d["lr_multiplier"] *= patch_embed_lr_mult
        groups.append(d)
        logger.debug("%s: lr_multiplier %s, wd_multiplier %s", name, d["lr_multiplier"], d["wd_multiplier"])
    return groups


def fuse_params_groups(
    all_params_groups: Iterable[Mapping[str, Any]], keys: tuple[str, ...] = FUSE_KEYS
) -> list[dict[str, Any]]:
    """Merge groups with equal ``keys`` values (official ``fuse_params_groups``), first-seen order.

    Each fused group has the ``keys`` entries, ``params`` (a list) and ``names`` (the parameter names, an
    addition for logging and tests; the optimizer ignores unknown keys).
    """
    fused: dict[str, dict[str, Any]] = {}
    for d in all_params_groups:
        identifier = "".join(f"{k}{d[k]}_" for k in keys)
        if identifier not in fused:
            fused[identifier] = {**{k: d[k] for k in keys}, "params": [], "names": []}
        fused[identifier]["params"].append(d["params"])
        fused[identifier]["names"].append(d.get("name", ""))
    return list(fused.values())


def get_params_groups(
    model_parts: Mapping[str, nn.Module],
    layerwise_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
    dino_head_wd_multiplier: float = 1.0,
    fuse: bool = True,
    foreach: bool | None = True,
) -> list[dict[str, Any]]:
    """Parameter groups of all student submodules, as ``SSLMetaArch.get_params_groups``.

    Args:
        model_parts: ``{"backbone": ..., "dino_head": ..., "ibot_head": ...}`` (any names).
        layerwise_decay: ``optim.layerwise_decay`` (0.9 default, 0.98 for 7B).
        patch_embed_lr_mult: ``optim.patch_embed_lr_mult`` (0.2).
        dino_head_wd_multiplier: ``optim.dino_head_wd_multiplier`` (1.0), for the part named ``dino_head``.
        fuse: Merge groups per submodule by (lr_multiplier, wd_multiplier, is_last_layer)
            (``optim.multi_tensor_optim``).
        foreach: Value of each fused group's ``foreach`` flag (official: True); None leaves it unset.

    Each group also carries ``part`` (the submodule name).
    """
    out: list[dict[str, Any]] = []
    for part, module in model_parts.items():
        groups = get_params_groups_with_decay(
            module,
            lr_decay_rate=layerwise_decay,
            patch_embed_lr_mult=patch_embed_lr_mult,
            dino_head_wd_multiplier=dino_head_wd_multiplier,
            is_dino_head=part == "dino_head",
        )
        if fuse:
            groups = fuse_params_groups(groups)
            if foreach is not None:
                for g in groups:
                    g["foreach"] = foreach
        else:
            for g in groups:
                g["params"] = [g["params"]]
                g["names"] = [g.pop("name")]
        for g in groups:
            g["part"] = part
        out += groups
    return out


def build_optimizer(
    model_parts: Mapping[str, nn.Module] | Iterable[dict[str, Any]],
    lr: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    *,
    layerwise_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
    dino_head_wd_multiplier: float = 1.0,
    fuse: bool = True,
    foreach: bool | None = True,
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over the DINOv3 parameter groups (official ``build_optimizer``: ``AdamW(groups, betas)``).

    ``model_parts`` is a mapping of student submodules (groups built with :func:`get_params_groups`) or
    ready-made groups. Betas are (0.9, 0.999) by default and (0.9, 0.99) for 7B. ``lr``/``weight_decay``
    are only initial values: call :func:`apply_optim_scheduler` before every step, as official.
    """
    if isinstance(model_parts, Mapping):
        groups = get_params_groups(
            model_parts,
            layerwise_decay=layerwise_decay,
            patch_embed_lr_mult=patch_embed_lr_mult,
            dino_head_wd_multiplier=dino_head_wd_multiplier,
            fuse=fuse,
            foreach=foreach,
        )
    else:
        groups = list(model_parts)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused)
    return optimizer


def apply_optim_scheduler(
    optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float
) -> None:
    """Set each group's LR and weight decay for this iteration (official ``apply_optim_scheduler``).

    ``weight_decay = wd * wd_multiplier``; ``lr = lr * lr_multiplier``, or ``last_layer_lr * lr_multiplier``
    for ``is_last_layer`` groups (the multiplier is 1 for head parameters, so that is ``last_layer_lr``).
    """
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group["wd_multiplier"]
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_multiplier"]


def clip_grad_norm_per_module(
    modules: Mapping[str, nn.Module],
    max_norm: float | None = 3.0,
    norm_type: float = 2.0,
) -> dict[str, float]:
    """Clip each submodule's gradients separately, as the official train loop does.

    ``torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)`` for each of ``modules`` (backbone,
    dino_head, ibot_head); ``optim.clip_grad`` is 3.0 by default and 30.0 for 7B. With ``max_norm`` None or
    0 nothing is clipped (official: ``if cfg.optim.clip_grad``) and the norms are still returned.

    Returns:
        ``{"<name>_grad_norm": total norm before clipping}`` (the official metric names).
    """
    norms: dict[str, float] = {}
    for name, module in modules.items():
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            norms[f"{name}_grad_norm"] = 0.0
            continue
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=norm_type)
        # clip_grad_norm_ multiplies every gradient by min(max_norm / (norm + 1e-6), 1); skipping the
        # multiplication by exactly 1 (norm within bounds) saves a pass over all gradients, same values
        if max_norm and not bool(max_norm / (norm + 1e-6) >= 1.0):  # the coefficient clip_grad_norm_ clamps
            torch.nn.utils.clip_grads_with_norm_(params, max_norm=max_norm, total_norm=norm)
        norms[f"{name}_grad_norm"] = float(
            norm.full_tensor().item() if hasattr(norm, "full_tensor") else norm.item()
        )
    return norms


def describe_param_groups(groups: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per group (part, multipliers, parameter count) for logs."""
    lines = []
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        lines.append(
            f"{g.get('part', '?')}: lr x{g['lr_multiplier']:.6g} wd x{g['wd_multiplier']:g} "
            f"last_layer={g['is_last_layer']} params={n} ({len(g['params'])} tensors)"
        )
    return lines
