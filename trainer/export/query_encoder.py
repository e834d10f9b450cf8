"""The query tower without TorchRec: a TorchScript module that `torch.jit.load` alone can run.

    forward(ids: Dict[str, Tensor], offsets: Dict[str, Tensor], dense: Tensor) -> Tensor[B, d]

- ids[f]: int64 [n_f] ids of query feature f for the B queries, concatenated, ALREADY MAPPED
  into [0, num_embeddings) by the run's id policy (data.schema.map_ids with data.id_policy:
  modulo, hash or strict). The module never maps ids itself: the policy is data, not model, and
  `rectrain retrieve` (RawQueryInputs below) applies it exactly as the training reader did.
- offsets[f]: int64 [B] start of each query's ids in ids[f] (nn.EmbeddingBag's offsets; an
  empty bag pools to zeros, as in TorchRec).
- dense: float32 [B, num_dense] after data.dense_transform / dense_missing (zero columns when
  the model reads no dense features).

Inside: one nn.EmbeddingBag per query feature (weights copied from the table that feature looks
up, mode from its pooling; features that share a table share one weight), then the model's
query input layout (pooled embeddings in query-feature order, then dense when the model uses
it), its query MLP and the L2 normalisation. `build_query_tower` builds it from the attributes
every two-tower model keeps (see the issue 7 contract); `check_query_tower` proves it equal to
the model's `encode_query` on a batch before anything is written.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Dict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.schema import DataError, map_ids, signed_log1p


@dataclass(frozen=True)
class QueryFeature:
    """One query feature: the table it looks up and how it pools."""

    name: str
    table: str
    num_embeddings: int
    dim: int
    pooling: str  # "sum" | "mean"


class QueryTower(nn.Module):
    """The exported query tower (see the module docstring for the inputs)."""

    def __init__(self, features: list[QueryFeature], bags: dict[str, nn.EmbeddingBag], mlp: nn.Module,
                 uses_dense: bool) -> None:
        super().__init__()
        self.feature_names = [f.name for f in features]
        # insertion order = query feature order = the model's concatenation order
        self.bags = nn.ModuleDict({f.name: bags[f.name] for f in features})
        self.mlp = mlp
        self.uses_dense = uses_dense

    def forward(self, ids: Dict[str, torch.Tensor], offsets: Dict[str, torch.Tensor],
                dense: torch.Tensor) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        for name, bag in self.bags.items():
            parts.append(bag(ids[name], offsets[name]))
        if self.uses_dense:
            parts.append(dense)
        return F.normalize(self.mlp(torch.cat(parts, dim=1)), dim=1)


def query_features(model) -> list[QueryFeature]:
    """The model's query features with their tables (from feature_table / feature_pooling and
    the unsharded EBC's weights)."""
    out = []
    for name in model.query_features:
        table = model.feature_table[name]
        weight = model.sparse.embedding_bags[table].weight
        out.append(QueryFeature(name, table, int(weight.shape[0]), int(weight.shape[1]),
                                model.feature_pooling[name]))
    return out


@torch.no_grad()
def build_query_tower(model) -> QueryTower:
    """A TorchRec-free copy of `model`'s query tower (an unsharded model on CPU, in eval mode)."""
    features = query_features(model)
    first: dict[str, nn.EmbeddingBag] = {}  # table -> the bag that holds its weight
    bags: dict[str, nn.EmbeddingBag] = {}
    for f in features:
        if f.table in first:
            bag = nn.EmbeddingBag(1, f.dim, mode=f.pooling)
            bag.weight = first[f.table].weight  # one weight per table, also in the saved file
            bag.num_embeddings = f.num_embeddings
        else:
            weight = model.sparse.embedding_bags[f.table].weight.detach().to(torch.float32).clone()
            bag = nn.EmbeddingBag(f.num_embeddings, f.dim, mode=f.pooling, _weight=weight)
            bag.weight.requires_grad_(False)
            first[f.table] = bag
        bags[f.name] = bag
    mlp = copy.deepcopy(model.query_mlp).cpu().eval()
    for p in mlp.parameters():
        p.requires_grad_(False)
    return QueryTower(features, bags, mlp, bool(model.uses_dense)).eval()


def script_query_tower(tower: QueryTower, example: tuple) -> torch.jit.ScriptModule:
    """TorchScript of `tower`; an MLP that cannot be scripted (a model's own module using
    Python features TorchScript lacks) is traced on the example batch first."""
    try:
        return torch.jit.script(tower)
    except Exception:  # noqa: BLE001 - scripting failed on some Python construct; trace the MLP
        pass
    ids, offsets, dense = example
    with torch.no_grad():
        parts = [tower.bags[n](ids[n], offsets[n]) for n in tower.feature_names]
        if tower.uses_dense:
            parts.append(dense)
        tower.mlp = torch.jit.trace(tower.mlp, (torch.cat(parts, dim=1),))
    return torch.jit.script(tower)


def kjt_from_inputs(feature_names: list[str], all_features: list[str], ids: Dict[str, torch.Tensor],
                    offsets: Dict[str, torch.Tensor], batch_size: int):
    """The KeyedJaggedTensor over every model feature (the absent ones empty) holding these
    query inputs, to run the TorchRec model on the same batch."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    values, lengths = [], []
    for name in all_features:
        if name in feature_names:
            v, o = ids[name], offsets[name]
            ends = torch.cat([o[1:], torch.tensor([v.numel()], dtype=torch.int64)])
            values.append(v)
            lengths.append(ends - o)
        else:
            lengths.append(torch.zeros(batch_size, dtype=torch.int64))
    return KeyedJaggedTensor(keys=list(all_features), values=torch.cat(values) if values else torch.zeros(0, dtype=torch.int64),
                             lengths=torch.cat(lengths).to(torch.int32))


@torch.no_grad()
def model_query_embeddings(model, feature_names: list[str], ids, offsets, dense: torch.Tensor) -> torch.Tensor:
    """model.encode_query on the same inputs, through the TorchRec EBC: the reference."""
    all_features = [f for c in model.sparse.embedding_bag_configs() for f in c.feature_names]
    kjt = kjt_from_inputs(feature_names, all_features, ids, offsets, dense.shape[0])
    pooled = model.sparse(kjt).to_dict()
    return model.encode_query(pooled, dense)


def random_inputs(features: list[QueryFeature], batch_size: int, num_dense: int, seed: int = 0,
                  max_len: int = 6) -> tuple[dict, dict, torch.Tensor]:
    """Random mapped query inputs (some bags empty) for checking the tower."""
    g = torch.Generator().manual_seed(seed)
    ids, offsets = {}, {}
    for f in features:
        lens = torch.randint(0, max_len + 1, (batch_size,), generator=g)
        lens[0] = 0  # an empty bag on purpose
        offsets[f.name] = torch.cumsum(lens, 0) - lens
        ids[f.name] = torch.randint(0, f.num_embeddings, (int(lens.sum()),), generator=g)
    return ids, offsets, torch.randn(batch_size, num_dense, generator=g)


def check_query_tower(module, model, features: list[QueryFeature], num_dense: int, atol: float = 1e-5) -> float:
    """Max |exported - model.encode_query| on a random batch; raises if above `atol` (an
    export that does not reproduce the model must not be written)."""
    ids, offsets, dense = random_inputs(features, 64, num_dense)
    ours = module(ids, offsets, dense)
    ref = model_query_embeddings(model, [f.name for f in features], ids, offsets, dense)
    err = float((ours - ref).abs().max())
    if not err <= atol:
        raise RuntimeError(f"the exported query tower differs from the model's encode_query by {err:.3g} "
                           f"(> {atol}); the model's query input layout is not the one QueryTower assumes")
    return err


# --------------------------------------------------------------------------- raw inputs


@dataclass(frozen=True)
class RawQueryInputs:
    """Turns raw query rows ({"user_id": 3, "history": [1, 2, 3], <dense column>: 0.5}) into the
    query tower's mapped inputs, with the run's reader settings (stored in metadata.json)."""

    features: tuple[QueryFeature, ...]
    dense_columns: tuple[str, ...]
    id_policy: str
    dense_transform: str = "none"
    dense_missing: str = "zero"
    max_list_length: int = 10_000

    @property
    def num_dense(self) -> int:
        return len(self.dense_columns) * (2 if self.dense_missing == "indicator" else 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = [asdict(f) for f in self.features]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RawQueryInputs":
        return cls(features=tuple(QueryFeature(**f) for f in d["features"]),
                   dense_columns=tuple(d["dense_columns"]), id_policy=d["id_policy"],
                   dense_transform=d.get("dense_transform", "none"), dense_missing=d.get("dense_missing", "zero"),
                   max_list_length=int(d.get("max_list_length", 10_000)))

    def encode(self, rows: list[dict[str, Any]], where: str = "query") -> tuple[dict, dict, torch.Tensor]:
        """(ids, offsets, dense) for the query tower. A missing or null feature is an empty
        bag; a missing dense value is 0 (flagged with dense_missing = "indicator"), as in the
        training reader. Raises DataError naming the feature for a non-integer id."""
        ids, offsets = {}, {}
        for f in self.features:
            lists = [_id_list(row.get(f.name), f.name, where)[: self.max_list_length] for row in rows]
            lens = np.array([len(x) for x in lists], dtype=np.int64)
            raw = np.concatenate(lists) if lists and lens.sum() else np.zeros(0, dtype=np.int64)
            mapped, _, _ = map_ids(raw, f.num_embeddings, self.id_policy, f"{where}: feature {f.name!r}")
            ids[f.name] = torch.from_numpy(np.ascontiguousarray(mapped, dtype=np.int64))
            offsets[f.name] = torch.from_numpy(np.cumsum(lens) - lens)
        dense = np.zeros((len(rows), len(self.dense_columns)), dtype=np.float32)
        missing = np.zeros_like(dense, dtype=bool)
        for i, row in enumerate(rows):
            for j, c in enumerate(self.dense_columns):
                value = row.get(c)
                if value is None:
                    missing[i, j] = True
                else:
                    try:
                        dense[i, j] = float(value)
                    except (TypeError, ValueError):
                        raise DataError(f"{where}: dense feature {c!r} must be a number, got {value!r}") from None
        if self.dense_transform == "log1p":
            dense = signed_log1p(dense)
        if self.dense_missing == "indicator":
            dense = np.concatenate([dense, missing.astype(np.float32)], axis=1)
        return ids, offsets, torch.from_numpy(dense.astype(np.float32))


def _id_list(value: Any, name: str, where: str) -> np.ndarray:
    if value is None:
        return np.zeros(0, dtype=np.int64)
    items = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
    out = []
    for v in items:
        if v is None:
            continue  # a null id inside a list is dropped, as the reader does
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise DataError(f"{where}: feature {name!r} holds {v!r}; ids must be integers (a list of them "
                            f"for a list feature)")
        out.append(int(v))
    return np.array(out, dtype=np.int64)
