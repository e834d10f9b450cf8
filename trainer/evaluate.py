"""The evaluation loop: every sample of the eval set exactly once across ranks."""

from __future__ import annotations

import torch
from torch import nn

from data.parquet import ParquetStream
from trainer.distributed import all_reduce_max
from trainer.loader import make_loader, padded_batches
from trainer.metrics import metrics_for


@torch.no_grad()
def evaluate(model: nn.Module, tasks, stream: ParquetStream, device: torch.device, max_batches: int = 0) -> dict:
    """Run `model` (the DMP-wrapped TrainModule) over `stream`; return per-task metrics.

    The first task's metrics are also at the top level, so single-task results read
    `{"auc": ..., "logloss": ..., "ne": ..., "calibration": ..., "num_samples": ...}`.
    """
    was_training = model.training
    model.eval()
    stream.set_epoch(0)
    steps = all_reduce_max(stream.remaining_batches(), device)
    if max_batches:
        steps = min(steps, max_batches)
    metrics = [metrics_for(t.kind, device) for t in tasks]
    for batch in padded_batches(make_loader(stream, device), steps, stream):
        batch = batch.to(device, non_blocking=True)
        _, (_, outputs, labels, weights) = model(batch)
        mask = weights > 0
        for i, (task, metric) in enumerate(zip(tasks, metrics)):
            metric.update(outputs[:, i].float(), labels[:, task.label_index], mask)
    results = {t.name: m.compute() for t, m in zip(tasks, metrics)}
    model.train(was_training)
    summary = dict(results[tasks[0].name])
    if len(tasks) > 1:
        summary["tasks"] = results
    return summary
