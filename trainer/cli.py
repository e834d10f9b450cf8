"""The `rectrain` command line (also `python -m trainer`); thin dispatch to the parts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="TOML file, e.g. configs/dlrm_synth.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.epochs=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rectrain", description="Distributed recommendation-model training on TorchRec")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="synthesize or inspect Parquet click logs")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write a Criteo-shaped synthetic click log")
    synth.add_argument("--out", required=True)
    synth.add_argument("--rows", type=int, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--files", type=int, default=1)
    synth.add_argument("--row-group-rows", type=int, default=8192)
    inspect = data_sub.add_parser("inspect", help="schema, row counts, id ranges and nulls per column")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")

    train = sub.add_parser("train", help="train (one process, or N under torchrun)")
    _add_config_args(train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint at any world size")
    _add_config_args(ev)
    ev.add_argument("--checkpoint", required=True, help="a step_<N> directory or a checkpoints directory (latest)")
    ev.add_argument("--data", default=None, help="eval data (default: data.eval_path)")
    ev.add_argument("--out", default=None, help="JSON file to write (default: <run_dir>/eval/<checkpoint>.json)")

    plan = sub.add_parser("plan", help="dry-run the sharding planner")
    _add_config_args(plan)
    plan.add_argument("--world-size", type=int, required=True)
    plan.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    plan.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo", help="synthesize data, train DLRM with torchrun, evaluate, summarize")
    demo.add_argument("--run-dir", default="runs/demo")
    demo.add_argument("--config", default=None, help="default: configs/dlrm_synth.toml")
    demo.add_argument("--nproc", type=int, default=0, help="workers (default: all GPUs, or 2 on CPU)")
    demo.add_argument("--rows", type=int, default=200_000)
    return parser


def cmd_data(args) -> int:
    if args.data_command == "synth":
        from data.synth import write_synthetic

        paths = write_synthetic(args.out, args.rows, seed=args.seed, files=args.files,
                                row_group_rows=args.row_group_rows)
        print(f"wrote {args.rows} rows to {len(paths)} file(s) under {args.out}")
        return 0
    from data.inspect import format_report, inspect_dataset

    report = inspect_dataset(args.path)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _train(cfg) -> None:
    from trainer.train import Trainer

    trainer = Trainer(cfg)
    result = trainer.fit()
    if trainer.ctx.is_main:
        print(json.dumps(result))


def cmd_train(args) -> int:
    from trainer.distributed import shutdown

    cfg = load_config(args.config, args.overrides)
    try:
        _train(cfg)  # the Trainer (and the process group it holds) is unreferenced once this returns
    finally:
        shutdown()
    return 0


def _evaluate_checkpoint(cfg, ckpt: Path, data: str, out: str | None) -> None:
    import torch.distributed as dist

    from trainer.build import build_sharded_model, build_stream, load_model_weights
    from trainer.distributed import init_distributed
    from trainer.evaluate import evaluate
    from trainer.logger import setup_console

    ctx = init_distributed(cfg.train.device)
    setup_console(ctx.rank)
    model, rec_model, _, schema = build_sharded_model(cfg, ctx)
    load_model_weights(model, ckpt)
    stream = build_stream(cfg, schema, ctx, data, train=False)
    metrics = evaluate(model, rec_model.tasks, stream, ctx.device, cfg.eval.max_batches)
    result = {**metrics, "checkpoint": str(ckpt), "data": data, "world_size": ctx.world_size}
    if ctx.is_main:
        path = Path(out) if out else Path(cfg.train.run_dir) / "eval" / f"{ckpt.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(result)
        path.write_text(line + "\n")
        print(line)
    dist.barrier()


def cmd_eval(args) -> int:
    from trainer.checkpoint import resolve_checkpoint
    from trainer.distributed import shutdown

    cfg = load_config(args.config, args.overrides)
    data = args.data or cfg.data.eval_path
    if not data:
        raise ConfigError("no eval data: pass --data PATH or set data.eval_path")
    ckpt = resolve_checkpoint(args.checkpoint)
    try:
        _evaluate_checkpoint(cfg, ckpt, data, args.out)  # the sharded model is unreferenced after this
    finally:
        shutdown()
    return 0


def cmd_plan(args) -> int:
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


def cmd_demo(args) -> int:
    from trainer.demo import run_demo

    return run_demo(args.run_dir, args.config, args.nproc, args.rows)


def main(argv: list[str] | None = None) -> int:
    import os

    from trainer.logger import setup_console

    args = build_parser().parse_args(argv)
    setup_console(int(os.environ.get("RANK", "0")))
    handlers = {"data": cmd_data, "train": cmd_train, "eval": cmd_eval, "plan": cmd_plan, "demo": cmd_demo}
    from data.schema import DataError

    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"rectrain: error: {e}", file=sys.stderr)
        return 2
