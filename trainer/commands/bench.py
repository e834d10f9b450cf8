"""`rectrain bench`: samples/s, a per-step breakdown and peak RSS of training on a config
(trainer/bench.py), optionally side by side with TorchRec's reference trainer; or, with
--data-only, the reader against raw pyarrow decode.

    rectrain bench --config configs/bench_dlrm.toml --nproc 2 --steps 20 --compare-peer

With --nproc > 1 this process launches the workers (`rectrain launch`) and prints what rank 0
wrote to a result file; with --nproc 1 it runs the bench itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer.bench import BENCH_ROW_GROUP_ROWS
from trainer.commands.common import add_config_args
from trainer.config import ConfigError, load_config
from trainer.errors import RunError

ROOT = Path(__file__).resolve().parents[2]
PEER_SCRIPT = ROOT.parent / "shared" / "bench" / "peer_dlrm.sh"
DEFAULT_ROWS = 1 << 18


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="training throughput, step breakdown and memory; or the reader (--data-only)")
    add_config_args(p)
    p.add_argument("--nproc", type=int, default=1, help="ranks (torchrun workers on this machine; default 1)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per phase (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--breakdown-steps", type=int, default=0, metavar="N",
                   help="steps of the instrumented phase (default: --steps)")
    p.add_argument("--rows", type=int, default=DEFAULT_ROWS,
                   help="rows of synthetic Parquet written to data.train_path if it is missing (default 262144)")
    p.add_argument("--row-group-rows", type=int, default=BENCH_ROW_GROUP_ROWS,
                   help=f"rows per row group of that synthetic Parquet (default {BENCH_ROW_GROUP_ROWS}, as "
                        f"`rectrain data criteo` writes; a different value rewrites the data)")
    p.add_argument("--compare-peer", action="store_true",
                   help="also run ../shared/bench/peer_dlrm.sh, alternating with ours, and print the ratio")
    p.add_argument("--rounds", type=int, default=None,
                   help="runs of each side: with --compare-peer (default 2), with --data-only (default 9)")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="write a torch.profiler trace of the breakdown steps (TensorBoard: tensorboard --logdir DIR)")
    p.add_argument("--synthetic", choices=["parquet", "device"], default="parquet",
                   help="where batches come from: the Parquet reader (default), or made on the device up front "
                        "(no reader, no host-to-device copy: the model step alone, like TorchRec's random batches)")
    p.add_argument("--rss-every", type=int, default=0, metavar="N",
                   help="sample resident memory every N throughput steps and print its slope (e.g. --steps 2000 "
                        "--rss-every 50)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads per rank (default: as set; torchrun sets 1 per rank, one process uses "
                        "every core)")
    p.add_argument("--data-only", action="store_true",
                   help="reader rows/s per core vs raw pyarrow decode, and scaling with data.num_workers")
    p.add_argument("--workers", default="", help="--data-only: DataLoader worker counts to try, e.g. 1,2 "
                                                 "(default: 1 and the core count)")
    p.add_argument("--result-file", default=None, help=__import__("argparse").SUPPRESS)


def _worker_args(args) -> list[str]:
    out = ["bench", "--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--rows", str(args.rows), "--row-group-rows", str(args.row_group_rows)]
    for o in args.overrides:
        out += ["--set", o]
    if args.profile:
        out += ["--profile", args.profile]
    out += ["--synthetic", args.synthetic, "--rss-every", str(args.rss_every), "--threads", str(args.threads),
            "--breakdown-steps", str(args.breakdown_steps)]
    return out


def _prepare(args):
    from trainer.bench import bench_num_embeddings, ensure_bench_data

    if args.steps < 1 or min(args.warmup, args.rss_every, args.threads, args.breakdown_steps) < 0:
        raise ConfigError("rectrain bench: --steps must be >= 1, and --warmup, --breakdown-steps, --rss-every and "
                          "--threads >= 0")
    if args.row_group_rows < 1:
        raise ConfigError(f"rectrain bench: --row-group-rows must be >= 1, got {args.row_group_rows}")
    cfg = load_config(args.config, args.overrides)
    if ensure_bench_data(cfg.data.train_path, args.rows, bench_num_embeddings(cfg), args.row_group_rows):
        print(f"wrote {args.rows} synthetic rows to {cfg.data.train_path}", file=sys.stderr)
    return cfg


def run_once(args) -> dict:
    """One bench run (in this process, or launched on --nproc workers); rank 0's result."""
    if args.nproc <= 1:
        return _in_process(args)
    from trainer.commands.launch import launch

    with tempfile.TemporaryDirectory(prefix="rectrain-bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        code = launch(_worker_args(args) + ["--result-file", str(result_file)], nproc=args.nproc)
        if code != 0 or not result_file.is_file():
            raise RunError(f"rectrain bench: the workers failed (exit code {code})")
        return json.loads(result_file.read_text())


def _in_process(args) -> dict | None:
    """The bench on this process's rank (the whole world with --nproc 1); rank 0's result."""
    from trainer.bench import run_worker
    from trainer.distributed import shutdown

    cfg = load_config(args.config, args.overrides)
    try:
        return run_worker(cfg, args.steps, args.warmup, args.profile, args.synthetic, args.rss_every, args.threads,
                          args.breakdown_steps)
    finally:
        shutdown()


def run_peer(python: str = sys.executable) -> str:
    """Run the reference trainer once; its stdout."""
    if not PEER_SCRIPT.is_file():
        raise RunError(f"rectrain bench --compare-peer: {PEER_SCRIPT} is missing")
    proc = subprocess.run([str(PEER_SCRIPT), python], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RunError(f"rectrain bench --compare-peer: the peer failed: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def run(args, peer=run_peer) -> int:
    from trainer.bench import compare_rounds, data_only, format_data_only, format_table

    if "LOCAL_RANK" in os.environ:  # a torchrun worker
        return _run_as_worker(args)
    cfg = _prepare(args)
    if args.data_only:
        workers = [int(w) for w in args.workers.split(",") if w.strip()] or None
        result = data_only(cfg, workers, rounds=args.rounds or 9)
        print(format_data_only(result))
        print(json.dumps(result))
        return 0
    if args.compare_peer:
        rounds = args.rounds or 2
        cmp = compare_rounds(lambda: run_once(args), peer, rounds)
        for i, (r, p) in enumerate(zip(cmp["results"], cmp["peer_samples_per_s"])):
            print(f"--- round {i + 1}: ours {r['samples_per_s']:,.0f} samples/s, peer {p:,.0f} samples/s")
            print(format_table(r))
        print(f"ratio ours/peer (medians of {rounds}): {cmp['ratio']:.3f}   (bests: {cmp['ratio_best']:.3f})")
        result = dict(cmp["results"][-1])
        result.update({k: v for k, v in cmp.items() if k != "results"})
        result["samples_per_s"] = cmp["ours_median"]  # the ratio's numerator
        print(json.dumps(result))
        return 0
    result = run_once(args)
    print(format_table(result))
    print(json.dumps(result))
    return 0


def _run_as_worker(args) -> int:
    """Under torchrun: run the bench; rank 0 writes the result (or prints it)."""
    from trainer.bench import format_table

    result = _in_process(args)
    if result is not None:
        if args.result_file:
            Path(args.result_file).write_text(json.dumps(result) + "\n")
        else:
            print(format_table(result))
            print(json.dumps(result))
    return 0
