"""Test helpers for models built on the meta device, without a process group."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@contextmanager
def nan_filled_memory():
    """New tensors (torch.empty, to_empty) come filled with NaN, so anything left uninitialized shows."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def materialize(model: nn.Module, seed: int = 0, nan_fill: bool = False, tables: bool = True) -> nn.Module:
    """What DistributedModelParallel does to a meta-device model, unsharded on CPU: allocate
    with `to_empty`, then call `reset_parameters()` on every module that has one. Unsharded
    embedding tables (which the sharder, not `reset_parameters`, initializes under DMP) get
    uniform weights in [-0.5, 0.5] unless `tables` is False."""
    torch.manual_seed(seed)
    if nan_fill:
        with nan_filled_memory():
            model.to_empty(device="cpu")
    else:
        model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "reset_parameters") and not isinstance(m, EmbeddingBagCollection):
            m.reset_parameters()
        if tables and isinstance(m, EmbeddingBagCollection):
            for p in m.parameters():
                nn.init.uniform_(p, -0.5, 0.5)
    assert not any(p.is_meta for p in model.parameters())
    return model


def kjt(per_feature: dict[str, list[list[int]]], keys: list[str] | None = None,
        weights: bool | dict[str, list[list[float]]] = False) -> KeyedJaggedTensor:
    """A KeyedJaggedTensor from bags of ids per feature ({feature: [[ids of row 0], ...]});
    per-id weights random (`weights=True`) or given per bag ({feature: [[w of row 0], ...]})."""
    keys = list(keys or per_feature)
    values, lengths, given = [], [], []
    for k in keys:
        for i, bag in enumerate(per_feature[k]):
            values += bag
            lengths.append(len(bag))
            if isinstance(weights, dict):
                given += weights[k][i]
    if isinstance(weights, dict):
        id_weights = torch.tensor(given)
    else:
        id_weights = torch.rand(len(values)) if weights else None
    return KeyedJaggedTensor(keys=keys, values=torch.tensor(values, dtype=torch.int64),
                             lengths=torch.tensor(lengths, dtype=torch.int32), weights=id_weights)
