"""Recommendation models. Every module in this package that calls `register` is a model:
adding one is a new file here plus a TOML in configs/, with no trainer edit."""

import importlib
import pkgutil

from models.registry import MODELS, RecModel, build_model, register
from models.tasks import BinaryTask, InBatchSoftmaxTask, RegressionTask, Task

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["MODELS", "BinaryTask", "InBatchSoftmaxTask", "RecModel", "RegressionTask", "Task", "build_model", "register"]
