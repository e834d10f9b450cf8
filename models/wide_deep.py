"""Wide & Deep (Cheng et al., 2016): a linear model over sparse ids next to an MLP over embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.arches import MLP, FlatInputArch
from models.fm import META, LinearArch
from models.registry import (ArchConfigError, ModelInputs, RecModel, check_dropout, check_layers,
                             embedding_bag_configs, register)
from models.tasks import Task


@dataclass
class WideDeepConfig:
    """`[model.arch]` for wide_deep; needs `[model.feature_groups]` `wide` and `deep`."""

    feature_groups: ClassVar[tuple[str, ...]] = ("wide", "deep")

    # Hidden sizes of the deep MLP over [dense, deep-group embeddings]; a final Linear(., T) is added.
    deep_arch: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0  # after each hidden ReLU of the deep MLP
    wide_dense: bool = True  # the wide part also has a linear term on the dense columns

    def __post_init__(self) -> None:
        check_layers(self.deep_arch, "deep_arch")
        check_dropout(self.dropout)


def _group(model_cfg, name: str) -> list[str]:
    """The features of `model.feature_groups.<name>` (the config loader checked that they exist)."""
    members = list(model_cfg.feature_groups.get(name, ()))
    if not members:
        raise ArchConfigError(f"config key 'model.feature_groups.{name}': wide_deep needs this group; "
                              f"add `{name} = [...]` under [model.feature_groups]")
    dup = sorted({f for f in members if members.count(f) > 1})
    if dup:
        raise ArchConfigError(f"config key 'model.feature_groups.{name}': features {dup} are listed twice")
    return members


@register("wide_deep", config=WideDeepConfig)
class WideDeep(RecModel):
    """
    sparse KJT (wide group) --linear EBC wide_<table>--> sum over features --+
    dense [B, D] --Linear(D, T) (wide_dense) --------------------------------+--> wide [B, T] --+
                                                                                               +--> sum [B, T]
    [dense, sparse KJT (deep group) --EBC, tables at own dims--> pooled] --deep MLP--> [B, T] --+

    logit_k = wide_k + deep_k for task k (output {task: [B]}).

    - Wide: per-id weights for the features of `model.feature_groups.wide`, in sharded tables
      `wide_<table>` (dim 4 per up to 4 tasks: column k is task k's weight, see models.fm), summed,
      plus a dense linear term. Cross-product features go in the data as their own sparse
      columns and join this group.
    - Deep: the tables holding `model.feature_groups.deep` features (each at its own dim, under
      its own name, so `[sharding.tables]` applies), pooled and concatenated with the raw dense
      columns. A feature in both groups has an id weight in the wide part and an embedding here.
    - Multi-task: both parts have one output per task; the deep MLP's last bias is the task's bias.
    """

    def __init__(self, model_cfg, inputs: ModelInputs, tasks: list[Task]) -> None:
        super().__init__(tasks)
        arch: WideDeepConfig = model_cfg.arch
        num_tasks = len(self.tasks)
        wide, deep = (_group(model_cfg, g) for g in WideDeepConfig.feature_groups)
        self.wide = LinearArch(model_cfg, num_tasks, inputs.num_dense, inputs.weighted, prefix="wide_",
                               features=wide, dense=arch.wide_dense)
        ebc = EmbeddingBagCollection(tables=embedding_bag_configs(model_cfg, features=deep),
                                     is_weighted=inputs.weighted, device=META)
        self.deep_input = FlatInputArch(inputs.num_dense, ebc, deep, device=META)
        self.deep = MLP(self.deep_input.out_features, [*arch.deep_arch, num_tasks], last_linear=True,
                        device=META, dropout=arch.dropout)

    def components(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """The two terms of the logit: wide [B, T], deep [B, T]."""
        return {"wide": self.wide(dense, sparse), "deep": self.deep(self.deep_input(dense, sparse))}

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        parts = self.components(dense, sparse)
        return self.split_heads(parts["wide"] + parts["deep"])
