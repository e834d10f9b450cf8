"""A finished command leaves no process-group threads behind: gloo's workers must be joined
before interpreter teardown, or a late release of a collective's tensors aborts the process
after a successful run."""

from __future__ import annotations

import os

from data.synth import write_synthetic
from trainer.cli import main


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_train_and_eval_commands_join_the_process_group_threads(tmp_path):
    write_synthetic(tmp_path / "train", 600, seed=0)
    write_synthetic(tmp_path / "eval", 200, seed=1)
    args = ["--config", "configs/dlrm_debug.toml",
            "--set", f'data.train_path="{tmp_path / "train"}"', "--set", f'data.eval_path="{tmp_path / "eval"}"',
            "--set", 'checkpoint.resume="never"', "--set", "logging.tensorboard=false"]
    counts = []
    for i in range(4):
        run = ["--set", f'train.run_dir="{tmp_path / f"run{i}"}"']
        assert main(["train", *args, *run]) == 0
        assert main(["eval", *args, *run, "--checkpoint", str(tmp_path / f"run{i}" / "checkpoints")]) == 0
        counts.append(_threads())
    # The first round may create lazy pools (arrow, OpenMP). After it, a leaked process group
    # would add its three gloo threads per command: 12 over the last two rounds. Transient
    # threads make the count jitter by one either way.
    assert abs(counts[3] - counts[1]) <= 2, counts
