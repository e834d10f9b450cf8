"""Checkpoint safety: no checkpoint from a non-finite state, a full or read-only disk fails the
save cleanly (partial removed, previous checkpoint intact, every rank agrees), and async saves
are atomic and write the state as it was when save() returned. Real DCP, real process groups:
a world of one in this process, and 2 spawned gloo ranks for what one rank alone cannot show."""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards
from torch.distributed.checkpoint.filesystem import FileSystem

from trainer import checkpoint as checkpoint_module
from trainer.checkpoint import Checkpointer, check_writable, first_non_finite, is_complete
from trainer.distributed import init_distributed, shutdown
from trainer.errors import RunError

_REAL_CREATE_STREAM = FileSystem.create_stream


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    owned = not dist.is_initialized()
    init_distributed("cpu")
    yield
    if owned and dist.is_initialized():
        dist.destroy_process_group()


def _state(value: float, rows: int = 6) -> dict:
    return {"model": {"dense.weight": torch.full((rows, 4), value), "table.ids": torch.arange(rows)},
            "optim": {"state": {"dense.weight": {"exp_avg": torch.full((rows, 4), value / 2),
                                                 "step": torch.tensor(float(value))}},
                      "param_groups": [{"lr": 0.1, "params": ["dense.weight"]}]},
            "train_state": json.dumps({"step": value})}


def _sharded(local: torch.Tensor) -> torch.Tensor:
    """A ShardedTensor over the current world, `local` being this rank's row block."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rows, cols = local.shape
    meta = ShardMetadata([rank * rows, 0], [rows, cols], f"rank:{rank}/cpu")
    return init_from_local_shards([Shard(local, meta)], world * rows, cols)


def _loaded(path: Path, rows: int = 6) -> dict:
    target = _state(0.0, rows)
    Checkpointer.load(path, target)
    return target


def _names(ck: Checkpointer) -> list[str]:
    return [p.name for p in ck.complete_checkpoints()]


def _patch_streams(monkeypatch, before_open) -> None:
    """Every file DCP writes first goes through `before_open(path)` (which may block or raise)."""

    @contextmanager
    def create_stream(self, path, mode):
        if "w" in mode:
            before_open(Path(path))
        with _REAL_CREATE_STREAM(self, path, mode) as stream:
            yield stream

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)


def _failing_writes(monkeypatch, code: int, which: str = "data") -> None:
    """Writes of data files (or of the .metadata) start, then fail with OSError(`code`)."""

    def before_open(path: Path) -> None:
        hit = path.suffix == ".distcp" if which == "data" else path.name.startswith(".metadata")
        if hit:
            with _REAL_CREATE_STREAM(FileSystem(), path, "wb") as stream:
                stream.write(b"\0" * 64)  # half a file, then the disk is full
            raise OSError(code, os.strerror(code), str(path))

    _patch_streams(monkeypatch, before_open)


# ---------------------------------------------------------------------------- non-finite state
def test_first_non_finite_scans_local_shards_dtensors_and_optimizer_state():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard as DShard

    assert first_non_finite(_state(1.0)) is None
    # Finite values whose sum overflows are not a false alarm.
    assert first_non_finite({"big": torch.full((4,), 3e38)}) is None
    assert first_non_finite({"half": torch.full((8,), 60000.0, dtype=torch.float16)}) is None
    poisoned = _state(1.0)
    poisoned["optim"]["state"]["dense.weight"]["exp_avg"][2, 1] = float("inf")
    assert first_non_finite(poisoned) == "optim.state.dense.weight.exp_avg"
    local = torch.ones(3, 2)
    local[1, 0] = float("nan")
    assert first_non_finite({"model": {"t": _sharded(local)}}) == "model.t"
    mesh = init_device_mesh("cpu", (1,))
    dt = DTensor.from_local(torch.tensor([1.0, float("-inf")]), mesh, [DShard(0)])
    assert first_non_finite({"m": [torch.zeros(2), {"d": dt}]}) == "m.1.d"


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_non_finite_state_is_refused_and_the_good_checkpoint_survives(tmp_path, async_save):
    ck = Checkpointer(tmp_path, keep_last=1, async_save=async_save)
    ck.save(10, _state(1.0))
    keys = {"model": "model.dense.weight", "optim": "optim.state.dense.weight.exp_avg", "table": "model.table.weight"}
    for step, where in ((20, "model"), (30, "optim"), (40, "table")):
        state = _state(2.0)
        if where == "model":
            state["model"]["dense.weight"][0, 0] = float("nan")
        elif where == "optim":
            state["optim"]["state"]["dense.weight"]["exp_avg"][1, 1] = float("-inf")
        else:
            local = torch.ones(6, 4)
            local[5, 3] = float("nan")
            state["model"]["table.weight"] = _sharded(local)
        with pytest.raises(RunError) as err:
            ck.save(step, state)
        message = str(err.value)
        assert message.startswith(f"refusing to write checkpoint step_{step:08d}: ")
        assert f": {keys[where]} holds NaN/Inf (rank 0); " in message and "\n" not in message
        assert message.endswith("the previous checkpoint step_00000010 is intact")
        assert not (tmp_path / f"step_{step:08d}").exists()
        assert not (tmp_path / f"step_{step:08d}.partial").exists()
        assert _names(ck) == ["step_00000010"]
    assert ck.pending_step is None
    assert torch.equal(_loaded(tmp_path / "step_00000010")["model"]["dense.weight"], torch.full((6, 4), 1.0))
    # Training recovered: the next good state is saved, and only now does rotation drop step 10.
    ck.save(50, _state(5.0))
    ck.finalize()
    assert _names(ck) == ["step_00000050"]


def test_refusal_names_the_first_offending_key_and_says_when_nothing_was_saved(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    state = _state(1.0)
    state["model"]["dense.weight"][3, 3] = float("nan")
    with pytest.raises(RunError, match=r"^refusing to write checkpoint step_00000007: model.dense.weight holds "
                                       r"NaN/Inf \(rank 0\); no earlier checkpoint exists$"):
        ck.save(7, state)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- writable directory
def test_check_writable_creates_the_directory_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "run" / "checkpoints"
    assert check_writable(target) == target
    assert target.is_dir() and list(target.iterdir()) == []


def test_check_writable_under_a_file(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    target = tmp_path / "file" / "checkpoints"
    with pytest.raises(RunError) as err:
        check_writable(target)
    assert str(err.value) == (f"checkpoint directory {target} is not writable (Not a directory); choose another "
                              f"checkpoint.dir or train.run_dir")
    with pytest.raises(RunError, match="it exists and is not a directory"):
        check_writable(tmp_path / "file")


def test_check_writable_read_only(tmp_path, monkeypatch):
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o555)  # enough for a normal user; root writes anyway
    else:
        real_open = os.open

        def read_only(path, flags, *args):
            if flags & os.O_WRONLY and str(path).startswith(str(target)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, *args)

        monkeypatch.setattr(checkpoint_module.os, "open", read_only)
    try:
        with pytest.raises(RunError) as err:
            check_writable(target)
    finally:
        target.chmod(0o755)
    reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    assert str(err.value) == (f"checkpoint directory {target} is not writable ({reason}); choose another "
                              f"checkpoint.dir or train.run_dir")


# ---------------------------------------------------------------------------- failing writes
@pytest.mark.parametrize("which", ["data", "metadata"])
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_disk_full_during_the_write(tmp_path, monkeypatch, async_save, which):
    ck = Checkpointer(tmp_path, keep_last=1, async_save=async_save)
    ck.save(10, _state(1.0))
    ck.finalize()
    _failing_writes(monkeypatch, errno.ENOSPC, which)
    with pytest.raises(RunError) as err:
        ck.save(20, _state(2.0))
        ck.finalize()  # async: the failure surfaces when the save is completed
    assert str(err.value) == (f"could not write checkpoint step_00000020 in {tmp_path}: no space left on device "
                              f"(rank 0); free space there or choose another checkpoint.dir; the previous "
                              f"checkpoint step_00000010 is intact")
    assert not (tmp_path / "step_00000020.partial").exists() and not (tmp_path / "step_00000020").exists()
    assert _names(ck) == ["step_00000010"] and ck.latest().name == "step_00000010"
    assert torch.equal(_loaded(tmp_path / "step_00000010")["model"]["dense.weight"], torch.full((6, 4), 1.0))
    monkeypatch.undo()  # space freed: saving works again
    ck.save(30, _state(3.0))
    ck.finalize()
    assert _names(ck) == ["step_00000030"]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_read_only_during_the_write(tmp_path, monkeypatch, async_save):
    ck = Checkpointer(tmp_path, keep_last=3, async_save=async_save)
    ck.save(10, _state(1.0))
    ck.finalize()
    _failing_writes(monkeypatch, errno.EROFS)
    with pytest.raises(RunError, match=r"in .*: Read-only file system \(rank 0\); make it writable or choose another "
                                       r"checkpoint.dir; the previous checkpoint step_00000010 is intact"):
        ck.save(20, _state(2.0))
        ck.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010"]


# ---------------------------------------------------------------------------- async save
def test_async_save_writes_the_state_of_save_time_and_renames_only_after_the_write(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, keep_last=3, async_save=True)
    ck.save(5, _state(0.5))
    ck.finalize()
    started, release = threading.Event(), threading.Event()

    def held(path: Path) -> None:
        started.set()
        assert release.wait(15), "test never released the write"

    _patch_streams(monkeypatch, held)
    state = _state(1.0)
    local = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    state["model"]["table.weight"] = _sharded(local)
    ck.save(10, state)
    # Training goes on: the next step changes the live tensors in place.
    state["model"]["dense.weight"].add_(100.0)
    state["optim"]["state"]["dense.weight"]["step"].add_(1.0)
    local.mul_(-1.0)
    assert started.wait(15), "the background write never started"
    assert (tmp_path / "step_00000010.partial").is_dir() and not (tmp_path / "step_00000010").exists()
    assert ck.latest().name == "step_00000005" and _names(ck) == ["step_00000005"]
    assert ck.pending_step == 10 and ck.has_step(10) and not ck.has_step(11)
    release.set()
    stats = ck.finalize()
    assert stats["step"] == 10 and stats["mode"] == "async"
    assert ck.pending_step is None and ck.latest().name == "step_00000010"
    assert is_complete(tmp_path / "step_00000010") and not list(tmp_path.glob("*.partial"))
    target = _state(0.0)
    target["model"]["table.weight"] = _sharded(torch.zeros(6, 4))
    Checkpointer.load(tmp_path / "step_00000010", target)
    assert torch.equal(target["model"]["dense.weight"], torch.full((6, 4), 1.0))
    assert target["optim"]["state"]["dense.weight"]["step"].item() == 1.0
    assert torch.equal(target["model"]["table.weight"].local_shards()[0].tensor,
                       torch.arange(24, dtype=torch.float32).reshape(6, 4))
    assert json.loads(target["train_state"]) == {"step": 1.0}


def test_async_blocking_time_is_below_the_write_time(tmp_path, monkeypatch):
    def slow_disk(path: Path) -> None:
        if path.suffix == ".distcp":
            time.sleep(0.5)

    _patch_streams(monkeypatch, slow_disk)
    ck = Checkpointer(tmp_path, keep_last=3, async_save=True)
    t0 = time.perf_counter()
    ck.save(1, _state(1.0, rows=20_000))
    returned = time.perf_counter() - t0
    assert ck.pending_step == 1 and not (tmp_path / "step_00000001").exists()
    time.sleep(1.5)  # training steps while the files are written
    stats = ck.finalize()
    assert set(stats) >= {"scan_s", "stage_s", "write_s", "wait_s", "commit_s", "blocking_s", "saved_s"}
    assert stats["write_s"] >= 0.5 and returned < stats["write_s"]
    assert stats["blocking_s"] < stats["write_s"] and stats["saved_s"] > 0
    # Finalized at once (e.g. at the end of training): the wait for the write is blocking time.
    ck.save(2, _state(2.0, rows=20_000))
    stats = ck.finalize()
    assert stats["wait_s"] > 0 and stats["blocking_s"] > 0.4
    assert _names(ck) == ["step_00000001", "step_00000002"]


def test_next_async_save_completes_the_previous_and_rotates(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2, async_save=True)
    for step in (1, 2, 3, 4):
        ck.save(step, _state(float(step)), keep=tmp_path / "step_00000001")
        assert ck.pending_step == step
    assert ck.latest().name == "step_00000003"  # step 4 is still pending
    ck.finalize()
    assert _names(ck) == ["step_00000001", "step_00000003", "step_00000004"]
    assert ck.finalize() is None  # nothing pending


def test_falls_back_to_synchronous_save_where_async_is_unavailable(tmp_path, monkeypatch, caplog):
    monkeypatch.delattr(dcp, "async_save")
    ck = Checkpointer(tmp_path, keep_last=3, async_save=True)
    with caplog.at_level("WARNING", logger="rectrain"):
        path = ck.save(3, _state(3.0))
    assert is_complete(path) and ck.pending_step is None and ck.last_stats["mode"] == "sync"
    assert "saving synchronously" in caplog.text


# ---------------------------------------------------------------------------- two ranks
def _two_rank_worker(rank: int, port: int, out: str, scenario: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        report = _two_rank_scenario(rank, Path(out), scenario)
        Path(out, f"{scenario}_rank{rank}.json").write_text(json.dumps(report))
    finally:
        shutdown()  # what holds the groups is gone; join gloo's threads before teardown


def _two_rank_scenario(rank: int, out: Path, scenario: str) -> dict:
    def state(value: float, poison: bool = False) -> dict:
        local = torch.full((4, 2), value + rank)
        if poison:
            local[3, 1] = float("nan")
        return {"model": {"table.weight": _sharded(local), "dense": torch.full((3,), value)},
                "train_state": json.dumps({"step": value})}

    report = {}
    for async_save in (False, True):
        root = out / f"{scenario}_{'async' if async_save else 'sync'}"
        ck = Checkpointer(root, keep_last=1, async_save=async_save)
        ck.save(10, state(1.0))
        ck.finalize()
        try:
            if scenario == "nan":
                ck.save(20, state(2.0, poison=rank == 1))
            else:
                real = FileSystem.create_stream
                if rank == 1:
                    @contextmanager
                    def full(self, path, mode):
                        if Path(path).suffix == ".distcp":
                            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                        with real(self, path, mode) as stream:
                            yield stream

                    FileSystem.create_stream = full
                try:
                    ck.save(20, state(2.0))
                    ck.finalize()
                finally:
                    FileSystem.create_stream = real
            error = None
        except RunError as e:
            error = str(e)
        dist.barrier()
        listing = sorted(p.name for p in root.iterdir())
        ck.save(30, state(3.0))  # nobody hangs: the next save works on every rank
        ck.close()
        report["async" if async_save else "sync"] = {"error": error, "listing": listing,
                                                     "after": [p.name for p in ck.complete_checkpoints()]}
    return report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(tmp_path: Path, scenario: str) -> list[dict]:
    context = mp.start_processes(_two_rank_worker, args=(_free_port(), str(tmp_path), scenario), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.kill()
            raise AssertionError("2-rank checkpoint test hung")
    return [json.loads((tmp_path / f"{scenario}_rank{r}.json").read_text()) for r in range(2)]


def test_two_ranks_refuse_a_nan_held_by_rank_1_only(tmp_path):
    reports = _run_two_ranks(tmp_path, "nan")
    for mode in ("sync", "async"):
        errors = [r[mode]["error"] for r in reports]
        assert errors[0] == errors[1] == ("refusing to write checkpoint step_00000020: model.table.weight holds "
                                          "NaN/Inf (rank 1); the previous checkpoint step_00000010 is intact")
        assert reports[0][mode]["listing"] == ["step_00000010"]
        assert reports[0][mode]["after"] == ["step_00000030"]


def test_two_ranks_agree_on_a_full_disk_on_rank_1_only(tmp_path):
    reports = _run_two_ranks(tmp_path, "disk_full")
    for mode in ("sync", "async"):
        errors = [r[mode]["error"] for r in reports]
        root = tmp_path / f"disk_full_{mode}"
        assert errors[0] == errors[1] == (f"could not write checkpoint step_00000020 in {root}: no space left on "
                                          f"device (rank 1); free space there or choose another checkpoint.dir; "
                                          f"the previous checkpoint step_00000010 is intact")
        assert reports[0][mode]["listing"] == ["step_00000010"]  # partial removed, previous intact
        assert reports[0][mode]["after"] == ["step_00000030"]
