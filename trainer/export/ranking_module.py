"""The exported ranking model: one TorchScript module that `torch.jit.load` runs without TorchRec.

    forward(values: Tensor, lengths: Tensor, dense: Tensor, weights: Optional[Tensor])
        -> Dict[str, Tensor]   {task: [B] probability (binary) or value (regression)}

- values int64 [N]: every feature's ids for the B rows, feature-major in manifest order
  (feature 0's ids for rows 0..B-1, then feature 1's, ...), ALREADY MAPPED into
  [0, num_embeddings) by the run's id policy: the layout of a TorchRec KeyedJaggedTensor and of
  what the training reader (data/parquet.table_to_batch) builds, which `rectrain score` reuses.
- lengths int32/int64 [F * B]: ids per (feature, row), in the same order.
- dense float32 [B, num_dense] after data.dense_transform and data.dense_missing.
- weights float32 [N] or None: per-id weights (data.weight_columns), None otherwise.

Inside, two parts:

1. Embedding stages, one per TorchRec EmbeddingBagCollection of the model, written in plain
   TorchScript over the very modules the in-process model runs: the float collection's
   `nn.EmbeddingBag`s (fp32 export), or the quantized collection's FBGEMM
   `IntNBitTableBatchedEmbeddingBagsCodegen` kernels (int8/int4/fp16 export), fed the same
   indices and offsets TorchRec would build from the KJT. Same kernels, same inputs: the pooled
   embeddings are bit-identical to the in-process model's.
2. The dense part, traced (`torch.jit.trace`) from the model itself with each collection
   swapped for a stub that hands back the pooled embeddings given to it, so any registered
   ranking model exports without a scripting-friendly rewrite. Tracing records the ops of one
   batch; the parity gate (trainer/export/ranking.py) then runs other batch sizes and real rows.

Why TorchScript and not torch.export: the FBGEMM quantized lookup modules are scriptable and
TorchScript is what TorchRec's own inference path (and its C++ predictor) loads, while
torch.export of jagged, data-dependent lookups is still moving between TorchRec 1.6 and 1.8.
The file needs torch only (fp32) or torch plus `import fbgemm_gpu` (quantized: the kernels are
FBGEMM ops); no TorchRec, no process group.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn


class FloatStage(nn.Module):
    """One float EmbeddingBagCollection: its nn.EmbeddingBag per table, pooled per feature in
    the collection's output order (torchrec.modules.embedding_modules.EmbeddingBagCollection.forward)."""

    def __init__(self, bags: List[nn.Module], bag_of_feature: List[int], feature_index: List[int],
                 weighted: bool) -> None:
        super().__init__()
        self.bags = nn.ModuleList(bags)
        self.bag_of_feature = bag_of_feature  # output position -> which bag
        self.feature_index = feature_index  # output position -> feature index in the input layout
        self.weighted = weighted

    def forward(self, values: torch.Tensor, lengths: torch.Tensor, starts: List[int],
                weights: Optional[torch.Tensor]) -> torch.Tensor:
        out: List[torch.Tensor] = []
        for k in range(len(self.feature_index)):
            f = self.feature_index[k]
            lo, hi = starts[f], starts[f + 1]
            lens = lengths[f]
            offsets = torch.cat([torch.zeros(1, dtype=lens.dtype), torch.cumsum(lens, 0)])
            w: Optional[torch.Tensor] = None
            if self.weighted and weights is not None:
                w = weights[lo:hi]
            b = self.bag_of_feature[k]
            for i, bag in enumerate(self.bags):
                if i == b:
                    out.append(bag(values[lo:hi], offsets, per_sample_weights=w).float())
        return torch.cat(out, dim=1)


class QuantStage(nn.Module):
    """One quantized EmbeddingBagCollection: its FBGEMM TBE kernels, each fed its features'
    ids and offsets in TorchRec's order (torchrec.quant.embedding_modules.EmbeddingBagCollection.forward)."""

    def __init__(self, tbes: List[nn.Module], groups: List[List[int]], weighted: bool) -> None:
        super().__init__()
        self.tbes = nn.ModuleList(tbes)
        self.groups = groups  # per kernel: feature indices (input layout) in its order
        self.weighted = weighted

    def forward(self, values: torch.Tensor, lengths: torch.Tensor, starts: List[int],
                weights: Optional[torch.Tensor]) -> torch.Tensor:
        out: List[torch.Tensor] = []
        for i, tbe in enumerate(self.tbes):
            vs: List[torch.Tensor] = []
            ls: List[torch.Tensor] = []
            ws: List[torch.Tensor] = []
            for f in self.groups[i]:
                vs.append(values[starts[f]:starts[f + 1]])
                ls.append(lengths[f])
                if weights is not None:
                    ws.append(weights[starts[f]:starts[f + 1]])
            indices = torch.cat(vs)
            lens = torch.cat(ls)
            offsets = torch.cat([torch.zeros(1, dtype=lens.dtype), torch.cumsum(lens, 0)]).to(indices.dtype)
            w: Optional[torch.Tensor] = None
            if self.weighted and weights is not None:
                w = torch.cat(ws)
            out.append(tbe(indices=indices, offsets=offsets, per_sample_weights=w))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)


class RankingScorer(nn.Module):
    """The exported module (see the module docstring)."""

    def __init__(self, num_features: int, stages: List[nn.Module], dense_part: nn.Module) -> None:
        super().__init__()
        self.num_features = num_features
        self.stages = nn.ModuleList(stages)
        self.dense_part = dense_part

    def forward(self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor,
                weights: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        batch = dense.size(0)
        lens = lengths.to(torch.int64).view(self.num_features, batch)
        ends: List[int] = torch.cumsum(lens.sum(1), 0).tolist()
        starts: List[int] = [0]
        for e in ends:
            starts.append(e)
        pooled: List[torch.Tensor] = []
        for stage in self.stages:
            pooled.append(stage(values, lens, starts, weights))
        return self.dense_part(dense, torch.cat(pooled, dim=1))


# ------------------------------------------------------------------------- building it


class _PooledStub(nn.Module):
    """Stands in for an EmbeddingBagCollection while the dense part is traced: returns the
    pooled embeddings it was handed as the collection's KeyedTensor."""

    def __init__(self, keys: list[str], dims: list[int]) -> None:
        super().__init__()
        self.keys, self.dims = list(keys), list(dims)
        self.current: torch.Tensor | None = None

    def forward(self, features) -> "object":
        from torchrec.sparse.jagged_tensor import KeyedTensor

        return KeyedTensor(keys=self.keys, length_per_key=self.dims, values=self.current)


class _DensePart(nn.Module):
    """(dense, pooled of every collection concatenated) -> {task: prediction}; traced."""

    def __init__(self, model: nn.Module, stubs: list[_PooledStub], kjt) -> None:
        super().__init__()
        self.model = model
        self.stubs = stubs  # plain list: they are already submodules of model
        self.kjt = kjt

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        start = 0
        for stub in self.stubs:
            width = sum(stub.dims)
            stub.current = pooled[:, start:start + width]
            start += width
        return self.model.predictions(self.model(dense, self.kjt))


def _stage(ebc: nn.Module, features: list[str]) -> tuple[nn.Module, list[str], list[int]]:
    """(the TorchScript-ready stage, its output keys, their dims) for one collection."""
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

    index = {f: i for i, f in enumerate(features)}
    needs = (("_feature_splits", "_feature_names", "_emb_modules", "_embedding_names", "_length_per_key")
             if isinstance(ebc, QuantEBC) else ("embedding_bags", "_feature_names", "_embedding_names",
                                                "_lengths_per_embedding"))
    missing = [a for a in needs if not hasattr(ebc, a)]
    if missing:  # private TorchRec layout read here; checked on TorchRec 1.8.0
        from trainer.errors import RunError

        raise RunError(f"export ranking: this TorchRec's {type(ebc).__name__} lacks {missing}, the layout the "
                       f"exported lookups mirror; export with TorchRec 1.8")
    if isinstance(ebc, QuantEBC):
        groups, at = [], 0
        for split in ebc._feature_splits:
            groups.append([index[f] for f in ebc._feature_names[at:at + split]])
            at += split
        return (QuantStage(list(ebc._emb_modules), groups, ebc.is_weighted()), list(ebc._embedding_names),
                list(ebc._length_per_key))
    bags, bag_of, feat_of = [], [], []
    for b, (bag, names) in enumerate(zip(ebc.embedding_bags.values(), ebc._feature_names)):
        bags.append(bag)
        for name in names:
            bag_of.append(b)
            feat_of.append(index[name])
    return (FloatStage(bags, bag_of, feat_of, ebc.is_weighted()), list(ebc._embedding_names),
            list(ebc._lengths_per_embedding))


def example_inputs(features: list[tuple[str, int]], batch_size: int, num_dense: int, weighted: bool,
                   seed: int = 0, max_len: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random mapped inputs (values, lengths, dense, weights) in the exported layout; some bags empty."""
    g = torch.Generator().manual_seed(seed)
    vals, lens = [], []
    for _, n in features:
        ln = torch.randint(0, max_len + 1, (batch_size,), generator=g)
        ln[0] = 0
        lens.append(ln)
        vals.append(torch.randint(0, n, (int(ln.sum()),), generator=g))
    values = torch.cat(vals) if vals else torch.zeros(0, dtype=torch.int64)
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return values, torch.cat(lens).to(torch.int32), torch.randn(batch_size, num_dense, generator=g), weights


def kjt_of(features: list[str], values: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    return KeyedJaggedTensor(keys=list(features), values=values, lengths=lengths.to(torch.int32), weights=weights)


@torch.no_grad()
def build_scorer(model: nn.Module, features: list[tuple[str, int]], num_dense: int,
                 weighted: bool) -> torch.jit.ScriptModule:
    """The TorchScript RankingScorer of `model` (an unsharded CPU RecModel in eval mode, float
    or with quantized tables; it is not modified). `features`: (name, num_embeddings) in the
    input layout order (the schema's)."""
    import copy

    from trainer.export.quantize import float_collections, quant_collections

    names = [f for f, _ in features]
    work = copy.copy(model)  # shallow: the stubs replace collections on copies of their parents
    collections = float_collections(model) + quant_collections(model)
    collections.sort(key=lambda pc: [n for n, _ in model.named_modules()].index(pc[0]))
    stages, stubs = [], []
    for path, ebc in collections:
        stage, keys, dims = _stage(ebc, names)
        stages.append(torch.jit.script(stage))
        stub = _PooledStub(keys, dims)
        stubs.append(stub)
        work = _replace(work, path, stub)
    values, lengths, dense, weights = example_inputs(features, 7, num_dense, weighted)
    kjt = kjt_of(names, values, lengths, weights)
    dense_part = _DensePart(work, stubs, kjt).eval()
    lens = lengths.to(torch.int64).view(len(names), -1)
    ends = torch.cumsum(lens.sum(1), 0).tolist()
    starts = [0, *[int(e) for e in ends]]
    pooled = torch.cat([s(values, lens, starts, weights) for s in stages], dim=1)
    traced = torch.jit.trace(dense_part, (dense, pooled), strict=False, check_trace=False)
    return torch.jit.script(RankingScorer(len(names), stages, traced))


def _replace(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """`root` with the submodule at `path` replaced, copying (shallowly) every module on the way
    so that the original model keeps its collections."""
    import copy

    parts = path.split(".")
    top = copy.copy(root)
    top._modules = dict(root._modules)
    node = top
    for name in parts[:-1]:
        child = copy.copy(node._modules[name])
        child._modules = dict(child._modules)
        node._modules[name] = child
        node = child
    node._modules[parts[-1]] = new
    return top
