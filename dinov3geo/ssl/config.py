"""Typed pretraining configuration, loaded from YAML with safe loading; unknown keys are errors.

The sections mirror Meta's ``ssl_default_config.yaml`` (``student``, ``crops``, ``dino``, ``ibot``, ``gram``,
``optim``, ``schedules``, ``train``) with the same key names where a key exists there, so a DINOv3 user can
read a dinov3geo config at a glance; ``data`` is ours (the tile store). Iterations replace epochs (one
"epoch" of the official configs is ``OFFICIAL_EPOCH_LENGTH`` iterations anyway). Every key is documented in
``pipelines/configs/pretrain_satellite.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinov3geo.utils.config import ConfigError, apply_overrides, from_dict

#: Stage sections a multi-stage config file may hold (next to ``common:``), in run order.
STAGES: tuple[str, ...] = ("pretrain", "gram", "highres", "distill")


# ------------------------------------------------------------------------------------------------ sections
@dataclass
class DataConfig:
    """Where tiles come from and how they are batched."""

    store: str = ""  #: tile store written by ``dinov3geo ingest`` (required)
    bands: list[str] | None = None  #: band subset (store order by default)
    normalize: str | list[list[float]] = "store"  #: "store" (store stats), "none", or [[mean...], [std...]]
    batch_size: int = 8  #: samples per device per step (the official batch_size_per_gpu)
    num_workers: int = 2  #: DataLoader worker processes
    min_valid_fraction: float = 0.5  #: crops with fewer valid pixels are re-sampled (up to 10 times)


@dataclass
class StudentConfig:
    arch: str = "vit_tiny_test"  #: a name from dinov3geo.models.list_archs()
    patch_size: int = 16
    drop_path_rate: float = 0.0
    layerscale: float = 1e-5
    pretrained_weights: str | None = None  #: optional backbone to start from (anything load_backbone reads)
    resume_from_teacher_chkpt: str | None = None  #: a previous stage's checkpoint (student <- its teacher)
    freeze_backbone: bool = False  #: train the heads only (e.g. heads for a frozen external teacher)
    overrides: dict[str, Any] = field(default_factory=dict)  #: extra build_backbone(**overrides)


@dataclass
class CropsConfig:
    global_crops_size: int = 112
    local_crops_size: int = 48
    local_crops_number: int = 4
    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    gram_teacher_crops_size: int | None = None
    gram_teacher_no_distortions: bool = True
    horizontal_flips: bool = True
    vertical_flips: bool = True
    rotations: bool = True  #: 90 degree rotations (valid for nadir imagery)
    blur_mode: str = "intended"  #: "intended" or "released" (the official 1-p bug, spec 2.2)
    #: high-resolution adaptation: per-batch mix of {global_crops_size, local_crops_size,
    #: gram_teacher_crops_size, share}; empty = the single sizes above
    resolution_mix: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class DinoConfig:
    loss_weight: float = 1.0
    global_ignore_diagonal: bool = True
    head_n_prototypes: int = 4096
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 1024
    koleo_loss_weight: float = 0.1
    koleo_loss_distributed: bool = False
    koleo_topk: int = 1
    koleo_distributed_loss_group_size: int | None = None
    reweight_dino_local_loss: bool = False
    local_loss_weight_schedule: dict[str, float] | None = None  #: {start, peak, end, warmup_iterations, ...}


@dataclass
class IbotConfig:
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])
    head_n_prototypes: int = 4096
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 1024


@dataclass
class GramConfig:
    use_loss: bool = False
    loss_weight: float = 1.0
    loss_weight_schedule: dict[str, float] | None = None
    ckpt: str | None = None  #: checkpoint of the first Gram teacher (else taken from the EMA teacher)
    ema_teacher: bool = False
    it_load_ema_teacher: int = 0  #: iteration at which the EMA teacher is copied in (when no ckpt)
    rep_update: bool = True
    update_frequency: int = 10_000
    it_first_update: int = 0
    max_updates: int | None = None
    normalized: bool = True
    img_level: bool = True
    remove_neg: bool = False
    remove_only_teacher_neg: bool = False
    tokens_used: str = "all"
    global_teacher_resize_method: str = "bicubic"
    global_teacher_resize_antialias: bool = False
    compute_stats: bool = False


@dataclass
class DistillationConfig:
    enabled: bool = False
    #: a dinov3geo stage checkpoint (``checkpoints/last.ckpt``) whose EMA teacher (backbone + heads) is the
    #: frozen teacher; its architecture is read from the checkpoint
    teacher_checkpoint: str | None = None


@dataclass
class OptimConfig:
    iterations: int = 1000  #: total iterations of this stage
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999
    clip_grad: float = 3.0
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    dino_head_wd_multiplier: float = 1.0
    freeze_last_layer_iterations: int = 0
    scaling_rule: str = "sqrt_wrt_1024"  #: "sqrt_wrt_1024", "linear_wrt_256" or "none"


@dataclass
class ScheduleBlock:
    """A v2 schedule: linear start->peak over warmup, cosine peak->end over cosine_iterations, then end."""

    start: float = 0.0
    peak: float = 0.0
    end: float = 0.0
    warmup_iterations: int = 0
    cosine_iterations: int | None = None


@dataclass
class SchedulesConfig:
    lr: ScheduleBlock = field(default_factory=lambda: ScheduleBlock(0.0, 5e-5, 5e-5, 100))
    weight_decay: ScheduleBlock = field(default_factory=lambda: ScheduleBlock(0.04, 0.04, 0.04, 0))
    momentum: ScheduleBlock = field(default_factory=lambda: ScheduleBlock(0.994, 0.994, 0.994, 0))
    teacher_temp: ScheduleBlock = field(default_factory=lambda: ScheduleBlock(0.04, 0.07, 0.07, 300))


@dataclass
class TrainConfig:
    output_dir: str = "outputs/pretrain"
    seed: int = 0
    accelerator: str = "auto"  #: "auto", "cpu", "gpu"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"  #: "auto", "ddp", "fsdp"
    precision: str = "auto"  #: "auto" (bf16-mixed on CUDA, 32-true on CPU), "32-true", "bf16-mixed", "bf16-params"
    checkpoint_every: int = 100  #: iterations between (atomic) resumable checkpoints
    log_every: int = 10
    health_every: int = 50  #: iterations between dense-feature health metrics (0 = off)
    progress_bar: bool = True
    #: keep freed memory in the process between steps (glibc; no page faults on reused buffers; CPU speed-up)
    keep_freed_memory: bool = True


@dataclass
class SSLConfig:
    """A whole pretraining stage."""

    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedules: SchedulesConfig = field(default_factory=SchedulesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ loading
def load_config(
    source: str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None, section: str | None = None
) -> SSLConfig:
    """Load a config from a YAML file (safe loading) or a dict, apply ``key.sub=value`` overrides.

    Args:
        source: YAML path or mapping; None gives the defaults.
        overrides: ``["optim.iterations=20", "data.store=tiles.zarr"]`` (values parsed as YAML scalars).
        section: when the YAML holds several stages (``pretrain:``, ``gram:``...), the stage to load; its
            mapping is merged over the file's ``common:`` section if present.
    """
    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        from dinov3geo.utils.config import load_yaml

        raw = load_yaml(source, "pretraining config") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a pretraining config is a YAML mapping of sections")
    if section is not None:
        extra = sorted(set(raw) - {"common", *STAGES})
        if extra:
            raise ConfigError(f"unknown top-level key(s) {extra} in a staged config; allowed: common, {list(STAGES)}")
        if section not in raw:
            raise ConfigError(f"no stage {section!r} in the config (stages: {[k for k in raw if k != 'common']})")
        raw = _deep_merge(raw.get("common", {}) or {}, raw[section] or {})
    apply_overrides(raw, overrides or [])
    return from_dict(SSLConfig, raw)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in a.items()}
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
