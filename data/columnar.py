"""The reader's fast path: convert a whole shuffle window to numpy once, then cut its batches.

Why it exists. `table_to_batch` turns one batch into tensors column by column, with a few pyarrow
and numpy calls per column. On Criteo-shaped data (40 columns, batches of 2,048 rows) that fixed
cost per batch and column is larger than decoding the Parquet itself. Here a decoded row group's
columns are read out of their Arrow buffers once (`RowGroupColumns`: views where the buffer is
already int64 or float32 without nulls), each shuffle window taking rows from it is checked,
mapped and transformed a column at a time (the dense values and labels as one [L + D, n] array)
and put in its shuffled order with one gather per column, and a batch is a copy of a slice of the
window's arrays.

When it applies. Schemas without weight columns, passthrough columns or absent features
(`applies`), and windows whose every sparse column is a scalar integer column (a null id is
fine: an empty bag, counted as null) and whose values need no error and no dropped row: labels
present, labels and dense values finite, binary labels 0 or 1, uint64 ids below 2**63, and under
``id_policy = "strict"`` every id in range (`Columns.convert` returns None otherwise). Everything
else goes through `table_to_batch`, which stays the reference: a batch built here must equal, in
every tensor and counter, the one `table_to_batch` builds from the same rows, and a window that
needs an error message or a dropped row is left to it so that both come out as before.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import Batch
from data.schema import COUNTER_NAMES, Schema, _splitmix64, signed_log1p

_POLICIES = ("modulo", "hash", "strict")
_NEGATIVE, _OUT_OF_RANGE, _NULL = (COUNTER_NAMES.index(c) for c in ("negative", "out_of_range", "null"))


def applies(schema: Schema) -> bool:
    """Whether the schema's batches can come from this module at all (windows may still not)."""
    return (schema.id_policy in _POLICIES and not schema.absent_features and not schema.passthrough
            and not any(f.weight_column for f in schema.features))


class _NotHere(Exception):
    """These rows need `table_to_batch` (an error to raise with its message, a row to drop, a
    column type this path does not take)."""


class Columns:
    """One window's rows as numpy arrays, already in the (shuffled) order its batches take them,
    so that a batch is a slice of each.

    ids:       int64 [F, n], mapped by the id policy (feature-major, as the KJT wants them)
    valid:     bool [F, n] False where an id is null, or None when no id is null
    counts:    (feature, counter, running count [n + 1]) for each nonzero negative/out_of_range/
               null id counter: rows a..b hold counts[b] - counts[a]
    labels:    float32 [n, L]
    dense:     float32 [n, schema.num_dense], finished as `finish_dense` finishes a batch's rows
               (nulls as 0, the transform, the missing flags): the same elementwise operations
    nulls:     running count [n + 1] of null dense values, or None when the window has none
    negatives: running count [n + 1] of negative dense values log1p folded, or None when none
    """

    __slots__ = ("ids", "valid", "counts", "labels", "dense", "nulls", "negatives")

    def __init__(self, ids, valid, counts, labels, dense, nulls, negatives) -> None:
        self.ids, self.valid, self.counts = ids, valid, counts
        self.labels, self.dense, self.nulls, self.negatives = labels, dense, nulls, negatives

    @classmethod
    def convert(cls, pieces: "list[Rows | pa.Table]", perm: np.ndarray | None, schema: Schema) -> "Columns | None":
        """The rows of `pieces` (one after the other) in the order `perm` gives (None: as read),
        or None when `table_to_batch` must handle these rows. A piece is rows of a decoded row
        group (`Rows`) or a whole table."""
        pieces = [p if isinstance(p, Rows) else Rows(RowGroupColumns(p), 0, p.num_rows) for p in pieces]
        n = sum(p.rows for p in pieces)
        try:
            labels, dense, nulls, negatives = _floats(pieces, schema, n, perm)
            ids, valid, counts = _ids(pieces, schema, n, perm)
        except (_NotHere, pa.ArrowException):  # e.g. a cast that refuses a value: the batch raises it as before
            return None
        return cls(ids, valid, counts, labels, dense, nulls, negatives)


class RowGroupColumns:
    """A decoded row group (or any table) whose columns are read out as numpy arrays once, for
    every window that takes rows from it: on Criteo-shaped data a window (16,384 rows) is a
    quarter of a 65,536-row group, and the pyarrow calls per column (wrappers, buffers, casts,
    validity bitmaps) cost as much as the copies."""

    __slots__ = ("table", "_ids", "_floats")

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self._ids: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        self._floats: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}

    def ids(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(int64 ids with nulls as 0, valid mask or None when no id is null); _NotHere for a
        column this path does not take."""
        got = self._ids.get(name)
        if got is None:
            got = self._ids[name] = _id_column(self.table.column(name).chunks, self.table.num_rows)
        return got

    def floats(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(float32 values with nulls as 0, null mask or None when no value is null)."""
        got = self._floats.get(name)
        if got is None:
            got = self._floats[name] = _float_column(self.table.column(name).chunks, self.table.num_rows)
        return got


class Rows:
    """Rows [start, start + rows) of a `RowGroupColumns` (a window's part of a row group)."""

    __slots__ = ("source", "start", "rows")

    def __init__(self, source: RowGroupColumns, start: int, rows: int) -> None:
        self.source, self.start, self.rows = source, start, rows

    @property
    def table(self) -> pa.Table:
        return self.source.table.slice(self.start, self.rows)


def _in_order(columns: np.ndarray, perm: np.ndarray | None) -> np.ndarray:
    """[columns, n] -> its rows [n, columns], in `perm` order (one gather, rows contiguous)."""
    return columns.T.copy() if perm is None else columns.T.take(perm, axis=0)


def _running(per_row: np.ndarray, perm: np.ndarray | None) -> np.ndarray:
    """[n + 1] running sum of `per_row` in `perm` order: a slice's total in two lookups."""
    out = np.zeros(len(per_row) + 1, dtype=np.int64)
    np.cumsum(per_row if perm is None else per_row.take(perm), out=out[1:])
    return out


def _per_row(mask: np.ndarray) -> np.ndarray:
    """bool [columns, n] -> how many are set in each row [n] (summed as bytes: 13x the speed
    of bool.sum(axis=0), which widens every element to int64)."""
    dtype = np.uint8 if len(mask) < 256 else np.int64
    return np.add.reduce(mask.view(np.uint8), axis=0, dtype=dtype)


def _float_column(chunks: list[pa.Array], n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(float32 [n] with nulls as 0, null mask or None when no value is null). A lone float32
    chunk without nulls is its Arrow buffer, not a copy."""
    if len(chunks) == 1 and chunks[0].type == pa.float32() and not chunks[0].null_count:
        return _values(chunks[0], np.float32), None
    out, at, missing = np.empty(n, dtype=np.float32), 0, None
    for chunk in chunks:
        m = len(chunk)
        if chunk.type != pa.float32():
            chunk = chunk.cast(pa.float32())
        out[at:at + m] = _values(chunk, np.float32)
        if chunk.null_count:
            if missing is None:
                missing = np.zeros(n, dtype=bool)
            missing[at:at + m] = ~_valid(chunk)
        at += m
    if missing is not None:
        np.copyto(out, 0.0, where=missing)  # what a null slot's buffer holds is unspecified
    return out, missing


def _floats(pieces: list[Rows], schema: Schema, n: int, perm: np.ndarray | None) -> tuple:
    """(labels [n, L], finished dense [n, num_dense], null running count or None, negative
    running count or None) in `perm` order. Labels and dense values share one float32 buffer
    [L + D, n] so that the finiteness check is one call."""
    names = (*schema.label_columns, *schema.dense_columns)
    num_labels = len(schema.label_columns)
    out = np.empty((len(names), n), dtype=np.float32)
    missing = None
    for k, c in enumerate(names):
        at = 0
        for p in pieces:
            values, nulls = p.source.floats(c)
            out[k, at:at + p.rows] = values[p.start:p.start + p.rows]
            if nulls is not None:
                part = nulls[p.start:p.start + p.rows]
                if part.any():
                    if k < num_labels:
                        raise _NotHere  # a null label is an error with its row
                    if missing is None:
                        missing = np.zeros(out.shape, dtype=bool)
                    missing[k, at:at + p.rows] = part
            at += p.rows
    if not np.isfinite(out).all():
        raise _NotHere
    for k, c in enumerate(schema.label_columns):
        if c in schema.binary_label_columns and ((out[k] != 0) & (out[k] != 1)).any():
            raise _NotHere
    labels = _in_order(out[:num_labels], perm)
    dense = out[num_labels:]
    nulls = negatives = None
    if missing is not None:
        missing = missing[num_labels:]
        nulls = _running(_per_row(missing), perm)
    if schema.dense_transform == "log1p" and len(dense):
        negative = dense < 0
        if negative.any():
            negatives = _running(_per_row(negative), perm)
        dense = signed_log1p(dense)
    if schema.dense_missing == "indicator":
        flags = missing.astype(np.float32) if missing is not None else np.zeros_like(dense)
        dense = np.concatenate([dense, flags])
    return labels, _in_order(dense, perm), nulls, negatives


def _ids(pieces: list[Rows], schema: Schema, n: int, perm: np.ndarray | None) -> tuple:
    """(ids int64 [F, n] mapped by the id policy, valid mask or None, counts), rows in `perm`
    order. Raises _NotHere for a column that is not a scalar integer column, a uint64 id that
    int64 cannot hold, an id outside the table under the strict policy."""
    features = schema.features
    ids = np.empty((len(features), n), dtype=np.int64)
    valid = None
    masks: list[tuple[int, int, np.ndarray]] = []  # (feature, counter, bool [n] as read)
    for k, feat in enumerate(features):
        raw, ok = _window_ids(pieces, feat.name, n)
        if ok is not None:
            masks.append((k, _NULL, ~ok))
            if valid is None:
                valid = np.ones(ids.shape, dtype=bool)
            valid[k] = ok
        size = feat.num_embeddings
        # one pass for both bounds: a negative id viewed as uint64 is above any table size
        if n and int(raw.view(np.uint64).max()) >= size:
            if schema.id_policy == "strict":
                raise _NotHere
            masks += [(k, _NEGATIVE, raw < 0), (k, _OUT_OF_RANGE, raw >= size)]
            if schema.id_policy == "modulo":
                raw = np.mod(raw, size)
        if schema.id_policy == "hash":
            with np.errstate(over="ignore"):
                raw = (_splitmix64(raw) % np.uint64(size)).astype(np.int64)
        if perm is None:
            ids[k] = raw
        else:
            raw.take(perm, out=ids[k], mode="clip")  # "clip": indices are valid; "raise" buffers `out`
    counts = [(k, counter, _running(mask, perm)) for k, counter, mask in masks if mask.any()]
    if valid is not None and perm is not None:
        valid = valid.take(perm, axis=1)
    return ids, valid, counts


def _window_ids(pieces: list[Rows], name: str, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The window's ids of one feature as read (a view when one piece holds them all) and their
    valid mask, or None when none is null."""
    parts = [(p, *p.source.ids(name)) for p in pieces]
    if len(parts) == 1:
        p, values, ok = parts[0]
        ok = ok[p.start:p.start + p.rows] if ok is not None else None
        return values[p.start:p.start + p.rows], (ok if ok is not None and not ok.all() else None)
    raw = np.concatenate([values[p.start:p.start + p.rows] for p, values, _ in parts])
    if all(ok is None for _, _, ok in parts):
        return raw, None
    ok = np.concatenate([ok[p.start:p.start + p.rows] if ok is not None else np.ones(p.rows, dtype=bool)
                         for p, _, ok in parts])
    return raw, (ok if not ok.all() else None)


def _id_column(chunks: list[pa.Array], n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(int64 ids [n] as read, nulls as 0; valid mask or None when no id is null). A lone int64
    chunk without nulls is its Arrow buffer, not a copy (read-only: mapping makes new arrays)."""
    if len(chunks) == 1 and chunks[0].type == pa.int64() and not chunks[0].null_count:
        return _values(chunks[0], np.int64), None
    raw, at = np.empty(n, dtype=np.int64), 0
    for chunk in chunks:
        m = len(chunk)
        if chunk.type == pa.int64():
            raw[at:at + m] = _values(chunk, np.int64)
        elif not pa.types.is_integer(chunk.type):
            raise _NotHere
        elif chunk.type == pa.uint64() and m and (pc.max(chunk).as_py() or 0) >= 1 << 63:
            raise _NotHere
        else:
            raw[at:at + m] = pc.fill_null(chunk, 0).to_numpy()
        at += m
    if not any(chunk.null_count for chunk in chunks):
        return raw, None
    ok = np.concatenate([_valid(chunk) for chunk in chunks])
    # 0 is in every table's range: a null's filler adds to no counter and is never kept
    np.copyto(raw, 0, where=~ok)
    return raw, ok


def _values(chunk: pa.Array, dtype) -> np.ndarray:
    """A fixed-width array's values buffer as numpy, without a copy (null slots: unspecified)."""
    buf = chunk.buffers()[1]
    if buf is None:  # an array of nulls only may have no values buffer
        return np.zeros(len(chunk), dtype=dtype)
    return np.frombuffer(buf, dtype=dtype, count=chunk.offset + len(chunk))[chunk.offset:]


def _valid(chunk: pa.Array) -> np.ndarray:
    """bool [len(chunk)], False at nulls."""
    if not chunk.null_count:
        return np.ones(len(chunk), dtype=bool)
    bits = np.frombuffer(chunk.buffers()[0], dtype=np.uint8)
    return np.unpackbits(bits, bitorder="little")[chunk.offset:chunk.offset + len(chunk)].view(bool)


# A part of a batch: rows [lo, hi) of a window's columns.
Part = tuple[Columns, int, int]


def _rows(parts: list[Part], name: str, axis: int = 0) -> np.ndarray:
    """The batch's rows of a window array as a fresh contiguous array (an id slice [:, lo:hi] is
    not contiguous, and a batch that viewed the window would keep all of it alive)."""
    pieces = [getattr(c, name)[lo:hi] if axis == 0 else getattr(c, name)[:, lo:hi] for c, lo, hi in parts]
    return np.concatenate(pieces, axis=axis) if len(pieces) > 1 else pieces[0].copy()


def _total(parts: list[Part], name: str) -> int:
    return sum(int(run[hi] - run[lo]) for c, lo, hi in parts if (run := getattr(c, name)) is not None)


def make_batch(parts: list[Part], schema: Schema) -> Batch:
    """The Batch of the rows `parts` names (in batch order), equal to what `table_to_batch`
    makes of the same rows."""
    ids = _rows(parts, "ids", axis=1)
    stats = np.zeros((len(schema.features), len(COUNTER_NAMES)), dtype=np.int64)
    for c, lo, hi in parts:
        for k, counter, run in c.counts:
            stats[k, counter] += run[hi] - run[lo]
    if any(c.valid is not None for c, _, _ in parts):
        valid = np.concatenate([c.valid[:, lo:hi] if c.valid is not None else np.ones((len(ids), hi - lo), dtype=bool)
                                for c, lo, hi in parts], axis=1)
        values = ids[valid]  # row-major over [F, B]: feature by feature, as the KJT wants
        lengths = torch.from_numpy(valid.reshape(-1).astype(np.int32))
    else:
        values = ids.reshape(-1)
        lengths = torch.ones(values.shape[0], dtype=torch.int32)
    sparse = KeyedJaggedTensor(keys=schema.feature_names, values=torch.from_numpy(values), lengths=lengths)
    labels = _rows(parts, "labels")
    return Batch(
        dense=torch.from_numpy(_rows(parts, "dense")),
        sparse=sparse,
        labels=torch.from_numpy(labels),
        weights=torch.ones(len(labels)),
        id_stats=stats,
        null_dense=_total(parts, "nulls"),
        negative_dense=_total(parts, "negatives"),
    )
