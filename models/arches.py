"""Shared building blocks: MLPs and feature interactions."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from models.precision import dense_input, fx_tracing
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
        flat = pooled_in_order(self.embedding_bag_collection(features), self.feature_names)  # [B, F * E]
        return dense_input(flat.reshape(flat.shape[0], len(self.feature_names), -1))


def pooled_in_order(pooled: KeyedTensor, feature_names: list[str]) -> torch.Tensor:
    """A pooled KeyedTensor -> [B, sum of the features' dims], features in `feature_names` order.

    In that order already, this is the collection's own buffer (no copy). A sharded collection
    returns its features grouped by sharding, so usually one gather reorders them: splitting
    per feature and concatenating again would cost a copy per feature forward and backward,
    about 10 ms a step for DLRM's 26 x 64 floats x 2048 rows on one core.
    """
    if fx_tracing():
        per_feature = pooled.to_dict()
        return torch.cat([per_feature[f] for f in feature_names], dim=1)
    keys, values = list(pooled.keys()), pooled.values()
    if keys == feature_names:
        return values
    dims = tuple(pooled.length_per_key())
    batch = values.shape[0]
    if len(set(dims)) == 1:  # uniform dims: reorder whole [E] blocks
        order, inverse = _order_index(tuple(keys), dims, tuple(feature_names), values.device)
        return _gather(values.reshape(batch, len(keys), dims[0]), order, inverse).reshape(batch, -1)
    return _gather(values, *_order_index(tuple(keys), dims, tuple(feature_names), values.device))


def _gather(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor | None) -> torch.Tensor:
    """x.index_select(1, order); when `order` is a permutation (`inverse` given), its gradient
    is the gather with the inverse permutation. index_select's own backward zero-fills a
    gradient of x's size and scatter-adds into it: for DLRM's pooled embeddings (2,048 x 26 x
    64 floats) 8.6 ms a step on one core, where the gather takes about 2."""
    if inverse is None:
        return x.index_select(1, order)
    return _PermuteColumns.apply(x, order, inverse)


class _PermuteColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.inverse = inverse  # a cached constant of the layout, not an activation
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.index_select(1, ctx.inverse), None, None


_ORDERS: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}


def _order_index(keys: tuple[str, ...], dims: tuple[int, ...], wanted: tuple[str, ...],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """int64: with uniform dims, [F] positions in `keys` of each of `wanted`; otherwise the
    [sum of dims] columns that put `wanted`'s blocks in order; and, when that is a permutation
    (`wanted` names every key once), its inverse, else None (cached: the layout is fixed)."""
    cache_key = (keys, dims, wanted, str(device))
    if cache_key not in _ORDERS:
        if len(set(dims)) == 1:
            where = {k: i for i, k in enumerate(keys)}
            index = torch.tensor([where[f] for f in wanted], dtype=torch.int64)
        else:
            starts = dict(zip(keys, (sum(dims[:i]) for i in range(len(dims)))))
            sizes = dict(zip(keys, dims))
            index = torch.cat([torch.arange(starts[f], starts[f] + sizes[f]) for f in wanted])
        inverse = None
        if sorted(wanted) == sorted(keys) and len(set(wanted)) == len(wanted):
            inverse = torch.empty_like(index)
            inverse[index] = torch.arange(len(index))
            inverse = inverse.to(device)
        _ORDERS[cache_key] = (index.to(device), inverse)
    return _ORDERS[cache_key]


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
        n = self.num_vectors
        # Indices built per call (tiny) rather than kept as buffers, which `to_empty` would wipe.
        rows, cols = torch.triu_indices(n, n, offset=1, device=stacked.device)
        if torch.is_grad_enabled() and stacked.requires_grad and not fx_tracing():
            pairs = _PairwiseDots.apply(stacked, rows * n + cols)
        else:  # inference, tracing and export: plain ops
            pairs = torch.bmm(stacked, stacked.transpose(1, 2))[:, rows, cols]
        return torch.cat([dense, pairs], dim=1)


class _PairwiseDots(torch.autograd.Function):
    """stacked [B, N, E], flat upper-triangle positions [P] -> the P pairwise dots [B, P].

    The same values as bmm(x, x^T)[:, rows, cols], with a cheaper backward: autograd would run
    two bmms, add a transposed [B, N, E] gradient into a contiguous one and scatter with
    accumulation. Here the [B, P] gradient is placed into a symmetric [B, N, N] matrix S and
    grad x = S @ x: one bmm (d(x_i.x_j)/dx_i = x_j, so row i of S gathers every partner of i).
    """

    @staticmethod
    def forward(ctx, stacked: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(stacked, flat)
        gram = torch.bmm(stacked, stacked.transpose(1, 2))
        return gram.flatten(1).index_select(1, flat)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        stacked, flat = ctx.saved_tensors
        b, n, _ = stacked.shape
        upper = grad.new_zeros(b, n * n).index_copy_(1, flat, grad.contiguous()).view(b, n, n)
        sym = upper + upper.transpose(1, 2)
        return torch.bmm(sym.to(stacked.dtype), stacked), None


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
        pooled = pooled_in_order(self.embedding_bag_collection(sparse), self.feature_names)
        dense = self.dense_arch(dense) if self.dense_arch is not None else dense
        return torch.cat([dense, dense_input(pooled)], dim=1)

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
