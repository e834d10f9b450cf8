"""The evaluation loop: every sample of the eval set exactly once across ranks, every task's
metrics, and for multi-task models the serving score that combines them."""

from __future__ import annotations

import torch
from torch import nn

from data.parquet import ParquetStream
from models.metrics import ScoreAUC
from models.tasks import Task, serving_score
from trainer.distributed import all_reduce_max
from trainer.loader import make_loader, padded_batches


@torch.no_grad()
def evaluate(model: nn.Module, tasks: list[Task], stream: ParquetStream, device: torch.device,
             max_batches: int = 0) -> dict:
    """Run `model` (the DMP-wrapped TrainModule) over `stream`; return per-task metrics.

    The first task's metrics are at the top level, so single-task results read
    `{"auc": ..., "logloss": ..., "ne": ..., "calibration": ..., "num_samples": ...}`.
    Multi-task results add `"tasks": {name: metrics}` and `"serving"`: the AUC of the
    serving score (sum of serving_weight x prediction) against each binary task's label.
    """
    was_training = model.training
    model.eval()
    stream.set_epoch(0)
    steps = all_reduce_max(stream.remaining_batches(), device)
    if max_batches:
        steps = min(steps, max_batches)
    metrics = {t.name: t.metrics(device) for t in tasks}
    binary = [t for t in tasks if t.kind == "binary"]
    multi = len(tasks) > 1
    serving = {t.name: ScoreAUC(device) for t in binary} if multi else {}
    for batch in padded_batches(make_loader(stream, device), steps, stream):
        batch = batch.to(device, non_blocking=True)
        _, (_, outputs, labels, weights) = model(batch)
        mask = weights > 0
        for task in tasks:
            task.update_metrics(metrics[task.name], outputs, labels, mask)
        if serving:
            score = serving_score(tasks, outputs)
            for task in binary:
                serving[task.name].update(score, task.label(labels), mask)
    model.train(was_training)
    results = {name: m.compute() for name, m in metrics.items()}
    summary = dict(results[tasks[0].name])
    if multi:
        summary["tasks"] = results
        summary["serving"] = {f"auc_{name}": m.compute() for name, m in serving.items()}
    return summary


class RankingEvaluator:
    """`evaluate` bound to its stream: the Trainer and `rectrain eval` call `evaluator(model)`
    whatever the model family (trainer/retrieval_eval.RetrievalEvaluator is the other one)."""

    def __init__(self, tasks: list[Task], stream: ParquetStream, device: torch.device, max_batches: int = 0) -> None:
        self.tasks = tasks
        self.stream = stream
        self.device = device
        self.max_batches = max_batches

    def __call__(self, model: nn.Module) -> dict:
        return evaluate(model, self.tasks, self.stream, self.device, self.max_batches)

    def report(self, logger, step: int) -> None:
        """Nothing beyond the scalars for ranking models."""


def lookup_metric(metrics: dict, name: str) -> float:
    """`auc` (the first task's), `<task>.<metric>` or `serving.<metric>` from an evaluate()
    result (names are checked at startup by `models.tasks.resolve_metric`)."""
    group, _, key = name.rpartition(".")
    if not group:
        return float(metrics[key])
    if group == "serving":
        return float(metrics["serving"][key])
    return float(metrics["tasks"][group][key] if "tasks" in metrics else metrics[key])


def flatten_metrics(metrics: dict) -> dict[str, float]:
    """{"auc": .., "tasks": {"click": {"auc": ..}}} -> {"auc": .., "click/auc": ..}."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for name, values in metrics.get("tasks", {}).items():
        flat.update({f"{name}/{k}": v for k, v in values.items()})
    flat.update({f"serving/{k}": v for k, v in metrics.get("serving", {}).items()})
    return flat
