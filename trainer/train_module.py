"""The module DMP wraps: batch in, (loss, outputs) out — the shape TrainPipelineSparseDist wants."""

from __future__ import annotations

import torch
from torch import nn

from data.batch import Batch
from models.registry import RecModel


class TrainModule(nn.Module):
    """forward(batch) -> (loss [], (task losses [T], outputs {name: [B]}, labels [B, L], weights [B])).

    The loss is the tasks' weighted total; everything in the second element is detached.
    """

    def __init__(self, model: RecModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple]:
        outputs = self.model(batch.dense, batch.sparse)
        loss, task_losses = self.model.loss(outputs, batch.labels, batch.weights)
        detached = {k: v.detach() for k, v in outputs.items()}
        return loss, (task_losses.detach(), detached, batch.labels, batch.weights)
