"""Streaming Parquet reader: exactly-once partitioning over (rank x worker) slots, a seeded
shuffle buffer, and a resumable cursor.

Partitioning. All row groups of all files form one sequence of rows (shuffled at row-group
granularity per epoch when shuffling). Slot ``s = rank * W + worker`` of ``S`` slots reads the
contiguous rows ``[T*s//S, T*(s+1)//S)`` of that sequence, so every row is read exactly once
per epoch and slots differ by at most one row, whatever the files and row-group sizes.

Shuffling. A slot's rows are cut into windows of ``shuffle_buffer_rows``; each window is
permuted by a generator seeded from (seed, epoch, slot, window). The cursor is therefore just
"rows consumed" per slot: a resumed reader re-reads the current window, applies the same
permutation and skips what was consumed, so it yields exactly what an uninterrupted run would.
Rows left out by ``data.non_finite = "drop_row"`` still count as consumed (``position`` counts
rows read, not rows yielded), so the cursor and the number of batches do not depend on them.

Conversion. Where the schema and a window's values allow it (plain scalar columns, nothing to
refuse or drop), data/columnar.py converts the whole window at once and cuts its batches out of
it; every other window goes batch by batch through `table_to_batch`. Both give the same batches.

Bad input. Every problem is a one-line :class:`DataError` that names the file (and the column
and the file-relative, 0-based row where one applies) and the fix. Each row of a window
remembers its place in the epoch's row sequence, so a row-level error names the row's own file
and row, whichever rank and DataLoader worker reads it.

At construction (every rank, before any step; `discover_pieces`), from the files' footers:
  - a zero-byte file, a file that does not start with the Parquet magic ``PAR1`` (CSV or JSON
    named .parquet), a truncated file (no ``PAR1`` footer at its end), a footer that cannot be
    decoded;
  - a column chunk whose byte range (offset + compressed size) lies outside the file's data
    (a footer that does not belong to its data: truncated then patched, or glued together);
  - a configured column that is missing or has a type its role cannot use (features listed in
    ``absent_features`` are not looked for), and a read column
    whose type differs from the first file's (pyarrow could not concatenate them mid-epoch);
  - a dataset with no rows at all;
  - values the footer statistics (null count and min/max per column chunk, a few microseconds
    each) prove bad: a null label, a binary label below 0 or above 1 (2, -1, inf), +-inf (or a
    value beyond float32) in a label or dense column under ``non_finite = "error"``, and under
    ``id_policy = "strict"`` an id outside [0, num_embeddings) (negative, too large, uint64
    >= 2**63). Such a row group is read right away and given the reader's own checks, so the
    error is the one reading would raise, naming the row. Files written without statistics
    skip this.
At read time (by the worker that reads the row group or the row):
  - a data page that pyarrow cannot decode, or whose CRC does not match (files written with
    ``write_page_checksum=True``; the reader always verifies checksums when present): one line
    naming the file, the row group, its rows and the column. Without page checksums, bytes
    overwritten inside a data page often decode as other valid values and cannot be detected
    by any reader; ``rectrain data inspect`` decodes every page of every file up front;
  - what statistics cannot show: binary labels inside [0, 1] but not 0 or 1 (0.5), NaN
    (``data.non_finite``), id lists longer than ``data.max_list_length`` under
    ``list_overflow = "error"``, weights that do not align with their ids; and everything of
    the list above in files written without statistics.
Rows are named by their file-relative, 0-based index.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import mmap
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data import columnar
from data.batch import Batch, padding_for
from data.schema import COUNTER_NAMES, DataError, Schema, map_ids, signed_log1p
from data.transport import BatchRing

log = logging.getLogger("rectrain")

_UNSHUFFLED_WINDOW = 1 << 16
_MAP_BUDGET = 256 << 20  # bytes of decoded row groups' file pages a stream leaves mapped
_MAGIC = b"PAR1"
READ_ERRORS = (pa.ArrowException, OSError)

# (batch row) -> (file path, file-relative row)
Locate = Callable[[int], tuple[str, int]]


@dataclass(frozen=True)
class Piece:
    """One row group of one file."""

    path: str
    row_group: int
    num_rows: int
    first_row: int = 0  # file-relative index of the row group's first row
    span: tuple[int, int] = (0, 0)  # bytes [lo, hi) of the file its column chunks occupy (those read)


def one_line(e: BaseException | str) -> str:
    """An exception's text on one line (pyarrow messages carry newlines and control bytes)."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(e))
    return re.sub(r"\s+", " ", text).strip().rstrip(".")


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local path or any `pyarrow.fs` URI (s3://, gs://, file://)."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except pa.ArrowException as e:
            raise DataError(f"{uri}: pyarrow cannot open this URI ({one_line(e)}); use a local path or a "
                            f"pyarrow.fs URI") from None
    import os

    return pafs.LocalFileSystem(), os.path.abspath(uri)


def list_parquet_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The `.parquet` files at `uri` (a file, or a directory searched recursively), sorted."""
    fs, path = open_filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{uri}: no such file or directory; check data.train_path / data.eval_path "
                        f"or create it with `rectrain data synth --out {uri}`")
    if info.type == pafs.FileType.File:
        return fs, [path]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        raise DataError(f"{uri}: directory holds no .parquet files")
    return fs, files


# --------------------------------------------------------------------------- file checks


def read_footer(f: pa.NativeFile, path: str) -> tuple[pq.ParquetFile, int]:
    """(ParquetFile, file size) of an open file; DataError naming the file when it is not a
    whole Parquet file (empty, not Parquet, truncated, unreadable footer)."""
    redo = "write or copy it again, or move it out of the dataset"
    try:
        size = f.size()
        head = f.read_at(4, 0) if size >= 4 else b""
        tail = f.read_at(4, size - 4) if size >= 8 else b""
    except READ_ERRORS as e:
        raise DataError(f"{path}: cannot be read ({one_line(e)}); check the file and its permissions") from None
    if size == 0:
        raise DataError(f"{path}: file is empty (0 bytes), not a Parquet file; {redo}")
    if head != _MAGIC:
        raise DataError(f"{path}: not a Parquet file (it starts with {bytes(head)!r}, not b'PAR1': CSV or JSON "
                        f"named .parquet?); convert it to Parquet or move it out of the dataset")
    if size < 12 or tail != _MAGIC:
        raise DataError(f"{path}: truncated: no Parquet footer at its end ({size} bytes; an interrupted write "
                        f"or copy); {redo}")
    try:
        pf = pq.ParquetFile(f, page_checksum_verification=True)
        pf.metadata
    except READ_ERRORS as e:
        raise DataError(f"{path}: corrupt Parquet footer ({one_line(e)}); {redo}") from None
    return pf, size


def _num_leaves(t: pa.DataType) -> int:
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _num_leaves(t.value_type)
    if pa.types.is_struct(t):
        return sum(_num_leaves(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_map(t):
        return _num_leaves(t.key_type) + _num_leaves(t.item_type)
    return 1


def _leaf_columns(pf: pq.ParquetFile) -> list[str]:
    """The top-level column each Parquet leaf column belongs to, in leaf order."""
    meta = pf.metadata
    names = [f.name for f in pf.schema_arrow for _ in range(_num_leaves(f.type))]
    if len(names) != meta.num_columns:  # unusual nesting: fall back to the dotted leaf paths
        names = [meta.schema.column(i).path.split(".")[0] for i in range(meta.num_columns)]
    return names


def check_chunk_ranges(path: str, pf: pq.ParquetFile, size: int,
                       columns: list[str] | None = None) -> dict[int, tuple[int, int]]:
    """Every column chunk (of `columns`, or all) lies between the header magic and the footer;
    returns each row group's byte span [lo, hi) over those chunks."""
    spans: dict[int, tuple[int, int]] = {}
    meta = pf.metadata
    data_end = size - 8 - meta.serialized_size
    leaves = _leaf_columns(pf)
    wanted = [i for i, name in enumerate(leaves) if columns is None or name in columns]
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        if group.num_rows == 0:  # writers leave the offsets of empty row groups at 0
            continue
        for i in wanted:
            c = group.column(i)
            if c.file_path:  # the chunk lives in another file
                continue
            start = c.data_page_offset
            if c.has_dictionary_page and c.dictionary_page_offset > 0:
                start = min(start, c.dictionary_page_offset)
            end = start + c.total_compressed_size
            if start < 4 or end > data_end:
                raise DataError(
                    f"{path}: row group {rg} column {leaves[i]!r} lies outside the file's data (bytes {start}-{end}, "
                    f"data ends at byte {data_end} of {size}); the footer does not match the data (truncated or "
                    f"patched file); write or copy it again")
            lo, hi = spans.get(rg, (start, end))
            spans[rg] = (min(lo, start), max(hi, end))
    return spans


def validate_file_schema(path: str, arrow_schema: pa.Schema, schema: Schema) -> None:
    roles = [(c, "label", "data.label_columns") for c in schema.label_columns]
    roles += [(c, "dense", "data.dense_columns") for c in schema.dense_columns]
    present = schema.present_features
    roles += [(f.name, "sparse", "data.sparse_columns") for f in present]
    roles += [(f.weight_column, "weight", "data.weight_columns") for f in present if f.weight_column]
    roles += [(c, "passthrough", "the passthrough columns: data.targets_column, data.seen_column, the item id")
              for c in schema.passthrough]
    names = set(arrow_schema.names)
    for column, role, key in roles:
        if column not in names:
            raise DataError(f"{path}: column {column!r} (from {key}) is missing; the file has "
                            f"{sorted(names)[:12]}{'...' if len(names) > 12 else ''}; fix {key} or the file")
        _check_type(path, column, arrow_schema.field(column).type, role)


def compare_file_schema(path: str, arrow_schema: pa.Schema, first_path: str, first_schema: pa.Schema,
                        columns: list[str]) -> None:
    """The read `columns` have the same types as in the first file (types only: nullability and
    metadata may differ)."""
    for c in columns:
        t, t0 = arrow_schema.field(c).type, first_schema.field(c).type
        if not t.equals(t0):
            raise DataError(f"{path}: column {c!r} has type {t}, but {first_path} has {t0}; every file must give "
                            f"a column the same type: rewrite this file with {t0}")


def open_parquet(fs, path: str):
    """(open file, ParquetFile, size) after the footer checks of `read_footer`; DataError naming
    the file when it cannot be opened."""
    try:
        f = fs.open_input_file(path)
    except READ_ERRORS as e:
        raise DataError(f"{path}: cannot be opened ({one_line(e)}); check the file and its permissions") from None
    try:
        pf, size = read_footer(f, path)
    except BaseException:
        f.close()
        raise
    return f, pf, size


def discover_pieces(uri: str, schema: Schema) -> tuple[pafs.FileSystem, list[Piece]]:
    """Every non-empty row group under `uri`, after reading every footer and checking each file
    (see the module docstring for what is checked here)."""
    fs, files = list_parquet_files(uri)
    pieces: list[Piece] = []
    first: tuple[str, pa.Schema] | None = None
    columns = schema.columns
    for path in files:
        f, pf, size = open_parquet(fs, path)
        with f:
            meta, arrow_schema = pf.metadata, pf.schema_arrow
            validate_file_schema(path, arrow_schema, schema)
            if first is None:
                first = (path, arrow_schema)
            else:
                compare_file_schema(path, arrow_schema, *first, columns)
            spans = check_chunk_ranges(path, pf, size, columns)
            row, file_pieces = 0, []
            for rg in range(meta.num_row_groups):
                n = meta.row_group(rg).num_rows
                if n:
                    file_pieces.append(Piece(path, rg, n, row, spans.get(rg, (0, 0))))
                row += n
            for piece in suspect_pieces(pf, file_pieces, schema):
                _check_piece(pf, piece, schema)
            pieces += file_pieces
    if not pieces:
        raise DataError(f"{uri}: has no rows ({len(files)} Parquet file(s), all empty); write rows to it or point "
                        f"data.train_path / data.eval_path at a dataset with rows")
    return fs, pieces


def suspect_pieces(pf: pq.ParquetFile, pieces: list[Piece], schema: Schema) -> list[Piece]:
    """Row groups whose footer statistics (null count, min/max per column chunk) prove a value
    that reading would refuse: a null label, a binary label outside [0, 1], +-inf in a label or
    dense column under ``non_finite = "error"``, or under the strict id policy an id outside
    [0, num_embeddings). A few microseconds per checked column chunk; statistics cannot show NaN,
    0.5 labels or long lists, which reading still catches."""
    lo_hi: dict[str, tuple[float, float]] = {}
    if schema.non_finite == "error":  # inf, or too large for float32 (inf once converted)
        big = float(np.finfo(np.float32).max)
        lo_hi.update({c: (-big, big) for c in (*schema.label_columns, *schema.dense_columns)})
    lo_hi.update({c: (0, 1) for c in schema.binary_label_columns})
    if schema.id_policy == "strict":
        lo_hi.update({f.name: (0, f.num_embeddings - 1) for f in schema.present_features})
    labels = set(schema.label_columns)
    checks = [(i, lo_hi.get(name), name in labels) for i, name in enumerate(_leaf_columns(pf))
              if name in lo_hi or name in labels]
    meta, out = pf.metadata, []
    for piece in pieces:
        group = meta.row_group(piece.row_group)
        for i, bounds, no_nulls in checks:
            st = group.column(i).statistics
            if st is None:
                continue
            if (no_nulls and st.has_null_count and st.null_count > 0) or (
                    bounds is not None and st.has_min_max and not bounds[0] <= st.min <= st.max <= bounds[1]):
                out.append(piece)
                break
    return out


def _check_piece(pf: pq.ParquetFile, piece: Piece, schema: Schema) -> None:
    """Read one row group at startup and run the reader's checks on it (same messages)."""
    try:
        table = pf.read_row_group(piece.row_group, columns=schema.columns)
    except READ_ERRORS as e:
        raise decode_error(pf, piece, schema.columns, e) from None
    table_to_batch(table, schema, piece.path, locate=lambda i: (piece.path, piece.first_row + i))


def decode_error(pf: pq.ParquetFile, piece: Piece, columns: list[str], error: BaseException) -> DataError:
    """One line naming the file, row group, its rows and (when one column alone fails) the column."""
    column = ""
    for c in columns:
        try:
            pf.read_row_group(piece.row_group, columns=[c])
        except READ_ERRORS:
            column = f" column {c!r}"
            break
        except Exception:  # noqa: BLE001 - only used to name the column
            break
    last = piece.first_row + piece.num_rows - 1
    return DataError(f"{piece.path}: row group {piece.row_group}{column} (rows {piece.first_row}-{last} of the "
                     f"file) cannot be decoded ({one_line(error)}); the file is corrupt: write or copy it again "
                     f"(`rectrain data inspect` decodes every file and lists the bad ones)")


def _check_type(path: str, column: str, typ: pa.DataType, role: str) -> None:
    def is_int(t: pa.DataType) -> bool:
        return pa.types.is_integer(t)

    def is_list(t: pa.DataType) -> bool:
        return pa.types.is_list(t) or pa.types.is_large_list(t)

    numeric = pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)
    ok = {
        "label": numeric,
        "dense": numeric or pa.types.is_null(typ),
        "sparse": is_int(typ) or (is_list(typ) and is_int(typ.value_type)),
        "weight": pa.types.is_floating(typ) or (is_list(typ) and pa.types.is_floating(typ.value_type)),
        "passthrough": is_int(typ) or (is_list(typ) and is_int(typ.value_type)),
    }[role]
    if not ok:
        want = {
            "label": "a number",
            "dense": "a number",
            "sparse": "int64 or list<int64>",
            "weight": "float or list<float>",
            "passthrough": "int64 or list<int64>",
        }[role]
        raise DataError(f"{path}: column {column!r} has type {typ}; {role} columns must be {want}")


# --------------------------------------------------------------------------- arrow -> Batch


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _floats(col: pa.ChunkedArray) -> np.ndarray:
    return col.cast(pa.float32()).to_numpy()


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _id_values(arr: pa.Array) -> np.ndarray:
    """Ids as int64, except uint64 which stays unsigned (values >= 2**63 must not turn negative)."""
    values = arr.to_numpy(zero_copy_only=False)
    return values if values.dtype == np.uint64 else values.astype(np.int64, copy=False)


def _ids_and_lengths(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """(values, lengths, nulls, kept-mask of the flattened values) for a scalar or list column."""
    arr = col.combine_chunks()
    n = len(arr)
    if _is_list(arr.type):
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)
        flat = arr.flatten()
        nulls = arr.null_count + flat.null_count
        keep = None
        if flat.null_count:
            keep = flat.is_valid().to_numpy(zero_copy_only=False)
            parents = pc.list_parent_indices(arr).to_numpy()
            lengths -= np.bincount(parents[~keep], minlength=n)
            flat = flat.filter(pa.array(keep))
        return _id_values(flat), lengths, nulls, keep
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    nulls = arr.null_count
    values = _id_values(arr.drop_null() if nulls else arr)
    return values, valid.astype(np.int64), nulls, (valid if nulls else None)


class _Where:
    """Names a batch row as `<file>: column '<c>' row <file row>` (only on error paths)."""

    def __init__(self, locate: Locate) -> None:
        self.locate = locate

    def __call__(self, row: int, column: str) -> str:
        path, file_row = self.locate(int(row))
        return f"{path}: column {column!r} row {file_row}"

    def file(self) -> str:
        return self.locate(0)[0]


def _weights(table: pa.Table, feat, id_col: pa.ChunkedArray, keep: np.ndarray | None, num_ids: int,
             where: _Where) -> np.ndarray:
    """The weights of `feat`'s non-null ids, aligned with them; DataError naming the first row
    where they do not align."""
    wcol = table.column(feat.weight_column).combine_chunks()
    w = (wcol.flatten() if _is_list(wcol.type) else wcol).to_numpy(zero_copy_only=False)
    if keep is not None and len(w) == len(keep):
        w = w[keep]
    if len(w) == num_ids and not np.isnan(w).any():
        return w.astype(np.float32, copy=False)
    # error path: find the row
    ids = id_col.combine_chunks()
    fix = f"one non-null weight per id is required; fix {feat.weight_column!r} or data.weight_columns"
    if _is_list(ids.type) != _is_list(wcol.type):
        raise DataError(f"{where.file()}: weight column {feat.weight_column!r} does not align with the ids of "
                        f"{feat.name!r} (one is a list column, the other is not); {fix}")
    if _is_list(ids.type):
        n_ids = pc.fill_null(pc.list_value_length(ids), 0).to_numpy()
        n_w = pc.fill_null(pc.list_value_length(wcol), 0).to_numpy()
        if (n_ids != n_w).any():
            r = _first(n_ids != n_w)
            raise DataError(f"{where(r, feat.weight_column)}: {n_w[r]} weights do not align with the {n_ids[r]} "
                            f"ids of {feat.name!r}; {fix}")
        id_ok = ids.flatten().is_valid().to_numpy(zero_copy_only=False)
        w_all = wcol.flatten().to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(ids).to_numpy()
    else:
        id_ok = ids.is_valid().to_numpy(zero_copy_only=False)
        w_all = wcol.to_numpy(zero_copy_only=False)
        parents = np.arange(len(ids))
    bad = id_ok & np.isnan(w_all.astype(np.float64))
    r = int(parents[_first(bad)]) if bad.any() else 0
    raise DataError(f"{where(r, feat.weight_column)}: a weight is missing or NaN for an id of {feat.name!r} "
                    f"(the weights do not align with the ids); {fix}")


def _all_dropped(schema: Schema, dropped: int) -> Batch:
    batch = padding_for(schema)
    batch.dropped_rows, batch.all_dropped = dropped, True
    return batch


def table_to_batch(table: pa.Table, schema: Schema, where: str, locate: Locate | None = None,
                   on_drop: Callable[[str, int], None] | None = None) -> Batch:
    """Convert B rows to a Batch, applying the schema's policies and counting what they fixed.

    `locate(i)` gives the file and file-relative row of row `i` for error messages (default:
    file `where`, row i). `on_drop(description, count)` is told about rows that
    ``non_finite = "drop_row"`` leaves out.
    """
    n = table.num_rows
    path = where
    at = _Where(locate or (lambda i: (path, i)))
    for c in schema.label_columns:
        col = table.column(c)
        if col.null_count:
            r = _first(col.is_null().to_numpy(zero_copy_only=False))
            raise DataError(f"{at(r, c)}: label is null ({col.null_count} null among the {n} rows read with it); "
                            f"labels must be present: drop or fill those rows upstream")
    labels = (np.stack([_floats(table.column(c)) for c in schema.label_columns], axis=1)
              if schema.label_columns else np.zeros((n, 0), dtype=np.float32))
    dense, missing = _dense_values(table, schema)

    # NaN / inf: an error, or the row is left out and counted
    dropped = 0
    finite = np.isfinite(labels).all(axis=1) & np.isfinite(dense).all(axis=1)
    if not finite.all():
        r = _first(~finite)
        names = [*schema.label_columns, *schema.dense_columns]
        k = _first(~np.isfinite(np.concatenate([labels[r], dense[r]])))
        raw = table.column(names[k])[r].as_py()
        value = f"{raw} (too large for float32)" if isinstance(raw, (int, float)) and math.isfinite(raw) else str(raw)
        bad_rows = int((~finite).sum())
        if schema.non_finite != "drop_row":
            raise DataError(f"{at(r, names[k])}: value {value} is not finite ({bad_rows} row(s) with NaN or infinite "
                            f"values among the {n} rows read with it); fix the data, or set data.non_finite = "
                            f"\"drop_row\" to leave such rows out (they are counted as dropped_rows)")
        if on_drop is not None:
            on_drop(f"{at(r, names[k])} is {value}", bad_rows)
        dropped = bad_rows
        kept = np.flatnonzero(finite)
        if not len(kept):
            return _all_dropped(schema, dropped)
        table = table.take(pa.array(kept))
        labels, dense = labels[kept], dense[kept]
        missing = missing[kept] if missing is not None else None
        outer = at.locate
        at = _Where(lambda i: outer(int(kept[i])))
        n = len(kept)

    for k in [i for i, c in enumerate(schema.label_columns) if c in schema.binary_label_columns]:
        bad = (labels[:, k] != 0) & (labels[:, k] != 1)
        if bad.any():
            r, c = _first(bad), schema.label_columns[k]
            raise DataError(f"{at(r, c)}: label {_show(table.column(c)[r].as_py())} is not 0 or 1 ({int(bad.sum())} "
                            f"such label(s) among the {n} rows read with it); binary tasks need 0/1 labels: fix the "
                            f"data, or give the task that reads {c!r} kind = \"regression\"")

    dense, null_dense, negative_dense = finish_dense(dense, missing, schema)
    values, lengths, weights = [], [], []
    stats = np.zeros((len(schema.features), len(COUNTER_NAMES)), dtype=np.int64)
    limit = schema.max_list_length
    weighted = schema.weighted  # a scan of the features: once per batch, not per feature
    for i, feat in enumerate(schema.features):
        if feat.name in schema.absent_features:  # no column: an empty bag per row
            values.append(np.zeros(0, dtype=np.int64))
            lengths.append(np.zeros(n, dtype=np.int64))
            if weighted:
                weights.append(np.zeros(0, dtype=np.float32))
            continue
        col = table.column(feat.name)
        ids, lens, nulls, keep = _ids_and_lengths(col)
        w = _weights(table, feat, col, keep, len(ids), at) if feat.weight_column and weighted else None
        truncated = 0
        if limit and _is_list(col.type) and len(lens) and int(lens.max()) > limit:
            over = lens > limit
            if schema.list_overflow == "error":
                r = _first(over)
                raise DataError(f"{at(r, feat.name)}: list of {lens[r]} ids is longer than data.max_list_length = "
                                f"{limit} ({int(over.sum())} such row(s) among the {n} rows read with it); raise "
                                f"data.max_list_length, or set data.list_overflow = \"truncate\" to cut such lists "
                                f"(the cut ids are counted as truncated_ids)")
            offsets = np.cumsum(lens) - lens
            cut = (np.arange(len(ids)) - np.repeat(offsets, lens)) < limit
            truncated = len(ids) - int(cut.sum())
            ids, lens = ids[cut], np.minimum(lens, limit)
            w = w[cut] if w is not None else None

        def id_place(j: int, lens=lens, name=feat.name) -> str:
            return at(int(np.searchsorted(np.cumsum(lens), j, side="right")), name)

        mapped, neg, oor = map_ids(ids, feat.num_embeddings, schema.id_policy, id_place)
        stats[i] = (neg, oor, nulls, truncated)
        values.append(mapped)
        lengths.append(lens)
        if weighted:
            weights.append(w if w is not None else np.ones(len(mapped), dtype=np.float32))
    sparse = KeyedJaggedTensor(
        keys=schema.feature_names,
        values=torch.from_numpy(np.concatenate(values)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
        weights=torch.from_numpy(np.concatenate(weights)) if weighted else None,
    )
    return Batch(
        dense=torch.from_numpy(dense),
        sparse=sparse,
        labels=torch.from_numpy(labels.astype(np.float32, copy=False)),
        weights=torch.ones(n),
        id_stats=stats,
        null_dense=null_dense,
        negative_dense=negative_dense,
        dropped_rows=dropped,
        extras=_passthrough(table, schema),
    )


def _passthrough(table: pa.Table, schema: Schema) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The passthrough columns, raw: name -> (values int64 [n], lengths int64 [B]); a null row or
    null list entry contributes nothing."""
    extras = {}
    for c in schema.passthrough:
        ids, lens, _, _ = _ids_and_lengths(table.column(c))
        # A copy: arrow's buffers are read-only and torch wants writable memory.
        extras[c] = (torch.from_numpy(np.array(ids, dtype=np.int64)), torch.from_numpy(np.array(lens, dtype=np.int64)))
    return extras


def _dense_values(table: pa.Table, schema: Schema) -> tuple[np.ndarray, np.ndarray | None]:
    """(dense values [B, len(dense_columns)] as float32 with nulls filled by 0, bool null mask of
    the same shape or None when no value is null)."""
    n = table.num_rows
    cols, missing = [], None
    for k, c in enumerate(schema.dense_columns):
        col = table.column(c)
        if col.null_count:
            if missing is None:
                missing = np.zeros((n, len(schema.dense_columns)), dtype=bool)
            missing[:, k] = col.is_null().to_numpy(zero_copy_only=False)
            col = pc.fill_null(col.cast(pa.float32()), 0.0)
        cols.append(_floats(col))
    return (np.stack(cols, axis=1) if cols else np.zeros((n, 0), dtype=np.float32)), missing


def finish_dense(dense: np.ndarray, missing: np.ndarray | None, schema: Schema) -> tuple[np.ndarray, int, int]:
    """(dense [B, schema.num_dense], null count, negatives folded by log1p); `missing`: bool
    [B, len(dense_columns)] null mask, or None when no value is null."""
    n = dense.shape[0]
    if not schema.dense_columns:
        return np.zeros((n, 0), dtype=np.float32), 0, 0
    nulls = int(np.count_nonzero(missing)) if missing is not None else 0
    negatives = 0
    if schema.dense_transform == "log1p":
        negatives = int(np.count_nonzero(dense < 0))
        dense = signed_log1p(dense)
    if schema.dense_missing == "indicator":
        flags = missing if missing is not None else np.zeros((n, len(schema.dense_columns)), dtype=bool)
        dense = np.concatenate([dense, flags.astype(np.float32)], axis=1)
    return dense.astype(np.float32, copy=False), nulls, negatives


# --------------------------------------------------------------------------- the stream


class ParquetStream(IterableDataset):
    """Yields Batches for one rank; DataLoader workers split the rank's share further.

    Use with ``DataLoader(stream, batch_size=None, num_workers=stream.num_workers)``.
    """

    def __init__(
        self,
        uri: str,
        schema: Schema,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = False,
        shuffle_buffer_rows: int = 0,
        seed: int = 0,
    ) -> None:
        self.uri = uri
        self.schema = schema
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.shuffle = shuffle and shuffle_buffer_rows > 0
        self.window = shuffle_buffer_rows if self.shuffle else max(_UNSHUFFLED_WINDOW, batch_size)
        self.seed = seed
        self.fs, self.pieces = discover_pieces(uri, schema)
        self.total_rows = sum(p.num_rows for p in self.pieces)
        self.epoch = 0
        self.positions: dict[int, int] = {}  # slot -> rows consumed this epoch
        self.rotation = 0  # which of this rank's slots the first DataLoader worker serves
        # After a change of world size (or data.num_workers) mid-epoch: the rest of the epoch is
        # the rows the old slots had not consumed, as runs (base slot, from, to) of the base
        # layout's slot sequences (`base_slots` slots); slot j reads its share of them in order.
        self.base_slots = self.num_slots
        self.carry: list[tuple[int, int, int]] | None = None
        self._file_cache: dict[str, pq.ParquetFile] = {}
        self._maps: dict[str, pa.Buffer] = {}  # memory-mapped local file -> the whole mapping, no copy
        self.map_budget = _MAP_BUDGET
        self._decoded_spans: list[tuple[pa.Buffer, int, int]] = []
        self._decoded_bytes = 0
        self._rg_cache: tuple[tuple[str, int], columnar.RowGroupColumns] | None = None
        # False: every batch through table_to_batch (the tests compare both paths on the same rows)
        self._columnar = True
        # Set by the DataLoader's owner before it forks workers (trainer/loader.py): batches
        # then reach the main process through shared memory (data/transport.py).
        self.transport: BatchRing | None = None
        # Set likewise for DataLoader workers that live across iterations (persistent workers):
        # one queue per worker, on which the main process puts its state_dict() before each
        # iteration starts (a worker's copy of the stream is the one it forked with).
        self.cursor_channel: list | None = None

    # ---- partitioning
    @property
    def slots_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def num_slots(self) -> int:
        return self.world_size * self.slots_per_rank

    def rank_slots(self) -> list[int]:
        return [self.rank * self.slots_per_rank + w for w in range(self.slots_per_rank)]

    def ordered_pieces(self, epoch: int) -> list[Piece]:
        if not self.shuffle:
            return list(self.pieces)
        order = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self.pieces))
        return [self.pieces[i] for i in order]

    def slot_range(self, slot: int, num_slots: int | None = None) -> tuple[int, int]:
        """Rows [lo, hi) of the epoch's row sequence that `slot` of `num_slots` (default: this
        layout's) reads."""
        n = num_slots or self.num_slots
        return self.total_rows * slot // n, self.total_rows * (slot + 1) // n

    def slot_rows(self, slot: int) -> int:
        """Rows the slot reads this epoch: its base range, or its share of the carried rows."""
        if self.carry is not None:
            lo, hi = self._carry_range(slot)
            return hi - lo
        lo, hi = self.slot_range(slot)
        return hi - lo

    def remaining_batches(self) -> int:
        """Batches this rank still yields this epoch (the trainer pads up to the max over ranks)."""
        return sum(
            math.ceil(max(0, self.slot_rows(s) - self.positions.get(s, 0)) / self.batch_size)
            for s in self.rank_slots()
        )

    # ---- carried rows (after a change of layout mid-epoch)
    def _carry_range(self, slot: int) -> tuple[int, int]:
        """The slot's share [lo, hi) of the carried rows, in carry order."""
        total = sum(b - a for _, a, b in self.carry)
        return total * slot // self.num_slots, total * (slot + 1) // self.num_slots

    def _carry_runs(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Carried rows [lo, hi) as runs (base slot, from, to)."""
        runs, start = [], 0
        for slot, a, b in self.carry:
            end = start + b - a
            if end > lo and start < hi:
                runs.append((slot, a + max(lo, start) - start, a + min(hi, end) - start))
            start = end
        return runs

    def unconsumed_runs(self) -> list[tuple[int, int, int]]:
        """What this rank's slots have not consumed this epoch, as runs of the base layout."""
        runs = []
        for slot in self.rank_slots():
            pos = self.positions.get(slot, 0)
            if self.carry is None:
                lo, hi = self.slot_range(slot)
                if pos < hi - lo:
                    runs.append((slot, pos, hi - lo))
            else:
                lo, hi = self._carry_range(slot)
                runs += self._carry_runs(lo + pos, hi)
        return runs

    # ---- cursor
    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.positions, self.rotation = epoch, {}, 0
        self.base_slots, self.carry = self.num_slots, None

    def advance(self, batch: Batch) -> None:
        """Record that the trainer consumed `batch` (called in the main process)."""
        if batch.slot >= 0:
            self.positions[batch.slot] = batch.position
            self.rotation = (batch.slot - self.rank * self.slots_per_rank + 1) % self.slots_per_rank

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "positions": {str(k): v for k, v in self.positions.items()},
            "rotation": self.rotation,
            "num_slots": self.num_slots,
            "base_slots": self.base_slots,
            "carry": [list(r) for r in self.carry] if self.carry is not None else None,
            "unconsumed": [list(r) for r in self.unconsumed_runs()],
            "cursor": {str(s): self.describe_position(s) for s in self.rank_slots()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Take up this rank's slots where they stopped (same layout: world size x data.num_workers)."""
        if int(state["num_slots"]) != self.num_slots:
            raise DataError(f"data cursor was saved with {state['num_slots']} reader slots, now {self.num_slots}; "
                            f"resume with the same layout, or pass every rank's state to carry_over()")
        self.epoch = int(state["epoch"])
        self.base_slots = int(state.get("base_slots", self.num_slots))
        self.positions = {int(k): int(v) for k, v in state["positions"].items()}
        self.rotation = int(state["rotation"])
        self.carry = [tuple(r) for r in state["carry"]] if state.get("carry") is not None else None

    def carry_over(self, states: list[dict]) -> None:
        """Continue an epoch that another layout (world size x data.num_workers) started, from
        every old rank's saved state: the rest of the epoch is exactly the rows no old slot
        consumed, shared out over the new slots; nothing is seen twice, nothing skipped."""
        if any("unconsumed" not in st for st in states):
            raise DataError("this checkpoint's data cursor predates layout changes; resume it with the world size "
                            "and data.num_workers it was written with")
        self.epoch = int(states[0]["epoch"])
        self.base_slots = int(states[0]["base_slots"])
        self.carry = [tuple(r) for st in states for r in st["unconsumed"]]
        self.positions, self.rotation = {}, 0

    def describe_position(self, slot: int) -> dict:
        """File, row group and offset of a slot's next unread row (for humans and logs)."""
        pos = self.positions.get(slot, 0)
        if self.carry is not None:
            lo, hi = self._carry_range(slot)
            return {"carried_rows": hi - lo, "rows_consumed": pos}
        lo, hi = self.slot_range(slot)
        target = lo + min(pos, hi - lo)
        window = pos // self.window
        start = 0
        for piece in self.ordered_pieces(self.epoch):
            if target < start + piece.num_rows:
                return {"file": piece.path, "row_group": piece.row_group, "offset": target - start,
                        "window": window, "rows_consumed": pos}
            start += piece.num_rows
        return {"file": None, "row_group": None, "offset": 0, "window": window, "rows_consumed": pos}

    # ---- reading
    def _parquet_file(self, path: str) -> pq.ParquetFile:
        pf = self._file_cache.get(path)
        if pf is None:
            try:
                if isinstance(self.fs, pafs.LocalFileSystem):
                    # Mapped: pages are decoded straight out of the page cache instead of being
                    # copied into a buffer per column chunk first (about 0.1x of the decode).
                    source = pa.memory_map(path)
                    self._maps[path] = source.read_buffer(source.size())
                    source.seek(0)
                else:
                    source = self.fs.open_input_file(path)
                pf = pq.ParquetFile(source, page_checksum_verification=True)
            except READ_ERRORS as e:
                raise DataError(f"{path}: cannot be opened for reading any more ({one_line(e)}); was it changed or "
                                f"removed after the run started?") from None
            self._file_cache[path] = pf
        return pf

    @property
    def _mapped(self) -> dict[str, int]:
        """Each memory-mapped file's size when it was mapped."""
        return {path: mapping.size for path, mapping in self._maps.items()}

    def _check_still_whole(self, path: str) -> None:
        """A mapped file that shrank since it was mapped would kill the process with SIGBUS on
        the first page past its new end: refuse it with the file's name instead. (Replacing a
        file, or removing it, leaves the mapping whole; rewriting it in place at the same size
        is what the page checksums catch.)"""
        mapping = self._maps.get(path)
        if mapping is None:
            return
        mapped = mapping.size
        try:
            size = os.stat(path).st_size
        except OSError:  # removed (or replaced by nothing yet): the mapped file lives on
            return
        if size < mapped:
            raise DataError(f"{path}: changed after the run started ({size} bytes now, {mapped} when the run "
                            f"started); a dataset must not be rewritten while a run reads it: write new files "
                            f"under another name and start a new run")

    def _decoded_from_map(self, piece: Piece) -> None:
        """Count a decoded row group's mapped file pages; past `map_budget` bytes, take every
        decoded row group's pages out of the mapping. Mapped pages a process touched count in
        its resident memory, so a worker reading a large dataset would otherwise grow by all it
        read; below the budget they stay mapped, so the next pass over a small dataset finds them
        mapped."""
        mapping = self._maps.get(piece.path)
        if mapping is None:
            return
        self._decoded_spans.append((mapping, *piece.span))
        self._decoded_bytes += piece.span[1] - piece.span[0]
        if self._decoded_bytes > self.map_budget:
            for span in self._decoded_spans:
                _drop_pages(*span)
            self._decoded_spans, self._decoded_bytes = [], 0

    def _row_group(self, piece: Piece) -> columnar.RowGroupColumns:
        key = (piece.path, piece.row_group)
        if self._rg_cache is None or self._rg_cache[0] != key:
            pf = self._parquet_file(piece.path)
            self._check_still_whole(piece.path)
            try:
                # one thread: parallelism comes from DataLoader workers, which each own a core
                table = pf.read_row_group(piece.row_group, columns=self.schema.columns, use_threads=False)
            except READ_ERRORS as e:
                raise decode_error(pf, piece, self.schema.columns, e) from None
            if table.num_rows != piece.num_rows:
                raise DataError(f"{piece.path}: row group {piece.row_group} holds {table.num_rows} rows but its footer "
                                f"says {piece.num_rows}; the file is corrupt: write or copy it again")
            self._decoded_from_map(piece)
            self._rg_cache = (key, columnar.RowGroupColumns(table))
        return self._rg_cache[1]

    def _read_rows(self, pieces: list[Piece], lo: int, hi: int) -> list[columnar.Rows]:
        """Rows [lo, hi) of the epoch's global row sequence, one part per row group."""
        parts, start = [], 0
        for piece in pieces:
            end = start + piece.num_rows
            if end > lo and start < hi:
                a, b = max(lo, start) - start, min(hi, end) - start
                parts.append(columnar.Rows(self._row_group(piece), a, b - a))
            if end >= hi:
                break
            start = end
        return parts

    def _slot_rows(self, slot: int, position: int, pieces: list[Piece], num_slots: int | None = None,
                   end: int | None = None) -> Iterator[tuple[_Window, int, int]]:
        """Rows [position, end) of the slot's sequence (default: to its end), window by window:
        (window, lo, hi), the window's permuted rows [lo, hi). `num_slots` picks the layout
        (default: this one)."""
        lo, hi = self.slot_range(slot, num_slots)
        end = hi - lo if end is None else end
        first = position // self.window
        for w in range(first, math.ceil(end / self.window)):
            a, b = lo + w * self.window, min(hi, lo + (w + 1) * self.window)
            perm = None
            if self.shuffle:
                perm = np.random.default_rng([self.seed, self.epoch, slot, w]).permutation(b - a)
            skip = position - w * self.window if w == first else 0
            stop = min(b - a, end - w * self.window)
            yield _Window(self._read_rows(pieces, a, b), a, perm), skip, stop

    def _carried_rows(self, slot: int, position: int, pieces: list[Piece]) -> Iterator[tuple[_Window, int, int]]:
        """The slot's share of the carried rows from `position` on, read from the base layout."""
        lo, hi = self._carry_range(slot)
        for base_slot, a, b in self._carry_runs(lo + position, hi):
            yield from self._slot_rows(base_slot, a, pieces, num_slots=self.base_slots, end=b)

    def _slot_batches(self, slot: int) -> Iterator[Batch]:
        position = self.positions.get(slot, 0)
        pieces = self.ordered_pieces(self.epoch)
        starts = np.cumsum([0] + [p.num_rows for p in pieces])
        columnar_ok = self._columnar and columnar.applies(self.schema)
        pending: list[tuple[_Window, int, int]] = []
        pending_rows = 0
        warned = False

        def locator(origin: np.ndarray) -> Locate:
            def locate(i: int) -> tuple[str, int]:
                g = int(origin[i])
                k = int(np.searchsorted(starts, g, side="right")) - 1
                return pieces[k].path, pieces[k].first_row + g - int(starts[k])
            return locate

        def on_drop(description: str, count: int) -> None:
            nonlocal warned
            if not warned:
                warned = True
                log.warning("data.non_finite = drop_row: left out %d row(s) of a batch (first: %s); every row left "
                            "out is counted as dropped_rows (this warning: once per reader slot and pass)",
                            count, description)

        def emit(parts: list[tuple[_Window, int, int]]) -> Batch:
            nonlocal position
            converted = [w.columns(self.schema) for w, _, _ in parts] if columnar_ok else [None]
            if all(c is not None for c in converted):
                batch = columnar.make_batch([(c, lo, hi) for c, (_, lo, hi) in zip(converted, parts)], self.schema)
            else:
                table = _concat([w.take(lo, hi) for w, lo, hi in parts])
                origin = np.concatenate([w.origin(lo, hi) for w, lo, hi in parts])
                batch = table_to_batch(table, self.schema, self.uri, locate=locator(origin), on_drop=on_drop)
            position += sum(hi - lo for _, lo, hi in parts)  # rows read, dropped ones included
            self.positions[slot] = position
            batch.slot, batch.position = slot, position
            return batch

        source = self._carried_rows if self.carry is not None else self._slot_rows
        for window, lo, hi in source(slot, position, pieces):
            if hi == lo:  # a resumed cursor at the end of its rows
                continue
            pending.append((window, lo, hi))
            pending_rows += hi - lo
            while pending_rows >= self.batch_size:
                parts, need = [], self.batch_size
                while need:
                    w, a, b = pending[0]
                    take = min(need, b - a)
                    parts.append((w, a, a + take))
                    if take == b - a:
                        pending.pop(0)
                    else:
                        pending[0] = (w, a + take, b)
                    need -= take
                pending_rows -= self.batch_size
                yield emit(parts)
        if pending_rows:
            yield emit(pending)

    def __iter__(self) -> Iterator[Batch | list]:
        info = get_worker_info()
        if info is not None and self.cursor_channel is not None:
            # Now, not when the first batch is asked for: the DataLoader makes a worker's iterator
            # as each iteration starts, in order, so the n-th read is the n-th iteration's cursor
            # even for an iteration that never gives the worker a task.
            self.load_state_dict(self.cursor_channel[info.id].get())
        return self._worker_batches(info)

    def _worker_batches(self, info) -> Iterator[Batch | list]:
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != self.slots_per_rank:
            raise DataError(f"DataLoader has {info.num_workers} workers but the stream was built for "
                            f"{self.slots_per_rank}; pass num_workers=data.num_workers to both")
        local = (worker + self.rotation) % self.slots_per_rank
        batches = self._slot_batches(self.rank * self.slots_per_rank + local)
        ring = self.transport if info is not None else None
        if ring is None:
            yield from batches
            return
        # ring.batches_per_item batches to a DataLoader item (data/transport.py says why; the
        # loader's iterator hands them out one by one); the batches made before an error still
        # arrive, in order, before it
        item: list = []
        try:
            for batch in batches:
                item.append(ring.put(worker, batch))
                if len(item) == ring.batches_per_item:
                    yield item
                    item = []
        except Exception:
            if item:
                yield item
            raise
        if item:
            yield item


class _Window:
    """One shuffle window of a slot: rows [start, start + n) of the epoch's row sequence as read
    (one part per row group), the permutation that orders them (None: unshuffled), and their
    columnar conversion, made when a batch first asks for it (None when these rows need
    `table_to_batch`)."""

    __slots__ = ("parts", "start", "perm", "_table", "_columns", "_converted")

    def __init__(self, parts: list[columnar.Rows], start: int, perm: np.ndarray | None) -> None:
        self.parts, self.start, self.perm = parts, start, perm
        self._table: pa.Table | None = None
        self._columns: columnar.Columns | None = None
        self._converted = False

    def take(self, lo: int, hi: int) -> pa.Table:
        """The window's permuted rows [lo, hi) as one table (for `table_to_batch`)."""
        if self._table is None:
            self._table = _concat([part.table for part in self.parts])
        if self.perm is None:
            return self._table.slice(lo, hi - lo)
        return self._table.take(pa.array(self.perm[lo:hi]))

    def origin(self, lo: int, hi: int) -> np.ndarray:
        """Each row's index in the epoch's row sequence (for error messages)."""
        return self.start + (np.arange(lo, hi, dtype=np.int64) if self.perm is None else self.perm[lo:hi])

    def columns(self, schema: Schema) -> columnar.Columns | None:
        if not self._converted:
            self._columns, self._converted = columnar.Columns.convert(self.parts, self.perm, schema), True
        return self._columns


def _madvise():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


_MADVISE = _madvise()
_MADV_DONTNEED = 4  # Linux and macOS


def _drop_pages(mapping: pa.Buffer, lo: int, hi: int) -> None:
    """Take file bytes [lo, hi) out of this process's mapping (the page cache keeps them;
    touching them again maps them again)."""
    page = mmap.PAGESIZE
    lo, hi = max(0, lo) // page * page, min(hi, mapping.size)
    if _MADVISE is None or hi <= lo:
        return
    _MADVISE(mapping.address + lo, hi - lo, _MADV_DONTNEED)


def _concat(tables: list[pa.Table]) -> pa.Table:
    # Files agree on column types (checked at startup) but may differ in nullability/metadata.
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
