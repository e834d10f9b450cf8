"""trainer/loader.py: exactly `steps` batches, and the cursor never runs ahead of them."""

from __future__ import annotations

import torch

from data.parquet import ParquetStream
from data.schema import FeatureSpec, Schema
from data.synth import write_synthetic
from trainer.loader import make_loader, padded_batches


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
