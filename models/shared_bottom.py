"""Shared-bottom multi-task model (Caruana, 1997): one MLP shared by every task, then a tower each."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.multitask import LevelGates, MultiTaskArch, MultiTaskModel, expert
from models.registry import ModelInputs, check_layers, register
from models.tasks import Task


@dataclass
class SharedBottomConfig(MultiTaskArch):
    """`[model.arch]` for shared_bottom (plus dense_arch, tower_arch, dropout)."""

    bottom_arch: list[int] = field(default_factory=lambda: [128, 64])  # the shared MLP's layer sizes

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layers(self.bottom_arch, "bottom_arch")


@register("shared_bottom", config=SharedBottomConfig)
class SharedBottom(MultiTaskModel):
    """
    dense [B, D] (-> dense MLP) --+
                                  +--concat [B, N]--> bottom MLP [B, H] --tower_k--> {task k: [B]}
    sparse KJT --EBC--> pooled ---+
    """

    def __init__(self, model_cfg, inputs: ModelInputs, tasks: list[Task]) -> None:
        super().__init__(model_cfg, inputs, tasks)
        arch: SharedBottomConfig = model_cfg.arch
        self.bottom = expert(self.input_features, arch.bottom_arch, arch.dropout)
        self.build_towers([arch.bottom_arch[-1]] * len(self.tasks), arch.tower_arch, arch.dropout)

    def task_inputs(self, shared: torch.Tensor, gates: list[LevelGates] | None = None) -> list[torch.Tensor]:
        h = self.bottom(shared)
        return [h] * len(self.tasks)
