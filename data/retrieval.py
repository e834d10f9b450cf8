"""The retrieval split shared by `rectrain data movielens --task retrieval` and
`rectrain data synth --schema two_tower`: interactions in, three tables out.

Input: one entry per interaction, ``user`` and ``item`` (compact ids ``0..num_users-1`` and
``0..num_items-1``), ``timestamp`` and a ``positive`` flag (MovieLens: rating >= 4).

Time order: (timestamp, item, user, input position); "earlier" means earlier in it, so equal
timestamps are broken deterministically.

Split, per user: of the user's positives in time order, the latest ``ceil(test_fraction * n)``
are held out, but a user keeps at least one training positive (a user with one positive is all
train). The user's *training period* is every interaction (positive or not) before the first
held-out positive. Users without a positive have no rows at all.

Tables (``split_interactions`` builds them, ``write_retrieval`` writes them):

``train``: one row per training positive, in time order:
    ``user_id`` int64, [user feature columns], ``history`` list<int64> (the user's earlier
    positives, oldest first, the latest ``max_history`` kept), [``history_<feature>``
    list<int64> for each of ``history_features``: that item feature of every history item, in
    history order, repeats kept (a multiset: mean-pooled, it is the history's share of each
    value, e.g. the user's genre taste)], ``item_id`` int64, [item feature columns],
    ``timestamp`` int64.
``eval``: one row per user with a held-out positive, by user id:
    ``user_id`` int64, [user feature columns], ``history`` list<int64> (the user's latest training
    positives, capped as above), [``history_<feature>`` columns as in train, over that history],
    ``targets`` list<int64> (held-out positives, time order, each item
    once), ``seen`` list<int64> (every item of the training period, sorted; excluded from the
    user's ranking). Targets already in ``seen`` (a re-rated item) cannot be ranked, so they are
    left out and counted; a user left with no target has no eval row (counted).
``items``: the catalog, by item id: ``item_id`` int64, [item feature columns], ``title`` string
    (optional), ``raw_id`` int64 (the source's id).

No leakage: a train row's history holds only positives earlier than the row, and every target
comes after all of the user's training positives. The cut is per user, not one global time, so
another user's train rows may be later than this user's targets (the usual price of
leave-latest-out splits; it lets every user with two positives appear in eval).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.schema import DataError

ITEM_ID, USER_ID, HISTORY, TARGETS, SEEN, TITLE, RAW_ID, TIMESTAMP = (
    "item_id", "user_id", "history", "targets", "seen", "title", "raw_id", "timestamp")

RULES = (
    "time order: (timestamp, item, user, input position); 'earlier' means earlier in it",
    "split per user: latest ceil(test_fraction * n_positives) positives held out, at least one kept in "
    "train (a single-positive user is all train); users without positives have no rows",
    "train: one row per training positive; history = the user's earlier positives, the latest "
    "max_history, oldest first",
    "history_<feature> (optional): that item feature of every history item, history order, repeats kept",
    "eval: one row per user with a held-out positive; history = latest training positives (capped); "
    "targets = held-out positives not already seen, each once; seen = every item of the training "
    "period (interactions before the first held-out positive, positive or not)",
    "ids are compact from 0 (tables sized from meta.json never fold them)",
)


@dataclass(frozen=True)
class Feature:
    """One int64 feature per entity (user or item): a scalar ``values [N]``, or a list feature
    in CSR form, ``values [nnz]`` with ``offsets [N+1]``. ``vocab``: ids lie in [0, vocab)."""

    vocab: int
    values: np.ndarray
    offsets: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> pa.Array:
        """The feature of entities `rows` as an Arrow column (int64, or list<int64>)."""
        if self.offsets is None:
            return pa.array(self.values[rows].astype(np.int64))
        starts = self.offsets[rows]
        return _ranges(starts, self.offsets[rows + 1] - starts, self.values)


@dataclass
class RetrievalSplit:
    """The train and eval tables of the module docstring and what the split counted."""

    train: pa.Table
    eval: pa.Table
    num_users: int
    num_items: int
    max_history: int
    test_fraction: float
    counts: dict = field(default_factory=dict)
    user_features: dict[str, Feature] = field(default_factory=dict)
    item_features: dict[str, Feature] = field(default_factory=dict)
    history_features: list[str] = field(default_factory=list)


def history_column(feature: str) -> str:
    """The query column that carries item feature `feature` of a row's history."""
    return f"{HISTORY}_{feature}"


def _history_bags(starts: np.ndarray, lengths: np.ndarray, items: np.ndarray, feature: Feature) -> pa.ListArray:
    """list<int64> whose row i is `feature` of every item in ``items[starts[i] : starts[i] +
    lengths[i]]``, concatenated in that order (a scalar feature: one value per item)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = items[np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])]  # the history items
    if feature.offsets is None:
        return _ranges(offsets[:-1], lengths, feature.values[flat])
    bag_len = feature.offsets[flat + 1] - feature.offsets[flat]
    per_item = np.zeros(len(flat) + 1, dtype=np.int64)
    np.cumsum(bag_len, out=per_item[1:])
    values = _ranges(feature.offsets[flat], bag_len, feature.values).values.to_numpy()
    row_start = per_item[offsets[:-1]]
    return _ranges(row_start, per_item[offsets[1:]] - row_start, values)


def _ranges(starts: np.ndarray, lengths: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """list<int64> whose row i is ``values[starts[i] : starts[i] + lengths[i]]``."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    # int32 offsets: list<int64> as the reader expects; pyarrow refuses (not wraps) an overflow.
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()),
                                    pa.array(values[index].astype(np.int64), type=pa.int64()))


def _check(name: str, ids: np.ndarray, size: int) -> None:
    if len(ids) and (ids.min() < 0 or ids.max() >= size):
        raise DataError(f"{name} ids must lie in [0, {size}); got {int(ids.min())}..{int(ids.max())}")


def split_interactions(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, positive: np.ndarray, *,
                       num_users: int, num_items: int, max_history: int = 50, test_fraction: float = 0.2,
                       user_features: dict[str, Feature] | None = None,
                       item_features: dict[str, Feature] | None = None,
                       history_features: list[str] | tuple[str, ...] = ()) -> RetrievalSplit:
    """Split interactions (arrays of one length, any order) into the train and eval tables.
    `history_features`: item features (keys of `item_features`) to write over each row's
    history as ``history_<feature>`` columns."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"--test-fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if max_history < 0:
        raise DataError(f"--max-history must be 0 or more, got {max_history}")
    user, item = np.asarray(user, np.int64), np.asarray(item, np.int64)
    timestamp, positive = np.asarray(timestamp, np.int64), np.asarray(positive, bool)
    if not len(user) == len(item) == len(timestamp) == len(positive):
        raise DataError("user, item, timestamp and positive must have one entry per interaction")
    _check("user", user, num_users)
    _check("item", item, num_items)
    user_features, item_features = dict(user_features or {}), dict(item_features or {})
    history_features = list(history_features)
    unknown = [f for f in history_features if f not in item_features]
    if unknown:
        raise DataError(f"history features {unknown} are not item features (have {sorted(item_features)})")
    n = len(user)

    # Time order, then grouped by user (stable: time order inside a user).
    time_order = np.lexsort((np.arange(n), user, item, timestamp))
    order = time_order[np.argsort(user[time_order], kind="stable")]
    time_rank = np.empty(n, np.int64)
    time_rank[time_order] = np.arange(n)
    u, it, ts, pos, rank = user[order], item[order], timestamp[order], positive[order], time_rank[order]
    group_start = np.searchsorted(u, np.arange(num_users))
    group_len = np.bincount(u, minlength=num_users)
    in_group = np.arange(n) - group_start[u]

    # The user's positives, in time order: P_* arrays, user after user.
    p_u, p_it, p_ts, p_rank, p_in_group = u[pos], it[pos], ts[pos], rank[pos], in_group[pos]
    n_pos = np.bincount(p_u, minlength=num_users)
    p_start = np.concatenate([[0], np.cumsum(n_pos)[:-1]])
    p_k = np.arange(len(p_u)) - p_start[p_u]  # index among the user's positives
    # The epsilon keeps e.g. 0.2 * 15 = 3.0000000000000004 from rounding up to 4.
    n_test = np.where(n_pos > 0, np.minimum(np.ceil(test_fraction * n_pos - 1e-9).astype(np.int64), n_pos - 1), 0)
    n_train = n_pos - n_test
    held_out = p_k >= n_train[p_u]

    # Training period: interactions before the user's first held-out positive.
    cut = group_len.copy()
    np.minimum.at(cut, p_u[held_out], p_in_group[held_out])
    in_period = in_group < cut[u]

    # train: one row per training positive, in time order.
    t = np.flatnonzero(~held_out)
    t = t[np.argsort(p_rank[t])]
    h_len = np.minimum(p_k[t], max_history)
    train_cols = {USER_ID: pa.array(p_u[t])}
    train_cols.update({name: f.take(p_u[t]) for name, f in user_features.items()})
    train_cols[HISTORY] = _ranges(t - h_len, h_len, p_it)
    for name in history_features:
        train_cols[history_column(name)] = _history_bags(t - h_len, h_len, p_it, item_features[name])
    train_cols[ITEM_ID] = pa.array(p_it[t])
    train_cols.update({name: f.take(p_it[t]) for name, f in item_features.items()})
    train_cols[TIMESTAMP] = pa.array(p_ts[t])
    train = pa.table(train_cols)

    # seen: unique (user, item) pairs of the training periods, sorted (so grouped by user).
    seen_keys = np.unique(u[in_period] * num_items + it[in_period])
    # targets: held-out (user, item) pairs, first occurrence, time order; minus the seen ones.
    keys = p_u[held_out] * num_items + p_it[held_out]
    _, first = np.unique(keys, return_index=True)
    first.sort()
    duplicates = len(keys) - len(first)
    keys = keys[first]
    fresh = ~np.isin(keys, seen_keys)
    already_seen = int((~fresh).sum())
    keys = keys[fresh]
    keys = keys[np.argsort(keys // num_items, kind="stable")]  # grouped by user, time order inside
    t_user = keys // num_items
    eval_users = np.unique(t_user)
    targets = _grouped(eval_users, t_user, keys % num_items)
    s_user = seen_keys // num_items
    seen = _grouped(eval_users, s_user, seen_keys % num_items)
    e_len = np.minimum(n_train[eval_users], max_history)
    eval_cols = {USER_ID: pa.array(eval_users.astype(np.int64))}
    eval_cols.update({name: f.take(eval_users) for name, f in user_features.items()})
    e_start = p_start[eval_users] + n_train[eval_users] - e_len
    eval_cols[HISTORY] = _ranges(e_start, e_len, p_it)
    for name in history_features:
        eval_cols[history_column(name)] = _history_bags(e_start, e_len, p_it, item_features[name])
    eval_cols[TARGETS] = targets
    eval_cols[SEEN] = seen
    evaluation = pa.table(eval_cols)

    counts = {
        "interactions": n,
        "positives": int(len(p_u)),
        "users_with_positives": int((n_pos > 0).sum()),
        "users_without_positives": int(((group_len > 0) & (n_pos == 0)).sum()),
        "train_rows": train.num_rows,
        "held_out_positives": int(held_out.sum()),
        "eval_users": len(eval_users),
        "targets": int(len(keys)),
        "skipped": {
            "held_out_repeats": int(duplicates),
            "held_out_already_seen": already_seen,
            "users_with_no_new_target": int((n_test > 0).sum()) - len(eval_users),
        },
        "items_in_train": int(len(np.unique(p_it[t]))),
    }
    return RetrievalSplit(train, evaluation, num_users, num_items, max_history, test_fraction, counts,
                          user_features, item_features, history_features)


def _grouped(users: np.ndarray, key_user: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """Per user of `users`: the `values` whose `key_user` is that user (key_user sorted)."""
    lo = np.searchsorted(key_user, users, side="left")
    hi = np.searchsorted(key_user, users, side="right")
    return _ranges(lo, hi - lo, values)


def items_table(num_items: int, item_features: dict[str, Feature], raw_ids: np.ndarray,
                titles: list[str | None] | None = None) -> pa.Table:
    """The catalog: item_id, [item features], title (if given), raw_id."""
    rows = np.arange(num_items)
    cols = {ITEM_ID: pa.array(rows.astype(np.int64))}
    cols.update({name: f.take(rows) for name, f in item_features.items()})
    if titles is not None:
        cols[TITLE] = pa.array(titles, pa.string())
    cols[RAW_ID] = pa.array(np.asarray(raw_ids, np.int64))
    return pa.table(cols)


def _columns(table: pa.Table) -> list[dict]:
    return [{"name": f.name, "type": str(f.type)} for f in table.schema]


def write_retrieval(out: str | Path, split: RetrievalSplit, items: pa.Table, extra_meta: dict | None = None,
                    row_group_rows: int = 65536) -> dict:
    """Write OUT/train, OUT/eval, OUT/items (one part-00000.parquet each) and OUT/meta.json;
    returns meta.json's content plus the written ``paths``."""
    if row_group_rows <= 0:
        raise DataError(f"--row-group-rows must be positive, got {row_group_rows}")
    if items.num_rows != split.num_items:
        raise DataError(f"the catalog has {items.num_rows} items, the split {split.num_items}; they must agree")
    out = Path(out)
    tables = {"train": split.train, "eval": split.eval, "items": items}
    user_feats, item_feats = list(split.user_features), list(split.item_features)
    meta = {
        "task": "retrieval",
        **(extra_meta or {}),
        "num_users": split.num_users,
        "num_items": split.num_items,
        "vocab_sizes": {
            USER_ID: split.num_users,
            ITEM_ID: split.num_items,
            HISTORY: split.num_items,
            **{history_column(k): split.item_features[k].vocab for k in split.history_features},
            **{k: f.vocab for k, f in split.user_features.items()},
            **{k: f.vocab for k, f in split.item_features.items()},
        },
        "user_features": user_feats,
        "item_features": item_feats,
        "query_features": [USER_ID, *user_feats, HISTORY, *map(history_column, split.history_features)],
        "candidate_features": [ITEM_ID, *item_feats],
        "item_id_column": ITEM_ID,
        "history_column": HISTORY,
        "targets_column": TARGETS,
        "seen_column": SEEN,
        "title_column": TITLE if TITLE in items.column_names else None,
        "max_history": split.max_history,
        "test_fraction": split.test_fraction,
        "counts": split.counts,
        "columns": {name: _columns(t) for name, t in tables.items()},
        "rules": list(RULES),
    }
    paths = write_splits(out, tables, meta, row_group_rows)
    return {**meta, "paths": {k: str(p) for k, p in paths.items()}}


def write_splits(out: Path, splits: dict[str, pa.Table], meta: dict, row_group_rows: int) -> dict[str, Path]:
    """OUT/<split>/part-00000.parquet per table (with page checksums, so a corrupt page is found
    when read) and OUT/meta.json: the converters' one way of writing a dataset."""
    paths = {}
    for name, table in splits.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        paths[name] = out / name / "part-00000.parquet"
        pq.write_table(table, paths[name], row_group_size=row_group_rows, write_page_checksum=True)
    paths["meta"] = out / "meta.json"
    paths["meta"].write_text(json.dumps(meta, indent=2) + "\n")
    return paths


def summary(meta: dict) -> dict:
    """The one-line report the `rectrain data` commands print."""
    c = meta["counts"]
    return {"task": "retrieval", "users": meta["num_users"], "items": meta["num_items"],
            "train_rows": c["train_rows"], "eval_users": c["eval_users"], "targets": c["targets"],
            "positives": c["positives"], "interactions": c["interactions"],
            "users_without_positives": c["users_without_positives"], "skipped": c["skipped"],
            **{k: meta[k] for k in ("ratings", "missing_movies") if k in meta},
            "out": str(Path(meta["paths"]["meta"]).parent)}

