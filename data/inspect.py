"""`rectrain data inspect`: schema, row counts, id ranges and null counts per column, and every
problem that would stop training, one line per problem and file.

Unlike the training reader (which stops at the first bad file), inspect goes on: it reports a
file that is empty, not Parquet, truncated or has a corrupt footer; a column chunk outside its
file; a column missing from a file, added in one, or typed differently than in the first file;
and a row group that cannot be decoded (which the training reader only meets when it gets
there: inspect decodes every page, verifying page checksums where the files have them).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.parquet import READ_ERRORS, check_chunk_ranges, list_parquet_files, one_line, read_footer
from data.schema import DataError


def inspect_dataset(uri: str) -> dict:
    """Summarize every column of every Parquet file under `uri`, streaming row group by row group.

    `problems` lists one line per problem found (empty when the dataset is sound).
    """
    fs, files = list_parquet_files(uri)
    stats: dict[str, dict] = {}
    problems: list[str] = []
    first: tuple[str, pa.Schema] | None = None
    total_rows = row_groups = 0
    for path in files:
        try:
            f = fs.open_input_file(path)
        except READ_ERRORS as e:
            problems.append(f"{path}: cannot be opened ({one_line(e)}); check the file and its permissions")
            continue
        with f:
            try:
                pf, size = read_footer(f, path)
                check_chunk_ranges(path, pf, size)
            except DataError as e:
                problems.append(str(e))
                continue
            arrow = pf.schema_arrow
            if first is None:
                first = (path, arrow)
            skip = _schema_problems(path, arrow, first, problems)
            meta = pf.metadata
            total_rows += meta.num_rows
            row_groups += meta.num_row_groups
            row = 0
            for rg in range(meta.num_row_groups):
                n = meta.row_group(rg).num_rows
                try:
                    table = pf.read_row_group(rg)
                except READ_ERRORS as e:
                    problems.append(_decode_problem(pf, path, rg, row, n, e))
                    row += n
                    continue
                row += n
                for name in table.column_names:
                    if name in skip:
                        continue
                    _update(stats.setdefault(name, {"type": str(table.schema.field(name).type)}), table.column(name))
    if first is not None and total_rows == 0:
        problems.append(f"{uri}: has no rows ({len(files)} Parquet file(s), all empty); training refuses it")
    return {"path": uri, "files": len(files), "row_groups": row_groups, "rows": total_rows,
            "schema": str(first[1]) if first else None, "columns": stats, "problems": problems}


def _schema_problems(path: str, arrow: pa.Schema, first: tuple[str, pa.Schema], problems: list[str]) -> set[str]:
    """Report how `arrow` differs from the first file's schema; the columns whose stats to skip."""
    first_path, first_schema = first
    if path == first_path:
        return set()
    skip = set()
    for field in first_schema:
        if field.name not in arrow.names:
            problems.append(f"{path}: column {field.name!r} is missing (it is in {first_path}); every file needs "
                            f"the same columns")
        elif not arrow.field(field.name).type.equals(field.type):
            t = arrow.field(field.name).type
            problems.append(f"{path}: column {field.name!r} has type {t}, but {first_path} has {field.type}; every "
                            f"file must give a column the same type: rewrite this file with {field.type}")
            skip.add(field.name)
    for name in arrow.names:
        if name not in first_schema.names:
            problems.append(f"{path}: has column {name!r}, which {first_path} does not have; every file needs the "
                            f"same columns")
    return skip


def _decode_problem(pf: pq.ParquetFile, path: str, rg: int, row: int, n: int, error: BaseException) -> str:
    bad = []
    for name in pf.schema_arrow.names:
        try:
            pf.read_row_group(rg, columns=[name])
        except READ_ERRORS:
            bad.append(repr(name))
        except Exception:  # noqa: BLE001 - only used to name the columns
            pass
    columns = f" column(s) {', '.join(bad)}" if bad else ""
    return (f"{path}: row group {rg}{columns} (rows {row}-{row + n - 1} of the file) cannot be decoded "
            f"({one_line(error)}); the file is corrupt: write or copy it again")


def _update(s: dict, col: pa.ChunkedArray) -> None:
    s["nulls"] = s.get("nulls", 0) + col.null_count
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        values = pa.chunked_array([c.flatten() for c in col.chunks], type=col.type.value_type)
        lengths = pc.list_value_length(col)
        s["null_values"] = s.get("null_values", 0) + values.null_count
        s["max_list_length"] = max(s.get("max_list_length", 0), pc.max(lengths).as_py() or 0)
        s["num_values"] = s.get("num_values", 0) + len(values) - values.null_count
        col = values
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        mm = pc.min_max(col)
        lo, hi = mm["min"].as_py(), mm["max"].as_py()
        if lo is not None:
            s["min"] = lo if s.get("min") is None else min(s["min"], lo)
            s["max"] = hi if s.get("max") is None else max(s["max"], hi)
        if pa.types.is_integer(col.type):
            s["negative"] = s.get("negative", 0) + int(pc.sum(pc.less(col, 0)).as_py() or 0)
        else:
            finite = int(pc.sum(pc.is_finite(col)).as_py() or 0)
            s["non_finite"] = s.get("non_finite", 0) + len(col) - col.null_count - finite


def format_report(report: dict) -> str:
    lines = [f"{report['path']}: {report['files']} file(s), {report['row_groups']} row group(s), "
             f"{report['rows']} rows", "", f"{'column':<16} {'type':<14} {'nulls':>8} {'min':>12} {'max':>12}  extra"]
    for name, s in report["columns"].items():
        extra = []
        if "max_list_length" in s:
            extra.append(f"values={s['num_values']} max_len={s['max_list_length']} null_values={s['null_values']}")
        if s.get("negative"):
            extra.append(f"negative={s['negative']}")
        if s.get("non_finite"):
            extra.append(f"nan_or_inf={s['non_finite']}")
        lo = s.get("min")
        hi = s.get("max")
        lines.append(f"{name:<16} {s['type'][:14]:<14} {s['nulls']:>8} {_fmt(lo):>12} {_fmt(hi):>12}  {' '.join(extra)}")
    problems = report.get("problems", [])
    lines.append("")
    lines.append(f"{len(problems)} problem(s):" if problems else "no problems found")
    lines += [f"  {p}" for p in problems]
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
