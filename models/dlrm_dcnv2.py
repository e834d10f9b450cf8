"""DLRM-DCNv2, the MLPerf Training (v2.0 on) recommendation benchmark's model: DLRM with its dot
interaction replaced by a low-rank DCN-v2 cross network over [bottom MLP output, all embeddings]."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.arches import MLP, FlatInputArch
from models.cross import CrossNet
from models.dcn_v2 import check_cross
from models.dlrm import check_bottom_meets_embeddings
from models.registry import ModelInputs, RecModel, check_dropout, check_layers, register
from models.tasks import Task


@dataclass
class DLRMDCNv2Config:
    """`[model.arch]` for dlrm_dcnv2 (MLPerf: dense_arch [512, 256, 128], cross_layers 3,
    low_rank 512, over_arch [1024, 1024, 512, 256])."""

    dense_arch: list[int] = field(default_factory=lambda: [64, 16])  # bottom MLP; last = embedding_dim
    cross_layers: int = 3  # cross layers of the interaction
    low_rank: int = 64  # rank r of each layer's U·Vᵀ; 0 gives full-rank layers
    num_experts: int = 1  # > 1: a gated mixture of low-rank experts per layer (DCN-Mix)
    over_arch: list[int] = field(default_factory=lambda: [64])  # top MLP hidden sizes (one head per task added)
    dropout: float = 0.0  # after each hidden ReLU of the top MLP

    def __post_init__(self) -> None:
        check_layers(self.dense_arch, "dense_arch", allow_empty=False)
        check_cross(self.cross_layers, self.low_rank, self.num_experts)
        check_layers(self.over_arch, "over_arch", allow_empty=True)
        check_dropout(self.dropout)


@register("dlrm_dcnv2", config=DLRMDCNv2Config)
class DLRMDCNv2(RecModel):
    """
    dense  [B, D] --bottom MLP--> [B, E] --+
                                           +--concat x0 [B, E(F+1)] --cross net--> [B, E(F+1)] --top MLP--> [B, T]
    sparse KJT (F features) --EBC--> F x [B, E]

    Every table has dim E, the bottom MLP's last size (MLPerf: E = 128, F = 26, so N = 3456).
    Outputs one logit (or value) per task: {task name: [B]}.
    """

    def __init__(self, model_cfg, inputs: ModelInputs, tasks: list[Task]) -> None:
        super().__init__(tasks)
        arch: DLRMDCNv2Config = model_cfg.arch
        meta = torch.device("meta")
        check_bottom_meets_embeddings(model_cfg, inputs.num_dense, "dlrm_dcnv2")
        # [bottom MLP(dense), emb_1, ..., emb_F] flattened: [B, E(F+1)]
        self.input_arch = FlatInputArch.over_all_tables(model_cfg, inputs, arch.dense_arch)
        n = self.input_arch.out_features
        self.interaction = CrossNet(n, arch.cross_layers, arch.low_rank, arch.num_experts, device=meta)
        self.over_arch = MLP(n, [*arch.over_arch, len(self.tasks)], last_linear=True, device=meta,
                             dropout=arch.dropout)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        x0 = self.input_arch(dense, sparse)
        return self.split_heads(self.over_arch(self.interaction(x0)))
