"""Checkpointer: atomic completion, keep-last-K, latest selection, partial-save cleanup, in
synchronous and async mode. (Failure handling and async atomicity: tests/reliability/
test_checkpoint_safety.py.)"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from trainer.checkpoint import Checkpointer, is_complete, resolve_checkpoint


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((3, 2), float(step))}, "train_state": f'{{"step": {step}}}'}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_keeps_the_last_k_complete_checkpoints(tmp_path, async_save):
    ck = Checkpointer(tmp_path, keep_last=2, async_save=async_save)
    for step in (5, 10, 15, 20):
        path = ck.save(step, _state(step))
        assert is_complete(path) != async_save  # async: complete once finalized
    ck.finalize()
    assert [p.name for p in ck.complete_checkpoints()] == ["step_00000015", "step_00000020"]
    assert ck.latest().name == "step_00000020"
    assert not list(tmp_path.glob("*.partial"))


def test_load_restores_tensors_and_strings_in_place(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3)
    ck.save(7, _state(7))
    target = {"model": {"w": torch.zeros(3, 2)}, "train_state": ""}
    loaded = Checkpointer.load(ck.latest(), target)
    assert torch.equal(target["model"]["w"], torch.full((3, 2), 7.0))
    assert loaded["train_state"] == '{"step": 7}'


def test_interrupted_save_is_never_latest_and_is_cleaned(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3)
    ck.save(3, _state(3))
    crashed = tmp_path / "step_00000009.partial"
    crashed.mkdir()
    (crashed / "__0_0.distcp").write_bytes(b"half a file")
    no_metadata = tmp_path / "step_00000012"
    no_metadata.mkdir()
    assert ck.latest().name == "step_00000003"
    ck.clean_partial()
    assert not crashed.exists()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        Checkpointer.load(no_metadata, _state(0))


def test_resolve_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)
    ck = Checkpointer(tmp_path, keep_last=3)
    ck.save(1, _state(1))
    ck.save(2, _state(2))
    assert resolve_checkpoint(tmp_path).name == "step_00000002"
    assert resolve_checkpoint(tmp_path / "step_00000001").name == "step_00000001"
    with pytest.raises(FileNotFoundError, match="no best.json"):
        resolve_checkpoint(tmp_path / "best")
    # keep_best records the best step in best.json (written where the run wrote it, maybe elsewhere)
    (tmp_path / "best.json").write_text(json.dumps({"checkpoint": "/elsewhere/step_00000001", "step": 1}))
    assert resolve_checkpoint(tmp_path / "best") == tmp_path / "step_00000001"


def test_sync_save_reports_its_timings(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3)
    ck.save(4, _state(4))
    stats = ck.last_stats
    assert stats["mode"] == "sync" and stats["step"] == 4 and stats["saved_s"] == 0.0
    assert stats["blocking_s"] >= stats["write_s"] > 0
    assert ck.finalize() is None  # nothing pending in sync mode


def test_async_pending_step_and_has_step(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3, async_save=True)
    assert ck.pending_step is None and not ck.has_step(3)
    final = ck.save(3, _state(3))
    assert final == tmp_path / "step_00000003"
    assert ck.pending_step == 3 and ck.has_step(3)
    stats = ck.wait()  # alias of finalize()
    assert stats["mode"] == "async" and stats["step"] == 3
    assert ck.pending_step is None and ck.has_step(3) and is_complete(final)


def test_async_saves_reuse_staging_buffers_and_write_each_steps_own_values(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=5, async_save=True)
    live = _state(0)
    for step in (1, 2, 3):
        live["model"]["w"].fill_(float(step))
        live["train_state"] = f'{{"step": {step}}}'
        ck.save(step, live)
        live["model"]["w"].fill_(-1.0)  # the next training step, while the write goes on
    # The state grows (e.g. optimizer state created lazily, a bigger tensor): new buffers.
    live["model"]["w"] = torch.full((5, 2), 4.0)
    live["model"]["v"] = torch.ones(2)
    ck.save(4, live)
    del live["train_state"]  # same tensors, other keys: new buffers too
    live["extra"] = "x"
    ck.save(5, live)
    ck.finalize()
    for step in (1, 2, 3):
        target = {"model": {"w": torch.zeros(3, 2)}, "train_state": ""}
        Checkpointer.load(tmp_path / f"step_{step:08d}", target)
        assert torch.equal(target["model"]["w"], torch.full((3, 2), float(step)))
        assert target["train_state"] == f'{{"step": {step}}}'
    target = {"model": {"w": torch.zeros(5, 2), "v": torch.zeros(2)}}
    Checkpointer.load(tmp_path / "step_00000004", target)
    assert torch.equal(target["model"]["w"], torch.full((5, 2), 4.0)) and torch.equal(target["model"]["v"], torch.ones(2))
    target = {"model": {"w": torch.zeros(5, 2)}, "extra": ""}
    Checkpointer.load(tmp_path / "step_00000005", target)
    assert target["extra"] == "x" and torch.equal(target["model"]["w"], torch.full((5, 2), 4.0))


def test_clean_partial_completes_a_pending_save_first(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3, async_save=True)
    ck.save(6, _state(6))
    ck.clean_partial()
    assert ck.latest().name == "step_00000006" and not list(tmp_path.glob("*.partial"))


def test_close_completes_the_pending_save_and_saving_works_after_it(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3, async_save=True)
    ck.save(1, _state(1))
    assert ck.close()["step"] == 1 and ck.latest().name == "step_00000001"
    assert ck.close() is None
    ck.save(2, _state(2))
    ck.close()
    assert [p.name for p in ck.complete_checkpoints()] == ["step_00000001", "step_00000002"]
