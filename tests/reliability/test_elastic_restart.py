"""Elastic restart: `torchrun --max-restarts=1`, one worker SIGKILLed mid-run. The first restart
must rejoin (fresh store key space per attempt, see trainer.distributed.init_distributed),
resume from the latest checkpoint and end bit-identical to a run that was never interrupted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.conftest import ROOT, read_jsonl
from tests.reliability.conftest import (env, free_port, python_cmd, stop_group, tiny_args, wait_for,
                                        worker_pids)


STEPS = 150  # 9,600 rows / (2 ranks x batch 32)
COMMON = dict(data__batch_size=32, train__log_every=1, checkpoint__every_steps=20, checkpoint__keep_last=10,
              eval__at_end=False)
KILL_AFTER_CHECKPOINT = 40  # the kill lands once this checkpoint is complete and rank 0 logged
KILL_AFTER_STEP = 44  # this step, so the restart replays steps that were already trained


def _rendezvous(kind: str) -> list[str]:
    if kind == "static":
        return ["--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    return ["--standalone"]  # c10d rendezvous on an ephemeral local port


def _torchrun(kind: str, args: list[str], max_restarts: int, log) -> subprocess.Popen:
    cmd = python_cmd("-m", "torch.distributed.run", *_rendezvous(kind), "--nproc_per_node=2",
                     f"--max-restarts={max_restarts}", "--monitor-interval=0.1", "-m", "trainer", *args)
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _complete_steps(run_dir) -> list[int]:
    ckpt = run_dir / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in ckpt.glob("step_*")
                  if not p.name.endswith(".partial") and (p / ".metadata").is_file())


def _last_logged_step(run_dir) -> int:
    """The highest train step in metrics.jsonl so far (read while rank 0 may be appending)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        if '"prefix": "train"' in line:
            try:
                steps.append(json.loads(line)["step"])
            except ValueError:  # a line being written
                pass
    return max(steps)


def _last_loss_per_step(run_dir) -> dict[int, float]:
    # After a restart the steps between the resumed checkpoint and the kill are logged twice;
    # the last value of each step is the one the finished run stands on.
    out = {}
    for r in read_jsonl(run_dir / "metrics.jsonl"):
        if r["prefix"] == "train":
            out[r["step"]] = r["loss"]
    return out


def _final_state(run_dir, tmp_path, name) -> dict:
    final = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    out = tmp_path / f"{name}.pt"
    dcp_to_torch_save(str(final), str(out))
    return torch.load(out, weights_only=False)


def _tensors(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _tensors(v, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor):
            yield f"{prefix}{k}", v


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    with open(run / "torchrun.log", "w") as log:
        proc = _torchrun("c10d", tiny_args(tiny_data, run, **COMMON), 0, log)
        try:
            rc = proc.wait(timeout=120)
        finally:
            stop_group(proc)
    assert rc == 0, (run / "torchrun.log").read_text()[-5000:]
    return run


@pytest.mark.multiprocess
# Each rendezvous backend once, each rank killed once (the four combinations cost a minute of CI).
@pytest.mark.parametrize(("kind", "victim"), [("static", 0), ("c10d", 1)])
def test_sigkill_of_a_worker_recovers_on_the_first_restart_bit_identically(kind, victim, uninterrupted, tiny_data,
                                                                           tmp_path):
    run = tmp_path / "run"
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:
        proc = _torchrun(kind, tiny_args(tiny_data, run, **COMMON), 1, log)
        try:
            wait_for(lambda: KILL_AFTER_CHECKPOINT in _complete_steps(run)
                     and _last_logged_step(run) >= KILL_AFTER_STEP, 60,
                     what=f"checkpoint step {KILL_AFTER_CHECKPOINT} and step {KILL_AFTER_STEP}")
            workers = worker_pids(proc.pid)
            assert sorted(workers) == [0, 1], workers
            os.kill(workers[victim], signal.SIGKILL)
            killed_at = _last_logged_step(run)
            rc = proc.wait(timeout=90)
        finally:
            stop_group(proc)
    out = log_path.read_text()
    assert rc == 0, out[-6000:]
    assert KILL_AFTER_STEP <= killed_at < STEPS, "the kill landed after the run had finished"
    # It restarted exactly once (--max-restarts=1 leaves no second chance) and resumed from
    # a checkpoint written before the kill.
    resumed = re.findall(r"resumed from \S*/step_(\d+) at step", out)
    assert len(resumed) == 1, out[-6000:]
    resumed_step = int(resumed[0])
    assert KILL_AFTER_CHECKPOINT <= resumed_step <= killed_at

    a, b = _last_loss_per_step(uninterrupted), _last_loss_per_step(run)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert [s for s in a if a[s] != b[s]] == []

    sa, sb = _final_state(uninterrupted, tmp_path, "a"), _final_state(run, tmp_path, "b")
    ta, tb = dict(_tensors(sa["model"])), dict(_tensors(sb["model"]))
    assert ta.keys() == tb.keys() and ta
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    oa, ob = dict(_tensors(sa["optim"])), dict(_tensors(sb["optim"]))
    assert oa.keys() == ob.keys() and oa
    assert [k for k in oa if not torch.equal(oa[k], ob[k])] == []


def test_every_attempt_agrees_on_a_fresh_key_space_while_earlier_keys_remain():
    """The handshake behind init_distributed, on one store that (like torchrun's) outlives its
    attempts: each attempt's ranks share a namespace, and none sees a key of an earlier one,
    whatever order the ranks arrive in."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from trainer.distributed import attempt_store

    store, world = dist.HashStore(), 3
    store.set_timeout(timedelta(seconds=30))

    def attempt(number, delays):
        seen, failures = {}, []

        def rank(r):
            try:
                time.sleep(delays[r])
                space = attempt_store(store, r, world, timeout=timedelta(seconds=30))
                # A rank other than 0 goes on as soon as rank 0 answered it, before a late rank has
                # even started: an earlier attempt's key of that rank would show here.
                early = [o for o in range(1, world) if r != 0 and delays[o] > delays[r] + 0.3
                         and space.check([f"rank{o}"])]
                space.set(f"rank{r}", str(number))
                seen[r] = (early, [space.get(f"rank{o}").decode() for o in range(world)])
            except Exception as e:  # surfaced below
                failures.append(e)

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failures, failures
        assert seen == {r: ([], [str(number)] * world) for r in range(world)}, seen

    attempt(0, [0.0, 0.0, 0.0])
    attempt(1, [0.0, 0.0, 0.6])  # the last rank late: the others must not read its old key
    attempt(2, [0.6, 0.0, 0.0])  # rank 0 (who hands out the token) late
    attempt(3, [0.0, 0.6, 0.3])
