"""bf16 vs fp32 dense training speed on this machine: samples/s of full training steps (sparse
lookup, dense forward/backward, fused and dense optimizer updates) in one process, the same
in-memory batches for every precision, so data loading is left out.

    python scripts/bench_precision.py [--config configs/dlrm_synth.toml ...] [--batch 2048]
        [--steps 30] [--dense fp32,bf16] [--set model.arch.over_arch=[1024,1024,512,256] ...]

Prints one line per config and precision, and the bf16/fp32 speed ratio. Not a test: numbers
depend on the CPU (AVX-512 BF16 / AMX) and on what else runs on it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bench(config: str, overrides: list[str], dense: str, data: Path, batch: int, steps: int) -> float:
    import torch

    from trainer.build import build_sharded_model, build_stream
    from trainer.config import load_config
    from trainer.distributed import init_distributed
    from trainer.loader import make_loader
    from trainer.optim import build_optimizer
    from trainer.precision import DensePrecision
    from trainer.run_state import seed_everything

    cfg = load_config(config, [*overrides, f'data.train_path="{data}"', 'data.eval_path=""', 'train.device="cpu"',
                               f"data.batch_size={batch}", "data.num_workers=0", f'precision.dense="{dense}"'])
    ctx = init_distributed("cpu")
    seed_everything(0)
    precision = DensePrecision(dense, ctx.device)
    model, _, _, schema = build_sharded_model(cfg, ctx, precision)
    optimizer = build_optimizer(model, cfg.optimizer)
    loader = iter(make_loader(build_stream(cfg, schema, ctx, cfg.data.train_path, train=True), ctx.device))
    batches = [next(loader) for _ in range(4)]
    model.train()

    def step(b):
        optimizer.zero_grad()
        loss, _ = model(b)
        precision.backward(loss)
        precision.step(optimizer)

    for i in range(5):  # warm-up (oneDNN picks its kernels)
        step(batches[i % len(batches)])
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    elapsed = time.perf_counter() - start
    del model, optimizer
    torch.distributed.destroy_process_group()
    return steps * batch / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", help="config(s) to time (default: dlrm_synth and dlrm_dcnv2_synth "
                   "with MLPerf-sized MLPs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override for every config")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--dense", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    mlperf = ["model.arch.dense_arch=[512,256,16]", "model.arch.over_arch=[1024,1024,512,256]"]
    runs = [(c, []) for c in args.config] if args.config else [
        (str(ROOT / "configs" / "dlrm_synth.toml"), []),
        (str(ROOT / "configs" / "dlrm_dcnv2_synth.toml"), mlperf),
    ]
    from data.synth import write_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train"
        write_synthetic(data, max(4 * args.batch, 8192), seed=0, files=1)
        print(f"{torch.get_num_threads()} threads, batch {args.batch}, {args.steps} timed steps; "
              f"bf16 CPU support: {torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
        for config, extra in runs:
            speeds = {}
            for dense in args.dense.split(","):
                speeds[dense] = bench(config, [*extra, *args.overrides], dense, data, args.batch, args.steps)
                print(f"{Path(config).stem}{' (MLPerf-sized MLPs)' if extra else ''}: dense {dense}: "
                      f"{speeds[dense]:,.0f} samples/s", flush=True)
            if "fp32" in speeds and "bf16" in speeds:
                print(f"  bf16 / fp32 = {speeds['bf16'] / speeds['fp32']:.2f}x")


if __name__ == "__main__":
    main()
