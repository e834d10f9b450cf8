"""Helpers for the reliability tests: a tiny click log, the small 2-rank config built on it, and
finding (and killing) torchrun's worker processes through /proc."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, _env, sets
from trainer.commands.launch import child_pids, descendants

DEBUG_CONFIG = ROOT / "configs" / "dlrm_debug.toml"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """9,600 train rows in 2 files and 600 eval rows: with batch 32 on 2 ranks, 150 steps."""
    from data.synth import write_synthetic

    root = tmp_path_factory.mktemp("tiny")
    write_synthetic(root / "train", 9_600, seed=0, files=2, row_group_rows=1024)
    write_synthetic(root / "eval", 600, seed=1, files=1)
    return {"train": root / "train", "eval": root / "eval"}


def tiny_args(data: dict[str, Path], run_dir: Path, **extra) -> list[str]:
    """`train` arguments for the small debug DLRM on `data`, writing to `run_dir`."""
    values = dict(data__train_path=str(data["train"]), data__eval_path=str(data["eval"]),
                  train__run_dir=str(run_dir), logging__tensorboard=False, logging__progress_bar=False)
    values.update(extra)
    return ["train", "--config", str(DEBUG_CONFIG), *sets(**values)]


def env(**extra: str) -> dict[str, str]:
    out = _env()
    out.update(extra)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def worker_pids(torchrun_pid: int) -> dict[int, int]:
    """{RANK: pid} of the workers torchrun (the elastic agent) has started and that are alive."""
    out = {}
    for pid in child_pids(torchrun_pid):
        rank = environ_of(pid).get("RANK")
        if rank is not None:
            out[int(rank)] = pid
    return out


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


def stop_group(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` (started with start_new_session=True), its process group and everything
    below it: torchrun starts each worker in a session of its own, which the group kill misses."""
    if proc.poll() is None:
        for pid in descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
