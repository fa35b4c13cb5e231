"""Run a pretraining stage with Lightning: ``pretrain(cfg)``; resumable; exports the backbone at the end.

``pretrain`` builds the Lightning ``Trainer`` from ``cfg.train`` (``accelerator="auto"``, DDP/FSDP strategies
for multi-GPU and multi-node under ``torchrun``/SLURM, bf16 mixed precision on CUDA, fp32 on CPU, the official
recipe's bf16 parameter copies as an option: :mod:`dinov3geo.ssl.precision`), logs to CSV and TensorBoard under
``output_dir``, writes resumable checkpoints atomically every
``train.checkpoint_every`` iterations (``checkpoints/last.ckpt``) and, at the end, exports the EMA teacher's
backbone in Meta's format (``backbone.pth`` + ``backbone.pth.json`` metadata sidecar) and in dinov3geo's own
format (``backbone.dinov3geo.pt``), both loadable with :func:`dinov3geo.models.load_backbone`.

Interrupts: a checkpoint is written to a hidden temporary file beside its final name and renamed into place
(:class:`AtomicCheckpointIO`), so a ``kill -9`` at any moment leaves the previous ``last.ckpt`` complete and a
re-run with ``resume=True`` continues from it, giving the same weights as an uninterrupted run. A Ctrl-C
inside ``trainer.fit`` reaches the caller as ``KeyboardInterrupt`` (Lightning itself would print a message and
call ``sys.exit(1)``); the Python SIGINT handler is restored afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import statistics
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from dinov3geo.ingest.store import TileStore
from dinov3geo.models import BackboneMetadata, export_meta, save_backbone
from dinov3geo.ssl.config import SSLConfig
from dinov3geo.ssl.data import build_dataloader
from dinov3geo.ssl.module import SSLModule
from dinov3geo.ssl.precision import PRECISIONS, lightning_precision, param_dtype
from dinov3geo.utils.atomic import remove_if_writer_dead, remove_quietly, temp_sibling
from dinov3geo.utils.locks import output_lock
from dinov3geo.utils.memory import keep_freed_memory
from dinov3geo.utils.outputs import guard_output, make_output_folder
from dinov3geo.utils.threads import fair_threads

log = logging.getLogger("dinov3geo.ssl")


@dataclass
class PretrainResult:
    """Where a finished stage left its outputs."""

    output_dir: Path
    checkpoint: Path
    backbone_meta: Path
    backbone: Path
    metrics_csv: Path | None
    iterations: int
    is_global_zero: bool = True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpointing, made atomic on the checkpoint's own filesystem.

    Lightning's default writes through an fsspec transaction whose temporary file lies in the system temp folder:
    moved into place by a *copy* when that is another filesystem (a kill during the copy truncates
    ``last.ckpt``), and left behind in ``/tmp`` by a ``kill -9``. Here the checkpoint is written to a hidden
    sibling (``.<name>.tmp-<pid>-<rand>.ckpt``), flushed to disk and renamed over the final name; siblings left by
    killed runs are removed when the next run starts (:func:`_remove_stale_checkpoint_temps`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (remote URLs: Lightning's own way)."""
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"storage_options are not supported by {type(self).__name__}")
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(final)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            remove_quietly(tmp)
            raise
        return None


def _remove_stale_checkpoint_temps(ckpt_dir: Path) -> None:
    """Remove temporary checkpoint files (:class:`AtomicCheckpointIO`) whose writing process no longer exists."""
    try:
        names = list(ckpt_dir.glob(".*.tmp-*.ckpt"))
    except OSError:
        return
    for p in names:
        try:
            pid = int(p.name.split(".tmp-", 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        remove_if_writer_dead(p, pid, log)


class _DropMessages(logging.Filter):
    """Drops log records containing one of ``texts``."""

    def __init__(self, *texts: str) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(t in msg for t in self.texts)


@contextlib.contextmanager
def _interrupt_as_keyboard_interrupt(trainer: pl.Trainer) -> Iterator[None]:
    """Around ``trainer.fit``: a Ctrl-C reaches the caller as ``KeyboardInterrupt``.

    Lightning catches ``KeyboardInterrupt`` itself, logs "Detected KeyboardInterrupt, attempting graceful
    shutdown", sets SIGINT to *ignored* and calls ``sys.exit(1)``: a script would end with status 1, a notebook
    kernel would exit, and a pipeline could not tell an interrupt from an error. Here that ``SystemExit`` becomes
    ``KeyboardInterrupt`` again (the CLI prints its one line and exits with 130), Lightning's message is dropped
    and the SIGINT handler in place before ``fit`` is restored. The checkpoints already written are complete
    (:class:`AtomicCheckpointIO`): a re-run with ``resume=True`` continues from the last one.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    quiet = _DropMessages("Detected KeyboardInterrupt")
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero",
                                                "lightning.fabric.utilities.rank_zero")]
    for lg in loggers:
        lg.addFilter(quiet)
    try:
        yield
    except SystemExit as exc:
        if trainer.interrupted and isinstance(exc.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise
    finally:
        for lg in loggers:
            lg.removeFilter(quiet)
        if main and previous is not None and signal.getsignal(signal.SIGINT) is not previous:
            signal.signal(signal.SIGINT, previous)


class SSLDataModule(pl.LightningDataModule):
    """Builds the (deterministic, infinite) loader at the trainer's current iteration and rank."""

    def __init__(self, cfg: SSLConfig, tiles: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tiles = tiles

    def train_dataloader(self) -> Any:
        tr = self.trainer
        start = int(tr.global_step) if tr is not None else 0
        rank = tr.global_rank if tr is not None else 0
        world = tr.world_size if tr is not None else 1
        loader, _ = build_dataloader(self.cfg, start_iteration=start, rank=rank, world_size=world,
                                     pin_memory=torch.cuda.is_available(), tiles=self.tiles)
        return loader


def _precision(cfg: SSLConfig) -> str:
    """The stage's precision (:mod:`dinov3geo.ssl.precision`), ``auto`` resolved for this machine."""
    p = cfg.train.precision
    if p not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {PRECISIONS}, got {p!r}")
    if p != "auto":
        return p
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def _store_gsd_m(store: TileStore) -> float | None:
    """Median ground sample distance (m) of the store's scenes (degrees converted at the equator)."""
    from dinov3geo.io.grid import GridSpec

    vals = []
    for s in store.scenes:
        g = GridSpec.from_dict(s["grid"])
        r = g.res[0]
        vals.append(r * 111_320.0 if g.crs.is_geographic else r * (g.crs.linear_units_factor[1] or 1.0))
    return float(statistics.median(vals)) if vals else None


def _metadata(cfg: SSLConfig, store: TileStore, bands: list[str], stage: str) -> BackboneMetadata:
    from dinov3geo.data.augmentations import is_rgb

    st = store.stats or {}
    idx = [store.band_names.index(b) for b in bands]
    mean = [st["mean"][i] for i in idx] if st else None
    std = [st["std"][i] for i in idx] if st else None
    units = "raw"
    if is_rgb(bands) and st:
        hi = 255.0 if store.dtype == np.uint8 else max(st["max"][i] for i in idx)
        mean, std = [m / hi for m in mean], [s / hi for s in std]  # type: ignore[union-attr]
        units = f"[0, 1] (raw / {hi:g})"
    gsd = _store_gsd_m(store)
    return BackboneMetadata(
        bands=bands, mean=mean, std=std, gsd=gsd,
        provenance={"trained_with": "dinov3geo", "stage": stage, "arch": cfg.student.arch,
                    "iterations": cfg.optim.iterations, "tile_store": str(store.path),
                    "normalization_units": units, "scenes": len(store.scenes)},
    )


def pretrain(cfg: SSLConfig, *, resume: bool = False, stage: str = "pretrain",
             max_steps: int | None = None, tiles: Any = None) -> PretrainResult:
    """Run one pretraining stage (see module docstring).

    Args:
        cfg: the stage configuration.
        resume: continue from ``output_dir/checkpoints/last.ckpt`` when it exists.
        stage: name recorded in the exported metadata.
        max_steps: stop after this many iterations (for tests / interrupted runs); schedules still use
            ``cfg.optim.iterations``.
        tiles: train on this dataset instead of ``cfg.data.store`` (e.g. a torchgeo GeoDataset wrapped in
            :class:`dinov3geo.data.torchgeo.GeoDatasetTiles`).
    """
    inputs = [x for x in (cfg.data.store if tiles is None else None, cfg.student.pretrained_weights,
                          cfg.student.resume_from_teacher_chkpt, cfg.gram.ckpt, cfg.distillation.teacher_checkpoint)
              if x]
    out = guard_output(cfg.train.output_dir, inputs, folder=True, kind=PRETRAIN_KIND, role="train.output_dir",
                       adopt=("config.json",), replaces=False)
    if os.environ.get("RANK", "0") != "0" or os.environ.get("LOCAL_RANK", "0") != "0":
        return _pretrain(cfg, out, resume=resume, stage=stage, max_steps=max_steps, tiles=tiles)
    with output_lock(out, what="pretrain"):  # rank 0 holds it; the ranks it launches write through it
        make_output_folder(out, inputs, kind=PRETRAIN_KIND, role="train.output_dir", adopt=("config.json",),
                           files=("config.json", "backbone.pth", "backbone.dinov3geo.pt"))
        return _pretrain(cfg, out, resume=resume, stage=stage, max_steps=max_steps, tiles=tiles)


#: the dinov3geo folder kind of a pretraining stage's output_dir
PRETRAIN_KIND = "pretrain"


def _pretrain(cfg: SSLConfig, out: Path, *, resume: bool, stage: str, max_steps: int | None,
              tiles: Any) -> PretrainResult:
    """:func:`pretrain` once the output folder is checked, locked and created."""
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    store = TileStore.open(cfg.data.store) if tiles is None else None
    bands = list(tiles.band_names) if tiles is not None else list(cfg.data.bands or store.band_names)
    devices = cfg.train.devices
    n_dev = devices if isinstance(devices, int) else (torch.cuda.device_count() if devices == "auto" else 1)
    global_batch = cfg.data.batch_size * max(1, n_dev) * cfg.train.num_nodes
    precision = _precision(cfg)
    module = SSLModule(cfg, in_chans=len(bands), band_names=bands, global_batch_size=global_batch)
    module.model.param_dtype = param_dtype(precision)
    ckpt_dir = out / "checkpoints"
    every = max(1, cfg.train.checkpoint_every)
    callbacks: list[Any] = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:07d}", every_n_train_steps=every, save_last=True,
                        save_top_k=1, monitor="step", mode="max", auto_insert_metric_name=False),
    ]
    if cfg.train.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, cfg.train.log_every // 2)))
    run = _next_run(out / "logs")  # one log folder per (re)start; stage_metrics() merges them
    # each logged row is appended to metrics.csv at once (Lightning's default: every 100 steps), so a killed run
    # keeps the rows of the steps it finished; its checkpoints make the next run continue after them
    loggers = [CSVLogger(out, name="logs", version=run, flush_logs_every_n_steps=1),
               TensorBoardLogger(out, name="tb", version=run)]
    steps = cfg.optim.iterations if max_steps is None else min(max_steps, cfg.optim.iterations)
    trainer = pl.Trainer(
        accelerator=cfg.train.accelerator, devices=devices, num_nodes=cfg.train.num_nodes,
        strategy=cfg.train.strategy, precision=lightning_precision(precision), max_steps=steps, max_epochs=-1,
        logger=loggers, callbacks=callbacks, log_every_n_steps=max(1, cfg.train.log_every),
        enable_progress_bar=cfg.train.progress_bar, use_distributed_sampler=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        deterministic=False, default_root_dir=out, plugins=[AtomicCheckpointIO()],
    )
    if trainer.is_global_zero:
        from dinov3geo.utils.atomic import atomic_path

        _remove_stale_checkpoint_temps(ckpt_dir)

        with atomic_path(out / "config.json") as tmp:
            tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
    last = ckpt_dir / "last.ckpt"
    ckpt_path = str(last) if resume and last.exists() else None
    if resume and ckpt_path is None:
        log.warning("no checkpoint at %s; starting from scratch", last)
    with warnings.catch_warnings(), keep_freed_memory(cfg.train.keep_freed_memory), \
            _interrupt_as_keyboard_interrupt(trainer), fair_threads():
        warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
        trainer.fit(module, datamodule=SSLDataModule(cfg, tiles), ckpt_path=ckpt_path, weights_only=True)
    # the final state, atomically (also when max_steps stopped early); optimizer state included
    trainer.save_checkpoint(last, weights_only=False)
    csv = out / "logs" / run / "metrics.csv"
    if not trainer.is_global_zero:  # rank 0 exports; the other ranks are done
        return PretrainResult(out, last, out / "backbone.pth", out / "backbone.dinov3geo.pt", None,
                              int(trainer.global_step), is_global_zero=False)
    teacher = module.model.model_ema["backbone"]  # EMA teacher; the student's EMA when distilling
    backbone = teacher.float().cpu().eval()
    meta = _metadata(cfg, store, bands, stage) if store is not None else BackboneMetadata(
        bands=bands, mean=_floats(getattr(tiles, "mean", None)), std=_floats(getattr(tiles, "std", None)),
        provenance={"trained_with": "dinov3geo", "stage": stage, "arch": cfg.student.arch,
                    "iterations": cfg.optim.iterations, "dataset": type(tiles).__name__,
                    "normalization_units": "raw"})
    backbone.metadata = meta
    meta_path = export_meta(backbone, out / "backbone.pth", metadata=meta)
    own_path = save_backbone(backbone, out / "backbone.dinov3geo.pt", metadata=meta)
    return PretrainResult(out, last, Path(meta_path), Path(own_path), csv if csv.exists() else None,
                          int(trainer.global_step))


def _floats(v: Any) -> list[float] | None:
    return None if v is None else [float(x) for x in v]


def _next_run(logs: Path) -> str:
    n = 0
    while (logs / f"run{n}").exists():
        n += 1
    return f"run{n}"


def stage_metrics(output_dir: str | Path) -> list[dict[str, float]]:
    """All logged steps of a stage across its (re)starts, one row per step (the latest run wins)."""
    by_step: dict[int, dict[str, float]] = {}
    runs = sorted((Path(output_dir) / "logs").glob("run*/metrics.csv"), key=lambda p: int(p.parent.name[3:]))
    for csv_path in runs:
        for row in read_metrics(csv_path):
            if "step" in row:
                by_step.setdefault(int(row["step"]), {}).update(row)
    return [by_step[k] for k in sorted(by_step)]


def read_metrics(csv_path: Path) -> list[dict[str, float]]:
    """Rows of a stage's ``metrics.csv`` (one per logged step), empty cells dropped."""
    import csv

    rows = []
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            row = {k: float(v) for k, v in r.items() if v not in ("", None) and _isnum(v)}
            if row:
                rows.append(row)
    return rows


def _isnum(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def run_stages(config: str | Path | dict[str, Any], stages: list[str] | None = None,
               overrides: list[str] | None = None, tiles: Any = None) -> dict[str, PretrainResult]:
    """Run the stages of a staged config in order (pretrain -> gram -> highres -> distill).

    Each stage writes to ``<common train.output_dir>/<stage>`` unless it sets its own ``train.output_dir``.
    Unless the stage config says otherwise, a stage starts from the previous one: ``gram`` and ``highres``
    initialise the student (backbone and heads) from the previous stage's EMA teacher, ``highres`` takes
    it as its fixed Gram teacher, and ``distill`` uses it as the frozen teacher. A stage whose checkpoint
    already reached its iteration count is not rerun; an interrupted one is resumed.
    """
    import yaml

    from dinov3geo.ssl.checkpoints import read_stage_checkpoint
    from dinov3geo.ssl.config import STAGES, ConfigError, load_config

    raw = config if isinstance(config, dict) else (yaml.safe_load(Path(config).read_text()) or {})
    present = [s for s in STAGES if s in raw]
    todo = stages or present
    for s in todo:
        if s not in present:
            raise ConfigError(f"stage {s!r} is not in the config (it has {present})")
    base = Path(load_config(raw, overrides=overrides, section=present[0]).train.output_dir)
    results: dict[str, PretrainResult] = {}
    prev: Path | None = None
    for stage in present:
        stage_raw = raw.get(stage) or {}
        extra = list(overrides or [])
        if "output_dir" not in (stage_raw.get("train") or {}):
            extra.append(f"train.output_dir={base / stage}")
        cfg = load_config(raw, overrides=extra, section=stage)
        if prev is not None:
            if stage in ("gram", "highres") and not cfg.student.resume_from_teacher_chkpt:
                cfg.student.resume_from_teacher_chkpt = str(prev)
            if stage == "highres" and cfg.gram.use_loss and not cfg.gram.ckpt and not cfg.gram.ema_teacher:
                cfg.gram.ckpt = str(prev)
            if stage == "distill" and cfg.distillation.enabled and not cfg.distillation.teacher_checkpoint:
                cfg.distillation.teacher_checkpoint = str(prev)
        last = Path(cfg.train.output_dir) / "checkpoints" / "last.ckpt"
        if stage in todo:
            done = last.exists() and read_stage_checkpoint(last)["global_step"] >= cfg.optim.iterations
            if done:
                log.info("stage %s already complete (%s); skipping", stage, last)
            else:
                results[stage] = pretrain(cfg, resume=last.exists(), stage=stage, tiles=tiles)
        prev = last
    return results
