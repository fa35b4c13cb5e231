"""``dinov3geo pretrain``: run a DINOv3 pretraining stage from a YAML config."""

from __future__ import annotations

import argparse

from dinov3geo.cli._types import integer


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
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue from <output_dir>/checkpoints/last.ckpt (default: yes when it exists and was "
                   "written with the same config, so re-running an interrupted command resumes it; --no-resume "
                   "starts afresh)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.iterations=100 (repeatable)")
    p.add_argument("--max-steps", type=integer(1), default=None, help="stop after this many iterations (>= 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinov3geo.utils.config import ConfigError, load_yaml

    raw = load_yaml(args.config, "pretraining config") or {}  # errors name the file (and the line), at once
    if not isinstance(raw, dict):
        raise ConfigError(f"{args.config}: a pretraining config must be a mapping of sections, got "
                          f"{type(raw).__name__}")
    from dinov3geo.ssl.config import STAGES, load_config
    from dinov3geo.ssl.train import pretrain, run_stages

    if args.stage == "all":
        results = run_stages(args.config, overrides=args.overrides)
        if not args.quiet:
            for name, r in results.items():
                if r.is_global_zero:
                    print(f"stage {name}: {r.iterations} iterations -> {r.backbone_meta}")
        return 0

    section = args.stage
    if section is None and any(k in raw for k in STAGES):
        section = next(k for k in STAGES if k in raw)
    cfg = load_config(args.config, overrides=args.overrides, section=section)
    if args.quiet:
        cfg.train.progress_bar = False
    resume = args.resume if args.resume is not None else _resumable(cfg)
    res = pretrain(cfg, resume=resume, stage=section or "pretrain", max_steps=args.max_steps)
    if res.is_global_zero and not args.quiet:
        print(f"stage {section or 'pretrain'}: {res.iterations} iterations")
        print(f"  checkpoint: {res.checkpoint}")
        print(f"  backbone (Meta format + metadata): {res.backbone_meta}")
        print(f"  backbone (dinov3geo format): {res.backbone}")
    return 0


def _resumable(cfg: object) -> bool:
    """Whether an earlier run of this very config left a checkpoint to continue from (the default of
    ``--resume``). A checkpoint written with another config is refused rather than silently overwritten."""
    import json
    from pathlib import Path

    from dinov3geo.cli._types import UsageError

    out = Path(cfg.train.output_dir)  # type: ignore[attr-defined]
    if not (out / "checkpoints" / "last.ckpt").is_file():
        return False
    saved_path = out / "config.json"
    now = json.loads(json.dumps(cfg.to_dict()))  # type: ignore[attr-defined]
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError):
        saved = None
    if saved == now:
        return True
    keys: list[str] = []

    def diff(a: object, b: object, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                diff(a.get(k), b.get(k), f"{prefix}{k}.")
        elif a != b:
            keys.append(prefix.rstrip("."))

    if saved is not None:
        diff(saved, now, "")
    what = f"keys {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''} differ" if keys else "its config is unknown"
    raise UsageError(f"{out} holds a checkpoint of an earlier run whose config is not this one ({what}): pass "
                     "--resume to continue it anyway, --no-resume to start afresh there, or set another "
                     "train.output_dir")
