"""Checkpointer: atomic completion, keep-last-K, latest selection, partial-save cleanup."""

from __future__ import annotations

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


def test_keeps_the_last_k_complete_checkpoints(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    for step in (5, 10, 15, 20):
        path = ck.save(step, _state(step))
        assert is_complete(path)
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
