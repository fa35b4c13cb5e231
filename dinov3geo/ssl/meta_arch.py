"""Student, EMA teacher, optional Gram teacher, heads and the DINOv3 loss combination.

Mirrors ``dinov3/train/ssl_meta_arch.py::SSLMetaArch`` (the official train step): the teacher sees the two
global crops unmasked, the student sees the iBOT-masked global crops and the local crops in one list
forward; DINO (CLS, Sinkhorn-Knopp targets), iBOT (masked patches) and KoLeo (pre-head CLS) losses are
combined with the official scales (global/local DINO terms weighted by their pair counts, KoLeo
``0.1 x n_global``, iBOT 1), plus the Gram-anchoring loss when enabled. Device-agnostic (no ``.cuda()``):
the caller (the Lightning module) moves the batch.

**ConvNeXt students** (``student.arch: convnext_*``) are trained by distillation from a frozen ViT/16 teacher
only, as Meta distilled its ConvNeXts from the 7B ViT. Distillation feeds the student unmasked global crops
(Meta's ``masks=None`` when distilling, spec section 5) and computes the iBOT loss at the sampled "masked"
indices anyway, so a CNN student needs no mask tokens; its DINO/KoLeo inputs are the pooled "class token"
(``x_norm_clstoken``, the normalised global average of the last stage) and its iBOT inputs the last stage's
normalised patch tokens *resized to the 16 px grid* (``ConvNeXt.tokens_on_grid``, the resize of
``get_intermediate_layers``), so that they line up with the teacher's patch indices (Meta's public
``forward_features`` gives stride-32 tokens, which do not; its ConvNeXt distillation recipe is not released).
Self-distillation (no ``distillation``) of a ConvNeXt is refused: the student would see the very crops the
teacher sees, the iBOT task would be void.

Nodata handling: crops carry valid masks; patches that are entirely nodata in a global crop are excluded
from the iBOT loss (their weight is set to 0 and the remaining weights renormalised per image), so nodata
never becomes training signal; nodata pixels themselves enter the network as the normalised zero (band
mean).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3geo.models import ConvNeXt, build_backbone, load_backbone
from dinov3geo.models.convnext import TOTAL_STRIDE
from dinov3geo.ssl.checkpoints import (
    load_teacher_backbone,
    load_teacher_modules,
    read_stage_checkpoint,
    teacher_parts,
)
from dinov3geo.ssl.config import SSLConfig
from dinov3geo.ssl.heads import DINOHead
from dinov3geo.ssl.losses import DINOLoss, GramLoss, KoLeoLoss, KoLeoLossDistributed, iBOTPatchLoss
from dinov3geo.ssl.precision import cast_call
from dinov3geo.ssl.schedules import ScheduleSpec

log = logging.getLogger("dinov3geo.ssl")


def _check_convnext_student(cfg: SSLConfig, backbone: ConvNeXt) -> None:
    """What a ConvNeXt student needs (one-line ``ValueError`` naming the key otherwise): distillation from a
    ViT teacher, a 16 px grid equal to ``student.patch_size``, global crops a multiple of 32 (its total
    stride: exact stage grids) and local crops of at least 32 px."""
    arch = cfg.student.arch
    if not cfg.distillation.enabled:
        raise ValueError(
            f"student.arch {arch} is a ConvNeXt: it is trained by distillation only (set distillation.enabled: true "
            "and distillation.teacher_checkpoint: a ViT stage checkpoint); a CNN cannot take the iBOT mask tokens "
            "that self-distillation feeds the student")
    if backbone.patch_size is None or int(backbone.patch_size) != int(cfg.student.patch_size):
        raise ValueError(f"student.patch_size is {cfg.student.patch_size} but the ConvNeXt student's grid is "
                         f"{backbone.patch_size}: set student.overrides.patch_size to {cfg.student.patch_size}")
    sizes = [("crops.global_crops_size", cfg.crops.global_crops_size)]
    sizes += [(f"crops.resolution_mix[{i}].global_crops_size", int(m["global_crops_size"]))
              for i, m in enumerate(cfg.crops.resolution_mix) if "global_crops_size" in m]
    for key, size in sizes:
        if int(size) % TOTAL_STRIDE:
            up = -(-int(size) // TOTAL_STRIDE) * TOTAL_STRIDE
            raise ValueError(f"{key} is {size}: a ConvNeXt student needs global crops that are a multiple of "
                             f"{TOTAL_STRIDE} (its total stride), e.g. {up}")
    locals_ = [("crops.local_crops_size", cfg.crops.local_crops_size)]
    locals_ += [(f"crops.resolution_mix[{i}].local_crops_size", int(m["local_crops_size"]))
                for i, m in enumerate(cfg.crops.resolution_mix) if "local_crops_size" in m]
    for key, size in locals_:
        if int(size) < TOTAL_STRIDE:
            raise ValueError(f"{key} is {size}: a ConvNeXt student needs crops of at least {TOTAL_STRIDE} px")


def _block_schedule(spec: dict[str, Any] | None, total: int) -> Any:
    if not spec:
        return None
    s = ScheduleSpec(
        float(spec.get("start", 0.0)), float(spec.get("peak", 0.0)), float(spec.get("end", 0.0)),
        int(spec.get("warmup_iterations", 0)),
        None if spec.get("cosine_iterations") is None else int(spec["cosine_iterations"]),
    )
    return s.build(total)


class SSLMetaArch(nn.Module):
    """The DINOv3 SSL model (see module docstring).

    Args:
        cfg: the stage configuration.
        in_chans: number of input bands.
    """

    def __init__(self, cfg: SSLConfig, in_chans: int) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.crops.local_crops_number <= 0:
            raise ValueError("crops.local_crops_number must be > 0 (the official recipe needs local crops)")
        overrides = dict(cfg.student.overrides)
        overrides.setdefault("in_chans", in_chans)
        overrides.setdefault("drop_path_rate", cfg.student.drop_path_rate)
        overrides.setdefault("layerscale_init", cfg.student.layerscale)
        student_backbone = build_backbone(cfg.student.arch, **overrides)
        if cfg.student.pretrained_weights:
            student_backbone = load_backbone(cfg.student.pretrained_weights, arch=None, strict=True)
        self.convnext_student = isinstance(student_backbone, ConvNeXt)
        if self.convnext_student:
            _check_convnext_student(cfg, student_backbone)
            student_backbone.tokens_on_grid = True  # iBOT: patch tokens on the teacher's 16 px grid
        embed_dim = student_backbone.embed_dim
        self.embed_dim = embed_dim

        def head(c: Any) -> DINOHead:
            return DINOHead(in_dim=embed_dim, out_dim=c.head_n_prototypes, hidden_dim=c.head_hidden_dim,
                            bottleneck_dim=c.head_bottleneck_dim, nlayers=c.head_nlayers)

        self.student = nn.ModuleDict({"backbone": student_backbone, "dino_head": head(cfg.dino),
                                      "ibot_head": head(cfg.ibot)})
        if cfg.student.resume_from_teacher_chkpt:
            self._init_student_from_stage(cfg.student.resume_from_teacher_chkpt)
        self.distillation = cfg.distillation.enabled
        if self.distillation:
            # a frozen teacher of another (bigger) architecture; the student's EMA is what gets saved
            if not cfg.distillation.teacher_checkpoint:
                raise ValueError("distillation.enabled needs distillation.teacher_checkpoint (a stage checkpoint "
                                 "whose teacher has trained heads; train heads for an external backbone with a "
                                 "stage that sets student.pretrained_weights and student.freeze_backbone)")
            teacher, tcfg = load_teacher_modules(cfg.distillation.teacher_checkpoint)
            for sec in ("dino", "ibot"):
                if tcfg[sec]["head_n_prototypes"] != getattr(cfg, sec).head_n_prototypes:
                    raise ValueError(f"{sec}.head_n_prototypes must equal the teacher's "
                                     f"({tcfg[sec]['head_n_prototypes']}) for distillation")
            if self.convnext_student:
                tb = teacher["backbone"]
                if isinstance(tb, ConvNeXt) or int(getattr(tb, "patch_size", 0)) != int(student_backbone.patch_size):
                    raise ValueError(
                        f"distillation.teacher_checkpoint {cfg.distillation.teacher_checkpoint} holds a "
                        f"{'ConvNeXt' if isinstance(tb, ConvNeXt) else f'ViT/{tb.patch_size}'} teacher; a ConvNeXt "
                        f"student ({cfg.student.arch}) distils from a ViT/{student_backbone.patch_size} teacher "
                        "(its iBOT targets are the teacher's patch tokens on that grid)")
            self.teacher = teacher
            self.student_ema = copy.deepcopy(self.student)
            self.student_ema.requires_grad_(False)
        else:
            self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        if cfg.student.freeze_backbone:
            self.student["backbone"].requires_grad_(False)

        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        self.ibot_patch_loss = iBOTPatchLoss(cfg.ibot.head_n_prototypes)
        if cfg.dino.koleo_loss_distributed:
            self.koleo_loss: nn.Module = KoLeoLossDistributed(
                topk=cfg.dino.koleo_topk, loss_group_size=cfg.dino.koleo_distributed_loss_group_size)
        else:
            if cfg.dino.koleo_topk != 1:
                raise ValueError("dino.koleo_topk must be 1 unless dino.koleo_loss_distributed is true")
            self.koleo_loss = KoLeoLoss()

        total = cfg.optim.iterations
        self.dino_local_loss_schedule = (
            _block_schedule(cfg.dino.local_loss_weight_schedule, total) if cfg.dino.reweight_dino_local_loss
            else None
        )
        # Gram anchoring
        g = cfg.gram
        self.gram_use_loss = g.use_loss
        self.has_gram_teacher = g.use_loss and not g.ema_teacher
        self.gram_teacher_initialized = False
        self.gram_updates_done = 0
        self.gram_teacher: nn.ModuleDict | None = None
        if g.use_loss and cfg.distillation.enabled:
            raise ValueError("gram.use_loss and distillation.enabled cannot both be set (no Gram term in distillation)")
        if g.use_loss:
            if g.tokens_used not in ("all", "masked", "unmasked"):
                raise ValueError(f"gram.tokens_used must be all/masked/unmasked, got {g.tokens_used!r}")
            if g.ema_teacher and g.rep_update:
                raise ValueError("gram.ema_teacher and gram.rep_update cannot both be true")
            self.gram_loss = GramLoss(apply_norm=g.normalized, remove_neg=g.remove_neg,
                                      remove_only_teacher_neg=g.remove_only_teacher_neg)
            self.gram_loss_schedule = _block_schedule(g.loss_weight_schedule, total)
            if self.has_gram_teacher:
                self.gram_teacher = nn.ModuleDict({"backbone": copy.deepcopy(student_backbone)})
                self.gram_teacher.requires_grad_(False)
                if g.ckpt:
                    gt = load_teacher_backbone(g.ckpt)
                    self.gram_teacher["backbone"].load_state_dict(gt.state_dict())
                    self.gram_teacher_initialized = True

    _ema_lists: tuple[list[Tensor], list[Tensor]] | None = None
    #: dtype of the parameter copies the networks compute with (``train.precision: bf16-params``), or None
    param_dtype: torch.dtype | None = None

    def _run(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)``, on cast parameter copies under ``bf16-params`` (:func:`cast_call`)."""
        if self.param_dtype is None:
            return module(*args, **kwargs)
        return cast_call(module, self.param_dtype, *args, **kwargs)

    @property
    def model_ema(self) -> nn.ModuleDict:
        """The EMA copy of the student: the teacher, or (distillation) the student EMA that gets saved."""
        return self.student_ema if self.distillation else self.teacher

    @torch.no_grad()
    def _init_student_from_stage(self, source: str) -> None:
        """Student (backbone, and heads when the file has them) from a previous stage's EMA teacher."""
        from pathlib import Path

        if Path(source).suffix == ".ckpt":
            parts = teacher_parts(read_stage_checkpoint(source))
            for name, sd in parts.items():
                if name in self.student:
                    self.student[name].load_state_dict(sd, strict=True)
        else:
            bb = load_backbone(source, strict=True)
            self.student["backbone"].load_state_dict(bb.state_dict(), strict=True)
        log.info("student initialised from the teacher of %s", source)

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()  # the teacher never augments RoPE or drops paths
        if self.distillation:
            self.student_ema.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    # ------------------------------------------------------------------ teacher / student
    @torch.no_grad()
    def get_teacher_output(self, images: Tensor, *, teacher_temp: float, n_masked_patches_tensor: Tensor,
                           mask_indices_list: Tensor) -> dict[str, Tensor]:
        n_crops, B = images.shape[:2]
        out = self._run(self.teacher["backbone"], images.flatten(0, 1), is_training=True)
        cls, reg, patch = out["x_norm_clstoken"], out["x_storage_tokens"], out["x_norm_patchtokens"]
        buffer = torch.index_select(patch.flatten(0, 1), dim=0, index=mask_indices_list)
        masked_after_head = self._run(self.teacher["ibot_head"], buffer)
        cls_after_head = self._run(self.teacher["dino_head"], cls)
        cls_centered = self.dino_loss.sinkhorn_knopp_teacher(cls_after_head, teacher_temp=teacher_temp)
        masked_centered = self.ibot_patch_loss.sinkhorn_knopp_teacher(
            masked_after_head, teacher_temp=teacher_temp, n_masked_patches_tensor=n_masked_patches_tensor)
        return {
            "cls_pre_head": cls.unflatten(0, (n_crops, B)),
            "reg_pre_head": reg.unflatten(0, (n_crops, B)),
            "patch_pre_head": patch.unflatten(0, (n_crops, B)),
            "cls_after_head": cls_after_head.unflatten(0, (n_crops, B)),
            "cls_centered": cls_centered.unflatten(0, (n_crops, B)),
            "masked_patch_centered": masked_centered,
        }

    def get_student_output(self, *, global_crops: Tensor, local_crops: Tensor, masks: Tensor | None,
                           mask_indices_list: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        n_g, B = global_crops.shape[:2]
        n_l = local_crops.shape[0]
        g_out, l_out = self._run(
            self.student["backbone"], [global_crops.flatten(0, 1), local_crops.flatten(0, 1)],
            masks=[None if self.distillation else masks, None], is_training=True)
        g_cls, g_patch = g_out["x_norm_clstoken"], g_out["x_norm_patchtokens"]
        l_cls = l_out["x_norm_clstoken"]
        masked_pre_head = torch.index_select(g_patch.flatten(0, 1), dim=0, index=mask_indices_list)
        masked_after_head = self._run(self.student["ibot_head"], masked_pre_head)
        buffer = self._run(self.student["dino_head"], torch.cat([g_cls, l_cls], dim=0))
        g_head, l_head = torch.split_with_sizes(buffer, [g_cls.shape[0], l_cls.shape[0]], dim=0)
        return (
            {
                "cls_pre_head": g_cls.unflatten(0, (n_g, B)),
                "patch_pre_head": g_patch.unflatten(0, (n_g, B)),
                "cls_after_head": g_head.unflatten(0, (n_g, B)),
                "masked_patch_after_head": masked_after_head,
            },
            {"cls_after_head": l_head.unflatten(0, (n_l, B))},
        )

    def get_gram_teacher_output(self, images: Tensor | None, *, masks: Tensor, teacher_global: dict[str, Tensor],
                                student_global: dict[str, Tensor], student_crop_size: int) -> dict[str, Tensor]:
        student_patches = student_global["patch_pre_head"].flatten(0, 1)
        if self.cfg.gram.ema_teacher or images is None:
            teacher_patches = teacher_global["patch_pre_head"].flatten(0, 1)
        else:
            if not self.gram_teacher_initialized:
                raise RuntimeError("the Gram teacher is not initialised: give gram.ckpt or gram.it_load_ema_teacher")
            assert self.gram_teacher is not None
            with torch.no_grad():
                out = self._run(self.gram_teacher["backbone"], images.flatten(0, 1), is_training=True)
            teacher_patches = out["x_norm_patchtokens"]
            if teacher_patches.shape[1] != student_patches.shape[1]:
                p = self.cfg.student.patch_size
                n_t = images.shape[-1] // p
                n_s = student_crop_size // p
                hw = teacher_patches.transpose(-2, -1).unflatten(-1, (n_t, n_t))
                hw = F.interpolate(hw, size=(n_s, n_s), mode=self.cfg.gram.global_teacher_resize_method,
                                   align_corners=False, antialias=self.cfg.gram.global_teacher_resize_antialias)
                teacher_patches = hw.flatten(-2, -1).transpose(-2, -1)
        if self.cfg.gram.tokens_used == "masked":
            student_patches, teacher_patches = student_patches[masks], teacher_patches[masks]
        elif self.cfg.gram.tokens_used == "unmasked":
            student_patches, teacher_patches = student_patches[~masks], teacher_patches[~masks]
        return {"student_patches": student_patches, "teacher_patches": teacher_patches}

    # ------------------------------------------------------------------ losses
    def forward_losses(self, data: dict[str, Any], *, teacher_temp: float, iteration: int = 0
                       ) -> tuple[Tensor, dict[str, Any]]:
        """Compute the total loss and a metrics dict for one collated batch (no backward)."""
        n_g = 2
        n_l = self.cfg.crops.local_crops_number
        global_crops = data["collated_global_crops"]
        local_crops = data["collated_local_crops"]
        B = local_crops.shape[0] // n_l
        masks = data["collated_masks"]
        mask_indices_list = data["mask_indices_list"]
        masks_weight = data["masks_weight"]
        n_masked = data["n_masked_patches"]
        g = global_crops.unflatten(0, (n_g, B))
        teacher_global = self.get_teacher_output(g, teacher_temp=teacher_temp, n_masked_patches_tensor=n_masked,
                                                 mask_indices_list=mask_indices_list)
        student_global, student_local = self.get_student_output(
            global_crops=g, local_crops=local_crops.unflatten(0, (n_l, B)), masks=masks,
            mask_indices_list=mask_indices_list)

        loss_dict: dict[str, Any] = {}
        dino_cfg = self.cfg.dino
        g_terms = n_g * (n_g - 1) if dino_cfg.global_ignore_diagonal else n_g**2
        l_terms = n_g * n_l
        g_scale, l_scale = g_terms / (g_terms + l_terms), l_terms / (g_terms + l_terms)
        dino_local = self.dino_loss(student_local["cls_after_head"], teacher_global["cls_centered"])
        local_weight = self.dino_local_loss_schedule[iteration] if self.dino_local_loss_schedule is not None else 1.0
        total = dino_cfg.loss_weight * l_scale * local_weight * dino_local
        dino_global = self.dino_loss(student_global["cls_after_head"], teacher_global["cls_centered"],
                                     ignore_diagonal=dino_cfg.global_ignore_diagonal)
        total = total + dino_cfg.loss_weight * g_scale * dino_global
        koleo = sum(self.koleo_loss(x) for x in student_global["cls_pre_head"]) / n_g
        total = total + dino_cfg.koleo_loss_weight * n_g * koleo
        ibot = self.ibot_patch_loss.forward_masked(
            student_global["masked_patch_after_head"], teacher_global["masked_patch_centered"],
            student_masks_flat=masks, n_masked_patches=mask_indices_list.shape[0], masks_weight=masks_weight)
        total = total + self.cfg.ibot.loss_weight * ibot
        loss_dict.update(dino_local_crops_loss=dino_local.detach(), dino_global_crops_loss=dino_global.detach(),
                         koleo_loss=koleo.detach(), ibot_loss=ibot.detach(), dino_local_loss_weight=local_weight)
        if self.gram_use_loss:
            gram_crops = data.get("collated_gram_teacher_crops") if self.has_gram_teacher else None
            if self.has_gram_teacher and gram_crops is None:
                raise ValueError("no Gram-teacher crops in the batch: set crops.gram_teacher_crops_size")
            gram_out = self.get_gram_teacher_output(
                gram_crops.unflatten(0, (n_g, B)) if gram_crops is not None else None,
                masks=masks, teacher_global=teacher_global, student_global=student_global,
                student_crop_size=global_crops.shape[-1])
            gram = self.gram_loss(gram_out["student_patches"], gram_out["teacher_patches"],
                                  img_level=self.cfg.gram.img_level)
            w = self.gram_loss_schedule[iteration] if self.gram_loss_schedule is not None else self.cfg.gram.loss_weight
            total = total + w * gram
            loss_dict.update(gram_loss=gram.detach(), gram_loss_weight=w)
        loss_dict["total_loss"] = total.detach()
        loss_dict["_student_patches"] = student_global["patch_pre_head"].detach()
        return total, loss_dict

    # ------------------------------------------------------------------ EMA / Gram teacher
    @torch.no_grad()
    def update_ema(self, m: float) -> None:
        """``teacher = m * teacher + (1 - m) * student`` over backbone and both heads."""
        if self._ema_lists is None:
            self._ema_lists = ([p for k in self.student for p in self.student[k].parameters()],
                               [p for k in self.student for p in self.model_ema[k].parameters()])
        s, t = self._ema_lists
        torch._foreach_lerp_(t, s, 1.0 - m)  # t + (1 - m) * (s - t) = m * t + (1 - m) * s, one pass

    @torch.no_grad()
    def gram_load_ema_teacher(self) -> None:
        """Copy the EMA teacher's backbone into the Gram teacher (a hard copy, heads not used)."""
        if self.gram_teacher is None:
            return
        self.gram_teacher["backbone"].load_state_dict(self.model_ema["backbone"].state_dict())
        self.gram_teacher.requires_grad_(False)
        self.gram_teacher.eval()
        self.gram_teacher_initialized = True

    def maybe_update_gram(self, iteration: int) -> bool:
        """Gram-teacher refresh rules of the official train loop; returns True when the teacher changed.

        * no ``gram.ckpt``: load the EMA teacher at ``gram.it_load_ema_teacher``;
        * ``gram.rep_update``: replace by the EMA teacher when ``(it+1) >= it_first_update`` and
          ``(it+1) % update_frequency == 0``, at most ``max_updates`` times.
        """
        if self.gram_teacher is None:
            return False
        g = self.cfg.gram
        if not self.gram_teacher_initialized and not g.ckpt and iteration >= g.it_load_ema_teacher:
            self.gram_load_ema_teacher()
            return True
        if (g.rep_update and (iteration + 1) >= g.it_first_update and (iteration + 1) % g.update_frequency == 0
                and (g.max_updates is None or self.gram_updates_done < g.max_updates)):
            self.gram_load_ema_teacher()
            self.gram_updates_done += 1
            return True
        return False
