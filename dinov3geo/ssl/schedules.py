"""Training schedules (LR, weight decay, EMA momentum, teacher temperature, last-layer LR).

Mirrors the official ``dinov3/train/cosine_lr_scheduler.py`` (``CosineScheduler``, the v1 schedules, and
``linear_warmup_cosine_decay``, the v2 schedules) and the schedule construction of ``dinov3/train/train.py``
(``build_schedulers`` / ``build_schedulers_v2``) plus the LR scaling rules of
``dinov3/configs/config.py::apply_scaling_rules_to_cfg``.

Every schedule here is a pure function of the iteration (``schedule[it]``), so a resumed run only needs the
iteration counter and the schedule configuration (``to_dict`` / ``from_dict``); nothing else is stateful.
:class:`WarmupCosineSchedule` evaluates the v2 formula in closed form (O(1) memory even for 1.2M
iterations) and agrees with the official array (``linear_warmup_cosine_decay``) to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

__all__ = [
    "CosineScheduler",
    "ScheduleValues",
    "Schedules",
    "WarmupCosineSchedule",
    "ScheduleSpec",
    "build_schedules",
    "build_schedules_v1",
    "dinov3_7b_pretrain_schedules",
    "high_res_adaptation_schedules",
    "linear_warmup_cosine_decay",
    "lr_scaling_factor",
    "scale_lr",
    "schedule_from_dict",
]

ScalingRule = Literal["sqrt_wrt_1024", "linear_wrt_256", "none"]


def linear_warmup_cosine_decay(
    start: float,
    peak: float,
    end: float,
    warmup_iterations: int,
    total_iterations: int,
    cosine_iterations: int | None = None,
) -> np.ndarray:
    """Schedule v2 as an array of ``total_iterations`` values (official ``linear_warmup_cosine_decay``).

    ``np.linspace(start, peak, warmup, endpoint=False)`` (so ``peak`` is first reached at iteration
    ``warmup``), then ``(peak - end) * (cos(linspace(0, pi, cosine)) + 1) / 2 + end`` (``end`` is reached at
    the last cosine iteration), then ``end`` for the remaining iterations. ``cosine_iterations`` defaults to
    everything after the warmup.

    Raises:
        ValueError: if ``warmup_iterations + cosine_iterations > total_iterations`` (an assert upstream).
    """
    linear = np.linspace(start, peak, warmup_iterations, endpoint=False)
    if cosine_iterations is None:
        cosine_iterations = total_iterations - warmup_iterations
    cosine = np.cos(np.linspace(0, np.pi, cosine_iterations))
    cosine = (cosine + 1) / 2
    cosine = (peak - end) * cosine + end
    remaining_iterations = total_iterations - cosine_iterations - warmup_iterations
    if remaining_iterations < 0:
        raise ValueError(
            f"warmup ({warmup_iterations}) + cosine ({cosine_iterations}) iterations exceed the total "
            f"({total_iterations})"
        )
    constant = np.full((remaining_iterations,), fill_value=end)
    return np.concatenate([linear, cosine, constant])


class CosineScheduler:
    """Schedule v1, a copy of the official ``CosineScheduler`` (``dinov3/train/cosine_lr_scheduler.py``).

    ``freeze_iters`` zeros, then ``np.linspace(start_warmup_value, base_value, warmup_iters)`` (endpoint
    included, unlike v2), then a half cosine from ``base_value`` towards ``final_value`` over the remaining
    ``total_iters - warmup_iters - freeze_iters`` iterations (``final + (base - final) * (1 + cos(pi * i /
    n)) / 2``, so ``final_value`` itself is only returned from ``total_iters`` on). With ``trunc_extra > 0``
    the cosine is computed over ``(1 + trunc_extra)`` times the steps, truncated and rescaled to end exactly
    at ``final_value``. Indexing at or beyond ``total_iters`` returns ``final_value``.
    """

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0,
        freeze_iters: int = 0,
        trunc_extra: float = 0.0,
    ) -> None:
        self.base_value = float(base_value)
        self.final_value = np.float64(final_value)
        self.total_iters = int(total_iters)
        self.warmup_iters = int(warmup_iters)
        self.start_warmup_value = float(start_warmup_value)
        self.freeze_iters = int(freeze_iters)
        self.trunc_extra = float(trunc_extra)

        freeze_schedule = np.zeros(freeze_iters)
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
        if trunc_extra == 0.0:
            iters = np.arange(total_iters - warmup_iters - freeze_iters)
            schedule = final_value + 0.5 * (base_value - final_value) * (
                1 + np.cos(np.pi * iters / len(iters))
            )
        else:
            cosine_steps = total_iters - warmup_iters - freeze_iters
            iters = np.linspace(0, np.pi, int((1 + trunc_extra) * cosine_steps))[:cosine_steps]
            schedule = np.cos(iters)
            schedule = (schedule + 1) / 2
            schedule = (schedule - schedule[-1]) / (1 - schedule[-1])
            schedule = schedule * (base_value - final_value) + final_value
        self.schedule = np.concatenate((freeze_schedule, warmup_schedule, schedule), dtype=np.float64)
        if len(self.schedule) != self.total_iters:
            raise ValueError(
                f"freeze ({freeze_iters}) + warmup ({warmup_iters}) iterations exceed the total ({total_iters})"
            )

    def __getitem__(self, it: int) -> float:
        if it >= self.total_iters:
            return float(self.final_value)
        return float(self.schedule[it])

    def __len__(self) -> int:
        return self.total_iters

    def to_dict(self) -> dict[str, Any]:
        """Constructor arguments (the schedule is rebuilt from them)."""
        return {
            "kind": "cosine_v1",
            "base_value": self.base_value,
            "final_value": float(self.final_value),
            "total_iters": self.total_iters,
            "warmup_iters": self.warmup_iters,
            "start_warmup_value": self.start_warmup_value,
            "freeze_iters": self.freeze_iters,
            "trunc_extra": self.trunc_extra,
        }


@dataclass(frozen=True)
class WarmupCosineSchedule:
    """Closed-form schedule v2: value at iteration ``it`` of the official ``linear_warmup_cosine_decay``.

    Same semantics as :func:`linear_warmup_cosine_decay` (see there), evaluated per iteration; iterations
    at or beyond ``total_iterations`` return ``end`` (the array would raise). ``freeze_iterations`` sets the
    value to 0 for the first iterations, which is how the last-layer LR is frozen
    (``last_layer_lr[:freeze_last_layer_iterations] = 0`` in ``build_schedulers_v2``).
    """

    start: float
    peak: float
    end: float
    warmup_iterations: int
    total_iterations: int
    cosine_iterations: int | None = None
    freeze_iterations: int = 0

    def __post_init__(self) -> None:
        if self.warmup_iterations < 0 or self.total_iterations < 0 or self.freeze_iterations < 0:
            raise ValueError("iteration counts must be >= 0")
        if self.warmup_iterations + self.n_cosine > self.total_iterations:
            raise ValueError(
                f"warmup ({self.warmup_iterations}) + cosine ({self.n_cosine}) iterations exceed the total "
                f"({self.total_iterations})"
            )

    @property
    def n_cosine(self) -> int:
        """Number of cosine iterations (the rest after warmup when ``cosine_iterations`` is None)."""
        if self.cosine_iterations is None:
            return self.total_iterations - self.warmup_iterations
        return self.cosine_iterations

    def __getitem__(self, it: int) -> float:
        it = int(it)
        if it < 0:
            raise IndexError(f"negative iteration {it}")
        if it < self.freeze_iterations:
            return 0.0
        w, c = self.warmup_iterations, self.n_cosine
        if it < w:
            # np.linspace(start, peak, w, endpoint=False)[it]
            return float(self.start + it * ((self.peak - self.start) / w))
        if it < w + c:
            k = it - w
            angle = 0.0 if c == 1 else k * (math.pi / (c - 1))  # np.linspace(0, pi, c)[k]
            return float((self.peak - self.end) * ((math.cos(angle) + 1) / 2) + self.end)
        return float(self.end)

    def __len__(self) -> int:
        return self.total_iterations

    def array(self) -> np.ndarray:
        """The whole schedule from the official function (with the freeze applied)."""
        a = linear_warmup_cosine_decay(
            self.start,
            self.peak,
            self.end,
            self.warmup_iterations,
            self.total_iterations,
            self.cosine_iterations,
        )
        a[: self.freeze_iterations] = 0
        return a

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "warmup_cosine_v2", **asdict(self)}


class _FrozenCosine(CosineScheduler):
    """A :class:`CosineScheduler` whose first ``freeze`` values are 0 (the v1 last-layer LR, which the
    official ``build_schedulers`` makes by zeroing the start of a copy of the LR schedule)."""

    def __init__(self, base: CosineScheduler, freeze: int) -> None:
        self.__dict__.update(base.__dict__)
        self.schedule = base.schedule.copy()
        self.schedule[:freeze] = 0
        self.freeze = int(freeze)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "kind": "cosine_v1_frozen", "freeze": self.freeze}


Schedule = WarmupCosineSchedule | CosineScheduler


def schedule_from_dict(d: Mapping[str, Any]) -> Schedule:
    """Inverse of ``to_dict`` of the schedule classes of this module."""
    d = dict(d)
    kind = d.pop("kind")
    if kind == "warmup_cosine_v2":
        return WarmupCosineSchedule(**d)
    if kind == "cosine_v1":
        return CosineScheduler(**d)
    if kind == "cosine_v1_frozen":
        freeze = d.pop("freeze")
        return _FrozenCosine(CosineScheduler(**d), freeze)
    raise ValueError(f"unknown schedule kind {kind!r}")


def lr_scaling_factor(global_batch_size: int, rule: ScalingRule | None) -> float:
    """LR multiplier of the official scaling rules (``dinov3/train/train.py::build_schedulers_v2``).

    ``sqrt_wrt_1024``: ``4 * sqrt(B / 1024)`` (x8 for B = 4096); ``linear_wrt_256``: ``B / 256``;
    ``None``/``"none"``: 1.
    """
    if rule is None or rule == "none":
        return 1.0
    if rule == "sqrt_wrt_1024":
        return 4 * math.sqrt(global_batch_size / 1024.0)
    if rule == "linear_wrt_256":
        return global_batch_size / 256.0
    raise ValueError(f"unknown LR scaling rule {rule!r}")


def scale_lr(lr: float, global_batch_size: int, rule: ScalingRule | None = "sqrt_wrt_1024") -> float:
    """``lr * lr_scaling_factor(global_batch_size, rule)``."""
    return lr * lr_scaling_factor(global_batch_size, rule)


class ScheduleValues(NamedTuple):
    """The five values the official train loop reads at one iteration."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    last_layer_lr: float


@dataclass(frozen=True)
class Schedules:
    """The schedules of one run, indexable by iteration: ``schedules[it] -> ScheduleValues``.

    The LR schedule is stored already scaled (the official v2 builder scales ``peak`` and ``end``, not
    ``start``). ``last_layer_lr`` is the LR schedule with the first ``freeze_last_layer_iterations`` set to 0.
    """

    lr: Schedule
    weight_decay: Schedule
    momentum: Schedule
    teacher_temp: Schedule
    last_layer_lr: Schedule
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, it: int) -> ScheduleValues:
        return ScheduleValues(
            lr=self.lr[it],
            weight_decay=self.weight_decay[it],
            momentum=self.momentum[it],
            teacher_temp=self.teacher_temp[it],
            last_layer_lr=self.last_layer_lr[it],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (for checkpoints); ``Schedules.from_dict`` rebuilds it exactly."""
        return {
            "lr": self.lr.to_dict(),
            "weight_decay": self.weight_decay.to_dict(),
            "momentum": self.momentum.to_dict(),
            "teacher_temp": self.teacher_temp.to_dict(),
            "last_layer_lr": self.last_layer_lr.to_dict(),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Schedules:
        return cls(
            lr=schedule_from_dict(d["lr"]),
            weight_decay=schedule_from_dict(d["weight_decay"]),
            momentum=schedule_from_dict(d["momentum"]),
            teacher_temp=schedule_from_dict(d["teacher_temp"]),
            last_layer_lr=schedule_from_dict(d["last_layer_lr"]),
            meta=dict(d.get("meta", {})),
        )


@dataclass(frozen=True)
class ScheduleSpec:
    """One v2 schedule block of an official config (``schedules.lr`` etc.), in iterations."""

    start: float
    peak: float
    end: float
    warmup_iterations: int = 0
    cosine_iterations: int | None = None

    @classmethod
    def constant(cls, value: float) -> ScheduleSpec:
        return cls(value, value, value, 0)

    @classmethod
    def from_epochs(
        cls,
        start: float,
        peak: float,
        end: float,
        warmup_epochs: float,
        epoch_length: int,
        cosine_epochs: float | None = None,
    ) -> ScheduleSpec:
        """Official config units: ``iterations = epoch_length * epochs``."""
        return cls(
            start,
            peak,
            end,
            int(epoch_length * warmup_epochs),
            None if cosine_epochs is None else int(epoch_length * cosine_epochs),
        )

    def build(
        self, total_iterations: int, scale: float = 1.0, freeze_iterations: int = 0
    ) -> WarmupCosineSchedule:
        return WarmupCosineSchedule(
            start=self.start,
            peak=self.peak * scale,
            end=self.end * scale,
            warmup_iterations=self.warmup_iterations,
            total_iterations=total_iterations,
            cosine_iterations=self.cosine_iterations,
            freeze_iterations=freeze_iterations,
        )


def build_schedules(
    total_iterations: int,
    lr: ScheduleSpec,
    weight_decay: ScheduleSpec,
    momentum: ScheduleSpec,
    teacher_temp: ScheduleSpec,
    freeze_last_layer_iterations: int = 0,
    global_batch_size: int | None = None,
    scaling_rule: ScalingRule | None = "sqrt_wrt_1024",
) -> Schedules:
    """The v2 schedules of ``build_schedulers_v2`` (``dinov3/train/train.py``).

    The LR ``peak`` and ``end`` are multiplied by :func:`lr_scaling_factor` (``start`` is not, as
    official); no scaling when ``global_batch_size`` is None. The last-layer LR is the scaled LR with the
    first ``freeze_last_layer_iterations`` set to 0 (official ``freeze_last_layer_epochs * epoch_length``).
    """
    factor = 1.0 if global_batch_size is None else lr_scaling_factor(global_batch_size, scaling_rule)
    return Schedules(
        lr=lr.build(total_iterations, factor),
        weight_decay=weight_decay.build(total_iterations),
        momentum=momentum.build(total_iterations),
        teacher_temp=teacher_temp.build(total_iterations),
        last_layer_lr=lr.build(total_iterations, factor, freeze_iterations=freeze_last_layer_iterations),
        meta={
            "total_iterations": total_iterations,
            "global_batch_size": global_batch_size,
            "scaling_rule": scaling_rule,
            "lr_scale": factor,
            "freeze_last_layer_iterations": freeze_last_layer_iterations,
        },
    )


def build_schedules_v1(
    total_iterations: int,
    lr: float = 1e-3,
    min_lr: float = 1e-6,
    warmup_iterations: int = 12_500,
    weight_decay: float = 0.04,
    weight_decay_end: float = 0.4,
    momentum_teacher: float = 0.992,
    final_momentum_teacher: float = 1.0,
    warmup_teacher_temp: float = 0.04,
    teacher_temp: float = 0.07,
    warmup_teacher_temp_iterations: int = 37_500,
    freeze_last_layer_iterations: int = 1250,
    trunc_extra: float = 0.0,
    global_batch_size: int | None = None,
    scaling_rule: ScalingRule | None = "sqrt_wrt_1024",
) -> Schedules:
    """The v1 schedules of ``build_schedulers`` (``dinov3/train/train.py``), defaults from
    ``ssl_default_config.yaml`` with the 1250-iteration epoch (warmup 10 epochs, teacher-temperature warmup
    30 epochs, last layer frozen 1 epoch).

    v1 scales only the base LR (``apply_scaling_rules_to_cfg`` rewrites ``optim.lr``), not ``min_lr``.
    """
    factor = 1.0 if global_batch_size is None else lr_scaling_factor(global_batch_size, scaling_rule)
    lr_kw = {
        "base_value": lr * factor,
        "final_value": min_lr,
        "total_iters": total_iterations,
        "warmup_iters": warmup_iterations,
        "start_warmup_value": 0,
        "trunc_extra": trunc_extra,
    }
    last_layer = CosineScheduler(**lr_kw)
    last_layer.schedule[:freeze_last_layer_iterations] = 0
    return Schedules(
        lr=CosineScheduler(**lr_kw),
        weight_decay=CosineScheduler(
            weight_decay, weight_decay_end, total_iterations, trunc_extra=trunc_extra
        ),
        momentum=CosineScheduler(
            momentum_teacher, final_momentum_teacher, total_iterations, trunc_extra=trunc_extra
        ),
        teacher_temp=CosineScheduler(
            teacher_temp,
            teacher_temp,
            warmup_teacher_temp_iterations,
            warmup_iters=warmup_teacher_temp_iterations,
            start_warmup_value=warmup_teacher_temp,
        ),
        last_layer_lr=_FrozenCosine(last_layer, freeze_last_layer_iterations),
        meta={
            "total_iterations": total_iterations,
            "global_batch_size": global_batch_size,
            "scaling_rule": scaling_rule,
            "lr_scale": factor,
            "freeze_last_layer_iterations": freeze_last_layer_iterations,
        },
    )


def dinov3_7b_pretrain_schedules(
    global_batch_size: int,
    epochs: int = 1000,
    epoch_length: int = 1000,
    scaling_rule: ScalingRule | None = "sqrt_wrt_1024",
) -> Schedules:
    """Schedules of ``configs/train/dinov3_vit7b16_pretrain.yaml``: LR 0 -> 5e-5 over 100 epochs then
    constant (scaled by the batch rule), last layer frozen 5 epochs, weight decay 0.04, momentum 0.994,
    teacher temperature 0.04 -> 0.07 over 100 epochs. ``epochs``/``epoch_length`` shrink it for small runs
    (warmups are kept at 10 % / 0.5 % of training, as in the 1000-epoch config)."""
    total = epochs * epoch_length
    warm = total // 10
    return build_schedules(
        total,
        lr=ScheduleSpec(0.0, 5e-5, 5e-5, warm),
        weight_decay=ScheduleSpec.constant(0.04),
        momentum=ScheduleSpec.constant(0.994),
        teacher_temp=ScheduleSpec(0.04, 0.07, 0.07, warm),
        freeze_last_layer_iterations=total // 200,
        global_batch_size=global_batch_size,
        scaling_rule=scaling_rule,
    )


def high_res_adaptation_schedules(
    global_batch_size: int,
    epochs: int = 30,
    epoch_length: int = 1000,
    scaling_rule: ScalingRule | None = "sqrt_wrt_1024",
) -> Schedules:
    """Schedules of ``configs/train/dinov3_vit7b16_high_res_adapt.yaml``: LR ``start 0, peak 0, end 1.25e-5,
    warmup 0, cosine 10 epochs`` (a rising half-cosine from 0 to 1.25e-5 over the first third of the run,
    then constant; scaled by the batch rule), no last-layer freeze, weight decay 0.04, momentum 0.999,
    teacher temperature 0.07."""
    total = epochs * epoch_length
    return build_schedules(
        total,
        lr=ScheduleSpec(0.0, 0.0, 1.25e-5, 0, total // 3),
        weight_decay=ScheduleSpec.constant(0.04),
        momentum=ScheduleSpec.constant(0.999),
        teacher_temp=ScheduleSpec.constant(0.07),
        freeze_last_layer_iterations=0,
        global_batch_size=global_batch_size,
        scaling_rule=scaling_rule,
    )
