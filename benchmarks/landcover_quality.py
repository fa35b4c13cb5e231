"""Land cover from frozen features vs the per-pixel random forest, on held-out polygons of the real Chiapas scene.

Data: the Landsat 7 ETM+ scene of 1999-11-18 (``../shared/data/landcover/ogt_landsat7_chiapas_1999_2002``,
bands 1-5 and 7: blue, green, red, nir, swir16, swir22, surface reflectance x 10000, 250 x 250 px at 30 m) and
its 30 hand-drawn training polygons (5 classes, 718 labelled pixels: 1.1 % of the scene).

For each of ``--seeds`` spatial splits (50 px = 1.5 km blocks, 60/20/20 % train/val/test, 5 px buffer; each
polygon goes whole to one split, :func:`dinov3geo.tasks.landcover.labels.split_by_polygon`):

* every head config of ``--configs`` is trained by :func:`dinov3geo.tasks.landcover.train.train_landcover`
  (frozen backbone, cached features, 8 flips/rotations, class-weighted cross-entropy, model selection on val
  macro-F1), maps the scene through the inference engine and is scored on the test polygons;
* the random forest (200 trees, bands + NDVI/NDWI/NBR/NDMI, balanced class weights) is trained on the same
  train pixels and scored on the same test pixels.

The backbone is ``--backbone`` (a file) or a random-init control: ``random:<arch>`` (a registered name,
official init) or ``random:<file>`` (the architecture of that backbone file, e.g. one pretrained with
``benchmarks/configs/landsat_ssl.yaml``, official init with ``--init-seed``: the matched control of a custom
arch). ``--norm image`` feeds the backbone the image's own per-band statistics (mean/std over its valid pixels)
instead of the mean/std recorded in the backbone file: the per-scene standardisation that the Landsat SSL recipe
pretrains with (random controls have no recorded statistics, so they always get the image's).
``--target-res`` reads the scene on a finer grid (bilinear) for the heads and the forest alike. Prints
per-seed and pooled (confusion matrices summed over the seeds) macro-F1 / OA / kappa, and the mean and
standard deviation (ddof=1) over the seeds; ``--json`` writes every number.
Test splits are small (2-8 polygons): expect a large spread between seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "landcover" / "ogt_landsat7_chiapas_1999_2002"
CONFIGS = {
    "linear": {"head": "linear"},
    "dense": {"head": "dense"},
    "dense+detail": {"head": "dense", "image_detail": True},
}


def prepare_backbone(spec: str, norm: str, work: Path, init_seed: int = 0) -> str:
    """The ``model.backbone`` value for ``train_landcover``: ``spec`` itself, or a file written in ``work``.

    ``random:<file>``: a random-init backbone (official init, torch seed ``init_seed``) of that file's
    architecture and input channels, without statistics. ``norm == "image"`` with a backbone file: a copy
    without the recorded mean/std, so that ``train_landcover`` normalises with the image's own statistics.
    """
    import dataclasses

    import torch

    from dinov3geo.models import build_backbone, load_backbone
    from dinov3geo.models.checkpoint import save_backbone

    if spec.startswith("random:"):
        src = spec.split(":", 1)[1]
        if not Path(src).is_file():
            return spec  # a registered arch name: train_landcover builds it
        cfg = load_backbone(src).config
        torch.manual_seed(init_seed)
        model = build_backbone(cfg.to_dict())
        out = work / "random_init_backbone.pt"
        save_backbone(model, out, metadata=None)
        return str(out)
    if norm != "image":
        return spec
    model = load_backbone(spec)
    meta = getattr(model, "metadata", None)
    if meta is None or (meta.mean is None and meta.std is None):
        return spec
    out = work / "backbone_image_norm.pt"
    save_backbone(model, out, metadata=dataclasses.replace(meta, mean=None, std=None))
    return str(out)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dinov3geo.tasks.landcover.metrics import classification_metrics
    from dinov3geo.tasks.landcover.train import train_landcover

    rows: list[dict[str, Any]] = []
    pooled: dict[str, np.ndarray] = {}
    names: list[str] = []
    f = 30.0 / args.target_res if args.target_res else 1.0  # the same 1.5 km blocks and 150 m buffer at any grid
    with tempfile.TemporaryDirectory(prefix="dinov3geo-lc-bench-") as work:
        backbone = prepare_backbone(args.backbone, args.norm, Path(work), args.init_seed)
        for seed in args.seeds:
            for i, cname in enumerate(args.configs):
                cfg = {
                    "data": {"image": str(DATA / "LE70220491999322EDC01_stack.gtif"),
                             "labels": str(DATA / "training_data.shp"), "bands": [1, 2, 3, 4, 5, 6],
                             "band_names": ["blue", "green", "red", "nir", "swir16", "swir22"],
                             "target_res": args.target_res},
                    "split": {"block": round(50 * f), "buffer": round(5 * f), "seed": seed,
                              "fractions": {"train": 0.6, "val": 0.2, "test": 0.2}},
                    "model": {"backbone": backbone, **CONFIGS[cname]},
                    "train": {"tile": args.tile, "stride": args.tile // 2, "epochs": args.epochs, "lr": args.lr,
                              "batch_size": 8, "device": args.device, "eval_window": 256},
                    "baseline": {"enabled": i == 0, "n_estimators": 200},
                    "out": str(Path(work) / f"s{seed}_{cname}"),
                }
                t0 = time.perf_counter()
                r = train_landcover(cfg, progress=False)
                secs = time.perf_counter() - t0
                if r.test is None:
                    print(f"seed {seed}: no test pixels", file=sys.stderr)
                    break
                names = r.test["classes"]
                for key, m in ((cname, r.test), ("random forest", r.baseline)):
                    if m is None:
                        continue
                    rows.append({"seed": seed, "method": key, "macro_f1": m["macro_f1"],
                                 "oa": m["overall_accuracy"], "kappa": m["kappa"], "n": m["n"],
                                 "seconds": round(secs, 1) if key == cname else None})
                    cm = np.asarray(m["confusion_matrix"])
                    pooled[key] = pooled.get(key, 0) + cm
                print(json.dumps(rows[-1] if r.baseline is None else rows[-2:]), file=sys.stderr, flush=True)
    summary = {k: classification_metrics(v, names) for k, v in pooled.items()}
    return {"target_res": args.target_res, "rows": rows, "pooled": {k: {"macro_f1": s["macro_f1"], "oa": s["overall_accuracy"],
                                         "kappa": s["kappa"], "n": s["n"],
                                         "per_class_f1": {c: v["f1"] for c, v in s["per_class"].items()}}
                                     for k, s in summary.items()},
            "backbone": args.backbone, "norm": args.norm, "init_seed": args.init_seed, "epochs": args.epochs,
            "seeds": args.seeds, "configs": args.configs, "tile": args.tile}


def seed_stats(values: list[float | None]) -> dict[str, float | int | None]:
    """Mean and standard deviation (ddof=1; None for a single value) of the non-None ``values``."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    return {"n": int(v.size), "mean": float(v.mean()) if v.size else None,
            "sd": float(v.std(ddof=1)) if v.size > 1 else None}


def _pm(s: dict[str, Any]) -> str:
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:.3f}" + (f" ± {s['sd']:.3f}" if s["sd"] is not None else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="random:vits16",
                   help="backbone file, random:<arch> or random:<backbone file> (that file's architecture, random "
                   "init; default random:vits16)")
    p.add_argument("--norm", choices=["backbone", "image"], default="backbone",
                   help="input normalisation: the backbone file's recorded mean/std (default; the image's own "
                   "statistics when it has none) or always the image's own per-band statistics")
    p.add_argument("--init-seed", type=int, default=0, help="torch seed of a random:<file> control's init")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--target-res", type=float, default=None,
                   help="working resolution in metres (e.g. 7.5: the 30 m scene upsampled 4x, so a 16 px patch "
                   "covers 120 m instead of 480 m); blocks and buffer keep their size on the ground")
    p.add_argument("--tile", type=int, default=128, help="training tile side in pixels")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args(argv)
    res = run(args)
    methods = list(dict.fromkeys(r["method"] for r in res["rows"]))
    print(f"| method ({res['backbone']}, norm {res['norm']}) | macro-F1 per seed | mean ± sd | OA mean ± sd | "
          "kappa mean ± sd | pooled macro-F1 | pooled OA | pooled kappa |")
    print("|---|---|---|---|---|---|---|---|")
    for mth in methods:
        rs = [r for r in res["rows"] if r["method"] == mth]
        st = {k: seed_stats([r[k] for r in rs]) for k in ("macro_f1", "oa", "kappa")}
        res.setdefault("over_seeds", {})[mth] = st
        pl = res["pooled"][mth]
        f1 = [r["macro_f1"] for r in rs if r["macro_f1"] is not None]
        print(f"| {mth} | {', '.join(f'{v:.2f}' for v in f1)} | {_pm(st['macro_f1'])} | {_pm(st['oa'])} | "
              f"{_pm(st['kappa'])} | {pl['macro_f1']:.3f} | {pl['oa']:.3f} | {pl['kappa']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
