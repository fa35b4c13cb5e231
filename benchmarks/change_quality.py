"""Change-detection quality on held-out real data: zero-shot feature distance vs trained head vs classic CVA.

What one run does (see ``benchmarks/README.md``):

1. **Backbone.** ``--backbone PATH`` (any :func:`dinov3geo.models.load_backbone` file with 3 RGB input bands),
   or by default a small ViT pretrained here with :func:`dinov3geo.ssl.train.pretrain` (``--iters``
   iterations) on 8-bit RGB tiles: the scenes of ``ssl_quality.py`` (NEON, NAIP, Kootenay, Landsat 5 and
   Sentinel-2 Amazon, the latter two upsampled 4x) plus OSCD ``aguasclaras`` (both dates, B04/B03/B02, 2-98 %
   stretch, upsampled ``--oscd-upscale`` x) and the LEVIR-CD training/validation crops (both dates, written with
   a dummy local georeferencing so they can be tiled). **No test image is among the pretraining tiles** (OSCD
   ``bercy`` and the LEVIR ``test_*`` crops are left out), and no label is used. A random-init backbone of the
   same arch is the control.
2. **Splits.** OSCD: train on ``aguasclaras`` (top 80 % of the rows; the bottom 20 % is the validation split
   used only for the head's threshold), test on ``bercy`` (whole city). LEVIR-CD: train on ``train_36``,
   ``train_412``, validate on ``val_27``, test on the five ``test_*`` crops.
3. **Methods**, every metric pooled over all labelled test pixels:

   * **zero-shot**: :class:`~dinov3geo.tasks.change.zeroshot.ZeroShotChange` (cosine distance of the frozen
     patch features of 4 evenly spaced blocks, RGB bands; OSCD input upsampled ``--oscd-upscale`` x;
     per-band standardisation with the test pair's own statistics), thresholded with Otsu on each test image
     (label-free);
   * **trained head**: :func:`~dinov3geo.tasks.change.train.train_change_head` (frozen backbone; OSCD: all 13
     bands, the RGB patch kernels widened with the RGB mean for the others, upscale as above; LEVIR: RGB),
     threshold chosen on the validation split;
   * **classic**: CVA + Otsu (:func:`dinov3geo.tasks.change.classic.classic_change`) on all bands (13 for OSCD),
     and on RGB only for reference.

   Besides precision / recall / F1 / IoU / OA at the method's own threshold, "oracle F1" is the best F1 over all
   thresholds on the test pixels: a ranking-quality number that no deployable method can claim.

Prints a Markdown table, writes ``--json``. ``--quick`` is a smoke run of a few minutes (numbers mean nothing).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import default_amp, environment, print_table, write_json  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
OSCD = DATA / "change_pairs" / "oscd"
LEVIR = DATA / "change_pairs" / "levir_cd_samples"
LEVIR_TRAIN = ["train_36_0512_0512", "train_412_0512_0768"]
LEVIR_VAL = ["val_27_0000_0256"]
LEVIR_TEST = ["test_2_0000_0000", "test_2_0000_0512", "test_55_0256_0000", "test_77_0512_0256", "test_7_0256_0512"]
RGB = ["red", "green", "blue"]


# ------------------------------------------------------------------------------------------ pretraining data
def _stretch8(data: np.ndarray) -> np.ndarray:
    out = np.zeros(data.shape, np.uint8)
    for b in range(data.shape[0]):
        lo, hi = np.percentile(data[b], [2, 98])
        out[b] = np.clip(np.round(1 + 254 * (data[b] - lo) / max(hi - lo, 1e-9)), 1, 255).astype(np.uint8)
    return out


def prepare_change_scenes(work: Path, oscd_upscale: int) -> dict[str, Path]:
    """8-bit RGB GeoTIFFs of the non-test change imagery (OSCD aguasclaras, LEVIR train/val crops)."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin
    from ssl_quality import _write_rgb

    out: dict[str, Path] = {}
    for k in (1, 2):
        folder = OSCD / "aguasclaras" / f"imgs_{k}"
        bands = []
        for bid in ("B04", "B03", "B02"):
            f = next(folder.glob(f"*_{bid}.tif"))
            with rasterio.open(f) as src:
                h, w = src.height * oscd_upscale, src.width * oscd_upscale
                bands.append(src.read(1, out_shape=(h, w), resampling=Resampling.bilinear).astype(np.float64))
                tr = src.transform * src.transform.scale(1 / oscd_upscale)
                crs = src.crs
        out[f"oscd_aguasclaras_{k}"] = _write_rgb(work / f"oscd_aguasclaras_{k}.tif", _stretch8(np.stack(bands)),
                                                  tr, crs)
    from PIL import Image

    for i, name in enumerate(LEVIR_TRAIN + LEVIR_VAL):
        for d in ("A", "B"):
            img = np.asarray(Image.open(LEVIR / d / f"{name}.png").convert("RGB")).transpose(2, 0, 1)
            # dummy georeferencing (0.5 m, UTM 14N, crops side by side): only so that the crops can be tiled
            tr = from_origin(500000.0 + 200.0 * i, 3300000.0, 0.5, 0.5)
            out[f"levir_{name}_{d}"] = _write_rgb(work / f"levir_{name}_{d}.tif", np.clip(img, 1, 255), tr,
                                                  "EPSG:32614")
    return out


def pretrain_backbone(args: argparse.Namespace, work: Path) -> tuple[Path, float]:
    """Ingest the pretraining scenes and run ``pretrain``; returns the exported backbone and the seconds."""
    import logging

    import torch
    from ssl_quality import _stage_cfg, prepare_scenes

    from dinov3geo.ingest import ingest
    from dinov3geo.ssl.train import pretrain

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    scenes = {**prepare_scenes(work / "scenes", 4.0, 0.25), **prepare_change_scenes(work / "scenes", args.oscd_upscale)}
    store = work / "tiles.zarr"
    shutil.rmtree(store, ignore_errors=True)
    rep = ingest([str(p) for p in scenes.values()], store, tile_size=args.tile, progress=False)
    print(f"ingested {len(scenes)} scenes ({time.perf_counter() - t0:.0f} s)\n{rep.summary()}", flush=True)
    out = work / "run_pretrain"
    shutil.rmtree(out, ignore_errors=True)
    ns = argparse.Namespace(prototypes=args.prototypes, global_size=args.global_size, local_size=args.local_size,
                            batch=args.batch, workers=1, embed_dim=args.embed_dim, depth=args.depth,
                            heads=args.heads, iters=args.iters, gram_iters=0, lr=args.lr, precision=args.precision,
                            log_every=max(10, args.iters // 10))
    res = pretrain(_stage_cfg(ns, store, out, args.iters, gram=False), stage="pretrain")
    return Path(res.backbone), time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ evaluation
def _eval_scores(name: str, scores: list[np.ndarray], pairs: list[Any], thresholds: list[float], geq: bool
                 ) -> dict[str, Any]:
    """Pooled metrics at the given per-pair thresholds, plus the oracle F1 over all thresholds."""
    from dinov3geo.tasks.change.metrics import ConfusionMatrix, ThresholdSearch

    cm = ConfusionMatrix()
    allv = [s[p.valid & np.isfinite(s)] for s, p in zip(scores, pairs, strict=True)]
    lo = float(min(v.min() for v in allv))
    hi = float(max(v.max() for v in allv))
    search = ThresholdSearch(2000, lo, hi + 1e-6 * max(1.0, abs(hi)))
    for s, p, t in zip(scores, pairs, thresholds, strict=True):
        ok = p.valid & np.isfinite(s)
        pred = (np.nan_to_num(s, nan=-np.inf) >= t) if geq else (np.nan_to_num(s, nan=-np.inf) > t)
        cm.update(pred, p.label, ok)
        search.update(s, p.label, ok)
    r = cm.compute()
    r["oracle_f1"] = search.best("f1")[1]
    r["thresholds"] = [float(t) for t in thresholds]
    r["method"] = name
    return r


def zero_shot(backbone: Any, pairs: list[Any], upscale: int, window: int, value_scale: float | None,
              layers: int) -> dict[str, Any]:
    import torch

    from dinov3geo.tasks.change.datasets import predict_pair
    from dinov3geo.tasks.change.thresholds import otsu_threshold
    from dinov3geo.tasks.change.zeroshot import ZeroShotChange

    scores, thr = [], []
    for p in pairs:
        if value_scale is None:  # standardise with the pair's own statistics (label-free)
            x = np.concatenate([p.before, p.after], axis=2).reshape(p.before.shape[0], -1).astype(np.float64)
            mean, std, vs = x.mean(1).tolist(), np.maximum(x.std(1), 1e-6).tolist(), 1.0
        else:
            mean = std = None
            vs = value_scale
        m = ZeroShotChange(backbone, len(p.band_names), value_scale=vs, mean=mean, std=std, layers=layers,
                           upscale=upscale)
        with torch.inference_mode():
            s = predict_pair(m, p, window=window, overlap=window // 4)
        scores.append(s)
        thr.append(otsu_threshold(s, p.image_valid & np.isfinite(s)))
    return _eval_scores("zero-shot + Otsu", scores, pairs, thr, geq=False)


def classic(pairs: list[Any], bands: list[str] | None, label: str) -> dict[str, Any]:
    from dinov3geo.tasks.change.classic import classic_change

    scores, thr = [], []
    for p in pairs:
        idx = [p.band_names.index(b) for b in bands] if bands else list(range(len(p.band_names)))
        r = classic_change(p.before[idx], p.after[idx], p.image_valid, method="cva")
        scores.append(r.score)
        thr.append(r.threshold)
    return _eval_scores(label, scores, pairs, thr, geq=False)


def trained_head(cfg: dict[str, Any], pairs: list[Any], window: int) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    from dinov3geo.tasks.change.datasets import predict_pair
    from dinov3geo.tasks.change.head import load_change_model
    from dinov3geo.tasks.change.train import train_change_head

    t = time.perf_counter()
    path = train_change_head(cfg)
    secs = time.perf_counter() - t
    model = load_change_model(path)
    with torch.inference_mode():
        scores = [predict_pair(model, p, window=window, overlap=window // 4) for p in pairs]
    r = _eval_scores("trained head", scores, pairs, [float(model.threshold)] * len(pairs), geq=True)
    tr = model.info["train"]
    info = {"train_seconds": secs, "loss_first": tr["loss_history"][0], "loss_last": tr["loss_history"][-1],
            "val": {k: tr["validation"].get(k) for k in ("f1", "precision", "recall")}, "threshold": model.threshold}
    return r, info


def head_config(args: argparse.Namespace, work: Path, weights: Path | None, dataset: str, seed: int,
                tag: str) -> dict[str, Any]:
    out = str(work / f"head_{dataset}_{tag}_s{seed}.pt")
    if dataset == "oscd":
        data = {"train": [{"kind": "oscd", "path": str(OSCD / "aguasclaras")}], "val_fraction": 0.2}
        bb = {"layers": args.n_layers, "upscale": args.oscd_upscale, "normalization": "data"}
        crop = args.oscd_crop
    else:
        data = {"train": [{"kind": "levir", "path": str(LEVIR), "names": LEVIR_TRAIN}],
                "val": [{"kind": "levir", "path": str(LEVIR), "names": LEVIR_VAL}]}
        bb = {"layers": args.n_layers, "upscale": 1, "normalization": "auto"}
        crop = args.levir_crop
    bb["weights"] = str(weights) if weights is not None else None
    return {"output": out, "data": data, "backbone": bb,
            "head": {"hidden": args.head_hidden, "detail_channels": args.detail_channels},
            "train": {"crop_size": crop, "crops": args.crops, "epochs": args.epochs, "batch_size": 8,
                      "lr": args.head_lr, "seed": seed, "threads": args.threads, "progress_bar": False,
                      "val_window": args.window if dataset == "levir" else args.oscd_window}}


def random_backbone(args: argparse.Namespace, like: Any, work: Path) -> Path:
    """Random-init backbone of the same arch (and metadata) as ``like``, saved for load_backbone."""
    import torch

    from dinov3geo.models import build_backbone, save_backbone

    torch.manual_seed(0)
    cfg = like.config
    rand = build_backbone(cfg).eval()
    rand.metadata = like.metadata
    return save_backbone(rand, work / "random_init.dinov3geo.pt")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default=None, help="RGB backbone file (skips pretraining)")
    ap.add_argument("--iters", type=int, default=800, help="pretraining iterations")
    ap.add_argument("--embed-dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--prototypes", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--global-size", type=int, default=64)
    ap.add_argument("--local-size", type=int, default=32)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3, help="pretraining peak LR")
    ap.add_argument("--precision", default="bf16-mixed" if default_amp() == "bf16" else "32-true",
                    help="train.precision (default: bf16-mixed only where the CPU runs bf16 natively)")
    ap.add_argument("--oscd-upscale", type=int, default=4, help="OSCD input upsampling (16/upscale px patches)")
    ap.add_argument("--oscd-crop", type=int, default=64, help="OSCD training crop (10 m px)")
    ap.add_argument("--levir-crop", type=int, default=128, help="LEVIR training crop (px)")
    ap.add_argument("--crops", type=int, default=192, help="cached training crops per head")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--head-lr", type=float, default=2e-3)
    ap.add_argument("--head-hidden", type=int, default=64)
    ap.add_argument("--detail-channels", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=1, help="head training seeds (mean +- std reported)")
    ap.add_argument("--window", type=int, default=256, help="LEVIR prediction window")
    ap.add_argument("--oscd-window", type=int, default=128, help="OSCD prediction window (10 m px)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-random", action="store_true", help="skip the random-init control")
    ap.add_argument("--workdir", default="/tmp/dinov3geo-change-quality")
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="smoke run (numbers mean nothing)")
    args = ap.parse_args(argv)
    if args.quick:
        args.iters, args.embed_dim, args.depth, args.batch = 20, 64, 2, 8
        args.crops, args.epochs = 32, 2
    import torch

    from dinov3geo.models import load_backbone
    from dinov3geo.tasks.change.datasets import load_levir, load_oscd_city

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t_pre = 0.0
    if args.backbone:
        ssl_path = Path(args.backbone)
    else:
        ssl_path, t_pre = pretrain_backbone(args, work)
        print(f"pretraining: {args.iters} iterations, {t_pre:.0f} s -> {ssl_path}", flush=True)
    ssl_bb = load_backbone(ssl_path)
    if int(ssl_bb.patch_embed.proj.in_channels) != 3:
        raise SystemExit(f"--backbone {ssl_path} must take 3 (RGB) bands, it takes "
                         f"{ssl_bb.patch_embed.proj.in_channels}")
    args.n_layers = min(4, len(ssl_bb.blocks))
    backbones = {"SSL": ssl_path}
    if not args.no_random:
        backbones["random init"] = random_backbone(args, ssl_bb, work)

    oscd_test_all = [load_oscd_city(OSCD / "bercy")]
    oscd_test_rgb = [load_oscd_city(OSCD / "bercy", bands=RGB)]
    levir_test = load_levir(LEVIR, LEVIR_TEST)
    rows: list[list[Any]] = []
    results: dict[str, Any] = {"oscd": {}, "levir": {}}

    def add(dataset: str, key: str, r: dict[str, Any]) -> None:
        results[dataset][key] = r
        rows.append([dataset, key, r["precision"], r["recall"], r["f1"], r.get("f1_std"), r["iou"], r["oa"],
                     r["oracle_f1"]])

    for dataset, tests, tests_rgb in (("oscd", oscd_test_all, oscd_test_rgb), ("levir", levir_test, levir_test)):
        ups = args.oscd_upscale if dataset == "oscd" else 1
        win = args.oscd_window if dataset == "oscd" else args.window
        add(dataset, "CVA + Otsu (all bands)", classic(tests, None, "cva"))
        if dataset == "oscd":
            add(dataset, "CVA + Otsu (RGB)", classic(tests_rgb, RGB, "cva rgb"))
        for tag, path in backbones.items():
            bb = load_backbone(path)
            t = time.perf_counter()
            add(dataset, f"zero-shot + Otsu ({tag})",
                zero_shot(bb, tests_rgb, ups, win, None if dataset == "oscd" else 1 / 255, args.n_layers))
            print(f"{dataset} zero-shot {tag}: {time.perf_counter() - t:.0f} s", flush=True)
            runs, infos = [], []
            for seed in range(args.seeds):
                r, info = trained_head(head_config(args, work, path, dataset, seed, tag.replace(" ", "_")), tests, win)
                runs.append(r)
                infos.append(info)
                print(f"{dataset} head {tag} seed {seed}: F1 {r['f1']:.3f} (val F1 {info['val']['f1']}, "
                      f"loss {info['loss_first']:.3f} -> {info['loss_last']:.3f}, {info['train_seconds']:.0f} s)",
                      flush=True)
            agg = {k: float(np.mean([r[k] for r in runs])) for k in ("precision", "recall", "f1", "iou", "oa",
                                                                      "oracle_f1", "kappa")}
            agg["f1_std"] = float(np.std([r["f1"] for r in runs], ddof=1)) if len(runs) > 1 else None
            agg["runs"], agg["train"] = runs, infos
            add(dataset, f"trained head ({tag})", agg)

    total = time.perf_counter() - t0
    headers = ["data", "method", "precision", "recall", "F1", "F1 std", "IoU", "OA", "oracle F1"]
    table = print_table(rows, headers, title=f"## Change quality (test: OSCD bercy, LEVIR test_*; head seeds "
                                             f"{args.seeds}; pretrain {args.iters} it)")
    cva = {d: results[d]["CVA + Otsu (all bands)"]["f1"] for d in ("oscd", "levir")}
    head = {d: results[d]["trained head (SSL)"]["f1"] for d in ("oscd", "levir")}
    verdict = {d: {"head_f1": head[d], "cva_f1": cva[d], "head_minus_cva_f1": head[d] - cva[d],
                   "head_beats_cva": head[d] > cva[d]} for d in ("oscd", "levir")}
    print(f"\nverdict (trained head with the SSL backbone vs CVA on all bands): {verdict}")
    print(f"runtime: pretraining {t_pre:.0f} s, total {total:.0f} s")
    if args.json:
        write_json(args.json, {"args": vars(args), "results": results, "verdict": verdict, "table": table,
                               "seconds": {"pretrain": t_pre, "total": total}, "environment": environment()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
