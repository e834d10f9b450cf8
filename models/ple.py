"""PLE, Progressive Layered Extraction (Tang et al., RecSys 2020).

A stack of `num_levels` CGC (Customized Gate Control) levels. Each level has
`num_task_experts` experts per task and `num_shared_experts` shared ones. Task k's gate mixes
its own experts and the shared ones; below the top level a shared gate mixes every expert of
the level. The next level reads the gated outputs: task k's experts and gate take task k's
mixture, the shared experts and gate take the shared mixture. The top level's task mixtures
feed one tower per task. One level is plain CGC.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from models.multitask import LevelGates, MultiTaskArch, MultiTaskModel, expert, gate, mix
from models.registry import ModelInputs, check_count, check_layers, register
from models.tasks import Task


@dataclass
class PLEConfig(MultiTaskArch):
    """`[model.arch]` for ple (plus dense_arch, tower_arch, dropout)."""

    num_levels: int = 2
    num_task_experts: int = 2  # experts of each task, per level
    num_shared_experts: int = 2  # shared experts, per level
    expert_arch: list[int] = field(default_factory=lambda: [64, 32])  # every expert's MLP layer sizes

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.num_levels, "num_levels")
        check_count(self.num_task_experts, "num_task_experts")
        check_count(self.num_shared_experts, "num_shared_experts")
        check_layers(self.expert_arch, "expert_arch")


class CGCLevel(nn.Module):
    """One extraction level for T tasks.

    Inputs: one [B, N_k] per task and the shared [B, N_s]. Outputs: one [B, H] mixture per task
    and, when `shared_gate`, the shared mixture [B, H]. Gate weights are ordered as the experts
    are stacked: a task gate sees [its experts, shared experts]; the shared gate sees
    [task 0's experts, ..., task T-1's experts, shared experts].
    """

    def __init__(self, task_in: list[int], shared_in: int, num_task_experts: int, num_shared_experts: int,
                 expert_arch: list[int], dropout: float, shared_gate: bool) -> None:
        super().__init__()
        self.task_experts = nn.ModuleList(
            nn.ModuleList(expert(n, expert_arch, dropout) for _ in range(num_task_experts)) for n in task_in
        )
        self.shared_experts = nn.ModuleList(expert(shared_in, expert_arch, dropout) for _ in range(num_shared_experts))
        self.task_gates = nn.ModuleList(gate(n, num_task_experts + num_shared_experts) for n in task_in)
        total = len(task_in) * num_task_experts + num_shared_experts
        self.shared_gate = gate(shared_in, total) if shared_gate else None

    def forward(self, task_x: list[torch.Tensor], shared_x: torch.Tensor
                ) -> tuple[list[torch.Tensor], torch.Tensor | None, list[torch.Tensor], torch.Tensor | None]:
        """(task mixtures, shared mixture or None, task gate weights, shared gate weights or None)."""
        shared_out = torch.stack([e(shared_x) for e in self.shared_experts], dim=1)  # [B, S, H]
        own_out = [torch.stack([e(x) for e in experts], dim=1) for experts, x in zip(self.task_experts, task_x)]
        mixed, weights = [], []
        for own, g, x in zip(own_out, self.task_gates, task_x):
            h, w = mix(g(x), torch.cat([own, shared_out], dim=1))
            mixed.append(h)
            weights.append(w)
        if self.shared_gate is None:
            return mixed, None, weights, None
        h, w = mix(self.shared_gate(shared_x), torch.cat([*own_out, shared_out], dim=1))
        return mixed, h, weights, w


@register("ple", config=PLEConfig)
class PLE(MultiTaskModel):
    """
    shared input x [B, N] -> level 1 (tasks' inputs and shared input all x) -> ... -> level L
    -> task k's mixture [B, H] --tower_k--> [B]
    """

    def __init__(self, model_cfg, inputs: ModelInputs, tasks: list[Task]) -> None:
        super().__init__(model_cfg, inputs, tasks)
        arch: PLEConfig = model_cfg.arch
        width, hidden, num_tasks = self.input_features, arch.expert_arch[-1], len(self.tasks)
        self.levels = nn.ModuleList()
        for level in range(arch.num_levels):
            n = width if level == 0 else hidden
            self.levels.append(CGCLevel([n] * num_tasks, n, arch.num_task_experts, arch.num_shared_experts,
                                        arch.expert_arch, arch.dropout, shared_gate=level < arch.num_levels - 1))
        self.build_towers([hidden] * num_tasks, arch.tower_arch, arch.dropout)

    def task_inputs(self, shared: torch.Tensor, gates: list[LevelGates] | None = None) -> list[torch.Tensor]:
        task_x: list[torch.Tensor] = [shared] * len(self.tasks)
        shared_x = shared
        for level in self.levels:
            task_x, shared_x, task_w, shared_w = level(task_x, shared_x)
            if gates is not None:
                gates.append(LevelGates({t.name: w for t, w in zip(self.tasks, task_w)}, shared_w))
        return task_x
