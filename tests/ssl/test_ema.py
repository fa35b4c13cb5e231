"""The EMA teacher of a real Lightning training step: ``teacher = m * teacher_before + (1 - m) * student_after``.

Two steps of :class:`~dinov3geo.ssl.module.SSLModule` run in a Lightning ``Trainer`` on real tiles (the NEON
image ingested into a small tile store). A callback snapshots the student and the teacher before and after each
step, so the test checks the update that ``training_step`` really made, parameter by parameter (backbone and
both heads), with the momentum the schedule gives for *that* iteration. The momentum schedule is not constant
(0.6 at iteration 0, 0.9 at iteration 1) and not 0.5, so using the wrong iteration's value, ``1 - m`` instead of
``m``, the student before the step instead of after it, or forgetting a head would all fail. The teacher starts
perturbed away from the student, so "teacher before" and "student before" are told apart too.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from dinov3geo.ingest import ingest
from dinov3geo.ssl.config import load_config
from dinov3geo.ssl.module import SSLModule
from dinov3geo.ssl.train import SSLDataModule

HEADS = {"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, shared_data: Any) -> Any:
    out = tmp_path_factory.mktemp("ema") / "neon.zarr"
    ingest([shared_data / "aerial_rgb_chm/neon_bart_2019/2019_BART_5_320000_4881000_image_crop.tif"], out,
           tile_size=64, progress=False)
    return out


def _snap(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in module.named_parameters()}


class _Snapshots(pl.Callback):
    """Student and teacher parameters before and after every training step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        m = pl_module.model  # type: ignore[attr-defined]
        self.steps.append({"it": int(trainer.global_step), "s0": _snap(m.student), "t0": _snap(m.teacher)})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        m = pl_module.model  # type: ignore[attr-defined]
        self.steps[-1].update(s1=_snap(m.student), t1=_snap(m.teacher))


def test_teacher_is_the_ema_of_the_student_after_each_step(store, tmp_path):
    cfg = load_config({
        "data": {"store": str(store), "batch_size": 2, "num_workers": 0},
        "student": {"arch": "vit_tiny_test"},
        "crops": {"global_crops_size": 48, "local_crops_size": 32, "local_crops_number": 2},
        "dino": dict(HEADS), "ibot": dict(HEADS),
        "optim": {"iterations": 2, "scaling_rule": "none", "clip_grad": 0.0},
        "schedules": {"lr": {"start": 1e-3, "peak": 1e-3, "end": 1e-3},
                      "momentum": {"start": 0.6, "peak": 0.9, "end": 0.9, "warmup_iterations": 1}},
        "train": {"output_dir": str(tmp_path / "run"), "seed": 3, "progress_bar": False},
    })
    torch.manual_seed(0)
    module = SSLModule(cfg, in_chans=3, band_names=["red", "green", "blue"], global_batch_size=2)
    assert [module.schedules[i].momentum for i in (0, 1)] == pytest.approx([0.6, 0.9])
    with torch.no_grad():  # a teacher that differs from the student (as after any step)
        for p in module.model.teacher.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    snaps = _Snapshots()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, max_epochs=-1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[snaps])
    trainer.fit(module, datamodule=SSLDataModule(cfg))
    assert [s["it"] for s in snaps.steps] == [0, 1]

    for step in snaps.steps:
        m = module.schedules[step["it"]].momentum
        s0, s1, t0, t1 = step["s0"], step["s1"], step["t0"], step["t1"]
        assert set(t1) == set(s1) and any(k.startswith("dino_head.") for k in t1) \
            and any(k.startswith("ibot_head.") for k in t1) and len(t1) > 30
        # the student moved (every parameter that receives a gradient; the mask token only when masked)
        moved = [k for k in s1 if not torch.equal(s0[k], s1[k])]
        assert len(moved) >= len(s1) - 2, sorted(set(s1) - set(moved))
        worst = 0.0
        for k in t1:
            ref = m * t0[k].double() + (1 - m) * s1[k].double()
            err = (t1[k].double() - ref).abs().max().item()
            scale = max(t0[k].abs().max().item(), s1[k].abs().max().item())
            worst = max(worst, err / scale)
            # float32 lerp: a few ulps of the operands
            assert err <= 4e-7 * scale + 1e-12, (step["it"], k, err, scale)
            if k in moved:  # the update is visible: far from the teacher before and from the student after
                gap = (s1[k].double() - t0[k].double()).abs().max().item()
                assert gap > 1e3 * (err + 1e-12 * scale), (k, gap, err)
        assert worst < 4e-7
