"""The module DMP wraps: batch in, (loss, outputs) out — the shape TrainPipelineSparseDist wants."""

from __future__ import annotations

import torch
from torch import nn

from data.batch import Batch
from models.registry import RecModel


class TrainModule(nn.Module):
    """forward(batch) -> (loss [], (loss [], outputs [B, T], labels [B, L], weights [B]))."""

    def __init__(self, model: RecModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        outputs = self.model(batch.dense, batch.sparse)
        loss = self.model.loss(outputs, batch.labels, batch.weights)
        return loss, (loss.detach(), outputs.detach(), batch.labels, batch.weights)
