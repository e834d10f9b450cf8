"""DLRM (Naumov et al., 2019): bottom MLP, sharded embedding tables, dot interaction, top MLP."""

from __future__ import annotations

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.arches import MLP, DotInteraction, SparseArch
from models.registry import ModelInputs, RecModel, Task, embedding_bag_configs, register


class DLRM(RecModel):
    """
    dense  [B, D] --bottom MLP--> [B, E] --+
                                            +--dot interaction--> [B, E + F(F+1)/2] --top MLP--> [B, T]
    sparse KJT (F features) --EBC--> [B, F, E]

    All tables share the embedding dim E, which must equal the bottom MLP's last size.
    """

    def __init__(self, model_cfg, inputs: ModelInputs) -> None:
        super().__init__()
        meta = torch.device("meta")
        tables = embedding_bag_configs(model_cfg)
        dim = model_cfg.embedding_dim
        for i, t in enumerate(tables):
            if t.embedding_dim != dim:
                raise ValueError(f"config key 'model.tables[{i}].embedding_dim': dlrm's dot interaction needs "
                                 f"every table at model.embedding_dim={dim}; got {t.embedding_dim}")
        if model_cfg.dense_arch[-1] != dim:
            raise ValueError(f"config key 'model.dense_arch': the last size ({model_cfg.dense_arch[-1]}) must "
                             f"equal model.embedding_dim ({dim}) for the dot interaction")
        if inputs.num_dense == 0:
            raise ValueError("config key 'data.dense_columns': dlrm needs at least one dense column")
        features = [f for t in tables for f in t.feature_names]
        self.tasks = [Task(name, i) for i, name in enumerate(inputs.label_names)]
        self.dense_arch = MLP(inputs.num_dense, list(model_cfg.dense_arch), device=meta)
        self.sparse_arch = SparseArch(
            EmbeddingBagCollection(tables=tables, is_weighted=inputs.weighted, device=meta), features
        )
        self.interaction = DotInteraction(len(features))
        over_in = DotInteraction.output_dim(len(features), dim)
        self.over_arch = MLP(over_in, [*model_cfg.over_arch, len(self.tasks)], last_linear=True, device=meta)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        embedded_dense = self.dense_arch(dense)
        embedded_sparse = self.sparse_arch(sparse)
        return self.over_arch(self.interaction(embedded_dense, embedded_sparse))


@register("dlrm")
def build_dlrm(model_cfg, inputs: ModelInputs) -> DLRM:
    return DLRM(model_cfg, inputs)
