"""Model registry and the contract every model keeps with the trainer.

A model is a :class:`RecModel` built on the meta device (DistributedModelParallel
materializes it) and registered with its typed arch config::

    @dataclass
    class MyConfig:            # torch-free; `[model.arch]` in TOML; validated in __post_init__
        hidden: list[int] = field(default_factory=lambda: [64])

    @register("my_model", config=MyConfig)
    class MyModel(RecModel):
        def __init__(self, model_cfg, inputs: ModelInputs, tasks: list[Task]): ...
        def forward(self, dense, sparse) -> dict[str, Tensor]: ...

- ``forward(dense: Tensor[B, D], sparse: KeyedJaggedTensor) -> dict[str, Tensor]``: named
  outputs; each task reads ``outputs[task.name]`` (a [B] logit or value).
- ``tasks``: the :class:`~models.tasks.Task` objects, built from ``model.tasks`` by the registry;
  ``loss()`` returns the weighted total and the per-task losses.

Builders receive the model config (``model.*`` of the run config, duck-typed so that this
package never imports the trainer; ``model_cfg.arch`` is the model's typed config) and a
:class:`ModelInputs` describing the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from models.tasks import Task, build_tasks, total_loss


class ArchConfigError(ValueError):
    """A bad `[model.arch]` value; the trainer's config loader turns it into a ConfigError."""


def require(ok: bool, key: str, message: str) -> None:
    """For arch configs' `__post_init__`: one-line errors that name `model.arch.<key>`."""
    if not ok:
        raise ArchConfigError(f"config key 'model.arch.{key}': {message}")


def check_layers(sizes: list[int], key: str, allow_empty: bool = False) -> None:
    """MLP layer sizes: positive integers, and at least one unless `allow_empty`."""
    example = "e.g. [64, 32]"
    require(allow_empty or len(sizes) > 0, key, f"list at least one layer size, {example}")
    require(all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes), key,
            f"layer sizes must be positive integers, {example}; got {sizes}")


def check_count(value: int, key: str, minimum: int = 1) -> None:
    require(isinstance(value, int) and value >= minimum, key, f"must be an integer >= {minimum}; got {value}")


def check_dropout(value: float, key: str = "dropout") -> None:
    require(0.0 <= value < 1.0, key, f"must be within [0, 1); got {value}")


@dataclass(frozen=True)
class ModelInputs:
    num_dense: int
    label_names: tuple[str, ...]
    weighted: bool = False  # per-id weights present in the KeyedJaggedTensor
    # Retrieval models that sample extra negatives: the item catalog (data/catalog.ItemCatalog:
    # `item_ids` [N] and `kjt_rows(rows) -> {feature: (values, lengths)}`); None otherwise.
    item_catalog: Any = field(default=None, compare=False)


class RecModel(nn.Module):
    """Base class: holds the tasks and sums their weighted losses."""

    # A retrieval model (two_tower): its eval forward has no candidates to score a loss against.
    is_retrieval = False

    def __init__(self, tasks: list[Task]) -> None:
        super().__init__()
        self.tasks = list(tasks)

    def loss(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor,
             weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted total [], per-task losses [T]); per task the weighted mean over samples
        (weight 0 marks padding rows)."""
        return total_loss(self.tasks, outputs, labels, weights)

    def train_stats(self, outputs: dict[str, torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scalars worth logging during training besides the losses ({name: [] tensor}, detached)."""
        return {}

    def predictions(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Probabilities for binary tasks, values for regression; {task: [B]}."""
        return {t.name: t.predict(t.output(outputs)) for t in self.tasks}

    def split_heads(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, T] head outputs in task order -> {task: [B]}."""
        return {t.name: logits[:, i] for i, t in enumerate(self.tasks)}


@dataclass
class NoArch:
    """For models without settings of their own."""


@dataclass(frozen=True)
class ModelEntry:
    builder: Callable[[Any, ModelInputs, list[Task]], RecModel]
    config: type
    retrieval: bool = False  # trains retrieval tasks (kind "retrieval") instead of ranking ones


MODELS: dict[str, ModelEntry] = {}


def register(name: str, config: type = NoArch, retrieval: bool = False) -> Callable:
    """Class or function decorator: `builder(model_cfg, inputs, tasks) -> RecModel`;
    `retrieval` marks a model that trains retrieval tasks (the config checks task kinds by it)."""

    def wrap(builder):
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = ModelEntry(builder, config, retrieval)
        return builder

    return wrap


def _entry(name: str) -> ModelEntry:
    import models  # noqa: F401  (importing the package registers every model file)

    if name not in MODELS:
        raise ArchConfigError(f"config key 'model.name': unknown model {name!r}; "
                              f"registered models are {', '.join(sorted(MODELS))}")
    return MODELS[name]


def arch_config_class(name: str) -> type:
    return _entry(name).config


def is_retrieval_model(name: str) -> bool:
    return _entry(name).retrieval


def build_model(model_cfg: Any, inputs: ModelInputs) -> RecModel:
    """Build `model_cfg.name` on the meta device, with its tasks."""
    entry = _entry(model_cfg.name)
    tasks = build_tasks(model_cfg.tasks, inputs.label_names)
    return entry.builder(model_cfg, inputs, tasks)


def embedding_bag_configs(model_cfg: Any, features: list[str] | None = None, dim: int | None = None,
                          prefix: str = "") -> list[EmbeddingBagConfig]:
    """TorchRec table configs from `model.tables`: all of them, or only the tables that hold
    `features` (restricted to those), optionally at another dim under a name prefix (e.g. a
    Wide&Deep's dim-1 wide tables beside the deep ones)."""
    pooling = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
    wanted = None if features is None else set(features)
    configs = []
    for t in model_cfg.tables:
        names = [f for f in t.features if wanted is None or f in wanted]
        if names:
            configs.append(EmbeddingBagConfig(
                name=prefix + t.name,
                embedding_dim=dim or t.embedding_dim or model_cfg.embedding_dim,
                num_embeddings=t.num_embeddings,
                feature_names=names,
                pooling=pooling[t.pooling],
            ))
    return configs
