"""data/parquet.py ParquetStream: exactly-once partitioning over rank x worker slots,
shuffling, resumable cursor, and per-file schema validation."""

from __future__ import annotations

import math

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from data.parquet import ParquetStream
from data.schema import DataError, FeatureSpec, Schema
from trainer.loader import make_loader

# (file name, row-group sizes): uneven on purpose; 101 rows in all
LAYOUT = [
    ("a.parquet", [10, 10, 10, 7]),
    ("b.parquet", [8, 3, 12]),
    ("c/d.parquet", [41]),
]
TOTAL = sum(sum(sizes) for _, sizes in LAYOUT)

SCHEMA = Schema(
    label_columns=("label",),
    dense_columns=("row_id",),
    features=(FeatureSpec("s", 10), FeatureSpec("m", 1000)),
    id_policy="modulo",
    dense_transform="none",
)


def _rows(lo: int, hi: int) -> pa.Table:
    ids = np.arange(lo, hi)
    return pa.table({
        "row_id": pa.array(ids.astype(np.float64)),
        "label": pa.array(ids % 2, pa.int64()),
        "s": pa.array(ids, pa.int64()),
        # row r has (r % 3) ids, all equal to r
        "m": pa.array([[int(r)] * (int(r) % 3) for r in ids], pa.list_(pa.int64())),
        "extra": pa.array([str(r) for r in ids]),  # not in the schema: never read
    })


def _write_layout(root: Path) -> None:
    start = 0
    for name, sizes in LAYOUT:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(path, _rows(0, 1).schema) as w:
            for n in sizes:
                w.write_table(_rows(start, start + n))
                start += n


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("stream")
    _write_layout(root)
    # sanity of the fixture itself: row groups are as laid out
    assert pq.ParquetFile(root / "b.parquet").metadata.num_row_groups == 3
    return str(root)


def _stream(path: str, **kw) -> ParquetStream:
    args = dict(batch_size=7, rank=0, world_size=1, num_workers=0, shuffle=False, shuffle_buffer_rows=0, seed=0)
    args.update(kw)
    return ParquetStream(path, SCHEMA, **args)


def _ids(batch) -> list[int]:
    return [int(x) for x in batch.dense[:, 0].tolist()]


def _loader(stream: ParquetStream) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=stream.num_workers)


def _check_batch_consistent(batch) -> None:
    """Labels and sparse ids travel with their row."""
    ids = np.array(_ids(batch))
    np.testing.assert_array_equal(batch.labels[:, 0].numpy(), ids % 2)
    d = batch.sparse.to_dict()
    np.testing.assert_array_equal(d["s"].values().numpy(), ids % 10)
    np.testing.assert_array_equal(d["m"].lengths().numpy(), ids % 3)
    np.testing.assert_array_equal(d["m"].values().numpy(), np.repeat(ids, ids % 3) % 1000)
    assert batch.weights.tolist() == [1.0] * len(ids)


# --------------------------------------------------------------------------- discovery


def test_discovers_all_row_groups_in_sorted_file_order(dataset):
    s = _stream(dataset)
    assert s.total_rows == TOTAL == 101
    assert [p.num_rows for p in s.pieces] == [10, 10, 10, 7, 8, 3, 12, 41]
    assert [Path(p.path).name for p in s.pieces] == ["a.parquet"] * 4 + ["b.parquet"] * 3 + ["d.parquet"]
    assert [p.row_group for p in s.pieces] == [0, 1, 2, 3, 0, 1, 2, 0]
    assert [p.first_row for p in s.pieces] == [0, 10, 20, 30, 0, 8, 11, 0]  # file-relative, for error messages


def test_single_process_reads_everything_in_order(dataset):
    s = _stream(dataset, batch_size=7)
    batches = list(s)
    assert [b.batch_size for b in batches] == [7] * 14 + [3]
    assert list(itertools.chain.from_iterable(_ids(b) for b in batches)) == list(range(TOTAL))
    for b in batches:
        _check_batch_consistent(b)
    assert [b.position for b in batches] == [min(7 * (i + 1), TOTAL) for i in range(15)]
    assert {b.slot for b in batches} == {0}


# --------------------------------------------------------------------------- partitioning


def _read_ranks(path: str, world: int, workers: int, **kw) -> dict[int, list]:
    """rank -> batches in DataLoader order, plus each fresh stream's remaining_batches()."""
    out = {}
    for rank in range(world):
        stream = _stream(path, rank=rank, world_size=world, num_workers=workers, **kw)
        expected = stream.remaining_batches()
        batches = list(_loader(stream))
        out[rank] = (batches, expected, stream)
    return out


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_two_workers_exactly_once(dataset, shuffle):
    kw = dict(batch_size=6, shuffle=shuffle, shuffle_buffer_rows=9 if shuffle else 0, seed=5)
    per_rank = _read_ranks(dataset, world=2, workers=2, **kw)
    seen: list[int] = []
    slot_rows: dict[int, list[int]] = {}
    for rank, (batches, expected_batches, stream) in per_rank.items():
        assert stream.num_slots == 4
        assert stream.rank_slots() == [2 * rank, 2 * rank + 1]
        assert len(batches) == expected_batches  # remaining_batches() matches what is yielded
        for b in batches:
            assert b.slot in stream.rank_slots()
            assert 1 <= b.batch_size <= 6
            _check_batch_consistent(b)
            slot_rows.setdefault(b.slot, []).extend(_ids(b))
            seen.extend(_ids(b))
    assert sorted(seen) == list(range(TOTAL))  # every row exactly once
    sizes = [len(slot_rows[s]) for s in range(4)]
    assert sum(sizes) == TOTAL
    assert max(sizes) - min(sizes) <= 1
    # slot s owns the contiguous range [T*s//S, T*(s+1)//S) of the epoch's row sequence
    stream = per_rank[0][2]
    for s in range(4):
        lo, hi = TOTAL * s // 4, TOTAL * (s + 1) // 4
        assert stream.slot_range(s) == (lo, hi)
        if not shuffle:
            assert slot_rows[s] == list(range(lo, hi))
        else:
            assert slot_rows[s] != list(range(lo, hi))  # actually shuffled


def test_uneven_world_sizes_cover_everything(dataset):
    # 3 ranks x 1 worker and 1 rank x 3 workers: 101 rows over 3 slots
    for world, workers in ((3, 1), (1, 3)):
        per_rank = _read_ranks(dataset, world=world, workers=workers, batch_size=8)
        seen = [i for batches, _, _ in per_rank.values() for b in batches for i in _ids(b)]
        assert sorted(seen) == list(range(TOTAL))
        counts = {}
        for batches, expected, _ in per_rank.values():
            assert len(batches) == expected
            for b in batches:
                counts[b.slot] = counts.get(b.slot, 0) + b.batch_size
        assert sorted(counts.values()) == [33, 34, 34]


def test_make_loader_partitions(dataset):
    seen = []
    for rank in range(2):
        stream = _stream(dataset, rank=rank, world_size=2, num_workers=2, batch_size=10)
        loader = make_loader(stream, torch.device("cpu"))
        assert loader.num_workers == 2
        batches = list(loader)
        assert len(batches) == stream.remaining_batches()
        seen += [i for b in batches for i in _ids(b)]
    assert sorted(seen) == list(range(TOTAL))


def test_remaining_batches_counts_down(dataset):
    stream = _stream(dataset, rank=1, world_size=2, num_workers=2, batch_size=4)
    # slots 2 and 3 hold 25 and 26 rows
    assert [stream.slot_rows(s) for s in (2, 3)] == [25, 26]
    assert stream.remaining_batches() == 7 + 7
    stream.positions = {2: 24, 3: 8}
    assert stream.remaining_batches() == 1 + 5
    stream.positions = {2: 25, 3: 26}
    assert stream.remaining_batches() == 0


def test_shuffle_epochs_differ_and_seed_reproduces(dataset):
    def order(epoch: int, seed: int) -> list[int]:
        stream = _stream(dataset, batch_size=7, shuffle=True, shuffle_buffer_rows=16, seed=seed)
        stream.set_epoch(epoch)
        return [i for b in stream for i in _ids(b)]

    e0, e1 = order(0, 11), order(1, 11)
    assert e0 != e1
    assert sorted(e0) == sorted(e1) == list(range(TOTAL))
    assert order(0, 11) == e0  # same seed and epoch -> same order
    assert order(0, 12) != e0
    assert e0 != list(range(TOTAL))


def test_shuffle_permutes_row_groups_across_epochs(dataset):
    stream = _stream(dataset, shuffle=True, shuffle_buffer_rows=16, seed=1)
    orders = [[(p.path, p.row_group) for p in stream.ordered_pieces(e)] for e in range(4)]
    assert all(sorted(o) == sorted(orders[0]) for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    # unshuffled: the natural order whatever the epoch
    plain = _stream(dataset)
    assert plain.ordered_pieces(3) == plain.pieces


def test_shuffle_window_keeps_rows_within_window(dataset):
    # window 16: each run of 16 consumed rows is a permutation of the slot's next 16 rows
    stream = _stream(dataset, batch_size=5, shuffle=True, shuffle_buffer_rows=16, seed=2)
    piece_order = stream.ordered_pieces(0)
    global_seq = []
    for p in piece_order:
        first = sum(q.num_rows for q in stream.pieces[: stream.pieces.index(p)])
        global_seq += list(range(first, first + p.num_rows))
    got = [i for b in stream for i in _ids(b)]
    for w in range(0, TOTAL, 16):
        assert sorted(got[w:w + 16]) == sorted(global_seq[w:w + 16])


def test_shuffle_with_zero_buffer_is_off(dataset):
    s = _stream(dataset, shuffle=True, shuffle_buffer_rows=0)
    assert s.shuffle is False
    assert [i for b in s for i in _ids(b)] == list(range(TOTAL))


def test_worker_count_mismatch_raises(dataset):
    stream = _stream(dataset, num_workers=2)
    with pytest.raises(DataError, match="num_workers"):
        list(DataLoader(stream, batch_size=None, num_workers=1))


# --------------------------------------------------------------------------- resume


def _consume(stream: ParquetStream, k: int) -> list[list[int]]:
    got = []
    loader = _loader(stream)
    it = iter(loader)
    for _ in range(k):
        batch = next(it)
        stream.advance(batch)
        got.append(_ids(batch))
    del it
    return got


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_reproduces_uninterrupted_sequence(dataset, shuffle):
    kw = dict(rank=1, world_size=2, num_workers=2, batch_size=5, shuffle=shuffle,
              shuffle_buffer_rows=6 if shuffle else 0, seed=9)
    full_stream = _stream(dataset, **kw)
    full = [_ids(b) for b in _loader(full_stream)]
    # slots 2 and 3 hold 25 and 26 rows -> 5 and 6 batches, interleaved by the DataLoader
    assert len(full) == 11
    rows = sorted(i for b in full for i in b)
    assert len(rows) == len(set(rows)) == 51
    if not shuffle:
        assert rows == list(range(50, 101))
    for k in (1, 2, 3, 6, 9, 10):
        first = _stream(dataset, **kw)
        head = _consume(first, k)
        assert head == full[:k]
        state = first.state_dict()
        assert state["num_slots"] == 4
        assert sum(state["positions"].values()) == sum(len(b) for b in head)
        resumed = _stream(dataset, **kw)
        resumed.load_state_dict(state)
        assert resumed.remaining_batches() == 11 - k
        tail = [_ids(b) for b in _loader(resumed)]
        assert head + tail == full, f"k={k}"


def test_resume_in_main_process(dataset):
    kw = dict(batch_size=6, shuffle=True, shuffle_buffer_rows=10, seed=4)
    full = [_ids(b) for b in _stream(dataset, **kw)]
    for k in (1, 5):
        first = _stream(dataset, **kw)
        it = iter(first)
        head = [_ids(next(it)) for _ in range(k)]
        state = first.state_dict()
        resumed = _stream(dataset, **kw)
        resumed.load_state_dict(state)
        assert head + [_ids(b) for b in resumed] == full


def test_state_dict_cursor_describes_position(dataset):
    stream = _stream(dataset, batch_size=7)
    it = iter(stream)
    for _ in range(5):
        next(it)  # 35 rows consumed: a.parquet holds 37 rows in groups 10,10,10,7
    state = stream.state_dict()
    assert state["positions"] == {"0": 35}
    cur = state["cursor"]["0"]
    assert Path(cur["file"]).name == "a.parquet"
    assert (cur["row_group"], cur["offset"], cur["rows_consumed"]) == (3, 5, 35)


def test_state_with_other_slot_count_raises(dataset):
    saved = _stream(dataset, rank=0, world_size=2, num_workers=2).state_dict()
    assert saved["num_slots"] == 4
    other = _stream(dataset, rank=0, world_size=2, num_workers=1)
    with pytest.raises(DataError, match="4 reader slots, now 2.*carry_over"):
        other.load_state_dict(saved)


def _read_all(streams: list[ParquetStream]) -> list[int]:
    return [i for st in streams for b in _loader(st) for i in _ids(b)]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("old, new", [((2, 2), (1, 1)), ((1, 1), (2, 2)), ((2, 1), (3, 2)), ((3, 2), (2, 1))])
def test_layout_change_mid_epoch_reads_every_row_exactly_once(dataset, shuffle, old, new):
    """Stop part-way with one (world size, workers) layout, carry the epoch over to another,
    and change again part-way through the carried rows: every row exactly once in all."""
    kw = dict(batch_size=4, shuffle=shuffle, shuffle_buffer_rows=7 if shuffle else 0, seed=3)

    def layout(world, workers):
        return [_stream(dataset, rank=r, world_size=world, num_workers=workers, **kw) for r in range(world)]

    first = layout(*old)
    seen = [i for k, st in enumerate(first) for b in _consume(st, 2 + k) for i in b]
    states = [st.state_dict() for st in first]
    second = layout(*new)
    for st in second:
        st.carry_over(states)
    assert sum(st.remaining_batches() for st in second) >= math.ceil((101 - len(seen)) / 4)
    seen += [i for st in second for b in _consume(st, 1) for i in b]
    # and once more, from the carried layout to the first one
    third = layout(*old)
    states = [st.state_dict() for st in second]
    for st in third:
        st.carry_over(states)
    seen += _read_all(third)
    assert sorted(seen) == list(range(101))


def test_same_layout_resume_inside_carried_rows(dataset):
    kw = dict(batch_size=3, shuffle=True, shuffle_buffer_rows=9, seed=1)
    old = [_stream(dataset, rank=r, world_size=2, **kw) for r in range(2)]
    seen = [i for st in old for b in _consume(st, 3) for i in b]
    new = _stream(dataset, **kw)
    new.carry_over([st.state_dict() for st in old])
    seen += [i for b in _consume(new, 4) for i in b]
    again = _stream(dataset, **kw)
    again.load_state_dict(new.state_dict())  # same layout: the carry and position come back
    assert again.remaining_batches() == new.remaining_batches()
    seen += [i for b in _loader(again) for i in _ids(b)]
    assert sorted(seen) == list(range(101))


def test_set_epoch_resets_cursor(dataset):
    stream = _stream(dataset, batch_size=50)
    next(iter(stream))
    assert stream.positions == {0: 50}
    stream.set_epoch(1)
    assert stream.epoch == 1 and stream.positions == {} and stream.remaining_batches() == 3


# --------------------------------------------------------------------------- validation


def test_missing_column_names_file_and_column(tmp_path):
    t = _rows(0, 5).drop_columns(["s"])
    pq.write_table(_rows(0, 5), tmp_path / "a.parquet")
    pq.write_table(t, tmp_path / "b.parquet")
    with pytest.raises(DataError) as e:
        _stream(str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "b.parquet") in msg
    assert "'s'" in msg and "missing" in msg and "data.sparse_columns" in msg


def test_string_sparse_column_names_file_and_column(tmp_path):
    t = _rows(0, 5)
    t = t.set_column(t.schema.get_field_index("s"), "s", pa.array([str(i) for i in range(5)]))
    pq.write_table(t, tmp_path / "x.parquet")
    with pytest.raises(DataError) as e:
        _stream(str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "x.parquet") in msg
    assert "'s'" in msg and "string" in msg and "int64" in msg


def test_list_of_float_sparse_column_rejected(tmp_path):
    t = _rows(0, 3)
    t = t.set_column(t.schema.get_field_index("m"), "m", pa.array([[1.0], [], [2.0]], pa.list_(pa.float64())))
    pq.write_table(t, tmp_path / "x.parquet")
    with pytest.raises(DataError, match="'m'"):
        _stream(str(tmp_path))


def test_string_dense_column_rejected(tmp_path):
    t = _rows(0, 3)
    t = t.set_column(t.schema.get_field_index("row_id"), "row_id", pa.array(["a", "b", "c"]))
    pq.write_table(t, tmp_path / "x.parquet")
    with pytest.raises(DataError, match="'row_id'.*dense"):
        _stream(str(tmp_path))


def test_empty_directory_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("not parquet")
    with pytest.raises(DataError) as e:
        _stream(str(tmp_path))
    assert str(tmp_path) in str(e.value) and "no .parquet" in str(e.value)


def test_missing_path_raises(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        _stream(str(tmp_path / "nope"))


def test_single_file_path(tmp_path):
    pq.write_table(_rows(0, 9), tmp_path / "one.parquet", row_group_size=4)
    s = _stream(str(tmp_path / "one.parquet"), batch_size=4)
    assert [p.num_rows for p in s.pieces] == [4, 4, 1]
    assert [i for b in s for i in _ids(b)] == list(range(9))


def test_null_label_in_stream_raises(tmp_path):
    t = _rows(0, 4)
    t = t.set_column(t.schema.get_field_index("label"), "label", pa.array([1, None, 0, 1], pa.int64()))
    pq.write_table(t, tmp_path / "x.parquet", write_statistics=False)
    s = _stream(str(tmp_path))
    with pytest.raises(DataError, match=r"x.parquet: column 'label' row 1: label is null"):
        list(s)


def test_null_label_proven_by_footer_statistics_fails_at_construction(tmp_path):
    t = _rows(0, 4)
    t = t.set_column(t.schema.get_field_index("label"), "label", pa.array([1, 0, 0, None], pa.int64()))
    pq.write_table(t, tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x.parquet: column 'label' row 3: label is null \(1 null among the 4 rows"):
        _stream(str(tmp_path))


def test_bad_ids_in_later_file_name_file_and_column(tmp_path):
    pq.write_table(_rows(0, 4), tmp_path / "a.parquet")
    bad = _rows(4, 8)
    bad = bad.set_column(bad.schema.get_field_index("s"), "s", pa.array([4, 5, 60, 7], pa.int64()))
    # without footer statistics the bad id can only be found when its row is read
    pq.write_table(bad, tmp_path / "b.parquet", write_statistics=False)
    strict = Schema(SCHEMA.label_columns, SCHEMA.dense_columns, SCHEMA.features, id_policy="strict")
    stream = ParquetStream(str(tmp_path), strict, batch_size=2)
    it = iter(stream)
    assert [_ids(next(it)) for _ in range(3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(DataError) as e:
        next(it)
    msg = str(e.value)
    assert "'s'" in msg and "id 60" in msg and "[0, 10)" in msg
    # the offending id's own file and file-relative row (global row 6 is b.parquet's row 2)
    assert msg.startswith(f"{tmp_path / 'b.parquet'}: column 's' row 2: id 60 is outside [0, 10)")
    assert "\n" not in msg


def test_bad_ids_proven_by_footer_statistics_fail_at_construction(tmp_path):
    pq.write_table(_rows(0, 4), tmp_path / "a.parquet")
    bad = _rows(4, 12)
    bad = bad.set_column(bad.schema.get_field_index("s"), "s", pa.array([4, 5, 6, 7, 8, 9, -3, 1], pa.int64()))
    pq.write_table(bad, tmp_path / "b.parquet", row_group_size=4)  # the bad id is in row group 1
    strict = Schema(SCHEMA.label_columns, SCHEMA.dense_columns, SCHEMA.features, id_policy="strict")
    with pytest.raises(DataError) as e:
        ParquetStream(str(tmp_path), strict, batch_size=2)
    assert str(e.value).startswith(f"{tmp_path / 'b.parquet'}: column 's' row 6: id -3 is outside [0, 10)")
    # the same data under modulo is fine: statistics are only checked against strict/binary rules
    assert ParquetStream(str(tmp_path), SCHEMA, batch_size=2).total_rows == 12
