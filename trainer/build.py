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
from trainer.sharding import shard_model
from trainer.train_module import TrainModule


def build_unsharded_model(cfg: RunConfig) -> tuple[RecModel, Schema]:
    """(the meta-device RecModel, the data schema it reads)."""
    schema = Schema.from_config(cfg.data, cfg.model)
    inputs = ModelInputs(schema.num_dense, tuple(cfg.data.label_columns), schema.weighted)
    return build_model(cfg.model, inputs), schema


def build_sharded_model(cfg: RunConfig, ctx: DistContext):
    """(DMP-wrapped TrainModule, the unwrapped RecModel, the sharding plan, the schema)."""
    rec_model, schema = build_unsharded_model(cfg)
    model, plan = shard_model(TrainModule(rec_model), cfg, ctx.device)
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
