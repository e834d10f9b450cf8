"""Tasks: what a model predicts and how it is scored.

A task reads its output from the model's named outputs (``outputs[task.name]``), its label
from ``Batch.labels[:, task.label_index]``, and owns its loss, its metric objects and its
weight in the training total. Models only produce outputs; the trainer only sums losses and
feeds metrics, so a new kind of task (e.g. in-batch softmax for retrieval) needs no trainer
edit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from models.metrics import BinaryTaskMetrics, RegressionTaskMetrics


class Task(ABC):
    """One prediction head. Subclasses define ``per_sample_loss``, ``predict`` and ``metrics``."""

    kind = ""
    # metric -> True if higher is better, False if lower is, None if neither (no "best")
    metric_names: dict[str, bool | None] = {}

    def __init__(self, name: str, label_index: int, weight: float = 1.0, serving_weight: float = 1.0) -> None:
        self.name = name
        self.label_index = label_index
        self.weight = weight
        self.serving_weight = serving_weight

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, label_index={self.label_index}, weight={self.weight})"

    def output(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs[self.name]

    def label(self, labels: torch.Tensor) -> torch.Tensor:
        return labels[:, self.label_index]

    @abstractmethod
    def per_sample_loss(self, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Loss per sample, [B]."""

    def loss(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted mean over samples; weight-0 (padding) rows contribute nothing, and an
        all-padding batch gives exactly 0."""
        per_sample = self.per_sample_loss(self.output(outputs), self.label(labels).to(weights.dtype))
        return (per_sample * weights).sum() / weights.sum().clamp(min=1.0)

    @abstractmethod
    def predict(self, output: torch.Tensor) -> torch.Tensor:
        """What serving sees: a probability or a value, [B]."""

    @abstractmethod
    def metrics(self, device: torch.device):
        """A fresh metric object with ``update(output, label, mask)`` and ``compute() -> dict``,
        exact across ranks."""

    def update_metrics(self, metrics, outputs: dict[str, torch.Tensor], labels: torch.Tensor,
                       mask: torch.Tensor) -> None:
        metrics.update(self.output(outputs).float(), self.label(labels).float(), mask)


class BinaryTask(Task):
    """A click-like 0/1 label: the output is a logit, the loss binary cross-entropy."""

    kind = "binary"
    metric_names = {"auc": True, "logloss": False, "ne": False, "calibration": None}

    def per_sample_loss(self, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(output, label, reduction="none")

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output.sigmoid()

    def metrics(self, device: torch.device) -> BinaryTaskMetrics:
        return BinaryTaskMetrics(device)


class RegressionTask(Task):
    """A real-valued label (rating, watch time): MSE, or Huber for heavy-tailed targets."""

    kind = "regression"
    metric_names = {"mse": False, "mae": False}

    def __init__(self, name: str, label_index: int, weight: float = 1.0, serving_weight: float = 1.0,
                 loss: str = "mse", huber_delta: float = 1.0) -> None:
        super().__init__(name, label_index, weight, serving_weight)
        self.loss_name = loss
        self.huber_delta = huber_delta

    def per_sample_loss(self, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "huber":
            return F.huber_loss(output, label, reduction="none", delta=self.huber_delta)
        return (output - label) ** 2

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def metrics(self, device: torch.device) -> RegressionTaskMetrics:
        return RegressionTaskMetrics(device)


# Masked logits: large enough that exp() underflows to exactly 0 next to any real logit, finite so
# a row whose every column is masked (a padding row) still gives a finite loss (times weight 0).
MASKED_LOGIT = -1e9


class InBatchSoftmaxTask(Task):
    """Retrieval: a sampled softmax of each query over the training candidates (the batch's
    positives, other ranks' when gathered, extra sampled negatives), its own positive the target.

    Reads the two-tower training outputs: query [B, d], candidates [C, d], temperature [],
    candidate_log_q [C], candidate_ids [C], candidate_valid [C], item_ids [B], positive_index [B].
    Metrics (recall@K ... over the full catalog) come from the retrieval evaluator, not from
    batches, so `metrics()` has none; `metric_names` lists what that evaluator reports.
    """

    kind = "retrieval"

    def __init__(self, name: str, weight: float = 1.0, top_k: Sequence[int] = (10, 50, 100)) -> None:
        super().__init__(name, -1, weight, serving_weight=0.0)
        self.top_k = list(top_k)
        names: dict[str, bool | None] = {}
        for prefix, higher in (("", True), ("popularity_", None)):
            for m in ("recall", "ndcg", "hit_rate"):
                names.update({f"{prefix}{m}@{k}": higher for k in self.top_k})
            names[f"{prefix}mrr"] = higher
        names.update({f"coverage@{k}": None for k in self.top_k})
        self.metric_names = names

    def output(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs["query"]

    def label(self, labels: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"task {self.name!r} is a retrieval task: its positive is the row's item, not a label")

    def logits(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, C] float32: q . c / temperature - log_q, with accidental hits (column c holds row
        b's own item but is not its positive column) and invalid columns set to MASKED_LOGIT."""
        q = outputs["query"].float()
        c = outputs["candidates"].float()
        logits = q @ c.T / outputs["temperature"].float() - outputs["candidate_log_q"].float()[None, :]
        ids, items = outputs["candidate_ids"], outputs["item_ids"]
        cols = torch.arange(c.shape[0], device=c.device)
        hit = (ids[None, :] == items[:, None]) & (cols[None, :] != outputs["positive_index"][:, None])
        return logits.masked_fill(hit | ~outputs["candidate_valid"][None, :], MASKED_LOGIT)

    def per_sample_loss(self, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """output: logits [B, C]; label: positive column [B] int64 -> cross-entropy [B]."""
        return F.cross_entropy(output, label, reduction="none")

    @staticmethod
    def row_weights(outputs: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """Rows without an item (a null id: the reader counts it in null_ids) have no positive to
        learn from: weight 0, like padding."""
        return weights * (outputs["item_ids"] >= 0).to(weights.dtype)

    def loss(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted mean over rows; weight-0 (padding) rows give nothing, an all-padding batch 0."""
        weights = self.row_weights(outputs, weights)
        logits = self.logits(outputs)
        # The step's train stats read the same logits: keep them (detached) for `stats`, keyed by
        # the candidates tensor, so the [B, C] scoring is not done twice per step.
        self._last_logits = (outputs["candidates"], logits.detach())
        per_row = self.per_sample_loss(logits, outputs["positive_index"])
        return (per_row * weights).sum() / weights.sum().clamp(min=1.0)

    @torch.no_grad()
    def stats(self, outputs: dict[str, torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """inbatch_accuracy: weighted share of rows whose best candidate is their positive;
        temperature: the softmax temperature (learned or fixed). Both [] tensors."""
        weights = self.row_weights(outputs, weights)
        cached = getattr(self, "_last_logits", None)
        logits = cached[1] if cached is not None and cached[0] is outputs["candidates"] else self.logits(outputs)
        self._last_logits = None
        hit = (logits.argmax(dim=1) == outputs["positive_index"]).to(weights.dtype)
        return {"inbatch_accuracy": (hit * weights).sum() / weights.sum().clamp(min=1.0),
                "temperature": outputs["temperature"].detach().float()}

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def metrics(self, device: torch.device):
        raise TypeError(f"task {self.name!r} is a retrieval task: it is evaluated over the full item catalog by "
                        f"the retrieval evaluator, not batch by batch")

    def update_metrics(self, metrics, outputs, labels, mask) -> None:
        raise TypeError(f"task {self.name!r} is a retrieval task: no per-batch metrics")


def build_tasks(task_cfgs: Sequence[Any], label_names: Sequence[str]) -> list[Task]:
    """Tasks from `model.tasks` (duck-typed TaskConfig); labels are looked up by column name
    (retrieval tasks have none: label_index -1). No task configs: one binary task per label column."""
    if not task_cfgs:
        return [BinaryTask(name, i) for i, name in enumerate(label_names)]
    tasks: list[Task] = []
    for cfg in task_cfgs:
        if cfg.kind == "retrieval":
            tasks.append(InBatchSoftmaxTask(cfg.name, cfg.weight, list(getattr(cfg, "top_k", None) or [10, 50, 100])))
            continue
        index = list(label_names).index(cfg.label or cfg.name)
        if cfg.kind == "binary":
            tasks.append(BinaryTask(cfg.name, index, cfg.weight, cfg.serving_weight))
        else:
            tasks.append(RegressionTask(cfg.name, index, cfg.weight, cfg.serving_weight, cfg.loss or "mse",
                                        cfg.huber_delta))
    return tasks


def total_loss(tasks: Sequence[Task], outputs: dict[str, torch.Tensor], labels: torch.Tensor,
               weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weight x task loss, the unweighted task losses [T])."""
    losses = torch.stack([t.loss(outputs, labels, weights) for t in tasks])
    coeffs = torch.tensor([t.weight for t in tasks], dtype=losses.dtype, device=losses.device)
    return (losses * coeffs).sum(), losses


def serving_score(tasks: Sequence[Task], outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over tasks of serving_weight x prediction, [B]: the one number a multi-task ranker
    sorts candidates by."""
    parts = [t.serving_weight * t.predict(t.output(outputs).float()) for t in tasks if t.serving_weight]
    if not parts:
        raise ValueError("config key 'model.tasks': every serving_weight is 0; give at least one task a weight")
    return torch.stack(parts).sum(dim=0)


def resolve_metric(tasks: Sequence[Task], name: str) -> bool:
    """Check that `name` (`auc`, `<task>.<metric>`, `serving.auc_<task>`) is a metric the
    evaluation reports; return True if higher is better. Raises ValueError naming the fix."""
    group, _, key = name.rpartition(".")
    by_name = {t.name: t for t in tasks}
    def ranked(task: Task) -> list[str]:
        return [m for m, higher in task.metric_names.items() if higher is not None]

    options = [*ranked(tasks[0]), *(f"{t.name}.{m}" for t in tasks for m in ranked(t))]
    if len(tasks) > 1:
        options += [f"serving.auc_{t.name}" for t in tasks if t.kind == "binary"]
    if group == "serving" and name in options:
        return True
    task = by_name.get(group) if group else tasks[0]
    direction = task.metric_names.get(key) if task is not None else None
    if direction is None:
        raise ValueError(f"config key 'eval.best_metric': {name!r} is not a metric this model reports "
                         f"(or has no better direction); use one of {', '.join(options)}")
    return direction
