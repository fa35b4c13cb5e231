"""``dinov3geo pretrain``: run a DINOv3 pretraining stage from a YAML config."""

from __future__ import annotations

import argparse

import yaml


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="DINOv3 self-supervised pretraining on a tile store (Lightning; CPU, GPU, multi-node)",
        description="Run a pretraining stage. The config is a YAML file (see pipelines/configs/pretrain_satellite.yaml, "
        "every key documented; unknown keys are errors). Multi-GPU / multi-node: set train.devices, "
        "train.num_nodes and train.strategy and launch with torchrun or SLURM.",
    )
    p.add_argument("config", help="YAML config")
    p.add_argument("--stage", default=None,
                   help="stage to run when the config has several: pretrain, gram, highres, distill, or "
                   "'all' (every stage in order, each starting from the previous one); default: the first "
                   "stage, or the whole file when it has no stage sections")
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoints/last.ckpt")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.iterations=100 (repeatable)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many iterations")
    p.set_defaults(func=run)




def run(args: argparse.Namespace) -> int:
    from dinov3geo.ssl.config import STAGES, load_config
    from dinov3geo.ssl.train import pretrain, run_stages

    if args.stage == "all":
        results = run_stages(args.config, overrides=args.overrides)
        if not args.quiet:
            for name, r in results.items():
                if r.is_global_zero:
                    print(f"stage {name}: {r.iterations} iterations -> {r.backbone_meta}")
        return 0

    with open(args.config) as f:
        raw = yaml.safe_load(f) or {}
    section = args.stage
    if section is None and any(k in raw for k in STAGES):
        section = next(k for k in STAGES if k in raw)
    cfg = load_config(args.config, overrides=args.overrides, section=section)
    if args.quiet:
        cfg.train.progress_bar = False
    res = pretrain(cfg, resume=args.resume, stage=section or "pretrain", max_steps=args.max_steps)
    if res.is_global_zero and not args.quiet:
        print(f"stage {section or 'pretrain'}: {res.iterations} iterations")
        print(f"  checkpoint: {res.checkpoint}")
        print(f"  backbone (Meta format + metadata): {res.backbone_meta}")
        print(f"  backbone (dinov3geo format): {res.backbone}")
    return 0
