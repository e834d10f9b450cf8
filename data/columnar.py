"""The reader's fast path: convert a whole shuffle window to numpy once, then cut its batches.

Why it exists. `table_to_batch` turns one batch into tensors column by column, with a few pyarrow
and numpy calls per column. On Criteo-shaped data (40 columns, batches of 2,048 rows) that fixed
cost per batch and column is larger than decoding the Parquet itself. Here each column of a
window is read out of its Arrow buffers, checked and put in the window's shuffled order once,
and a batch is a slice of the window's arrays.

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
from data.schema import COUNTER_NAMES, Schema, _splitmix64

_POLICIES = ("modulo", "hash", "strict")
_NEGATIVE, _OUT_OF_RANGE, _NULL = (COUNTER_NAMES.index(c) for c in ("negative", "out_of_range", "null"))


def applies(schema: Schema) -> bool:
    """Whether the schema's batches can come from this module at all (windows may still not)."""
    return (schema.id_policy in _POLICIES and not schema.absent_features and not schema.passthrough
            and not any(f.weight_column for f in schema.features))


class Columns:
    """One window's rows as numpy arrays, already in the (shuffled) order its batches take them,
    so that a batch is a slice of each: a batch that gathered its ids out of a window-wide array
    would miss the cache on every id, while a window's column (a few hundred KiB) stays in cache
    while it is permuted.

    ids:     int64 [F, n], mapped by the id policy (feature-major, as the KJT wants them)
    valid:   bool [F, n] False where an id is null, or None when no id is null
    counts:  (feature, counter, running count [n + 1]) for each nonzero negative/out_of_range/
             null id counter: rows a..b hold counts[b] - counts[a]
    labels:  float32 [n, L]
    dense:   float32 [n, D], nulls as 0, before the transform (`make_batch` finishes a batch's
             rows as `table_to_batch` does)
    missing: bool [n, D] null dense values, kept for data.dense_missing = "indicator" only
    nulls:   running count [n + 1] of null dense values, or None when the window has none
    """

    __slots__ = ("ids", "valid", "counts", "labels", "dense", "missing", "nulls")

    def __init__(self, ids, valid, counts, labels, dense, missing, nulls) -> None:
        self.ids, self.valid, self.counts = ids, valid, counts
        self.labels, self.dense, self.missing, self.nulls = labels, dense, missing, nulls

    @classmethod
    def convert(cls, tables: list[pa.Table], perm: np.ndarray | None, schema: Schema) -> "Columns | None":
        """The rows of `tables` (one after the other) in the order `perm` gives (None: as read),
        or None when `table_to_batch` must handle these rows (an error to raise with its
        message, rows to drop, a column type this path does not take)."""
        n = sum(t.num_rows for t in tables)
        try:
            labels, label_nulls = _float_columns(tables, schema.label_columns, n)
            if label_nulls is not None:
                return None
            dense, missing = _float_columns(tables, schema.dense_columns, n)
            if not (np.isfinite(labels).all() and np.isfinite(dense).all()):
                return None
            for k, c in enumerate(schema.label_columns):
                if c in schema.binary_label_columns and ((labels[k] != 0) & (labels[k] != 1)).any():
                    return None
            mapped = _ids(tables, schema, n, perm)
        except pa.ArrowException:  # e.g. a cast that refuses a value: the batch raises it as before
            return None
        if mapped is None:
            return None
        nulls = _running(missing.sum(axis=0), perm) if missing is not None else None
        flags = None
        if missing is not None and schema.dense_missing == "indicator":
            flags = _rows_in_order(missing, perm)
        # filled a column at a time (contiguous writes); batches take rows
        return cls(*mapped, _rows_in_order(labels, perm), _rows_in_order(dense, perm), flags, nulls)


def _rows_in_order(columns: np.ndarray, perm: np.ndarray | None) -> np.ndarray:
    """[columns, n] -> its rows [n, columns], in `perm` order."""
    rows = columns.T.copy()
    return rows if perm is None else rows.take(perm, axis=0)


def _running(per_row: np.ndarray, perm: np.ndarray | None) -> np.ndarray:
    """[n + 1] running sum of `per_row` in `perm` order: a slice's total in two lookups."""
    out = np.zeros(len(per_row) + 1, dtype=np.int64)
    np.cumsum(per_row if perm is None else per_row.take(perm), out=out[1:])
    return out


def _chunks(tables: list[pa.Table], column: str) -> list[pa.Array]:
    return [chunk for t in tables for chunk in t.column(column).chunks]


def _float_columns(tables: list[pa.Table], columns: tuple[str, ...], n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(float32 [len(columns), n] with nulls as 0, bool null mask or None when no null): what
    `_floats` / `_dense_values` give, transposed, read straight out of the Arrow buffers (on a
    window, their per-column compute calls and copies cost more than the values)."""
    out = np.empty((len(columns), n), dtype=np.float32)
    missing = None
    for k, c in enumerate(columns):
        at = 0
        for chunk in _chunks(tables, c):
            m = len(chunk)
            if chunk.type != pa.float32():
                chunk = chunk.cast(pa.float32())
            out[k, at:at + m] = _values(chunk, np.float32)
            if chunk.null_count:
                if missing is None:
                    missing = np.zeros(out.shape, dtype=bool)
                missing[k, at:at + m] = ~_valid(chunk)
            at += m
    if missing is not None:
        np.copyto(out, 0.0, where=missing)  # what a null slot's buffer holds is unspecified
    return out, missing


def _ids(tables: list[pa.Table], schema: Schema, n: int, perm: np.ndarray | None) -> tuple | None:
    """(ids int64 [F, n] mapped by the id policy, valid mask or None, counts), rows in `perm`
    order, or None when these rows need `table_to_batch`: a column that is not a scalar
    integer column, a uint64 id that int64 cannot hold, an id outside the table under the
    strict policy."""
    ids = np.empty((len(schema.features), n), dtype=np.int64)
    valid, counts = None, []
    joined = np.empty(n, dtype=np.int64) if perm is not None else None
    for k, feat in enumerate(schema.features):
        chunks = _chunks(tables, feat.name)
        row = ids[k]
        into = row if perm is None else joined
        at = 0
        for chunk in chunks:
            m = len(chunk)
            if chunk.type == pa.int64():
                into[at:at + m] = _values(chunk, np.int64)
            elif not pa.types.is_integer(chunk.type):
                return None
            elif chunk.type == pa.uint64() and m and (pc.max(chunk).as_py() or 0) >= 1 << 63:
                return None
            else:
                into[at:at + m] = pc.fill_null(chunk, 0).to_numpy()
            at += m
        masks = []  # (counter, bool [n] as read)
        if any(ch.null_count for ch in chunks):
            ok = np.concatenate([_valid(ch) for ch in chunks])
            # 0 is in every table's range: a null's filler adds to no counter and is never kept
            np.copyto(into, 0, where=~ok)
            masks.append((_NULL, ~ok))
            if valid is None:
                valid = np.ones(ids.shape, dtype=bool)
            valid[k] = ok if perm is None else ok.take(perm)
        size = feat.num_embeddings
        # one pass for both bounds: a negative id viewed as uint64 is above any table size
        if n and int(into.view(np.uint64).max()) >= size:
            if schema.id_policy == "strict":
                return None
            masks += [(_NEGATIVE, into < 0), (_OUT_OF_RANGE, into >= size)]
            if schema.id_policy == "modulo":
                np.mod(into, size, out=into)
        if schema.id_policy == "hash":
            with np.errstate(over="ignore"):
                into[:] = (_splitmix64(into) % np.uint64(size)).astype(np.int64)
        counts += [(k, counter, _running(mask, perm)) for counter, mask in masks if mask.any()]
        if perm is not None:
            joined.take(perm, out=row, mode="clip")  # "clip": indices are valid; "raise" buffers `out`
    return ids, valid, counts


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
    """The batch's rows of a window array, as a fresh array (a batch must not share a window's
    memory)."""
    pieces = [getattr(c, name)[lo:hi] if axis == 0 else getattr(c, name)[:, lo:hi] for c, lo, hi in parts]
    return np.concatenate(pieces, axis=axis) if len(pieces) > 1 else pieces[0].copy()


def make_batch(parts: list[Part], schema: Schema) -> Batch:
    """The Batch of the rows `parts` names (in batch order), equal to what `table_to_batch`
    makes of the same rows."""
    from data.parquet import finish_dense  # late: data.parquet imports this module

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
    flags = None
    if any(c.missing is not None for c, _, _ in parts):
        flags = np.concatenate([c.missing[lo:hi] if c.missing is not None
                                else np.zeros((hi - lo, len(schema.dense_columns)), dtype=bool) for c, lo, hi in parts])
    dense, _, negative_dense = finish_dense(_rows(parts, "dense"), flags, schema)
    labels = _rows(parts, "labels")
    return Batch(
        dense=torch.from_numpy(dense),
        sparse=sparse,
        labels=torch.from_numpy(labels),
        weights=torch.ones(len(labels)),
        id_stats=stats,
        null_dense=sum(int(c.nulls[hi] - c.nulls[lo]) for c, lo, hi in parts if c.nulls is not None),
        negative_dense=negative_dense,
    )
