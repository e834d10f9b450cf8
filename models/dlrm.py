"""DLRM (Naumov et al., 2019): bottom MLP, sharded embedding tables, dot interaction, top MLP."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.arches import MLP, DotInteraction, SparseArch
from models.registry import (ArchConfigError, ModelInputs, RecModel, check_dropout, check_layers, embedding_bag_configs,
                             register)
from models.tasks import Task


@dataclass
class DLRMConfig:
    """`[model.arch]` for dlrm."""

    dense_arch: list[int] = field(default_factory=lambda: [64, 16])  # bottom MLP; last = embedding_dim
    over_arch: list[int] = field(default_factory=lambda: [64])  # top MLP hidden sizes (one head per task added)
    dropout: float = 0.0  # after each hidden ReLU of the top MLP

    def __post_init__(self) -> None:
        check_layers(self.dense_arch, "dense_arch")
        check_layers(self.over_arch, "over_arch", allow_empty=True)
        check_dropout(self.dropout)


def check_uniform_dim(model_cfg, name: str) -> int:
    """Interactions that combine embeddings need every table at model.embedding_dim."""
    dim = model_cfg.embedding_dim
    for i, t in enumerate(model_cfg.tables):
        if (t.embedding_dim or dim) != dim:
            raise ArchConfigError(f"config key 'model.tables[{i}].embedding_dim': {name} needs every table at "
                                  f"model.embedding_dim={dim}; got {t.embedding_dim}")
    return dim


def check_bottom_meets_embeddings(model_cfg, num_dense: int, name: str) -> int:
    """DLRM-style interactions combine the bottom MLP's output with every embedding: all must
    share model.embedding_dim E, and there must be dense columns to feed the bottom MLP. Returns E."""
    dim = check_uniform_dim(model_cfg, f"{name}'s interaction")
    last = model_cfg.arch.dense_arch[-1]
    if last != dim:
        raise ArchConfigError(f"config key 'model.arch.dense_arch': the last size ({last}) must equal "
                              f"model.embedding_dim ({dim}), the width of every vector {name}'s interaction combines")
    if num_dense == 0:
        raise ArchConfigError(f"config key 'data.dense_columns': {name} needs at least one dense column")
    return dim


@register("dlrm", config=DLRMConfig)
class DLRM(RecModel):
    """
    dense  [B, D] --bottom MLP--> [B, E] --+
                                            +--dot interaction--> [B, E + F(F+1)/2] --top MLP--> [B, T]
    sparse KJT (F features) --EBC--> [B, F, E]

    All tables share the embedding dim E, which must equal the bottom MLP's last size.
    Outputs one logit (or value) per task: {task name: [B]}.
    """

    def __init__(self, model_cfg, inputs: ModelInputs, tasks: list[Task]) -> None:
        super().__init__(tasks)
        arch: DLRMConfig = model_cfg.arch
        meta = torch.device("meta")
        dim = check_bottom_meets_embeddings(model_cfg, inputs.num_dense, "dlrm")
        tables = embedding_bag_configs(model_cfg)
        features = [f for t in tables for f in t.feature_names]
        self.dense_arch = MLP(inputs.num_dense, list(arch.dense_arch), device=meta)
        self.sparse_arch = SparseArch(
            EmbeddingBagCollection(tables=tables, is_weighted=inputs.weighted, device=meta), features
        )
        self.interaction = DotInteraction(len(features))
        over_in = DotInteraction.output_dim(len(features), dim)
        self.over_arch = MLP(over_in, [*arch.over_arch, len(self.tasks)], last_linear=True, device=meta,
                             dropout=arch.dropout)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        embedded_dense = self.dense_arch(dense)
        embedded_sparse = self.sparse_arch(sparse)
        return self.split_heads(self.over_arch(self.interaction(embedded_dense, embedded_sparse)))
