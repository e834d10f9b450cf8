"""The module DMP wraps: batch in, (loss, outputs) out — the shape TrainPipelineSparseDist wants."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from data.batch import Batch
from models.precision import fx_tracing
from models.registry import RecModel
from trainer.errors import RunError
from trainer.precision import DensePrecision, output_to_fp32


class NonFiniteLoss(RunError):
    """A training step's loss is NaN or infinite on some rank (every rank raises it together)."""


class TrainModule(nn.Module):
    """forward(batch) -> (loss [], (task losses [T], outputs {name: [B]}, labels [B, L], weights [B])).

    The loss is the tasks' weighted total; everything in the second element is detached. In
    training, outputs also carry the model's `train_stats` as [] tensors under "stat/<name>"
    (e.g. "stat/inbatch_accuracy", "stat/temperature" for two_tower). A retrieval model's eval
    forward has no candidates to score, so it returns a zero loss (the retrieval evaluator
    ranks the full catalog from the "query" outputs instead). The model runs under `precision`
    (autocast for bf16/fp16; its outputs come back in fp32). With
    `guard_non_finite`, a training forward all-reduces whether the loss is finite and raises
    NonFiniteLoss on every rank before any backward, so no update (fused embedding optimizer
    included: it runs inside backward) ever sees a NaN.
    """

    def __init__(self, model: RecModel, guard_non_finite: bool = True, precision: DensePrecision | None = None) -> None:
        super().__init__()
        self.model = model
        self.guard_non_finite = guard_non_finite
        self.precision = precision or DensePrecision()

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple]:
        with self.precision.forward(self.training):  # autocast (bf16/fp16) for the dense part
            outputs = self.model(batch.dense, batch.sparse)
        outputs = output_to_fp32(outputs)  # loss, metrics and the NaN guard in fp32
        if getattr(self.model, "is_retrieval", False) and not self.training:
            task_losses = batch.weights.new_zeros(len(self.model.tasks))
            loss = task_losses.sum()
        else:
            loss, task_losses = self.model.loss(outputs, batch.labels, batch.weights)
        if self.training and self.guard_non_finite and not fx_tracing():  # (a collective: not traceable)
            self._check_finite(loss, task_losses)
        detached = {k: v.detach() for k, v in outputs.items()}
        if self.training:
            stats = self.model.train_stats(outputs, batch.weights)
            detached.update({f"stat/{k}": v.detach() for k, v in stats.items()})
        return loss, (task_losses.detach(), detached, batch.labels, batch.weights)

    def _check_finite(self, loss: torch.Tensor, task_losses: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            ok = torch.isfinite(task_losses.detach()).tolist()
            bad = [t.name for t, fine in zip(self.model.tasks, ok) if not fine]
            raise NonFiniteLoss(f"the loss is NaN or infinite (tasks {bad or 'on another rank'})")


def train_stats(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's train statistics from a TrainModule's outputs: {"inbatch_accuracy": [], ...}."""
    return {k[5:]: v for k, v in outputs.items() if k.startswith("stat/")}
