"""The module DMP wraps: batch in, (loss, outputs) out — the shape TrainPipelineSparseDist wants."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from data.batch import Batch
from models.registry import RecModel
from trainer.errors import RunError


class NonFiniteLoss(RunError):
    """A training step's loss is NaN or infinite on some rank (every rank raises it together)."""


class TrainModule(nn.Module):
    """forward(batch) -> (loss [], (task losses [T], outputs {name: [B]}, labels [B, L], weights [B])).

    The loss is the tasks' weighted total; everything in the second element is detached. With
    `guard_non_finite`, a training forward all-reduces whether the loss is finite and raises
    NonFiniteLoss on every rank before any backward, so no update (fused embedding optimizer
    included: it runs inside backward) ever sees a NaN.
    """

    def __init__(self, model: RecModel, guard_non_finite: bool = True) -> None:
        super().__init__()
        self.model = model
        self.guard_non_finite = guard_non_finite

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple]:
        outputs = self.model(batch.dense, batch.sparse)
        loss, task_losses = self.model.loss(outputs, batch.labels, batch.weights)
        if self.training and self.guard_non_finite:
            self._check_finite(loss, task_losses)
        detached = {k: v.detach() for k, v in outputs.items()}
        return loss, (task_losses.detach(), detached, batch.labels, batch.weights)

    def _check_finite(self, loss: torch.Tensor, task_losses: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            ok = torch.isfinite(task_losses.detach()).tolist()
            bad = [t.name for t, fine in zip(self.model.tasks, ok) if not fine]
            raise NonFiniteLoss(f"the loss is NaN or infinite (tasks {bad or 'on another rank'})")
