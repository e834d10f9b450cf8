"""One place that builds the parts every command needs: the model (unsharded or sharded), its
checkpoint state, and the data streams. train, eval, plan (and later export/score/retrieve)
call these instead of repeating setup."""

from __future__ import annotations

from pathlib import Path

from data.parquet import ParquetStream
from data.schema import Schema
from models import build_model
from models.registry import ModelInputs, RecModel
from trainer.checkpoint import Checkpointer
from trainer.config import ConfigError, RunConfig
from trainer.config_diff import describe, eval_conflicts
from trainer.distributed import DistContext
from trainer.precision import DensePrecision, embedding_collections
from trainer.sharding import shard_model
from trainer.train_module import TrainModule


def build_unsharded_model(cfg: RunConfig) -> tuple[RecModel, Schema]:
    """(the meta-device RecModel, the data schema it reads)."""
    schema = Schema.from_config(cfg.data, cfg.model)
    catalog = item_catalog(cfg, schema) if getattr(cfg.model.arch, "extra_negatives", 0) else None
    inputs = ModelInputs(schema.num_dense, tuple(cfg.data.label_columns), schema.weighted, item_catalog=catalog)
    return build_model(cfg.model, inputs), schema


def item_catalog(cfg: RunConfig, schema: Schema):
    """The item catalog (`data.items_path`) with its ids and item features mapped by the run's
    id policy, as the embedding tables see them: where a model samples negatives from."""
    import torch

    from data.catalog import ItemCatalog
    from data.schema import map_ids

    arch = cfg.model.arch
    features = [f for f in arch.candidate_features if f != arch.item_id_feature]
    catalog = ItemCatalog.read(cfg.data.items_path, features, title_column=None, id_column=arch.item_id_feature)
    spec = {f.name: f for f in schema.features}

    def mapped(values: torch.Tensor, feature: str) -> torch.Tensor:
        where = f"{cfg.data.items_path}: column {feature!r}"
        ids, _, _ = map_ids(values.numpy(), spec[feature].num_embeddings, schema.id_policy, where)
        return torch.from_numpy(ids)

    catalog.features = {f: (mapped(v, f), o) for f, (v, o) in catalog.features.items()}
    # The item id is a candidate feature too: one (mapped) id per catalog row; item_ids stay raw
    # and sorted.
    catalog.features[arch.item_id_feature] = (mapped(catalog.item_ids, arch.item_id_feature),
                                              torch.arange(len(catalog) + 1, dtype=torch.int64))
    return catalog


def build_sharded_model(cfg: RunConfig, ctx: DistContext, precision: DensePrecision | None = None):
    """(DMP-wrapped TrainModule, the unwrapped RecModel, the sharding plan, the schema). The
    TrainModule runs the dense part in `precision` (default: `precision.dense`, no loss scaling
    state kept by the caller)."""
    rec_model, schema = build_unsharded_model(cfg)
    precision = precision or DensePrecision(cfg.precision.dense, ctx.device)
    precision.num_tables_modules = len(embedding_collections(rec_model))
    model, plan = shard_model(TrainModule(rec_model, precision=precision), cfg, ctx.device)
    return model, rec_model, plan, schema


def check_checkpoint_config(cfg: RunConfig, checkpoint: str | Path) -> None:
    """Refuse to read a checkpoint with a config that would interpret it differently (another
    id policy, dense transform, table shapes, model): the numbers would be another model's."""
    from trainer.run_state import TrainState

    saved = TrainState.from_json(Checkpointer.load(checkpoint, {"train_state": ""})["train_state"])
    conflicts = eval_conflicts(saved.config, cfg.to_dict())
    if conflicts:
        raise ConfigError(f"{checkpoint} was trained with another config ({describe(conflicts)}); evaluate it "
                          f"with the config it was trained with")


def load_model_weights(model, checkpoint: str | Path) -> None:
    """Load a checkpoint's model state into a DMP model of any world size and plan."""
    state = Checkpointer.load(checkpoint, {"model": model.state_dict()})
    model.load_state_dict(state["model"])


def build_stream(cfg: RunConfig, schema: Schema, ctx: DistContext, path: str, train: bool) -> ParquetStream:
    """The rank's share of `path`: shuffled training batches, or every eval row exactly once."""
    return ParquetStream(
        path, schema,
        batch_size=cfg.data.batch_size if train else cfg.data.eval_batch_size,
        rank=ctx.rank, world_size=ctx.world_size, num_workers=cfg.data.num_workers,
        shuffle=train, shuffle_buffer_rows=cfg.data.shuffle_buffer_rows, seed=cfg.data.seed,
    )


def catalog_schema(schema: Schema, rec_model: RecModel) -> Schema:
    """How the item catalog is read: the candidate features (ids mapped as in training), the
    query features as empty bags, the item id also raw (`extras[item_id_feature]`), no labels or
    (query-side) dense columns."""
    from dataclasses import replace

    query_only = [f for f in schema.feature_names if f not in set(rec_model.candidate_features)]
    return replace(schema, label_columns=(), binary_labels=(), dense_columns=(),
                   absent_features=frozenset(query_only), passthrough=(rec_model.item_id_feature,))


def users_schema(schema: Schema, rec_model: RecModel, cfg: RunConfig) -> Schema:
    """How the eval users are read: the query features, the candidate features as empty bags,
    and the raw `targets` and `seen` id lists."""
    from dataclasses import replace

    candidate_only = [f for f in schema.feature_names if f not in set(rec_model.query_features)]
    return replace(schema, label_columns=(), binary_labels=(), absent_features=frozenset(candidate_only),
                   passthrough=(cfg.data.targets_column, cfg.data.seen_column))


def build_evaluator(cfg: RunConfig, rec_model: RecModel, schema: Schema, ctx: DistContext, path: str):
    """`evaluator(model) -> metrics` for the eval data at `path`: ranking metrics per task, or
    for a retrieval model full-catalog metrics over `data.items_path` with the popularity
    baseline."""
    from trainer.evaluate import RankingEvaluator

    if not getattr(rec_model, "is_retrieval", False):
        return RankingEvaluator(rec_model.tasks, build_stream(cfg, schema, ctx, path, train=False), ctx.device,
                                cfg.eval.max_batches)
    from trainer.retrieval_eval import RetrievalEvaluator

    if not cfg.data.items_path:
        raise ConfigError("config key 'data.items_path': retrieval evaluation scores the whole item catalog; set it "
                          "to the catalog Parquet (e.g. runs/movielens/items from `rectrain data movielens --task "
                          "retrieval`)")
    users, catalog = users_schema(schema, rec_model, cfg), catalog_schema(schema, rec_model)
    task = next(t for t in rec_model.tasks if t.kind == "retrieval")
    return RetrievalEvaluator(
        rec_model, task,
        eval_stream=build_stream(cfg, users, ctx, path, train=False),
        catalog_stream=build_stream(cfg, catalog, ctx, cfg.data.items_path, train=False),
        device=ctx.device, num_dense=schema.num_dense, raw_id_column=rec_model.item_id_feature,
        targets_column=cfg.data.targets_column, seen_column=cfg.data.seen_column,
        title_column=cfg.data.title_column, max_batches=cfg.eval.max_batches)
