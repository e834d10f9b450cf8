"""The in-batch sampled softmax (models/tasks.InBatchSoftmaxTask) and its helpers
(models/retrieval.py): the logQ formula, masking, item counts, samplers, and the cross-rank
gather with gradients (one 2-process gloo run)."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from models.retrieval import ItemFrequency, NegativeSampler, gather_rows, gather_values
from models.tasks import MASKED_LOGIT, InBatchSoftmaxTask, build_tasks


def _outputs(q, c, ids, items, log_q=None, valid=None, temperature=0.5):
    B, C = q.shape[0], c.shape[0]
    return {"query": q, "candidates": c, "temperature": torch.tensor(temperature),
            "candidate_ids": torch.tensor(ids), "item_ids": torch.tensor(items),
            "candidate_log_q": torch.zeros(C) if log_q is None else log_q,
            "candidate_valid": torch.ones(C, dtype=torch.bool) if valid is None else torch.tensor(valid),
            "positive_index": torch.arange(B)}


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


TASK = InBatchSoftmaxTask("retrieval")


def test_logq_correction_changes_the_logits_exactly_as_its_formula():
    """logit[b, c] = q_b . c_c / T - log(B * p_c + M * s_c), p from exact counts."""
    q, c = _unit(3, 4, seed=1), _unit(5, 4, seed=2)
    freq = ItemFrequency(10)
    freq.update(torch.tensor([1, 2, 3, 1, 1, 7]))  # earlier steps: item 1 x3, 2, 3, 7 x1 -> total 6
    ids = torch.tensor([1, 2, 3, 7, 9])  # three in-batch positives, two sampled negatives
    s = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3], dtype=torch.float64)
    log_q = freq.log_expected(ids, 3, extra=2, sampler_probs=s)
    p = torch.tensor([3, 1, 1, 1, 0], dtype=torch.float64) / 6
    want_log_q = torch.log(3 * p + 2 * s).float()
    torch.testing.assert_close(log_q, want_log_q)
    assert log_q[4].item() == pytest.approx(math.log(2 * 0.3))  # never a positive: sampler term only

    out = _outputs(q, c, ids.tolist(), [1, 2, 3], log_q=log_q, temperature=0.25)
    logits = TASK.logits(out)
    torch.testing.assert_close(logits, q @ c.T / 0.25 - want_log_q[None, :])
    plain = TASK.logits({**out, "candidate_log_q": torch.zeros(5)})
    torch.testing.assert_close(plain - logits, want_log_q.expand(3, 5))

    loss = TASK.loss(out, torch.zeros(3, 0), torch.ones(3))
    torch.testing.assert_close(loss, F.cross_entropy(q @ c.T / 0.25 - want_log_q, torch.arange(3)))


def test_accidental_hits_are_masked_but_not_the_positive():
    """Rows 0 and 2 share item 5: each masks the other's column, keeps its own."""
    q, c = _unit(3, 4, seed=3), _unit(4, 4, seed=4)
    out = _outputs(q, c, [5, 6, 5, 5], [5, 6, 5])  # column 3: a sampled negative that is item 5 again
    logits = TASK.logits(out)
    raw = q @ c.T / 0.5
    masked = torch.zeros(3, 4, dtype=torch.bool)
    masked[0, 2] = masked[0, 3] = masked[2, 0] = masked[2, 3] = True
    assert (logits[masked] == MASKED_LOGIT).all()
    torch.testing.assert_close(logits[~masked], raw[~masked])
    want = F.cross_entropy(raw.masked_fill(masked, float("-inf")), torch.arange(3))
    torch.testing.assert_close(TASK.loss(out, torch.zeros(3, 0), torch.ones(3)), want)


def test_invalid_columns_are_masked_and_padding_rows_count_nothing():
    q, c = _unit(3, 4, seed=5), _unit(4, 4, seed=6)
    out = _outputs(q, c, [1, 2, -1, -1], [1, 2, -1], valid=[True, True, False, False])
    logits = TASK.logits(out)
    assert (logits[:, 2:] == MASKED_LOGIT).all()
    weights = torch.tensor([1.0, 1.0, 0.0])
    want = F.cross_entropy((q @ c.T / 0.5)[:2, :2], torch.arange(2))
    torch.testing.assert_close(TASK.loss(out, torch.zeros(3, 0), weights), want)


def test_an_all_padding_batch_gives_exactly_zero_loss_and_zero_gradients():
    q = _unit(2, 4, seed=7).requires_grad_()
    c = _unit(2, 4, seed=8).requires_grad_()
    out = _outputs(q, c, [-1, -1], [-1, -1], valid=[False, False])
    loss = TASK.loss(out, torch.zeros(2, 0), torch.zeros(2))
    assert loss.item() == 0.0
    loss.backward()
    assert q.grad.abs().sum() == 0 and c.grad.abs().sum() == 0


def test_stats_report_inbatch_accuracy_and_temperature():
    q = torch.eye(3, 4)
    c = torch.eye(3, 4)[[0, 2, 1]]  # row 0 finds its positive; rows 1 and 2 find each other's
    stats = TASK.stats(_outputs(q, c, [0, 1, 2], [0, 1, 2], temperature=0.1), torch.ones(3))
    assert stats["inbatch_accuracy"].item() == pytest.approx(1 / 3)
    assert stats["temperature"].item() == pytest.approx(0.1)


def test_metric_names_follow_top_k_and_retrieval_tasks_are_built_without_a_label():
    class Cfg:
        name, kind, weight, top_k, label = "retrieval", "retrieval", 1.0, [5, 20], ""

    (task,) = build_tasks([Cfg()], [])
    assert isinstance(task, InBatchSoftmaxTask) and task.label_index == -1 and task.top_k == [5, 20]
    names = task.metric_names
    assert names["recall@5"] and names["ndcg@20"] and names["hit_rate@5"] and names["mrr"]
    assert names["coverage@20"] is None and names["popularity_recall@5"] is None
    assert "recall@10" not in names


def test_item_frequency_counts_exactly_and_resets():
    freq = ItemFrequency(6)
    freq.update(torch.tensor([0, 3, 3, -1, 5, 3]))  # -1: a row without an item
    assert freq.counts.tolist() == [1, 0, 0, 3, 0, 1] and freq.counts.dtype == torch.int64
    torch.testing.assert_close(freq.probability(torch.tensor([3, 1])), torch.tensor([0.6, 0.0], dtype=torch.float64))
    assert "counts" in freq.state_dict()
    freq.reset_parameters()
    assert freq.counts.sum() == 0


def test_samplers_are_reproducible_and_their_probabilities_match_their_law():
    row_items = torch.tensor([0, 1, 2, 3])
    freq = ItemFrequency(5)
    freq.update(torch.tensor([1, 1, 1, 2]))
    pop = NegativeSampler("popularity", row_items, 5, seed=3)
    w = torch.tensor([1.0, 4.0, 2.0, 1.0], dtype=torch.float64) ** 0.75
    want = torch.cat([w / w.sum(), torch.zeros(1, dtype=torch.float64)])  # item 4 has no catalog row
    torch.testing.assert_close(pop.probabilities(torch.arange(5), freq), want)
    assert pop.probabilities(torch.tensor([-1]), freq).item() == 0.0  # no item
    rows_a = pop.sample(4000, freq)
    assert pop.calls.item() == 1
    share = torch.bincount(rows_a, minlength=4).double() / 4000
    torch.testing.assert_close(share, w / w.sum(), atol=0.03, rtol=0)
    assert torch.equal(pop.items_of(rows_a), row_items[rows_a])
    again = NegativeSampler("popularity", row_items, 5, seed=3)
    assert torch.equal(again.sample(4000, freq), rows_a)  # same seed and call number: same draws
    assert not torch.equal(pop.sample(4000, freq), rows_a)  # the next call draws anew
    uni = NegativeSampler("uniform", row_items, 5)
    torch.testing.assert_close(uni.probabilities(torch.arange(5), freq),
                               torch.tensor([0.25] * 4 + [0.0], dtype=torch.float64))
    # two catalog rows holding one item (a hashing id policy): that item is drawn twice as often
    shared = NegativeSampler("uniform", torch.tensor([0, 0, 1]), 2)
    torch.testing.assert_close(shared.probabilities(torch.tensor([0, 1]), ItemFrequency(2)),
                               torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))


def test_gather_is_a_no_op_without_a_process_group():
    x, valid = torch.randn(3, 2), torch.tensor([True, False, True])
    rows, v = gather_rows(x, valid)
    assert rows is x and v is valid
    assert gather_values(torch.tensor([4, 5]), -1).tolist() == [4, 5]


# --------------------------------------------------------------------------- two ranks (gloo)

ROWS = {0: 3, 1: 2}  # rank 1 has fewer rows (a last batch): its block is padded


def _rank_rows(rank: int) -> torch.Tensor:
    return torch.arange(ROWS[rank] * 2, dtype=torch.float32).reshape(-1, 2) + 100 * rank


def _rank_ids(rank: int) -> torch.Tensor:
    return torch.tensor([[1, 4, 4], [4, 7]][rank])


def _worker(rank: int, port: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x = _rank_rows(rank).requires_grad_()
        rows, valid = gather_rows(x, torch.ones(ROWS[rank], dtype=torch.bool))
        # Rank r's loss weighs every gathered row by a rank-specific coefficient per row.
        coeff = torch.arange(rows.shape[0], dtype=torch.float32)[:, None] + 10 * (rank + 1)
        (rows * coeff).sum().backward()
        freq = ItemFrequency(8)
        ids = gather_values(_rank_ids(rank), -1)
        freq.update(ids)
        torch.save({"rows": rows.detach(), "valid": valid, "grad": x.grad, "ids": ids, "counts": freq.counts,
                    "log_q": freq.log_expected(ids, int((ids >= 0).sum()))}, f"{path}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_ranks_gather_every_rows_with_gradients_to_their_owner_and_equal_counts(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    res = {r: torch.load(tmp_path / f"{r}.pt") for r in (0, 1)}
    m = max(ROWS.values())
    pad = lambda t, fill: torch.cat([t, t.new_full((m - len(t), *t.shape[1:]), fill)])  # noqa: E731
    blocks = {r: pad(_rank_rows(r), 0.0) for r in (0, 1)}
    for r, other in ((0, 1), (1, 0)):
        # This rank's rows first, then the other rank's, each block padded to the largest.
        torch.testing.assert_close(res[r]["rows"], torch.cat([blocks[r], blocks[other]]))
        assert res[r]["valid"].tolist() == [True] * ROWS[r] + [False] * (m - ROWS[r]) + \
            [True] * ROWS[other] + [False] * (m - ROWS[other])
        assert res[r]["ids"].tolist() == pad(_rank_ids(r), -1).tolist() + pad(_rank_ids(other), -1).tolist()
        # d(sum_r' L_r')/d(x_r): rank r' puts rank r's block at offset 0 if r' == r, else m.
        want = sum(torch.arange(ROWS[r], dtype=torch.float32)[:, None] + (0 if rr == r else m) + 10 * (rr + 1)
                   for rr in (0, 1)).expand(ROWS[r], 2)
        torch.testing.assert_close(res[r]["grad"], want)
    assert res[0]["counts"].tolist() == res[1]["counts"].tolist() == [0, 1, 0, 0, 3, 0, 0, 1]
    # Same candidates (in another order) get the same log expected count on both ranks.
    for r in (0, 1):
        ids, log_q = res[r]["ids"], res[r]["log_q"]
        for item, n in ((1, 1), (4, 3), (7, 1)):
            assert log_q[ids == item].allclose(torch.tensor(math.log(5 * n / 5)))


def test_a_row_without_an_item_counts_nothing_even_with_weight_one():
    # a null item id (an empty bag): no positive to learn from, so it must not add a huge masked loss
    q, c = _unit(3, 4, seed=9), _unit(3, 4, seed=10)
    out = _outputs(q, c, [1, 2, -1], [1, 2, -1], valid=[True, True, False])
    want = F.cross_entropy((q @ c.T / 0.5)[:2, :2], torch.arange(2))
    torch.testing.assert_close(TASK.loss(out, torch.zeros(3, 0), torch.ones(3)), want)
    accuracy = ((q @ c.T)[:2, :2].argmax(dim=1) == torch.arange(2)).float().mean()
    torch.testing.assert_close(TASK.stats(out, torch.ones(3))["inbatch_accuracy"], accuracy)
