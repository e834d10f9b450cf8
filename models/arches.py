"""Shared building blocks: MLPs and feature interactions."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


class MLP(nn.Sequential):
    """[B, in] -> Linear/ReLU stack -> [B, sizes[-1]]; the last layer is linear when `last_linear`."""

    def __init__(self, in_features: int, sizes: list[int], last_linear: bool = False,
                 device: torch.device | None = None) -> None:
        layers: list[nn.Module] = []
        for i, out in enumerate(sizes):
            layers.append(nn.Linear(in_features, out, device=device))
            if not (last_linear and i == len(sizes) - 1):
                layers.append(nn.ReLU())
            in_features = out
        super().__init__(*layers)


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
        return torch.stack([pooled[f] for f in self.feature_names], dim=1)


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
