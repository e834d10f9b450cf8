"""Two-tower retrieval: a query tower and a candidate tower over one (sharded) embedding
collection, trained with an in-batch sampled softmax (models/tasks.InBatchSoftmaxTask).

    sparse KJT (every feature) --EBC--> pooled {feature: [B, E_f]}
    query:     [pooled query features..., dense [B, D]] --MLP--> L2-normalise --> [B, d]
    candidate: [pooled candidate features...]           --MLP--> L2-normalise --> [B, d]

A table that lists both a query feature and a candidate feature (e.g. `history` and `item_id`)
is one table looked up by both (TorchRec feature sharing), so the history is embedded in the
same space as the items. Candidates for the softmax are the batch's positives (every rank's
when `gather_negatives`, with gradients back to their rank) plus optional sampled negatives,
looked up in the same call as the batch so the fused optimizer updates each row once a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.arches import MLP
from models.precision import dense_input
from models.registry import (ArchConfigError, ModelInputs, RecModel, check_count, check_dropout, check_layers,
                             embedding_bag_configs, register, require)
from models.retrieval import ItemFrequency, NegativeSampler, gather_rows, gather_values
from models.tasks import InBatchSoftmaxTask, Task

# A learned temperature is clamped into this range: below it the softmax turns into a hard max
# (and the logits of unit vectors overflow half precision), above it nothing is learned.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.005, 1.0


@dataclass
class TwoTowerConfig:
    """`[model.arch]` for two_tower."""

    query_features: list[str] = field(default_factory=list)  # e.g. ["user_id", "history"]
    candidate_features: list[str] = field(default_factory=list)  # e.g. ["item_id", "genres"]
    item_id_feature: str = "item_id"  # the candidate feature whose id is the item (one per row)
    tower_layers: list[int] = field(default_factory=lambda: [128, 64])  # both towers; last = output dim
    dropout: float = 0.0  # after each hidden ReLU of the towers
    temperature: float = 0.05  # softmax temperature (the initial value when learned)
    learn_temperature: bool = False
    logq_correction: bool = True  # subtract log(expected count) of each candidate from its logit
    extra_negatives: int = 0  # negatives sampled from the item catalog per rank and step (0: in-batch only)
    negative_sampler: str = "uniform"  # "uniform" | "popularity" (count ** 0.75)
    gather_negatives: bool = True  # every rank's positives are negatives for every rank's queries
    sampler_seed: int = 0

    def __post_init__(self) -> None:
        require(bool(self.query_features), "query_features", "list the query tower's features, e.g. "
                "[\"user_id\", \"history\"]")
        require(bool(self.candidate_features), "candidate_features", "list the candidate tower's features, e.g. "
                "[\"item_id\", \"genres\"]")
        both = sorted(set(self.query_features) & set(self.candidate_features))
        require(not both, "candidate_features", f"features {both} are in both towers; give each feature one tower "
                "(share a table instead: list both features in one [[model.tables]] entry)")
        require(self.item_id_feature in self.candidate_features, "item_id_feature",
                f"{self.item_id_feature!r} is not in candidate_features {self.candidate_features}")
        check_layers(self.tower_layers, "tower_layers")
        check_dropout(self.dropout)
        require(self.temperature > 0, "temperature", f"must be > 0; got {self.temperature}")
        require(not self.learn_temperature or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE, "temperature",
                f"a learned temperature stays within [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]; start it there "
                f"(got {self.temperature})")
        check_count(self.extra_negatives, "extra_negatives", minimum=0)
        require(self.negative_sampler in NegativeSampler.KINDS, "negative_sampler",
                f"got {self.negative_sampler!r}; use one of {', '.join(NegativeSampler.KINDS)}")

    def check_model(self, model_cfg) -> None:
        """Called by the config once the tables are known: every tower feature has a table and
        every table feature is in a tower."""
        known = [f for t in model_cfg.tables for f in t.features]
        for key in ("query_features", "candidate_features"):
            missing = [f for f in getattr(self, key) if f not in known]
            require(not missing, key, f"features {missing} are not looked up by any table; tables use {known}")
        unused = [f for f in known if f not in self.query_features + self.candidate_features]
        require(not unused, "query_features", f"table features {unused} are in no tower; add them to "
                "query_features or candidate_features, or drop them from model.tables")


class Temperature(nn.Module):
    """The softmax temperature as a [] tensor: fixed, or learned as
    T = MIN * (MAX / MIN) ** sigmoid(theta): always inside [MIN_TEMPERATURE, MAX_TEMPERATURE] with
    a gradient everywhere (a clamp would stop learning for good once T ran into a bound)."""

    def __init__(self, initial: float, learn: bool, device: torch.device | None = None) -> None:
        super().__init__()
        self.initial = initial
        self.theta = nn.Parameter(torch.empty((), device=device)) if learn else None

    def reset_parameters(self) -> None:
        if self.theta is not None:
            share = math.log(self.initial / MIN_TEMPERATURE) / math.log(MAX_TEMPERATURE / MIN_TEMPERATURE)
            share = min(max(share, 1e-6), 1 - 1e-6)  # the bounds themselves are sigmoid(+-inf)
            with torch.no_grad():
                self.theta.fill_(math.log(share / (1 - share)))

    def forward(self, device: torch.device) -> torch.Tensor:
        if self.theta is None:
            return torch.tensor(self.initial, device=device)
        return MIN_TEMPERATURE * (MAX_TEMPERATURE / MIN_TEMPERATURE) ** torch.sigmoid(self.theta)


class Tower(nn.Module):
    """[B, in] --MLP (last layer linear, dropout after hidden ReLUs)--> L2-normalise --> [B, d]."""

    def __init__(self, in_features: int, sizes: list[int], dropout: float, device: torch.device | None) -> None:
        super().__init__()
        self.mlp = MLP(in_features, sizes, last_linear=True, device=device, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=1)


def first_ids(sparse: KeyedJaggedTensor, feature: str) -> torch.Tensor:
    """The first id of each row's bag of `feature`, int64 [B]; -1 where the bag is empty."""
    jt = sparse[feature]
    values, lengths = jt.values(), jt.lengths()
    if values.numel() == 0:
        return torch.full(lengths.shape, -1, dtype=torch.int64, device=lengths.device)
    starts = jt.offsets()[:-1].clamp(max=values.numel() - 1)
    return torch.where(lengths > 0, values[starts].to(torch.int64), torch.full_like(starts, -1, dtype=torch.int64))


@register("two_tower", config=TwoTowerConfig, retrieval=True)
class TwoTower(RecModel):
    """forward(dense [B, D], sparse KJT) -> outputs (d = tower_layers[-1], C candidates):

    always:   query [B, d], candidate [B, d] (the row's own item; meaningless for rows without
              one), item_ids [B] int64 (-1: no item), temperature [] (float32)
    training: candidates [C, d]: this rank's B rows, then the other ranks' (padded blocks of the
              largest B) when gather_negatives, then extra_negatives sampled rows;
              candidate_ids [C] int64, candidate_valid [C] bool, candidate_log_q [C] float32
              (log(B_global * p_j + M * s_j), zeros without logq_correction), positive_index [B]
              (= arange(B): local rows come first).
    Training also counts the global batch's item ids in `item_frequency` (before log_q, so every
    positive has count >= 1).
    """

    is_retrieval = True

    def __init__(self, model_cfg, inputs: ModelInputs, tasks: list[Task]) -> None:
        super().__init__(tasks)
        if len(self.tasks) != 1 or not isinstance(self.tasks[0], InBatchSoftmaxTask):
            raise ArchConfigError("config key 'model.tasks': two_tower trains exactly one task of kind \"retrieval\"")
        arch: TwoTowerConfig = model_cfg.arch
        arch.check_model(model_cfg)
        meta = torch.device("meta")
        tables = embedding_bag_configs(model_cfg)
        self.query_features = list(arch.query_features)
        self.candidate_features = list(arch.candidate_features)
        self.item_id_feature = arch.item_id_feature
        self.feature_table = {f: t.name for t in tables for f in t.feature_names}
        pooling = {t.name: t.pooling for t in model_cfg.tables}
        self.feature_pooling = {f: pooling[table] for f, table in self.feature_table.items()}
        dims = {f: t.embedding_dim for t in tables for f in t.feature_names}
        self.feature_sizes = {f: t.num_embeddings for t in tables for f in t.feature_names}
        self.uses_dense = inputs.num_dense > 0
        self.weighted = inputs.weighted
        self.sparse = EmbeddingBagCollection(tables=tables, is_weighted=inputs.weighted, device=meta)
        query_in = sum(dims[f] for f in self.query_features) + inputs.num_dense
        candidate_in = sum(dims[f] for f in self.candidate_features)
        self.query_mlp = Tower(query_in, list(arch.tower_layers), arch.dropout, meta)
        self.candidate_mlp = Tower(candidate_in, list(arch.tower_layers), arch.dropout, meta)
        self.temperature = Temperature(arch.temperature, arch.learn_temperature, meta)
        self.num_items = self.feature_sizes[self.item_id_feature]
        self.item_frequency = ItemFrequency(self.num_items, meta)
        self.logq_correction = arch.logq_correction
        self.gather_negatives = arch.gather_negatives
        self.extra_negatives = arch.extra_negatives
        # TorchRec's GPU pipeline fx-traces forward to prefetch the lookup; this forward runs collectives
        # (the id all-gather behind the item counts) and data-dependent steps a symbolic trace cannot
        # follow, so it trains in the plain loop on GPUs too.
        self.pipelineable = False
        self.catalog = None
        self.sampler: NegativeSampler | None = None
        if self.extra_negatives:
            if inputs.item_catalog is None:
                raise ArchConfigError("config key 'model.arch.extra_negatives': sampled negatives need the item "
                                      "catalog (data.items_path) passed to the model as ModelInputs.item_catalog")
            self.catalog = inputs.item_catalog
            # The embedding row of each catalog item: its item-id feature, mapped by the id policy
            # (trainer/build.item_catalog), one id per catalog row.
            row_items = self.catalog.features[self.item_id_feature][0].to(torch.int64)
            self.sampler = NegativeSampler(arch.negative_sampler, row_items, self.num_items, arch.sampler_seed, meta)

    @property
    def item_counts(self) -> torch.Tensor:
        """[num_items] int64 exact counts of positive item ids seen in training (global batch)."""
        return self.item_frequency.counts

    # ------------------------------------------------------------------ towers (export uses these)

    def query_input(self, pooled: dict[str, torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        """pooled {feature: [B, E_f]}, dense [B, D] -> [B, sum of query E_f (+ D if uses_dense)]."""
        parts = [pooled[f] for f in self.query_features]
        if self.uses_dense:
            parts.append(dense.to(parts[0].dtype))
        return torch.cat(parts, dim=1)

    def encode_query(self, pooled: dict[str, torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        """-> [B, d], unit norm."""
        return self.query_mlp(self.query_input(pooled, dense))

    def encode_candidate(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        """pooled {feature: [B, E_f]} -> [B, d], unit norm."""
        return self.candidate_mlp(torch.cat([pooled[f] for f in self.candidate_features], dim=1))

    # ------------------------------------------------------------------ forward

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        batch = dense.shape[0]
        item_ids = first_ids(sparse, self.item_id_feature)
        valid = item_ids >= 0
        global_ids = None
        if self.training:
            global_ids = gather_values(item_ids, -1)  # [W * m], this rank's rows first
            self.item_frequency.update(global_ids)
        negative_rows = None
        if self.training and self.extra_negatives:
            negative_rows = self.sampler.sample(self.extra_negatives, self.item_frequency)
            sparse = self._with_catalog_rows(sparse, negative_rows.to(item_ids.device))
        pooled = {f: dense_input(v) for f, v in self.sparse(sparse).to_dict().items()}
        first = {f: v[:batch] for f, v in pooled.items()}
        temperature = self.temperature(dense.device)
        out = {"query": self.encode_query(first, dense), "candidate": self.encode_candidate(first),
               "item_ids": item_ids, "temperature": temperature.float()}
        if not self.training:
            return out

        if self.gather_negatives:
            candidates, candidate_valid = gather_rows(out["candidate"], valid)
            candidate_ids = global_ids
        else:
            candidates, candidate_valid, candidate_ids = out["candidate"], valid, item_ids
        in_batch = candidate_valid.sum()
        if negative_rows is not None:
            negatives = self.encode_candidate({f: v[batch:] for f, v in pooled.items()})
            negative_ids = self.sampler.items_of(negative_rows.to(item_ids.device))
            candidates = torch.cat([candidates, negatives])
            candidate_ids = torch.cat([candidate_ids, negative_ids])
            candidate_valid = torch.cat([candidate_valid, torch.ones_like(negative_ids, dtype=torch.bool)])
        if self.logq_correction:
            probs = None if negative_rows is None else self.sampler.probabilities(candidate_ids, self.item_frequency)
            log_q = self.item_frequency.log_expected(candidate_ids, in_batch, self.extra_negatives, probs)
        else:
            log_q = torch.zeros(candidate_ids.shape, device=candidates.device)
        out.update(candidates=candidates, candidate_ids=candidate_ids, candidate_valid=candidate_valid,
                   candidate_log_q=log_q, positive_index=torch.arange(batch, device=candidates.device))
        return out

    def _with_catalog_rows(self, sparse: KeyedJaggedTensor, rows: torch.Tensor) -> KeyedJaggedTensor:
        """The batch's KJT with M more rows appended: catalog rows `rows` [M] for the candidate
        features, empty bags for the others. Same keys in the same order, batch size B + M."""
        device = sparse.values().device
        if getattr(self, "_catalog_device", None) != device:
            self.catalog, self._catalog_device = self.catalog.to(device), device
        wanted = [f for f in self.candidate_features if f in self.catalog.features]
        bags = self.catalog.kjt_rows(rows, wanted)
        per_feature = sparse.to_dict()
        values, lengths, weights = [], [], []
        empty = torch.zeros(len(rows), dtype=sparse.lengths().dtype, device=device)
        for f in sparse.keys():
            jt = per_feature[f]
            extra_values, extra_lengths = bags.get(f, (torch.zeros(0, dtype=torch.int64, device=device), empty))
            # Catalog ids arrive mapped by the run's id policy (trainer/build.item_catalog).
            values += [jt.values(), extra_values.to(jt.values().dtype)]
            lengths += [jt.lengths(), extra_lengths.to(jt.lengths().dtype)]
            if self.weighted:
                weights += [jt.weights(), torch.ones(len(extra_values), device=device)]
        return KeyedJaggedTensor(keys=sparse.keys(), values=torch.cat(values), lengths=torch.cat(lengths),
                                 weights=torch.cat(weights) if self.weighted else None)

    def train_stats(self, outputs: dict[str, torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        if "candidates" not in outputs:
            return {}
        return self.tasks[0].stats(outputs, weights)
