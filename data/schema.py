"""Column roles, raw-id policy and the counters that report what the policy did.

Raw ids in a click log rarely fit a table: they can be hashes, negative, or larger than the
table. The policy maps every id into ``[0, num_embeddings)`` and counts what it had to fix:

- ``modulo``: ``id mod num_embeddings`` (floor modulo, so negatives land in range too).
- ``hash``: splitmix64(id) then modulo; spreads structured ids (e.g. sequential) evenly.
- ``strict``: any id outside ``[0, num_embeddings)`` is an error naming the file and column.

Counters per feature: ``negative`` and ``out_of_range`` ids seen (still mapped, never dropped),
``null`` scalar/list entries (they become empty bags, i.e. contribute nothing to the pooled
embedding). Dense columns count ``null_dense`` values (filled with 0; with
``dense_missing = "indicator"`` a 0/1 missing flag per dense column is appended too) and
``negative_dense`` values that the ``log1p`` transform folds by sign.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COUNTER_NAMES = ("negative", "out_of_range", "null")


class DataError(ValueError):
    """Bad input data; the message names the file and column and how to fix it."""


@dataclass(frozen=True)
class FeatureSpec:
    """One sparse feature: its column, its table's size, and its optional weight column."""

    name: str
    num_embeddings: int
    weight_column: str | None = None


@dataclass(frozen=True)
class Schema:
    """What the reader pulls out of every file, in model order."""

    label_columns: tuple[str, ...]
    dense_columns: tuple[str, ...]
    features: tuple[FeatureSpec, ...]
    id_policy: str = "modulo"
    dense_transform: str = "none"  # "none" | "log1p" (Criteo counts are heavy-tailed)
    dense_missing: str = "zero"  # "zero" | "indicator" (append a missing flag per dense column)

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def columns(self) -> list[str]:
        weights = [f.weight_column for f in self.features if f.weight_column]
        return [*self.label_columns, *self.dense_columns, *self.feature_names, *weights]

    @property
    def num_dense(self) -> int:
        """Width of Batch.dense: the dense columns, then their missing flags if any."""
        return len(self.dense_columns) * (2 if self.dense_missing == "indicator" else 1)

    @property
    def weighted(self) -> bool:
        return any(f.weight_column for f in self.features)

    @classmethod
    def from_config(cls, data_cfg, model_cfg) -> "Schema":
        """Features are the ones the model's tables use, in table order."""
        sizes = {f: t.num_embeddings for t in model_cfg.tables for f in t.features}
        feats = tuple(
            FeatureSpec(f, sizes[f], data_cfg.weight_columns.get(f)) for f in model_cfg.feature_names
        )
        return cls(
            label_columns=tuple(data_cfg.label_columns),
            dense_columns=tuple(data_cfg.dense_columns),
            features=feats,
            id_policy=data_cfg.id_policy,
            dense_transform=data_cfg.dense_transform,
            dense_missing=data_cfg.dense_missing,
        )


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def map_ids(ids: np.ndarray, num_embeddings: int, policy: str, where: str) -> tuple[np.ndarray, int, int]:
    """Map raw int64 ids into [0, num_embeddings); return (ids, negatives, out_of_range).

    `where` names the file and column for the strict policy's error.
    """
    ids = ids.astype(np.int64, copy=False)
    negative = int(np.count_nonzero(ids < 0))
    out_of_range = int(np.count_nonzero(ids >= num_embeddings))
    if policy == "strict":
        if negative or out_of_range:
            bad = ids[(ids < 0) | (ids >= num_embeddings)][0]
            raise DataError(
                f"{where}: id {bad} is outside [0, {num_embeddings}) ({negative} negative, "
                f"{out_of_range} too large); raise the table's num_embeddings or set data.id_policy "
                f"to 'modulo' or 'hash'"
            )
        return ids, 0, 0
    if policy == "hash":
        with np.errstate(over="ignore"):
            mapped = (_splitmix64(ids) % np.uint64(num_embeddings)).astype(np.int64)
        return mapped, negative, out_of_range
    if policy == "modulo":
        return np.mod(ids, num_embeddings), negative, out_of_range
    raise DataError(f"unknown id policy {policy!r}; use modulo, hash or strict")
