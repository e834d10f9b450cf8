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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import Batch
from data.schema import DataError, Schema, map_ids

_UNSHUFFLED_WINDOW = 1 << 16


@dataclass(frozen=True)
class Piece:
    """One row group of one file."""

    path: str
    row_group: int
    num_rows: int


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local path or any `pyarrow.fs` URI (s3://, gs://, file://)."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except pa.ArrowException as e:
            raise DataError(f"{uri}: pyarrow cannot open this URI ({e}); use a local path or a pyarrow.fs URI") from None
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
    }[role]
    if not ok:
        want = {
            "label": "a number",
            "dense": "a number",
            "sparse": "int64 or list<int64>",
            "weight": "float or list<float>",
        }[role]
        raise DataError(f"{path}: column {column!r} has type {typ}; {role} columns must be {want}")


def validate_file_schema(path: str, arrow_schema: pa.Schema, schema: Schema) -> None:
    roles = [(c, "label", "data.label_columns") for c in schema.label_columns]
    roles += [(c, "dense", "data.dense_columns") for c in schema.dense_columns]
    roles += [(f.name, "sparse", "data.sparse_columns") for f in schema.features]
    roles += [(f.weight_column, "weight", "data.weight_columns") for f in schema.features if f.weight_column]
    names = set(arrow_schema.names)
    for column, role, key in roles:
        if column not in names:
            raise DataError(f"{path}: column {column!r} (from {key}) is missing; the file has "
                            f"{sorted(names)[:12]}{'...' if len(names) > 12 else ''}; fix {key} or the file")
        _check_type(path, column, arrow_schema.field(column).type, role)


def discover_pieces(uri: str, schema: Schema) -> tuple[pafs.FileSystem, list[Piece]]:
    """Every row group under `uri`, after checking each file's columns against the schema."""
    fs, files = list_parquet_files(uri)
    pieces: list[Piece] = []
    for path in files:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            validate_file_schema(path, meta.schema.to_arrow_schema(), schema)
            pieces += [Piece(path, rg, meta.row_group(rg).num_rows) for rg in range(meta.num_row_groups)]
    return fs, pieces


# --------------------------------------------------------------------------- arrow -> Batch


def _dense_matrix(table: pa.Table, schema: Schema) -> tuple[np.ndarray, int, int]:
    """(dense [B, schema.num_dense], null count, negatives folded by log1p)."""
    n = table.num_rows
    if not schema.dense_columns:
        return np.zeros((n, 0), dtype=np.float32), 0, 0
    cols, missing = [], []
    for c in schema.dense_columns:
        col = table.column(c)
        if col.null_count:
            missing.append(col.is_null().to_numpy(zero_copy_only=False))
            col = pc.fill_null(col.cast(pa.float32()), 0.0)
        else:
            missing.append(None)
        cols.append(col.cast(pa.float32()).to_numpy())
    dense = np.stack(cols, axis=1)
    nulls = sum(int(m.sum()) for m in missing if m is not None)
    negatives = 0
    if schema.dense_transform == "log1p":
        negatives = int(np.count_nonzero(dense < 0))
        dense = np.sign(dense) * np.log1p(np.abs(dense))
    if schema.dense_missing == "indicator":
        flags = np.stack([m if m is not None else np.zeros(n, dtype=bool) for m in missing], axis=1)
        dense = np.concatenate([dense, flags.astype(np.float32)], axis=1)
    return dense.astype(np.float32, copy=False), nulls, negatives


def _ids_and_lengths(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """(values, lengths, nulls, kept-mask of the flattened values) for a scalar or list column."""
    arr = col.combine_chunks()
    n = len(arr)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)
        flat = arr.flatten()
        nulls = arr.null_count + flat.null_count
        keep = None
        if flat.null_count:
            keep = flat.is_valid().to_numpy(zero_copy_only=False)
            parents = pc.list_parent_indices(arr).to_numpy()
            lengths -= np.bincount(parents[~keep], minlength=n)
            flat = flat.filter(pa.array(keep))
        return flat.to_numpy().astype(np.int64), lengths, nulls, keep
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    nulls = arr.null_count
    values = arr.drop_null().to_numpy().astype(np.int64) if nulls else arr.to_numpy().astype(np.int64)
    return values, valid.astype(np.int64), nulls, (valid if nulls else None)


def table_to_batch(table: pa.Table, schema: Schema, where: str) -> Batch:
    """Convert B rows to a Batch, applying the id policy and counting what it fixed."""
    for c in schema.label_columns:
        if table.column(c).null_count:
            raise DataError(f"{where}: label column {c!r} has {table.column(c).null_count} null values; "
                            f"labels must be present (drop or fill those rows upstream)")
    labels = np.stack([table.column(c).cast(pa.float32()).to_numpy() for c in schema.label_columns], axis=1)
    dense, null_dense, negative_dense = _dense_matrix(table, schema)
    values, lengths, weights = [], [], []
    stats = np.zeros((len(schema.features), 3), dtype=np.int64)
    for i, feat in enumerate(schema.features):
        ids, lens, nulls, keep = _ids_and_lengths(table.column(feat.name))
        mapped, neg, oor = map_ids(ids, feat.num_embeddings, schema.id_policy, f"{where}: column {feat.name!r}")
        stats[i] = (neg, oor, nulls)
        values.append(mapped)
        lengths.append(lens)
        if schema.weighted:
            if feat.weight_column:
                w = table.column(feat.weight_column).combine_chunks()
                w = w.flatten() if (pa.types.is_list(w.type) or pa.types.is_large_list(w.type)) else w
                w = w.to_numpy(zero_copy_only=False)
                if keep is not None and len(w) == len(keep):
                    w = w[keep]
                if len(w) != len(mapped) or np.isnan(w).any():
                    raise DataError(f"{where}: weight column {feat.weight_column!r} does not align with the "
                                    f"ids of {feat.name!r} (one non-null weight per id is required)")
                weights.append(w.astype(np.float32))
            else:
                weights.append(np.ones(len(mapped), dtype=np.float32))
    sparse = KeyedJaggedTensor(
        keys=schema.feature_names,
        values=torch.from_numpy(np.concatenate(values)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
        weights=torch.from_numpy(np.concatenate(weights)) if schema.weighted else None,
    )
    return Batch(
        dense=torch.from_numpy(dense),
        sparse=sparse,
        labels=torch.from_numpy(labels.astype(np.float32, copy=False)),
        weights=torch.ones(table.num_rows),
        id_stats=stats,
        null_dense=null_dense,
        negative_dense=negative_dense,
    )


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
        self._file_cache: dict[str, pq.ParquetFile] = {}
        self._rg_cache: tuple[tuple[str, int], pa.Table] | None = None

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

    def slot_range(self, slot: int) -> tuple[int, int]:
        return self.total_rows * slot // self.num_slots, self.total_rows * (slot + 1) // self.num_slots

    def slot_rows(self, slot: int) -> int:
        lo, hi = self.slot_range(slot)
        return hi - lo

    def remaining_batches(self) -> int:
        """Batches this rank still yields this epoch (the trainer pads up to the max over ranks)."""
        return sum(
            math.ceil(max(0, self.slot_rows(s) - self.positions.get(s, 0)) / self.batch_size)
            for s in self.rank_slots()
        )

    # ---- cursor
    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.positions, self.rotation = epoch, {}, 0

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
            "cursor": {str(s): self.describe_position(s) for s in self.rank_slots()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        if int(state["num_slots"]) != self.num_slots:
            raise DataError(
                f"data cursor was saved with {state['num_slots']} reader slots, now {self.num_slots}; "
                "resume with the same world size and data.num_workers"
            )
        self.positions = {int(k): int(v) for k, v in state["positions"].items()}
        self.rotation = int(state["rotation"])

    def describe_position(self, slot: int) -> dict:
        """File, row group and offset of a slot's next unread row (for humans and logs)."""
        lo, hi = self.slot_range(slot)
        pos = self.positions.get(slot, 0)
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
    def _row_group(self, piece: Piece) -> pa.Table:
        key = (piece.path, piece.row_group)
        if self._rg_cache is None or self._rg_cache[0] != key:
            pf = self._file_cache.get(piece.path)
            if pf is None:
                pf = self._file_cache[piece.path] = pq.ParquetFile(self.fs.open_input_file(piece.path))
            self._rg_cache = (key, pf.read_row_group(piece.row_group, columns=self.schema.columns))
        return self._rg_cache[1]

    def _read_rows(self, pieces: list[Piece], lo: int, hi: int) -> pa.Table:
        """Rows [lo, hi) of the epoch's global row sequence."""
        parts, start = [], 0
        for piece in pieces:
            end = start + piece.num_rows
            if end > lo and start < hi:
                a, b = max(lo, start) - start, min(hi, end) - start
                parts.append(self._row_group(piece).slice(a, b - a))
            if end >= hi:
                break
            start = end
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def _slot_rows(self, slot: int, position: int) -> Iterator[pa.Table]:
        """The slot's rows from `position` on, window by window, each window permuted."""
        pieces = self.ordered_pieces(self.epoch)
        lo, hi = self.slot_range(slot)
        first = position // self.window
        for w in range(first, math.ceil((hi - lo) / self.window)):
            a, b = lo + w * self.window, min(hi, lo + (w + 1) * self.window)
            rows = self._read_rows(pieces, a, b)
            if self.shuffle:
                perm = np.random.default_rng([self.seed, self.epoch, slot, w]).permutation(b - a)
                rows = rows.take(pa.array(perm))
            skip = position - w * self.window if w == first else 0
            yield rows.slice(skip) if skip else rows

    def _slot_batches(self, slot: int) -> Iterator[Batch]:
        position = self.positions.get(slot, 0)
        pending: list[pa.Table] = []
        pending_rows = 0

        def emit(table: pa.Table) -> Batch:
            nonlocal position
            try:
                batch = table_to_batch(table, self.schema, self.uri)
            except DataError as e:
                where = self.describe_position(slot)
                raise DataError(f"{e} [slot {slot} from row {position}; file {where['file']}]") from None
            position += table.num_rows
            self.positions[slot] = position
            batch.slot, batch.position = slot, position
            return batch

        for chunk in self._slot_rows(slot, position):
            pending.append(chunk)
            pending_rows += chunk.num_rows
            while pending_rows >= self.batch_size:
                table = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
                yield emit(table.slice(0, self.batch_size))
                rest = table.slice(self.batch_size)
                pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if pending_rows:
            yield emit(pa.concat_tables(pending) if len(pending) > 1 else pending[0])

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != self.slots_per_rank:
            raise DataError(f"DataLoader has {info.num_workers} workers but the stream was built for "
                            f"{self.slots_per_rank}; pass num_workers=data.num_workers to both")
        local = (worker + self.rotation) % self.slots_per_rank
        yield from self._slot_batches(self.rank * self.slots_per_rank + local)
