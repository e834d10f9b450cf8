"""The small, non-tensor part of a checkpoint: counters, data cursors, RNG states, config.

It is gathered from all ranks and stored as one JSON string, identical on every rank, because
DCP keeps a single copy of each replicated non-tensor entry.
"""

from __future__ import annotations

import base64
import json
import pickle
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    step_in_epoch: int = 0
    samples: int = 0  # real (non-padding) samples trained on, all ranks
    world_size: int = 1
    data: list[dict] = field(default_factory=list)  # per rank reader cursor
    rng: list[str] = field(default_factory=list)  # per rank, base64 pickled
    config: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)  # BestTracker state (eval.best_metric)
    skipped_steps: int = 0  # steps whose loss was NaN/Inf and whose update was dropped
    grad_scaler: dict = field(default_factory=dict)  # fp16 loss scale (precision.dense = "fp16")
    # What the run means, kept across a change of world size: the global batch (rows per step)
    # and the steps of an epoch at that batch (the LR horizon), both from the run's first start.
    global_batch: int = 0
    steps_per_epoch: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        return cls(**json.loads(text))


def capture_rng() -> str:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return base64.b64encode(pickle.dumps(state)).decode()


def restore_rng(blob: str) -> None:
    state = pickle.loads(base64.b64decode(blob))
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
