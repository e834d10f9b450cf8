"""The eval users an export can look up: OUT/users.parquet.

One row per user of the eval file (`data.eval_path`), raw values as in the data (the id policy
is applied when a query is encoded, never here):
    user_id     int64        the lookup key of `rectrain retrieve --user`
    <query feature columns>  int64 or list<int64> (e.g. history)
    <dense columns>          the model's dense inputs, when it reads any
    targets     list<int64>  the held-out positives (for the export's own recall)
    seen        list<int64>  items of the user's training period (excluded from its ranking)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.schema import DataError
from trainer.errors import RunError

USER_ID = "user_id"


@dataclass
class UserTable:
    table: pa.Table
    targets_column: str = "targets"
    seen_column: str = "seen"

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def user_ids(self) -> np.ndarray:
        return self.table.column(USER_ID).to_numpy().astype(np.int64)

    def rows(self) -> list[dict[str, Any]]:
        return self.table.to_pylist()

    def lists(self, column: str) -> list[np.ndarray]:
        """A list<int64> column as one int64 array per user (null -> empty)."""
        return [np.array(v or [], dtype=np.int64) for v in self.table.column(column).to_pylist()]

    def find(self, user_id: int, where: str) -> dict[str, Any]:
        hits = np.flatnonzero(self.user_ids == int(user_id))
        if not len(hits):
            ids = self.user_ids
            span = f"ids {ids.min()}..{ids.max()}" if len(ids) else "none"
            raise RunError(f"user {user_id} is not in {where} ({len(ids)} eval users, {span}); pass a user id of the "
                           f"eval data, or give the user's features with --features JSON")
        return self.table.slice(int(hits[0]), 1).to_pylist()[0]

    def write(self, path: Path) -> int:
        pq.write_table(self.table, path)
        return path.stat().st_size

    @classmethod
    def read(cls, path: Path, targets_column: str = "targets", seen_column: str = "seen") -> "UserTable":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file; run `rectrain export retrieval` into that directory")
        return cls(pq.read_table(path), targets_column, seen_column)


def read_eval_users(cfg, query_features: list[str]) -> UserTable:
    """The eval file's user id, query features, dense columns, targets and seen lists."""
    from data.parquet import list_parquet_files

    path = cfg.data.eval_path
    if not path:
        raise DataError("config key 'data.eval_path' is empty: export measures recall on the eval users and "
                        "stores them for `rectrain retrieve --user`; set it to the retrieval eval Parquet")
    columns = list(dict.fromkeys([USER_ID, *query_features, *cfg.data.dense_columns,
                                  cfg.data.targets_column, cfg.data.seen_column]))
    _, files = list_parquet_files(path)
    tables = []
    for f in files:
        names = pq.read_schema(f).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{f}: the eval file lacks column(s) {missing} (it has {names}); export reads a retrieval "
                            f"eval file (`rectrain data ... --task retrieval` writes OUT/eval)")
        tables.append(pq.read_table(f, columns=columns))
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    return UserTable(table, cfg.data.targets_column, cfg.data.seen_column)
