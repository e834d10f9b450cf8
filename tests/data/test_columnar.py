"""data/columnar.py, the reader's fast path: on the same rows it yields batches equal, in every
tensor, counter and cursor value, to the per-batch path (`table_to_batch`), and it leaves every
window that needs an error, a dropped row or a column type it does not take to that path. And
data/batch.py's pickling: a Batch crosses a DataLoader worker's pipe as inline bytes."""

from __future__ import annotations

import pickle
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import data.parquet as parquet
from data import columnar
from data.batch import Batch, batch_tensors, padding_batch
from data.parquet import ParquetStream
from data.schema import DataError, FeatureSpec, Schema

# (file name, row-group sizes): uneven, so windows span row groups and files; 123 rows in all
LAYOUT = [("a.parquet", [20, 13, 30]), ("b.parquet", [7, 25]), ("c.parquet", [28])]
TOTAL = 123
FEATURES = (FeatureSpec("s", 10), FeatureSpec("t", 50), FeatureSpec("u", 1000))


def _schema(**kw) -> Schema:
    args = dict(label_columns=("label", "score"), dense_columns=("d0", "d1", "d2"), features=FEATURES,
                binary_labels=("label",), id_policy="modulo", dense_transform="log1p")
    args.update(kw)
    return Schema(**args)


def _rows(lo: int, hi: int, seed: int = 0, id_nulls: bool = False) -> pa.Table:
    """Rows lo..hi-1: null and negative dense values, ids below 0 and beyond every table."""
    rng = np.random.default_rng([seed, lo])
    n = hi - lo
    r = np.arange(lo, hi)
    d0 = rng.normal(0, 50, n).astype(np.float32)
    d1 = rng.exponential(100, n)
    d1_null = rng.random(n) < 0.2
    d2 = rng.integers(-5, 1000, n)
    s_ids = rng.integers(-30, 30, n)
    s_null = (rng.random(n) < 0.15) if id_nulls else np.zeros(n, dtype=bool)
    return pa.table({
        "row": pa.array(r, pa.int64()),
        "label": pa.array(r % 2, pa.int64()),
        "score": pa.array(rng.normal(0, 1, n), pa.float64()),
        "d0": pa.array(d0, pa.float32()),
        "d1": pa.array(d1, pa.float64(), mask=d1_null),
        "d2": pa.array(d2, pa.int32()),
        "s": pa.array(s_ids, pa.int64(), mask=s_null),
        "t": pa.array(rng.integers(0, 50, n), pa.int64()),  # always in range
        "u": pa.array(rng.integers(0, 5000, n), pa.int64()),
    })


def _write(root: Path, seed: int = 0, id_nulls: bool = False, change=None) -> str:
    start = 0
    for name, sizes in LAYOUT:
        with pq.ParquetWriter(root / name, _rows(0, 1, seed, id_nulls).schema if change is None
                              else change(_rows(0, 1, seed, id_nulls), 0).schema) as w:
            for n in sizes:
                t = _rows(start, start + n, seed, id_nulls)
                w.write_table(t if change is None else change(t, start))
                start += n
    return str(root)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return _write(tmp_path_factory.mktemp("columnar"))


@pytest.fixture(scope="module")
def null_ids(tmp_path_factory) -> str:
    return _write(tmp_path_factory.mktemp("columnar_nulls"), seed=1, id_nulls=True)


@pytest.fixture
def counted(monkeypatch) -> dict:
    """How many batches each path built."""
    calls = {"general": 0, "fast": 0}
    general, fast = parquet.table_to_batch, columnar.make_batch

    def count_general(*a, **kw):
        calls["general"] += 1
        return general(*a, **kw)

    def count_fast(*a, **kw):
        calls["fast"] += 1
        return fast(*a, **kw)

    monkeypatch.setattr(parquet, "table_to_batch", count_general)
    monkeypatch.setattr(columnar, "make_batch", count_fast)
    return calls


def _stream(path: str, schema: Schema, fast: bool, **kw) -> ParquetStream:
    args = dict(batch_size=8, shuffle=True, shuffle_buffer_rows=16, seed=3)
    args.update(kw)
    stream = ParquetStream(path, schema, **args)
    stream._columnar = fast
    return stream


def assert_same_batch(a: Batch, b: Batch) -> None:
    for name in ("dense", "labels", "weights"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), name
    assert a.dense.is_contiguous() and a.labels.is_contiguous()
    sa, sb = a.sparse, b.sparse
    assert sa.keys() == sb.keys()
    for name in ("values", "lengths"):
        x, y = getattr(sa, name)(), getattr(sb, name)()
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert (sa.weights_or_none() is None) == (sb.weights_or_none() is None)
    if sa.weights_or_none() is not None:
        assert torch.equal(sa.weights(), sb.weights())
    assert a.id_stats.dtype == b.id_stats.dtype
    np.testing.assert_array_equal(a.id_stats, b.id_stats)
    for name in ("slot", "position", "null_dense", "negative_dense", "dropped_rows", "all_dropped"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.extras.keys() == b.extras.keys()
    for k in a.extras:
        assert all(torch.equal(x, y) for x, y in zip(a.extras[k], b.extras[k]))


def _compare(fast_batches: list[Batch], general_batches: list[Batch]) -> None:
    assert len(fast_batches) == len(general_batches)
    for a, b in zip(fast_batches, general_batches):
        assert_same_batch(a, b)


def _both(path: str, schema: Schema, **kw) -> tuple[list[Batch], list[Batch]]:
    return list(_stream(path, schema, True, **kw)), list(_stream(path, schema, False, **kw))


# --------------------------------------------------------------------------- equality


@pytest.mark.parametrize("kw", [
    dict(batch_size=8),                                # the window (16) holds 2 batches
    dict(batch_size=5),                                # batches straddle windows
    dict(batch_size=40),                               # a batch spans several windows
    dict(batch_size=7, shuffle=False),                 # unshuffled: one window of 65,536 rows
    dict(batch_size=6, shuffle_buffer_rows=50, seed=11),
], ids=["divides", "straddles", "spans", "unshuffled", "big-window"])
def test_fast_path_equals_general_path(dataset, counted, kw):
    fast = list(_stream(dataset, _schema(), True, **kw))
    assert counted == {"general": 0, "fast": len(fast)}
    general = list(_stream(dataset, _schema(), False, **kw))
    _compare(fast, general)
    assert sum(b.batch_size for b in fast) == TOTAL
    # the data exercises every counter the fast path keeps
    assert sum(b.null_dense for b in fast) > 0 and sum(b.negative_dense for b in fast) > 0
    stats = sum(b.id_stats for b in fast)
    assert stats[0, 0] > 0 and stats[0, 1] > 0 and stats[2, 1] > 0 and not stats[1].any()


@pytest.mark.parametrize("schema", [
    _schema(dense_missing="indicator"),
    _schema(id_policy="hash"),
    _schema(dense_transform="none"),
    _schema(dense_columns=()),
    _schema(label_columns=("label",), binary_labels=None),
    _schema(features=(FeatureSpec("t", 50),), id_policy="strict"),
], ids=["indicator", "hash", "no-transform", "no-dense", "binary-default", "strict-in-range"])
def test_fast_path_equals_general_path_per_schema(dataset, counted, schema):
    fast, general = _both(dataset, schema, batch_size=6)
    assert counted["general"] == len(general) and counted["fast"] == len(fast)
    _compare(fast, general)


def test_null_ids_are_empty_bags_counted_as_null(null_ids, counted):
    for kw in (dict(batch_size=8), dict(batch_size=5), dict(shuffle=False, batch_size=9)):
        fast, general = _both(null_ids, _schema(), **kw)
        _compare(fast, general)
    assert counted["general"] == counted["fast"]
    nulls = sum(int(b.id_stats[0, 2]) for b in fast)
    assert nulls > 0
    assert sum(int(b.sparse["s"].lengths().sum()) for b in fast) == TOTAL - nulls


def test_other_column_types(tmp_path, counted):
    """int32 and uint64 ids, bool and int labels, a dense column of nulls only."""
    def change(t: pa.Table, start: int) -> pa.Table:
        n = t.num_rows
        t = t.set_column(t.schema.get_field_index("t"), "t", pa.array(t.column("t").to_numpy(), pa.int32()))
        t = t.set_column(t.schema.get_field_index("u"), "u", pa.array(t.column("u").to_numpy(), pa.uint64()))
        t = t.set_column(t.schema.get_field_index("label"), "label",
                         pa.array(t.column("label").to_numpy() == 1, pa.bool_()))
        return t.append_column("empty", pa.nulls(n, pa.float32()))
    path = _write(tmp_path, seed=2, change=change)
    schema = _schema(dense_columns=("d0", "d1", "d2", "empty"))
    fast, general = _both(path, schema, batch_size=6)
    assert counted["general"] == len(general) and counted["fast"] == len(fast)
    _compare(fast, general)


def test_two_slots_through_workers(dataset):
    def read(fast: bool) -> list[Batch]:
        stream = _stream(dataset, _schema(), fast, num_workers=2, batch_size=5)
        return list(DataLoader(stream, batch_size=None, num_workers=2))

    fast, general = read(True), read(False)
    assert {b.slot for b in fast} == {0, 1}
    _compare(fast, general)


def test_two_ranks(dataset):
    for rank in (0, 1):
        fast, general = _both(dataset, _schema(), rank=rank, world_size=2, batch_size=6)
        assert {b.slot for b in fast} == {rank}
        _compare(fast, general)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_resume_mid_window(dataset, k):
    """A cursor inside a window (batch 6 of window 16): the rest equals an uninterrupted run,
    on either path."""
    full = list(_stream(dataset, _schema(), True, batch_size=6))
    first = _stream(dataset, _schema(), True, batch_size=6)
    it = iter(first)
    head = [next(it) for _ in range(k)]
    state = first.state_dict()
    assert state["positions"]["0"] % 16  # mid-window
    tails = []
    for fast in (True, False):
        resumed = _stream(dataset, _schema(), fast, batch_size=6)
        resumed.load_state_dict(state)
        tails.append(list(resumed))
    _compare(tails[0], tails[1])
    _compare(head + tails[0], full)


def test_layout_change_carries_over(dataset):
    def run(fast: bool) -> list[Batch]:
        old = [_stream(dataset, _schema(), fast, rank=r, world_size=2, batch_size=4) for r in range(2)]
        for st in old:
            it = iter(st)
            for _ in range(3):
                st.advance(next(it))
        new = _stream(dataset, _schema(), fast, batch_size=4)
        new.carry_over([st.state_dict() for st in old])
        return list(new)

    _compare(run(True), run(False))


# --------------------------------------------------------------------------- fallback


def _with_value(path: Path, column: str, row: int, value, **kw) -> str:
    def change(t: pa.Table, start: int) -> pa.Table:
        if not start <= row < start + t.num_rows:
            return t
        values = t.column(column).to_pylist()
        values[row - start] = value
        return t.set_column(t.schema.get_field_index(column), column, pa.array(values, t.schema.field(column).type))
    return _write(path, change=change, **kw)


def _error_and_batches(stream: ParquetStream) -> tuple[str, list[Batch]]:
    got = []
    with pytest.raises(DataError) as e:
        for b in stream:
            got.append(b)
    return str(e.value), got


@pytest.mark.parametrize("column, value, match", [
    ("d0", float("nan"), "value nan is not finite"),
    ("score", float("inf"), "value inf is not finite"),
    ("label", 3, "label 3 is not 0 or 1"),
    ("u", -7, "id -7 is outside"),
])
def test_bad_value_raises_as_before(tmp_path, column, value, match):
    # written without statistics, so that only reading can find it; global row 70 is b's row 7
    schema = _schema(id_policy="strict", features=(FeatureSpec("t", 50), FeatureSpec("u", 5000)))
    path = _with_value(tmp_path, column, 70, value)
    for f in Path(path).glob("*.parquet"):
        pq.write_table(pq.read_table(f), f, write_statistics=False, row_group_size=16)
    fast_msg, fast = _error_and_batches(_stream(path, schema, True, batch_size=5))
    general_msg, general = _error_and_batches(_stream(path, schema, False, batch_size=5))
    assert fast_msg == general_msg and match in fast_msg
    assert f"b.parquet: column {column!r} row 7: " in fast_msg
    _compare(fast, general)
    assert fast  # the batches before the bad one came through


def test_drop_row_window_falls_back(tmp_path, counted):
    path = _with_value(tmp_path, "d1", 40, float("nan"))
    schema = _schema(non_finite="drop_row")
    fast, general = _both(path, schema, batch_size=5)
    _compare(fast, general)
    assert sum(b.dropped_rows for b in fast) == 1
    assert 0 < counted["general"] - len(general) < len(fast)  # only the NaN's window fell back


def test_list_column_falls_back(tmp_path, counted):
    def change(t: pa.Table, start: int) -> pa.Table:
        lists = [[int(x)] * (i % 3) for i, x in enumerate(t.column("u").to_numpy())]
        return t.set_column(t.schema.get_field_index("u"), "u", pa.array(lists, pa.list_(pa.int64())))
    path = _write(tmp_path, change=change)
    fast, general = _both(path, _schema(), batch_size=6)
    _compare(fast, general)
    assert counted["fast"] == 0


@pytest.mark.parametrize("schema", [
    _schema(features=(*FEATURES[:2], FeatureSpec("u", 1000, weight_column="d0"))),
    _schema(passthrough=("row",)),
    _schema(absent_features=frozenset({"t"})),
], ids=["weights", "passthrough", "absent"])
def test_schemas_the_fast_path_does_not_take(dataset, counted, schema):
    assert not columnar.applies(schema)
    fast, general = _both(dataset, schema, batch_size=6)
    _compare(fast, general)
    assert counted["fast"] == 0


# --------------------------------------------------------------------------- pickling


def _forking_roundtrip(batch: Batch) -> Batch:
    return pickle.loads(ForkingPickler.dumps(batch))


def test_batch_pickles_inline_and_rebuilds_equal(dataset):
    for batch in list(_stream(dataset, _schema(dense_missing="indicator"), True, batch_size=7))[:3]:
        assert batch_tensors(batch) is not None
        data = ForkingPickler.dumps(batch)
        assert len(data) > batch.sparse.values().numel() * 8  # the bytes travel in the pickle
        back = pickle.loads(data)
        assert_same_batch(back, batch)
        back.dense += 1  # writable, and not the sender's memory
        assert not torch.equal(back.dense, batch.dense)
    padding = padding_batch(3, ["a", "b"], 1, weighted=True, passthrough=("p",))
    assert_same_batch(_forking_roundtrip(padding), padding)


def test_batch_with_tensor_caches_pickles_as_usual(dataset):
    batch = next(iter(_stream(dataset, _schema(), True)))
    batch.sparse.to_dict()  # fills the KJT's caches, some holding tensors
    assert batch_tensors(batch) is None
    back = _forking_roundtrip(batch)
    assert_same_batch(back, batch)
    keys = batch.sparse.keys()
    assert all(torch.equal(back.sparse[k].values(), batch.sparse[k].values()) for k in keys)
    plain = KeyedJaggedTensor(keys=["a"], values=torch.arange(3), lengths=torch.ones(3, dtype=torch.int32))
    odd = Batch(dense=torch.zeros(4, 2).t(), sparse=plain, labels=torch.zeros(2, 1), weights=torch.ones(2))
    assert batch_tensors(odd) is None  # a transposed view
    assert torch.equal(_forking_roundtrip(odd).dense, odd.dense)


def test_null_slots_holding_garbage():
    """What an Arrow buffer holds under a null is unspecified: neither the dense value nor the
    id there may leak into a batch or a counter."""
    def with_garbage(typ, values, valid):
        bitmap = pa.py_buffer(np.packbits(np.array(valid, dtype=bool), bitorder="little").tobytes())
        return pa.Array.from_buffers(typ, len(values), [bitmap, pa.py_buffer(np.array(values, typ.to_pandas_dtype()))],
                                     null_count=valid.count(False))

    table = pa.table({
        "label": pa.array([0, 1, 1, 0], pa.int64()),
        "d": with_garbage(pa.float32(), [1.5, -7.0, 3.0, 9.0], [True, False, True, False]),
        "s": with_garbage(pa.int64(), [1, -5, 3, 400], [True, False, True, False]),
    })
    schema = Schema(label_columns=("label",), dense_columns=("d",), features=(FeatureSpec("s", 10),),
                    dense_transform="log1p", dense_missing="indicator")
    columns = columnar.Columns.convert([table], np.array([2, 0, 3, 1]), schema)
    fast = columnar.make_batch([(columns, 0, 4)], schema)
    assert_same_batch(fast, parquet.table_to_batch(table.take([2, 0, 3, 1]), schema, "x"))
    assert fast.null_dense == 2 and fast.negative_dense == 0 and fast.id_stats[0].tolist() == [0, 0, 2, 0]
