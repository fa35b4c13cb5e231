"""Forward throughput of the dinov3geo DINOv3 backbone vs timm's Eva port on the same config.

Both models get the same (random) weights, run in eval mode under ``torch.inference_mode`` with the same
thread count, in fp32 and under bf16 autocast. Timings of the two models are interleaved (one repeat of each
in turn) and the median (or, with ``--best``, the fastest) images/s is reported, which keeps the ratio fair on a shared machine.

Example::

    .venv/bin/python benchmarks/backbone.py --arch vits16 --sizes 224 512 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from dinov3geo.models import TIMM_NAMES, build_backbone


def _timm_model(arch: str, model: torch.nn.Module) -> torch.nn.Module:
    import timm
    from timm.models.eva import checkpoint_filter_fn

    name = TIMM_NAMES.get(arch)
    if name is None:
        raise SystemExit(f"timm has no model for {arch!r}")
    eva = timm.create_model(name, pretrained=False, global_pool="token", num_classes=0, dynamic_img_size=True)
    eva.load_state_dict(checkpoint_filter_fn(dict(model.state_dict()), eva), strict=True)
    return eva.eval()


def _run(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> None:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        model(x)


def bench(
    models: dict[str, torch.nn.Module],
    x: torch.Tensor,
    bf16: bool,
    warmup: int,
    repeats: int,
    best: bool = False,
) -> dict[str, float]:
    """Images/s of each model (median over ``repeats`` interleaved runs, or the best run with ``best``)."""
    for _ in range(warmup):
        for m in models.values():
            _run(m, x, bf16)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            _run(m, x, bf16)
            times[name].append(time.perf_counter() - t0)
    stat = min if best else statistics.median
    return {k: x.shape[0] / stat(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vits16", help="dinov3geo arch name (default: vits16)")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 512], help="square input sizes in pixels")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--best", action="store_true", help="report the fastest run instead of the median")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = build_backbone(args.arch).eval()
    models = {"dinov3geo": ours, "timm": _timm_model(args.arch, ours)}

    print(f"arch={args.arch} batch={args.batch} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'size':>5} {'dtype':>5} {'dinov3geo img/s':>16} {'timm img/s':>11} {'ratio':>6}")
    for size in args.sizes:
        x = torch.randn(args.batch, 3, size, size)
        for dtype in args.dtypes:
            r = bench(models, x, dtype == "bf16", args.warmup, args.repeats, args.best)
            ratio = r["dinov3geo"] / r["timm"]
            print(
                f"{size:>5} {dtype:>5} {r['dinov3geo']:>16.2f} {r['timm']:>11.2f} {ratio:>6.3f}", flush=True
            )


if __name__ == "__main__":
    main()
