"""`rectrain demo`: synthesize data if absent, train DLRM on N workers (`rectrain launch`: a
config or data error is one line and stops every worker), evaluate, summarize."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from trainer.commands.launch import launch

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "dlrm_synth.toml"


def _run(cmd: list[str]) -> int:
    """Run a one-process rectrain command; its errors are already one line on its stderr."""
    print("$ " + shlex.join(cmd), flush=True)
    return subprocess.run(cmd).returncode


def run_demo(run_dir: str, config: str | None, nproc: int, rows: int) -> int:
    from data.synth import write_synthetic

    config = config or str(DEFAULT_CONFIG)
    run = Path(run_dir)
    train_data, eval_data = run / "data" / "train", run / "data" / "eval"
    if not train_data.exists():
        write_synthetic(train_data, rows, seed=0, files=4)
        write_synthetic(eval_data, max(rows // 10, 1000), seed=1, files=1)
        print(f"synthesized {rows} train rows under {train_data} and {max(rows // 10, 1000)} eval rows under {eval_data}")
    gpus = torch.cuda.device_count()
    nproc = nproc or (gpus if gpus else 2)
    overrides = [f"data.train_path={json.dumps(str(train_data))}", f"data.eval_path={json.dumps(str(eval_data))}",
                 f"train.run_dir={json.dumps(str(run))}"]
    sets = [a for o in overrides for a in ("--set", o)]
    started = time.time()
    train = ["train", "--config", config, *sets]
    print(f"$ rectrain launch --nproc {nproc} -- {shlex.join(train)}", flush=True)
    code = launch(train, nproc=nproc)
    if code:
        return code
    train_seconds = time.time() - started
    # Evaluate the final checkpoint in a single process: a checkpoint written by N ranks loads at any world size.
    eval_out = run / "eval" / "demo.json"
    code = _run([sys.executable, "-m", "trainer", "eval", "--config", config, *sets,
                 "--checkpoint", str(run / "checkpoints"), "--out", str(eval_out)])
    if code:
        return code
    metrics = json.loads(eval_out.read_text())
    samples_per_sec = _mean_throughput(run / "metrics.jsonl")
    print("\n=== rectrain demo summary ===")
    print(f"model: DLRM, {nproc} worker(s) on {'GPU' if gpus else 'CPU'}, training took {train_seconds:.0f}s")
    print(f"test AUC {metrics['auc']:.4f}  logloss {metrics['logloss']:.4f}  NE {metrics['ne']:.4f}  "
          f"calibration {metrics['calibration']:.3f}  on {metrics['num_samples']} samples")
    print(f"train throughput: {samples_per_sec:.0f} samples/s")
    print(f"checkpoints: {run / 'checkpoints'}")
    print(f"watch it: tensorboard --logdir {run / 'tb'}")
    return 0


def _mean_throughput(path: Path) -> float:
    rates = [r["samples_per_sec"] for r in map(json.loads, path.read_text().splitlines())
             if r.get("prefix") == "train" and "samples_per_sec" in r]
    return sum(rates) / len(rates) if rates else float("nan")
