"""DCN-v2 (Wang et al., 2021): a cross network of explicit feature crosses beside or below a deep MLP."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.arches import MLP, FlatInputArch
from models.cross import CrossNet
from models.registry import ModelInputs, RecModel, check_dropout, check_layers, register, require
from models.tasks import Task

STRUCTURES = ("stacked", "parallel")


def check_cross(cross_layers: int, low_rank: int, num_experts: int) -> None:
    """The cross-net settings dcn_v2 and dlrm_dcnv2 share."""
    require(cross_layers >= 1, "cross_layers", f"must be an integer >= 1; got {cross_layers}")
    require(low_rank >= 0, "low_rank", f"must be >= 0 (0: full-rank W, r > 0: U·Vᵀ of rank r); got {low_rank}")
    require(num_experts >= 1, "num_experts", f"must be an integer >= 1; got {num_experts}")
    require(num_experts == 1 or low_rank > 0, "num_experts",
            f"a mixture of {num_experts} experts needs low-rank experts; set model.arch.low_rank > 0 "
            f"(e.g. 64) or num_experts = 1")


@dataclass
class DCNv2Config:
    """`[model.arch]` for dcn_v2."""

    # Optional bottom MLP on the dense features before they join the embeddings; [] feeds them raw.
    dense_arch: list[int] = field(default_factory=list)
    cross_layers: int = 3  # cross layers L
    low_rank: int = 0  # 0: full-rank W [N, N]; r > 0: W = U·Vᵀ with U, V [N, r]
    num_experts: int = 1  # > 1: a gated mixture of low-rank experts per layer (DCN-Mix)
    # Deep MLP hidden sizes (Linear/ReLU/Dropout). [] with "stacked": cross network only.
    deep_arch: list[int] = field(default_factory=lambda: [256, 128])
    # "stacked": x0 -> cross -> deep; "parallel": cross(x0) and deep(x0) side by side, concatenated.
    structure: str = "stacked"
    dropout: float = 0.0  # after each hidden ReLU of the deep MLP

    def __post_init__(self) -> None:
        check_layers(self.dense_arch, "dense_arch", allow_empty=True)
        check_cross(self.cross_layers, self.low_rank, self.num_experts)
        check_layers(self.deep_arch, "deep_arch", allow_empty=True)
        require(self.structure in STRUCTURES, "structure",
                f"got {self.structure!r}; use one of {', '.join(STRUCTURES)}")
        require(self.structure != "parallel" or bool(self.deep_arch), "deep_arch",
                "the parallel structure needs a deep MLP beside the cross network; list its sizes, e.g. [256, 128]")
        check_dropout(self.dropout)


@register("dcn_v2", config=DCNv2Config)
class DCNv2(RecModel):
    """
    dense [B, D] (-> dense MLP) --+
                                  +--concat x0 [B, N]
    sparse KJT --EBC--> pooled ---+

    stacked:   x0 --cross net--> [B, N] --deep MLP--> [B, H] --head--> [B, T]
    parallel:  [cross net(x0) [B, N], deep MLP(x0) [B, H]] --concat [B, N + H]--> head --> [B, T]

    N = D' + the sum of the tables' dims (tables may differ in dim). The head is one Linear with
    one output per task: {task name: [B]}.
    """

    def __init__(self, model_cfg, inputs: ModelInputs, tasks: list[Task]) -> None:
        super().__init__(tasks)
        arch: DCNv2Config = model_cfg.arch
        meta = torch.device("meta")
        self.structure = arch.structure
        self.input_arch = FlatInputArch.over_all_tables(model_cfg, inputs, arch.dense_arch)
        n = self.input_arch.out_features
        self.cross = CrossNet(n, arch.cross_layers, arch.low_rank, arch.num_experts, device=meta)
        self.deep = MLP(n, list(arch.deep_arch), device=meta, dropout=arch.dropout) if arch.deep_arch else None
        deep_out = arch.deep_arch[-1] if arch.deep_arch else 0
        head_in = n + deep_out if self.structure == "parallel" else (deep_out or n)
        self.head = nn.Linear(head_in, len(self.tasks), device=meta)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        x0 = self.input_arch(dense, sparse)
        if self.structure == "parallel":
            h = torch.cat([self.cross(x0), self.deep(x0)], dim=1)
        else:
            h = self.cross(x0)
            if self.deep is not None:
                h = self.deep(h)
        return self.split_heads(self.head(h))
