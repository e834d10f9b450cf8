"""The catalog's item vectors: the candidate tower over every catalog row -> OUT/items.parquet.

items.parquet, one row per catalog item, sorted by raw item id; the row number is the item's
FAISS label:
    item_id  int64                        the raw id, as in the data (`data.items_path`)
    vector   fixed_size_list<float32>[d]  the candidate tower's L2-normalised output
    title    string                       only when the catalog has `data.title_column`
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data.schema import DataError


@dataclass
class ItemTable:
    """item_ids int64 [N] sorted raw ids; vectors float32 [N, d]; titles N strings or None."""

    item_ids: np.ndarray
    vectors: np.ndarray
    titles: list[str] | None = None

    def rows_of(self, raw_ids: np.ndarray) -> np.ndarray:
        """Row (FAISS label) of each raw id, -1 where it is not in the catalog."""
        raw = np.asarray(raw_ids, dtype=np.int64)
        if not len(self.item_ids):
            return np.full(raw.shape, -1, dtype=np.int64)
        pos = np.searchsorted(self.item_ids, raw).clip(max=len(self.item_ids) - 1)
        return np.where(self.item_ids[pos] == raw, pos, -1).astype(np.int64)

    def write(self, path: Path) -> int:
        d = self.vectors.shape[1]
        flat = pa.array(np.ascontiguousarray(self.vectors, dtype=np.float32).reshape(-1))
        columns = {"item_id": pa.array(self.item_ids, pa.int64()),
                   "vector": pa.FixedSizeListArray.from_arrays(flat, d)}
        if self.titles is not None:
            columns["title"] = pa.array(self.titles, pa.string())
        pq.write_table(pa.table(columns), path)
        return path.stat().st_size

    @classmethod
    def read(cls, path: Path) -> "ItemTable":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file; run `rectrain export retrieval` into that directory")
        table = pq.read_table(path)
        vec = table.column("vector").combine_chunks()
        d = vec.type.list_size
        vectors = vec.flatten().to_numpy().reshape(-1, d).astype(np.float32, copy=False)
        titles = table.column("title").to_pylist() if "title" in table.column_names else None
        return cls(table.column("item_id").to_numpy().astype(np.int64), vectors, titles)


@torch.no_grad()
def embed_catalog(cfg, model, schema, batch_size: int = 4096) -> ItemTable:
    """Candidate-tower vectors of every row of `data.items_path`, read as the training run's
    evaluation reads it (trainer/build.catalog_schema), in one process. Titles come from the
    catalog's `data.title_column` when it has one."""
    from data.catalog import ItemCatalog
    from data.parquet import ParquetStream
    from trainer.build import catalog_schema
    from trainer.retrieval_eval import embed_catalog as embed
    from trainer.train_module import TrainModule

    if not cfg.data.items_path:
        raise DataError("config key 'data.items_path' is empty: export embeds the item catalog; set it to the "
                        "catalog Parquet (OUT/items of `rectrain data ... --task retrieval`)")
    id_col = model.item_id_feature
    stream = ParquetStream(cfg.data.items_path, catalog_schema(schema, model), batch_size=batch_size, rank=0,
                           world_size=1, num_workers=0, shuffle=False)
    items = embed(TrainModule(model).eval(), stream, torch.device("cpu"), schema.num_dense, id_col)
    if not len(items.raw_ids):
        raise DataError(f"{cfg.data.items_path}: the item catalog has no rows")
    raw, vectors = items.raw_ids.numpy(), items.vectors.numpy()
    catalog = ItemCatalog.read(cfg.data.items_path, [], title_column=cfg.data.title_column, id_column=id_col)
    titles = None
    if catalog.titles is not None:
        rows = catalog.rows_for(torch.from_numpy(raw)).numpy()
        titles = [catalog.titles[r] if r >= 0 else "" for r in rows]
    return ItemTable(raw, vectors, titles)
