"""data/synth.py (synthetic Criteo-shaped log) and data/inspect.py (dataset summary)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from data.inspect import format_report, inspect_dataset
from data.synth import (MULTI_HOT, NUM_DENSE, NUM_SPARSE, VOCAB_SIZES, dense_columns, sparse_columns,
                        synthesize_table, write_synthetic)

ROWS = 3001
FILES = 3


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "train"
    paths = write_synthetic(out, rows=ROWS, seed=0, files=FILES, row_group_rows=400)
    return out, paths


def _read_all(out) -> pa.Table:
    files = sorted(out.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def test_writes_requested_rows_across_files(synth_dir):
    out, paths = synth_dir
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert sorted(out.glob("*.parquet")) == sorted(paths)
    counts = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    assert sum(counts) == ROWS
    assert counts == [1000, 1000, 1001]
    # row groups of at most row_group_rows
    for p in paths:
        md = pq.ParquetFile(p).metadata
        assert all(md.row_group(i).num_rows <= 400 for i in range(md.num_row_groups))
        assert md.num_row_groups == 3


def test_columns_and_types(synth_dir):
    table = _read_all(synth_dir[0])
    assert table.column_names == ["label", *dense_columns(), *sparse_columns()]
    assert len(dense_columns()) == NUM_DENSE == 13 and len(sparse_columns()) == NUM_SPARSE == 26
    assert pa.types.is_integer(table.schema.field("label").type)
    for i in range(NUM_SPARSE):
        t = table.schema.field(f"cat_{i}").type
        if i in (23, 24, 25):
            assert pa.types.is_list(t) and t.value_type == pa.int64()
        else:
            assert t == pa.int64()
    assert MULTI_HOT == (23, 24, 25)
    for c in dense_columns():
        assert pa.types.is_floating(table.schema.field(c).type)


def test_label_binary_with_plausible_rate(synth_dir):
    label = _read_all(synth_dir[0]).column("label").to_numpy()
    assert set(np.unique(label).tolist()) <= {0, 1}
    rate = label.mean()
    assert 0.05 < rate < 0.5


def test_ids_within_vocab_and_list_lengths(synth_dir):
    table = _read_all(synth_dir[0])
    for i, v in enumerate(VOCAB_SIZES):
        col = table.column(f"cat_{i}")
        if i in MULTI_HOT:
            lengths = pc.list_value_length(col).to_numpy()
            assert lengths.min() >= 1 and lengths.max() <= 5
            assert col.null_count == 0
            values = pc.list_flatten(col).to_numpy()
        else:
            values = col.drop_null().to_numpy()
        assert values.min() >= 0, f"cat_{i}"
        assert values.max() < v, f"cat_{i}"
    # a handful of missing ids only in cat_2 and cat_11
    assert sum(table.column(f"cat_{i}").null_count for i in range(NUM_SPARSE) if i not in (2, 11)) == 0


def test_dense_non_negative_with_some_nulls(synth_dir):
    table = _read_all(synth_dir[0])
    nulls = 0
    for c in dense_columns():
        col = table.column(c)
        nulls += col.null_count
        assert pc.min(col).as_py() >= 0
    # about 1% missing per column: 13 * 3001 * 0.01 ~ 390
    assert 150 < nulls < 700


def test_same_seed_same_table_different_seed_different_rows(tmp_path):
    a = synthesize_table(300, seed=3)
    b = synthesize_table(300, seed=3)
    c = synthesize_table(300, seed=4)
    assert a.equals(b)
    assert not a.equals(c)
    assert not a.column("cat_0").equals(c.column("cat_0"))
    assert not a.column("dense_0").equals(c.column("dense_0"))
    # and through the writer, byte-for-byte equal contents
    write_synthetic(tmp_path / "x", rows=300, seed=3, files=2)
    write_synthetic(tmp_path / "y", rows=300, seed=3, files=2)
    assert _read_all(tmp_path / "x").equals(_read_all(tmp_path / "y"))
    assert _read_all(tmp_path / "x").equals(a)


@pytest.mark.parametrize("rows, files", [(0, 1), (10, 0), (-5, 2)])
def test_write_synthetic_rejects_non_positive(tmp_path, rows, files):
    with pytest.raises(ValueError, match="must be positive"):
        write_synthetic(tmp_path / "z", rows=rows, files=files)


def test_inspect_matches_pyarrow(synth_dir):
    out, paths = synth_dir
    report = inspect_dataset(str(out))
    table = _read_all(out)
    assert report["rows"] == ROWS == table.num_rows
    assert report["files"] == FILES
    assert report["row_groups"] == sum(pq.ParquetFile(p).metadata.num_row_groups for p in paths) == 9
    assert set(report["columns"]) == set(table.column_names)
    for name in table.column_names:
        s = report["columns"][name]
        col = table.column(name)
        assert s["nulls"] == col.null_count, name
        assert s["type"] == str(col.type)
        if pa.types.is_list(col.type):
            flat = pc.list_flatten(col)
            assert s["num_values"] == len(flat) - flat.null_count
            assert s["null_values"] == flat.null_count
            assert s["max_list_length"] == pc.max(pc.list_value_length(col)).as_py()
            values = flat
        else:
            values = col
        np_vals = values.drop_null().to_numpy() if hasattr(values, "drop_null") else values
        assert s["min"] == pytest.approx(float(np.min(np_vals))), name
        assert s["max"] == pytest.approx(float(np.max(np_vals))), name
        if pa.types.is_integer(values.type):
            assert s["negative"] == int((np_vals < 0).sum())
    text = format_report(report)
    assert f"{ROWS} rows" in text and "cat_25" in text and "max_len=" in text
    assert report["problems"] == [] and text.endswith("no problems found")


def test_inspect_hand_built_file(tmp_path):
    pq.write_table(pa.table({
        "a": pa.array([3, None, -7, 12], pa.int64()),
        "f": pa.array([None, None, None, None], pa.float64()),
        "l": pa.array([[1, None], None, [], [5, 6, 7]], pa.list_(pa.int64())),
    }), tmp_path / "p.parquet", row_group_size=2)
    r = inspect_dataset(str(tmp_path))
    assert (r["rows"], r["files"], r["row_groups"]) == (4, 1, 2)
    a, f, lst = (r["columns"][c] for c in ("a", "f", "l"))
    assert (a["nulls"], a["min"], a["max"], a["negative"]) == (1, -7, 12, 1)
    assert f["nulls"] == 4 and f.get("min") is None and f.get("max") is None
    assert (lst["nulls"], lst["null_values"], lst["num_values"], lst["max_list_length"]) == (1, 1, 4, 3)  # non-null values: 1, 5, 6, 7
    assert (lst["min"], lst["max"]) == (1, 7)
