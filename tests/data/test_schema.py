"""data/schema.py (id policies) and data/parquet.py table_to_batch (Arrow -> Batch)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from data.parquet import table_to_batch
from data.schema import DataError, FeatureSpec, Schema, map_ids


# --------------------------------------------------------------------------- map_ids


def test_modulo_in_range_ids_unchanged():
    ids = np.array([0, 1, 5, 9], dtype=np.int64)
    out, neg, oor = map_ids(ids, 10, "modulo", "f: column 'a'")
    np.testing.assert_array_equal(out, ids)
    assert (neg, oor) == (0, 0)


def test_modulo_floor_mod_for_negatives_and_counts():
    ids = np.array([-1, -10, -11, 10, 23, 3, 0, -3], dtype=np.int64)
    out, neg, oor = map_ids(ids, 10, "modulo", "w")
    # floor modulo: -1 -> 9, -10 -> 0, -11 -> 9, -3 -> 7
    np.testing.assert_array_equal(out, [9, 0, 9, 0, 3, 3, 0, 7])
    assert neg == 4
    assert oor == 2  # 10 and 23
    assert out.dtype == np.int64
    assert ((out >= 0) & (out < 10)).all()


def test_modulo_accepts_int32_input():
    out, neg, oor = map_ids(np.array([-2, 7], dtype=np.int32), 5, "modulo", "w")
    np.testing.assert_array_equal(out, [3, 2])
    assert out.dtype == np.int64
    assert (neg, oor) == (1, 1)


def test_hash_in_range_deterministic_and_counts():
    rng = np.random.default_rng(0)
    ids = np.concatenate([
        rng.integers(-(2**62), 2**62, 500),
        np.arange(100),
        np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max, -1]),
    ]).astype(np.int64)
    n = 97
    out, neg, oor = map_ids(ids, n, "hash", "w")
    assert out.dtype == np.int64
    assert out.shape == ids.shape
    assert ((out >= 0) & (out < n)).all()
    assert neg == int((ids < 0).sum())
    assert oor == int((ids >= n).sum())
    out2, _, _ = map_ids(ids.copy(), n, "hash", "w")
    np.testing.assert_array_equal(out, out2)
    # equal raw ids map to equal slots; sequential ids are spread (not the identity)
    seq, _, _ = map_ids(np.arange(100, dtype=np.int64), 1000, "hash", "w")
    assert not np.array_equal(seq, np.arange(100))
    assert len(np.unique(seq)) > 90


def test_hash_matches_reference_splitmix64():
    # splitmix64 finalizer written independently with python ints
    def ref(x: int, n: int) -> int:
        m = (1 << 64) - 1
        z = (x + 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        z = z ^ (z >> 31)
        return z % n

    raw = [0, 1, 2, 12345, 2**40 + 7, -1, -5]
    out, _, _ = map_ids(np.array(raw, dtype=np.int64), 1000, "hash", "w")
    expected = [ref(x & ((1 << 64) - 1), 1000) for x in raw]
    assert out.tolist() == expected


def test_strict_passes_in_range():
    ids = np.array([0, 4, 9], dtype=np.int64)
    out, neg, oor = map_ids(ids, 10, "strict", "w")
    np.testing.assert_array_equal(out, ids)
    assert (neg, oor) == (0, 0)


@pytest.mark.parametrize("bad", [-1, 10, 1000])
def test_strict_raises_naming_where_and_fix(bad):
    where = "/data/part-0.parquet: column 'cat_3'"
    with pytest.raises(DataError) as e:
        map_ids(np.array([1, bad, 2], dtype=np.int64), 10, "strict", where)
    msg = str(e.value)
    assert msg.startswith(where)
    assert f"id {bad}" in msg
    assert "[0, 10)" in msg
    assert "num_embeddings" in msg and "modulo" in msg  # how to fix it


def test_uint64_ids_keep_their_unsigned_value():
    big = 2**64 - 3  # an int64 cast would make this -3
    ids = np.array([1, big, 2**63, 7], dtype=np.uint64)
    out, neg, oor = map_ids(ids, 10, "modulo", "w")
    assert out.tolist() == [1, big % 10, 2**63 % 10, 7] and out.dtype == np.int64
    assert (neg, oor) == (0, 2)
    out, neg, oor = map_ids(ids, 10, "hash", "w")
    signed, _, _ = map_ids(ids.astype(np.int64), 10, "hash", "w")
    np.testing.assert_array_equal(out, signed)  # splitmix64 sees the same 64 bits either way
    assert (neg, oor) == (0, 2)
    out, neg, oor = map_ids(np.array([0, 9], dtype=np.uint64), 10, "strict", "w")
    assert out.tolist() == [0, 9] and out.dtype == np.int64
    with pytest.raises(DataError) as e:
        map_ids(ids, 10, "strict", "f.parquet: column 'c'")
    assert str(e.value).startswith(f"f.parquet: column 'c': id {big} is outside [0, 10) (0 negative, 2 too large")


def test_strict_where_callable_gets_the_index_of_the_first_bad_id():
    seen = []

    def where(j: int) -> str:
        seen.append(j)
        return f"f.parquet: column 'c' row {j * 10}"

    with pytest.raises(DataError) as e:
        map_ids(np.array([1, 2, -4, 50], dtype=np.int64), 10, "strict", where)
    assert seen == [2]
    assert str(e.value).startswith("f.parquet: column 'c' row 20: id -4 is outside [0, 10)")


def test_unknown_policy():
    with pytest.raises(DataError, match="unknown id policy"):
        map_ids(np.array([1]), 10, "wrap", "w")


def test_schema_from_config():
    from trainer.config import load_config

    cfg = load_config(None, [
        'data.sparse_columns=["b", "a"]', 'data.dense_columns=["d"]', 'data.weight_columns.a="wa"',
        'model.tables=[{name="t1", features=["a"], num_embeddings=7}, {name="t2", features=["b"], num_embeddings=9}]',
        "data.id_policy=hash",
    ])
    s = Schema.from_config(cfg.data, cfg.model)
    # features follow the model's table order, not data.sparse_columns order
    assert s.feature_names == ["a", "b"]
    assert s.features == (FeatureSpec("a", 7, "wa"), FeatureSpec("b", 9, None))
    assert s.columns == ["label", "d", "a", "b", "wa"]
    assert s.weighted
    assert s.id_policy == "hash"


# --------------------------------------------------------------------------- table_to_batch


def _schema(**kw) -> Schema:
    base = dict(
        label_columns=("label",),
        dense_columns=("d0", "d1"),
        features=(FeatureSpec("s", 10), FeatureSpec("m", 100)),
    )
    base.update(kw)
    return Schema(**base)


def _kjt(batch, name):
    jt = batch.sparse.to_dict()[name]
    return jt.lengths().tolist(), jt.values().tolist()


def test_scalar_and_list_columns_with_nulls():
    table = pa.table({
        "label": pa.array([1, 0, 1, 0], pa.int64()),
        "d0": pa.array([1.0, None, 3.0, 4.0], pa.float32()),
        "d1": pa.array([None, None, 7, 8], pa.int64()),
        "s": pa.array([3, None, 12, -1], pa.int64()),
        "m": pa.array([[1, 2, 3], None, [], [4, None, 5]], pa.list_(pa.int64())),
    })
    b = table_to_batch(table, _schema(), "file.parquet")
    assert b.batch_size == 4
    assert b.sparse.keys() == ["s", "m"]
    lengths, values = _kjt(b, "s")
    assert lengths == [1, 0, 1, 1]  # null scalar -> empty bag
    assert values == [3, 2, 9]  # 12 % 10, -1 % 10
    lengths, values = _kjt(b, "m")
    assert lengths == [3, 0, 0, 2]  # null list -> empty bag, null element dropped
    assert values == [1, 2, 3, 4, 5]
    # id_stats rows follow feature order: negative, out_of_range, null, truncated
    np.testing.assert_array_equal(b.id_stats, [[1, 1, 1, 0], [0, 0, 2, 0]])
    assert b.id_stats.dtype == np.int64
    # dense: nulls -> 0, counted
    torch.testing.assert_close(b.dense, torch.tensor([[1, 0], [0, 0], [3, 7], [4, 8]], dtype=torch.float32))
    assert b.null_dense == 3
    assert b.dense.dtype == torch.float32
    torch.testing.assert_close(b.labels, torch.tensor([[1.0], [0.0], [1.0], [0.0]]))
    torch.testing.assert_close(b.weights, torch.ones(4))
    assert b.sparse.weights_or_none() is None


def test_multiple_chunks_are_combined():
    t1 = pa.table({"label": [1], "d0": [1.0], "d1": [2.0], "s": [4], "m": pa.array([[7, 8]], pa.list_(pa.int64()))})
    t2 = pa.table({"label": [0], "d0": [3.0], "d1": [4.0], "s": [5], "m": pa.array([[9]], pa.list_(pa.int64()))})
    table = pa.concat_tables([t1, t2])
    assert table.column("m").num_chunks == 2
    b = table_to_batch(table, _schema(), "w")
    assert _kjt(b, "s") == ([1, 1], [4, 5])
    assert _kjt(b, "m") == ([2, 1], [7, 8, 9])
    torch.testing.assert_close(b.dense, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_log1p_transform_is_sign_preserving():
    raw = [0.0, 1.0, -3.0, 100.0]
    table = pa.table({
        "label": [0, 1, 0, 1], "d0": pa.array(raw, pa.float64()), "d1": pa.array([None, 2.0, 5.0, -0.5]),
        "s": [1, 2, 3, 4], "m": pa.array([[1]] * 4, pa.list_(pa.int64())),
    })
    b = table_to_batch(table, _schema(dense_transform="log1p"), "w")
    expected_d0 = [np.sign(x) * np.log(1 + abs(x)) for x in raw]
    expected_d1 = [0.0, np.log(3.0), np.log(6.0), -np.log(1.5)]  # null filled with 0 first
    torch.testing.assert_close(b.dense, torch.tensor(np.stack([expected_d0, expected_d1], 1), dtype=torch.float32))
    assert b.null_dense == 1
    assert b.negative_dense == 2  # -3.0 and -0.5 were folded by sign, and counted


def test_negative_dense_is_not_counted_without_log1p():
    table = pa.table({"label": [0, 1], "d0": [-1.0, 2.0], "d1": [-3.0, -4.0], "s": [1, 2],
                      "m": pa.array([[1], [2]], pa.list_(pa.int64()))})
    b = table_to_batch(table, _schema(), "w")
    assert b.negative_dense == 0
    torch.testing.assert_close(b.dense, torch.tensor([[-1.0, -3.0], [2.0, -4.0]]))


def test_missing_indicator_appends_one_flag_per_dense_column():
    table = pa.table({
        "label": [0, 1, 0], "d0": pa.array([None, 0.0, 5.0], pa.float32()), "d1": pa.array([2.0, 3.0, 4.0]),
        "s": [1, 2, 3], "m": pa.array([[1]] * 3, pa.list_(pa.int64())),
    })
    schema = _schema(dense_missing="indicator", dense_transform="log1p")
    assert schema.num_dense == 4
    b = table_to_batch(table, schema, "w")
    # a missing value and a real 0 look the same in the value columns; the flags tell them apart
    want = [[0.0, np.log(3.0), 1.0, 0.0], [0.0, np.log(4.0), 0.0, 0.0], [np.log(6.0), np.log(5.0), 0.0, 0.0]]
    torch.testing.assert_close(b.dense, torch.tensor(want, dtype=torch.float32))
    assert b.null_dense == 1


def test_no_dense_columns():
    table = pa.table({"label": [0, 1], "s": [1, 2], "m": pa.array([[1], [2]], pa.list_(pa.int64()))})
    b = table_to_batch(table, _schema(dense_columns=()), "w")
    assert tuple(b.dense.shape) == (2, 0)
    assert b.null_dense == 0


def test_multiple_labels_order():
    table = pa.table({"click": [1, 0], "buy": [0.0, 1.0], "d0": [0.0, 0.0], "d1": [0.0, 0.0], "s": [1, 2],
                      "m": pa.array([[1], [2]], pa.list_(pa.int64()))})
    b = table_to_batch(table, _schema(label_columns=("buy", "click")), "w")
    torch.testing.assert_close(b.labels, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_null_label_raises_naming_column():
    table = pa.table({"label": pa.array([1, None, 0], pa.int64()), "d0": [0.0] * 3, "d1": [0.0] * 3,
                      "s": [1, 2, 3], "m": pa.array([[1], [2], [3]], pa.list_(pa.int64()))})
    with pytest.raises(DataError) as e:
        table_to_batch(table, _schema(), "some/file.parquet")
    msg = str(e.value)
    assert "some/file.parquet" in msg
    assert "'label'" in msg
    assert "1 null" in msg


def test_strict_policy_in_batch_names_column():
    table = pa.table({"label": [1, 0], "d0": [0.0] * 2, "d1": [0.0] * 2, "s": [1, 2],
                      "m": pa.array([[1], [100]], pa.list_(pa.int64()))})
    with pytest.raises(DataError) as e:
        table_to_batch(table, _schema(id_policy="strict"), "f.parquet")
    assert "f.parquet" in str(e.value) and "'m'" in str(e.value)


def test_hash_policy_in_batch_stays_in_range():
    ids = list(range(-50, 150))
    table = pa.table({"label": [0] * 200, "d0": [0.0] * 200, "d1": [0.0] * 200, "s": pa.array(ids, pa.int64()),
                      "m": pa.array([[i, i + 1] for i in ids], pa.list_(pa.int64()))})
    b = table_to_batch(table, _schema(id_policy="hash"), "w")
    for name, n in (("s", 10), ("m", 100)):
        v = b.sparse.to_dict()[name].values()
        assert int(v.min()) >= 0 and int(v.max()) < n
    np.testing.assert_array_equal(b.id_stats[:, 0], [50, 50 + 49])  # negatives: s: -50..-1; m: i<0 plus i+1<0
    np.testing.assert_array_equal(b.id_stats[:, 1], [140, 2 * 50 + 1])  # s: ids 10..149; m: ids >= 100


def test_weight_columns_produce_kjt_weights():
    schema = _schema(features=(FeatureSpec("s", 10), FeatureSpec("m", 100, "mw")))
    table = pa.table({
        "label": [1, 0, 1], "d0": [0.0] * 3, "d1": [0.0] * 3,
        "s": pa.array([1, None, 2], pa.int64()),
        "m": pa.array([[1, 2], None, [3, None, 4]], pa.list_(pa.int64())),
        "mw": pa.array([[0.5, 1.5], None, [2.0, None, 3.0]], pa.list_(pa.float32())),
    })
    b = table_to_batch(table, schema, "w")
    w = b.sparse.weights()
    assert w.dtype == torch.float32
    s = b.sparse.to_dict()["s"]
    m = b.sparse.to_dict()["m"]
    # unweighted feature of a weighted batch gets weight 1 per id
    assert s.values().tolist() == [1, 2]
    assert s.weights().tolist() == [1.0, 1.0]
    assert m.lengths().tolist() == [2, 0, 2]
    assert m.values().tolist() == [1, 2, 3, 4]
    assert m.weights().tolist() == [0.5, 1.5, 2.0, 3.0]


def test_misaligned_weight_column_raises():
    schema = _schema(features=(FeatureSpec("s", 10), FeatureSpec("m", 100, "mw")))
    table = pa.table({
        "label": [1, 0], "d0": [0.0] * 2, "d1": [0.0] * 2, "s": [1, 2],
        "m": pa.array([[1, 2], [3]], pa.list_(pa.int64())),
        "mw": pa.array([[0.5], [2.0]], pa.list_(pa.float32())),
    })
    with pytest.raises(DataError, match="'mw'.*'m'"):
        table_to_batch(table, schema, "w")
