"""MMoE, Multi-gate Mixture-of-Experts (Ma et al., KDD 2018): experts shared by all tasks, and
one softmax gate per task that mixes them into that task's tower input."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from models.multitask import LevelGates, MultiTaskArch, MultiTaskModel, expert, gate, mix
from models.registry import ModelInputs, check_count, check_layers, register
from models.tasks import Task


@dataclass
class MMoEConfig(MultiTaskArch):
    """`[model.arch]` for mmoe (plus dense_arch, tower_arch, dropout)."""

    num_experts: int = 4
    expert_arch: list[int] = field(default_factory=lambda: [64, 32])  # each expert's MLP layer sizes

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.num_experts, "num_experts")
        check_layers(self.expert_arch, "expert_arch")


@register("mmoe", config=MMoEConfig)
class MMoE(MultiTaskModel):
    """
    shared input x [B, N] --expert_e--> [B, H] for e = 1..E
    task k:  g_k = softmax(gate_k(x)) [B, E];  h_k = sum_e g_k[:, e] * expert_e(x);  tower_k(h_k) -> [B]

    `gates[k]` is an nn.Linear(N, E) so DMP initializes it like any other layer.
    """

    def __init__(self, model_cfg, inputs: ModelInputs, tasks: list[Task]) -> None:
        super().__init__(model_cfg, inputs, tasks)
        arch: MMoEConfig = model_cfg.arch
        n = self.input_features
        self.experts = nn.ModuleList(expert(n, arch.expert_arch, arch.dropout) for _ in range(arch.num_experts))
        self.gates = nn.ModuleList(gate(n, arch.num_experts) for _ in self.tasks)
        self.build_towers([arch.expert_arch[-1]] * len(self.tasks), arch.tower_arch, arch.dropout)

    def task_inputs(self, shared: torch.Tensor, gates: list[LevelGates] | None = None) -> list[torch.Tensor]:
        experts = torch.stack([e(shared) for e in self.experts], dim=1)  # [B, E, H]
        mixed, weights = [], {}
        for task, g in zip(self.tasks, self.gates):
            h, w = mix(g(shared), experts)
            mixed.append(h)
            weights[task.name] = w
        if gates is not None:
            gates.append(LevelGates(weights))
        return mixed
