"""models/two_tower.py: the towers, the shared item table, the training outputs the in-batch
softmax reads, sampled negatives from the catalog, and the TrainModule around it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from data.batch import Batch, padding_batch
from data.catalog import ItemCatalog
from models.retrieval import ItemFrequency
from models.registry import ModelInputs, build_model
from tests.conftest import ROOT
from tests.models.helpers import kjt, materialize
from trainer.config import load_config
from trainer.train_module import TrainModule

FEATURES = ["history", "item_id", "user_id", "category"]  # table order: t_item, t_user, t_category
SMALL = ['model.embedding_dim=8', 'model.arch.tower_layers=[16, 8]', 'train.device="cpu"']


def _cfg(*overrides: str):
    return load_config(ROOT / "configs" / "two_tower_synth.toml", [*SMALL, *overrides])


def _model(*overrides: str, catalog=None, num_dense: int = 0):
    cfg = _cfg(*overrides)
    model = build_model(cfg.model, ModelInputs(num_dense, (), item_catalog=catalog))
    return materialize(model, nan_fill=True)


def _batch(items=(3, 5, 3, 9), users=(0, 1, 2, 3)):
    hist = [[1, 2], [], [4], [3, 5, 7]]
    return kjt({"history": hist, "item_id": [[i] for i in items], "user_id": [[u] for u in users],
                "category": [[i % 20] for i in items]}, keys=FEATURES)


def test_forward_shapes_in_training_and_eval():
    model = _model()
    sparse = _batch()
    out = model(torch.zeros(4, 0), sparse)
    assert set(out) == {"query", "candidate", "item_ids", "temperature", "candidates", "candidate_ids",
                        "candidate_valid", "candidate_log_q", "positive_index"}
    assert out["query"].shape == out["candidate"].shape == out["candidates"].shape == (4, 8)
    torch.testing.assert_close(out["query"].norm(dim=1), torch.ones(4))
    torch.testing.assert_close(out["candidates"], out["candidate"])  # one rank, no extra negatives
    assert out["item_ids"].tolist() == out["candidate_ids"].tolist() == [3, 5, 3, 9]
    assert out["positive_index"].tolist() == [0, 1, 2, 3] and out["candidate_valid"].all()
    assert out["temperature"].shape == () and out["temperature"].item() == pytest.approx(0.05)
    model.eval()
    out = model(torch.zeros(4, 0), sparse)
    assert set(out) == {"query", "candidate", "item_ids", "temperature"}


def test_history_and_item_id_share_one_table_and_the_export_attributes_hold():
    model = _model()
    assert list(model.sparse.embedding_bags) == ["t_item", "t_user", "t_category"]
    assert model.feature_table == {"history": "t_item", "item_id": "t_item", "user_id": "t_user",
                                   "category": "t_category"}
    assert model.feature_pooling["history"] == "mean" and model.feature_pooling["user_id"] == "sum"
    assert model.query_features == ["user_id", "history"] and model.candidate_features == ["item_id", "category"]
    assert not model.uses_dense and not model.pipelineable  # the GPU pipeline cannot trace its forward
    # The pooled history is the mean of the item table's rows: the same rows the candidates use.
    table = model.sparse.embedding_bags["t_item"].weight
    pooled = model.sparse(_batch()).to_dict()
    torch.testing.assert_close(pooled["history"][0], table[[1, 2]].mean(0))
    torch.testing.assert_close(pooled["item_id"][1], table[5])
    dense = torch.zeros(4, 0)
    torch.testing.assert_close(model.encode_query(pooled, dense), model(dense, _batch())["query"])


def test_counts_update_before_log_q_so_each_positive_has_its_in_batch_share():
    model = _model()
    out = model(torch.zeros(4, 0), _batch())
    assert model.item_counts.tolist()[:10] == [0, 0, 0, 2, 0, 1, 0, 0, 0, 1]
    # log(B * count / total) with B = 4 valid rows and total = 4 after this batch.
    want = torch.log(torch.tensor([2.0, 1.0, 2.0, 1.0]))
    torch.testing.assert_close(out["candidate_log_q"], want)
    model(torch.zeros(4, 0), _batch(items=(3, 3, 3, 3)))
    assert model.item_counts[3].item() == 6 and model.item_counts.sum().item() == 8
    off = _model("model.arch.logq_correction=false")
    assert off(torch.zeros(4, 0), _batch())["candidate_log_q"].abs().sum() == 0


def test_train_module_logs_stats_and_skips_the_loss_in_eval():
    model = _model()
    module = TrainModule(model, guard_non_finite=False)
    batch = Batch(dense=torch.zeros(4, 0), sparse=_batch(), labels=torch.zeros(4, 0), weights=torch.ones(4))
    loss, (task_losses, outputs, _, _) = module(batch)
    assert loss.item() > 0 and task_losses.shape == (1,)
    assert 0.0 <= outputs["stat/inbatch_accuracy"].item() <= 1.0
    assert outputs["stat/temperature"].item() == pytest.approx(0.05)
    want = F.cross_entropy(model.tasks[0].logits(outputs), torch.arange(4))
    torch.testing.assert_close(loss.detach(), want)
    module.eval()
    loss, (task_losses, outputs, _, _) = module(batch)
    assert loss.item() == 0.0 and task_losses.tolist() == [0.0]
    assert not any(k.startswith("stat/") for k in outputs)


def test_padding_batch_gives_zero_loss_and_zero_gradients():
    model = _model("model.arch.learn_temperature=true")
    pad = padding_batch(0, FEATURES, 0, False)
    outputs = model(pad.dense, pad.sparse)
    assert outputs["item_ids"].tolist() == [-1] and not outputs["candidate_valid"].any()
    loss, _ = model.loss(outputs, pad.labels, pad.weights)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())
    assert model.item_counts.sum() == 0


def test_a_learned_temperature_gets_a_gradient_and_stays_in_range():
    model = _model("model.arch.learn_temperature=true", "model.arch.temperature=0.1")
    out = model(torch.zeros(4, 0), _batch())
    assert out["temperature"].item() == pytest.approx(0.1)
    loss, _ = model.loss(out, torch.zeros(4, 0), torch.ones(4))
    loss.backward()
    assert model.temperature.theta.grad.abs().item() > 0
    # far past either bound it stays inside them, and still has a gradient to come back with
    for theta, bound in ((-40.0, 0.005), (40.0, 1.0)):
        with torch.no_grad():
            model.temperature.theta.fill_(theta)
        model.temperature.theta.grad = None
        t = model.temperature(torch.device("cpu"))
        assert t.item() == pytest.approx(bound, rel=1e-6)
    with torch.no_grad():
        model.temperature.theta.fill_(6.0)
    model.temperature(torch.device("cpu")).backward()
    assert model.temperature.theta.grad.item() > 0


def test_dense_columns_join_the_query_input():
    model = _model(num_dense=3)
    assert model.uses_dense
    pooled = model.sparse(_batch()).to_dict()
    dense = torch.randn(4, 3)
    x = model.query_input(pooled, dense)
    assert x.shape == (4, 8 + 8 + 3)
    torch.testing.assert_close(x[:, -3:], dense)


def _catalog() -> ItemCatalog:
    """1000 items; item i has category i % 20."""
    ids = torch.arange(1000)
    return ItemCatalog("mem", ids, {"item_id": (ids.clone(), torch.arange(1001)),
                                    "category": (ids % 20, torch.arange(1001))})


def test_extra_negatives_come_from_the_catalog_through_the_same_towers():
    model = _model("model.arch.extra_negatives=5", 'data.items_path="x"', catalog=_catalog())
    assert not model.pipelineable
    out = model(torch.zeros(4, 0), _batch())
    assert out["candidates"].shape == (9, 8) and out["candidate_valid"].all()
    negatives = out["candidate_ids"][4:]
    rows = model.sampler.__class__("uniform", torch.arange(1000), 1000, 0).sample(5, ItemFrequency(1000))
    assert negatives.tolist() == rows.tolist()  # reproducible: seed 0, call 0
    assert model.sampler.calls.item() == 1
    # A negative's embedding is the candidate tower over its catalog features.
    neg = kjt({"history": [[]] * 5, "item_id": [[i] for i in negatives.tolist()], "user_id": [[]] * 5,
               "category": [[i % 20] for i in negatives.tolist()]}, keys=FEATURES)
    torch.testing.assert_close(out["candidates"][4:], model.encode_candidate(model.sparse(neg).to_dict()))
    # log(B p_j + M s_j): s_j = 1/1000 for every item.
    count = model.item_counts[out["candidate_ids"]].double()
    want = torch.log(4 * count / 4 + 5 / 1000).float()
    torch.testing.assert_close(out["candidate_log_q"], want)
    loss, _ = model.loss(out, torch.zeros(4, 0), torch.ones(4))
    loss.backward()
    assert model.sparse.embedding_bags["t_item"].weight.grad is not None
