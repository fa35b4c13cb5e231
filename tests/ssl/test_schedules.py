"""Tests of the training schedules against hand-computed values and the official formulas."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinov3geo.ssl.schedules import (
    CosineScheduler,
    Schedules,
    ScheduleSpec,
    WarmupCosineSchedule,
    build_schedules,
    build_schedules_v1,
    dinov3_7b_pretrain_schedules,
    high_res_adaptation_schedules,
    linear_warmup_cosine_decay,
    lr_scaling_factor,
    scale_lr,
)


def _official_v2(start, peak, end, warmup_iterations, total_iterations, cosine_iterations=None):
    """Verbatim copy of upstream ``dinov3/train/cosine_lr_scheduler.py::linear_warmup_cosine_decay``."""
    linear = np.linspace(start, peak, warmup_iterations, endpoint=False)
    if cosine_iterations is None:
        cosine_iterations = total_iterations - warmup_iterations
    cosine = np.cos(np.linspace(0, np.pi, cosine_iterations))
    cosine = (cosine + 1) / 2
    cosine = (peak - end) * cosine + end
    remaining_iterations = total_iterations - cosine_iterations - warmup_iterations
    assert remaining_iterations >= 0
    constant = np.full((remaining_iterations,), fill_value=end)
    return np.concatenate([linear, cosine, constant])


def test_v2_hand_values() -> None:
    # warmup 10 (0 -> 1, endpoint excluded), cosine 21 (1 -> 0.1), then 9 constant iterations
    a = linear_warmup_cosine_decay(0.0, 1.0, 0.1, 10, 40, cosine_iterations=21)
    assert len(a) == 40
    assert a[0] == 0.0 and a[5] == pytest.approx(0.5) and a[9] == pytest.approx(0.9)
    assert a[10] == pytest.approx(1.0)  # peak first reached at the first cosine iteration
    assert a[20] == pytest.approx(0.55)  # mid-cosine: (peak + end) / 2
    assert a[10 + 7] == pytest.approx(0.1 + 0.9 * (math.cos(7 * math.pi / 20) + 1) / 2)
    assert a[30] == pytest.approx(0.1)  # last cosine iteration is exactly end
    assert np.all(a[31:] == 0.1)
    s = WarmupCosineSchedule(0.0, 1.0, 0.1, 10, 40, cosine_iterations=21)
    assert [s[i] for i in (0, 5, 10, 20, 30, 39, 40, 10_000)] == pytest.approx(
        [0.0, 0.5, 1.0, 0.55, 0.1, 0.1, 0.1, 0.1]
    )
    with pytest.raises(ValueError):
        linear_warmup_cosine_decay(0, 1, 0, 10, 20, cosine_iterations=11)
    with pytest.raises(ValueError):
        WarmupCosineSchedule(0, 1, 0, 10, 20, cosine_iterations=11)


def test_constant_lr_after_warmup() -> None:
    s = WarmupCosineSchedule(0.0, 5e-5, 5e-5, 100, 1000)
    assert s[0] == 0.0 and s[50] == pytest.approx(2.5e-5) and s[99] == pytest.approx(5e-5 * 99 / 100)
    assert all(s[i] == pytest.approx(5e-5, rel=1e-12) for i in (100, 500, 999, 5000))


@settings(max_examples=60, deadline=None)
@given(
    start=st.floats(0, 1),
    peak=st.floats(0, 1),
    end=st.floats(0, 1),
    warmup=st.integers(0, 50),
    cosine=st.one_of(st.none(), st.integers(1, 60)),
    extra=st.integers(0, 30),
)
def test_closed_form_matches_official_array(start, peak, end, warmup, cosine, extra) -> None:
    total = warmup + (cosine if cosine is not None else 1) + extra
    ref = _official_v2(start, peak, end, warmup, total, cosine)
    s = WarmupCosineSchedule(start, peak, end, warmup, total, cosine)
    np.testing.assert_allclose([s[i] for i in range(total)], ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(s.array(), ref)
    np.testing.assert_array_equal(linear_warmup_cosine_decay(start, peak, end, warmup, total, cosine), ref)


def test_v1_cosine_scheduler_hand_values() -> None:
    s = CosineScheduler(
        base_value=1.0, final_value=0.0, total_iters=10, warmup_iters=4, start_warmup_value=0.2
    )
    # warmup includes the endpoint (v1), then cos over the 6 remaining iterations
    np.testing.assert_allclose(s.schedule[:4], [0.2, 0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0])
    np.testing.assert_allclose(s.schedule[4:], [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)])
    assert s[10] == 0.0 and s[100] == 0.0
    f = CosineScheduler(1.0, 0.5, 10, warmup_iters=2, freeze_iters=3)
    assert f.schedule[:3].tolist() == [0.0, 0.0, 0.0] and f[3] == 0.0 and f[4] == 1.0
    t = CosineScheduler(1.0, 0.0, 20, trunc_extra=0.25)
    assert t[0] == pytest.approx(1.0) and t[19] == pytest.approx(0.0) and t[10] > 0
    with pytest.raises(ValueError):
        CosineScheduler(1.0, 0.0, 5, warmup_iters=6)


def test_teacher_temperature_warmups() -> None:
    v1 = CosineScheduler(0.07, 0.07, 30, warmup_iters=30, start_warmup_value=0.04)  # v1 default, 30 iters
    assert v1[0] == pytest.approx(0.04) and v1[29] == pytest.approx(0.07) and v1[1000] == pytest.approx(0.07)
    v2 = WarmupCosineSchedule(0.04, 0.07, 0.07, 100, 1000)  # 7B: linear over 100, endpoint excluded
    assert v2[0] == pytest.approx(0.04) and v2[50] == pytest.approx(0.055)
    assert v2[99] < 0.07 and v2[100] == pytest.approx(0.07) and v2[999] == pytest.approx(0.07)


def test_lr_scaling_rules() -> None:
    assert lr_scaling_factor(4096, "sqrt_wrt_1024") == pytest.approx(8.0)
    assert lr_scaling_factor(1024, "sqrt_wrt_1024") == pytest.approx(4.0)
    assert lr_scaling_factor(512, "linear_wrt_256") == pytest.approx(2.0)
    assert lr_scaling_factor(512, None) == 1.0 and lr_scaling_factor(512, "none") == 1.0
    assert scale_lr(5e-5, 4096) == pytest.approx(4e-4)
    with pytest.raises(ValueError):
        lr_scaling_factor(512, "cubic")  # type: ignore[arg-type]


def test_7b_preset() -> None:
    s = dinov3_7b_pretrain_schedules(global_batch_size=4096, epochs=10, epoch_length=100)  # 1000 iterations
    assert s[0].lr == 0.0 and s[50].lr == pytest.approx(2e-4)
    assert s[100].lr == pytest.approx(4e-4) and s[999].lr == pytest.approx(4e-4)  # constant after warmup
    assert s[4].last_layer_lr == 0.0 and s[5].last_layer_lr == pytest.approx(s[5].lr) and s[5].lr > 0
    assert s[0].weight_decay == s[999].weight_decay == pytest.approx(0.04)
    assert s[0].momentum == s[999].momentum == pytest.approx(0.994)
    assert s[0].teacher_temp == pytest.approx(0.04) and s[100].teacher_temp == pytest.approx(0.07)


def test_high_res_preset_rising_cosine() -> None:
    s = high_res_adaptation_schedules(global_batch_size=1024, epochs=3, epoch_length=100)
    lrs = [s[i].lr for i in range(300)]
    peak = 1.25e-5 * 4
    assert (
        lrs[0] == 0.0
        and lrs[99] == pytest.approx(peak)
        and lrs[50] == pytest.approx(peak * (1 - math.cos(math.pi * 50 / 99)) / 2)
    )
    assert all(b >= a for a, b in zip(lrs, lrs[1:], strict=False)) and lrs[299] == pytest.approx(peak)
    assert s[0].teacher_temp == 0.07 and s[0].momentum == 0.999 and s[0].last_layer_lr == 0.0


def test_ema_momentum_cosine_to_one_and_weight_decay() -> None:
    s = build_schedules(
        100,
        lr=ScheduleSpec(0.0, 1e-3, 1e-6, 10),
        weight_decay=ScheduleSpec(0.04, 0.04, 0.4, 0),
        momentum=ScheduleSpec(0.994, 0.994, 1.0, 0),
        teacher_temp=ScheduleSpec.constant(0.07),
        freeze_last_layer_iterations=3,
    )
    assert s[0].momentum == pytest.approx(0.994) and s[99].momentum == pytest.approx(1.0)
    assert s[0].weight_decay == pytest.approx(0.04) and s[99].weight_decay == pytest.approx(0.4)
    assert [s[i].last_layer_lr for i in range(3)] == [0.0, 0.0, 0.0] and s[3].last_layer_lr == s[3].lr > 0
    assert s.meta["lr_scale"] == 1.0


def test_schedules_serialise_and_resume() -> None:
    for s in (
        dinov3_7b_pretrain_schedules(2048, epochs=5, epoch_length=40),
        build_schedules_v1(300, warmup_iterations=20, warmup_teacher_temp_iterations=50,
                           freeze_last_layer_iterations=7, global_batch_size=512),
    ):  # fmt: skip
        d = json.loads(json.dumps(s.to_dict()))
        r = Schedules.from_dict(d)
        for it in (0, 6, 7, 19, 20, 100, 199, 299, 5000):
            assert r[it] == s[it]
    v1 = build_schedules_v1(300, warmup_iterations=20, freeze_last_layer_iterations=7, global_batch_size=4096)
    assert v1[6].last_layer_lr == 0.0 and v1[7].last_layer_lr == v1[7].lr
    assert v1[19].lr == pytest.approx(8e-3) and v1[299].lr > 1e-6 and v1[300].lr == pytest.approx(1e-6)
