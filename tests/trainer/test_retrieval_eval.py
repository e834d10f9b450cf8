"""Full-catalog retrieval metrics on hand-made scores (the 2-rank run in
test_export_retrieval.py checks them end to end and across world sizes)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.retrieval_eval import ItemVectors, _Totals

NEG = float("-inf")


def test_recall_ndcg_hit_rate_mrr_and_coverage_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3, NEG],    # item 4 is seen
                           [0.3, 0.2, 0.2, 0.0, 0.7]])
    relevant = torch.tensor([[False, False, True, True, False],
                             [False, False, True, False, False]])
    num_targets = torch.tensor([3, 1])  # user 0 has a third target that is not in the catalog
    totals = _Totals([1, 2], num_items=5, device=torch.device("cpu"))
    totals.add(scores, relevant, num_targets)
    m = totals.metrics(5)
    # user 0: top 2 = items 0, 2 -> one hit of 3 targets; user 1: top 2 = items 4, 0 -> none
    assert m["recall@1"] == 0.0 and m["recall@2"] == pytest.approx((1 / 3) / 2)
    assert m["hit_rate@2"] == 0.5
    dcg = 1 / math.log2(3)  # the hit is at rank 2
    assert m["ndcg@2"] == pytest.approx((dcg / (1 + 1 / math.log2(3))) / 2)  # ideal: 2 hits (min(K, 3))
    # MRR over the whole catalog: user 0's best target (0.5) is 2nd; user 1's (0.2) ties with item
    # 1 and the lower catalog position ranks first: items 4, 0, 1 are ahead -> 4th
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert m["coverage@1"] == pytest.approx(2 / 5) and m["coverage@2"] == pytest.approx(3 / 5)


def test_fewer_unseen_items_than_k_and_an_unreachable_target():
    scores = torch.tensor([[NEG, 0.4, NEG]])  # one unseen item; the target is seen
    relevant = torch.tensor([[True, False, False]])
    totals = _Totals([2], num_items=3, device=torch.device("cpu"))
    totals.add(scores, relevant, torch.tensor([1]))
    m = totals.metrics(3)
    assert m["recall@2"] == 0.0 and m["mrr"] == 0.0
    assert m["coverage@2"] == pytest.approx(1 / 3)  # the -inf item shown as "2nd" does not count


def test_item_positions_find_raw_ids_and_flag_unknown_ones():
    items = ItemVectors(torch.tensor([3, 7, 10]), torch.tensor([0, 1, 2]), torch.zeros(3, 2))
    pos, found = items.positions(torch.tensor([10, 4, 3, 99]))
    assert found.tolist() == [True, False, True, False]
    assert pos[found].tolist() == [2, 0]
