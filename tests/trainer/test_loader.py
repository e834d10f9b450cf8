"""trainer/loader.py: exactly `steps` batches, and the cursor never runs ahead of them."""

from __future__ import annotations

import torch

from data.parquet import ParquetStream
from data.schema import FeatureSpec, Schema
from data.synth import write_synthetic
from trainer.loader import close_loader, make_loader, padded_batches


def _stream(path, workers: int) -> ParquetStream:
    schema = Schema(label_columns=("label",), dense_columns=("dense_0",), features=(FeatureSpec("cat_0", 100),))
    return ParquetStream(str(path), schema, batch_size=10, num_workers=workers)


def test_cursor_stops_at_the_last_batch_taken_in_the_main_process(tmp_path):
    write_synthetic(tmp_path, 95, seed=0)
    stream = _stream(tmp_path, workers=0)
    stream.set_epoch(0)
    taken = list(padded_batches(make_loader(stream, torch.device("cpu")), 3, stream))
    assert len(taken) == 3
    # reading a 4th batch (never trained) would have moved the cursor to 40 rows
    assert stream.positions == {0: 30}


def test_pads_to_the_step_count_with_weight_zero_batches(tmp_path):
    write_synthetic(tmp_path, 25, seed=0)
    stream = _stream(tmp_path, workers=0)
    stream.set_epoch(0)
    taken = list(padded_batches(make_loader(stream, torch.device("cpu")), 5, stream))
    assert [b.num_samples for b in taken] == [10, 10, 5, 0, 0]
    assert all(float(b.weights.sum()) == 0 for b in taken[3:])


# ------------------------------------------------------------------ persistent workers


def _shuffled(path, workers: int) -> ParquetStream:
    schema = Schema(label_columns=("label",), dense_columns=("dense_0",), features=(FeatureSpec("cat_0", 100),))
    return ParquetStream(str(path), schema, batch_size=10, num_workers=workers, shuffle=True,
                         shuffle_buffer_rows=40, seed=3)


def _key(batch) -> tuple:
    return batch.slot, batch.position, batch.dense.flatten().tolist(), batch.sparse.values().tolist()


def _epoch_reference(path, epoch: int) -> list:
    """The epoch's batches from a fresh stream and per-iteration workers, in arrival order."""
    stream = _shuffled(path, workers=2)
    stream.set_epoch(epoch)
    return sorted(_key(b) for b in make_loader(stream, torch.device("cpu")))


def _pids(loader) -> list[int]:
    return [w.pid for w in loader._iterator._workers]


def test_persistent_workers_read_each_epoch_the_main_process_asks_for(tmp_path):
    """Three epochs through one persistent loader: the same two worker processes throughout,
    and each epoch exactly the batches per-iteration workers give for it."""
    write_synthetic(tmp_path, 170, seed=1)
    stream = _shuffled(tmp_path, workers=2)
    loader = make_loader(stream, torch.device("cpu"), persistent=True)
    pids = None
    try:
        for epoch in range(3):
            stream.set_epoch(epoch)
            got = sorted(_key(b) for b in loader)
            assert got == _epoch_reference(tmp_path, epoch)
            assert pids is None or _pids(loader) == pids
            pids = _pids(loader)
    finally:
        close_loader(loader)
    assert loader._iterator is None


def test_persistent_workers_resume_mid_epoch_at_the_cursor(tmp_path):
    """An iteration abandoned after 4 batches (the trainer stopped: stop_at_step, an eval), one
    started and abandoned before any batch, then the next: it reads exactly the epoch's rest,
    nothing twice and nothing skipped."""
    write_synthetic(tmp_path, 170, seed=1)
    reference = _epoch_reference(tmp_path, 1)
    stream = _shuffled(tmp_path, workers=2)
    loader = make_loader(stream, torch.device("cpu"), persistent=True)
    try:
        stream.set_epoch(1)
        first = []
        for batch in padded_batches(loader, 4, stream):
            stream.advance(batch)
            first.append(_key(batch))
        iter(loader)  # never pulled from: its cursor must not be the one the next iteration reads
        rest = []
        for batch in padded_batches(loader, stream.remaining_batches(), stream):
            stream.advance(batch)
            rest.append(_key(batch))
        assert sorted(first + rest) == reference and len(first) == 4
        assert stream.remaining_batches() == 0
    finally:
        close_loader(loader)


def test_closing_a_persistent_loader_stops_its_workers(tmp_path):
    write_synthetic(tmp_path, 50, seed=1)
    stream = _shuffled(tmp_path, workers=2)
    loader = make_loader(stream, torch.device("cpu"), persistent=True)
    assert sum(b.batch_size for b in loader) == 50
    workers = list(loader._iterator._workers)
    close_loader(loader)
    assert not any(w.is_alive() for w in workers)
