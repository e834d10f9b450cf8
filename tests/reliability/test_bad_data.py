"""Bad input data: every problem is one line naming the file (and column and file-relative row
where one applies) and the fix, or a counted policy; file-level problems are found when the
stream is constructed, not mid-epoch.

Found at construction: zero-byte, truncated, non-Parquet and footer-corrupt files, a footer that
points past its data, a missing column or a column typed differently in one of several files, a
dataset without rows, and values the footer statistics prove bad (binary labels outside [0, 1],
ids outside the table under the strict policy). Found when read (by the rank/worker reading
the row): corrupt data pages (page checksums, decode errors), and values the statistics cannot
show (0.5 labels, NaN, long lists, bad ids without statistics).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.inspect import format_report, inspect_dataset
from data.parquet import ParquetStream, table_to_batch
from data.schema import COUNTER_NAMES, DataError, FeatureSpec, Schema
from tests.conftest import ROOT, _env
from trainer.loader import make_loader, padded_batches

SCHEMA = Schema(
    label_columns=("label",),
    dense_columns=("row", "d"),
    features=(FeatureSpec("s", 100), FeatureSpec("m", 1000, "mw")),
)
CPU = torch.device("cpu")


def _rows(lo: int, hi: int) -> pa.Table:
    """Row r: label r % 2, dense (r, r / 2), s = r % 100, m = [r] * (r % 3) with weights 1.5."""
    r = np.arange(lo, hi)
    return pa.table({
        "label": pa.array(r % 2, pa.int64()),
        "row": pa.array(r.astype(np.float64)),
        "d": pa.array(r / 2.0),
        "s": pa.array(r % 100, pa.int64()),
        "m": pa.array([[int(i)] * (int(i) % 3) for i in r], pa.list_(pa.int64())),
        "mw": pa.array([[1.5] * (int(i) % 3) for i in r], pa.list_(pa.float32())),
    })


def _with(table: pa.Table, column: str, values, typ=None) -> pa.Table:
    typ = typ or table.schema.field(column).type
    return table.set_column(table.schema.get_field_index(column), column, pa.array(values, typ))


def _stream(path, schema: Schema = SCHEMA, **kw) -> ParquetStream:
    args = dict(batch_size=8, rank=0, world_size=1, num_workers=0)
    args.update(kw)
    return ParquetStream(str(path), schema, **args)


def _schema(**kw) -> Schema:
    base = dict(label_columns=SCHEMA.label_columns, dense_columns=SCHEMA.dense_columns, features=SCHEMA.features)
    base.update(kw)
    return Schema(**base)


def _error(fn) -> str:
    """The DataError message of fn(), checked to be exactly one line."""
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert "Traceback" not in msg and "Caught DataError" not in msg, msg
    return msg


def _ids(batch) -> list[int]:
    return [int(x) for x in batch.dense[:, 0].tolist()]


def _read_all(stream: ParquetStream) -> list:
    """Every batch of the stream through the real loader path (DataLoader workers + padding)."""
    return list(padded_batches(make_loader(stream, CPU), stream.remaining_batches(), stream))


def _two_files(tmp_path: Path, bad: pa.Table, **write) -> tuple[Path, Path]:
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(_rows(0, 40), a, row_group_size=16)
    pq.write_table(bad, b, row_group_size=16, **write)
    return a, b


# --------------------------------------------------------------------------- 1. files (construction)


REDO = "write or copy it again, or move it out of the dataset"


def test_zero_byte_file_fails_at_construction(tmp_path):
    pq.write_table(_rows(0, 10), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"")
    msg = _error(lambda: _stream(tmp_path))
    assert msg == f"{tmp_path / 'b.parquet'}: file is empty (0 bytes), not a Parquet file; {REDO}"


def test_truncated_file_fails_at_construction(tmp_path):
    pq.write_table(_rows(0, 200), tmp_path / "a.parquet", row_group_size=50)
    data = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "a.parquet").write_bytes(data[: len(data) // 2])
    msg = _error(lambda: _stream(tmp_path))
    assert msg == (f"{tmp_path / 'a.parquet'}: truncated: no Parquet footer at its end ({len(data) // 2} bytes; an "
                   f"interrupted write or copy); {REDO}")


def test_csv_named_parquet_fails_at_construction(tmp_path):
    pq.write_table(_rows(0, 10), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_text("label,row,d\n1,2,3\n")
    msg = _error(lambda: _stream(tmp_path))
    assert msg == (f"{tmp_path / 'b.parquet'}: not a Parquet file (it starts with b'labe', not b'PAR1': CSV or JSON "
                   f"named .parquet?); convert it to Parquet or move it out of the dataset")


def test_corrupt_footer_fails_at_construction(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(_rows(0, 100), path, row_group_size=50)
    data = bytearray(path.read_bytes())
    footer_len = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer_len
    data[start + 10:start + 40] = b"\x00" * 30
    path.write_bytes(bytes(data))
    msg = _error(lambda: _stream(tmp_path))
    assert msg.startswith(f"{path}: corrupt Parquet footer (")
    assert msg.endswith(f"); {REDO}")


def test_footer_pointing_past_its_data_fails_at_construction(tmp_path):
    # The first half of the data with the whole file's footer glued on: PAR1 at both ends and a
    # readable footer, but row group 1's column chunks lie past the end of the data.
    path = tmp_path / "a.parquet"
    pq.write_table(_rows(0, 400), path, row_group_size=200)
    data = path.read_bytes()
    footer_len = int.from_bytes(data[-8:-4], "little")
    footer = data[len(data) - 8 - footer_len:]
    kept = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    path.write_bytes(data[:kept] + footer)
    msg = _error(lambda: _stream(tmp_path))
    assert msg.startswith(f"{path}: row group 1 column 'label' lies outside the file's data (bytes ")
    assert f"data ends at byte {kept} of {kept + len(footer)}" in msg
    assert msg.endswith("the footer does not match the data (truncated or patched file); write or copy it again")


def _corrupt_page(path: Path, row_group: int, column: int, at_header: bool = False) -> None:
    """Overwrite bytes inside one column chunk (its page header, or the middle of its data)."""
    chunk = pq.ParquetFile(path).metadata.row_group(row_group).column(column)
    start = chunk.data_page_offset
    at = start if at_header else start + chunk.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[at:at + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def test_corrupt_data_page_with_checksums_fails_when_read_naming_file_row_group_and_column(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(_rows(0, 96), path, row_group_size=32, write_page_checksum=True, compression="none",
                   use_dictionary=False)
    _corrupt_page(path, row_group=1, column=2)  # column 'd', rows 32-63
    for workers in (0, 2):
        stream = _stream(tmp_path, num_workers=workers)  # the footer is intact: construction succeeds
        msg = _error(lambda: _read_all(stream))
        assert msg == (f"{path}: row group 1 column 'd' (rows 32-63 of the file) cannot be decoded (could not verify "
                       f"page integrity, CRC checksum verification failed for page_ordinal 0); the file is corrupt: "
                       f"write or copy it again (`rectrain data inspect` decodes every file and lists the bad ones)")


def test_corrupt_page_header_without_checksums_fails_when_read(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(_rows(0, 96), path, row_group_size=32)  # snappy, no checksums
    _corrupt_page(path, row_group=2, column=3, at_header=True)  # column 's', rows 64-95
    stream = _stream(tmp_path, batch_size=16, num_workers=2)
    msg = _error(lambda: _read_all(stream))
    assert msg.startswith(f"{path}: row group 2 column 's' (rows 64-95 of the file) cannot be decoded (")
    assert msg.endswith("the file is corrupt: write or copy it again (`rectrain data inspect` decodes every file "
                        "and lists the bad ones)")


def test_missing_column_in_one_of_several_files_fails_at_construction(tmp_path):
    _, b = _two_files(tmp_path, _rows(40, 60).drop_columns(["d"]))
    msg = _error(lambda: _stream(tmp_path))
    assert msg.startswith(f"{b}: column 'd' (from data.dense_columns) is missing; the file has [")
    assert msg.endswith("fix data.dense_columns or the file")


@pytest.mark.parametrize("column, values, typ, want", [
    ("s", list(range(20)), pa.int32(), "int32"),
    ("label", [0.0, 1.0] * 10, pa.float64(), "double"),
    ("s", [[i] for i in range(20)], pa.list_(pa.int64()), "list<element: int64>"),
])
def test_column_with_another_type_in_one_file_fails_at_construction(tmp_path, column, values, typ, want):
    a, b = _two_files(tmp_path, _with(_rows(40, 60), column, values, typ))
    first = str(_rows(0, 1).schema.field(column).type)
    msg = _error(lambda: _stream(tmp_path))
    assert msg == (f"{b}: column {column!r} has type {want}, but {a} has {first}; every file must give a column "
                   f"the same type: rewrite this file with {first}")


def test_files_differing_only_in_nullability_read_fine(tmp_path):
    pq.write_table(_rows(0, 20), tmp_path / "a.parquet")
    t = _rows(20, 40)
    strict_fields = [pa.field(f.name, f.type, nullable=f.name != "s") for f in t.schema]
    pq.write_table(t.cast(pa.schema(strict_fields)), tmp_path / "b.parquet")
    stream = _stream(tmp_path, batch_size=7)  # windows span both files: concatenation must work
    assert sorted(i for b in stream for i in _ids(b)) == list(range(40))


def test_inspect_reports_each_bad_file_instead_of_crashing(tmp_path):
    good = _rows(0, 40)
    pq.write_table(good, tmp_path / "a.parquet", row_group_size=20)
    (tmp_path / "b.parquet").write_bytes(b"")
    (tmp_path / "c.parquet").write_text("label,row\n1,2\n")
    pq.write_table(_with(_rows(40, 60), "s", list(range(20)), pa.int32()), tmp_path / "d.parquet")
    pq.write_table(_rows(60, 80).drop_columns(["d"]), tmp_path / "e.parquet")
    pq.write_table(_rows(80, 144), tmp_path / "f.parquet", row_group_size=32, write_page_checksum=True,
                   compression="none", use_dictionary=False)
    _corrupt_page(tmp_path / "f.parquet", row_group=1, column=2)
    data = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "g.parquet").write_bytes(data[: len(data) // 2])
    report = inspect_dataset(str(tmp_path))
    p = {name: str(tmp_path / f"{name}.parquet") for name in "abcdefg"}
    assert report["problems"] == [
        f"{p['b']}: file is empty (0 bytes), not a Parquet file; {REDO}",
        f"{p['c']}: not a Parquet file (it starts with b'labe', not b'PAR1': CSV or JSON named .parquet?); "
        f"convert it to Parquet or move it out of the dataset",
        f"{p['d']}: column 's' has type int32, but {p['a']} has int64; every file must give a column the same "
        f"type: rewrite this file with int64",
        f"{p['e']}: column 'd' is missing (it is in {p['a']}); every file needs the same columns",
        f"{p['f']}: row group 1 column(s) 'd' (rows 32-63 of the file) cannot be decoded (could not verify page "
        f"integrity, CRC checksum verification failed for page_ordinal 0); the file is corrupt: write or copy it "
        f"again",
        f"{p['g']}: truncated: no Parquet footer at its end ({len(data) // 2} bytes; an interrupted write or copy); "
        f"{REDO}",
    ]
    # the readable files still count; the mistyped column keeps the first file's type and stats
    assert report["files"] == 7 and report["rows"] == 40 + 20 + 20 + 64
    assert report["columns"]["s"]["type"] == "int64"
    text = format_report(report)
    assert "6 problem(s):" in text and all(line in text for line in report["problems"])


def test_inspect_counts_nan_and_inf(tmp_path):
    pq.write_table(_with(_rows(0, 4), "d", [0.0, math.nan, math.inf, None]), tmp_path / "a.parquet")
    report = inspect_dataset(str(tmp_path))
    assert report["problems"] == []
    assert report["columns"]["d"]["non_finite"] == 2 and report["columns"]["d"]["nulls"] == 1
    assert "nan_or_inf=2" in format_report(report) and "no problems found" in format_report(report)


# --------------------------------------------------------------------------- 2. binary labels


def _label_msg(path, row: int, value: str, count: int, rows: int, column: str = "label") -> str:
    return (f"{path}: column {column!r} row {row}: label {value} is not 0 or 1 ({count} such label(s) among the "
            f"{rows} rows read with it); binary tasks need 0/1 labels: fix the data, or give the task that reads "
            f"{column!r} kind = \"regression\"")


@pytest.mark.parametrize("value", [2, -1])
def test_binary_label_outside_0_1_found_at_construction(tmp_path, value):
    # footer statistics (min/max) prove the bad value: the file is refused before any step
    labels = [r % 2 for r in range(40, 80)]
    labels[21] = value  # b.parquet row 21 is in row group 1 (rows 16-31)
    _, b = _two_files(tmp_path, _with(_rows(40, 80), "label", labels))
    msg = _error(lambda: _stream(tmp_path))
    assert msg == _label_msg(b, 21, str(value), 1, 16)


def test_binary_label_half_found_by_the_worker_that_reads_it(tmp_path):
    # 0.5 lies inside the statistics' [0, 1]: found when read, by the rank/worker that reads it
    labels = [float(r % 2) for r in range(40, 80)]
    labels[29] = 0.5
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(_with(_rows(0, 40), "label", [float(r % 2) for r in range(40)], pa.float64()), a, row_group_size=16)
    pq.write_table(_with(_rows(40, 80), "label", labels, pa.float64()), b, row_group_size=16)
    outcomes = {}
    for rank in range(2):
        stream = _stream(tmp_path, rank=rank, world_size=2, num_workers=2, batch_size=6, shuffle=True,
                         shuffle_buffer_rows=10, seed=3)
        # which slot (rank * 2 + worker) owns b.parquet row 29 (row group 1, offset 13) this epoch
        start = 0
        for piece in stream.ordered_pieces(0):
            if (piece.path, piece.row_group) == (str(b), 1):
                break
            start += piece.num_rows
        owner = next(s for s in range(4) if stream.slot_range(s)[0] <= start + 13 < stream.slot_range(s)[1])
        try:
            outcomes[rank] = len(_read_all(stream))
        except DataError as e:
            outcomes[rank] = str(e)
    reader = owner // 2
    msg = outcomes[reader]
    assert msg.startswith(f"{b}: column 'label' row 29: label 0.5 is not 0 or 1 (1 such label(s) among the ")
    assert "\n" not in msg and "Caught" not in msg
    assert isinstance(outcomes[1 - reader], int)  # the other rank reads all of its rows


def test_regression_labels_are_unrestricted(tmp_path):
    t = _rows(0, 20).append_column("watch", pa.array(np.linspace(-3, 40, 20)))
    pq.write_table(t, tmp_path / "a.parquet")
    schema = _schema(label_columns=("label", "watch"), binary_labels=("label",))
    labels = torch.cat([b.labels for b in _stream(tmp_path, schema)])
    np.testing.assert_allclose(labels[:, 1].numpy(), np.linspace(-3, 40, 20), rtol=1e-6)
    # but a binary task reading it refuses the same column
    msg = _error(lambda: _stream(tmp_path, _schema(label_columns=("label", "watch"))))
    assert msg == _label_msg(tmp_path / "a.parquet", 0, "-3.0", 20, 20, column="watch")


def test_schema_from_config_knows_which_labels_are_binary():
    from trainer.config import load_config

    base = ['data.sparse_columns=["s"]', 'model.tables=[{name="t", features=["s"], num_embeddings=7}]',
            'data.label_columns=["click", "watch"]']
    s = Schema.from_config(*_cfg(load_config(None, base)))
    assert s.binary_label_columns == ("click", "watch")  # no tasks: one binary task per label
    cfg = load_config(None, base + ['model.tasks=[{name="click"}, {name="wt", label="watch", kind="regression"}]'])
    s = Schema.from_config(*_cfg(cfg))
    assert s.binary_label_columns == ("click",)
    assert (s.non_finite, s.max_list_length, s.list_overflow) == ("error", 10_000, "truncate")
    cfg = load_config(None, base + ["data.non_finite=drop_row", "data.max_list_length=5", "data.list_overflow=error"])
    s = Schema.from_config(*_cfg(cfg))
    assert (s.non_finite, s.max_list_length, s.list_overflow) == ("drop_row", 5, "error")


def _cfg(cfg):
    return cfg.data, cfg.model


# --------------------------------------------------------------------------- 3. NaN / inf


def _nonfinite_msg(path, column: str, row: int, value: str, count: int, rows: int) -> str:
    return (f"{path}: column {column!r} row {row}: value {value} is not finite ({count} row(s) with NaN or infinite "
            f"values among the {rows} rows read with it); fix the data, or set data.non_finite = \"drop_row\" to "
            f"leave such rows out (they are counted as dropped_rows)")


def test_nan_dense_value_is_an_error_naming_file_column_row(tmp_path):
    d = [r / 2 for r in range(40, 80)]
    d[5] = d[9] = math.nan
    _, b = _two_files(tmp_path, _with(_rows(40, 80), "d", d))
    stream = _stream(tmp_path, batch_size=10, num_workers=2)
    msg = _error(lambda: _read_all(stream))
    assert msg == _nonfinite_msg(b, "d", 5, "nan", 2, 10)


def test_infinite_binary_label_found_at_construction(tmp_path):
    # the statistics show max = inf: refused before any step
    t = _with(_rows(0, 20), "label", [math.inf if r == 17 else float(r % 2) for r in range(20)], pa.float64())
    pq.write_table(t, tmp_path / "a.parquet")
    msg = _error(lambda: _stream(tmp_path))
    assert msg == _nonfinite_msg(tmp_path / "a.parquet", "label", 17, "inf", 1, 20)


@pytest.mark.parametrize("statistics", [True, False])
def test_infinite_regression_label(tmp_path, statistics):
    # with statistics (min = -inf) found at construction, without them when the row is read
    t = _rows(0, 20).append_column("watch", pa.array([-math.inf if r == 13 else float(r) for r in range(20)]))
    pq.write_table(t, tmp_path / "a.parquet", write_statistics=statistics)
    regression = _schema(label_columns=("label", "watch"), binary_labels=("label",))
    want = _nonfinite_msg(tmp_path / "a.parquet", "watch", 13, "-inf", 1, 20)
    if statistics:
        assert _error(lambda: _stream(tmp_path, regression)) == want
    else:
        stream = _stream(tmp_path, regression, batch_size=20)
        assert _error(lambda: list(stream)) == want
    # under drop_row the row is left out and counted instead
    (batch,) = list(_stream(tmp_path, _schema(label_columns=("label", "watch"), binary_labels=("label",),
                                              non_finite="drop_row"), batch_size=20))
    assert batch.batch_size == 19 and batch.dropped_rows == 1


def test_value_too_large_for_float32_is_not_finite(tmp_path):
    t = _with(_rows(0, 10), "d", [1e300 if r == 4 else 0.0 for r in range(10)])
    pq.write_table(t, tmp_path / "a.parquet", write_statistics=False)
    msg = _error(lambda: list(_stream(tmp_path)))
    assert msg == _nonfinite_msg(tmp_path / "a.parquet", "d", 4, "1e+300 (too large for float32)", 1, 8)
    pq.write_table(t, tmp_path / "a.parquet")  # with statistics: at construction, naming the same row
    assert _error(lambda: _stream(tmp_path)) == _nonfinite_msg(tmp_path / "a.parquet", "d", 4,
                                                               "1e+300 (too large for float32)", 1, 10)


def _nan_dataset(tmp_path: Path, bad_rows: set[int], total: int = 100) -> None:
    t = _rows(0, total)
    t = _with(t, "d", [math.nan if r in bad_rows else r / 2 for r in range(total)])
    pq.write_table(t.slice(0, 60), tmp_path / "a.parquet", row_group_size=25)
    pq.write_table(t.slice(60), tmp_path / "b.parquet", row_group_size=25)


BAD = {3, 4, 17, 40, 41, 42, 43, 44, 45, 46, 47, 61, 99}


def test_drop_row_leaves_rows_out_and_counts_them(tmp_path):
    _nan_dataset(tmp_path, BAD)
    seen, dropped = [], 0
    for rank in range(2):
        stream = _stream(tmp_path, _schema(non_finite="drop_row"), rank=rank, world_size=2, num_workers=2,
                         batch_size=8, shuffle=True, shuffle_buffer_rows=16, seed=1)
        expected = stream.remaining_batches()
        batches = _read_all(stream)
        assert len(batches) == expected  # dropping rows never changes the number of batches
        for b in batches:
            assert b.batch_size + b.dropped_rows == 8 or b.position == stream.slot_rows(b.slot) or b.all_dropped
            if not b.all_dropped:
                seen += _ids(b)
                assert not torch.isnan(b.dense).any()
                assert b.sparse.to_dict()["m"].weights().tolist() == [1.5] * len(b.sparse.to_dict()["m"].values())
            dropped += b.dropped_rows
    assert sorted(seen) == sorted(set(range(100)) - BAD)  # every good row exactly once
    assert dropped == len(BAD)


def test_drop_row_cursor_counts_rows_read_and_resumes_exactly(tmp_path):
    _nan_dataset(tmp_path, BAD)
    kw = dict(rank=1, world_size=2, num_workers=2, batch_size=5, shuffle=True, shuffle_buffer_rows=12, seed=7)
    schema = _schema(non_finite="drop_row")
    full_stream = _stream(tmp_path, schema, **kw)
    full = [(_ids(b), b.dropped_rows) for b in make_loader(full_stream, CPU)]
    assert sum(len(ids) + d for ids, d in full) == 50  # rank 1's rows: slots 2 and 3
    for k in (1, 3, 6):
        first = _stream(tmp_path, schema, **kw)
        it = iter(make_loader(first, CPU))
        head = []
        for _ in range(k):
            batch = next(it)
            first.advance(batch)
            head.append((_ids(batch), batch.dropped_rows))
        del it
        # positions count rows read (dropped ones included), not rows yielded
        assert sum(first.state_dict()["positions"].values()) == sum(len(ids) + d for ids, d in head)
        resumed = _stream(tmp_path, schema, **kw)
        resumed.load_state_dict(first.state_dict())
        tail = [(_ids(b), b.dropped_rows) for b in make_loader(resumed, CPU)]
        assert head + tail == full, f"k={k}"


def test_batch_of_only_dropped_rows_is_a_weight_zero_row_that_advances_the_cursor(tmp_path):
    _nan_dataset(tmp_path, set(range(8, 16)), total=24)
    stream = _stream(tmp_path, _schema(non_finite="drop_row"), batch_size=8)
    batches = list(stream)
    assert [b.position for b in batches] == [8, 16, 24]
    middle = batches[1]
    assert middle.all_dropped and middle.dropped_rows == 8 and middle.num_samples == 0
    assert middle.weights.tolist() == [0.0] and middle.slot == 0
    assert [b.num_samples for b in batches] == [8, 0, 8]


def test_drop_row_warns_once_per_pass(tmp_path, caplog):
    _nan_dataset(tmp_path, BAD)
    with caplog.at_level("WARNING", logger="rectrain"):
        list(_stream(tmp_path, _schema(non_finite="drop_row"), batch_size=8))
    warnings = [r.getMessage() for r in caplog.records if "drop_row" in r.getMessage()]
    assert warnings == [f"data.non_finite = drop_row: left out 2 row(s) of a batch (first: {tmp_path / 'a.parquet'}: "
                        f"column 'd' row 3 is nan); every row left out is counted as dropped_rows (this warning: once "
                        f"per reader slot and pass)"]


def test_log_window_reports_dropped_rows_and_truncated_ids(tmp_path):
    import torch.distributed as dist

    from trainer.window import LogWindow

    t = _with(_rows(0, 16), "d", [math.nan if r in (2, 9) else 0.0 for r in range(16)])
    t = _with(t, "m", [[r] * 7 for r in range(16)])
    t = _with(t, "mw", [[0.5] * 7 for r in range(16)])
    pq.write_table(t, tmp_path / "a.parquet")
    stream = _stream(tmp_path, _schema(non_finite="drop_row", max_list_length=4), batch_size=8)
    window = LogWindow(num_features=2, num_tasks=1)
    for batch in stream:
        window.add(batch, torch.tensor([0.5]), torch.tensor([1.0]))
    assert COUNTER_NAMES[-1] == "truncated"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        w = window.reduce(CPU)
    finally:
        dist.destroy_process_group()
    assert w["samples"] == 14
    assert w["counters"]["dropped_rows"] == 2
    assert w["counters"]["truncated_ids"] == 14 * 3  # 7 ids cut to 4 in each kept row
    line = " ".join(f"{k}={int(v)}" for k, v in w["counters"].items() if v)  # what the console prints
    assert "dropped_rows=2" in line and "truncated_ids=42" in line


# --------------------------------------------------------------------------- 4. no rows


def test_dataset_without_rows_fails_at_construction(tmp_path):
    pq.write_table(_rows(0, 0), tmp_path / "a.parquet")
    pq.write_table(_rows(0, 0), tmp_path / "b.parquet")
    msg = _error(lambda: _stream(tmp_path))
    assert msg == (f"{tmp_path}: has no rows (2 Parquet file(s), all empty); write rows to it or point "
                   f"data.train_path / data.eval_path at a dataset with rows")


# --------------------------------------------------------------------------- 5. strict ids: the right file and row


def _strict_msg(path, column: str, row: int, value: int, n: int) -> str:
    return f"{path}: column {column!r} row {row}: id {value} is outside [0, {n})"


def test_strict_error_names_the_offending_rows_own_file_and_row(tmp_path):
    # windows span both files and rows are shuffled: the error must still name b.parquet row 37
    ids = [r % 100 for r in range(40, 80)]
    ids[37] = 500
    _, b = _two_files(tmp_path, _with(_rows(40, 80), "s", ids), write_statistics=False)
    strict = _schema(id_policy="strict")
    raised = []
    for rank in range(2):
        stream = _stream(tmp_path, strict, rank=rank, world_size=2, num_workers=2, batch_size=6, shuffle=True,
                         shuffle_buffer_rows=32, seed=5)
        try:
            _read_all(stream)
        except DataError as e:
            raised.append((rank, str(e)))
    assert len(raised) == 1  # only the rank whose worker reads the row
    rank, msg = raised[0]
    assert msg.startswith(_strict_msg(b, "s", 37, 500, 100) + " (0 negative, 1 too large among the ")
    assert msg.endswith("raise the table's num_embeddings or set data.id_policy to 'modulo' or 'hash'")
    assert "\n" not in msg and "Caught" not in msg and "worker" not in msg


def test_worker_error_is_the_same_line_as_in_the_main_process(tmp_path):
    ids = [r % 100 for r in range(40, 80)]
    ids[3] = -7
    _two_files(tmp_path, _with(_rows(40, 80), "s", ids), write_statistics=False)
    strict = _schema(id_policy="strict")
    in_process = _error(lambda: _read_all(_stream(tmp_path, strict, num_workers=0)))
    in_worker = _error(lambda: _read_all(_stream(tmp_path, strict, num_workers=2)))
    assert in_process == in_worker
    assert in_worker.startswith(_strict_msg(tmp_path / "b.parquet", "s", 3, -7, 100))


# --------------------------------------------------------------------------- 6. uint64 ids


BIG = 2**64 - 5  # >= 2**63: negative if cast to int64


def _uint64_table() -> pa.Table:
    t = _rows(0, 6)
    t = _with(t, "s", [0, 5, BIG, 2**63, 99, 7], pa.uint64())
    t = _with(t, "mw", [[1.0, 1.0], [], [1.0], [1.0], [], [1.0]])
    return _with(t, "m", [[1, BIG], [], [2**63 + 1], [3], [], [4]], pa.list_(pa.uint64()))


@pytest.mark.parametrize("statistics", [True, False])
def test_uint64_ids_under_strict_are_out_of_range_not_negative(tmp_path, statistics):
    pq.write_table(_uint64_table(), tmp_path / "a.parquet", write_statistics=statistics)
    strict = _schema(id_policy="strict")
    msg = _error(lambda: list(_stream(tmp_path, strict)))
    assert msg.startswith(_strict_msg(tmp_path / "a.parquet", "s", 2, BIG, 100)
                          + " (0 negative, 2 too large among the 6 ids read with it)")


@pytest.mark.parametrize("policy", ["modulo", "hash"])
def test_uint64_ids_map_from_their_unsigned_value_and_count_out_of_range(tmp_path, policy):
    pq.write_table(_uint64_table(), tmp_path / "a.parquet")
    (batch,) = list(_stream(tmp_path, _schema(id_policy=policy)))
    s, m = batch.sparse.to_dict()["s"].values().tolist(), batch.sparse.to_dict()["m"].values().tolist()
    raw_s, raw_m = [0, 5, BIG, 2**63, 99, 7], [1, BIG, 2**63 + 1, 3, 4]
    if policy == "modulo":
        assert s == [v % 100 for v in raw_s] and m == [v % 1000 for v in raw_m]
    else:
        assert s == [_splitmix(v) % 100 for v in raw_s] and m == [_splitmix(v) % 1000 for v in raw_m]
    np.testing.assert_array_equal(batch.id_stats, [[0, 2, 0, 0], [0, 2, 0, 0]])  # out of range, none negative


def _splitmix(x: int) -> int:
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


# --------------------------------------------------------------------------- 7. list length limit


def _long_lists() -> pa.Table:
    t = _rows(0, 6)
    lists = [[r * 10 + k for k in range(n)] for r, n in enumerate([2, 6, 0, 9, 4, 5])]
    t = _with(t, "m", lists)
    return _with(t, "mw", [[float(v) for v in ids] for ids in lists])


def test_long_lists_are_truncated_with_their_weights_and_counted(tmp_path):
    pq.write_table(_long_lists(), tmp_path / "a.parquet")
    (batch,) = list(_stream(tmp_path, _schema(max_list_length=4)))
    m = batch.sparse.to_dict()["m"]
    assert m.lengths().tolist() == [2, 4, 0, 4, 4, 4]
    want = [0, 1, 10, 11, 12, 13, 30, 31, 32, 33, 40, 41, 42, 43, 50, 51, 52, 53]
    assert m.values().tolist() == want
    assert m.weights().tolist() == [float(v) for v in want]  # each weight stays with its id
    assert batch.id_stats[:, COUNTER_NAMES.index("truncated")].tolist() == [0, 2 + 5 + 1]


def test_long_list_with_list_overflow_error_names_file_column_row(tmp_path):
    _two_files(tmp_path, _rows(40, 60))
    pq.write_table(_long_lists(), tmp_path / "c.parquet")
    stream = _stream(tmp_path, _schema(max_list_length=4, list_overflow="error"), batch_size=10, num_workers=2)
    msg = _error(lambda: _read_all(stream))
    assert msg == (f"{tmp_path / 'c.parquet'}: column 'm' row 1: list of 6 ids is longer than data.max_list_length = "
                   f"4 (1 such row(s) among the 10 rows read with it); raise data.max_list_length, or set "
                   f"data.list_overflow = \"truncate\" to cut such lists (the cut ids are counted as truncated_ids)")


def test_table_to_batch_names_rows_without_a_stream():
    t = _with(_rows(0, 4), "mw", [[], [1.5], [1.5, None], []])
    msg = _error(lambda: table_to_batch(t, SCHEMA, "x.parquet"))
    assert msg == ("x.parquet: column 'mw' row 2: a weight is missing or NaN for an id of 'm' (the weights do not "
                   "align with the ids); one non-null weight per id is required; fix 'mw' or data.weight_columns")
    t = _with(_rows(0, 4), "mw", [[], [1.5], [1.5], []])
    msg = _error(lambda: table_to_batch(t, SCHEMA, "x.parquet"))
    assert msg.startswith("x.parquet: column 'mw' row 2: 1 weights do not align with the 2 ids of 'm'")


# --------------------------------------------------------------------------- the command line


def _write_cli_data(root: Path, bad: pa.Table | None = None) -> Path:
    data = root / "data"
    data.mkdir()
    pq.write_table(_rows(0, 300), data / "a.parquet", row_group_size=100)
    pq.write_table(bad if bad is not None else _rows(300, 400), data / "b.parquet", row_group_size=50)
    cfg = root / "run.toml"
    cfg.write_text(f"""
[data]
train_path = "{data}"
label_columns = ["label"]
dense_columns = ["row", "d"]
sparse_columns = ["s", "m"]
weight_columns = {{ m = "mw" }}
batch_size = 32
num_workers = 2
shuffle_buffer_rows = 64

[model]
name = "dlrm"
embedding_dim = 4

[model.arch]
dense_arch = [8, 4]
over_arch = [8]

[train]
run_dir = "{root / 'run'}"
log_every = 2
device = "cpu"

[checkpoint]
at_end = false

[logging]
progress_bar = false

[[model.tables]]
name = "t_s"
features = ["s"]
num_embeddings = 100

[[model.tables]]
name = "t_m"
features = ["m"]
num_embeddings = 1000
""")
    return cfg


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = _env()
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Caught DataError" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rectrain: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert proc.stderr.rstrip().endswith(errors[0])  # the error is the last thing printed
    return errors[0][len("rectrain: error: "):]


def test_cli_truncated_file_is_one_line_before_training(tmp_path):
    cfg = _write_cli_data(tmp_path)
    b = tmp_path / "data" / "b.parquet"
    data = b.read_bytes()
    b.write_bytes(data[: len(data) // 3])
    proc = _cli("train", "--config", str(cfg))
    msg = _one_error_line(proc)
    assert msg == (f"{b}: truncated: no Parquet footer at its end ({len(data) // 3} bytes; an interrupted write or "
                   f"copy); {REDO}")
    assert " step " not in proc.stdout + proc.stderr  # refused before the first step


def test_cli_error_in_a_dataloader_worker_is_one_line(tmp_path):
    d = [r / 2 for r in range(300, 400)]
    d[71] = math.nan  # NaN is not in the footer statistics: found by the worker that reads row 71
    cfg = _write_cli_data(tmp_path, _with(_rows(300, 400), "d", d))
    msg = _one_error_line(_cli("train", "--config", str(cfg)))
    assert msg.startswith(f"{tmp_path / 'data' / 'b.parquet'}: column 'd' row 71: value nan is not finite (1 row(s) "
                          f"with NaN or infinite values among the ")
    assert msg.endswith('set data.non_finite = "drop_row" to leave such rows out (they are counted as dropped_rows)')


def test_cli_drop_row_shows_dropped_rows_on_the_console_and_in_tensorboard(tmp_path):
    d = [r / 2 for r in range(300, 400)]
    for r in (5, 6, 50, 77):
        d[r] = math.nan
    cfg = _write_cli_data(tmp_path, _with(_rows(300, 400), "d", d))
    proc = _cli("train", "--config", str(cfg), "--set", "data.non_finite=drop_row", "--set", "train.log_every=100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data: dropped_rows=4" in proc.stderr + proc.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert sum(e.value for e in acc.Scalars("data/dropped_rows")) == 4
    assert '"samples_trained": 396' in proc.stdout


def test_cli_inspect_lists_the_problems(tmp_path):
    (tmp_path / "a.parquet").write_text("label\n1\n")
    pq.write_table(_rows(0, 10), tmp_path / "b.parquet")
    proc = _cli("data", "inspect", str(tmp_path))
    assert proc.returncode == 1, proc.stderr  # a dataset with problems: scripts can gate on it
    assert f"{tmp_path / 'a.parquet'}: not a Parquet file (it starts with b'labe'" in proc.stdout
    assert "1 problem(s):" in proc.stdout and "10 rows" in proc.stdout
