"""Schema.absent_features and Schema.passthrough through the reader (data/parquet.py) and the
padding batch (data/batch.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.batch import padding_batch, padding_for
from data.parquet import ParquetStream, table_to_batch
from data.schema import DataError, FeatureSpec, Schema

# `item` has no column (absent); `s` is a feature AND a passthrough column (raw vs mapped ids).
SCHEMA = Schema(
    label_columns=("label",),
    dense_columns=("d",),
    features=(FeatureSpec("s", 10), FeatureSpec("item", 10), FeatureSpec("m", 100)),
    absent_features=frozenset({"item"}),
    passthrough=("targets", "s"),
)

TARGETS = [[1, 2, 3], None, [], [4, None, 5], [6], [7, 8]]
S = [11, 12, None, 14, 15, 16]


def _table(dense=None) -> pa.Table:
    return pa.table({
        "label": pa.array([0, 1, 0, 1, 0, 1], pa.int64()),
        "d": pa.array(dense if dense is not None else [0.0, 1, 2, 3, 4, 5], pa.float64()),
        "s": pa.array(S, pa.int64()),
        "m": pa.array([[1], [2, 3], [], [4], [5, 6, 7], [8]], pa.list_(pa.int64())),
        "targets": pa.array(TARGETS, pa.list_(pa.int64())),
    })


def _expected_targets(rows) -> tuple[list[int], list[int]]:
    values = [x for r in rows for x in (TARGETS[r] or []) if x is not None]
    lengths = [len([x for x in (TARGETS[r] or []) if x is not None]) for r in rows]
    return values, lengths


def _write(path: Path, table: pa.Table, row_group_rows: int = 4) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_rows)
    return str(path)


def test_passthrough_values_lengths_and_nulls_and_absent_feature_is_empty_bags():
    batch = table_to_batch(_table(), SCHEMA, "f.parquet")
    values, lengths = batch.extras["targets"]
    want_v, want_l = _expected_targets(range(6))
    assert values.tolist() == want_v and lengths.tolist() == want_l
    assert values.dtype == lengths.dtype == torch.int64
    # scalar passthrough: raw ids (no modulo), a null row has length 0
    raw, raw_len = batch.extras["s"]
    assert raw.tolist() == [11, 12, 14, 15, 16] and raw_len.tolist() == [1, 1, 0, 1, 1, 1]
    kjt = batch.sparse.to_dict()
    assert list(batch.sparse.keys()) == ["s", "item", "m"]  # schema order, the absent one included
    assert kjt["s"].values().tolist() == [1, 2, 4, 5, 6]  # the feature is still mapped (modulo 10)
    assert kjt["item"].lengths().tolist() == [0] * 6 and kjt["item"].values().numel() == 0
    assert kjt["m"].values().tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert batch.id_stats[1].tolist() == [0, 0, 0, 0]


def test_stream_reads_passthrough_across_batches_without_the_absent_column(tmp_path):
    path = _write(tmp_path / "a.parquet", _table())
    assert "item" not in pq.read_schema(path).names
    batches = list(ParquetStream(path, SCHEMA, batch_size=4))
    assert [b.batch_size for b in batches] == [4, 2]
    for b, rows in zip(batches, (range(0, 4), range(4, 6))):
        want_v, want_l = _expected_targets(rows)
        assert b.extras["targets"][0].tolist() == want_v and b.extras["targets"][1].tolist() == want_l
        assert b.extras["targets"][1].shape == (b.batch_size,)


def test_weighted_schema_with_an_absent_feature_keeps_weights_aligned():
    schema = Schema(("label",), ("d",), (FeatureSpec("m", 100, "w"), FeatureSpec("item", 10, "iw")),
                    absent_features=frozenset({"item"}))
    table = _table().append_column("w", pa.array([[0.5], [1, 2], [], [3], [4, 5, 6], [7]], pa.list_(pa.float32())))
    batch = table_to_batch(table, schema, "f.parquet")
    assert schema.columns == ["label", "d", "m", "w"]  # neither item nor its weight column is read
    assert batch.sparse.weights().tolist() == [0.5, 1, 2, 3, 4, 5, 6, 7]
    assert batch.sparse.to_dict()["item"].lengths().tolist() == [0] * 6


def test_drop_row_drops_the_rows_extras_too():
    schema = replace(SCHEMA, non_finite="drop_row")
    dense = [0.0, float("nan"), 2, float("inf"), 4, 5]
    batch = table_to_batch(_table(dense), schema, "f.parquet")
    kept = [0, 2, 4, 5]
    want_v, want_l = _expected_targets(kept)
    assert batch.dropped_rows == 2
    assert batch.extras["targets"][0].tolist() == want_v and batch.extras["targets"][1].tolist() == want_l
    assert batch.extras["s"][0].tolist() == [11, 15, 16] and batch.extras["s"][1].tolist() == [1, 0, 1, 1]

    all_bad = table_to_batch(_table([float("nan")] * 6), schema, "f.parquet")
    assert all_bad.all_dropped and all_bad.dropped_rows == 6
    for name in ("targets", "s"):
        assert all_bad.extras[name][0].numel() == 0 and all_bad.extras[name][1].tolist() == [0]


def test_padding_batches_carry_one_empty_row_per_passthrough_column():
    pad = padding_batch(1, ["s", "item", "m"], 1, False, passthrough=("targets",))
    assert pad.extras["targets"][1].tolist() == [0] and pad.extras["targets"][0].dtype == torch.int64
    assert padding_batch(1, ["s"], 1, False).extras == {}  # old callers: no passthrough
    pad = padding_for(SCHEMA)
    assert sorted(pad.extras) == ["s", "targets"] and pad.batch_size == 1 and float(pad.weights.sum()) == 0
    assert list(pad.sparse.keys()) == ["s", "item", "m"]


def test_batch_to_moves_extras():
    batch = table_to_batch(_table(), SCHEMA, "f.parquet")
    moved = batch.to(torch.device("cpu"))
    assert moved.extras["targets"][0].tolist() == batch.extras["targets"][0].tolist()
    if torch.cuda.is_available():
        pinned = batch.pin_memory()
        assert pinned.extras["targets"][0].is_pinned()
        assert batch.to(torch.device("cuda")).extras["targets"][1].device.type == "cuda"


def test_missing_or_mistyped_passthrough_column_is_a_one_line_error(tmp_path):
    path = _write(tmp_path / "a.parquet", _table().drop_columns(["targets"]))
    with pytest.raises(DataError, match=r"a\.parquet: column 'targets' .* is missing"):
        ParquetStream(path, SCHEMA, batch_size=4)
    path = _write(tmp_path / "b.parquet", _table().drop_columns(["targets"]).append_column(
        "targets", pa.array(["x"] * 6)))
    with pytest.raises(DataError, match=r"b\.parquet: column 'targets' has type string; passthrough columns must be"):
        ParquetStream(path, SCHEMA, batch_size=4)


def test_a_present_feature_is_still_required(tmp_path):
    path = _write(tmp_path / "a.parquet", _table().drop_columns(["m"]))
    with pytest.raises(DataError, match=r"column 'm' \(from data.sparse_columns\) is missing"):
        ParquetStream(path, SCHEMA, batch_size=4)


def test_pinning_a_batch_pins_every_tensor_and_keeps_the_rest(monkeypatch):
    """Batch.pin_memory, as the DataLoader's pin thread calls it on CUDA runs (on each batch of
    a worker's item, a list): run here with Tensor.pin_memory standing in as a marked copy."""
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned_ids = set()

    def fake_pin(t, *args, **kwargs):
        out = t.clone()
        pinned_ids.add(id(out))
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = table_to_batch(_table(), SCHEMA, "f.parquet")
    batch.slot, batch.position = 3, 17
    [pinned] = pin_memory([batch])
    assert isinstance(pinned, type(batch)) and (pinned.slot, pinned.position) == (3, 17)
    tensors = [pinned.dense, pinned.labels, pinned.weights, pinned.sparse.values(), pinned.sparse.lengths(),
               *(t for pair in pinned.extras.values() for t in pair)]
    assert all(id(t) in pinned_ids for t in tensors)
    assert torch.equal(pinned.sparse.values(), batch.sparse.values()) and pinned.sparse.keys() == batch.sparse.keys()
    assert torch.equal(pinned.dense, batch.dense) and sorted(pinned.extras) == sorted(batch.extras)
