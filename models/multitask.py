"""Shared pieces of the multi-task models (shared_bottom, mmoe, ple).

All three read the same shared input: one EmbeddingBagCollection over every table (sharded by
DistributedModelParallel) pooled per feature and concatenated with the dense vector (optionally
through a bottom MLP), i.e. :class:`~models.arches.FlatInputArch`, [B, N]. What differs is how
that input becomes one representation per task; every model ends in one tower MLP per task, in
the order of ``model.tasks``, each giving a [B] logit (binary task) or value (regression task).

Everything is built on the meta device from ``nn.Linear`` layers (experts, gates, towers), so
DMP's ``to_empty()`` + ``reset_parameters()`` initializes every parameter.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.arches import MLP, FlatInputArch
from models.registry import ModelInputs, RecModel, check_dropout, check_layers
from models.tasks import Task

META = torch.device("meta")


@dataclass
class MultiTaskArch:
    """`[model.arch]` settings every multi-task model has."""

    # Optional bottom MLP on the dense features before they join the embeddings; [] feeds them raw.
    dense_arch: list[int] = field(default_factory=list)
    # Hidden sizes of each task's tower; a final Linear(., 1) is added per task.
    tower_arch: list[int] = field(default_factory=lambda: [32])
    # Dropout after each hidden ReLU of the experts / shared bottom and towers.
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_layers(self.dense_arch, "dense_arch", allow_empty=True)
        check_layers(self.tower_arch, "tower_arch", allow_empty=True)
        check_dropout(self.dropout)


# --------------------------------------------------------------------------- building blocks


def expert(in_features: int, sizes: list[int], dropout: float) -> MLP:
    """One expert (or shared bottom): Linear/ReLU(/Dropout) layers, [B, in] -> [B, sizes[-1]]."""
    return MLP(in_features, list(sizes), device=META, dropout=dropout)


def gate(in_features: int, num_experts: int) -> nn.Linear:
    """A gate's logits over `num_experts` experts; softmax turns them into mixing weights."""
    return nn.Linear(in_features, num_experts, device=META)


def mix(gate_logits: torch.Tensor, expert_outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate logits [B, E] and stacked expert outputs [B, E, H] -> (sum_e g_e * expert_e [B, H],
    the weights g [B, E]: softmax over the experts, non-negative and summing to 1 per sample)."""
    weights = torch.softmax(gate_logits, dim=-1)
    return torch.bmm(weights.unsqueeze(1), expert_outputs).squeeze(1), weights


@dataclass
class LevelGates:
    """The gate weights of one level of experts: per task [B, E_task] (its experts, then the
    shared ones), and the shared gate's [B, E_all] where the level has one (PLE below the top)."""

    tasks: dict[str, torch.Tensor]
    shared: torch.Tensor | None = None


class MultiTaskModel(RecModel, metaclass=ABCMeta):
    """The shared input arch and the per-task towers; subclasses turn the shared input [B, N]
    into one [B, H_k] input per task (`task_inputs`)."""

    towers: nn.ModuleList

    def __init__(self, model_cfg, inputs: ModelInputs, tasks: list[Task]) -> None:
        super().__init__(tasks)
        arch: MultiTaskArch = model_cfg.arch
        self.input_arch = FlatInputArch.over_all_tables(model_cfg, inputs, arch.dense_arch)

    @property
    def input_features(self) -> int:
        """N: the width of the shared input."""
        return self.input_arch.out_features

    def build_towers(self, in_features: list[int], tower_arch: list[int], dropout: float) -> None:
        """One tower per task (`in_features[k]` wide for task k) ending in Linear(., 1)."""
        self.towers = nn.ModuleList(
            MLP(n, [*tower_arch, 1], last_linear=True, device=META, dropout=dropout) for n in in_features
        )

    @abstractmethod
    def task_inputs(self, shared: torch.Tensor, gates: list | None = None) -> list[torch.Tensor]:
        """Shared input [B, N] -> one tower input per task, in task order. When `gates` is a
        list, one :class:`LevelGates` per level of experts is appended to it."""

    def heads(self, task_inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {t.name: tower(h).squeeze(-1) for t, tower, h in zip(self.tasks, self.towers, task_inputs)}

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return self.heads(self.task_inputs(self.input_arch(dense, sparse)))

    def forward_with_gates(self, dense: torch.Tensor,
                           sparse: KeyedJaggedTensor) -> tuple[dict[str, torch.Tensor], list[LevelGates]]:
        """(the outputs of `forward`, the gate weights of each level, bottom first; none for a
        shared bottom). For inspection and tests: `forward` keeps nothing."""
        gates: list[LevelGates] = []
        outputs = self.heads(self.task_inputs(self.input_arch(dense, sparse), gates))
        return outputs, gates
