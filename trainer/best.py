"""The best evaluation so far by `eval.best_metric`: drives early stopping and keep-best
checkpoints. Its state travels in the checkpoint, so a resumed run keeps counting."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from models.tasks import resolve_metric
from trainer.config import ConfigError


@dataclass
class BestState:
    metric: str = ""
    higher_is_better: bool = True
    value: float | None = None
    step: int = 0
    evals_since_best: int = 0


class BestTracker:
    def __init__(self, metric: str, higher_is_better: bool, patience: int = 0, min_delta: float = 0.0) -> None:
        self.metric = metric
        self.higher_is_better = higher_is_better
        self.patience = patience
        self.min_delta = min_delta
        self.state = self._fresh()

    def _fresh(self) -> BestState:
        return BestState(self.metric, self.higher_is_better)

    def update(self, step: int, value: float) -> bool:
        """Record an evaluation; True if it is the new best. NaN never is."""
        best = self.state.value
        gain = (value - best if self.higher_is_better else best - value) if best is not None else math.inf
        if not math.isnan(value) and gain > self.min_delta:
            self.state = BestState(self.metric, self.higher_is_better, value, step, 0)
            return True
        self.state.evals_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.state.evals_since_best >= self.patience

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved best; one saved for another metric (eval.best_metric changed on
        resume) is not comparable, so tracking starts over."""
        saved = BestState(**state) if state else None
        same = saved is not None and (saved.metric, saved.higher_is_better) == (self.metric, self.higher_is_better)
        self.state = saved if same else self._fresh()


def best_tracker(cfg, tasks) -> BestTracker | None:
    """From `eval.*` (best_metric, patience, min_delta); None without a best_metric."""
    if not cfg.best_metric:
        return None
    try:
        higher = resolve_metric(tasks, cfg.best_metric)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return BestTracker(cfg.best_metric, higher, cfg.patience, cfg.min_delta)
