"""An export directory, loaded for queries: what `rectrain retrieve` and the export's own recall
measurement both use, so the numbers the export prints are those of the files it wrote.

No TorchRec here: the query tower is TorchScript (torch.jit.load), ids are mapped with
data.schema.map_ids (numpy), search is FAISS.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.export import faiss_index
from trainer.export.items import ItemTable
from trainer.export.query_encoder import RawQueryInputs
from trainer.export.users import UserTable

METADATA = "metadata.json"
ITEMS = "items.parquet"
USERS = "users.parquet"
QUERY_TOWER = "query_tower.pt"
FLAT_INDEX = "index_flat.faiss"


def ann_file(kind: str) -> str:
    return f"index_{kind}.faiss"


@dataclass
class Hit:
    item_id: int
    score: float
    title: str | None


class RetrievalExport:
    """metadata, the TorchScript query tower, the items and (lazily) the indexes of one export."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        meta_path = self.dir / METADATA
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: no such file; is {self.dir} the --out of `rectrain export retrieval`?")
        self.metadata: dict[str, Any] = json.loads(meta_path.read_text())
        for name in (QUERY_TOWER, ITEMS, FLAT_INDEX):
            if not (self.dir / name).is_file():
                raise FileNotFoundError(f"{self.dir / name}: missing from the export; run `rectrain export retrieval` "
                                        f"into {self.dir} again")
        self.tower = torch.jit.load(str(self.dir / QUERY_TOWER), map_location="cpu").eval()
        self.inputs = RawQueryInputs.from_dict(self.metadata["query_inputs"])
        self.items = ItemTable.read(self.dir / ITEMS)
        self._indexes: dict[str, Any] = {}
        self._users: UserTable | None = None
        self._warm: set[str] = set()

    # ------------------------------------------------------------------ parts
    def index(self, which: str = "flat"):
        """The exact index ("flat") or the ANN index the export built ("ann")."""
        if which not in self._indexes:
            if which == "flat":
                self._indexes[which] = faiss_index.read_index(self.dir / FLAT_INDEX)
            else:
                ann = self.metadata["index"]["ann"]
                index = faiss_index.read_index(self.dir / ann["file"])
                faiss_index.set_search_param(index, self.ann_params())
                self._indexes[which] = index
        return self._indexes[which]

    def ann_params(self) -> faiss_index.IndexParams:
        ann = self.metadata["index"]["ann"]
        names = {f.name for f in fields(faiss_index.IndexParams)}
        return faiss_index.IndexParams(**{k: v for k, v in ann.items() if k in names})

    @property
    def users(self) -> UserTable:
        if self._users is None:
            self._users = UserTable.read(self.dir / USERS, self.metadata["targets_column"], self.metadata["seen_column"])
        return self._users

    # ------------------------------------------------------------------ queries
    @torch.no_grad()
    def encode(self, rows: list[dict[str, Any]], where: str = "query", batch_size: int = 4096) -> np.ndarray:
        """Query vectors float32 [len(rows), d] of raw query rows."""
        out = []
        for start in range(0, len(rows), batch_size):
            ids, offsets, dense = self.inputs.encode(rows[start:start + batch_size], where)
            out.append(self.tower(ids, offsets, dense).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.metadata["dim"]), dtype=np.float32)

    def seen_rows(self, raw_ids) -> np.ndarray:
        """Item rows of raw item ids (ids not in the catalog dropped)."""
        rows = self.items.rows_of(np.asarray(list(raw_ids), dtype=np.int64))
        return rows[rows >= 0]

    def history_items(self, row: dict[str, Any]) -> list[int]:
        """The raw item ids in a query's item-id features (e.g. its history)."""
        out: list[int] = []
        for name in self.metadata.get("history_features", []):
            v = row.get(name)
            # anything but an integer is left to encode(), which names it in its error
            out += [int(x) for x in (v if isinstance(v, list) else [v]) if isinstance(x, int) and not isinstance(x, bool)]
        return out

    def search(self, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None, which: str = "flat") -> list[list[Hit]]:
        rows, scores = faiss_index.search_excluding(self.index(which), queries, k, exclude)
        out = []
        for r, s in zip(rows, scores):
            hits = []
            for row, score in zip(r, s):
                if row < 0:
                    break
                title = self.items.titles[row] if self.items.titles is not None else None
                hits.append(Hit(int(self.items.item_ids[row]), float(score), title))
            out.append(hits)
        return out

    def warm_up(self, which: str = "flat") -> None:
        """Load the index and run one throwaway query: TorchScript optimises its graph on the
        first calls and FAISS starts its threads on the first search (~100 ms together), which a
        served query never pays."""
        if which in self._warm:
            return
        for _ in range(2):  # the profiling executor specialises on the second call
            q = self.encode([{}])
        faiss_index.search_excluding(self.index(which), q, 1, None)
        self._warm.add(which)

    def retrieve(self, row: dict[str, Any], k: int, seen: list[int], which: str = "flat",
                 where: str = "query") -> tuple[list[Hit], float, float]:
        """(top-k hits, encode ms, search ms) for one raw query row, `seen` raw ids excluded."""
        self.warm_up(which)
        t0 = time.perf_counter()
        q = self.encode([row], where)
        t1 = time.perf_counter()
        hits = self.search(q, k, [self.seen_rows(seen)], which)[0]
        t2 = time.perf_counter()
        return hits, (t1 - t0) * 1000.0, (t2 - t1) * 1000.0
