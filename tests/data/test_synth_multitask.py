"""data/synth.py, schema="multitask": columns, label rules, base rates, planted structure, errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from data.schema import DataError
from data.synth import (MULTITASK_DENSE, MULTITASK_LABELS, MULTITASK_MULTI_HOT, MULTITASK_SPARSE, MULTITASK_VOCAB,
                        synthesize_table, write_synthetic)

ROWS = 20_000


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return synthesize_table(ROWS, seed=0, schema="multitask")


def _np(table: pa.Table, column: str) -> np.ndarray:
    return table.column(column).to_numpy()


def test_columns_and_types(table):
    assert MULTITASK_LABELS == ("click", "like", "watch_time")
    assert table.column_names == [*MULTITASK_LABELS, *MULTITASK_DENSE, *MULTITASK_SPARSE]
    assert len(MULTITASK_DENSE) == 8 and len(MULTITASK_SPARSE) == 12 == len(MULTITASK_VOCAB)
    schema = table.schema
    assert schema.field("click").type == schema.field("like").type == pa.int64()
    assert schema.field("watch_time").type == pa.float32()
    for c in MULTITASK_DENSE:
        assert schema.field(c).type == pa.float32(), c
    for c in MULTITASK_SPARSE:
        want = pa.list_(pa.int64()) if c in MULTITASK_MULTI_HOT else pa.int64()
        assert schema.field(c).type == want, c
    assert len(MULTITASK_MULTI_HOT) == 2


def test_ids_within_vocab_and_zipf_skewed(table):
    for c, vocab in MULTITASK_VOCAB.items():
        assert vocab <= 5000
        col = table.column(c)
        assert col.null_count == 0, c
        if c in MULTITASK_MULTI_HOT:
            lengths = pc.list_value_length(col).to_numpy()
            assert lengths.min() == 1 and lengths.max() == 5, c
            col = pc.list_flatten(col)
        ids = col.to_numpy()
        assert ids.min() >= 0 and ids.max() < vocab, c
        # Zipf: the most frequent id is far above a uniform share.
        assert np.bincount(ids).max() > 3 * len(ids) / vocab, c


def test_dense_a_few_nulls(table):
    for c in MULTITASK_DENSE:
        col = table.column(c)
        assert 0.003 < col.null_count / ROWS < 0.02, c
        values = col.drop_null().to_numpy()
        assert abs(values.mean()) < 0.05 and 0.9 < values.std() < 1.1, c


def test_label_rules_and_base_rates(table):
    click, like, watch = _np(table, "click"), _np(table, "like"), _np(table, "watch_time")
    assert set(np.unique(click)) == {0, 1} and set(np.unique(like)) == {0, 1}
    assert not (like & (1 - click)).any()  # like implies click
    assert 0.25 < click.mean() < 0.35
    assert 0.35 < like[click == 1].mean() < 0.5
    assert (watch[click == 0] == 0).all() and (watch[click == 1] > 0).all()
    assert 3.5 < watch[click == 1].mean() < 5.5
    assert 4.0 < watch.var() < 8.5


def test_planted_structure_shared_and_specific(table):
    """dense_2 drives only watch_time; dense_0 drives click and watch_time (factor b); the noise
    column dense_5 drives nothing."""
    click = _np(table, "click") == 1
    log_watch = np.log(_np(table, "watch_time")[click])

    def dense(c, rows=slice(None)):
        return pc.fill_null(table.column(c), 0.0).to_numpy()[rows]

    def corr(x, y):
        return np.corrcoef(x, y)[0, 1]

    assert corr(dense("dense_2", click), log_watch) > 0.2
    assert abs(corr(dense("dense_2"), click)) < 0.03
    assert corr(dense("dense_0"), click) > 0.05 and corr(dense("dense_0", click), log_watch) > 0.05
    assert abs(corr(dense("dense_5"), click)) < 0.03 and abs(corr(dense("dense_5", click), log_watch)) < 0.05


def _click_rate_by_id(table: pa.Table, column: str, ids: np.ndarray) -> np.ndarray:
    col, click = _np(table, column), _np(table, "click")
    return np.array([click[col == i].mean() for i in ids])


def test_deterministic_and_signal_shared_across_seeds(tmp_path, table):
    assert synthesize_table(ROWS, seed=0, schema="multitask").equals(table)
    other = synthesize_table(ROWS, seed=1, schema="multitask")
    assert not other.column("cat_0").equals(table.column("cat_0"))
    # Same signal_seed: the same popular ids with the same click propensity (cat_6 is click-only).
    popular = np.argsort(np.bincount(_np(table, "cat_6")))[::-1][:15]
    assert set(popular[:3]) == set(np.argsort(np.bincount(_np(other, "cat_6")))[::-1][:3])
    same = np.corrcoef(_click_rate_by_id(table, "cat_6", popular), _click_rate_by_id(other, "cat_6", popular))[0, 1]
    assert same > 0.7
    # Another signal_seed is another world: other popular ids.
    moved = synthesize_table(ROWS, seed=0, signal_seed=7, schema="multitask")
    assert np.argmax(np.bincount(_np(moved, "cat_0"))) != np.argmax(np.bincount(_np(table, "cat_0")))

    paths = write_synthetic(tmp_path / "mt", rows=1000, seed=5, files=2, schema="multitask")
    written = pa.concat_tables([pq.read_table(p) for p in paths])
    assert written.equals(synthesize_table(1000, seed=5, schema="multitask"))


@pytest.mark.parametrize("schema", ["criteo", "multitask"])
def test_non_positive_rows_is_data_error(tmp_path, schema):
    with pytest.raises(DataError, match=r"^--rows must be positive \(an integer >= 1\), got 0$"):
        write_synthetic(tmp_path / "z", rows=0, schema=schema)
    with pytest.raises(DataError, match="--rows must be positive"):
        synthesize_table(-3, seed=0, schema=schema)
    with pytest.raises(DataError, match="--files must be positive"):
        write_synthetic(tmp_path / "z", rows=10, files=0, schema=schema)


def test_unknown_schema_lists_choices(tmp_path):
    with pytest.raises(DataError, match="unknown synthetic schema 'avazu'; choose one of criteo, multitask"):
        write_synthetic(tmp_path / "z", rows=10, schema="avazu")
    assert not (tmp_path / "z").exists()
