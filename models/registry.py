"""Model registry and the contract every model keeps with the trainer.

A model is an ``nn.Module`` built on the meta device (DistributedModelParallel materializes
it) with:

- ``forward(dense: Tensor[B, D], sparse: KeyedJaggedTensor) -> Tensor[B, T]``: one output per
  task,
- ``tasks``: the T tasks in output order, each naming its label column and kind,
- ``loss(outputs, labels, weights) -> Tensor[]``: per task the weighted mean over samples
  (weight 0 marks padding rows), summed over tasks.

Builders receive the model config (``model.*`` of the run config, duck-typed so that this
package never imports the trainer) and a :class:`ModelInputs` describing the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType


@dataclass(frozen=True)
class Task:
    """One prediction head. `label_index` is the column of `Batch.labels` it learns from."""

    name: str
    label_index: int
    kind: str = "binary"  # binary: BCE on logits; regression: MSE


@dataclass(frozen=True)
class ModelInputs:
    num_dense: int
    label_names: tuple[str, ...]
    weighted: bool = False  # per-id weights present in the KeyedJaggedTensor


class RecModel(nn.Module):
    """Base class: holds the tasks and implements the weighted per-task loss."""

    tasks: list[Task]

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        denom = weights.sum().clamp(min=1.0)
        total = outputs.new_zeros(())
        for i, task in enumerate(self.tasks):
            y = labels[:, task.label_index]
            if task.kind == "binary":
                per_sample = F.binary_cross_entropy_with_logits(outputs[:, i], y, reduction="none")
            else:
                per_sample = (outputs[:, i] - y) ** 2
            total = total + (per_sample * weights).sum() / denom
        return total

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        """Probabilities for binary tasks, raw values for regression; [B, T]."""
        cols = [outputs[:, i].sigmoid() if t.kind == "binary" else outputs[:, i] for i, t in enumerate(self.tasks)]
        return torch.stack(cols, dim=1)


Builder = Callable[[Any, ModelInputs], RecModel]
MODELS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def wrap(builder: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = builder
        return builder

    return wrap


def build_model(model_cfg: Any, inputs: ModelInputs) -> RecModel:
    """Build `model_cfg.name` on the meta device."""
    if model_cfg.name not in MODELS:
        raise ValueError(f"config key 'model.name': unknown model {model_cfg.name!r}; "
                         f"registered models are {', '.join(sorted(MODELS))}")
    return MODELS[model_cfg.name](model_cfg, inputs)


def embedding_bag_configs(model_cfg: Any) -> list[EmbeddingBagConfig]:
    """TorchRec table configs from `model.tables`."""
    pooling = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
    return [
        EmbeddingBagConfig(
            name=t.name,
            embedding_dim=t.embedding_dim or model_cfg.embedding_dim,
            num_embeddings=t.num_embeddings,
            feature_names=list(t.features),
            pooling=pooling[t.pooling],
        )
        for t in model_cfg.tables
    ]
