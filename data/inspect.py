"""`rectrain data inspect`: schema, row counts, id ranges and null counts per column."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.parquet import list_parquet_files


def inspect_dataset(uri: str) -> dict:
    """Summarize every column of every Parquet file under `uri`, streaming row group by row group."""
    fs, files = list_parquet_files(uri)
    stats: dict[str, dict] = {}
    schema = None
    total_rows = row_groups = 0
    for path in files:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            schema = schema or pf.schema_arrow
            total_rows += pf.metadata.num_rows
            row_groups += pf.metadata.num_row_groups
            for rg in range(pf.metadata.num_row_groups):
                table = pf.read_row_group(rg)
                for name in table.column_names:
                    _update(stats.setdefault(name, {"type": str(table.schema.field(name).type)}), table.column(name))
    return {"path": uri, "files": len(files), "row_groups": row_groups, "rows": total_rows,
            "schema": str(schema), "columns": stats}


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


def format_report(report: dict) -> str:
    lines = [f"{report['path']}: {report['files']} file(s), {report['row_groups']} row group(s), "
             f"{report['rows']} rows", "", f"{'column':<16} {'type':<14} {'nulls':>8} {'min':>12} {'max':>12}  extra"]
    for name, s in report["columns"].items():
        extra = []
        if "max_list_length" in s:
            extra.append(f"values={s['num_values']} max_len={s['max_list_length']} null_values={s['null_values']}")
        if s.get("negative"):
            extra.append(f"negative={s['negative']}")
        lo = s.get("min")
        hi = s.get("max")
        lines.append(f"{name:<16} {s['type'][:14]:<14} {s['nulls']:>8} {_fmt(lo):>12} {_fmt(hi):>12}  {' '.join(extra)}")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
