"""models/tasks.py: tasks built from config, the serving score, metric names and directions."""

from __future__ import annotations

import pytest
import torch

from models.tasks import BinaryTask, RegressionTask, build_tasks, resolve_metric, serving_score
from trainer.config import TaskConfig


def _cfg(**kw) -> TaskConfig:
    cfg = TaskConfig(**kw)
    cfg.validate("model.tasks[0]")
    return cfg


def test_default_is_one_binary_task_per_label():
    tasks = build_tasks([], ("click", "buy"))
    assert [(type(t), t.name, t.label_index) for t in tasks] == [(BinaryTask, "click", 0), (BinaryTask, "buy", 1)]


def test_tasks_find_their_label_column_by_name():
    tasks = build_tasks([_cfg(name="stars", label="rating", kind="regression", loss="huber", huber_delta=0.5,
                              weight=0.2), _cfg(name="click")], ("click", "rating"))
    stars, click = tasks
    assert isinstance(stars, RegressionTask) and stars.label_index == 1 and stars.weight == 0.2
    assert (stars.loss_name, stars.huber_delta) == ("huber", 0.5)
    assert isinstance(click, BinaryTask) and click.label_index == 0
    labels = torch.tensor([[1.0, 4.5], [0.0, 2.0]])
    torch.testing.assert_close(stars.label(labels), torch.tensor([4.5, 2.0]))


def test_serving_score_is_the_weighted_sum_of_predictions():
    tasks = [BinaryTask("click", 0, serving_weight=1.0), BinaryTask("like", 1, serving_weight=0.5),
             RegressionTask("watch", 2, serving_weight=0.1), BinaryTask("skip", 3, serving_weight=0.0)]
    outputs = {"click": torch.tensor([0.0, 2.0]), "like": torch.tensor([1.0, -1.0]),
               "watch": torch.tensor([3.0, 10.0]), "skip": torch.tensor([100.0, -100.0])}
    want = torch.sigmoid(outputs["click"]) + 0.5 * torch.sigmoid(outputs["like"]) + 0.1 * outputs["watch"]
    torch.testing.assert_close(serving_score(tasks, outputs), want)
    with pytest.raises(ValueError, match="serving_weight"):
        serving_score([BinaryTask("a", 0, serving_weight=0.0)], outputs | {"a": torch.zeros(2)})


@pytest.mark.parametrize("name, higher", [("auc", True), ("logloss", False), ("click.ne", False),
                                          ("watch.mse", False), ("serving.auc_click", True)])
def test_resolve_metric_direction(name, higher):
    tasks = [BinaryTask("click", 0), RegressionTask("watch", 1)]
    assert resolve_metric(tasks, name) is higher


@pytest.mark.parametrize("name", ["accuracy", "click.mse", "watch.auc", "nope.auc", "calibration",
                                  "serving.auc_watch"])
def test_resolve_metric_rejects_what_the_eval_does_not_report(name):
    tasks = [BinaryTask("click", 0), RegressionTask("watch", 1)]
    with pytest.raises(ValueError) as e:
        resolve_metric(tasks, name)
    assert "eval.best_metric" in str(e.value) and "click.auc" in str(e.value)


def test_single_task_has_no_serving_metric():
    with pytest.raises(ValueError):
        resolve_metric([BinaryTask("label", 0)], "serving.auc_label")
    assert resolve_metric([BinaryTask("label", 0)], "label.auc") is True
