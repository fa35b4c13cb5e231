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

The backbone is ``--backbone`` (a file) or a random-init control (``random:<arch>``, official init).
``--target-res`` reads the scene on a finer grid (bilinear) for the heads and the forest alike. Prints
per-seed and pooled (confusion matrices summed over the seeds) macro-F1 / OA; ``--json`` writes every number.
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dinov3geo.tasks.landcover.metrics import classification_metrics
    from dinov3geo.tasks.landcover.train import train_landcover

    rows: list[dict[str, Any]] = []
    pooled: dict[str, np.ndarray] = {}
    names: list[str] = []
    f = 30.0 / args.target_res if args.target_res else 1.0  # the same 1.5 km blocks and 150 m buffer at any grid
    with tempfile.TemporaryDirectory(prefix="dinov3geo-lc-bench-") as work:
        for seed in args.seeds:
            for i, cname in enumerate(args.configs):
                cfg = {
                    "data": {"image": str(DATA / "LE70220491999322EDC01_stack.gtif"),
                             "labels": str(DATA / "training_data.shp"), "bands": [1, 2, 3, 4, 5, 6],
                             "band_names": ["blue", "green", "red", "nir", "swir16", "swir22"],
                             "target_res": args.target_res},
                    "split": {"block": round(50 * f), "buffer": round(5 * f), "seed": seed,
                              "fractions": {"train": 0.6, "val": 0.2, "test": 0.2}},
                    "model": {"backbone": args.backbone, **CONFIGS[cname]},
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
            "backbone": args.backbone, "epochs": args.epochs, "seeds": args.seeds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="random:vits16", help="backbone file or random:<arch> (default random:vits16)")
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
    print(f"| method ({res['backbone']}) | macro-F1 per seed (mean) | OA per seed (mean) | pooled macro-F1 | pooled OA |")
    print("|---|---|---|---|---|")
    for mth in methods:
        rs = [r for r in res["rows"] if r["method"] == mth]
        f1 = [r["macro_f1"] for r in rs if r["macro_f1"] is not None]
        oa = [r["oa"] for r in rs if r["oa"] is not None]
        pl = res["pooled"][mth]
        print(f"| {mth} | {', '.join(f'{v:.2f}' for v in f1)} ({np.mean(f1):.3f}) | "
              f"{', '.join(f'{v:.2f}' for v in oa)} ({np.mean(oa):.3f}) | {pl['macro_f1']:.3f} | {pl['oa']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
