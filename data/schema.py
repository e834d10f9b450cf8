"""Column roles, raw-id policy and the counters that report what the policy did.

Raw ids in a click log rarely fit a table: they can be hashes, negative, or larger than the
table. The policy maps every id into ``[0, num_embeddings)`` and counts what it had to fix:

- ``modulo``: ``id mod num_embeddings`` (floor modulo, so negatives land in range too).
- ``hash``: splitmix64(id) then modulo; spreads structured ids (e.g. sequential) evenly.
- ``strict``: any id outside ``[0, num_embeddings)`` is an error naming the file and column.

Unsigned (uint64) id columns keep their unsigned value: an id >= 2**63 is out of range (never
negative), the strict policy names it, modulo and hash map the unsigned value.

Counters per feature: ``negative`` and ``out_of_range`` ids seen (still mapped, never dropped),
``null`` scalar/list entries (they become empty bags, i.e. contribute nothing to the pooled
embedding), and ``truncated`` ids cut off lists longer than ``max_list_length`` (with
``list_overflow = "truncate"``; "error" refuses such a row). Dense columns count ``null_dense``
values (filled with 0; with ``dense_missing = "indicator"`` a 0/1 missing flag per dense column is
appended too) and ``negative_dense`` values that the ``log1p`` transform folds by sign. Rows with a
NaN or infinite dense value or label are an error, or with ``non_finite = "drop_row"`` left out
and counted as ``dropped_rows``. Labels read by binary tasks must be 0 or 1.

Two extras for retrieval data. ``absent_features`` are features whose column these files do not
have (a retrieval eval file has no item columns): the reader gives them empty bags, so the KJT
still carries every feature in schema order (sharded lookups need the same keys every call).
``passthrough`` columns (int64 scalar or list<int64>, e.g. an eval file's ``targets`` and
``seen``) are read raw, with no id policy, into ``Batch.extras``; a column may be a feature too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# Columns of Batch.id_stats (one row per feature); reported as "<name>_ids".
COUNTER_NAMES = ("negative", "out_of_range", "null", "truncated")


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
    # Label columns that binary tasks read (values must be 0 or 1); None: every label column,
    # as when model.tasks is empty (one binary task per label column).
    binary_labels: tuple[str, ...] | None = None
    non_finite: str = "error"  # "error" | "drop_row" for NaN/inf dense values and labels
    max_list_length: int = 10_000  # ids per row and feature
    list_overflow: str = "truncate"  # "truncate" | "error"
    # Features with no column in these files: empty bags in the KJT, the column is not read.
    absent_features: frozenset[str] = frozenset()
    # int64 scalar or list<int64> columns read raw into Batch.extras (no id policy, no cap).
    passthrough: tuple[str, ...] = ()

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def present_features(self) -> tuple[FeatureSpec, ...]:
        """The features whose columns the files hold (all but `absent_features`)."""
        return tuple(f for f in self.features if f.name not in self.absent_features)

    @property
    def columns(self) -> list[str]:
        """Every column read, once each (a passthrough column may also be a feature)."""
        present = self.present_features
        weights = [f.weight_column for f in present if f.weight_column]
        names = [*self.label_columns, *self.dense_columns, *(f.name for f in present), *weights, *self.passthrough]
        return list(dict.fromkeys(names))

    @property
    def num_dense(self) -> int:
        """Width of Batch.dense: the dense columns, then their missing flags if any."""
        return len(self.dense_columns) * (2 if self.dense_missing == "indicator" else 1)

    @property
    def weighted(self) -> bool:
        return any(f.weight_column for f in self.features)

    @property
    def binary_label_columns(self) -> tuple[str, ...]:
        if self.binary_labels is None:
            return self.label_columns
        return tuple(c for c in self.label_columns if c in self.binary_labels)

    @classmethod
    def from_config(cls, data_cfg, model_cfg, *, absent_features=frozenset(), passthrough=()) -> "Schema":
        """Features are the ones the model's tables use, in table order. Label columns read by a
        binary task must hold 0/1; with no tasks configured every label is binary (as in
        trainer/config.py, which then makes one binary task per label column).
        `absent_features` / `passthrough`: see the module docstring (e.g. a retrieval eval
        file: the item features are absent, ``targets`` and ``seen`` pass through)."""
        sizes = {f: t.num_embeddings for t in model_cfg.tables for f in t.features}
        feats = tuple(
            FeatureSpec(f, sizes[f], data_cfg.weight_columns.get(f)) for f in model_cfg.feature_names
        )
        tasks = list(getattr(model_cfg, "tasks", None) or [])
        binary = None
        if tasks:
            binary = tuple(sorted({t.label or t.name for t in tasks if t.kind == "binary"}))
        return cls(
            label_columns=tuple(data_cfg.label_columns),
            dense_columns=tuple(data_cfg.dense_columns),
            features=feats,
            id_policy=data_cfg.id_policy,
            dense_transform=data_cfg.dense_transform,
            dense_missing=data_cfg.dense_missing,
            binary_labels=binary,
            non_finite=getattr(data_cfg, "non_finite", "error"),
            max_list_length=getattr(data_cfg, "max_list_length", 10_000),
            list_overflow=getattr(data_cfg, "list_overflow", "truncate"),
            absent_features=frozenset(absent_features),
            passthrough=tuple(passthrough),
        )


def signed_log1p(dense: np.ndarray) -> np.ndarray:
    """sign(x) * log1p(|x|), elementwise on float32, as a new array: the same bits whatever the
    layout, so a window transformed at once equals its batches transformed one by one. The sign
    is x's sign bit ORed into log1p(|x|) (which is never negative): the bits np.copysign gives
    at less than half its cost, and the values of a multiplication by np.sign(x) (a -0.0 stays
    -0.0)."""
    out = np.abs(dense, dtype=np.float32)
    np.log1p(out, out=out)
    bits = out.view(np.int32)
    np.bitwise_or(bits, np.bitwise_and(np.asarray(dense, dtype=np.float32).view(np.int32), np.int32(-2 ** 31)), out=bits)
    return out


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def map_ids(
    ids: np.ndarray, num_embeddings: int, policy: str, where: str | Callable[[int], str]
) -> tuple[np.ndarray, int, int]:
    """Map raw ids into [0, num_embeddings); return (int64 ids, negatives, out_of_range).

    `ids` are signed integers (cast to int64) or uint64, whose values >= 2**63 stay unsigned: out
    of range, not negative. `where` names the file and column for the strict policy's error; a
    callable gets the index of the first offending id and returns that text (so the message can
    name the row).
    """
    n = num_embeddings
    if ids.dtype == np.uint64:
        too_large = ids >= np.uint64(n)
        negative, out_of_range = 0, int(np.count_nonzero(too_large))
        bad_mask = too_large
    else:
        ids = ids.astype(np.int64, copy=False)
        negative = int(np.count_nonzero(ids < 0))
        out_of_range = int(np.count_nonzero(ids >= n))
        bad_mask = None
    if policy == "strict":
        if negative or out_of_range:
            if bad_mask is None:
                bad_mask = (ids < 0) | (ids >= n)
            j = int(np.argmax(bad_mask))
            place = where(j) if callable(where) else where
            raise DataError(
                f"{place}: id {int(ids[j])} is outside [0, {n}) ({negative} negative, {out_of_range} too "
                f"large among the {len(ids)} ids read with it); raise the table's num_embeddings or set "
                f"data.id_policy to 'modulo' or 'hash'"
            )
        return ids.astype(np.int64, copy=False), 0, 0
    if policy == "hash":
        with np.errstate(over="ignore"):
            mapped = (_splitmix64(ids) % np.uint64(n)).astype(np.int64)
        return mapped, negative, out_of_range
    if policy == "modulo":
        if ids.dtype == np.uint64:
            return (ids % np.uint64(n)).astype(np.int64), negative, out_of_range
        return np.mod(ids, n), negative, out_of_range
    raise DataError(f"unknown id policy {policy!r}; use modulo, hash or strict")
