"""Typed run configuration: dataclasses loaded from TOML, `--set a.b=v` overrides, validation.

Every section validates itself in ``__post_init__`` and raises :class:`ConfigError` with the
dotted key that is wrong and how to fix it. This module knows nothing of torch.
"""

from __future__ import annotations

import dataclasses
import re
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
TASK_KINDS = ("binary", "regression", "retrieval")
REGRESSION_LOSSES = ("mse", "huber")
# Keys that moved into a model's typed `[model.arch]` section; named in the error for old configs.
_MOVED_KEYS = {"model.dense_arch": "model.arch.dense_arch", "model.over_arch": "model.arch.over_arch",
               "model.options": "model.arch (the model's typed settings)"}


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
    # Missing dense values become 0; "indicator" also appends one 0/1 "was missing" feature per
    # dense column, so the model can tell a real 0 from a gap.
    dense_missing: str = "zero"
    batch_size: int = 512
    eval_batch_size: int = 4096
    num_workers: int = 1
    shuffle_buffer_rows: int = 16384
    prefetch_factor: int = 2
    seed: int = 0
    # A NaN or infinite dense value or label: "error" stops at startup/first read naming the file,
    # column and row; "drop_row" leaves the row out and counts it (reported like the id counters).
    non_finite: str = "error"
    # Longest id list a row may have per feature: longer lists are cut to it and counted
    # ("truncate"), or are an error naming the file, column and row ("error").
    max_list_length: int = 10_000
    list_overflow: str = "truncate"
    # Retrieval: the item catalog (Parquet: item id, item features, optional title) that
    # evaluation scores in full, extra negatives are sampled from and export embeds; and the
    # names of the eval files' held-out positives, already-seen items and the catalog's titles.
    items_path: str = ""
    targets_column: str = "targets"
    seen_column: str = "seen"
    title_column: str = "title"

    def __post_init__(self) -> None:
        # An empty label_columns is checked by RunConfig: only retrieval tasks may read no label.
        _require(bool(self.sparse_columns), "data.sparse_columns", "list the categorical id columns")
        _one_of(self.id_policy, ID_POLICIES, "data.id_policy")
        _one_of(self.dense_transform, ("none", "log1p"), "data.dense_transform")
        _one_of(self.dense_missing, ("zero", "indicator"), "data.dense_missing")
        _require(self.batch_size > 0, "data.batch_size", "must be a positive integer")
        _require(self.eval_batch_size > 0, "data.eval_batch_size", "must be a positive integer")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0 (0 reads in the main process)")
        _require(self.shuffle_buffer_rows >= 0, "data.shuffle_buffer_rows", "must be >= 0 (0 disables shuffling)")
        _require(self.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
        _one_of(self.non_finite, ("error", "drop_row"), "data.non_finite")
        _require(self.max_list_length >= 1, "data.max_list_length", "must be >= 1")
        _one_of(self.list_overflow, ("truncate", "error"), "data.list_overflow")
        all_cols = self.label_columns + self.dense_columns + self.sparse_columns
        dup = sorted({c for c in all_cols if all_cols.count(c) > 1})
        _require(not dup, "data", f"columns {dup} are listed in more than one role; give each one role")
        for feature in self.weight_columns:
            _require(feature in self.sparse_columns, f"data.weight_columns.{feature}",
                     "weights must belong to a feature listed in data.sparse_columns")
        for key in ("targets_column", "seen_column", "title_column"):
            _require(bool(getattr(self, key)), f"data.{key}", "must name a column")


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
class TaskConfig:
    """One prediction task: which label column it learns, its loss and its weight in the total."""

    name: str = ""
    label: str = ""  # label column; default: the task name (retrieval tasks have none)
    # binary: BCE on a logit; regression: MSE or Huber on a value; retrieval: sampled softmax
    # over in-batch (and sampled) candidates, for a retrieval model such as two_tower
    kind: str = "binary"
    loss: str = ""  # regression: mse (default) or huber; binary: bce; retrieval: sampled_softmax
    huber_delta: float = 1.0
    weight: float = 1.0  # weight of this task's loss in the training total
    # Weight of this task's prediction in the serving score (probability for binary tasks, value
    # for regression) that multi-task evaluation reports; 0 leaves the task out of it.
    serving_weight: float = 1.0
    # Retrieval: the K of recall@K, ndcg@K, hit_rate@K and coverage@K (other kinds ignore it).
    top_k: list[int] = field(default_factory=lambda: [10, 50, 100])

    def validate(self, key: str) -> None:
        _require(bool(self.name), f"{key}.name", "every task needs a name")
        _require(self.name != "serving" and not any(c in self.name for c in "./ "), f"{key}.name",
                 f"{self.name!r} cannot name a task: 'serving' is the combined score and '.', '/' and "
                 f"spaces separate metric names; use e.g. 'click' or 'watch_time'")
        _one_of(self.kind, TASK_KINDS, f"{key}.kind")
        if self.kind == "retrieval":
            _require(not self.label, f"{key}.label", "a retrieval task reads no label column (its positive is the "
                     "row's item); remove the label")
            self.loss = self.loss or "sampled_softmax"
            _one_of(self.loss, ("sampled_softmax",), f"{key}.loss")
            top_k = self.top_k
            _require(bool(top_k) and all(isinstance(k, int) and k > 0 for k in top_k)
                     and top_k == sorted(set(top_k)), f"{key}.top_k",
                     f"list positive integers in increasing order without repeats, e.g. [10, 50, 100]; got {top_k}")
        elif not self.label:
            self.label = self.name
        if self.kind == "binary":
            self.loss = self.loss or "bce"
            _one_of(self.loss, ("bce",), f"{key}.loss")
        elif self.kind == "regression":
            self.loss = self.loss or "mse"
            _one_of(self.loss, REGRESSION_LOSSES, f"{key}.loss")
        _require(self.huber_delta > 0, f"{key}.huber_delta", "must be > 0")
        _require(self.weight >= 0, f"{key}.weight", "must be >= 0")


@dataclass
class ModelConfig:
    """Which registered model to build, its tables, tasks, feature groups and typed arch.

    ``arch`` holds the model's own settings (``[model.arch]`` in TOML): a dataclass registered
    with the model (``register("dcn_v2", config=DCNv2Config)``) and validated like the rest.
    """

    name: str = "dlrm"
    embedding_dim: int = 16
    tables: list[TableConfig] = field(default_factory=list)
    # Empty: one binary task per data.label_columns entry.
    tasks: list[TaskConfig] = field(default_factory=list)
    # Named subsets of the table features for models that treat them apart (wide vs deep).
    feature_groups: dict[str, list[str]] = field(default_factory=dict)
    arch: Any = None

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
        for i, task in enumerate(self.tasks):
            task.validate(f"model.tasks[{i}]")
        tnames = [t.name for t in self.tasks]
        dup = sorted({n for n in tnames if tnames.count(n) > 1})
        _require(not dup, "model.tasks", f"task names {dup} repeat; give each task a unique name")
        known = set(feats)
        for group, members in self.feature_groups.items():
            _require(bool(members), f"model.feature_groups.{group}", "list at least one feature")
            missing = [f for f in members if f not in known]
            _require(not missing, f"model.feature_groups.{group}",
                     f"features {missing} are not looked up by any table; tables use {sorted(known)}")
        self.arch = _resolve_arch(self.name, self.arch)
        for group in getattr(self.arch, "feature_groups", ()):
            _require(group in self.feature_groups, f"model.feature_groups.{group}",
                     f"model {self.name!r} needs this group; add `{group} = [...]` under [model.feature_groups]")
        self._check_task_kinds()
        check = getattr(self.arch, "check_model", None)  # arch settings that depend on the tables
        if check is not None:
            check(self)

    @property
    def is_retrieval(self) -> bool:
        """A retrieval model (two_tower): it trains retrieval tasks only."""
        from models.registry import is_retrieval_model

        return is_retrieval_model(self.name)

    def _check_task_kinds(self) -> None:
        """Retrieval tasks go with retrieval models and ranking tasks with ranking models; a
        retrieval model without tasks gets one retrieval task named "retrieval"."""
        if self.is_retrieval:
            if not self.tasks:
                self.tasks = [TaskConfig(name="retrieval", kind="retrieval")]
                self.tasks[0].validate("model.tasks[0]")
            for i, task in enumerate(self.tasks):
                _require(task.kind == "retrieval", f"model.tasks[{i}].kind",
                         f"model {self.name!r} trains retrieval tasks only; set kind = \"retrieval\" or use a "
                         f"ranking model (dlrm, dcn_v2, ...) for {task.kind!r}")
            _require(len(self.tasks) == 1, "model.tasks", f"model {self.name!r} trains one retrieval task; "
                     f"got {len(self.tasks)}")
            return
        for i, task in enumerate(self.tasks):
            _require(task.kind != "retrieval", f"model.tasks[{i}].kind",
                     f"a retrieval task needs a retrieval model such as two_tower; model.name is {self.name!r} "
                     f"(a ranking model): use kind binary or regression")

    @property
    def feature_names(self) -> list[str]:
        return [f for t in self.tables for f in t.features]


def _resolve_arch(model_name: str, raw: Any) -> Any:
    """The registered model's typed arch config, built from the raw `[model.arch]` table."""
    from models.registry import arch_config_class  # the registry imports the model files

    cls = arch_config_class(model_name)
    if dataclasses.is_dataclass(raw) and not isinstance(raw, type):
        _require(isinstance(raw, cls), "model.arch", f"expected {cls.__name__} for model {model_name!r}")
        return raw
    return _build(cls, raw if raw is not None else {}, "model.arch")


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
    # L2 penalty on the embedding rows a step touches (FBGEMM's fused optimizers apply it in
    # the backward kernel); the usual cure for small click logs that overfit their id tables.
    embedding_weight_decay: float = 0.0
    dense: str = "adam"
    dense_lr: float = 1e-3
    weight_decay: float = 0.0  # dense parameters
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
        _require(self.embedding_weight_decay >= 0, "optimizer.embedding_weight_decay", "must be >= 0")
        _require(self.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
        _require(self.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio", "must be within [0, 1]")
        _require(self.grad_clip_norm >= 0, "optimizer.grad_clip_norm", "must be >= 0 (0 disables)")


@dataclass
class PrecisionConfig:
    """Mixed precision (see README, Precision): the dense arches' compute dtype, the tables'
    storage dtype and the embedding all-to-all's wire dtype. Loss, metrics and the NaN guard
    stay in fp32 whatever is chosen."""

    # Autocast around the model's dense part; the pooled embeddings enter it in this dtype.
    # fp16 adds dynamic loss scaling (GradScaler for the dense optimizer; the tables' fused
    # optimizer gets the unscaled gradient).
    dense: str = "fp32"
    # Storage dtype of the FBGEMM-fused (sharded) tables; their fused optimizer rounds its
    # updates stochastically. Data-parallel tables stay fp32.
    embeddings: str = "fp32"
    # TorchRec quantized comms: the dtype of the embedding all-to-all, forward and backward.
    comms: str = "fp32"

    def __post_init__(self) -> None:
        _one_of(self.dense, ("fp32", "bf16", "fp16"), "precision.dense")
        _one_of(self.embeddings, ("fp32", "fp16"), "precision.embeddings")
        _one_of(self.comms, ("fp32", "fp16", "bf16"), "precision.comms")


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
    # A step whose loss is NaN or infinite: "error" stops the run (no checkpoint is written from
    # it); "skip" drops the step's update, counts it, and stops once max_skipped_steps is passed.
    non_finite_loss: str = "error"
    max_skipped_steps: int = 10
    # Keep freed memory in the process instead of returning it to the OS after every step
    # (glibc malloc; trainer/host.py): saves a page fault per page of every large tensor, the
    # resident memory stays at its peak instead.
    keep_freed_memory: bool = True
    # With keep_freed_memory: every that many steps, hand the heap's free pages back to the OS
    # (malloc_trim), so that what the allocator keeps but fragmentation leaves unused cannot
    # pile up over a long run (the next step faults its blocks in once). 0: never.
    release_freed_memory_every: int = 1000

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs", "must be >= 1")
        _require(self.max_steps >= 0, "train.max_steps", "must be >= 0 (0 means run all epochs)")
        _require(self.stop_at_step >= 0, "train.stop_at_step", "must be >= 0 (0 disables)")
        _require(self.log_every >= 1, "train.log_every", "must be >= 1")
        _one_of(self.device, ("auto", "cpu", "cuda"), "train.device")
        _one_of(self.non_finite_loss, ("error", "skip"), "train.non_finite_loss")
        _require(self.max_skipped_steps >= 0, "train.max_skipped_steps", "must be >= 0")
        _require(self.release_freed_memory_every >= 0, "train.release_freed_memory_every",
                 "must be >= 0 (0: never; 1000 hands free heap pages back every 1,000 steps)")


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: only at the end
    at_end: bool = True
    max_batches: int = 0  # 0: the whole eval set (exact metrics need it)
    # The metric that defines the best evaluation, for early stopping and checkpoint.keep_best:
    # "auc", "logloss", ... (the first task's), or "<task>.<metric>" / "serving.<metric>".
    best_metric: str = ""
    # Stop training after this many evaluations without improving best_metric (0: never).
    patience: int = 0
    min_delta: float = 0.0  # improvements smaller than this do not count

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "eval.every_steps", "must be >= 0")
        _require(self.max_batches >= 0, "eval.max_batches", "must be >= 0")
        _require(self.patience >= 0, "eval.patience", "must be >= 0 (0 disables early stopping)")
        _require(self.min_delta >= 0, "eval.min_delta", "must be >= 0")
        _require(not self.patience or bool(self.best_metric), "eval.patience",
                 "early stopping needs eval.best_metric, e.g. \"auc\"")
        _require(not self.patience or self.every_steps > 0, "eval.patience",
                 "early stopping needs periodic evaluation; set eval.every_steps")


@dataclass
class CheckpointConfig:
    dir: str = ""  # default: <run_dir>/checkpoints
    every_steps: int = 0  # 0: only at the end
    keep_last: int = 3
    # auto: resume from the latest complete checkpoint in dir, if any, refusing when the config
    # changed beyond the keys that may change on resume; force: resume whatever changed;
    # never: start fresh.
    resume: str = "auto"
    at_end: bool = True
    # Also keep the checkpoint of the best evaluation by eval.best_metric (saved at that
    # evaluation, exempt from keep_last, recorded in <checkpoint dir>/best.json).
    keep_best: bool = False
    # Write checkpoints in the background (DCP async save): training goes on while the files
    # are written; still atomic (renamed only when complete).
    async_save: bool = True

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        _one_of(self.resume, ("auto", "never", "force"), "checkpoint.resume")


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
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        labels = self.data.label_columns
        if self.model.is_retrieval:
            _require(not labels, "data.label_columns", f"model {self.model.name!r} reads no labels (each row's "
                     f"item is its positive); set label_columns = []")
        else:
            _require(bool(labels), "data.label_columns", "list at least one label column (only a retrieval "
                     "model such as two_tower reads none)")
        if not self.model.tasks:
            self.model.tasks = [TaskConfig(name=c, label=c) for c in labels]
            for i, task in enumerate(self.model.tasks):
                task.validate(f"model.tasks[{i}]")
        for i, task in enumerate(self.model.tasks):
            _require(task.kind == "retrieval" or task.label in labels, f"model.tasks[{i}].label",
                     f"label column {task.label!r} is not in data.label_columns {labels}; add it there")
        if self.model.is_retrieval:
            _require(not getattr(self.model.arch, "extra_negatives", 0) or bool(self.data.items_path),
                     "data.items_path", "model.arch.extra_negatives samples negatives from the item catalog; "
                     "set data.items_path (the converter writes OUT/items)")
            _require(not self.data.eval_path or bool(self.data.items_path), "data.items_path",
                     "retrieval evaluation ranks the full item catalog; set data.items_path (OUT/items)")
            # The catalog, the sampled negatives and the exported query tower carry no per-id weights.
            _require(not self.data.weight_columns, "data.weight_columns",
                     f"model {self.model.name!r} does not support per-id weights; remove data.weight_columns")
        _require(not self.checkpoint.keep_best or bool(self.eval.best_metric), "checkpoint.keep_best",
                 "needs eval.best_metric (the metric that defines best), e.g. \"auc\"")
        if not self.data.eval_path:
            for key, used in (("eval.every_steps", self.eval.every_steps), ("eval.best_metric", self.eval.best_metric),
                              ("checkpoint.keep_best", self.checkpoint.keep_best)):
                _require(not used, key, "needs eval data; set data.eval_path")
        if len(self.model.tasks) > 1:
            _require(any(t.serving_weight for t in self.model.tasks), "model.tasks",
                     "every serving_weight is 0; give at least one task a serving_weight for the serving score")
        sparse = set(self.data.sparse_columns)
        for i, table in enumerate(self.model.tables):
            for f in table.features:
                _require(f in sparse, f"model.tables[{i}].features",
                         f"feature {f!r} is not in data.sparse_columns; add it there or fix the name")
        orphans = [c for c in self.data.sparse_columns if c not in set(self.model.feature_names)]
        _require(not orphans, "data.sparse_columns",
                 f"columns {orphans} have no table; add a [[model.tables]] entry whose features list them, "
                 f"or drop them from data.sparse_columns")
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
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(raw) - names)
        if unknown:
            dotted = f"{key + '.' if key else ''}{unknown[0]}"
            moved = _MOVED_KEYS.get(dotted)
            _require(False, dotted, f"moved to {moved}" if moved else
                     f"unknown key; valid keys here are {', '.join(sorted(names))}")
        kwargs = {n: _build(hints[n], v, f"{key}.{n}" if key else n) for n, v in raw.items()}
        try:
            return cls(**kwargs)
        except ConfigError:
            raise
        except ValueError as e:  # a model's arch config validates itself without importing this module
            raise ConfigError(str(e)) from None
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
        raise ConfigError(f"{_blame(str(e), overrides) or path}: {e}" if path or overrides else str(e)) from None


def _blame(message: str, overrides: list[str] | tuple[str, ...]) -> str:
    """`--set K=V` when the key the error names was set on the command line (not in the file)."""
    match = re.search(r"config key '([^']+)'", message)
    if not match:
        return ""
    key = match.group(1)
    for assignment in reversed(overrides):
        dotted = assignment.split("=", 1)[0].strip()
        if key == dotted or key.startswith(dotted + ".") or key.startswith(dotted + "["):
            return f"--set {assignment}"
    return ""


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, raw, "")
