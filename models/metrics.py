"""Evaluation metrics, exact across ranks.

AUC is torchmetrics' BinaryAUROC without thresholds: it keeps every prediction and gathers
them from all ranks at compute time, so the multi-rank AUC equals the single-process one.
Logloss, normalized entropy and calibration come from sums reduced across ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import MeanAbsoluteError, MeanSquaredError, Metric
from torchmetrics.classification import BinaryAUROC


class _BinarySums(Metric):
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("logloss_sum", "count", "label_sum", "pred_sum"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        loss = F.binary_cross_entropy_with_logits(logits.double(), labels.double(), reduction="sum")
        self.logloss_sum += loss
        self.count += labels.numel()
        self.label_sum += labels.double().sum()
        self.pred_sum += logits.double().sigmoid().sum()

    def compute(self) -> dict[str, float]:
        n = float(self.count)
        if n == 0:
            return {"logloss": float("nan"), "ne": float("nan"), "calibration": float("nan"), "num_samples": 0}
        logloss = float(self.logloss_sum) / n
        p = float(self.label_sum) / n
        entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else float("nan")
        calibration = float(self.pred_sum) / float(self.label_sum) if float(self.label_sum) > 0 else float("nan")
        return {"logloss": logloss, "ne": logloss / entropy, "calibration": calibration, "num_samples": int(n)}


class BinaryTaskMetrics:
    """AUC, logloss, NE (logloss / entropy of the base rate) and calibration (sum p / sum y)."""

    def __init__(self, device: torch.device) -> None:
        self.auroc = BinaryAUROC(thresholds=None).to(device)
        self.sums = _BinarySums().to(device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        logits, labels = logits[mask], labels[mask]
        self.auroc.update(logits.sigmoid(), labels.long())
        self.sums.update(logits, labels)

    def compute(self) -> dict[str, float]:
        out = self.sums.compute()
        out["auc"] = float(self.auroc.compute()) if out["num_samples"] else float("nan")
        return out


class ScoreAUC:
    """AUC of any ranking score (not necessarily a probability) against 0/1 labels; exact
    across ranks. Scores go through one fixed order-preserving map into (0, 1) first:
    torchmetrics decides per update() call whether to squash with a sigmoid, which would rank
    batches on different scales, and a sigmoid would also tie large values."""

    def __init__(self, device: torch.device) -> None:
        self.auroc = BinaryAUROC(thresholds=None).to(device)

    def update(self, scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        x = scores[mask].double()
        self.auroc.update(0.5 + 0.5 * x / (1.0 + x.abs()), labels[mask].long())

    def compute(self) -> float:
        return float(self.auroc.compute())


class _LabelMoments(Metric):
    """Sum of y and y^2 across ranks: the label variance is the MSE of the best constant."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("count", "y_sum", "y2_sum"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, labels: torch.Tensor) -> None:
        y = labels.double()
        self.count += y.numel()
        self.y_sum += y.sum()
        self.y2_sum += (y * y).sum()

    def compute(self) -> tuple[int, float]:
        """(samples, label variance), both over all ranks."""
        n = float(self.count)
        if n == 0:
            return 0, float("nan")
        mean = float(self.y_sum) / n
        return int(n), max(float(self.y2_sum) / n - mean * mean, 0.0)


class RegressionTaskMetrics:
    """MSE and MAE, summed across ranks, plus the label variance (the MSE a constant
    prediction at the label mean would get), so every report shows the baseline."""

    def __init__(self, device: torch.device) -> None:
        self.mse = MeanSquaredError().to(device)
        self.mae = MeanAbsoluteError().to(device)
        self.moments = _LabelMoments().to(device)

    def update(self, outputs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        self.mse.update(outputs[mask], labels[mask])
        self.mae.update(outputs[mask], labels[mask])
        self.moments.update(labels[mask])

    def compute(self) -> dict[str, float]:
        # Counts come from a synced compute: a metric's own state attributes stay rank-local.
        n, variance = self.moments.compute()
        if n == 0:
            return {"mse": float("nan"), "mae": float("nan"), "label_variance": float("nan"), "num_samples": 0}
        return {"mse": float(self.mse.compute()), "mae": float(self.mae.compute()),
                "label_variance": variance, "num_samples": n}
