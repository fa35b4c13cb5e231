"""Reading pretraining-stage checkpoints: the EMA teacher (backbone + heads) a later stage starts from.

A stage checkpoint is Lightning's ``checkpoints/last.ckpt`` of :func:`dinov3geo.ssl.train.pretrain`: it loads
with ``torch.load(..., weights_only=True)`` and holds ``state_dict`` (keys ``model.student.*``,
``model.teacher.*``, ...) plus ``dinov3geo`` (the stage config and band names). Later stages use its teacher:
``student.resume_from_teacher_chkpt`` (student and EMA teacher start from it, as the official high-res and
Gram stages do), ``gram.ckpt`` (the Gram teacher's backbone) and ``distillation.teacher_checkpoint``.
A plain backbone file (anything :func:`dinov3geo.models.load_backbone` reads) is accepted where only a
backbone is needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinov3geo.models import load_backbone


class StageCheckpointError(ValueError):
    """A file is not a dinov3geo stage checkpoint (and not a backbone either, where one would do)."""


def is_stage_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and "state_dict" in obj and "dinov3geo" in obj


def read_stage_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a stage checkpoint safely (``weights_only=True``)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds
        from dinov3geo.models.checkpoint import describe_load_error

        raise StageCheckpointError(f"cannot read stage checkpoint: {describe_load_error(path, e)}") from e
    if not is_stage_checkpoint(ck):
        raise StageCheckpointError(
            f"{path} is not a dinov3geo stage checkpoint (expected checkpoints/last.ckpt of `dinov3geo pretrain`)")
    return ck


def teacher_parts(ck: dict[str, Any], which: str = "teacher") -> dict[str, dict[str, torch.Tensor]]:
    """``{"backbone": sd, "dino_head": sd, "ibot_head": sd}`` of the stage's ``which`` model."""
    prefix = f"model.{which}."
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in ck["state_dict"].items():
        if k.startswith(prefix):
            part, rest = k[len(prefix):].split(".", 1)
            parts.setdefault(part, {})[rest] = v
    if "backbone" not in parts:
        raise StageCheckpointError(f"no {which} backbone in the stage checkpoint")
    return parts


def load_teacher_backbone(source: str | os.PathLike) -> nn.Module:
    """The EMA teacher backbone of a stage checkpoint, or a plain backbone file."""
    p = Path(source)
    if p.suffix == ".ckpt":
        ck = read_stage_checkpoint(p)
        return load_backbone(teacher_parts(ck)["backbone"], strict=True)
    return load_backbone(p, strict=True)


def load_teacher_modules(source: str | os.PathLike) -> tuple[nn.ModuleDict, dict[str, Any]]:
    """Backbone + DINO/iBOT heads of a stage's EMA teacher, and the stage config (as a dict)."""
    from dinov3geo.ssl.heads import DINOHead

    ck = read_stage_checkpoint(source)
    parts = teacher_parts(ck)
    cfg = ck["dinov3geo"]["config"]
    backbone = load_backbone(parts["backbone"], strict=True)
    mods: dict[str, nn.Module] = {"backbone": backbone}
    for name, sec in (("dino_head", "dino"), ("ibot_head", "ibot")):
        c = cfg[sec]
        head = DINOHead(in_dim=backbone.embed_dim, out_dim=c["head_n_prototypes"], hidden_dim=c["head_hidden_dim"],
                        bottleneck_dim=c["head_bottleneck_dim"], nlayers=c["head_nlayers"])
        head.load_state_dict(parts[name], strict=True)
        mods[name] = head
    return nn.ModuleDict(mods), cfg
