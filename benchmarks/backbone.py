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

``--settings`` measures instead, for each ConvNeXt ``--arch``, what ``dinov3geo features`` runs per window (the
:class:`~dinov3geo.inference.BackboneFeatures` forward: normalisation, bottom/right padding to 32, the last
stage resized to the 16 px grid) in four settings: memory layout channels-last (``ConvNeXt.channels_last``, the
default) or NCHW, times fp32 or bf16 autocast. Interleaved rounds as above; reported: images/s (fastest and
median), the per-round speed-up over the default (channels-last fp32; median and range) and the largest
absolute deviation of the features from the fp32 NCHW reference (exactness: fp32 settings must agree to float
rounding; bf16 is not exact)::

    .venv/bin/python benchmarks/backbone.py --settings --arch convnext_tiny --sizes 224 512 --batch 4
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


SETTINGS: tuple[tuple[str, bool, bool], ...] = (
    ("channels-last fp32 (default)", True, False),
    ("NCHW fp32", False, False),
    ("channels-last bf16", True, True),
    ("NCHW bf16", False, True),
)


def settings_bench(arch: str, size: int, batch: int, warmup: int, repeat: int,
                   device: str = "cpu") -> tuple[list[list], list[dict]]:
    """Rows / JSON results of the ``--settings`` mode for one ConvNeXt arch and window size (on ``device``: CPU,
    or CUDA with bf16 autocast there and a synchronisation around each timed forward)."""
    from dinov3geo.inference import BackboneFeatures

    where = torch.device(device)
    sync = torch.cuda.synchronize if where.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    bb = build_backbone(arch).eval()
    if not isinstance(bb, ConvNeXt):
        raise SystemExit(f"--settings measures ConvNeXt layouts; {arch!r} is not a ConvNeXt")
    with torch.no_grad():  # real layer scales (Meta's init of 1e-6 makes every block a near-identity)
        for stage in bb.stages:
            for block in stage:
                block.gamma.uniform_(0.1, 1.0)
    bb.to(where)
    model = BackboneFeatures(bb, value_scale=1 / 255).to(where)
    x = torch.rand(batch, 3, size, size, device=where) * 255
    valid = torch.ones(batch, size, size, dtype=torch.bool, device=where)

    def run(channels_last: bool, bf16: bool) -> torch.Tensor:
        bb.channels_last = channels_last
        ctx = torch.autocast(where.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            out = model(x, valid).float()
        sync()
        return out

    ref = run(False, False)
    dev = {name: float((run(cl, bf) - ref).abs().max()) for name, cl, bf in SETTINGS}
    for _ in range(warmup):
        for _name, cl, bf in SETTINGS:
            run(cl, bf)
    times: dict[str, list[float]] = {name: [] for name, _, _ in SETTINGS}
    for _ in range(repeat):
        for name, cl, bf in SETTINGS:
            t0 = time.perf_counter()
            run(cl, bf)
            times[name].append(time.perf_counter() - t0)
    bb.channels_last = True
    base = SETTINGS[0][0]
    rows, results = [], []
    for name, cl, bf in SETTINGS:
        ratios = [b / t for b, t in zip(times[base], times[name], strict=True)]
        fast, med = batch / min(times[name]), batch / statistics.median(times[name])
        rows.append([arch, size, name, fast, med, f"{statistics.median(ratios):.3f}",
                     f"{min(ratios):.2f}-{max(ratios):.2f}", f"{dev[name]:.1e}"])
        results.append({"arch": arch, "size": size, "device": str(where), "setting": name, "channels_last": cl,
                        "bf16": bf,
                        "img_s_fastest": fast, "img_s_median": med, "speedup_vs_default": ratios,
                        "times_s": times[name], "max_abs_dev_vs_fp32_nchw": dev[name]})
    return rows, results


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
    p.add_argument("--device", default="cpu", help="--settings only: cpu or cuda")
    p.add_argument("--settings", action="store_true",
                   help="ConvNeXt feature-wrapper forward in channels-last/NCHW x fp32/bf16 instead of vs timm")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    from dinov3geo.utils.cpu import cpu_info

    cpu = cpu_info()
    print(
        f"CPU model: {cpu.get('model')}; torch.backends.cpu.get_cpu_capability(): "
        f"{torch.backends.cpu.get_cpu_capability()}; native bf16: {cpu.get('native_bf16')}",
        flush=True,
    )
    if args.settings:
        rows, results = [], []
        for arch in args.arch:
            for size in args.sizes:
                log(f"{arch} {size}px settings")
                r, res = settings_bench(arch, size, args.batch, args.warmup, args.repeat, device=args.device)
                rows += r
                results += res
        print_table(rows, ["arch", "size", "setting", "img/s (fastest)", "img/s (median)",
                           "speed-up vs default (median)", "(range)", "max |dev| vs fp32 NCHW"],
                    title=f"BackboneFeatures forward, batch={args.batch} threads={torch.get_num_threads()} "
                          f"torch={torch.__version__} ({args.repeat} interleaved rounds)")
        if args.json:
            write_json(args.json, {"args": vars(args), "environment": environment(), "results": results})
        return
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
