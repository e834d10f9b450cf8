"""models/metrics.py in one process (no process group): AUC, logloss, NE, calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.metrics import BinaryTaskMetrics, RegressionTaskMetrics, ScoreAUC

CPU = torch.device("cpu")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _auc(scores: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos * n_neg)."""
    r = _average_ranks(scores)
    n_pos = int((y == 1).sum())
    n_neg = len(y) - n_pos
    return (r[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _auc_pairs(scores: np.ndarray, y: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie), over all pairs."""
    pos, neg = scores[y == 1], scores[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _logloss(logits: np.ndarray, y: np.ndarray) -> float:
    p = _sigmoid(logits.astype(np.float64))
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


def _data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    # logits on a 0.1 grid: plenty of ties, all distinct after a float32 sigmoid
    logits = np.round(rng.normal(0, 1.5, n), 1)
    y = (rng.random(n) < _sigmoid(logits - 0.7)).astype(np.float64)
    return logits, y


def test_reference_auc_helpers_agree():
    logits, y = _data(300, 0)
    assert _auc(logits, y) == pytest.approx(_auc_pairs(logits, y), abs=1e-12)
    assert _auc(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1])) == 1.0
    assert _auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5


def test_auc_matches_rank_formula_with_ties():
    logits, y = _data(2000, 1)
    assert len(np.unique(logits)) < 200  # many ties
    m = BinaryTaskMetrics(CPU)
    # several updates, as in an eval loop
    for lo in range(0, 2000, 512):
        sl = slice(lo, lo + 512)
        m.update(torch.tensor(logits[sl], dtype=torch.float32), torch.tensor(y[sl], dtype=torch.float32),
                 torch.ones(len(y[sl]), dtype=torch.bool))
    out = m.compute()
    assert out["num_samples"] == 2000
    assert out["auc"] == pytest.approx(_auc(logits, y), abs=1e-6)
    assert 0.5 < out["auc"] < 1.0


def test_logloss_ne_calibration():
    logits, y = _data(1500, 2)
    m = BinaryTaskMetrics(CPU)
    m.update(torch.tensor(logits, dtype=torch.float32), torch.tensor(y, dtype=torch.float32),
             torch.ones(1500, dtype=torch.bool))
    out = m.compute()
    ll = _logloss(logits, y)
    p = y.mean()
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert out["logloss"] == pytest.approx(ll, rel=1e-6)
    assert out["ne"] == pytest.approx(ll / entropy, rel=1e-6)
    assert out["calibration"] == pytest.approx(_sigmoid(logits).sum() / y.sum(), rel=1e-6)


def test_mask_excludes_rows():
    logits, y = _data(1000, 3)
    rng = np.random.default_rng(4)
    mask = rng.random(1000) < 0.6
    # the masked-out rows are adversarial: if they counted, every metric would move
    logits_m = logits.copy()
    logits_m[~mask] = np.where(y[~mask] == 1, -8.0, 8.0)
    m = BinaryTaskMetrics(CPU)
    m.update(torch.tensor(logits_m, dtype=torch.float32), torch.tensor(y, dtype=torch.float32), torch.tensor(mask))
    out = m.compute()
    lk, yk = logits[mask], y[mask]
    assert out["num_samples"] == int(mask.sum())
    assert out["auc"] == pytest.approx(_auc(lk, yk), abs=1e-6)
    assert out["logloss"] == pytest.approx(_logloss(lk, yk), rel=1e-6)
    assert out["calibration"] == pytest.approx(_sigmoid(lk).sum() / yk.sum(), rel=1e-6)


def test_perfect_and_inverted_ranking():
    y = np.array([0, 0, 1, 1, 0, 1], dtype=np.float32)
    good = np.where(y == 1, 3.0, -3.0).astype(np.float32)
    ones = torch.ones(6, dtype=torch.bool)
    m = BinaryTaskMetrics(CPU)
    m.update(torch.tensor(good), torch.tensor(y), ones)
    assert m.compute()["auc"] == pytest.approx(1.0)
    m = BinaryTaskMetrics(CPU)
    m.update(torch.tensor(-good), torch.tensor(y), ones)
    out = m.compute()
    assert out["auc"] == pytest.approx(0.0)
    # logloss of -3 on positives and +3 on negatives: log(1 + e^3)
    assert out["logloss"] == pytest.approx(math.log1p(math.exp(3.0)), rel=1e-6)


def test_empty_and_single_class():
    m = BinaryTaskMetrics(CPU)
    m.update(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]), torch.tensor([False, False]))
    out = m.compute()
    assert out["num_samples"] == 0
    assert all(math.isnan(out[k]) for k in ("logloss", "ne", "calibration", "auc"))
    m = BinaryTaskMetrics(CPU)
    m.update(torch.tensor([1.0, -2.0]), torch.tensor([0.0, 0.0]), torch.tensor([True, True]))
    out = m.compute()
    assert math.isnan(out["ne"])  # base rate 0: entropy undefined
    assert math.isnan(out["calibration"])  # no positives
    assert out["logloss"] == pytest.approx(_logloss(np.array([1.0, -2.0]), np.array([0.0, 0.0])), rel=1e-6)


def test_regression_metrics_and_factory():
    out = torch.tensor([1.0, 2.0, 4.0, 100.0])
    y = torch.tensor([1.5, 2.0, 1.0, 0.0])
    mask = torch.tensor([True, True, True, False])
    m = RegressionTaskMetrics(CPU)
    m.update(out, y, mask)
    r = m.compute()
    assert r["num_samples"] == 3
    assert r["mse"] == pytest.approx((0.25 + 0 + 9) / 3, rel=1e-6)
    assert r["mae"] == pytest.approx((0.5 + 0 + 3) / 3, rel=1e-6)
    # the MSE of the best constant (the label mean) over the unmasked rows: the baseline to beat
    assert r["label_variance"] == pytest.approx(float(np.var([1.5, 2.0, 1.0])), rel=1e-6)


def test_score_auc_takes_any_score_scale():
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])
    scores = torch.tensor([-3.0, 0.5, 2.0, 7.0, 0.4])  # not probabilities
    mask = torch.tensor([True, True, True, True, False])
    m = ScoreAUC(CPU)
    m.update(scores, labels, mask)
    # pairs (pos, neg) over the 4 unmasked rows: (0.5>-3) (0.5<2) (7>-3) (7>2) -> 3/4
    assert m.compute() == pytest.approx(0.75)


def test_score_auc_ranks_every_batch_on_one_scale():
    # One batch entirely inside [0, 1], the next outside it: a per-batch sigmoid decision would
    # rank the first batch's 0.95 above the second's 1.2.
    m = ScoreAUC(CPU)
    ones = torch.ones(2, dtype=torch.bool)
    m.update(torch.tensor([0.9, 0.95]), torch.tensor([0.0, 0.0]), ones)
    m.update(torch.tensor([1.2, 1.2]), torch.tensor([1.0, 1.0]), ones)
    assert m.compute() == pytest.approx(1.0)
    # large regression-like values do not tie
    m = ScoreAUC(CPU)
    m.update(torch.tensor([40.0, 41.0, 1000.0, 1001.0]), torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.ones(4, dtype=torch.bool))
    assert m.compute() == pytest.approx(0.75)
