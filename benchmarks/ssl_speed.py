"""Seconds per SSL iteration of the dinov3geo engine vs a bare-loop compute floor measured in the same run.

* **Floor**: a bare eager loop with timm's ``vit_small_patch16_dinov3_qkvb`` (random weights): student
  forward + backward on all crops (the global crops and the local crops as two forwards), teacher
  (a frozen copy) forward on the global crops, DINO and iBOT heads of the engine's size on the student and
  the teacher (DINO head on every CLS token, iBOT head on the masked global patch tokens), a plain loss
  (cross-entropy of the student's head outputs against the teacher's softmax), AdamW step. Synthetic
  crops of the same sizes, no data loading.
* **Engine**: ``dinov3geo.ssl.train.pretrain`` (Lightning ``SSLModule``: multi-crop data from a tile store,
  DINO + iBOT + KoLeo, Sinkhorn-Knopp, clipping, EMA) with ``vits16``, the same crops and heads,
  ``data.num_workers`` workers, on a tile store ingested from the NEON BART RGB image; s/iteration from the
  per-step ``imgs_per_s`` of the logs (``batch / imgs_per_s``; warm-up steps dropped) and the mean
  ``data_wait_s`` (time between the end of one step and the start of the next: waiting for the loader).

Precisions: ``32-true`` (fp32), ``bf16-mixed`` (bf16 autocast) and ``bf16-params`` (the official recipe's bf16
parameter copies of fp32 master weights, :mod:`dinov3geo.ssl.precision`); the floor runs under bf16 autocast for
both bf16 modes. Goal: engine / floor <= 1.0, judged against the **fair floor**.

The engine keeps freed memory in the process between steps (``train.keep_freed_memory``, glibc ``mallopt``),
so the fair floor runs with the same allocator setting (``floor_kept``): that ratio is the headline and the
goal. The floor without it (the plain bare loop, what a user would write) is reported for information only.
The bf16 precisions run by default only where the CPU runs bf16 natively (AVX-512 BF16 / AMX; emulated bf16 is
4-5x slower than fp32 on AVX2-only CPUs).
Floor and engine run ``--repeats`` times each, interleaved, every run in a fresh process (no allocator or
cache state carried from one to the other); the best median of each is used (other processes on a shared
machine only ever add time) and the median over repeats is reported too.
``--profile`` profiles engine steps after the warm-up (torch.profiler, top ops by self CPU time).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import child_main, default_amp, environment, print_table, run_child, write_json  # noqa: E402

NEON_RGB = ROOT.parent / "shared/data/aerial_rgb_chm/neon_bart_2019/2019_BART_5_320000_4881000_image_crop.tif"
LOCAL_DATA = ROOT / "data"


def _head(in_dim: int, args: argparse.Namespace) -> Any:
    from dinov3geo.ssl.heads import DINOHead

    return DINOHead(in_dim=in_dim, out_dim=args.prototypes, hidden_dim=args.hidden, bottleneck_dim=args.bottleneck,
                    nlayers=3)


def floor_loop(args: argparse.Namespace, bf16: bool) -> dict[str, Any]:
    """Bare timm loop (see module docstring); returns s/iteration over the timed iterations."""
    import timm
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    bb = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=0,
                           img_size=args.global_size, dynamic_img_size=True)
    student = torch.nn.ModuleDict({"backbone": bb, "dino": _head(bb.embed_dim, args),
                                   "ibot": _head(bb.embed_dim, args)})
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    B, g, lc = args.batch, args.global_size, args.local_size
    gl = torch.randn(2 * B, 3, g, g)
    lo = torch.randn(args.local_number * B, 3, lc, lc)
    npre = bb.num_prefix_tokens
    n_patch = (g // 16) ** 2
    n_masked = max(1, int(0.15 * 2 * B * n_patch))  # about the engine's masked share (half the crops, 10-50 %)
    idx = torch.randperm(2 * B * n_patch)[:n_masked]
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else torch.autograd.profiler.record_function
    times = []
    for it in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        with ctx() if bf16 else ctx("floor_step"):
            with torch.no_grad():
                tg = teacher["backbone"].forward_features(gl)
                t_cls = F.softmax(teacher["dino"](tg[:, 0]).float() / 0.07, -1)
                t_ib = F.softmax(teacher["ibot"](tg[:, npre:].flatten(0, 1)[idx]).float() / 0.07, -1)
            sg = student["backbone"].forward_features(gl)
            sl = student["backbone"].forward_features(lo)
            s_cls = student["dino"](torch.cat([sg[:, 0], sl[:, 0]])).float() / 0.1
            s_ib = student["ibot"](sg[:, npre:].flatten(0, 1)[idx]).float() / 0.1
            tgt = t_cls.repeat(1 + args.local_number // 2, 1)[: s_cls.shape[0]]
            loss = -(tgt * F.log_softmax(s_cls, -1)).sum(-1).mean() - (t_ib * F.log_softmax(s_ib, -1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if it >= args.warmup:
            times.append(dt)
    return {"s_per_it": statistics.median(times), "s_per_it_mean": statistics.fmean(times), "times": times}


def make_store(work: Path, tile: int) -> Path:
    from dinov3geo.ingest import ingest

    store = work / "tiles.zarr"
    if not store.exists():
        src = NEON_RGB if NEON_RGB.exists() else next(LOCAL_DATA.rglob("*image_crop*.tif"))
        ingest([str(src)], store, tile_size=tile, progress=False)
    return store


def engine_cfg(args: argparse.Namespace, store: Path, out: Path, precision: str, iters: int) -> Any:
    from dinov3geo.ssl.config import load_config

    head = {"head_n_prototypes": args.prototypes, "head_hidden_dim": args.hidden,
            "head_bottleneck_dim": args.bottleneck}
    return load_config({
        "data": {"store": str(store), "batch_size": args.batch, "num_workers": args.workers},
        "student": {"arch": "vits16"},
        "crops": {"global_crops_size": args.global_size, "local_crops_size": args.local_size,
                  "local_crops_number": args.local_number},
        "dino": dict(head), "ibot": dict(head),
        "optim": {"iterations": iters},
        "train": {"output_dir": str(out), "precision": precision, "checkpoint_every": 10**9, "log_every": 1,
                  "health_every": 0, "progress_bar": False},
    })


def engine_run(args: argparse.Namespace, store: Path, work: Path, precision: str) -> dict[str, Any]:
    from dinov3geo.ssl.train import pretrain, stage_metrics

    out = work / f"engine_{precision}"
    shutil.rmtree(out, ignore_errors=True)
    n = args.warmup + args.iters
    t0 = time.perf_counter()
    pretrain(engine_cfg(args, store, out, precision, n))
    wall = time.perf_counter() - t0
    rows = [r for r in stage_metrics(out) if "imgs_per_s" in r]
    timed = [r for r in rows if r["step"] >= args.warmup]
    times = [args.batch / r["imgs_per_s"] for r in timed]
    waits = [r["data_wait_s"] for r in timed]
    shutil.rmtree(out, ignore_errors=True)
    return {"s_per_it": statistics.median(times), "s_per_it_mean": statistics.fmean(times), "times": times,
            "data_wait_s_mean": statistics.fmean(waits), "data_wait_s_max": max(waits),
            "wall_s_incl_setup_and_export": wall}


def profile_engine(args: argparse.Namespace, store: Path, work: Path, precision: str) -> str:
    import torch

    from dinov3geo.ssl import meta_arch
    from dinov3geo.ssl.train import pretrain

    out = work / "engine_profile"
    shutil.rmtree(out, ignore_errors=True)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    calls = {"n": 0}
    forward = meta_arch.SSLMetaArch.forward_losses

    def counted(self: Any, *a: Any, **k: Any) -> Any:  # start profiling at the first step after the warm-up
        calls["n"] += 1
        if calls["n"] == args.warmup + 1:
            prof.__enter__()
        return forward(self, *a, **k)

    meta_arch.SSLMetaArch.forward_losses = counted
    try:
        pretrain(engine_cfg(args, store, out, precision, args.warmup + 3))
    finally:
        meta_arch.SSLMetaArch.forward_losses = forward
        prof.__exit__(None, None, None)
    shutil.rmtree(out, ignore_errors=True)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import logging

    import torch

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    args = argparse.Namespace(**spec["args"])
    torch.set_num_threads(args.threads)
    bf16 = spec["precision"].startswith("bf16")
    if spec["kind"] == "floor":
        return floor_loop(args, bf16)
    if spec["kind"] == "floor_kept":
        from dinov3geo.utils.memory import keep_freed_memory

        with keep_freed_memory():
            return floor_loop(args, bf16)
    return engine_run(args, Path(spec["store"]), Path(args.workdir), spec["precision"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--global-size", type=int, default=112)
    ap.add_argument("--local-size", type=int, default=48)
    ap.add_argument("--local-number", type=int, default=4)
    ap.add_argument("--prototypes", type=int, default=65536)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--bottleneck", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=8, help="timed iterations")
    ap.add_argument("--workers", type=int, default=2, help="engine data.num_workers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--precisions", nargs="+",
                    default=["32-true", "bf16-mixed", "bf16-params"] if default_amp() == "bf16" else ["32-true"],
                    help="default: the bf16 precisions only where the CPU runs bf16 natively")
    ap.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                    help="profile engine steps: when slower than the floor (auto), always or never")
    ap.add_argument("--workdir", default="/tmp/dinov3geo-ssl-speed")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved floor/engine runs per precision (best used)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main({"floor": _child, "floor_kept": _child, "engine": _child}, args.child)
        return 0
    import logging

    import torch

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    store = make_store(work, args.tile)
    results: dict[str, Any] = {}
    child_args = {k: v for k, v in vars(args).items() if k not in ("child", "json")}
    for prec in args.precisions:
        fls, fks, ens = [], [], []
        for rep in range(args.repeats):
            spec = {"args": child_args, "precision": prec, "store": str(store)}
            fls.append(run_child(Path(__file__), {**spec, "kind": "floor"}))
            print(f"[{rep + 1}/{args.repeats}] floor {prec}: {fls[-1]['s_per_it']:.3f} s/it", flush=True)
            fks.append(run_child(Path(__file__), {**spec, "kind": "floor_kept"}))
            print(f"[{rep + 1}/{args.repeats}] floor, memory kept, {prec}: {fks[-1]['s_per_it']:.3f} s/it", flush=True)
            ens.append(run_child(Path(__file__), {**spec, "kind": "engine"}))
            print(f"[{rep + 1}/{args.repeats}] engine {prec}: {ens[-1]['s_per_it']:.3f} s/it, data wait "
                  f"{ens[-1]['data_wait_s_mean']:.3f} s", flush=True)
        fl, fk, en = (min(runs, key=lambda x: x["s_per_it"]) for runs in (fls, fks, ens))
        med = statistics.median(r["s_per_it"] for r in ens) / statistics.median(r["s_per_it"] for r in fks)
        pairs = [e["s_per_it"] / f["s_per_it"] for e, f in zip(ens, fks, strict=True)]  # interleaved pairs
        results[prec] = {"floor_plain": fl, "floor": fk, "engine": en, "ratio": en["s_per_it"] / fk["s_per_it"],
                         "ratio_median_of_repeats": med, "ratio_pairs": pairs,
                         "ratio_sd_pairs": statistics.stdev(pairs) if len(pairs) > 1 else None,
                         "ratio_to_plain_floor": en["s_per_it"] / fl["s_per_it"],
                         "floor_plain_runs": fls, "floor_runs": fks, "engine_runs": ens}
    rows = [[p, r["floor"]["s_per_it"], r["engine"]["s_per_it"], r["ratio"], r["ratio_median_of_repeats"],
             f"{min(r['ratio_pairs']):.3f}-{max(r['ratio_pairs']):.3f}"
             + (f" (sd {r['ratio_sd_pairs']:.3f})" if r["ratio_sd_pairs"] is not None else ""),
             r["floor_plain"]["s_per_it"], r["ratio_to_plain_floor"], r["engine"]["data_wait_s_mean"],
             "met" if r["ratio"] <= 1.0 else "NOT met"] for p, r in results.items()]
    print_table(rows, ["precision", "fair floor s/it (memory kept)", "engine s/it", "engine / fair floor",
                       "median of repeats", "interleaved pairs (range, sd ddof=1)", "plain floor s/it (info)",
                       "engine / plain floor (info)", "data wait s/it (mean)", "goal <= 1.0 (fair floor)"],
                title=f"## SSL iteration speed (ViT-S/16, batch {args.batch}, 2x{args.global_size} + "
                      f"{args.local_number}x{args.local_size} crops, {args.prototypes} prototypes; medians of "
                      f"{args.iters} after {args.warmup} warm-up; best of {args.repeats} interleaved runs)")
    prof_txt = None
    slow = [p for p, r in results.items() if r["ratio"] > 1.0]  # against the fair floor
    if args.profile == "always" or (args.profile == "auto" and slow):
        prec = slow[-1] if slow else args.precisions[-1]
        prof_txt = profile_engine(args, store, work, prec)
        print(f"\n## engine profile ({prec}, 3 steps after {args.warmup} warm-up steps)\n{prof_txt}")
    total = time.perf_counter() - t_start
    print(f"runtime {total:.0f} s")
    if args.json:
        write_json(args.json, {"args": vars(args), "environment": environment(), "results": results,
                               "profile": prof_txt, "runtime_s": total})
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
