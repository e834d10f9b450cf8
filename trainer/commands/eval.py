"""`rectrain eval`: evaluate a checkpoint at any world size."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.commands.common import add_config_args
from trainer.config import ConfigError, load_config


def add_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint at any world size")
    add_config_args(ev)
    ev.add_argument("--checkpoint", required=True, help="a step_<N> directory or a checkpoints directory (latest)")
    ev.add_argument("--data", default=None, help="eval data (default: data.eval_path)")
    ev.add_argument("--out", default=None, help="JSON file to write (default: <run_dir>/eval/<checkpoint>.json)")
    ev.add_argument("--quantize", default=None, metavar="int8|int4|fp16",
                    help="also evaluate with the embedding tables quantized row-wise after training (one process; "
                         "several modes comma-separated): every metric next to fp32's, and the tables' bytes")


def _evaluate_checkpoint(cfg, ckpt: Path, data: str, out: str | None) -> None:
    import torch.distributed as dist

    from trainer.build import build_evaluator, build_sharded_model, check_checkpoint_config, load_model_weights
    from trainer.distributed import init_distributed
    from trainer.logger import setup_console

    ctx = init_distributed(cfg.train.device)
    setup_console(ctx.rank)
    check_checkpoint_config(cfg, ckpt)
    model, rec_model, _, schema = build_sharded_model(cfg, ctx)
    load_model_weights(model, ckpt)
    metrics = build_evaluator(cfg, rec_model, schema, ctx, data)(model)
    result = {**metrics, "checkpoint": str(ckpt), "data": data, "world_size": ctx.world_size}
    if ctx.is_main:
        path = Path(out) if out else Path(cfg.train.run_dir) / "eval" / f"{ckpt.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(result)
        path.write_text(line + "\n")
        print(line)
    dist.barrier()


def _quantized(cfg, ckpt: Path, data: str, out: str | None, modes: list[str]) -> None:
    from trainer.quant_eval import quantized_eval, report_lines

    result = quantized_eval(cfg, ckpt, data, modes)
    result = {**result, "checkpoint": str(ckpt), "data": data, "world_size": 1, "quantize": modes}
    path = Path(out) if out else Path(cfg.train.run_dir) / "eval" / f"{ckpt.name}-{'-'.join(modes)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(result)
    path.write_text(line + "\n")
    for text in report_lines(result, modes):
        print(text)
    print(line)


def run(args) -> int:
    from trainer.checkpoint import resolve_checkpoint
    from trainer.distributed import shutdown

    cfg = load_config(args.config, args.overrides)
    data = args.data or cfg.data.eval_path
    if not data:
        raise ConfigError("no eval data: pass --data PATH or set data.eval_path")
    if args.quantize is not None:
        from trainer.quant_eval import check_ranking_model, parse_modes

        modes = parse_modes(args.quantize)  # a bad mode or model is an error before the checkpoint is read
        check_ranking_model(cfg, "rectrain eval --quantize")
        _quantized(cfg, resolve_checkpoint(args.checkpoint), data, args.out, modes)
        return 0
    ckpt = resolve_checkpoint(args.checkpoint)
    try:
        _evaluate_checkpoint(cfg, ckpt, data, args.out)  # the sharded model is unreferenced after this
    finally:
        shutdown()
    return 0
