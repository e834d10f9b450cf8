"""DeepFM (Guo et al., 2017): a factorization machine and a deep MLP over the same embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.arches import MLP, SparseArch
from models.dlrm import check_uniform_dim
from models.fm import DENSE_FM_MODES, META, DenseFMFields, LinearArch, TaskScales, fm_interaction
from models.registry import (ModelInputs, RecModel, check_dropout, check_layers, embedding_bag_configs,
                             register, require)
from models.tasks import Task


@dataclass
class DeepFMConfig:
    """`[model.arch]` for deepfm."""

    # Hidden sizes of the deep MLP over [dense, every embedding]; a final Linear(., T) is added.
    deep_arch: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0  # after each hidden ReLU of the deep MLP
    # How the dense columns join the FM's second-order term (they always get a first-order
    # weight and feed the deep MLP): "per_feature" (each column j is a field x_j * v_j),
    # "one_field" (Linear(D, E) of the dense vector is one more field), or "none".
    dense_fm: str = "per_feature"

    def __post_init__(self) -> None:
        check_layers(self.deep_arch, "deep_arch")
        check_dropout(self.dropout)
        require(self.dense_fm in DENSE_FM_MODES, "dense_fm",
                f"got {self.dense_fm!r}; use one of {', '.join(DENSE_FM_MODES)}")


@register("deepfm", config=DeepFMConfig)
class DeepFM(RecModel):
    """
    sparse KJT --EBC (model.tables, all at E)--> v [B, F, E] --+--FM 2nd order--> [B] ---------+
                                                               |                               |
    dense [B, D] --(dense_fm) fields x_j v_j ------------------+                               +--> sum
                                                                                               |    [B, T]
    sparse KJT --linear EBC (fm1_*), dense --Linear(D, T)--> 1st order [B, T] -----------------+
                                                                                               |
    [dense, v flattened] [B, D + F E] --deep MLP--> [B, T] ------------------------------------+

    logit_k = first_order_k + s_k * second_order + deep_k for task k (output {task: [B]}); one
    task: s = 1 (plain DeepFM), several: s_k is learned, from 1.

    - Second order: sum over pairs of fields of <v_i, v_j> in O(N E) (models.fm); the fields are
      the F pooled sparse embeddings (a multi-hot bag is one field: its pooled vector) plus the
      dense columns per `dense_fm`. Every table must be at model.embedding_dim.
    - The FM and the deep MLP read the same sharded tables: one lookup, shared embeddings.
    - First order: per-id weights in their own sharded tables `fm1_<table>` (dim 4 per up to 4
      tasks: column k is task k's weight, see models.fm) plus a dense linear term.
    - Multi-task: the second-order FM term is computed once and shared, scaled per task by a
      learned s_k (so that, e.g., a logit and a regression value can both use it); each task has
      its own first-order weights and deep output (whose bias is the task's global bias).
    """

    def __init__(self, model_cfg, inputs: ModelInputs, tasks: list[Task]) -> None:
        super().__init__(tasks)
        arch: DeepFMConfig = model_cfg.arch
        dim = check_uniform_dim(model_cfg, "deepfm's factorization machine")
        num_tasks = len(self.tasks)
        tables = embedding_bag_configs(model_cfg)
        features = [f for t in tables for f in t.feature_names]
        self.sparse_arch = SparseArch(
            EmbeddingBagCollection(tables=tables, is_weighted=inputs.weighted, device=META), features
        )
        self.first_order = LinearArch(model_cfg, num_tasks, inputs.num_dense, inputs.weighted, prefix="fm1_")
        use_dense_fm = arch.dense_fm != "none" and inputs.num_dense > 0
        self.dense_fields = DenseFMFields(inputs.num_dense, dim, arch.dense_fm) if use_dense_fm else None
        self.deep = MLP(inputs.num_dense + len(features) * dim, [*arch.deep_arch, num_tasks], last_linear=True,
                        device=META, dropout=arch.dropout)
        self.fm_scales = TaskScales(num_tasks) if num_tasks > 1 else None

    def components(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """The three terms of the logit: first_order [B, T], second_order [B] (before the
        per-task scales), deep [B, T]."""
        vectors = self.sparse_arch(sparse)  # [B, F, E]
        vector_sum, square_sum = vectors.sum(dim=1), vectors.square().sum(dim=1)
        if self.dense_fields is not None:
            dense_sum, dense_squares = self.dense_fields(dense)
            vector_sum, square_sum = vector_sum + dense_sum, square_sum + dense_squares
        return {
            "first_order": self.first_order(dense, sparse),
            "second_order": fm_interaction(vector_sum, square_sum),
            "deep": self.deep(torch.cat([dense, vectors.flatten(1)], dim=1)),
        }

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        parts = self.components(dense, sparse)
        second = parts["second_order"].unsqueeze(1) if self.fm_scales is None else self.fm_scales(parts["second_order"])
        return self.split_heads(parts["first_order"] + second + parts["deep"])
