"""`rectrain demo`: the whole thing, end to end, on synthetic data."""

from __future__ import annotations


def add_parser(sub) -> None:
    demo = sub.add_parser("demo", help="synthesize data, train DLRM with torchrun, evaluate, summarize")
    demo.add_argument("--run-dir", default="runs/demo")
    demo.add_argument("--config", default=None, help="default: configs/dlrm_synth.toml")
    demo.add_argument("--nproc", type=int, default=0, help="workers (default: all GPUs, or 2 on CPU)")
    demo.add_argument("--rows", type=int, default=200_000)


def run(args) -> int:
    from trainer.demo import run_demo

    return run_demo(args.run_dir, args.config, args.nproc, args.rows)
