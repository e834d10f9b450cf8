"""Pieces shared by the factorization-machine family (DeepFM, Wide&Deep).

- :func:`fm_second_order` / :func:`fm_interaction`: the FM pairwise term
  ``sum_{i<j} <v_i, v_j>`` over N field vectors in O(N E) with Rendle's identity
  ``1/2 sum_k [(sum_i v_ik)^2 - sum_i v_ik^2]``.
- :class:`DenseFMFields`: the dense columns as FM fields next to the sparse ones.
- :class:`TaskScales`: one learned scale per task for a term the tasks share.
- :class:`LinearArch`: a linear model over sparse ids (and optionally the dense columns), the
  first-order term of DeepFM and the wide part of Wide&Deep, with sharded id weights.

Why the id weights live in tables of dim 4, not 1: FBGEMM's fused kernels (TorchRec's
table-wise / column-wise / row-wise shardings, CPU and GPU alike) require every table's local
dim to be a multiple of 4, and the planner, left to itself, puts some dim-1 tables table-wise
(it did for the synthetic Criteo tables), which then fails at materialization. So a linear
table has ``linear_table_dim(T) = 4 * ceil(T / 4)`` columns and column k is task k's weight of
the id: with one task, column 0 is the classic per-id weight and columns 1-3 are never read
(they get no gradient). The tables can then be sharded any way the planner likes.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.precision import dense_input
from models.registry import embedding_bag_configs

META = torch.device("meta")
DENSE_FM_MODES = ("per_feature", "one_field", "none")
FBGEMM_DIM_MULTIPLE = 4


def linear_table_dim(num_tasks: int) -> int:
    """Columns of a linear (first-order / wide) table: one per task, rounded up to FBGEMM's 4."""
    return FBGEMM_DIM_MULTIPLE * math.ceil(num_tasks / FBGEMM_DIM_MULTIPLE)


def fm_interaction(vector_sum: torch.Tensor, square_sum: torch.Tensor) -> torch.Tensor:
    """The FM pairwise term from its two sufficient statistics, each [B, E]:
    ``vector_sum = sum_i v_i`` and ``square_sum = sum_i v_i * v_i`` -> [B]."""
    return 0.5 * (vector_sum.square() - square_sum).sum(dim=-1)


def fm_second_order(vectors: torch.Tensor) -> torch.Tensor:
    """[B, N, E] field vectors -> [B] = sum over pairs i < j of <v_i, v_j>, in O(N E)."""
    return fm_interaction(vectors.sum(dim=1), vectors.square().sum(dim=1))


class FieldProjection(nn.Linear):
    """Linear(D, E) without bias whose columns are the dense columns' FM vectors, initialized
    N(0, INIT_STD^2) (DMP calls `reset_parameters`). With Linear's default init and unscaled
    dense values (e.g. log1p counts) the dense pairs alone put the initial logits several units
    from 0, which slows early training (0.87 instead of 0.91 test AUC after one epoch of the
    60k-row synthetic log); small vectors start the FM near the sparse fields' scale."""

    INIT_STD = 0.01

    def __init__(self, in_features: int, out_features: int, device: torch.device | None = None) -> None:
        super().__init__(in_features, out_features, bias=False, device=device)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.INIT_STD)


class DenseFMFields(nn.Module):
    """The dense columns x [B, D] as FM fields, returned as their contribution to the two FM
    statistics (vector sum, square sum), each [B, E]. One weight matrix V = Linear(D, E) (no
    bias, small init: :class:`FieldProjection`), column j = v_j:

    - ``per_feature``: every dense column j is its own field with vector x_j * v_j (Rendle's FM
      for real-valued inputs): adds ``sum_j x_j v_j`` and ``sum_j x_j^2 v_j^2``. Interacts dense
      with sparse fields and dense columns with each other.
    - ``one_field``: the projection u = V x is one extra field vector: adds u and u^2. Interacts
      the dense part with every sparse field, but not dense columns with each other.
    """

    def __init__(self, num_dense: int, dim: int, mode: str, device: torch.device | None = META) -> None:
        super().__init__()
        if mode not in ("per_feature", "one_field"):
            raise ValueError(f"DenseFMFields mode must be per_feature or one_field; got {mode!r}")
        self.mode = mode
        self.proj = FieldProjection(num_dense, dim, device=device)

    def forward(self, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.proj(dense)
        if self.mode == "one_field":
            return u, u.square()
        return u, dense.square() @ self.proj.weight.square().t()

    def field_vectors(self, dense: torch.Tensor) -> torch.Tensor:
        """The fields themselves, [B, D, E] (per_feature) or [B, 1, E] (one_field): for tests
        and inspection; `forward` never builds them."""
        if self.mode == "one_field":
            return self.proj(dense).unsqueeze(1)
        return dense.unsqueeze(2) * self.proj.weight.t().unsqueeze(0)


class TaskScales(nn.Module):
    """[B] -> [B, T]: one learned scale per task, initialized to 1 by `reset_parameters` (which
    DMP calls after `to_empty`). Lets tasks with different output scales (a logit, a value)
    share one interaction term."""

    def __init__(self, num_tasks: int, device: torch.device | None = META) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_tasks, device=device))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) * self.weight


class LinearArch(nn.Module):
    """A linear model per task over sparse ids and, optionally, the dense columns -> [B, T]:

        out[:, k] = sum over features f of (pooled id weights of f)[:, k] + (dense @ W^T)[:, k]

    The id weights are a sharded EmbeddingBagCollection over the tables holding `features`
    (all tables when None) at dim :func:`linear_table_dim` under `prefix`; the table's pooling
    (and per-id weights, when the data has them) apply as for any embedding. No bias: the models
    keep theirs in the deep part's last layer, one per task.
    """

    def __init__(self, model_cfg, num_tasks: int, num_dense: int, weighted: bool, prefix: str,
                 features: list[str] | None = None, dense: bool = True,
                 device: torch.device | None = META) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.dim = linear_table_dim(num_tasks)
        tables = embedding_bag_configs(model_cfg, features=features, dim=self.dim, prefix=prefix)
        self.feature_names = [f for t in tables for f in t.feature_names]
        self.embedding_bag_collection = EmbeddingBagCollection(tables=tables, is_weighted=weighted, device=device)
        self.dense_linear = nn.Linear(num_dense, num_tasks, bias=False, device=device) if dense and num_dense else None

    def sparse_terms(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """[B, F, T]: each feature's pooled id weights per task (features in any order)."""
        pooled = dense_input(self.embedding_bag_collection(sparse).values())  # [B, F * dim]
        return pooled.view(pooled.shape[0], -1, self.dim)[:, :, : self.num_tasks]

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        out = self.sparse_terms(sparse).sum(dim=1)
        if self.dense_linear is not None:
            out = out + self.dense_linear(dense)
        return out
