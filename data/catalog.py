"""The item catalog (``OUT/items``): every item's id and features, for full-catalog retrieval
eval, sampled negatives and export.

Rows are sorted by item id on reading, so with the compact ids the converters write (``0..N-1``)
row ``r`` is item ``r``; ``rows_for`` maps any ids to rows either way. Features are kept as CSR
(``values`` int64 [nnz], ``offsets`` int64 [N+1]), a scalar column being a list of one id (none
where null), so ``kjt_rows`` can cut the bags of any rows with torch ops on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from data.parquet import list_parquet_files, one_line
from data.schema import DataError


def _is_int_or_list(t: pa.DataType) -> bool:
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t)
    return pa.types.is_integer(t) or (is_list and pa.types.is_integer(t.value_type))


def _csr(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(values int64 [nnz], offsets int64 [N+1]) of an int or list<int> column; nulls -> nothing."""
    arr = col.combine_chunks()
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)
        flat = arr.flatten()
        if flat.null_count:
            keep = flat.is_valid().to_numpy(zero_copy_only=False)
            parents = pc.list_parent_indices(arr).to_numpy()
            lengths -= np.bincount(parents[~keep], minlength=len(arr))
            flat = flat.drop_null()
        values = flat.to_numpy(zero_copy_only=False)
    else:
        lengths = arr.is_valid().to_numpy(zero_copy_only=False).astype(np.int64)
        values = arr.drop_null().to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(arr) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.array(values, dtype=np.int64), offsets


@dataclass
class ItemCatalog:
    """item_ids: int64 [N] sorted; features: name -> (values int64 [nnz], offsets int64 [N+1]);
    titles: N strings ("" where null) or None when the catalog has no title column."""

    path: str
    item_ids: torch.Tensor
    features: dict[str, tuple[torch.Tensor, torch.Tensor]]
    titles: list[str] | None = None

    def __len__(self) -> int:
        return int(self.item_ids.numel())

    @classmethod
    def read(cls, items_path: str, feature_columns: list[str] | tuple[str, ...], title_column: str | None = "title",
             id_column: str = "item_id") -> "ItemCatalog":
        """Read the catalog at `items_path` (a file or a folder of Parquet files). The title is
        optional: a catalog without `title_column` gives ``titles = None``."""
        _, files = list_parquet_files(items_path)
        wanted = list(dict.fromkeys([id_column, *feature_columns]))
        parts = []
        for path in files:
            try:
                names = pq.read_schema(path).names
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{path}: cannot be read as Parquet ({one_line(e)}); write the catalog again") from None
            missing = [c for c in wanted if c not in names]
            if missing:
                raise DataError(f"{path}: the item catalog lacks column(s) {missing} (it has {names}); write it with "
                                f"`rectrain data ... --task retrieval` or fix data.items_path / the model's "
                                f"candidate features")
            cols = wanted + ([title_column] if title_column and title_column in names else [])
            parts.append((path, pq.read_table(path, columns=cols)))
        has_title = bool(title_column) and all(title_column in t.column_names for _, t in parts)
        tables = [t.select(wanted + ([title_column] if has_title else [])) for _, t in parts]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
        where = files[0] if len(files) == 1 else items_path
        for c in wanted:
            t = table.schema.field(c).type
            if not _is_int_or_list(t):
                raise DataError(f"{where}: catalog column {c!r} has type {t}; item ids and features must be int64 "
                                f"or list<int64>")
        ids_col = table.column(id_column)
        if not pa.types.is_integer(ids_col.type) or ids_col.null_count:
            raise DataError(f"{where}: catalog column {id_column!r} must be a non-null int64 item id per row "
                            f"({ids_col.null_count} null, type {ids_col.type})")
        ids = np.array(ids_col.to_numpy(), dtype=np.int64)
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            dup = int(uniq[counts > 1][0])
            raise DataError(f"{where}: item id {dup} appears {int(counts.max())} times in the catalog "
                            f"({int((counts > 1).sum())} duplicated id(s)); each item must be listed once")
        order = np.argsort(ids, kind="stable")
        table = table.take(pa.array(order))
        features = {}
        for c in feature_columns:
            values, offsets = _csr(table.column(c))
            features[c] = (torch.from_numpy(values), torch.from_numpy(offsets))
        titles = None
        if has_title:
            titles = [s if s is not None else "" for s in table.column(title_column).to_pylist()]
        return cls(str(items_path), torch.from_numpy(ids[order]), features, titles)

    def to(self, device: torch.device | str) -> "ItemCatalog":
        return ItemCatalog(self.path, self.item_ids.to(device),
                           {k: (v.to(device), o.to(device)) for k, (v, o) in self.features.items()}, self.titles)

    def rows_for(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Catalog rows of `item_ids` (int64 [R] -> int64 [R]); -1 where an id is not listed."""
        ids = self.item_ids
        pos = torch.searchsorted(ids, item_ids).clamp_(max=max(len(self) - 1, 0))
        found = ids[pos] == item_ids if len(self) else torch.zeros_like(item_ids, dtype=torch.bool)
        return torch.where(found, pos, torch.full_like(pos, -1))

    def kjt_rows(self, rows: torch.Tensor, features: list[str] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Features of catalog rows `rows` (int64 [R], on the catalog's device):
        name -> (values int64 [n], lengths int64 [R]), the bags of the rows in order."""
        out = {}
        for name in features if features is not None else self.features:
            values, offsets = self.features[name]
            starts = offsets[rows]
            lengths = offsets[rows + 1] - starts
            total = int(lengths.sum()) if rows.numel() else 0
            # Position of each output id in `values`: its row's start plus its place in the bag.
            first = torch.cumsum(lengths, 0) - lengths
            index = torch.repeat_interleave(starts - first, lengths, output_size=total)
            index = index + torch.arange(total, device=rows.device)
            out[name] = (values[index], lengths)
        return out
