"""SSL feature quality on real imagery: pretrain a small ViT, then probe its frozen patch features.

What one run does (see ``benchmarks/README.md``):

1. **Data.** One RGB band set serves every probe. Each source in ``../shared/data`` is written as an 8-bit
   RGB GeoTIFF (bands described red/green/blue) under ``--workdir``: NEON BART 10 cm RGB averaged to
   ``--neon-res`` (default 0.25 m), NAIP 2009 + 2020 (bands 1-3, 5 m), Kootenay drone ortho (0.5 m), the
   RStoolbox Landsat 5 scene (B3/B2/B1) and the RStoolbox Sentinel-2 Amazon scene (B4/B3/B2), both
   upsampled ``--upsample`` times (bilinear) so that the small training polygons cover whole 16-px patches.
   Landsat and Sentinel-2 are contrast-stretched per band (2-98 % percentiles over valid pixels) to 1..255,
   nodata 0; the aerial images keep their 8-bit values. All of them are ingested into one tile store
   (``--tile`` px). Pretraining is transductive: the probe scenes are among the (unlabelled) training tiles.
2. **Pretraining** (``dinov3geo.ssl.train.pretrain``) of a small ViT (``--embed-dim``/``--depth``/``--heads``)
   for N = ``--iters`` iterations; from that checkpoint a **Gram** stage of M = ``--gram-iters`` iterations
   (student from the EMA teacher, Gram teacher = EMA teacher at 2x crop size, weight ramp to 2.0) and the
   pretrain run **resumed** to N + M iterations (equal total steps; the schedules are constant after warm-up,
   so the first N steps of the N + M run are the N-step run).
3. **Probes** on frozen EMA-teacher features (``get_intermediate_layers(n=1, reshape=True, norm=True)``,
   stride 16, scenes cut into ``--tile``-px windows, normalised with the exported backbone metadata) for a
   random-init backbone (same arch, seed), pretrain N, pretrain N + M, pretrain N + Gram M:

   * **land cover** (Landsat 5 cleared/fallen_dry/forest/water, Sentinel-2 village/forest/dryout/water): a
     patch is labelled when >= 50 % of its pixels fall in polygons of one class; multinomial logistic
     regression (torch, L-BFGS, L2 chosen by inner CV) on standardised features; **spatial folds**: the scene
     is cut into ``--blocks`` x ``--blocks`` blocks, leave-one-block-out, and training patches within one
     patch of the test block are dropped (no neighbouring patches in train and test). Accuracy and balanced
     accuracy pooled over all held-out patches.
   * **canopy height** (NEON BART): the lidar CHM averaged onto the patch grid (rasterio ``average``, nodata
     -9999, using both transforms); ridge regression with the same spatial folds (alpha by inner CV); MAE
     and R^2 pooled over held-out patches; the constant (train mean) predictor is reported as a baseline.

Prints a table, writes ``--json`` and a PNG of the effective-rank / patch-similarity curves from the logs.
``--quick`` is a 2-3 minute smoke run (few iterations; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import default_amp, environment  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
LANDSAT = DATA / "landsat/rstoolbox_LT05_224063_1988"
S2 = DATA / "sentinel2/rstoolbox_sen2_amazon"
NEON = DATA / "aerial_rgb_chm/neon_bart_2019"
NEON_RGB = NEON / "2019_BART_5_320000_4881000_image_crop.tif"
NEON_CHM = NEON / "NEON_D01_BART_DP3_320000_4881000_CHM_crop.tif"
NAIP = DATA / "aerial_timeseries/naip_m_4709963_se_14"
KOOTENAY = DATA / "aerial_rgb_chm/kootenay_drone_2016/kootenayOrtho.tif"
PATCH = 16


# ------------------------------------------------------------------------------------------ data prep
def _write_rgb(path: Path, data: np.ndarray, transform: Any, crs: Any) -> Path:
    import rasterio
    from rasterio.enums import ColorInterp

    prof = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": 3, "dtype": "uint8",
            "crs": crs, "transform": transform, "nodata": 0, "tiled": True, "blockxsize": 256,
            "blockysize": 256, "compress": "deflate"}
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)
        dst.descriptions = ("red", "green", "blue")
        dst.colorinterp = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
    return path


def _stretch(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-band 2-98 % stretch of valid pixels to 1..255 (0 = nodata)."""
    out = np.zeros(data.shape, np.uint8)
    for b in range(data.shape[0]):
        v = data[b][valid].astype(np.float64)
        lo, hi = np.percentile(v, [2, 98])
        x = (data[b].astype(np.float64) - lo) / max(hi - lo, 1e-9)
        out[b] = np.clip(np.round(1 + 254 * x), 1, 255).astype(np.uint8)
    out[:, ~valid] = 0
    return out


def _resampled(src: Any, bands: list[int], factor: float, resampling: Any) -> tuple[np.ndarray, Any]:
    """Read ``bands`` of an open rasterio dataset resampled by ``factor`` (>1 = finer pixels)."""
    from rasterio.transform import Affine

    h, w = int(round(src.height * factor)), int(round(src.width * factor))
    data = src.read(bands, out_shape=(len(bands), h, w), resampling=resampling)
    tr = src.transform * Affine.scale(src.width / w, src.height / h)
    return data, tr


def prepare_scenes(work: Path, upsample: float, neon_res: float) -> dict[str, Path]:
    """Write the 8-bit RGB GeoTIFFs used for pretraining and probing (see module docstring)."""
    import rasterio
    from rasterio.enums import Resampling

    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    # Landsat 5: B3 red, B2 green, B1 blue (one file per band), nodata 255
    files = {b: next(LANDSAT.glob(f"*_B{b}.TIF")) for b in (3, 2, 1)}
    arrs, tr, crs = [], None, None
    for b in (3, 2, 1):
        with rasterio.open(files[b]) as src:
            d, tr = _resampled(src, [1], upsample, Resampling.bilinear)
            m, _ = _resampled(src, [1], upsample, Resampling.nearest)
            crs = src.crs
            arrs.append((d[0], m[0] != 255))
    data = np.stack([a for a, _ in arrs]).astype(np.float64)
    valid = np.logical_and.reduce([m for _, m in arrs])
    out["landsat"] = _write_rgb(work / "landsat_rgb.tif", _stretch(data, valid), tr, crs)
    # Sentinel-2 L2A: B4 red (band 4), B3 green (3), B2 blue (2)
    with rasterio.open(S2 / "sen2_L2A_12band_dn.tif") as src:
        d, tr = _resampled(src, [4, 3, 2], upsample, Resampling.bilinear)
        valid = np.all(d > 0, axis=0)
        out["s2"] = _write_rgb(work / "s2_rgb.tif", _stretch(d.astype(np.float64), valid), tr, src.crs)
    # NEON BART 10 cm RGB averaged to neon_res
    with rasterio.open(NEON_RGB) as src:
        d, tr = _resampled(src, [1, 2, 3], src.res[0] / neon_res, Resampling.average)
        out["neon"] = _write_rgb(work / "neon_rgb.tif", np.clip(d, 1, 255).astype(np.uint8), tr, src.crs)
    for f in sorted(NAIP.glob("*.tif")):
        with rasterio.open(f) as src:
            d = src.read([1, 2, 3])
            out[f"naip_{f.stem[-8:-4]}"] = _write_rgb(work / f"naip_{f.stem[-8:]}.tif", d, src.transform, src.crs)
    if KOOTENAY.exists():
        with rasterio.open(KOOTENAY) as src:
            d = src.read([1, 2, 3])
            out["kootenay"] = _write_rgb(work / "kootenay_rgb.tif", np.clip(d, 1, 255), src.transform, src.crs)
    return out


# ------------------------------------------------------------------------------------------ pretraining
def _stage_cfg(args: argparse.Namespace, store: Path, out: Path, iterations: int, gram: bool) -> Any:
    from dinov3geo.ssl.config import load_config

    head = {"head_n_prototypes": args.prototypes, "head_hidden_dim": 512, "head_bottleneck_dim": 128}
    g = args.global_size
    raw: dict[str, Any] = {
        "data": {"store": str(store), "batch_size": args.batch, "num_workers": args.workers},
        "student": {"arch": "vit_tiny_test",
                    "overrides": {"embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.heads}},
        "crops": {"global_crops_size": g, "local_crops_size": args.local_size, "local_crops_number": 4},
        "dino": dict(head), "ibot": dict(head),
        "optim": {"iterations": iterations},
        "schedules": {
            "lr": {"start": 0.0, "peak": args.lr, "end": args.lr, "warmup_iterations": max(1, args.iters // 10)},
            "teacher_temp": {"start": 0.04, "peak": 0.07, "end": 0.07,
                             "warmup_iterations": max(1, args.iters // 4)},
            "momentum": {"start": 0.992, "peak": 0.992, "end": 0.992, "warmup_iterations": 0},
        },
        "train": {"output_dir": str(out), "precision": args.precision, "checkpoint_every": 10**9,
                  "log_every": args.log_every, "health_every": args.log_every, "progress_bar": False,
                  "seed": 0},
    }
    if gram:
        m = args.gram_iters
        raw["crops"]["gram_teacher_crops_size"] = 2 * g
        raw["gram"] = {"use_loss": True, "it_load_ema_teacher": 0, "rep_update": True,
                       "update_frequency": max(1, m // 3), "max_updates": 3,
                       "loss_weight_schedule": {"start": 0.0, "peak": 0.0, "end": 2.0, "warmup_iterations": 0,
                                                "cosine_iterations": max(1, m // 3)}}
        raw["dino"]["reweight_dino_local_loss"] = True
        raw["dino"]["local_loss_weight_schedule"] = {"start": 1.0, "peak": 1.0, "end": 0.5,
                                                     "warmup_iterations": 0, "cosine_iterations": max(1, m // 3)}
        raw["schedules"]["lr"] = {"start": args.lr * 0.6, "peak": args.lr * 0.6, "end": args.lr * 0.6,
                                  "warmup_iterations": 0}
        raw["schedules"]["momentum"] = {"start": 0.996, "peak": 0.996, "end": 0.996, "warmup_iterations": 0}
        raw["schedules"]["teacher_temp"] = {"start": 0.07, "peak": 0.07, "end": 0.07, "warmup_iterations": 0}
    return load_config(raw)


def run_pretraining(args: argparse.Namespace, store: Path, work: Path) -> dict[str, Any]:
    """pretrain N -> (copy) -> gram M from it; pretrain resumed to N + M. Returns paths, timings, logs."""
    import torch

    from dinov3geo.ssl.train import pretrain, stage_metrics

    torch.set_num_threads(args.threads)
    n, m = args.iters, args.gram_iters
    out_p, out_g = work / "run_pretrain", work / "run_gram"
    if args.reuse:
        return _reuse_pretraining(work, n, m)
    for d in (out_p, out_g):
        shutil.rmtree(d, ignore_errors=True)
    backbones: dict[str, Path] = {}
    times: dict[str, float] = {}
    t = time.perf_counter()
    res = pretrain(_stage_cfg(args, store, out_p, n + m, gram=False), max_steps=n, stage="pretrain")
    times["pretrain_N_s"] = time.perf_counter() - t
    snap = work / "pretrain_N"
    shutil.rmtree(snap, ignore_errors=True)
    snap.mkdir()
    shutil.copy(res.checkpoint, snap / "last.ckpt")
    shutil.copy(res.backbone, snap / "backbone.dinov3geo.pt")
    backbones[f"pretrain {n}"] = snap / "backbone.dinov3geo.pt"
    cfg_g = _stage_cfg(args, store, out_g, m, gram=True)
    cfg_g.student.resume_from_teacher_chkpt = str(snap / "last.ckpt")
    t = time.perf_counter()
    res_g = pretrain(cfg_g, stage="gram")
    times["gram_M_s"] = time.perf_counter() - t
    backbones[f"pretrain {n} + gram {m}"] = res_g.backbone
    t = time.perf_counter()
    res_p = pretrain(_stage_cfg(args, store, out_p, n + m, gram=False), resume=True, stage="pretrain")
    times["pretrain_M_more_s"] = time.perf_counter() - t
    backbones[f"pretrain {n + m}"] = res_p.backbone
    return {"backbones": backbones, "times": times, "logs_pretrain": stage_metrics(out_p),
            "logs_gram": stage_metrics(out_g), "iterations": {"N": n, "M": m}}


def _reuse_pretraining(work: Path, n: int, m: int) -> dict[str, Any]:
    """The three backbones of an earlier run in ``work`` with the same N and M (checked in its configs)."""
    from dinov3geo.ssl.train import stage_metrics

    out_p, out_g, snap = work / "run_pretrain", work / "run_gram", work / "pretrain_N"
    files = {f"pretrain {n}": snap / "backbone.dinov3geo.pt", f"pretrain {n} + gram {m}": out_g / "backbone.pth",
             f"pretrain {n + m}": out_p / "backbone.pth"}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise SystemExit(f"--reuse: no earlier run in {work} ({', '.join(missing)} missing); run without --reuse")
    for d, want in ((out_p, n + m), (out_g, m)):
        got = json.loads((d / "config.json").read_text())["optim"]["iterations"]
        if got != want:
            raise SystemExit(f"--reuse: {d} was trained for {got} iterations, not {want}: pass the --iters / "
                             "--gram-iters of that run")
    return {"backbones": files, "times": {"reused": True}, "logs_pretrain": stage_metrics(out_p),
            "logs_gram": stage_metrics(out_g), "iterations": {"N": n, "M": m}}


# ------------------------------------------------------------------------------------------ features
def read_rgb(path: Path) -> tuple[np.ndarray, Any, Any]:
    import rasterio

    with rasterio.open(path) as src:
        return src.read(), src.transform, src.crs


def patch_features(model: Any, img: np.ndarray, mean: list[float], std: list[float], window: int) -> np.ndarray:
    """[D, H//16, W//16] features of an 8-bit RGB image, computed window by window (window % 16 == 0)."""
    import torch

    c, h, w = img.shape
    hp, wp = h // PATCH, w // PATCH
    x = torch.from_numpy(img[:, : hp * PATCH, : wp * PATCH].astype(np.float32) / 255.0)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    x[:, torch.from_numpy(np.all(img[:, : hp * PATCH, : wp * PATCH] == 0, axis=0))] = 0.0
    feats = None
    with torch.inference_mode():
        for r0 in range(0, hp * PATCH, window):
            for c0 in range(0, wp * PATCH, window):
                xw = x[:, r0:r0 + window, c0:c0 + window].unsqueeze(0)
                f = model.get_intermediate_layers(xw, n=1, reshape=True, norm=True)[0][0]
                if feats is None:
                    feats = torch.zeros(f.shape[0], hp, wp)
                feats[:, r0 // PATCH:r0 // PATCH + f.shape[1], c0 // PATCH:c0 // PATCH + f.shape[2]] = f
    assert feats is not None
    return feats.numpy()


def polygon_patch_labels(path: Path, vector: Path, classes: list[str]) -> np.ndarray:
    """[H//16, W//16] class index of patches >= 50 % inside polygons of one class, else -1."""
    import rasterio
    from rasterio.features import rasterize

    from dinov3geo.io.vector import read_vector

    with rasterio.open(path) as src:
        h, w, tr, crs = src.height, src.width, src.transform, src.crs
    gdf = read_vector(vector).to_crs(crs)
    hp, wp = h // PATCH, w // PATCH
    lab = np.full((hp, wp), -1, np.int64)
    best = np.zeros((hp, wp))
    for k, cls in enumerate(classes):
        geoms = list(gdf.geometry[gdf["class"] == cls])
        if not geoms:
            continue
        r = rasterize(geoms, out_shape=(h, w), transform=tr, fill=0, default_value=1, dtype="uint8")
        frac = r[: hp * PATCH, : wp * PATCH].reshape(hp, PATCH, wp, PATCH).mean(axis=(1, 3))
        sel = (frac >= 0.5) & (frac > best)
        lab[sel], best[sel] = k, frac[sel]
    return lab


def chm_patch_target(path: Path) -> np.ndarray:
    """Mean lidar CHM over each patch footprint of the (resampled) NEON RGB, NaN where no valid CHM."""
    import rasterio
    from rasterio.transform import Affine
    from rasterio.warp import Resampling, reproject

    with rasterio.open(path) as src:
        hp, wp = src.height // PATCH, src.width // PATCH
        dst_tr, crs = src.transform * Affine.scale(PATCH), src.crs
    out = np.full((hp, wp), np.nan, np.float32)
    with rasterio.open(NEON_CHM) as chm:
        reproject(rasterio.band(chm, 1), out, src_transform=chm.transform, src_crs=chm.crs, src_nodata=-9999,
                  dst_transform=dst_tr, dst_crs=crs, dst_nodata=np.nan, resampling=Resampling.average)
    return out


# ------------------------------------------------------------------------------------------ probes
def block_ids(hp: int, wp: int, blocks: int) -> np.ndarray:
    r = np.minimum(np.arange(hp) * blocks // hp, blocks - 1)
    c = np.minimum(np.arange(wp) * blocks // wp, blocks - 1)
    return r[:, None] * blocks + c[None, :]


def _buffer_mask(bid: np.ndarray, test_block: int) -> np.ndarray:
    """Patches of the test block dilated by one patch (excluded from training)."""
    t = bid == test_block
    d = t.copy()
    d[1:] |= t[:-1]
    d[:-1] |= t[1:]
    d[:, 1:] |= d[:, :-1].copy()
    d[:, :-1] |= d[:, 1:].copy()
    return d


def fit_logreg(x: np.ndarray, y: np.ndarray, n_cls: int, l2: float) -> Any:
    import torch

    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y)
    w = torch.zeros(x.shape[1], n_cls, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_cls, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=60, tolerance_grad=1e-5, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    ym = y.mean()
    w = np.linalg.solve(x.T @ x + alpha * len(x) * np.eye(x.shape[1]), x.T @ (y - ym))
    return w, float(ym)


def _standardise(tr: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu, sd = tr.mean(0), tr.std(0) + 1e-6
    return [(tr - mu) / sd] + [(o - mu) / sd for o in others]


def _folds(bid: np.ndarray, labelled: np.ndarray, blocks: int) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for k in range(blocks * blocks):
        test = labelled & (bid == k)
        train = labelled & ~_buffer_mask(bid, k)
        if test.any() and train.sum() > 5:
            out.append((train, test))
    return out


L2_GRID = [1e-3, 1e-2, 1e-1]
ALPHA_GRID = [1e-3, 1e-2, 1e-1, 1.0, 10.0]


def _inner_choice(feats: np.ndarray, target: np.ndarray, bid: np.ndarray, train: np.ndarray, blocks: int,
                  grid: list[float], score: Any) -> float:
    """Grid value with the best pooled inner leave-one-block-out score over the training patches."""
    folds = _folds(bid, train, blocks)
    best, best_s = grid[0], -np.inf
    for g in grid:
        s = score(feats, target, folds, g)
        if s > best_s:
            best, best_s = g, s
    return best


def _cls_predict(feats: np.ndarray, y: np.ndarray, folds: list, l2: float, n_cls: int) -> tuple[np.ndarray, ...]:
    pred, true = [], []
    for train, test in folds:
        xtr, xte = _standardise(feats[train], feats[test])
        w, b = fit_logreg(xtr, y[train], n_cls, l2)
        pred.append(np.argmax(xte @ w + b, axis=1))
        true.append(y[test])
    return np.concatenate(pred), np.concatenate(true)


def classification_probe(feats: np.ndarray, lab: np.ndarray, blocks: int, classes: list[str]) -> dict[str, Any]:
    """Spatial leave-one-block-out logistic-regression probe (features [D,h,w], labels [h,w])."""
    f = feats.reshape(feats.shape[0], -1).T.astype(np.float64)
    y = lab.reshape(-1)
    bid = block_ids(*lab.shape, blocks).reshape(lab.shape)
    labelled = lab >= 0
    n_cls = len(classes)

    def score(ff: np.ndarray, yy: np.ndarray, folds: list, l2: float) -> float:
        if not folds:
            return 0.0
        p, t = _cls_predict(ff, yy, [(a.reshape(-1), b.reshape(-1)) for a, b in folds], l2, n_cls)
        return float((p == t).mean())

    pred, true, chosen = [], [], []
    for train, test in _folds(bid, labelled, blocks):
        l2 = _inner_choice(f, y, bid, train, blocks, L2_GRID, score)
        p, t = _cls_predict(f, y, [(train.reshape(-1), test.reshape(-1))], l2, n_cls)
        pred.append(p)
        true.append(t)
        chosen.append(l2)
    p, t = np.concatenate(pred), np.concatenate(true)
    recalls = [float((p[t == k] == k).mean()) for k in range(n_cls) if (t == k).any()]
    return {"accuracy": float((p == t).mean()), "balanced_accuracy": float(np.mean(recalls)),
            "n_patches": int(len(t)), "l2_chosen": chosen,
            "per_class_n": {c: int((t == k).sum()) for k, c in enumerate(classes)}}


def regression_probe(feats: np.ndarray, target: np.ndarray, blocks: int) -> dict[str, Any]:
    f = feats.reshape(feats.shape[0], -1).T.astype(np.float64)
    y = target.reshape(-1).astype(np.float64)
    bid = block_ids(*target.shape, blocks).reshape(target.shape)
    labelled = np.isfinite(target)

    def fold_pred(folds: list, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pred, true, base = [], [], []
        for train, test in folds:
            tr, te = train.reshape(-1), test.reshape(-1)
            xtr, xte = _standardise(f[tr], f[te])
            w, b = fit_ridge(xtr, y[tr], alpha)
            pred.append(xte @ w + b)
            true.append(y[te])
            base.append(np.full(te.sum(), y[tr].mean()))
        return np.concatenate(pred), np.concatenate(true), np.concatenate(base)

    def score(_f: Any, _y: Any, folds: list, alpha: float) -> float:
        if not folds:
            return 0.0
        p, t, _ = fold_pred(folds, alpha)
        return -float(np.abs(p - t).mean())

    preds, trues, bases, chosen = [], [], [], []
    for train, test in _folds(bid, labelled, blocks):
        alpha = _inner_choice(f, y, bid, train, blocks, ALPHA_GRID, score)
        p, t, b = fold_pred([(train, test)], alpha)
        preds.append(p)
        trues.append(t)
        bases.append(b)
        chosen.append(alpha)
    p, t, b = np.concatenate(preds), np.concatenate(trues), np.concatenate(bases)
    ss_tot = float(((t - t.mean()) ** 2).sum())
    return {"mae_m": float(np.abs(p - t).mean()), "r2": 1.0 - float(((p - t) ** 2).sum()) / ss_tot,
            "mae_constant_m": float(np.abs(b - t).mean()), "n_patches": int(len(t)), "alpha_chosen": chosen,
            "target_mean_m": float(t.mean())}


def probe_all(models: dict[str, Any], scenes: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    ls_classes = ["cleared", "fallen_dry", "forest", "water"]
    s2_classes = ["village", "forest", "dryout", "water"]
    labels = {
        "landsat": polygon_patch_labels(scenes["landsat"], LANDSAT / "training_polygons.gpkg", ls_classes),
        "s2": polygon_patch_labels(scenes["s2"], S2 / "training_polygons.geojson", s2_classes),
    }
    chm = chm_patch_target(scenes["neon"])
    imgs = {k: read_rgb(scenes[k])[0] for k in ("landsat", "s2", "neon")}
    results: dict[str, Any] = {}
    for name, model in models.items():
        t = time.perf_counter()
        meta = model.metadata
        mean, std = list(meta.mean), list(meta.std)
        r: dict[str, Any] = {}
        for key, classes in (("landsat", ls_classes), ("s2", s2_classes)):
            f = patch_features(model, imgs[key], mean, std, args.tile)
            r[key] = classification_probe(f, labels[key], args.blocks, classes)
        f = patch_features(model, imgs["neon"], mean, std, args.tile)
        r["canopy"] = regression_probe(f, chm, args.blocks)
        r["probe_s"] = time.perf_counter() - t
        results[name] = r
        print(f"  probed {name}: landsat acc {r['landsat']['accuracy']:.3f}, s2 acc {r['s2']['accuracy']:.3f}, "
              f"canopy MAE {r['canopy']['mae_m']:.2f} m ({r['probe_s']:.0f} s)", flush=True)
    return results


# ------------------------------------------------------------------------------------------ report
def plot_curves(pre: list[dict[str, float]], gram: list[dict[str, float]], n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ["health/effective_rank", "health/patch_sim_std", "health/patch_sim_mean"],
                              ["effective rank of patch features", "patch cosine-similarity std",
                               "patch cosine-similarity mean"], strict=True):
        for rows, off, lab in ((pre, 0, "pretrain (N+M)"), (gram, n, "pretrain N -> gram M")):
            pts = [(r["step"] + off, r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", label=lab)
        ax.axvline(n, color="grey", ls=":", lw=1)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(name: str, r: dict[str, Any]) -> str:
    c = r["canopy"]
    return (f"| {name} | {r['landsat']['accuracy']:.3f} ({r['landsat']['balanced_accuracy']:.3f}) | "
            f"{r['s2']['accuracy']:.3f} ({r['s2']['balanced_accuracy']:.3f}) | "
            f"{(r['landsat']['accuracy'] + r['s2']['accuracy']) / 2:.3f} | {c['mae_m']:.2f} | {c['r2']:.3f} |")


def _health_summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    hr = [r for r in rows if "health/effective_rank" in r]
    if not hr:
        return {}
    return {"first": {k: hr[0][k] for k in ("step", "health/effective_rank", "health/patch_sim_std")},
            "last": {k: hr[-1][k] for k in ("step", "health/effective_rank", "health/patch_sim_std")}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=1000, help="N: pretrain iterations before the Gram stage")
    ap.add_argument("--gram-iters", type=int, default=300, help="M: Gram-stage iterations (and extra pretrain)")
    ap.add_argument("--embed-dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--prototypes", type=int, default=1024, help="DINO/iBOT head prototypes")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--global-size", type=int, default=64, help="global crop px (Gram teacher: 2x)")
    ap.add_argument("--local-size", type=int, default=32)
    ap.add_argument("--tile", type=int, default=128, help="tile size of the store and probe window (px)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak LR before batch scaling (sqrt_wrt_1024)")
    ap.add_argument("--precision", default="bf16-mixed" if default_amp() == "bf16" else "32-true",
                    help="train.precision (bf16-mixed or 32-true; default: bf16-mixed only where the CPU runs "
                         "bf16 natively)")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--upsample", type=float, default=4.0, help="Landsat / S2 upsampling factor")
    ap.add_argument("--neon-res", type=float, default=0.25, help="NEON RGB resampled to this GSD (m)")
    ap.add_argument("--blocks", type=int, default=3, help="spatial folds: blocks x blocks per scene")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--workdir", default="/tmp/dinov3geo-ssl-quality")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None, help="curves PNG (default <workdir>/ssl_quality_curves.png)")
    ap.add_argument("--quick", action="store_true", help="2-3 minute smoke run")
    ap.add_argument("--reuse", action="store_true", help="probe the backbones of an earlier run in --workdir with "
                    "the same --iters / --gram-iters instead of pretraining again")
    ap.add_argument("--random-seeds", type=int, default=3, help="random-init controls (seeds 0..K-1): the spread "
                    "of random features is the noise level SSL must clear")
    ap.add_argument("--clean", action="store_true", help="delete the workdir at the end")
    args = ap.parse_args(argv)
    if args.quick:
        args.iters, args.gram_iters, args.log_every = 30, 12, 5
        args.embed_dim, args.depth, args.batch = 64, 2, 8
    import logging

    import torch

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from dinov3geo.ingest import ingest
    from dinov3geo.models import build_backbone, load_backbone

    t0 = time.perf_counter()
    work = Path(args.workdir)
    scenes = prepare_scenes(work / "scenes", args.upsample, args.neon_res)
    store = work / "tiles.zarr"
    shutil.rmtree(store, ignore_errors=True)
    rep = ingest([str(p) for p in scenes.values()], store, tile_size=args.tile, progress=False)
    t_ingest = time.perf_counter() - t0
    print(f"ingested {len(scenes)} scenes into {store} ({t_ingest:.0f} s)", flush=True)
    print(rep.summary(), flush=True)

    t = time.perf_counter()
    pt = run_pretraining(args, store, work)
    t_train = time.perf_counter() - t
    print(f"pretraining done ({t_train:.0f} s: {pt['times']})", flush=True)

    models: dict[str, Any] = {}
    first = load_backbone(next(iter(pt["backbones"].values())))
    rand_names = []
    for seed in range(max(1, args.random_seeds)):
        torch.manual_seed(seed)
        rand = build_backbone("vit_tiny_test", embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads,
                              in_chans=3, layerscale_init=1e-5).eval()
        rand.metadata = first.metadata
        name = "random init" if seed == 0 else f"random init (seed {seed})"
        models[name] = rand
        rand_names.append(name)
    for name, p in pt["backbones"].items():
        models[name] = load_backbone(p).eval()
    t = time.perf_counter()
    probes = probe_all(models, scenes, args)
    t_probe = time.perf_counter() - t

    png = Path(args.png) if args.png else work / "ssl_quality_curves.png"
    plot_curves(pt["logs_pretrain"], pt["logs_gram"], args.iters, png)
    total = time.perf_counter() - t0

    n, m = args.iters, args.gram_iters
    print(f"\n## SSL feature quality (ViT d={args.embed_dim} depth={args.depth} heads={args.heads}, "
          f"N={n}, M={m}, batch {args.batch}, {args.precision})\n")
    print("| features | Landsat acc (bal.) | S2 acc (bal.) | mean acc | canopy MAE m | canopy R^2 |")
    print("|---|---|---|---|---|---|")
    for name, r in probes.items():
        print(_row(name, r))
    c0 = probes["random init"]["canopy"]
    print(f"\nconstant predictor canopy MAE: {c0['mae_constant_m']:.2f} m (mean height {c0['target_mean_m']:.2f} m, "
          f"{c0['n_patches']} patches); labelled patches: Landsat {probes['random init']['landsat']['n_patches']} "
          f"{probes['random init']['landsat']['per_class_n']}, S2 {probes['random init']['s2']['n_patches']} "
          f"{probes['random init']['s2']['per_class_n']}")
    hp, hg = _health_summary(pt["logs_pretrain"]), _health_summary(pt["logs_gram"])
    print(f"health pretrain: {hp}\nhealth gram:     {hg}")
    ssl_best = f"pretrain {n + m}"
    rnd, ssl, gr = probes["random init"], probes[ssl_best], probes[f"pretrain {n} + gram {m}"]
    acc = lambda r: (r["landsat"]["accuracy"] + r["s2"]["accuracy"]) / 2  # noqa: E731
    r_acc = [acc(probes[k]) for k in rand_names]
    r_mae = [probes[k]["canopy"]["mae_m"] for k in rand_names]
    print(f"random init over {len(rand_names)} seeds: mean acc {np.mean(r_acc):.3f} +- {np.std(r_acc, ddof=1):.3f} (std, ddof=1) "
          f"(best {max(r_acc):.3f}); canopy MAE {np.mean(r_mae):.2f} +- {np.std(r_mae, ddof=1):.2f} m (best {min(r_mae):.2f})")
    verdict = {
        "ssl_beats_random_landcover": acc(ssl) > acc(rnd),
        "ssl_minus_random_acc": acc(ssl) - acc(rnd),
        "ssl_beats_random_canopy": ssl["canopy"]["mae_m"] < rnd["canopy"]["mae_m"],
        "random_minus_ssl_mae_m": rnd["canopy"]["mae_m"] - ssl["canopy"]["mae_m"],
        "random_seeds": len(rand_names),
        "ssl_beats_every_random_seed_landcover": acc(ssl) > max(r_acc),
        "ssl_beats_every_random_seed_canopy": ssl["canopy"]["mae_m"] < min(r_mae),
        "random_acc_mean_std": [float(np.mean(r_acc)), float(np.std(r_acc, ddof=1))],
        "random_mae_mean_std_m": [float(np.mean(r_mae)), float(np.std(r_mae, ddof=1))],
        "gram_minus_pretrain_acc": acc(gr) - acc(ssl),
        "pretrain_minus_gram_mae_m": ssl["canopy"]["mae_m"] - gr["canopy"]["mae_m"],
    }
    print(f"verdict (pretrain {n + m} vs random, gram vs pretrain at equal steps): {verdict}")
    print(f"curves: {png}\nruntime: prep+ingest {t_ingest:.0f} s, pretraining {t_train:.0f} s, "
          f"probes {t_probe:.0f} s, total {total:.0f} s")
    if args.json:
        out = {"args": vars(args), "machine": environment(), "probes": probes, "verdict": verdict,
               "health": {"pretrain": hp, "gram": hg}, "train_times_s": pt["times"],
               "runtime_s": {"ingest": t_ingest, "pretraining": t_train, "probes": t_probe, "total": total},
               "curves": {"pretrain": [{k: v for k, v in r.items() if k.startswith("health/") or k == "step"}
                                       for r in pt["logs_pretrain"] if "health/effective_rank" in r],
                          "gram": [{k: v for k, v in r.items() if k.startswith("health/") or k == "step"}
                                   for r in pt["logs_gram"] if "health/effective_rank" in r]},
               "png": str(png)}
        Path(args.json).write_text(json.dumps(out, indent=2))
    if args.clean:
        keep = png.parent == work
        if keep:
            shutil.copy(png, Path.cwd() / png.name)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
