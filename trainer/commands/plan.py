"""`rectrain plan`: dry-run the sharding planner for any world size and device, no training."""

from __future__ import annotations

import json

from trainer.commands.common import add_config_args
from trainer.config import load_config


def add_parser(sub) -> None:
    plan = sub.add_parser("plan", help="dry-run the sharding planner")
    add_config_args(plan)
    plan.add_argument("--world-size", type=int, required=True)
    plan.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    plan.add_argument("--json", action="store_true")


def run(args) -> int:
    from trainer.build import build_unsharded_model
    from trainer.sharding import dry_run, format_plan

    cfg = load_config(args.config, args.overrides)
    model, _ = build_unsharded_model(cfg)
    result = dry_run(cfg, model, args.world_size, args.device)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "plan"}, default=str))
    else:
        print(format_plan(result))
    return 0
