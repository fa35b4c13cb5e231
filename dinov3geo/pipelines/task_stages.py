"""Pipeline stage kinds of the downstream tasks: canopy height, change / deforestation detection, land cover.

Registered by :func:`dinov3geo.pipelines.stages._load_builtins` (``dinov3geo run --list-stages`` prints each
kind with its parameters):

* ``canopy_train``: :func:`dinov3geo.tasks.canopy.train.train_canopy` from a config file or inline mapping
  (+ ``set`` overrides) -> ``<out>/model.pt``, ``history.json`` and, with a ``test`` split,
  ``eval_<pair>/{chm_pred.tif, metrics.json, pred_vs_true.png, error_by_bin.png}``;
* ``canopy_predict``: :func:`dinov3geo.tasks.canopy.predict.predict_canopy` with a dinov3geo canopy model or
  Meta's CHMv2 files -> height + height_std COG (+ per-AOI summary GeoPackage/CSV);
* ``canopy_evaluate``: :func:`dinov3geo.tasks.canopy.evaluate.evaluate_rasters` -> ``metrics.json`` + plots;
* ``forest_mask``: :func:`dinov3geo.tasks.change.deforestation.ndvi_forest_mask` (``NDVI >= threshold``) ->
  uint8 forest-mask COG for deforestation without a canopy model;
* ``change_detect``: :func:`dinov3geo.tasks.change.detect.detect_change` (classic / zeroshot / head) ->
  change and forest-loss COGs, polygons, ``summary.json``;
* ``landcover_train``: :func:`dinov3geo.tasks.landcover.train.train_landcover` (config file or inline mapping
  + ``set``) -> ``<out>/model.pt``, ``map.tif``, ``eval_test/``, ``baseline_test/`` and ``test_scores.csv``
  (head and random-forest baseline side by side);
* ``landcover_predict``: :func:`dinov3geo.tasks.landcover.predict.predict_landcover` -> coloured class COG;
* ``landcover_evaluate``: :func:`dinov3geo.tasks.landcover.evaluate.evaluate_map` -> metrics + confusion;
* ``landcover_transitions``: :func:`dinov3geo.tasks.landcover.transitions.transitions` -> transition raster,
  hectare matrices, polygons;
* ``landcover_sample``: :func:`dinov3geo.tasks.landcover.sampling.stratified_sample` -> points to label;
* ``landcover_areas``: :func:`dinov3geo.tasks.landcover.accuracy.area_report` -> error-adjusted areas with
  confidence intervals (Olofsson et al. 2014).

Each returns a small JSON-able dict with a ``summary`` of key numbers (prefixed with the stage name, so that
two stages of one kind stay apart in the report's summary box). They call the task functions with
``sidecars=False``: the runner gives each stage's products their STAC Items (with the pipeline and stage) and
QGIS styles itself, so nothing is written twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dinov3geo.pipelines.stages import PipelineError, StageContext, _overrides

log = logging.getLogger("dinov3geo.pipelines")

__all__ = [
    "canopy_evaluate_stage",
    "canopy_predict_stage",
    "canopy_train_stage",
    "change_detect_stage",
    "forest_mask_stage",
    "landcover_areas_stage",
    "landcover_evaluate_stage",
    "landcover_predict_stage",
    "landcover_sample_stage",
    "landcover_train_stage",
    "landcover_transitions_stage",
    "raster_stats",
    "register_task_stages",
]


def _r(x: Any, nd: int = 3) -> Any:
    """Round a finite float for a summary (None for missing/NaN)."""
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return x
    return round(f, nd) if math.isfinite(f) else None


def _label(ctx: StageContext | None, label: str | None, default: str) -> str:
    return label or (ctx.stage if ctx is not None else default)


# ------------------------------------------------------------------------------------------ canopy_train
def _canopy_cfg(params: Mapping[str, Any]) -> Any:
    """The :class:`CanopyTrainConfig` of a canopy_train stage's parameters (PipelineError naming the key)."""
    from dinov3geo.tasks.canopy.train import load_canopy_config
    from dinov3geo.utils.config import ConfigError

    config = params["config"]
    if isinstance(config, str) and not Path(config).is_file():
        raise PipelineError(f"canopy config {config!r} not found (parameter 'config')")
    if not isinstance(config, str | Mapping):
        raise PipelineError(f"parameter 'config' must be a YAML path or a mapping, got {type(config).__name__}")
    ov = _overrides(params.get("set"), **{"out": params.get("out"), "model.backbone": params.get("backbone")})
    try:
        return load_canopy_config(config if isinstance(config, str) else dict(config), ov)
    except ConfigError as e:
        raise PipelineError(f"canopy config: {e}") from e


def _canopy_train_inputs(params: Mapping[str, Any]) -> list[str]:
    cfg = _canopy_cfg(params)
    paths = [str(params["config"])] if isinstance(params["config"], str) else []
    for p in cfg.data.pairs:
        paths += [str(p["image"]), str(p["chm"])]
    if not str(cfg.model.backbone).startswith("random:"):
        paths.append(str(cfg.model.backbone))
    return paths


def _canopy_train_outputs(params: Mapping[str, Any]) -> list[str]:
    from dinov3geo.tasks.canopy.train import _pair_name

    cfg = _canopy_cfg(params)
    out = Path(cfg.out)
    paths = [str(out / "model.pt"), str(out / "history.json")]
    if "test" in cfg.split.fractions:
        paths += [str(out / f"eval_{_pair_name(p)}" / "metrics.json") for p in cfg.data.pairs]
    return paths


def canopy_train_stage(
    config: str | dict[str, Any],
    set: dict[str, Any] | list[str] | None = None,  # noqa: A002 - the YAML key
    out: str | None = None,
    backbone: str | None = None,
    label: str | None = None,
    ctx: StageContext | None = None,
) -> dict[str, Any]:
    """Train a canopy-height head on frozen backbone features (dinov3geo.tasks.canopy.train.train_canopy).

    ``config`` is a canopy config file or an inline mapping (sections data/split/model/train, see
    ``dinov3geo canopy train``); ``set`` overrides keys (``{train.epochs: 5}``), ``out`` the output folder and
    ``backbone`` ``model.backbone``. A rebuild (changed parameters or inputs, e.g. a re-pretrained backbone)
    starts afresh instead of resuming ``last.pt`` (nothing is deleted beforehand: ``model.pt`` is replaced
    when the new run writes it). Returns the model path and the test-block metrics.
    """
    from dinov3geo.tasks.canopy.train import train_canopy

    params = {"config": config, "set": set, "out": out, "backbone": backbone}
    cfg = _canopy_cfg(params)
    if ctx is not None and ctx.rebuild:
        cfg.resume = False
    res = train_canopy(cfg, progress=False)
    lab = _label(ctx, label, "canopy")
    test = {name: {k: m.get(k) for k in ("n", "mae", "rmse", "r2", "bias", "block_r2")}
            for name, m in res.test.items()}
    summary: dict[str, Any] = {f"{lab}: best epoch": res.best_epoch}
    for name, m in test.items():
        tag = f"{lab} test ({name})" if len(test) > 1 else f"{lab} test"
        summary |= {f"{tag} MAE (m)": _r(m["mae"], 2), f"{tag} RMSE (m)": _r(m["rmse"], 2),
                    f"{tag} R²": _r(m["r2"], 3)}
    return {"model": str(res.model_path), "out_dir": str(res.out_dir), "best_epoch": res.best_epoch,
            "best_val": res.best_val and {k: res.best_val.get(k) for k in ("mae", "rmse", "r2", "bias")},
            "epochs": len(res.history), "test": test,
            "eval_dirs": {name: str(res.out_dir / f"eval_{name}") for name in res.test}, "summary": summary}


# ---------------------------------------------------------------------------------------- canopy_predict
def raster_stats(path: str | os.PathLike[str], band: int = 1, cover_threshold: float | None = None,
                 window: int = 1024) -> dict[str, Any]:
    """Mean / min / max of the valid pixels of ``band`` (window by window), their count and, with
    ``cover_threshold``, the share of valid pixels ``>= cover_threshold``."""
    import rasterio
    from rasterio.windows import Window

    n = 0
    total = 0.0
    lo, hi = math.inf, -math.inf
    cover = 0
    with rasterio.open(path) as ds:
        for r0 in range(0, ds.height, window):
            for c0 in range(0, ds.width, window):
                win = Window(c0, r0, min(window, ds.width - c0), min(window, ds.height - r0))
                a = np.ma.filled(ds.read(band, window=win, masked=True).astype(np.float64), np.nan)
                v = a[np.isfinite(a)]
                if not v.size:
                    continue
                n += int(v.size)
                total += float(v.sum())
                lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
                if cover_threshold is not None:
                    cover += int((v >= cover_threshold).sum())
    out: dict[str, Any] = {"n_valid": n, "mean": total / n if n else None, "min": lo if n else None,
                           "max": hi if n else None}
    if cover_threshold is not None:
        out["cover_share"] = cover / n if n else None
    return out


def _canopy_predict_validate(params: Mapping[str, Any]) -> None:
    has_model = params.get("model") is not None
    n_chm = sum(params.get(k) is not None for k in ("chmv2_backbone", "chmv2_head"))
    if has_model and n_chm:
        raise PipelineError("give either 'model' (a dinov3geo canopy model) or 'chmv2_backbone' + 'chmv2_head' "
                            "(Meta's CHMv2 files), not both")
    if not has_model and n_chm != 2:
        raise PipelineError("no canopy model: give 'model' (a dinov3geo canopy model, e.g. from a canopy_train "
                            "stage) or both 'chmv2_backbone' (dinov3_vitl16_pretrain_sat493m-*.pth) and "
                            "'chmv2_head' (Meta's CHMv2 DPT head file)")
    if params.get("summary") is not None and params.get("aoi") is None:
        raise PipelineError("parameter 'summary' (per-AOI summary) needs 'aoi'")


def _summary_paths(params: Mapping[str, Any]) -> list[str]:
    if params.get("aoi") is None:
        return []
    s = Path(str(params.get("summary") or Path(str(params["out"])).with_name(
        Path(str(params["out"])).stem + "_aoi_summary.gpkg")))
    return [str(s.with_suffix(".gpkg")), str(s.with_suffix(".csv"))]


def canopy_predict_stage(
    image: str | list[str],
    out: str,
    model: str | None = None,
    chmv2_backbone: str | None = None,
    chmv2_head: str | None = None,
    aoi: str | None = None,
    summary: str | None = None,
    bands: list[str] | None = None,
    window: int = 512,
    overlap: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    amp: str | None = "auto",
    resample_to_model_gsd: bool = True,
    cover_threshold: float = 5.0,
    label: str | None = None,
    ctx: StageContext | None = None,
) -> dict[str, Any]:
    """Map canopy height of an image (or a mosaic list) -> COG with bands height, height_std (metres).

    Uses a dinov3geo canopy model (``model``) or Meta's CHMv2 (``chmv2_backbone`` = the SAT-493M ViT-L
    backbone file, ``chmv2_head`` = the CHMv2 head file). With ``aoi`` (a vector file) only pixels inside are
    mapped and a per-polygon summary (mean/p95 height, cover share, area) is written to ``summary`` (default
    ``<out stem>_aoi_summary.gpkg`` + ``.csv``). Returns scene-wide height statistics. A rebuild maps afresh
    instead of resuming an interrupted map; the old files are replaced atomically, never deleted beforehand.
    """
    from dinov3geo.tasks.canopy.predict import predict_canopy

    params = {"model": model, "chmv2_backbone": chmv2_backbone, "chmv2_head": chmv2_head, "aoi": aoi,
              "summary": summary, "out": out}
    _canopy_predict_validate(params)
    spaths = _summary_paths(params)
    path = predict_canopy(model, image, out, aoi=aoi, summary=spaths[0] if spaths else None,
                          chmv2_backbone=chmv2_backbone, chmv2_head=chmv2_head, bands=bands, window=window,
                          overlap=overlap, batch_size=batch_size, device=device, amp=amp,
                          resample_to_model_gsd=resample_to_model_gsd, progress=False,
                          resume=not (ctx is not None and ctx.rebuild), sidecars=False)  # the runner's Items
    h = raster_stats(path, 1, cover_threshold)
    s = raster_stats(path, 2)
    lab = _label(ctx, label, "canopy map")
    res: dict[str, Any] = {"cog": str(path), "height": h, "height_std": s, "cover_threshold_m": cover_threshold,
                           "summary": {f"{lab}: mean height (m)": _r(h["mean"], 2),
                                       f"{lab}: canopy cover >= {cover_threshold:g} m": _r(h.get("cover_share"), 3),
                                       f"{lab}: mean uncertainty (m)": _r(s["mean"], 2)}}
    if spaths:
        import pandas as pd

        res["aoi_summary"] = {"gpkg": spaths[0], "csv": spaths[1]}
        res["per_aoi"] = json.loads(pd.read_csv(spaths[1]).to_json(orient="records"))
    return res


# --------------------------------------------------------------------------------------- canopy_evaluate
def canopy_evaluate_stage(
    pred: str,
    truth: str,
    out_dir: str,
    aoi: str | None = None,
    split_mask: str | None = None,
    band: int = 1,
    truth_band: int = 1,
    window: int = 256,
    negative: str = "clip",
    truth_crs: str | None = None,
    title: str | None = None,
    label: str | None = None,
    ctx: StageContext | None = None,
) -> dict[str, Any]:
    """Canopy-height raster vs a reference CHM (dinov3geo.tasks.canopy.evaluate) -> metrics.json + plots.

    Writes metrics.json, pred_vs_true.png and error_by_bin.png in ``out_dir``.

    ``aoi`` (vector file) and ``split_mask`` (raster, non-zero = evaluate) restrict the pixels;
    ``negative``: clip / invalid / keep negative reference heights; ``truth_crs`` for a CRS-less reference.
    """
    from dinov3geo.tasks.canopy.evaluate import evaluate_rasters

    if negative not in ("clip", "invalid", "keep"):
        raise PipelineError(f"parameter 'negative' must be clip, invalid or keep, got {negative!r}")
    m = evaluate_rasters(pred, truth, out_dir, aoi=aoi, split_mask=split_mask, band=band, truth_band=truth_band,
                         window=window, negative=negative, truth_crs=truth_crs, title=title,  # type: ignore[arg-type]
                         progress=False)
    lab = _label(ctx, label, "canopy evaluation")
    keep = {k: m.get(k) for k in ("n", "mae", "rmse", "r2", "bias", "block_r2")}
    return {"metrics": str(Path(out_dir) / "metrics.json"), **keep,
            "summary": {f"{lab}: MAE (m)": _r(keep["mae"], 2), f"{lab}: RMSE (m)": _r(keep["rmse"], 2),
                        f"{lab}: R²": _r(keep["r2"], 3), f"{lab}: pixels": keep["n"]}}


def _evaluate_outputs(params: Mapping[str, Any]) -> list[str]:
    d = Path(str(params["out_dir"]))
    return [str(d / "metrics.json"), str(d / "pred_vs_true.png"), str(d / "error_by_bin.png")]


# ------------------------------------------------------------------------------------------- forest_mask
def forest_mask_stage(
    image: str,
    out: str,
    threshold: float = 0.6,
    red: str | int = "red",
    nir: str | int = "nir",
    band_names: list[str] | None = None,
    nodata: float | None = None,
    assume_crs: str | None = None,
    label: str | None = None,
    ctx: StageContext | None = None,
) -> dict[str, Any]:
    """Date-1 forest mask from NDVI >= threshold (red/NIR bands) -> uint8 COG (1 forest, 0 not, 255 nodata).

    For deforestation on Landsat/Sentinel-2 imagery without a canopy model
    (dinov3geo.tasks.change.deforestation.ndvi_forest_mask).
    """
    from dinov3geo.tasks.change.deforestation import ndvi_forest_mask
    from dinov3geo.tasks.change.polygons import pixel_area_ha

    r = ndvi_forest_mask(image, out, threshold=threshold, red=red, nir=nir, band_names=band_names, nodata=nodata,
                         assume_crs=assume_crs)
    forest_ha = float((r.forest.sum(axis=1, dtype=np.float64) * pixel_area_ha(r.grid)[:, 0]).sum())
    lab = _label(ctx, label, "forest")
    return {"mask": str(r.path), "threshold": r.threshold, "forest_fraction": r.forest_fraction,
            "forest_ha": forest_ha, "valid_fraction": float(r.valid.mean()),
            "summary": {f"{lab}: forest at date 1 (ha, NDVI >= {r.threshold:g})": _r(forest_ha, 1),
                        f"{lab}: forest share of valid pixels": _r(r.forest_fraction, 3)}}


# ----------------------------------------------------------------------------------------- change_detect
def _change_outputs(params: Mapping[str, Any]) -> list[str]:
    d = Path(str(params["out_dir"]))
    names = ["change_prob.tif", "change.tif", "summary.json", str(params.get("polygons_name") or
                                                                   "loss_polygons.gpkg")]
    if any(params.get(k) is not None for k in ("forest_mask", "canopy_before")):
        names.append("forest_loss.tif")
    if params.get("aoi") is not None:
        names.append("aoi_summary.csv")
    return [str(d / n) for n in names]


def _change_validate(params: Mapping[str, Any]) -> None:
    from dinov3geo.tasks.change.detect import METHODS

    method = params.get("method", "classic")
    if method not in METHODS:
        raise PipelineError(f"parameter 'method': {method!r} is not one of {list(METHODS)}")
    if method == "zeroshot" and params.get("backbone") is None:
        raise PipelineError("method zeroshot needs 'backbone' (Meta's SAT-493M .pth, or a dinov3geo-pretrained "
                            "backbone.pth)")
    if method == "head" and params.get("model") is None:
        raise PipelineError("method head needs 'model' (a change model from `dinov3geo change train`)")
    if params.get("classic_method", "cva") not in ("cva", "ndvi"):
        raise PipelineError(f"parameter 'classic_method' must be cva or ndvi, got {params.get('classic_method')!r}")
    dates = params.get("dates")
    if dates is not None and len(dates) != 2:
        raise PipelineError(f"parameter 'dates' must hold two dates [before, after], got {dates!r}")


def change_detect_stage(
    image_before: str | list[str],
    image_after: str | list[str],
    out_dir: str,
    method: str = "classic",
    classic_method: str = "cva",
    ndvi_direction: str = "decrease",
    backbone: str | None = None,
    model: str | None = None,
    layers: list[int] | int | None = None,
    threshold: float | None = None,
    forest_mask: str | None = None,
    canopy_before: str | None = None,
    canopy_after: str | None = None,
    min_height: float = 5.0,
    drop_threshold: float = 5.0,
    loss_evidence: str = "auto",
    combine: str = "and",
    aoi: str | None = None,
    mmu_ha: float = 0.1,
    connectivity: int = 8,
    dates: list[str] | None = None,
    bands: list[str] | None = None,
    band_names: list[str] | None = None,
    nodata: float | None = None,
    assume_crs: str | None = None,
    scl_before: str | None = None,
    scl_after: str | None = None,
    cloud_test: bool = False,
    value_scale: float | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    polygons_name: str = "loss_polygons.gpkg",
    window: int = 512,
    batch_size: int | None = None,
    device: str = "auto",
    label: str | None = None,
    ctx: StageContext | None = None,
) -> dict[str, Any]:
    """Change and forest loss between two dates (dinov3geo.tasks.change.detect) -> COGs, polygons, summary.

    Writes change_prob.tif, change.tif, forest_loss.tif, polygons (GeoPackage) with hectares, summary.json.

    ``image_before`` / ``image_after``: the two dates (``after`` is the pipeline's dependency key).
    ``method``: classic (CVA or NDVI differencing, ``classic_method``), zeroshot (feature distance of
    ``backbone``: Meta's SAT-493M file or a dinov3geo-pretrained backbone.pth) or head (a trained change
    ``model``). Forest at date 1 comes from ``forest_mask`` (e.g. a forest_mask stage) and/or
    ``canopy_before`` (+ ``canopy_after`` for the height-drop rule); ``mmu_ha`` is the minimum mapping unit.
    ``batch_size`` null (default): method head chooses it from the model's memory estimate and the memory
    available, classic and zeroshot use 4 (``benchmarks/head_memory.py``).
    """
    from dinov3geo.tasks.change.detect import detect_change

    _change_validate({"method": method, "backbone": backbone, "model": model, "classic_method": classic_method,
                      "dates": dates})
    res = detect_change(
        image_before, image_after, out_dir, method=method, classic_method=classic_method, ndvi_direction=ndvi_direction,
        aoi=aoi, threshold=threshold, canopy_before=canopy_before, canopy_after=canopy_after,
        forest_mask=forest_mask, min_height=min_height, drop_threshold=drop_threshold,
        loss_evidence=loss_evidence, combine=combine, mmu_ha=mmu_ha, connectivity=connectivity,
        dates=tuple(dates) if dates else None, bands=bands, band_names=band_names, nodata=nodata,
        assume_crs=assume_crs, scl_before=scl_before, scl_after=scl_after, cloud_test=cloud_test, model=model,
        backbone=backbone, value_scale=value_scale, mean=mean, std=std, layers=layers,
        polygons_name=polygons_name, window=window, batch_size=batch_size, device=device, progress=False,
        sidecars=False,  # the runner writes the stage's Items (pipeline, stage) itself
    )
    lab = _label(ctx, label, "change")
    what = "forest loss" if res.loss_ha is not None else "change"
    summary = {f"{lab}: change (ha)": _r(res.change_ha, 1)}
    if res.loss_ha is not None:
        summary[f"{lab}: forest loss (ha)"] = _r(res.loss_ha, 1)
    summary[f"{lab}: {what} polygons >= {mmu_ha:g} ha"] = res.n_polygons
    s = res.summary
    return {"paths": {k: str(v) for k, v in res.paths.items()}, "method": method,
            "threshold": _r(res.threshold, 6), "score_threshold": _r(res.score_threshold, 6),  # inf: no change
            "threshold_source": res.threshold_source, "change_ha": res.change_ha, "loss_ha": res.loss_ha,
            "polygons_ha": res.polygons_ha, "n_polygons": res.n_polygons,
            "date_before": s.get("date_before"), "date_after": s.get("date_after"),
            "forest_ha": (s.get("forest_loss") or {}).get("forest_ha"), "summary": summary}


# ----------------------------------------------------------------------------------------- landcover_train
#: the side-by-side test scores of a landcover_train stage (head and random-forest baseline), in its run folder
LANDCOVER_SCORES = "test_scores.csv"


def _landcover_cfg(params: Mapping[str, Any]) -> Any:
    """The :class:`LandcoverTrainConfig` of a landcover_train stage's parameters (PipelineError naming the key)."""
    from dinov3geo.tasks.landcover.train import load_landcover_config
    from dinov3geo.utils.config import ConfigError

    config = params["config"]
    if isinstance(config, str) and not Path(config).is_file():
        raise PipelineError(f"land-cover config {config!r} not found (parameter 'config')")
    if not isinstance(config, str | Mapping):
        raise PipelineError(f"parameter 'config' must be a YAML path or a mapping, got {type(config).__name__}")
    ov = _overrides(params.get("set"), **{"out": params.get("out"), "model.backbone": params.get("backbone")})
    try:
        return load_landcover_config(config if isinstance(config, str) else dict(config), ov)
    except ConfigError as e:
        raise PipelineError(f"land-cover config: {e}") from e


def _landcover_train_inputs(params: Mapping[str, Any]) -> list[str]:
    cfg = _landcover_cfg(params)
    paths = [str(params["config"])] if isinstance(params["config"], str) else []
    paths += [str(cfg.data.image), str(cfg.data.labels)]
    if not str(cfg.model.backbone).startswith("random:"):
        paths.append(str(cfg.model.backbone))
    return paths


def _landcover_train_outputs(params: Mapping[str, Any]) -> list[str]:
    cfg = _landcover_cfg(params)
    out = Path(cfg.out)
    names = ["model.pt", "history.json", "split.json", "summary.json"]
    if "test" in cfg.split.fractions:
        names += ["map.tif", "eval_test/metrics.json", LANDCOVER_SCORES]
        if cfg.baseline.enabled:
            names.append("baseline_test/metrics.json")
    return [str(out / n) for n in names]


def _score_row(model: str, m: Mapping[str, Any] | None) -> dict[str, Any]:
    """One row of the side-by-side scores table (None values for a missing evaluation)."""
    m = m or {}
    row: dict[str, Any] = {"model": model, "split": m.get("split"), "pixels": m.get("n"),
                           "macro-F1": _r(m.get("macro_f1"), 4), "overall accuracy": _r(m.get("overall_accuracy"), 4),
                           "kappa": _r(m.get("kappa"), 4)}
    for name, pc in (m.get("per_class") or {}).items():
        row[f"F1 {name}"] = _r(pc.get("f1"), 4)
    return row


def _write_scores(path: Path, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    from dinov3geo.utils.atomic import atomic_path

    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


def landcover_train_stage(
    config: str | dict[str, Any],
    set: dict[str, Any] | list[str] | None = None,  # noqa: A002 - the YAML key
    out: str | None = None,
    backbone: str | None = None,
    label: str | None = None,
    ctx: StageContext | None = None,
) -> dict[str, Any]:
    """Train a land-cover head on frozen backbone features (dinov3geo.tasks.landcover.train.train_landcover).

    ``config`` is a land-cover config file or an inline mapping (sections data/split/model/train/baseline, see
    ``dinov3geo landcover train``); ``set`` overrides keys (``{train.epochs: 5}``), ``out`` the output folder
    and ``backbone`` ``model.backbone`` (a backbone with other bands than the image, e.g. an RGB one on a
    4-band composite, is widened to the image's bands as ``landcover train`` does). A rebuild starts afresh
    instead of resuming ``last.pt``. With a ``test`` split, ``<out>/test_scores.csv`` holds the head's and the
    random-forest baseline's test scores side by side (one row each, for a report ``table`` item). Returns the
    model path and both test scores.
    """
    from dinov3geo.tasks.landcover.train import train_landcover

    params = {"config": config, "set": set, "out": out, "backbone": backbone}
    cfg = _landcover_cfg(params)
    if ctx is not None and ctx.rebuild:
        cfg.resume = False
    res = train_landcover(cfg, progress=False)
    lab = _label(ctx, label, "land cover")
    head = f"{cfg.model.head} head on frozen features"
    summary: dict[str, Any] = {f"{lab}: best epoch": res.best_epoch}
    for tag, m in ((head, res.test), ("random forest (bands + indices)", res.baseline)):
        if m:
            split = m.get("split", "test")
            summary |= {f"{lab}: {tag}, {split} macro-F1": _r(m.get("macro_f1"), 3),
                        f"{lab}: {tag}, {split} OA": _r(m.get("overall_accuracy"), 3),
                        f"{lab}: {tag}, {split} kappa": _r(m.get("kappa"), 3)}
    scores = None
    if res.test is not None:
        scores = res.out_dir / LANDCOVER_SCORES
        rows = [_score_row(head, res.test)]
        if res.baseline is not None:
            rows.append(_score_row("random forest (bands + indices)", res.baseline))
        _write_scores(scores, rows)

    def keep(m: Mapping[str, Any] | None) -> dict[str, Any] | None:
        return m and {k: m.get(k) for k in ("split", "n", "macro_f1", "overall_accuracy", "kappa", "miou")}

    return {"model": str(res.model_path), "out_dir": str(res.out_dir), "best_epoch": res.best_epoch,
            "best_val": keep(res.best_val), "epochs": len(res.history), "test": keep(res.test),
            "baseline": keep(res.baseline), "scores": str(scores) if scores else None,
            "map": str(res.out_dir / "map.tif") if res.test is not None else None, "summary": summary}


# --------------------------------------------------------------------------------------- landcover_predict
def _class_areas(path: str | os.PathLike[str]) -> dict[str, float]:
    """Mapped hectares of each class of a class map, by class name (classes of its table, in table order)."""
    from dinov3geo.tasks.landcover.accuracy import count_map, map_class_table

    mc = count_map(path)
    table, _ = map_class_table(path, present=mc.present)
    return {c.name: float(mc.area_ha[c.code]) for c in table}


def _class_map_outputs(out: str) -> list[str]:
    o = Path(out)
    return [str(o), f"{o}.aux.xml", str(o.with_suffix(".qml"))]


def landcover_predict_stage(
    image: str | list[str],
    model: str,
    out: str,
    aoi: str | None = None,
    confidence: bool = False,
    probabilities: str | None = None,
    bands: list[str | int] | None = None,
    assume_crs: str | None = None,
    window: int = 512,
    overlap: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    amp: str | None = "auto",
    resample_to_model_gsd: bool = True,
    label: str | None = None,
    ctx: StageContext | None = None,
) -> dict[str, Any]:
    """Map land cover with a land-cover model (dinov3geo.tasks.landcover.predict.predict_landcover).

    Writes a coloured class COG (uint8 codes, 255 = no data; colour table, category names in ``.aux.xml``,
    QGIS style ``.qml``); ``confidence`` adds band 2 (maximum class probability, percent); ``aoi`` (vector file)
    maps only inside; ``probabilities`` also keeps the class probabilities. Returns the mapped hectares of
    each class. A rebuild maps afresh; the old files are replaced atomically, never deleted beforehand.
    ``batch_size`` null (default): chosen from the model's memory estimate and the memory available
    (``benchmarks/head_memory.py``).
    """
    from dinov3geo.tasks.landcover.predict import predict_landcover

    path = predict_landcover(model, image, out, aoi=aoi, confidence=confidence, probabilities=probabilities,
                             bands=bands, assume_crs=assume_crs, window=window, overlap=overlap,
                             batch_size=batch_size, device=device, amp=amp,
                             resample_to_model_gsd=resample_to_model_gsd, progress=False,
                             resume=not (ctx is not None and ctx.rebuild), sidecars=False)  # the runner's Items
    areas = _class_areas(path)
    total = sum(areas.values())
    lab = _label(ctx, label, "land-cover map")
    summary = {f"{lab}: {name} (ha)": _r(ha, 1) for name, ha in areas.items() if ha > 0}
    res: dict[str, Any] = {"map": str(path), "area_ha": areas, "mapped_ha": total, "summary": summary}
    if probabilities is not None:
        res["probabilities"] = str(probabilities)
    return res


# -------------------------------------------------------------------------------------- landcover_evaluate
def landcover_evaluate_stage(
    map: str,  # noqa: A002 - the YAML key
    labels: str,
    out_dir: str,
    column: str | None = None,
    ignore: list[int] | int | None = None,
    layer: str | int | None = None,
    aoi: str | None = None,
    window: int = 2048,
    title: str | None = None,
    label: str | None = None,
    ctx: StageContext | None = None,
) -> dict[str, Any]:
    """Score a class map on reference labels (dinov3geo.tasks.landcover.evaluate.evaluate_map).

    Writes metrics.json, confusion.csv and confusion.png into ``out_dir``. ``labels``: polygons or a class
    raster (any CRS); ``column`` their class column; ``aoi`` restricts the scored pixels.
    """
    from dinov3geo.tasks.landcover.evaluate import evaluate_map

    m = evaluate_map(map, labels, out_dir, column=column, ignore=ignore, layer=layer, aoi=aoi, window=window,
                     title=title, progress=False)
    lab = _label(ctx, label, "land-cover evaluation")
    keep = {k: m.get(k) for k in ("n", "overall_accuracy", "kappa", "macro_f1", "miou", "n_map_missing")}
    return {"metrics": str(Path(out_dir) / "metrics.json"), **keep,
            "summary": {f"{lab}: macro-F1": _r(keep["macro_f1"], 3), f"{lab}: OA": _r(keep["overall_accuracy"], 3),
                        f"{lab}: kappa": _r(keep["kappa"], 3), f"{lab}: pixels": keep["n"]}}


def _landcover_evaluate_outputs(params: Mapping[str, Any]) -> list[str]:
    from dinov3geo.tasks.landcover.evaluate import EVAL_FILES

    return [str(Path(str(params["out_dir"])) / n) for n in EVAL_FILES]


# ----------------------------------------------------------------------------------- landcover_transitions
def _transitions_validate(params: Mapping[str, Any]) -> None:
    dates = params.get("dates")
    if dates is not None and (not isinstance(dates, list | tuple) or len(dates) != 2):
        raise PipelineError(f"parameter 'dates' must hold two dates [date1, date2], got {dates!r}")
    if params.get("connectivity", 8) not in (4, 8):
        raise PipelineError(f"parameter 'connectivity' must be 4 or 8, got {params.get('connectivity')!r}")
    mmu = params.get("mmu_ha", 0.0)
    if not isinstance(mmu, int | float) or isinstance(mmu, bool) or mmu < 0:
        raise PipelineError(f"parameter 'mmu_ha' must be a number >= 0 (hectares), got {mmu!r}")


def _transitions_outputs(params: Mapping[str, Any]) -> list[str]:
    d = Path(str(params["out_dir"]))
    names = ["transitions.tif", "transition_matrix.csv", "summary.json"]
    if params.get("change") is not None:
        names += ["transitions_gated.tif", "transition_matrix_gated.csv"]
    if params.get("polygons", True):
        names.append("transition_polygons.gpkg")
    return [str(d / n) for n in names]


def _top_transitions(matrix: np.ndarray, names: list[str], n: int) -> list[tuple[str, float]]:
    """The ``n`` largest off-diagonal entries of a from-to hectare matrix as ``("a -> b", ha)``."""
    off = [(f"{names[i]} -> {names[j]}", float(matrix[i, j])) for i in range(len(names))
           for j in range(len(names)) if i != j and matrix[i, j] > 0]
    return sorted(off, key=lambda t: -t[1])[:n]


def landcover_transitions_stage(
    map1: str,
    map2: str,
    out_dir: str,
    change: str | None = None,
    change_threshold: float = 0.5,
    mmu_ha: float = 0.0,
    polygons: bool = True,
    connectivity: int = 8,
    dates: list[str] | None = None,
    classes: str | None = None,
    tile: int = 2048,
    top: int = 5,
    label: str | None = None,
    ctx: StageContext | None = None,
) -> dict[str, Any]:
    """From-to land-use transitions between two class maps (dinov3geo.tasks.landcover.transitions).

    Writes transitions.tif (coloured COG, one code per from-to pair), transition_matrix.csv (hectares, rows
    from, columns to), transition_polygons.gpkg (regions >= ``mmu_ha``) and summary.json into ``out_dir``;
    with ``change`` (a change probability or binary change raster, e.g. a change_detect stage's
    ``change_prob.tif``) also the gated raster and matrix (a pixel changes class only where change was
    detected). ``dates``: [date1, date2]. Returns the changed hectares and the ``top`` largest transitions.
    """
    from dinov3geo.tasks.landcover.transitions import transitions

    _transitions_validate({"dates": dates, "connectivity": connectivity, "mmu_ha": mmu_ha})
    res = transitions(map1, map2, out_dir, change=change, change_threshold=change_threshold, mmu_ha=mmu_ha,
                      polygons=polygons, connectivity=connectivity, classes=classes,
                      dates=tuple(dates) if dates else None, tile=tile, progress=False,
                      sidecars=False)  # the runner writes the stage's Items itself
    lab = _label(ctx, label, "transitions")
    names = list(res.table.names)
    gated = res.matrix_gated_ha is not None
    matrix = res.matrix_gated_ha if res.matrix_gated_ha is not None else res.matrix_ha
    changed = float(matrix.sum() - np.trace(matrix))
    tops = _top_transitions(matrix, names, top)
    what = "changed (ha, gated by change)" if gated else "changed (ha)"
    summary: dict[str, Any] = {f"{lab}: mapped in both dates (ha)": _r(res.mapped_ha, 1),
                               f"{lab}: {what}": _r(changed, 1)}
    if gated:
        summary[f"{lab}: changed without gating (ha)"] = _r(res.changed_ha, 1)
    summary |= {f"{lab}: {name} (ha)": _r(ha, 1) for name, ha in tops}
    s = res.summary
    return {"paths": {k: str(v) for k, v in res.paths.items()}, "classes": names,
            "matrix_ha": res.matrix_ha.tolist(),
            "matrix_gated_ha": res.matrix_gated_ha.tolist() if res.matrix_gated_ha is not None else None,
            "mapped_ha": res.mapped_ha, "changed_ha": res.changed_ha, "changed_gated_ha": changed if gated else None,
            "top_transitions_ha": dict(tops), "n_polygons": res.n_polygons,
            "date_before": (s.get("dates") or {}).get("date1"), "date_after": (s.get("dates") or {}).get("date2"),
            "summary": summary}


# ---------------------------------------------------------------------------------------- landcover_areas
def _areas_outputs(params: Mapping[str, Any]) -> list[str]:
    from dinov3geo.tasks.landcover.accuracy import AREA_FILES

    return [str(Path(str(params["out_dir"])) / n) for n in AREA_FILES]


def landcover_areas_stage(
    map: str,  # noqa: A002 - the YAML key
    reference: str,
    out_dir: str,
    column: str = "reference",
    layer: str | int | None = None,
    classes: str | None = None,
    z: float = 1.96,
    window: int = 2048,
    label: str | None = None,
    ctx: StageContext | None = None,
) -> dict[str, Any]:
    """Error-adjusted areas with confidence intervals (Olofsson et al. 2014) from a class map and a reference
    sample (dinov3geo.tasks.landcover.accuracy.area_report).

    ``reference``: sample points or polygons (any CRS) with the reference class in ``column`` (e.g. a
    landcover_sample stage's GeoPackage once labelled). Writes areas.csv, error_matrix.csv,
    error_matrix_counts.csv and accuracy.json into ``out_dir``. Returns each class's area +/- its CI (ha).
    """
    from dinov3geo.tasks.landcover.accuracy import area_report

    est, paths = area_report(map, reference, out_dir, column=column, layer=layer, classes=classes, z=z,
                             window=window)
    lab = _label(ctx, label, "areas")
    pct = f"{100 * (2 * _normal_cdf(z) - 1):.0f} %"
    per: dict[str, Any] = {}
    summary: dict[str, Any] = {f"{lab}: overall accuracy": f"{est.overall:.3f} ± {z * est.overall_se:.3f}"}
    for i, name in enumerate(est.names):
        a, se, mapped = float(est.area_ha[i]), float(est.area_se_ha[i]), float(est.mapped_area_ha[i])
        per[name] = {"area_ha": _r(a, 2), "ci_ha": _r(z * se, 2), "mapped_ha": _r(mapped, 2)}
        if a > 0 or mapped > 0:
            ci = f"{z * se:,.0f}" if math.isfinite(se) else "n/a"
            summary[f"{lab}: {name} (ha, ± {pct} CI)"] = f"{a:,.0f} ± {ci}"
    return {"paths": {k: str(v) for k, v in paths.items()}, "classes": per, "overall": _r(est.overall, 4),
            "overall_ci": _r(z * est.overall_se, 4), "n_used": int(est.n_used), "notes": list(est.notes),
            "summary": summary}


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


# --------------------------------------------------------------------------------------- landcover_sample
def landcover_sample_stage(
    map: str,  # noqa: A002 - the YAML key
    out: str,
    n_total: int | None = None,
    n_per_class: int | dict[str, int] | None = None,
    min_per_class: int = 50,
    seed: int = 0,
    label: str | None = None,
    ctx: StageContext | None = None,
) -> dict[str, Any]:
    """A stratified random reference sample of a class map to label (dinov3geo.tasks.landcover.sampling).

    Writes the points (GeoPackage, empty ``reference`` column) to ``out``; after labelling them, estimate
    honest areas with a landcover_areas stage. A labelled sample is never replaced (the stage then fails,
    naming it: move it away or give another ``out``).
    """
    from dinov3geo.tasks.landcover.sampling import stratified_sample

    if n_total is None and n_per_class is None:
        raise PipelineError("give 'n_total' (allocated by area, at least 'min_per_class' each) or 'n_per_class'")
    pts = stratified_sample(map, out, n_total=n_total, n_per_class=n_per_class, min_per_class=min_per_class,
                            seed=seed)
    counts = {str(k): int(v) for k, v in pts["map_class"].value_counts().items()}
    lab = _label(ctx, label, "sample")
    return {"sample": str(out), "n": len(pts), "per_class": counts,
            "summary": {f"{lab}: points to label": len(pts)}}


# ------------------------------------------------------------------------------------------ registration
def register_task_stages() -> None:
    """Register the task stage kinds (called by the built-in loader; idempotent)."""
    from dinov3geo.pipelines.stages import register_stage

    register_stage("canopy_train", canopy_train_stage, inputs=_canopy_train_inputs,
                   outputs=_canopy_train_outputs, folders=lambda p: [str(_canopy_cfg(p).out)],
                   validate=lambda p: _canopy_cfg(p) and None, replace=True)
    register_stage("canopy_predict", canopy_predict_stage, inputs=("image", "model", "chmv2_backbone",
                                                                   "chmv2_head", "aoi"),
                   outputs=lambda p: [str(p["out"]), *_summary_paths(p)], validate=_canopy_predict_validate,
                   replace=True)
    register_stage("canopy_evaluate", canopy_evaluate_stage, inputs=("pred", "truth", "aoi", "split_mask"),
                   outputs=_evaluate_outputs, folders=("out_dir",), replace=True)
    register_stage("forest_mask", forest_mask_stage, inputs=("image",), outputs=("out",), replace=True)
    register_stage("change_detect", change_detect_stage,
                   inputs=("image_before", "image_after", "backbone", "model", "forest_mask", "canopy_before", "canopy_after",
                           "aoi", "scl_before", "scl_after"),
                   outputs=_change_outputs, folders=("out_dir",), validate=_change_validate, replace=True)
    register_stage("landcover_train", landcover_train_stage, inputs=_landcover_train_inputs,
                   outputs=_landcover_train_outputs, folders=lambda p: [str(_landcover_cfg(p).out)],
                   validate=lambda p: _landcover_cfg(p) and None, replace=True)
    register_stage("landcover_predict", landcover_predict_stage, inputs=("image", "model", "aoi"),
                   outputs=lambda p: [*_class_map_outputs(str(p["out"])),
                                      *([str(p["probabilities"])] if p.get("probabilities") else [])],
                   replace=True)
    register_stage("landcover_evaluate", landcover_evaluate_stage, inputs=("map", "labels", "aoi"),
                   outputs=_landcover_evaluate_outputs, folders=("out_dir",), replace=True)
    register_stage("landcover_transitions", landcover_transitions_stage, inputs=("map1", "map2", "change", "classes"),
                   outputs=_transitions_outputs, folders=("out_dir",), validate=_transitions_validate, replace=True)
    register_stage("landcover_areas", landcover_areas_stage, inputs=("map", "reference", "classes"),
                   outputs=_areas_outputs, folders=("out_dir",), replace=True)
    register_stage("landcover_sample", landcover_sample_stage, inputs=("map",), outputs=("out",), replace=True)
