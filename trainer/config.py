"""Typed run configuration: dataclasses loaded from TOML, `--set a.b=v` overrides, validation.

Every section validates itself in ``__post_init__`` and raises :class:`ConfigError` with the
dotted key that is wrong and how to fix it. This module knows nothing of torch.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
COMPUTE_KERNELS = ("fused", "dense", "fused_uvm", "fused_uvm_caching")
EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adam", "sgd")
DENSE_OPTIMIZERS = ("adam", "adagrad", "sgd")
ID_POLICIES = ("modulo", "hash", "strict")
POOLINGS = ("sum", "mean")


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the fix."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _one_of(value: str, choices: tuple[str, ...], key: str) -> None:
    _require(value in choices, key, f"got {value!r}; use one of {', '.join(choices)}")


@dataclass
class DataConfig:
    """Where the click log is and how its columns map to model inputs."""

    train_path: str = ""
    eval_path: str = ""
    label_columns: list[str] = field(default_factory=lambda: ["label"])
    dense_columns: list[str] = field(default_factory=list)
    # Each sparse column is one feature of the same name: int64 scalars or list<int64>.
    sparse_columns: list[str] = field(default_factory=list)
    # Optional per-id weights: feature name -> list<float> column aligned with the id list.
    weight_columns: dict[str, str] = field(default_factory=dict)
    # How raw ids map into [0, num_embeddings): "modulo", "hash" (splitmix64 then modulo),
    # or "strict" (any id outside the table is an error).
    id_policy: str = "modulo"
    # Applied to dense columns on read: "log1p" (sign-preserving log(1+|x|)) tames count features.
    dense_transform: str = "none"
    batch_size: int = 512
    eval_batch_size: int = 4096
    num_workers: int = 1
    shuffle_buffer_rows: int = 16384
    prefetch_factor: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        _require(bool(self.label_columns), "data.label_columns", "list at least one label column")
        _require(bool(self.sparse_columns), "data.sparse_columns", "list the categorical id columns")
        _one_of(self.id_policy, ID_POLICIES, "data.id_policy")
        _one_of(self.dense_transform, ("none", "log1p"), "data.dense_transform")
        _require(self.batch_size > 0, "data.batch_size", "must be a positive integer")
        _require(self.eval_batch_size > 0, "data.eval_batch_size", "must be a positive integer")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0 (0 reads in the main process)")
        _require(self.shuffle_buffer_rows >= 0, "data.shuffle_buffer_rows", "must be >= 0 (0 disables shuffling)")
        _require(self.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
        all_cols = self.label_columns + self.dense_columns + self.sparse_columns
        dup = sorted({c for c in all_cols if all_cols.count(c) > 1})
        _require(not dup, "data", f"columns {dup} are listed in more than one role; give each one role")
        for feature in self.weight_columns:
            _require(feature in self.sparse_columns, f"data.weight_columns.{feature}",
                     "weights must belong to a feature listed in data.sparse_columns")


@dataclass
class TableConfig:
    """One embedding table and the features that look it up."""

    name: str = ""
    features: list[str] = field(default_factory=list)
    num_embeddings: int = 0
    embedding_dim: int = 0  # 0 means model.embedding_dim
    pooling: str = "sum"

    def validate(self, key: str) -> None:
        _require(bool(self.name), f"{key}.name", "every table needs a name")
        _require(bool(self.features), f"{key}.features", f"table {self.name!r} needs at least one feature")
        _require(self.num_embeddings > 0, f"{key}.num_embeddings", f"table {self.name!r} needs num_embeddings > 0")
        _require(self.embedding_dim >= 0, f"{key}.embedding_dim", "must be >= 0 (0 uses model.embedding_dim)")
        _one_of(self.pooling, POOLINGS, f"{key}.pooling")


@dataclass
class ModelConfig:
    """Which registered model to build, its tables and its arch sizes."""

    name: str = "dlrm"
    embedding_dim: int = 16
    tables: list[TableConfig] = field(default_factory=list)
    dense_arch: list[int] = field(default_factory=lambda: [64, 16])
    over_arch: list[int] = field(default_factory=lambda: [64, 1])
    # Model-specific knobs that the registry passes through untouched.
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.embedding_dim > 0, "model.embedding_dim", "must be a positive integer")
        _require(bool(self.tables), "model.tables", "add at least one [[model.tables]] entry")
        for i, table in enumerate(self.tables):
            table.validate(f"model.tables[{i}]")
            if table.embedding_dim == 0:
                table.embedding_dim = self.embedding_dim
        names = [t.name for t in self.tables]
        dup = sorted({n for n in names if names.count(n) > 1})
        _require(not dup, "model.tables", f"table names {dup} repeat; give each table a unique name")
        feats = [f for t in self.tables for f in t.features]
        dup = sorted({f for f in feats if feats.count(f) > 1})
        _require(not dup, "model.tables", f"features {dup} map to several tables; map each feature once")
        _require(all(d > 0 for d in self.dense_arch + self.over_arch), "model.dense_arch/over_arch",
                 "layer sizes must be positive integers")

    @property
    def feature_names(self) -> list[str]:
        return [f for t in self.tables for f in t.features]


@dataclass
class TableSharding:
    """A per-table constraint for the planner; empty strings leave the choice to it."""

    type: str = ""
    kernel: str = ""


@dataclass
class ShardingConfig:
    """Planner constraints. Tables without an entry get `default_type` (or the planner's pick)."""

    default_type: str = ""
    tables: dict[str, TableSharding] = field(default_factory=dict)
    # Per-rank memory the planner may use; 0 keeps TorchRec's defaults for the device.
    hbm_cap_gb: float = 0.0
    ddr_cap_gb: float = 0.0

    def __post_init__(self) -> None:
        if self.default_type:
            _one_of(self.default_type, SHARDING_TYPES, "sharding.default_type")
        for name, ts in self.tables.items():
            if ts.type:
                _one_of(ts.type, SHARDING_TYPES, f"sharding.tables.{name}.type")
            if ts.kernel:
                _one_of(ts.kernel, COMPUTE_KERNELS, f"sharding.tables.{name}.kernel")
            if ts.type == "data_parallel" and ts.kernel:
                _require(ts.kernel == "dense", f"sharding.tables.{name}.kernel",
                         "data_parallel tables use the 'dense' kernel; drop the kernel or set it to 'dense'")

    def type_for(self, table: str) -> str:
        entry = self.tables.get(table)
        return (entry.type if entry and entry.type else "") or self.default_type


@dataclass
class OptimizerConfig:
    """Fused embedding optimizer, dense optimizer and the shared LR schedule."""

    embedding: str = "rowwise_adagrad"
    embedding_lr: float = 0.05
    embedding_eps: float = 1e-8
    dense: str = "adam"
    dense_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # After warmup: "none" keeps the base LR, "linear"/"cosine" decay to min_lr_ratio * base
    # by the end of training.
    decay: str = "none"
    min_lr_ratio: float = 0.0
    grad_clip_norm: float = 0.0  # 0 disables clipping of dense gradients

    def __post_init__(self) -> None:
        _one_of(self.embedding, EMBEDDING_OPTIMIZERS, "optimizer.embedding")
        _one_of(self.dense, DENSE_OPTIMIZERS, "optimizer.dense")
        _one_of(self.decay, ("none", "linear", "cosine"), "optimizer.decay")
        _require(self.embedding_lr > 0, "optimizer.embedding_lr", "must be > 0")
        _require(self.dense_lr > 0, "optimizer.dense_lr", "must be > 0")
        _require(self.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio", "must be within [0, 1]")
        _require(self.grad_clip_norm >= 0, "optimizer.grad_clip_norm", "must be >= 0 (0 disables)")


@dataclass
class TrainConfig:
    """How long to train and where the run lives."""

    run_dir: str = "runs/default"
    epochs: int = 1
    max_steps: int = 0  # 0: run `epochs` full epochs; > 0 caps the run (and sets the LR horizon)
    # Stop (after checkpointing) at this step as a preemption would; the LR horizon and data
    # order stay those of the full run, so a rerun resumes exactly. 0 disables.
    stop_at_step: int = 0
    log_every: int = 50
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs", "must be >= 1")
        _require(self.max_steps >= 0, "train.max_steps", "must be >= 0 (0 means run all epochs)")
        _require(self.stop_at_step >= 0, "train.stop_at_step", "must be >= 0 (0 disables)")
        _require(self.log_every >= 1, "train.log_every", "must be >= 1")
        _one_of(self.device, ("auto", "cpu", "cuda"), "train.device")


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: only at the end
    at_end: bool = True
    max_batches: int = 0  # 0: the whole eval set (exact metrics need it)

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "eval.every_steps", "must be >= 0")
        _require(self.max_batches >= 0, "eval.max_batches", "must be >= 0")


@dataclass
class CheckpointConfig:
    dir: str = ""  # default: <run_dir>/checkpoints
    every_steps: int = 0  # 0: only at the end
    keep_last: int = 3
    resume: str = "auto"  # auto: latest complete checkpoint in dir, if any; never: start fresh
    at_end: bool = True

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        _one_of(self.resume, ("auto", "never"), "checkpoint.resume")


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    progress_bar: bool = True
    log_dir: str = ""  # default: <run_dir>/tb


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        sparse = set(self.data.sparse_columns)
        for i, table in enumerate(self.model.tables):
            for f in table.features:
                _require(f in sparse, f"model.tables[{i}].features",
                         f"feature {f!r} is not in data.sparse_columns; add it there or fix the name")
        table_names = {t.name for t in self.model.tables}
        for name in self.sharding.tables:
            _require(name in table_names, f"sharding.tables.{name}",
                     f"no table named {name!r}; tables are {sorted(table_names)}")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.train.run_dir) / "checkpoints")

    @property
    def log_dir(self) -> Path:
        return Path(self.logging.log_dir or Path(self.train.run_dir) / "tb")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def _build(cls: type, raw: Any, key: str) -> Any:
    """Turn TOML data into `cls`, checking every key and type on the way."""
    origin = typing.get_origin(cls)
    if dataclasses.is_dataclass(cls):
        _require(isinstance(raw, dict), key or "config", f"expected a table, got {type(raw).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        _require(not unknown, f"{key + '.' if key else ''}{unknown[0] if unknown else ''}",
                 f"unknown key; valid keys here are {', '.join(sorted(names))}")
        kwargs = {n: _build(hints[n], v, f"{key}.{n}" if key else n) for n, v in raw.items()}
        return cls(**kwargs)
    if origin is list:
        (item,) = typing.get_args(cls)
        _require(isinstance(raw, list), key, f"expected a list, got {raw!r}")
        return [_build(item, v, f"{key}[{i}]") for i, v in enumerate(raw)]
    if origin is dict:
        _, value_t = typing.get_args(cls)
        _require(isinstance(raw, dict), key, f"expected a table, got {raw!r}")
        return {str(k): _build(value_t, v, f"{key}.{k}") for k, v in raw.items()}
    if cls is Any:
        return raw
    if cls is float:
        ok = isinstance(raw, (int, float)) and not isinstance(raw, bool)
        _require(ok, key, f"expected a number, got {raw!r}")
        return float(raw)
    if cls in (int, str, bool):
        ok = isinstance(raw, cls) and not (cls is int and isinstance(raw, bool))
        _require(ok, key, f"expected {cls.__name__}, got {raw!r}")
        return raw
    raise TypeError(f"unsupported config type {cls} at {key}")


def _parse_value(text: str) -> Any:
    """`--set` values are TOML literals (1, 0.5, true, "x", [1, 2]); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` (or `sharding.tables.t1.type=row_wise`) to raw TOML data."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: write it as section.key=value, e.g. train.epochs=2")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
    node[parts[-1]] = _parse_value(text.strip())


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a TOML config, apply `--set` overrides, and validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a TOML file such as configs/dlrm_synth.toml")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return _build(RunConfig, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, raw, "")
