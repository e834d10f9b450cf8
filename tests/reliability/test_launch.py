"""`rectrain launch`: a config or data error under torchrun is one line on stderr, exit code 2,
and is not retried; a crash is retried as configured and, if it persists, reported in one line
with the path of torchrun's full log; a good run streams its output and exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_jsonl
from tests.reliability.conftest import (child_pids, env, environ_of, python_cmd, stop_group, tiny_args,
                                        wait_for, worker_pids)

pytestmark = pytest.mark.multiprocess


def _launch_cmd(*launch_args: str, worker_args: list[str]) -> list[str]:
    return python_cmd("-m", "trainer", "launch", *launch_args, "--", *worker_args)


def _launch(*launch_args: str, worker_args: list[str], timeout: int = 120, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(_launch_cmd(*launch_args, worker_args=worker_args), cwd=ROOT, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


def _errors(log_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((log_dir / "errors").glob("*.json"))]


@pytest.mark.parametrize("overrides, names", [
    pytest.param({"train__epochs": 0}, "train.epochs", id="config"),
    pytest.param({"data__train_path": "{tmp}/no-such-dir"}, "{tmp}/no-such-dir", id="data"),
    pytest.param({"train__device": "cuda"}, "train.device", id="cuda_without_gpu"),
])
def test_deterministic_error_is_one_line_exit_2_and_not_retried(overrides, names, tiny_data, tmp_path):
    overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}
    log_dir = tmp_path / "launch"
    started = time.monotonic()
    proc = _launch("--nproc", "2", "--max-restarts", "2", "--log-dir", str(log_dir),
                   worker_args=tiny_args(tiny_data, tmp_path / "run", **overrides))
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rectrain: error: "), proc.stderr
    assert names.format(tmp=tmp_path) in lines[0]
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr
    # Not retried: every error record comes from the first attempt (a restart would have hit
    # the same error and left attempt-1 records), and the launch took one start-up, not three.
    records = _errors(log_dir)
    assert records and {r["attempt"] for r in records} == {0}, records
    assert {r["kind"] for r in records} == {"deterministic"}
    assert lines[0] == f"rectrain: error: {records[0]['message']}"
    # torchrun's own report was captured, not shown
    assert "SIGTERM" in (log_dir / "torchrun.log").read_text()
    assert elapsed < 60


def test_successful_launch_streams_the_result_and_leaves_nothing_behind(tiny_data, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = _launch("--nproc", "2", worker_args=tiny_args(tiny_data, tmp_path / "run", train__max_steps=8,
                                                          train__log_every=4, eval__at_end=False),
                   TMPDIR=str(scratch))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # torchrun's banner and logs went to the (removed) log file
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 8 and result["samples_trained"] == 8 * 2 * 64
    assert "step 4/8" in proc.stdout  # rank 0's progress lines came through
    assert list(scratch.glob("rectrain-launch-*")) == []


def test_a_crash_is_retried_and_a_second_one_is_reported_in_one_line(tiny_data, tmp_path):
    run, log_dir = tmp_path / "run", tmp_path / "launch"
    args = tiny_args(tiny_data, run, data__batch_size=32, train__log_every=1, checkpoint__every_steps=20,
                     eval__at_end=False)
    cmd = _launch_cmd("--nproc", "2", "--max-restarts", "1", "--log-dir", str(log_dir), worker_args=args)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        torchrun = wait_for(lambda: child_pids(proc.pid), 30, what="torchrun")[0]

        def workers_of_attempt(attempt):
            found = worker_pids(torchrun)
            ok = len(found) == 2 and all(environ_of(p).get("TORCHELASTIC_RESTART_COUNT") == str(attempt)
                                         for p in found.values())
            return found if ok else None

        def checkpointed(step):
            return (run / "checkpoints" / f"step_{step:08d}" / ".metadata").is_file()

        first = wait_for(lambda: checkpointed(20) and workers_of_attempt(0), 60, what="attempt 0 at step 20")
        os.kill(first[1], signal.SIGKILL)
        second = wait_for(lambda: workers_of_attempt(1), 60, what="the restarted workers")
        wait_for(lambda: checkpointed(40), 60, what="attempt 1 at step 40")
        os.kill(second[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=90)
    finally:
        stop_group(proc)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.fullmatch(r"rectrain: error: worker rank 0 was killed by SIGKILL and torchrun gave up "
                        r"\(--max-restarts 1\); torchrun's full output is in (\S+)", lines[0]), lines[0]
    log = Path(lines[0].rsplit(" ", 1)[1])
    assert log == log_dir / "torchrun.log" and "ChildFailedError" in log.read_text()
    assert "Traceback" not in err and _errors(log_dir) == []
    # The restart resumed from the step-20 checkpoint: progress lines of both attempts streamed.
    assert re.search(r"resumed from \S*/step_00000020 at step 20", out), out[-3000:]
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["prefix"] == "train"]
    assert max(steps) >= 40
