"""Forward throughput of the dinov3geo DINOv3 backbones vs timm's ports of the same models.

ViTs are compared with timm's Eva port (``vit_*_patch16_dinov3*``), ConvNeXts (``convnext_tiny`` ...) with
timm's ``ConvNeXt`` (``convnext_*``, the models of its ``.dinov3_lvd1689m`` tags). Both models get the same
(random) weights (timm's through its own ``checkpoint_filter_fn``) and run in eval mode under
``torch.inference_mode`` with the same thread count, in fp32 and under bf16 autocast, on batches of
``--batch`` square images; ``forward(x)`` of each (the pooled / class token; dinov3geo's ConvNeXt also
normalises the patch tokens, as Meta's does). Timings of the two models are interleaved (one run of each in
turn, after ``--warmup`` runs of each) so that load from other jobs hits both alike; the fastest of
``--repeat`` runs is kept (``--median`` reports the median instead). The table gives images/s, the ratio
dinov3geo / timm of those (goal: >= 1.0), and the per-round ratios (timm time / dinov3geo time of the same
round): their median and range show the spread on a busy machine. Several ``--arch`` run in one process.

Example::

    .venv/bin/python benchmarks/backbone.py --arch vits16 convnext_tiny --sizes 224 512 --threads 2 [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from _common import environment, log, print_table, write_json

from dinov3geo.models import TIMM_CONVNEXT_NAMES, TIMM_NAMES, ConvNeXt, build_backbone


def timm_model(arch: str, model: torch.nn.Module) -> torch.nn.Module:
    """timm's model for ``arch`` (CLS / average pooling, no classifier) carrying ``model``'s weights."""
    import timm

    if isinstance(model, ConvNeXt):
        from timm.models.convnext import checkpoint_filter_fn as convnext_filter

        cname = TIMM_CONVNEXT_NAMES.get(arch)
        if cname is None:
            raise SystemExit(f"timm has no model for {arch!r}")
        cnx = timm.create_model(cname, pretrained=False, num_classes=0)
        cnx.load_state_dict(convnext_filter(dict(model.state_dict()), cnx), strict=True)
        return cnx.eval()
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
    models: dict[str, torch.nn.Module], x: torch.Tensor, bf16: bool, warmup: int, repeat: int, median: bool
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Images/s of each model (the fastest of ``repeat`` interleaved runs, or their median) and all times."""
    for _ in range(warmup):
        for m in models.values():
            _run(m, x, bf16)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeat):
        for name, m in models.items():
            t0 = time.perf_counter()
            _run(m, x, bf16)
            times[name].append(time.perf_counter() - t0)
    stat = statistics.median if median else min
    return {k: x.shape[0] / stat(v) for k, v in times.items()}, times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--arch",
        nargs="+",
        default=["vits16", "convnext_tiny"],
        help="dinov3geo arch names with a timm port, run one after the other (default: vits16 convnext_tiny)",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 512], help="square input sizes in pixels")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7, help="timed runs per model and setting")
    p.add_argument("--median", action="store_true", help="report the median run instead of the fastest")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    from dinov3geo.utils.cpu import cpu_info

    cpu = cpu_info()
    print(
        f"CPU model: {cpu.get('model')}; torch.backends.cpu.get_cpu_capability(): "
        f"{torch.backends.cpu.get_cpu_capability()}; native bf16: {cpu.get('native_bf16')}",
        flush=True,
    )
    rows, results = [], []
    for arch in args.arch:
        torch.manual_seed(0)
        ours = build_backbone(arch).eval()
        models = {"dinov3geo": ours, "timm": timm_model(arch, ours)}
        for size in args.sizes:
            x = torch.randn(args.batch, 3, size, size)
            for dtype in args.dtypes:
                log(f"{arch} {size}px {dtype}")
                r, times = bench(models, x, dtype == "bf16", args.warmup, args.repeat, args.median)
                ratio = r["dinov3geo"] / r["timm"]
                rounds = [t / o for t, o in zip(times["timm"], times["dinov3geo"], strict=True)]
                spread = f"{min(rounds):.2f}-{max(rounds):.2f}"
                rows.append(
                    [arch, size, dtype, r["dinov3geo"], r["timm"], f"{ratio:.3f}",
                     f"{statistics.median(rounds):.3f}", spread]
                )
                results.append(
                    {
                        "arch": arch,
                        "size": size,
                        "dtype": dtype,
                        "dinov3geo_img_s": r["dinov3geo"],
                        "timm_img_s": r["timm"],
                        "ratio": ratio,
                        "round_ratios": rounds,
                        "dinov3geo_times_s": times["dinov3geo"],
                        "timm_times_s": times["timm"],
                    }
                )
    title = (
        f"archs={' '.join(args.arch)} batch={args.batch} threads={torch.get_num_threads()} "
        f"torch={torch.__version__} cpu capability={torch.backends.cpu.get_cpu_capability()} "
        f"({'median' if args.median else 'fastest'} of {args.repeat}; goal ratio >= 1.0)"
    )
    print_table(
        rows,
        ["arch", "size", "dtype", "dinov3geo img/s", "timm img/s", "ratio", "round ratio (median)",
         "round ratio (range)"],
        title=title,
    )
    if args.json:
        write_json(args.json, {"args": vars(args), "environment": environment(), "results": results})


if __name__ == "__main__":
    main()
