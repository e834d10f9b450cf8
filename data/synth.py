"""A Criteo-shaped synthetic click log with a planted, learnable signal.

Columns: ``label`` (0/1), ``dense_0..dense_12`` (non-negative, heavy-tailed counts with a few
nulls, like Criteo's integer features), ``cat_0..cat_25`` (int64 ids drawn from a Zipf law per
feature; ``cat_23..cat_25`` are multi-hot ``list<int64>`` with 1-5 ids).

The click probability is ``sigmoid(bias + dense effect + per-id effects + one pairwise
interaction)``. The planted effects depend only on ``signal_seed`` (fixed by default), so a
train and an eval set written with different ``--seed`` share the same ground truth. DLRM with
the demo config reaches a test AUC above 0.9 after one epoch over 200k rows (0.70 is the bar).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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


def dense_columns() -> list[str]:
    return [f"dense_{i}" for i in range(NUM_DENSE)]


def sparse_columns() -> list[str]:
    return [f"cat_{i}" for i in range(NUM_SPARSE)]


class _PlantedModel:
    """The ground truth: Zipf samplers and effects per feature, fixed by `signal_seed`."""

    def __init__(self, signal_seed: int) -> None:
        rng = np.random.default_rng(signal_seed)
        self.id_of_rank = [rng.permutation(v) for v in VOCAB_SIZES]
        self.cdf = []
        for v in VOCAB_SIZES:
            p = 1.0 / np.arange(1, v + 1) ** ZIPF_EXPONENT
            self.cdf.append(np.cumsum(p / p.sum()))
        self.effects = [
            rng.normal(0.0, 0.9 if i in SIGNAL_FEATURES else 0.0, size=v) for i, v in enumerate(VOCAB_SIZES)
        ]
        self.dense_mu = rng.uniform(0.0, 3.0, NUM_DENSE)
        self.dense_w = rng.normal(0.0, 0.35, NUM_DENSE)
        self.pair = (0, 3)
        self.pair_w = 0.6

    def sample_ids(self, feature: int, size: int, rng: np.random.Generator) -> np.ndarray:
        ranks = np.searchsorted(self.cdf[feature], rng.random(size), side="right")
        ranks = np.minimum(ranks, VOCAB_SIZES[feature] - 1)
        return self.id_of_rank[feature][ranks].astype(np.int64)


def synthesize_table(rows: int, seed: int, signal_seed: int = 2024) -> pa.Table:
    """`rows` samples as one Arrow table."""
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


def write_synthetic(out: str | Path, rows: int, seed: int = 0, files: int = 1,
                    row_group_rows: int = 8192, signal_seed: int = 2024) -> list[Path]:
    """Write `rows` samples into `files` Parquet files under `out`; returns the paths."""
    if rows <= 0 or files <= 0:
        raise ValueError(f"--rows ({rows}) and --files ({files}) must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = synthesize_table(rows, seed, signal_seed)
    paths = []
    for k in range(files):
        lo, hi = rows * k // files, rows * (k + 1) // files
        path = out / f"part-{k:05d}.parquet"
        pq.write_table(table.slice(lo, hi - lo), path, row_group_size=row_group_rows)
        paths.append(path)
    return paths
