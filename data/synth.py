"""Synthetic click logs with a planted, learnable signal: ``schema="criteo"`` (the default) or
``schema="multitask"``.

Criteo schema. Columns: ``label`` (0/1), ``dense_0..dense_12`` (non-negative, heavy-tailed
counts with a few nulls, like Criteo's integer features), ``cat_0..cat_25`` (int64 ids drawn from
a Zipf law per feature; ``cat_23..cat_25`` are multi-hot ``list<int64>`` with 1-5 ids).

The click probability is ``sigmoid(bias + dense effect + per-id effects + one pairwise
interaction)``. The planted effects depend only on ``signal_seed`` (fixed by default), so a
train and an eval set written with different ``--seed`` share the same ground truth. DLRM with
the demo config reaches a test AUC above 0.9 after one epoch over 200k rows (0.70 is the bar).

Multitask schema. Labels ``click`` (0/1, ~30%), ``like`` (0/1, only ever 1 on a click, ~40% of
clicks) and ``watch_time`` (float32 >= 0: exactly 0 without a click, lognormal-ish otherwise);
``dense_0..dense_7`` (float32, standard normal, ~1% nulls); ``cat_0..cat_11`` (int64 Zipf ids,
vocabularies in ``MULTITASK_VOCAB``; ``cat_10`` and ``cat_11`` are ``list<int64>`` with 1-5 ids).
Three latent factors give the tasks something to share and something to specialise on:

- ``a`` (cat_0, cat_1, cat_10) drives click and like,
- ``b`` (cat_2, cat_3, dense_0, dense_1) drives click and watch_time,
- ``c`` (cat_4, cat_5, cat_11) drives like and watch_time,
- and each task has a private term: cat_6 for click, cat_7 for like, dense_2/dense_3 for watch_time.
  cat_8, cat_9 and dense_4..dense_7 are pure noise.

Each factor is a sum of per-id effects (N(0, 0.75) per id; a multi-hot bag averages its ids),
plus ``0.5 dense_0 - 0.4 dense_1`` in ``b``; the factors have a standard deviation of ~1.1-1.3.
``P(click) = sigmoid(-1.35 + a + b + click_only)``; given a click,
``P(like) = sigmoid(-1.1 + a + c + like_only)`` and
``watch_time = exp(1.2 + 0.2 (b + c) + 0.3 dense_2 - 0.2 dense_3 + 0.25 noise)``, else 0. A
click's watch time has mean ~4.4 and variance ~7 (max ~40 in 50k rows); over all rows, zeros
included, the mean is ~1.3 and the variance ~6. The hurdle shape (zero, or lognormal around a
feature-driven mean) is what real watch-time targets look like, and a model that predicts
``P(click) * E[watch_time | click]`` fits it. Id effects are centred on their Zipf-weighted mean,
so the base rates hardly move with ``signal_seed``.

Two-tower schema (``write_two_tower``, the layout of data/retrieval.py: OUT/train, OUT/eval,
OUT/items, meta.json). 20 clusters of 50 items; inside a cluster, item popularity follows a Zipf
law (exponent 1). Each user prefers one or two clusters (two: weights w and 1 - w, w in
[0.5, 0.8]; clusters picked with a mild skew, p ~ 1/rank^0.5) and picks 15-35 distinct items
(``--rows`` interactions in all), without replacement, from the preferred clusters' Zipf laws
mixed with the uniform law over the whole catalog (weight 0.1: ~16% of picks land outside the
preferred clusters); the picks come in random time order (timestamps increase per user). Every pick is a positive. Item feature
``category``: the item's cluster, except for 10% of items, which show a random cluster. Global
popularity mixes all clusters, so the popularity baseline scores low (Recall@10 ~0.065 at 20k-50k
rows) while ranking a user's unseen items by the planted law reaches ~7 times more (~0.47): a working
two-tower has a lot of room above popularity. Clusters, popularity and categories depend on
``signal_seed`` only; users and picks on ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.schema import DataError

NUM_DENSE = 13
NUM_SPARSE = 26
MULTI_HOT = (23, 24, 25)
# Criteo-like spread of cardinalities, scaled down so the demo trains in minutes on a CPU.
VOCAB_SIZES = (
    1460, 583, 10000, 2202, 305, 24, 1200, 633, 3, 9000,
    5683, 8000, 3194, 27, 4000, 5000, 10, 5652, 2173, 4,
    7046, 18, 15, 2860, 105, 142,
)
SIGNAL_FEATURES = (0, 1, 3, 4, 5, 7, 13, 16, 19, 21, 23, 25)
ZIPF_EXPONENT = 1.1

SCHEMAS = ("criteo", "multitask")  # plus "two_tower", which has its own layout (write_two_tower)

TWO_TOWER_CLUSTERS = 20
TWO_TOWER_ITEMS_PER_CLUSTER = 50
TWO_TOWER_NOISE = 0.10  # weight of the uniform law in every pick (~17% of picks land outside the clusters)
TWO_TOWER_CATEGORY_NOISE = 0.10  # share of items whose category feature shows a random cluster
TWO_TOWER_PICKS = (15, 35)  # distinct items per user, before scaling to --rows

MULTITASK_LABELS = ("click", "like", "watch_time")
MULTITASK_DENSE = tuple(f"dense_{i}" for i in range(8))
MULTITASK_VOCAB = {
    "cat_0": 5000, "cat_1": 2000, "cat_2": 3000, "cat_3": 500, "cat_4": 1000, "cat_5": 200,
    "cat_6": 100, "cat_7": 50, "cat_8": 20, "cat_9": 4000, "cat_10": 1000, "cat_11": 300,
}
MULTITASK_SPARSE = tuple(MULTITASK_VOCAB)
MULTITASK_MULTI_HOT = ("cat_10", "cat_11")
# Latent factor -> the sparse features whose id effects add up to it; b also takes a dense term.
MULTITASK_FACTORS = {
    "a": ("cat_0", "cat_1", "cat_10"),
    "b": ("cat_2", "cat_3"),
    "c": ("cat_4", "cat_5", "cat_11"),
    "click_only": ("cat_6",),
    "like_only": ("cat_7",),
}
MULTITASK_EFFECT_SD = 0.75


def dense_columns() -> list[str]:
    return [f"dense_{i}" for i in range(NUM_DENSE)]


def sparse_columns() -> list[str]:
    return [f"cat_{i}" for i in range(NUM_SPARSE)]


def _zipf_cdf(vocab: int) -> np.ndarray:
    p = 1.0 / np.arange(1, vocab + 1) ** ZIPF_EXPONENT
    return np.cumsum(p / p.sum())


def _draw_ids(cdf: np.ndarray, id_of_rank: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` ids: a Zipf rank per draw, then the (shuffled) id holding that rank."""
    ranks = np.searchsorted(cdf, rng.random(size), side="right")
    ranks = np.minimum(ranks, len(cdf) - 1)
    return id_of_rank[ranks].astype(np.int64)


class _PlantedModel:
    """The ground truth: Zipf samplers and effects per feature, fixed by `signal_seed`."""

    def __init__(self, signal_seed: int) -> None:
        rng = np.random.default_rng(signal_seed)
        self.id_of_rank = [rng.permutation(v) for v in VOCAB_SIZES]
        self.cdf = [_zipf_cdf(v) for v in VOCAB_SIZES]
        self.effects = [
            rng.normal(0.0, 0.9 if i in SIGNAL_FEATURES else 0.0, size=v) for i, v in enumerate(VOCAB_SIZES)
        ]
        self.dense_mu = rng.uniform(0.0, 3.0, NUM_DENSE)
        self.dense_w = rng.normal(0.0, 0.35, NUM_DENSE)
        self.pair = (0, 3)
        self.pair_w = 0.6

    def sample_ids(self, feature: int, size: int, rng: np.random.Generator) -> np.ndarray:
        return _draw_ids(self.cdf[feature], self.id_of_rank[feature], size, rng)


def _check_positive(flag: str, value: int) -> None:
    # "must be positive" is the phrase callers (and tests) match on.
    if value <= 0:
        raise DataError(f"{flag} must be positive (an integer >= 1), got {value}")


def synthesize_table(rows: int, seed: int, signal_seed: int = 2024, schema: str = "criteo") -> pa.Table:
    """`rows` samples of `schema` ("criteo" or "multitask") as one Arrow table."""
    _check_positive("--rows", rows)
    if schema == "two_tower":
        raise DataError("the two_tower schema writes OUT/train, OUT/eval and OUT/items: use write_two_tower "
                        "(`rectrain data synth --schema two_tower`)")
    if schema not in SCHEMAS:
        raise DataError(f"unknown synthetic schema {schema!r}; choose one of {', '.join(SCHEMAS)}")
    make = _criteo_table if schema == "criteo" else _multitask_table
    return make(rows, seed, signal_seed)


def _criteo_table(rows: int, seed: int, signal_seed: int) -> pa.Table:
    truth = _PlantedModel(signal_seed)
    rng = np.random.default_rng([seed, 7])
    logit = np.full(rows, -1.6)
    columns: dict[str, pa.Array] = {}

    for i in range(NUM_DENSE):
        z = rng.normal(truth.dense_mu[i], 1.0, rows)
        counts = np.floor(np.expm1(np.clip(z, 0.0, None)))
        logit += truth.dense_w[i] * (z - truth.dense_mu[i])
        mask = rng.random(rows) < 0.01  # ~1% missing, as in Criteo
        columns[f"dense_{i}"] = pa.array(counts.astype(np.float32), mask=mask)

    effects = []
    for i in range(NUM_SPARSE):
        if i in MULTI_HOT:
            lengths = rng.integers(1, 6, rows)
            ids = truth.sample_ids(i, int(lengths.sum()), rng)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            eff = np.add.reduceat(truth.effects[i][ids], offsets[:-1]) / lengths
            columns[f"cat_{i}"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids))
        else:
            ids = truth.sample_ids(i, rows, rng)
            eff = truth.effects[i][ids]
            mask = rng.random(rows) < 0.002 if i in (2, 11) else None  # a few missing ids
            if mask is not None:
                eff = np.where(mask, 0.0, eff)
            columns[f"cat_{i}"] = pa.array(ids, mask=mask)
        effects.append(eff)
        logit += eff
    a, b = truth.pair
    logit += truth.pair_w * effects[a] * effects[b]
    label = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    return pa.table({"label": pa.array(label), **columns})


class _MultitaskTruth:
    """The multitask ground truth: Zipf samplers and centred id effects, fixed by `signal_seed`."""

    def __init__(self, signal_seed: int) -> None:
        rng = np.random.default_rng([signal_seed, 1])
        factor_of = {f: k for k, feats in MULTITASK_FACTORS.items() for f in feats}
        self.id_of_rank, self.cdf, self.effects = {}, {}, {}
        for name, vocab in MULTITASK_VOCAB.items():
            self.id_of_rank[name] = rng.permutation(vocab)
            self.cdf[name] = _zipf_cdf(vocab)
            effect = rng.normal(0.0, MULTITASK_EFFECT_SD if name in factor_of else 0.0, vocab)
            # Centre on the mean a drawn id contributes, so the biases alone set the base rates.
            weight = np.diff(self.cdf[name], prepend=0.0)
            effect -= weight @ effect[self.id_of_rank[name]]
            self.effects[name] = effect
        self.factor_of = factor_of

    def sample_ids(self, name: str, size: int, rng: np.random.Generator) -> np.ndarray:
        return _draw_ids(self.cdf[name], self.id_of_rank[name], size, rng)


def _multitask_table(rows: int, seed: int, signal_seed: int) -> pa.Table:
    truth = _MultitaskTruth(signal_seed)
    rng = np.random.default_rng([seed, 11])
    factors = {k: np.zeros(rows) for k in MULTITASK_FACTORS}
    columns: dict[str, pa.Array] = {}

    z = rng.normal(0.0, 1.0, (len(MULTITASK_DENSE), rows))
    for name, values in zip(MULTITASK_DENSE, z):
        # The effects use the true value; a null only hides it from the model, as in real logs.
        columns[name] = pa.array(values.astype(np.float32), mask=rng.random(rows) < 0.01)
    factors["b"] += 0.5 * z[0] - 0.4 * z[1]

    for name in MULTITASK_SPARSE:
        if name in MULTITASK_MULTI_HOT:
            lengths = rng.integers(1, 6, rows)
            ids = truth.sample_ids(name, int(lengths.sum()), rng)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            effect = np.add.reduceat(truth.effects[name][ids], offsets[:-1]) / lengths
            columns[name] = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(ids))
        else:
            ids = truth.sample_ids(name, rows, rng)
            effect = truth.effects[name][ids]
            columns[name] = pa.array(ids)
        if name in truth.factor_of:
            factors[truth.factor_of[name]] += effect

    a, b, c = factors["a"], factors["b"], factors["c"]
    click = rng.random(rows) < _sigmoid(-1.35 + a + b + factors["click_only"])
    like = click & (rng.random(rows) < _sigmoid(-1.1 + a + c + factors["like_only"]))
    log_watch = 1.2 + 0.2 * (b + c) + 0.3 * z[2] - 0.2 * z[3] + 0.25 * rng.normal(0.0, 1.0, rows)
    watch_time = np.where(click, np.exp(log_watch), 0.0).astype(np.float32)
    labels = {"click": pa.array(click.astype(np.int64)), "like": pa.array(like.astype(np.int64)),
              "watch_time": pa.array(watch_time)}
    return pa.table({**labels, **columns})


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def write_synthetic(out: str | Path, rows: int, seed: int = 0, files: int = 1,
                    row_group_rows: int = 8192, signal_seed: int = 2024, schema: str = "criteo") -> list[Path]:
    """Write `rows` samples of `schema` into `files` Parquet files under `out`; returns the paths."""
    _check_positive("--rows", rows)
    _check_positive("--files", files)
    return write_files(synthesize_table(rows, seed, signal_seed, schema), out, files, row_group_rows)


def write_files(table: pa.Table, out: str | Path, files: int, row_group_rows: int) -> list[Path]:
    """`table` split into `files` Parquet files of near-equal rows under `out` (with page checksums)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(files):
        lo, hi = table.num_rows * k // files, table.num_rows * (k + 1) // files
        path = out / f"part-{k:05d}.parquet"
        pq.write_table(table.slice(lo, hi - lo), path, row_group_size=row_group_rows, write_page_checksum=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- two-tower


@dataclass
class TwoTowerTruth:
    """The planted structure. item_cluster: int64 [N]; item_category: int64 [N] (the feature,
    with noise); within: float64 [N] an item's probability inside its cluster;
    user_weights: float64 [U, C] each user's cluster preferences (rows sum to 1)."""

    item_cluster: np.ndarray
    item_category: np.ndarray
    within: np.ndarray
    user_weights: np.ndarray
    noise: float = TWO_TOWER_NOISE

    def user_probs(self, users: np.ndarray) -> np.ndarray:
        """float64 [len(users), N]: each user's pick law (before excluding what was picked)."""
        n = len(self.item_cluster)
        return (1 - self.noise) * self.user_weights[users][:, self.item_cluster] * self.within + self.noise / n


def synthesize_two_tower(rows: int, seed: int = 0, signal_seed: int = 2024) -> tuple[dict[str, np.ndarray], TwoTowerTruth]:
    """(interactions {"user", "item", "timestamp"} with ~`rows` entries, the planted truth)."""
    _check_positive("--rows", rows)
    c, k = TWO_TOWER_CLUSTERS, TWO_TOWER_ITEMS_PER_CLUSTER
    n = c * k
    items = np.random.default_rng([signal_seed, 21])
    cluster = (items.permutation(n) // k).astype(np.int64)  # ids do not reveal clusters
    zipf = 1.0 / np.arange(1, k + 1)
    within = np.empty(n)
    for g in range(c):
        members = np.flatnonzero(cluster == g)
        within[items.permutation(members)] = zipf / zipf.sum()
    category = cluster.copy()
    flip = items.random(n) < TWO_TOWER_CATEGORY_NOISE
    category[flip] = items.integers(0, c, int(flip.sum()))
    cluster_p = 1.0 / np.arange(1, c + 1) ** 0.5
    cluster_p = cluster_p[items.permutation(c)]
    cluster_p /= cluster_p.sum()

    rng = np.random.default_rng([seed, 22])
    lo, hi = TWO_TOWER_PICKS
    num_users = max(1, round(rows / ((lo + hi) / 2)))
    raw = rng.integers(lo, hi + 1, num_users).astype(np.float64)
    picks = np.floor(raw * rows / raw.sum()).astype(np.int64)
    picks[: rows - int(picks.sum())] += 1
    picks = np.minimum(picks, n)
    weights = np.zeros((num_users, c))
    for u in range(num_users):
        chosen = rng.choice(c, size=1 + int(rng.random() < 0.5), replace=False, p=cluster_p)
        w = rng.uniform(0.5, 0.8)
        weights[u, chosen] = [1.0] if len(chosen) == 1 else [w, 1 - w]
    truth = TwoTowerTruth(cluster, category, within, weights)

    # Distinct picks per user: Gumbel top-k draws without replacement from the user's law.
    users, chosen_items = [], []
    for start in range(0, num_users, 2048):
        block = np.arange(start, min(num_users, start + 2048))
        scores = np.log(truth.user_probs(block)) + rng.gumbel(size=(len(block), n))
        top = np.argsort(-scores, axis=1)
        for j, u in enumerate(block):
            chosen_items.append(top[j, : picks[u]])
            users.append(np.full(picks[u], u, dtype=np.int64))
    user = np.concatenate(users)
    item = np.concatenate(chosen_items).astype(np.int64)
    # Random time order inside a user; users interleave in time.
    order = np.lexsort((rng.random(len(user)), user))
    user, item = user[order], item[order]
    gaps = rng.integers(60, 86_400, len(user))
    first = np.r_[True, user[1:] != user[:-1]]
    start_time = 1_600_000_000 + rng.integers(0, 30 * 86_400, num_users)
    cum = np.cumsum(gaps)
    base = np.maximum.accumulate(np.where(first, cum - gaps, 0))
    timestamp = start_time[user] + cum - base
    return {"user": user, "item": item, "timestamp": timestamp.astype(np.int64)}, truth


def write_two_tower(out: str | Path, rows: int, seed: int = 0, signal_seed: int = 2024, max_history: int = 50,
                    test_fraction: float = 0.2, row_group_rows: int = 8192) -> dict:
    """Write the two-tower layout (data/retrieval.py) under `out`; returns meta.json's content
    plus the written ``paths``."""
    from data.retrieval import Feature, items_table, split_interactions, write_retrieval

    log, truth = synthesize_two_tower(rows, seed, signal_seed)
    n, num_users = len(truth.item_cluster), len(truth.user_weights)
    item_features = {"category": Feature(TWO_TOWER_CLUSTERS, truth.item_category)}
    split = split_interactions(log["user"], log["item"], log["timestamp"], np.ones(len(log["user"]), bool),
                               num_users=num_users, num_items=n, max_history=max_history,
                               test_fraction=test_fraction, item_features=item_features)
    titles = [f"item {i} (cluster {g})" for i, g in enumerate(truth.item_cluster)]
    items = items_table(n, item_features, np.arange(n), titles)
    extra = {
        "source": "synthetic two_tower",
        "seed": seed,
        "signal_seed": signal_seed,
        "planted": {"clusters": TWO_TOWER_CLUSTERS, "items_per_cluster": TWO_TOWER_ITEMS_PER_CLUSTER,
                    "noise": TWO_TOWER_NOISE, "category_noise": TWO_TOWER_CATEGORY_NOISE,
                    "picks_per_user": list(TWO_TOWER_PICKS), "within_cluster_zipf": 1.0},
    }
    return write_retrieval(out, split, items, extra, row_group_rows)


# --------------------------------------------------------------------------- benchmark data


def write_bench_data(out: str | Path, rows: int, num_embeddings: int, seed: int = 0, files: int = 4,
                     row_group_rows: int = 8192) -> list[Path]:
    """The Criteo schema of `synthesize_table` with one id per feature (no multi-hot, no missing
    ids), ids uniform over [0, num_embeddings) as in TorchRec's random DLRM batches; label and
    dense columns as synthesized. What `rectrain bench` trains on (written once, reused)."""
    _check_positive("--rows", rows)
    table = synthesize_table(rows, seed)
    rng = np.random.default_rng([seed, 11])
    for i in range(NUM_SPARSE):
        name = f"cat_{i}"
        ids = pa.array(rng.integers(0, num_embeddings, rows, dtype=np.int64))
        table = table.set_column(table.schema.get_field_index(name), name, ids)
    return write_files(table, out, files, row_group_rows)
