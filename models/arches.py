"""Shared building blocks: MLPs and feature interactions."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.precision import dense_input
from models.registry import ArchConfigError, embedding_bag_configs


class MLP(nn.Sequential):
    """[B, in] -> Linear/ReLU(/Dropout) stack -> [B, sizes[-1]]; the last layer is linear (no
    activation, no dropout) when `last_linear`."""

    def __init__(self, in_features: int, sizes: list[int], last_linear: bool = False,
                 device: torch.device | None = None, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        for i, out in enumerate(sizes):
            layers.append(nn.Linear(in_features, out, device=device))
            if not (last_linear and i == len(sizes) - 1):
                layers.append(nn.ReLU())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
            in_features = out
        super().__init__(*layers)

    @property
    def out_features(self) -> int:
        return [m for m in self if isinstance(m, nn.Linear)][-1].out_features


class SparseArch(nn.Module):
    """KeyedJaggedTensor -> pooled embeddings [B, F, E], in `feature_names` order.

    Reads the pooled KeyedTensor by feature name: a sharded collection may return its features
    in another order than the unsharded one (e.g. mixed table-wise/column-wise/data-parallel).
    """

    def __init__(self, ebc: EmbeddingBagCollection, feature_names: list[str]) -> None:
        super().__init__()
        self.embedding_bag_collection = ebc
        self.feature_names = list(feature_names)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.embedding_bag_collection(features).to_dict()
        return dense_input(torch.stack([pooled[f] for f in self.feature_names], dim=1))


class DotInteraction(nn.Module):
    """dense [B, E] and sparse [B, F, E] -> [B, E + F(F+1)/2]: the dense vector plus every
    pairwise dot product among the F+1 vectors (DLRM's interaction)."""

    def __init__(self, num_sparse: int) -> None:
        super().__init__()
        self.num_vectors = num_sparse + 1

    @staticmethod
    def output_dim(num_sparse: int, dim: int) -> int:
        return dim + num_sparse * (num_sparse + 1) // 2

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        stacked = torch.cat([dense.unsqueeze(1), sparse], dim=1)  # [B, F+1, E]
        gram = torch.bmm(stacked, stacked.transpose(1, 2))  # [B, F+1, F+1]
        # Indices built per call (tiny) rather than kept as buffers, which `to_empty` would wipe.
        rows, cols = torch.triu_indices(self.num_vectors, self.num_vectors, offset=1, device=gram.device)
        return torch.cat([dense, gram[:, rows, cols]], dim=1)


class FlatInputArch(nn.Module):
    """dense [B, D] + KJT -> [B, D' + sum of embedding dims]: the dense vector (through an
    optional bottom MLP, D' its last size, or raw D' = D) next to every pooled embedding,
    flattened in `feature_names` order. The input of DCN-v2 and the multi-task models, whose
    tables may have different dims."""

    def __init__(self, num_dense: int, ebc: EmbeddingBagCollection, feature_names: list[str],
                 dense_arch: list[int] | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        self.embedding_bag_collection = ebc
        self.feature_names = list(feature_names)
        self.dense_arch = MLP(num_dense, list(dense_arch), device=device) if dense_arch else None
        dense_out = dense_arch[-1] if dense_arch else num_dense
        dims = {f: t.embedding_dim for t in ebc.embedding_bag_configs() for f in t.feature_names}
        self.out_features = dense_out + sum(dims[f] for f in self.feature_names)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.embedding_bag_collection(sparse).to_dict()
        dense = self.dense_arch(dense) if self.dense_arch is not None else dense
        return torch.cat([dense, dense_input(torch.cat([pooled[f] for f in self.feature_names], dim=1))], dim=1)

    @classmethod
    def over_all_tables(cls, model_cfg, inputs, dense_arch: list[int]) -> "FlatInputArch":
        """On the meta device: one collection over every `model.tables` entry, the dense vector
        through `dense_arch` (empty: raw). `inputs` is the model's ModelInputs."""
        if dense_arch and inputs.num_dense == 0:
            raise ArchConfigError("config key 'model.arch.dense_arch': there are no dense features to feed it; "
                                  "set dense_arch = [] or list data.dense_columns")
        meta = torch.device("meta")
        tables = embedding_bag_configs(model_cfg)
        ebc = EmbeddingBagCollection(tables=tables, is_weighted=inputs.weighted, device=meta)
        return cls(inputs.num_dense, ebc, [f for t in tables for f in t.feature_names], list(dense_arch) or None,
                   device=meta)
