"""The stage registry: pipeline ``type`` names -> thin wrappers of the Python API.

A stage kind is a function with keyword parameters (the keys a pipeline YAML gives the stage) that calls
one API function and returns a small JSON-able ``dict`` (output paths, counts, metrics) recorded in the
pipeline manifest and shown in the report. It declares which parameters hold *input* paths (their size and
mtime, or content for small files, enter the up-to-date check) and which *output* paths it writes (a stage is
skipped only when they all exist), plus the *folders* it writes files into without replacing them as a whole
(a training run, an evaluation folder). The runner refuses, before anything runs, a pipeline whose outputs or
folders would overwrite, contain or lie inside an input, each other, the outputs folder or the pipeline file
(:func:`dinov3geo.pipelines.runner.check_pipeline`). A function may also take ``ctx`` (a :class:`StageContext`)
to see the pipeline's outputs folder and the results of the stages before it.

A rebuild (``ctx.rebuild``: changed parameters or inputs, ``--force``, or a rebuild that was interrupted)
never deletes what dinov3geo did not create: folders are removed with
:func:`dinov3geo.utils.outputs.remove_owned` (refused, naming the folder, for a folder that is not ours), and
files are replaced atomically by the stage rather than deleted beforehand.

Third parties add kinds with :func:`register_stage`::

    from dinov3geo.pipelines import register_stage

    @register_stage("ndvi", inputs=("image",), outputs=("out",))
    def ndvi_stage(image: str, out: str, red: int = 3, nir: int = 4) -> dict:
        ...
        return {"out": out}

Built-in kinds: ``ingest`` (:func:`dinov3geo.ingest.ingest`), ``pretrain`` (one stage or all stages of a
pretraining config, :mod:`dinov3geo.ssl.train`), ``features`` (:func:`dinov3geo.tasks.features.extract_features`)
and ``report`` (:func:`dinov3geo.report.build.build_report`, see :mod:`dinov3geo.report.build` for its
section kinds); the task kinds ``canopy_train``, ``canopy_predict``, ``canopy_evaluate``, ``forest_mask``,
``change_detect``, ``landcover_train``, ``landcover_predict``, ``landcover_evaluate``, ``landcover_transitions``,
``landcover_sample`` and ``landcover_areas`` are in :mod:`dinov3geo.pipelines.task_stages`.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("dinov3geo.pipelines")

PathsFn = Callable[[Mapping[str, Any]], list[str]]


class PipelineError(ValueError):
    """A pipeline file or a stage's parameters are invalid (the message names the file, stage and key)."""


@dataclass
class StageContext:
    """What a running stage may know about its pipeline."""

    pipeline: str  #: pipeline name
    stage: str  #: this stage's name
    outputs_dir: Path  #: the pipeline's outputs folder
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  #: earlier stages' results, by name
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)  #: earlier stages: status, seconds, type
    #: start afresh: the stage ran before with other parameters/inputs, --force, or an interrupted rebuild
    rebuild: bool = False


@dataclass(frozen=True)
class StageKind:
    """A registered stage type."""

    type: str
    func: Callable[..., dict[str, Any] | None]
    inputs: tuple[str, ...] | PathsFn = ()  #: parameter names holding input paths, or params -> paths
    outputs: tuple[str, ...] | PathsFn = ()  #: parameter names holding output paths, or params -> paths
    validate: Callable[[Mapping[str, Any]], None] | None = None  #: extra checks of the parameters (raise)
    description: str = ""
    #: parameter names holding folders the stage writes files into (not replaced as a whole), or params -> paths
    folders: tuple[str, ...] | PathsFn = ()

    @property
    def parameters(self) -> dict[str, inspect.Parameter]:
        """The keyword parameters a pipeline may give (``ctx`` excluded)."""
        sig = inspect.signature(self.func)
        return {n: p for n, p in sig.parameters.items()
                if n != "ctx" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    @property
    def takes_ctx(self) -> bool:
        return "ctx" in inspect.signature(self.func).parameters

    @property
    def required(self) -> list[str]:
        return [n for n, p in self.parameters.items() if p.default is inspect.Parameter.empty]

    def input_paths(self, params: Mapping[str, Any]) -> list[str]:
        return _paths(self.inputs, params)

    def output_paths(self, params: Mapping[str, Any]) -> list[str]:
        return _paths(self.outputs, params)

    def folder_paths(self, params: Mapping[str, Any]) -> list[str]:
        """The folders the stage writes files into (see :attr:`folders`)."""
        return _paths(self.folders, params)


def _paths(spec: tuple[str, ...] | PathsFn, params: Mapping[str, Any]) -> list[str]:
    if callable(spec):
        return [str(p) for p in spec(params)]
    out: list[str] = []
    for name in spec:
        v = params.get(name)
        if v is None:
            continue
        out.extend(str(x) for x in (v if isinstance(v, list | tuple) else [v]))
    return out


_REGISTRY: dict[str, StageKind] = {}


def register_stage(
    type_name: str,
    func: Callable[..., dict[str, Any] | None] | None = None,
    *,
    inputs: tuple[str, ...] | PathsFn = (),
    outputs: tuple[str, ...] | PathsFn = (),
    validate: Callable[[Mapping[str, Any]], None] | None = None,
    description: str | None = None,
    replace: bool = False,
    folders: tuple[str, ...] | PathsFn = (),
) -> Any:
    """Register ``func`` as the stage kind ``type_name`` (usable as a decorator).

    Args:
        type_name: the ``type:`` a pipeline stage gives.
        func: a function with keyword parameters (optionally ``ctx``) returning a JSON-able dict or None.
        inputs, outputs: names of the parameters holding input/output paths (a str or a list of str), or a
            function of the parameters returning the paths. An output is replaced as a whole (a file, a Zarr
            store).
        folders: like ``outputs``, the folders the stage writes files into without replacing them (a training
            run, an evaluation folder); inputs may lie inside them.
        validate: called with the resolved parameters before anything runs; raise ``ValueError`` naming
            the bad key.
        description: one line for ``dinov3geo run --list-stages`` (default: the docstring's first line).
        replace: allow replacing an existing kind of that name.
    """

    def deco(f: Callable[..., dict[str, Any] | None]) -> Callable[..., dict[str, Any] | None]:
        if type_name in _REGISTRY and not replace:
            raise ValueError(f"stage type {type_name!r} is already registered (pass replace=True)")
        desc = description if description is not None else (inspect.getdoc(f) or "").split("\n")[0]
        _REGISTRY[type_name] = StageKind(type_name, f, inputs=inputs, outputs=outputs, folders=folders,
                                         validate=validate, description=desc)
        return f

    return deco(func) if func is not None else deco


def get_stage(type_name: str) -> StageKind:
    """The registered kind ``type_name``; :class:`PipelineError` listing the known kinds otherwise."""
    _load_builtins()
    if type_name not in _REGISTRY:
        raise PipelineError(f"unknown stage type {type_name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[type_name]


def list_stages() -> dict[str, StageKind]:
    """All registered stage kinds by type name."""
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


# ------------------------------------------------------------------------------------------ built-in kinds
def ingest_stage(
    sources: list[str] | str,
    out: str,
    tile_size: int = 256,
    bands: list[str] | None = None,
    res: float | None = None,
    crs: str | None = None,
    assume_crs: str | None = None,
    nodata: float | None = None,
    min_valid: float = 0.5,
    resampling: str = "bilinear",
    scheduler: str | None = None,
    workers: int | None = None,
    ctx: StageContext | None = None,
) -> dict[str, Any]:
    """Chip scenes into a Zarr tile store (dinov3geo.ingest.ingest); a rebuild starts a fresh store.

    A rebuild deletes the old store only if it is a dinov3geo tile store; any other folder at ``out`` is
    refused (:class:`~dinov3geo.utils.outputs.OutputConflictError` naming it) and left untouched.
    """
    from dinov3geo.ingest import ingest
    from dinov3geo.utils.locks import output_lock
    from dinov3geo.utils.outputs import remove_owned

    srcs = [sources] if isinstance(sources, str) else list(sources)
    # the store's lock covers the removal too (re-entrant: ingest takes it again), so a rebuild never deletes
    # a store that another run is writing
    with output_lock(out, what="ingest"):
        if ctx is not None and ctx.rebuild and Path(out).is_dir():
            log.info("removing the out-of-date tile store %s", out)
            remove_owned(out, kinds=["tile-store"])
        rep = ingest(srcs, out, tile_size=tile_size, bands=bands, res=res, crs=crs, assume_crs=assume_crs,
                     nodata=nodata, min_valid=min_valid, resampling=resampling, scheduler=scheduler,
                     workers=workers, progress=False)
    if not (rep.ingested or rep.already):
        why = "; ".join(f"{s}: {w}" for s, w in rep.skipped) or "no scene found"
        raise RuntimeError(f"no scene could be ingested into {out} ({why})")
    return {"store": str(out), "scenes_ingested": len(rep.ingested), "scenes_already": len(rep.already),
            "scenes_skipped": [f"{s}: {w}" for s, w in rep.skipped], "tiles_written": rep.tiles_written,
            "summary": {"tiles in store": _store_tiles(out)}}


def _store_tiles(path: str) -> int | None:
    try:
        from dinov3geo.ingest import TileStore

        return int(TileStore.open(path).n_tiles)
    except Exception:  # noqa: BLE001 - a count for the summary only
        return None


def _overrides(set_: Mapping[str, Any] | Sequence[str] | None, **extra: Any) -> list[str]:
    """``{"optim.iterations": 20}`` or ``["optim.iterations=20"]`` (+ non-None extras) -> ``key=value`` list."""
    out: list[str] = []
    if isinstance(set_, Mapping):
        out += [f"{k}={json.dumps(v)}" for k, v in set_.items()]
    elif set_:
        out += [str(s) for s in set_]
    out += [f"{k}={json.dumps(v)}" for k, v in extra.items() if v is not None]
    return out


def _pretrain_plan(params: Mapping[str, Any]) -> tuple[list[str | None], list[Path], list[str]]:
    """(stage sections to run, their output dirs, overrides) of a pretrain stage's parameters."""
    import yaml

    from dinov3geo.ssl.config import STAGES, ConfigError, load_config

    path = Path(str(params["config"]))
    if not path.is_file():
        raise PipelineError(f"pretraining config {str(path)!r} not found (parameter 'config')")
    raw = yaml.safe_load(path.read_text()) or {}
    ov = _overrides(params.get("set"), **{"data.store": params.get("store"),
                                          "train.output_dir": params.get("output_dir")})
    present = [s for s in STAGES if s in raw]
    stage = params.get("stage")
    if not present:
        if stage not in (None, "all", "pretrain"):
            raise PipelineError(f"{path} has no stage sections; parameter 'stage' must be null, got {stage!r}")
        try:
            cfg = load_config(path, overrides=ov)
        except ConfigError as e:
            raise PipelineError(f"{path}: {e}") from e
        return [None], [Path(cfg.train.output_dir)], ov
    if stage not in (None, "all") and stage not in present:
        raise PipelineError(f"parameter 'stage': {stage!r} is not in {path} (stages: {present}, or 'all')")
    try:
        if stage == "all":
            base = Path(load_config(path, overrides=ov, section=present[0]).train.output_dir)
            dirs = []
            for s in present:
                own = "output_dir" in ((raw.get(s) or {}).get("train") or {})
                cfg = load_config(path, overrides=ov if own else [*ov, f"train.output_dir={base / s}"], section=s)
                dirs.append(Path(cfg.train.output_dir))
            return list(present), dirs, ov
        s = stage or present[0]
        return [s], [Path(load_config(path, overrides=ov, section=s).train.output_dir)], ov
    except ConfigError as e:
        raise PipelineError(f"{path}: {e}") from e


def _pretrain_outputs(params: Mapping[str, Any]) -> list[str]:
    _, dirs, _ = _pretrain_plan(params)
    return [str(d / "backbone.pth") for d in dirs]


def _pretrain_inputs(params: Mapping[str, Any]) -> list[str]:
    from dinov3geo.ssl.config import load_config

    paths = [str(params["config"])]
    if params.get("store"):
        paths.append(str(params["store"]))
    else:
        secs, _, ov = _pretrain_plan(params)
        cfg = load_config(str(params["config"]), overrides=ov, section=secs[0])
        paths.append(cfg.data.store)
    return paths


#: the file that identifies an unmarked folder as a pretraining run (of a version before folders were marked):
#: pretraining writes it first thing
_PRETRAIN_RUN_FILE = "config.json"


def _is_run(d: Path) -> bool:
    """``d`` is a pretraining run folder of ours: marked, or holding a run's ``config.json`` (older runs)."""
    from dinov3geo.utils.outputs import folder_kind

    return d.is_dir() and (folder_kind(d) is not None or (d / _PRETRAIN_RUN_FILE).is_file())


def _move_runs_aside(dirs: Sequence[Path], inputs: Sequence[str]) -> None:
    """Rebuild of a pretrain stage: move each existing run folder to ``<dir>.previous`` (replacing an older
    ``.previous``).

    Every folder is checked first: one (run or ``.previous``) that is not a pretraining run of ours, or that
    holds an input of the stage (``inputs``: its tile store, its config), is refused, naming it, before anything
    is moved or deleted.
    """
    from dinov3geo.ssl.train import PRETRAIN_KIND
    from dinov3geo.utils.outputs import OutputConflictError, folder_kind, mark_folder, remove_owned

    moves = []
    for d in dirs:
        if not d.exists():
            continue
        old = d.with_name(d.name + ".previous")
        for f in (d, old):
            if not f.exists() or (f.is_dir() and not any(f.iterdir())):
                continue
            if not _is_run(f):
                raise OutputConflictError(f, "it is not a pretraining run folder that dinov3geo created; refusing "
                                          "to move or delete it for the rebuild",
                                          "Move it away yourself, or give the stage another 'output_dir'.")
            real = Path(os.path.realpath(f))
            for i in inputs:
                ri = Path(os.path.realpath(i))
                if ri == real or real in ri.parents:
                    raise OutputConflictError(f, f"it holds the stage's input {i!r}; refusing to move or delete it "
                                              "for the rebuild", "Keep the inputs outside the pretraining 'output_dir'.")
        moves.append((d, old))
    for d, old in moves:
        for f in (d, old):
            if f.is_dir() and folder_kind(f) is None:  # a run of an older version: ours, mark it so
                mark_folder(f, PRETRAIN_KIND, adopted=True)
        remove_owned(old)
        d.rename(old)
        log.info("moved the out-of-date pretraining run %s to %s", d, old)


def pretrain_stage(
    config: str,
    stage: str | None = None,
    store: str | None = None,
    output_dir: str | None = None,
    set: dict[str, Any] | list[str] | None = None,  # noqa: A002 - the YAML key
    max_steps: int | None = None,
    ctx: StageContext | None = None,
) -> dict[str, Any]:
    """DINOv3 pretraining from a YAML config: one stage, or ``stage: all`` (pretrain -> gram -> highres ...).

    ``store`` and ``output_dir`` override ``data.store`` / ``train.output_dir``; ``set`` overrides any key
    (``{optim.iterations: 20}``). An interrupted run resumes from its checkpoint; a rebuild (changed
    parameters or inputs, or ``--force``) moves the old run aside to ``<output_dir>.previous`` first (never a
    folder that is not a pretraining run of ours: that is refused, naming it, before anything is moved).
    """
    from dinov3geo.ssl.config import load_config
    from dinov3geo.ssl.train import pretrain, run_stages, stage_metrics

    params = {"config": config, "stage": stage, "store": store, "output_dir": output_dir, "set": set}
    sections, dirs, ov = _pretrain_plan(params)
    if ctx is not None and ctx.rebuild:
        _move_runs_aside(dirs, _pretrain_inputs(params))
    if len(sections) > 1:
        if max_steps is not None:
            raise PipelineError("parameter 'max_steps' only applies to a single pretraining stage")
        run_stages(config, overrides=ov)
    else:
        cfg = load_config(config, overrides=ov, section=sections[0])
        cfg.train.progress_bar = False
        pretrain(cfg, resume=True, stage=sections[0] or "pretrain", max_steps=max_steps)
    runs = []
    for s, d in zip(sections, dirs, strict=True):
        rows = stage_metrics(d)
        last = rows[-1] if rows else {}
        runs.append({"stage": s or "pretrain", "output_dir": str(d), "iterations": int(last.get("step", -1)) + 1,
                     "final_total_loss": last.get("total_loss")})
    final = dirs[-1]
    return {"runs": runs, "output_dirs": [str(d) for d in dirs], "backbone": str(final / "backbone.pth"),
            "backbone_dinov3geo": str(final / "backbone.dinov3geo.pt"),
            "summary": {"pretraining iterations": sum(max(r["iterations"], 0) for r in runs),
                        "final pretraining loss": runs[-1]["final_total_loss"]}}


def _features_outputs(params: Mapping[str, Any]) -> list[str]:
    out = Path(str(params["out"]))
    paths = [str(out)]
    if params.get("pca", True):
        stem = out.with_suffix("")
        paths += [f"{stem}_pca.png", f"{stem}_pca.tif"]
    return paths


def features_stage(
    image: str,
    out: str,
    weights: str | None = None,
    arch: str = "vits16",
    layers: list[int] | None = None,
    bands: list[str] | None = None,
    window: int = 512,
    overlap: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    amp: str | None = "auto",
    pca: bool = True,
    value_scale: float | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> dict[str, Any]:
    """Dense backbone features of a raster -> Zarr, plus PCA PNG/COG (dinov3geo.tasks.features)."""
    from dinov3geo.tasks.features import extract_features

    res = extract_features(image, out, weights=weights, arch=arch, layers=layers or [-1], bands=bands,
                           window=window, overlap=overlap, batch_size=batch_size, device=device, amp=amp,
                           pca=pca, progress=False, value_scale=value_scale, mean=mean, std=std,
                           sidecars=False)  # the runner describes the stage's products
    return {"zarr": str(res.zarr), "pca_png": str(res.pca_png) if res.pca_png else None,
            "pca_tif": str(res.pca_tif) if res.pca_tif else None, "n_features": res.n_features,
            "feature_grid": [res.grid.height, res.grid.width]}


def _report_inputs(params: Mapping[str, Any]) -> list[str]:
    from dinov3geo.report.build import spec_paths

    return spec_paths(params.get("sections") or [])


def _report_validate(params: Mapping[str, Any]) -> None:
    from dinov3geo.report.build import validate_specs

    validate_specs(params.get("sections") or [])


def report_stage(
    out: str,
    sections: list[dict[str, Any]],
    title: str = "dinov3geo report",
    subtitle: str | None = None,
    summary: dict[str, Any] | None = None,
    stage_summaries: bool = True,
    pipeline_table: bool = True,
    ctx: StageContext | None = None,
) -> dict[str, Any]:
    """Self-contained HTML report (dinov3geo.report.build): maps, tables, loss curves, links to outputs.

    ``sections`` is a list of section specs (see :func:`dinov3geo.report.build.section_from_spec`);
    ``summary`` key numbers for the summary box, to which the ``summary`` entries of the earlier stages'
    results are added (``stage_summaries``); ``pipeline_table`` adds a table of the pipeline's stages.
    """
    from dinov3geo.report.build import Section, Table, build_report, section_from_spec

    box: dict[str, Any] = dict(summary or {})
    if ctx is not None and stage_summaries:
        for res in ctx.results.values():
            for k, v in (res.get("summary") or {}).items():
                box.setdefault(k, v)
    secs = [section_from_spec(s) for s in sections]
    meta: dict[str, Any] = {}
    if ctx is not None:
        meta["pipeline"] = ctx.pipeline
        if pipeline_table and ctx.statuses:
            rows = [{"stage": n, "type": s.get("type"), "status": s.get("status"),
                     "seconds": None if s.get("seconds") is None else round(float(s["seconds"]), 1)}
                    for n, s in ctx.statuses.items()]
            secs.append(Section("Pipeline stages", tables=[Table(rows, "Stages of this run (skipped = up to "
                                                                     "date, outputs reused)")]))
    path = build_report(secs, out, title=title, subtitle=subtitle, summary=box, metadata=meta)
    return {"html": str(path), "sections": len(secs)}


_BUILTINS_LOADED = False


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    register_stage("ingest", ingest_stage, inputs=("sources",), outputs=("out",), replace=True)
    register_stage("pretrain", pretrain_stage, inputs=_pretrain_inputs, outputs=_pretrain_outputs,
                   folders=lambda p: [str(d) for d in _pretrain_plan(p)[1]],
                   validate=lambda p: _pretrain_plan(p) and None, replace=True)
    register_stage("features", features_stage, inputs=("image", "weights"), outputs=_features_outputs,
                   replace=True)
    register_stage("report", report_stage, inputs=_report_inputs, outputs=("out",), validate=_report_validate,
                   replace=True)
    from dinov3geo.pipelines.task_stages import register_task_stages

    register_task_stages()
