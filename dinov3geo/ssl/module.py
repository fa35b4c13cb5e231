"""The Lightning module of a pretraining stage: one DINOv3 SSL step per iteration.

Manual optimisation, as in the official loop: per-iteration schedules (LR with layer-wise decay and
last-layer freeze, weight decay, teacher temperature, EMA momentum), forward + backward of the SSL losses,
per-submodule gradient clipping, AdamW step, EMA update, Gram-teacher refresh. The global RNG is re-seeded
from ``(seed, iteration, rank)`` at every step, and the data of an iteration is a pure function of it
(:mod:`dinov3geo.ssl.data`), so a run killed and resumed from a checkpoint produces the same losses as an
uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl
import torch

from dinov3geo.ssl.config import SSLConfig
from dinov3geo.ssl.data import batch_to
from dinov3geo.ssl.health import feature_health
from dinov3geo.ssl.meta_arch import SSLMetaArch
from dinov3geo.ssl.param_groups import (
    apply_optim_scheduler,
    build_optimizer,
    clip_grad_norm_per_module,
    get_params_groups,
)
from dinov3geo.ssl.schedules import Schedules, ScheduleSpec, build_schedules
from dinov3geo.utils.threads import tick_threads

log = logging.getLogger("dinov3geo.ssl")


def step_seed(seed: int, iteration: int, rank: int) -> int:
    """The global-RNG seed of one training step (RoPE box jittering, drop-path draws)."""
    return (seed * 1_000_003 + iteration * 7919 + rank * 104_729) % (2**63 - 1)


def drop_invalid_masked_patches(data: dict[str, Any]) -> dict[str, Any]:
    """Unmask iBOT patches that hold no valid pixel, so nodata never becomes an iBOT target.

    Recomputes ``mask_indices_list``, ``masks_weight`` (1 / #masked per image) and ``n_masked_patches``.
    """
    pv = data.get("collated_global_patch_valid")
    masks = data["collated_masks"]
    if pv is None or pv.shape != masks.shape:
        return data
    keep = masks & (pv > 0)
    if torch.equal(keep, masks):
        return data
    if not keep.any():  # keep at least one target so the loss stays defined
        first = masks.flatten().nonzero()[:1]
        keep = torch.zeros_like(masks).flatten()
        keep[first] = True
        keep = keep.view_as(masks)
    counts = keep.sum(-1).clamp(min=1)
    weights = (1.0 / counts.float()).unsqueeze(-1).expand_as(keep)[keep]
    out = dict(data)
    out["collated_masks"] = keep
    out["mask_indices_list"] = keep.flatten().nonzero().flatten()
    out["masks_weight"] = weights.to(data["masks_weight"].dtype)
    out["n_masked_patches"] = torch.full_like(data["n_masked_patches"], int(keep.sum()))
    return out


class SSLModule(pl.LightningModule):
    """DINOv3 pretraining stage as a ``LightningModule`` (see module docstring)."""

    def __init__(self, cfg: SSLConfig, in_chans: int, band_names: list[str], global_batch_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.band_names = band_names
        self.automatic_optimization = False
        self.model = SSLMetaArch(cfg, in_chans=in_chans)
        s = cfg.schedules
        self.schedules: Schedules = build_schedules(
            cfg.optim.iterations,
            lr=ScheduleSpec(**vars(s.lr)), weight_decay=ScheduleSpec(**vars(s.weight_decay)),
            momentum=ScheduleSpec(**vars(s.momentum)), teacher_temp=ScheduleSpec(**vars(s.teacher_temp)),
            freeze_last_layer_iterations=cfg.optim.freeze_last_layer_iterations,
            global_batch_size=global_batch_size,
            scaling_rule=None if cfg.optim.scaling_rule == "none" else cfg.optim.scaling_rule,  # type: ignore[arg-type]
        )
        self._t_last = time.perf_counter()
        self._wait = 0.0

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        groups = get_params_groups(
            dict(self.model.student.items()), layerwise_decay=o.layerwise_decay,
            patch_embed_lr_mult=o.patch_embed_lr_mult, dino_head_wd_multiplier=o.dino_head_wd_multiplier,
            foreach=None,
        )
        groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
        # the fused AdamW kernel (CPU and CUDA) instead of per-tensor or foreach updates
        return build_optimizer(groups, lr=0.0, weight_decay=0.0, betas=(o.adamw_beta1, o.adamw_beta2), fused=True)

    # ------------------------------------------------------------------ step
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._wait = time.perf_counter() - self._t_last  # time spent waiting for data
        tick_threads()  # intra-op threads follow the cores other processes (our data workers too) leave free

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        it = int(self.global_step)
        torch.manual_seed(step_seed(self.cfg.train.seed, it, self.global_rank))
        v = self.schedules[it]
        opt = self.optimizers()
        apply_optim_scheduler(opt.optimizer if hasattr(opt, "optimizer") else opt, v.lr, v.weight_decay,
                              v.last_layer_lr)
        if self.model.maybe_update_gram(it):
            log.info("iteration %d: Gram teacher refreshed from the EMA teacher", it)
        data = drop_invalid_masked_patches(batch_to(batch, self.device))
        opt.zero_grad(set_to_none=True)
        loss, metrics = self.model.forward_losses(data, teacher_temp=v.teacher_temp, iteration=it)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} at iteration {it}: {metrics}")
        self.manual_backward(loss)
        norms = clip_grad_norm_per_module(dict(self.model.student.items()), self.cfg.optim.clip_grad) \
            if self.cfg.optim.clip_grad > 0 else {}
        opt.step()
        self.model.update_ema(v.momentum)
        patches = metrics.pop("_student_patches")
        bs = data["collated_global_crops"].shape[0] // 2
        logs = {k: float(x) for k, x in metrics.items()}
        logs.update(lr=v.lr, wd=v.weight_decay, mom=v.momentum, teacher_temp=v.teacher_temp,
                    **{k: float(x) for k, x in norms.items()})
        now = time.perf_counter()
        dt = now - self._t_last
        self._t_last = now
        logs["imgs_per_s"] = bs * self.trainer.world_size / max(dt, 1e-9)
        logs["data_wait_s"] = self._wait
        h = self.cfg.train.health_every
        if h and (it % h == 0 or it == self.cfg.optim.iterations - 1):
            logs.update(feature_health(patches))
        self.log_dict(logs, on_step=True, prog_bar=False, batch_size=bs, sync_dist=False)
        self.log("loss", logs["total_loss"], prog_bar=True, on_step=True, batch_size=bs)
        self.log("img/s", logs["imgs_per_s"], prog_bar=True, on_step=True, batch_size=bs)
        return loss.detach()

    # ------------------------------------------------------------------ checkpoint extras
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dinov3geo"] = {
            "config": self.cfg.to_dict(),
            "band_names": list(self.band_names),
            "gram_teacher_initialized": bool(self.model.gram_teacher_initialized),
            "gram_updates_done": int(self.model.gram_updates_done),
            "schedules": self.schedules.to_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("dinov3geo", {})
        self.model.gram_teacher_initialized = bool(extra.get("gram_teacher_initialized", False))
        self.model.gram_updates_done = int(extra.get("gram_updates_done", 0))
