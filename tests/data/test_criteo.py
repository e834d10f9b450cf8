"""data/criteo.py: Criteo TSV -> Parquet values, malformed-line reporting, splitting and order."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.criteo import _Range, _read_lines, convert_criteo, format_criteo_report, output_schema
from data.schema import DataError
from data.synth import dense_columns, sparse_columns


def _line(label, ints, cats, upper: bool = False) -> str:
    """One TSV line from Python values; None is an empty field."""
    hexes = ["" if c is None else (f"{c:08X}" if upper else f"{c:08x}") for c in cats]
    head = [] if label is None else [str(label)]
    return "\t".join(head + ["" if v is None else str(v) for v in ints] + hexes)


def _random_rows(n: int, seed: int) -> list[tuple]:
    """(label, 13 ints, 26 hashes) with empties, negatives, zeros and 9+ digit counts."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        ints = [int(v) for v in rng.choice([-2, -1, 0, 1, 7, 42, 12345678, 987654321], 13)]
        ints = [None if rng.random() < 0.1 else v for v in ints]
        cats = [None if rng.random() < 0.1 else int(v) for v in rng.integers(0, 2**32, 26)]
        rows.append((int(rng.integers(0, 2)), ints, cats))
    return rows


def _expected(rows: list[tuple], has_label: bool = True) -> pa.Table:
    cols = {"label": pa.array([r[0] for r in rows], pa.int64())} if has_label else {}
    # via float64: pyarrow refuses int -> float32 where it rounds (987654321), the converter rounds
    cols.update({c: pa.array([r[1][j] for r in rows], pa.float64()).cast(pa.float32())
                 for j, c in enumerate(dense_columns())})
    cols.update({c: pa.array([r[2][j] for r in rows], pa.int64()) for j, c in enumerate(sparse_columns())})
    return pa.table(cols, schema=output_schema(has_label))


def _write(path: Path, lines: list[str], newline: str = "\n", final_newline: bool = True) -> Path:
    text = newline.join(lines) + (newline if final_newline and lines else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(text.encode())
    else:
        path.write_bytes(text.encode())
    return path


def _read(out: Path) -> pa.Table:
    files = sorted(out.glob("*.parquet"))
    assert [f.name for f in files] == [f"part-{k:05d}.parquet" for k in range(len(files))]
    return pa.concat_tables([pq.read_table(f) for f in files])


# --------------------------------------------------------------------------- values


def test_values_are_exact(tmp_path):
    hand = [
        (1, [5, -1, None, 0, -2, 3, 123456789, 1, 2, 3, 4, 5, 6], [0x68FD1E64, None, 0, 0xFFFFFFFF] + [1] * 22),
        (0, [None] * 13, [None] * 26),
    ]
    upper = _line(0, [7] * 13, [0xABCDEF01] * 26, upper=True)
    src = _write(tmp_path / "train.txt", [_line(*r) for r in hand] + [upper])
    report = convert_criteo(src, tmp_path / "out", workers=1)
    table = _read(tmp_path / "out")

    assert table.schema == output_schema()
    assert table.column_names == ["label", *dense_columns(), *sparse_columns()]  # the synth names
    assert table.column("label").to_pylist() == [1, 0, 0]
    row = table.slice(0, 1).to_pylist()[0]
    assert [row[f"dense_{j}"] for j in range(7)] == [5.0, -1.0, None, 0.0, -2.0, 3.0, 123456792.0]  # float32
    assert [row[f"cat_{j}"] for j in range(4)] == [0x68FD1E64, None, 0, 4294967295]
    assert row["cat_0"] == 1761418852
    empty = table.slice(1, 1).to_pylist()[0]
    assert all(v is None for k, v in empty.items() if k != "label")
    assert table.column("cat_25").to_pylist()[2] == 0xABCDEF01  # upper-case hex
    assert table.equals(_expected(hand + [(0, [7] * 13, [0xABCDEF01] * 26)]))
    assert (report["rows"], report["malformed"]) == (3, 0)
    assert report["files"] == [{"path": str(src), "lines": 3, "rows": 3, "malformed": 0, "bad_lines": []}]
    assert report["warnings"] == []


def test_random_rows_round_trip_with_crlf_and_no_final_newline(tmp_path):
    rows = _random_rows(400, seed=1)
    lines = [_line(*r) for r in rows]
    _write(tmp_path / "lf" / "day_0", lines)
    _write(tmp_path / "crlf" / "day_0", lines, newline="\r\n", final_newline=False)
    for name in ("lf", "crlf"):
        report = convert_criteo(tmp_path / name, tmp_path / f"out_{name}", workers=1)
        assert report["malformed"] == 0 and report["rows"] == 400
        assert _read(tmp_path / f"out_{name}").equals(_expected(rows))


# --------------------------------------------------------------------------- malformed lines

GOOD = _line(1, [1] * 13, [0x12345678] * 26)
BAD = [  # (line, reason)
    ("\t".join(GOOD.split("\t")[:39]), "expected 40 fields, got 39"),
    (GOOD + "\t1", "expected 40 fields, got 41"),
    ("", "empty line"),
    ("2" + GOOD[1:], "label '2' is not 0 or 1"),
    ("\t" + GOOD[2:], "label '' is not 0 or 1"),
    (_line(0, [1, 2, "abc"] + [1] * 10, [1] * 26), "I3 'abc' is not an integer"),
    (_line(0, [1, 2, "1.5"] + [1] * 10, [1] * 26), "I3 '1.5' is not an integer"),
    (_line(0, ["-"] + [1] * 12, [1] * 26), "I1 '-' is not an integer"),
    (_line(0, ["+3"] + [1] * 12, [1] * 26), "I1 '+3' is not an integer"),
    (_line(0, [1] * 12 + ["12345678901234567890"], [1] * 26), "I13 '12345678901234567890' is not an integer"),
    (_line(0, [1] * 12 + ["1234567890x"], [1] * 26), "I13 '1234567890x' is not an integer"),
    (GOOD.replace("12345678", "zz12ab34", 1), "C1 'zz12ab34' is not 8 hex digits"),
    (GOOD[: GOOD.rindex("\t")] + "\t1234567", "C26 '1234567' is not 8 hex digits"),
    (GOOD[: GOOD.rindex("\t")] + "\t123456789", "C26 '123456789' is not 8 hex digits"),
    (GOOD[: GOOD.rindex("\t")] + "\t1234567g", "C26 '1234567g' is not 8 hex digits"),
]


def _mixed_file(path: Path, good_rows: list[tuple]) -> tuple[list[int], Path]:
    """Good rows with every kind of bad line spread in; returns the bad lines' 1-based numbers."""
    lines, bad_at = [], []
    for k, row in enumerate(good_rows):
        if k % 7 == 3 and len(bad_at) < len(BAD):
            lines.append(BAD[len(bad_at)][0])
            bad_at.append(len(lines))
        lines.append(_line(*row))
    assert len(bad_at) == len(BAD)
    return bad_at, _write(path, lines)


def test_malformed_lines_are_counted_reported_and_skipped(tmp_path):
    rows = _random_rows(200, seed=2)
    bad_at, src = _mixed_file(tmp_path / "train.txt", rows)
    report = convert_criteo(src, tmp_path / "out", workers=1, show_bad_lines=100)

    (entry,) = report["files"]
    assert entry["malformed"] == report["malformed"] == len(BAD)
    assert entry["rows"] == report["rows"] == len(rows)
    assert entry["lines"] == len(rows) + len(BAD)
    assert entry["bad_lines"] == [{"line": n, "reason": r} for n, (_, r) in zip(bad_at, BAD)]
    assert _read(tmp_path / "out").equals(_expected(rows))  # every good line, in order, and nothing else

    few = convert_criteo(src, tmp_path / "few", workers=1, show_bad_lines=2)
    assert few["files"][0]["bad_lines"] == entry["bad_lines"][:2]
    assert few["malformed"] == len(BAD)
    text = format_criteo_report(few)
    assert f"line {bad_at[0]}: expected 40 fields, got 39" in text
    assert "(first 2)" in text and str(src) in text and f"{len(rows):,}" in text


def test_empty_and_unlabelled_files_are_flagged_and_has_label_false_converts(tmp_path):
    rows = _random_rows(20, seed=3)
    _write(tmp_path / "src" / "day_0", [])
    _write(tmp_path / "src" / "day_1", [_line(None, r[1], r[2]) for r in rows])  # Kaggle test.txt layout
    report = convert_criteo(tmp_path / "src", tmp_path / "out", workers=1)
    assert report["rows"] == 0 and report["malformed"] == 20 and report["output_files"] == []
    warnings = "\n".join(report["warnings"])
    assert "day_0: empty file" in warnings
    assert "day_1: no good line, all 20 malformed" in warnings and "has_label=False" in warnings
    assert "no rows written" in warnings
    assert "warning: " in format_criteo_report(report)

    report = convert_criteo(tmp_path / "src" / "day_1", tmp_path / "out2", workers=1, has_label=False)
    assert report["rows"] == 20 and report["malformed"] == 0
    assert _read(tmp_path / "out2").equals(_expected(rows, has_label=False))


# --------------------------------------------------------------------------- files, order, splitting


def test_directory_of_days_in_natural_order_with_gzip(tmp_path):
    src = tmp_path / "src"
    days = {name: _random_rows(30, seed=k) for k, name in enumerate(["day_0", "day_1.gz", "day_2", "day_10.gz"])}
    for name, rows in days.items():
        _write(src / name, [_line(*r) for r in rows])
    _write(src / "readme.txt", ["not data"])
    _write(src / ".hidden", ["not data"])
    report = convert_criteo(src, tmp_path / "out", workers=1)

    assert [Path(e["path"]).name for e in report["files"]] == list(days)
    assert report["rows"] == 120 and report["malformed"] == 0
    assert report["warnings"] == [f"skipped {src / 'readme.txt'}: not train.txt or day_N(.gz); pass it as --src "
                                  f"to convert it"]
    assert _read(tmp_path / "out").equals(_expected([r for rows in days.values() for r in rows]))


def test_byte_ranges_cover_every_line_once(tmp_path):
    text = b"a\tb\nccc\n\n\r\nddddddddd\ne\tf\tg\r\nlast line without newline"
    path = tmp_path / "f"
    path.write_bytes(text)
    for step in range(1, len(text) + 2):
        got = b"".join(b"".join(_read_lines(_Range(str(path), s, min(s + step, len(text))), block_bytes=3))
                       for s in range(0, len(text), step))
        assert got == text, step


def test_output_is_the_same_for_any_workers_and_range_size(tmp_path):
    rows = _random_rows(1500, seed=4)
    bad_at, src = _mixed_file(tmp_path / "train.txt", rows)
    whole = convert_criteo(src, tmp_path / "whole", workers=1, show_bad_lines=100)
    one = convert_criteo(src, tmp_path / "one", workers=1, chunk_bytes=20_000, rows_per_file=70, show_bad_lines=100)
    two = convert_criteo(src, tmp_path / "two", workers=2, chunk_bytes=20_000, rows_per_file=70, show_bad_lines=100)

    assert len(whole["output_files"]) == 1 and len(one["output_files"]) > 20  # many ranges
    expected = _expected(rows)
    for name in ("whole", "one", "two"):
        assert _read(tmp_path / name).equals(expected), name
    # line numbers stay file-relative across ranges
    assert whole["files"] == one["files"] == two["files"]
    assert [b["line"] for b in two["files"][0]["bad_lines"]] == bad_at
    assert two["workers"] == 2
    assert [Path(f).read_bytes() for f in one["output_files"]] == [Path(f).read_bytes() for f in two["output_files"]]


def test_row_groups_and_rows_per_file(tmp_path):
    rows = _random_rows(2500, seed=5)
    src = _write(tmp_path / "day_3.gz", [_line(*r) for r in rows])
    report = convert_criteo(src, tmp_path / "out", workers=1, row_group_rows=300, rows_per_file=1000)
    metas = [pq.ParquetFile(f).metadata for f in report["output_files"]]
    groups = [[m.row_group(i).num_rows for i in range(m.num_row_groups)] for m in metas]
    assert groups == [[300, 300, 300, 100], [300, 300, 300, 100], [300, 200]]
    assert _read(tmp_path / "out").equals(_expected(rows))


# --------------------------------------------------------------------------- user errors


def test_user_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"nope: no such file or directory; pass --src"):
        convert_criteo(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: directory holds no input files"):
        convert_criteo(tmp_path / "empty", tmp_path / "out")
    src = _write(tmp_path / "train.txt", [GOOD])
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataError, match=r"a_file: cannot write the output here .*choose a writable --out"):
        convert_criteo(src, tmp_path / "a_file")
    convert_criteo(src, tmp_path / "done", workers=1)
    with pytest.raises(DataError, match=r"done: already holds 1 Parquet file\(s\).*empty or new --out"):
        convert_criteo(src, tmp_path / "done", workers=1)
    with pytest.raises(DataError, match=r"--row-group-rows must be positive"):
        convert_criteo(src, tmp_path / "x", row_group_rows=0)
    truncated = tmp_path / "gz" / "day_0.gz"
    _write(truncated, [GOOD] * 1000)
    truncated.write_bytes(truncated.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"day_0.gz: cannot read .*truncated or corrupt"):
        convert_criteo(truncated, tmp_path / "gz_out", workers=1)
    assert list((tmp_path / "gz_out").iterdir()) == []  # no partial output left behind
