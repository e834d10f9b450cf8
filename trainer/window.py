"""What the loop accumulates between two log lines, reduced across ranks only when logged."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from data.batch import Batch
from data.schema import COUNTER_NAMES


class LogWindow:
    """Task losses, samples and data counters since the last log, reduced across ranks on
    demand (the only host sync of the loop happens at logging steps)."""

    def __init__(self, num_features: int, num_tasks: int) -> None:
        self.num_features = num_features
        self.num_tasks = num_tasks
        self.reset()

    def reset(self) -> None:
        self.loss_sums: torch.Tensor | None = None  # [1 + T]: weighted total, then each task
        self.stat_sums: dict[str, torch.Tensor] = {}  # the model's train stats x samples
        self.samples = 0
        self.id_stats = np.zeros((self.num_features, len(COUNTER_NAMES)), dtype=np.int64)
        self.null_dense = 0
        self.negative_dense = 0
        self.dropped_rows = 0
        self.started = time.perf_counter()

    def add(self, batch: Batch, task_losses: torch.Tensor, task_weights: torch.Tensor,
            stats: dict[str, torch.Tensor] | None = None) -> None:
        """`stats`: the model's scalar train statistics of this step (averaged over samples)."""
        n = batch.num_samples
        for key, value in (stats or {}).items():
            weighted = value.detach().double().reshape(()) * n
            self.stat_sums[key] = self.stat_sums[key] + weighted if key in self.stat_sums else weighted
        losses = torch.cat([(task_losses * task_weights.to(task_losses)).sum().reshape(1), task_losses])
        sums = losses.detach().double() * n
        self.loss_sums = sums if self.loss_sums is None else self.loss_sums + sums
        self.samples += n
        if batch.id_stats.size:
            self.id_stats += batch.id_stats
        self.null_dense += batch.null_dense
        self.negative_dense += batch.negative_dense
        self.dropped_rows += batch.dropped_rows

    def reduce(self, device: torch.device) -> dict:
        losses = self.loss_sums if self.loss_sums is not None else torch.zeros(1 + self.num_tasks)
        stat_names = sorted(self.stat_sums)  # every rank logs the same stats (same model)
        packed = torch.cat([
            losses.double().to(device),
            *(self.stat_sums[k].reshape(1).to(device) for k in stat_names),
            torch.tensor([self.samples, self.null_dense, self.negative_dense, self.dropped_rows],
                         dtype=torch.float64, device=device),
            torch.from_numpy(self.id_stats.sum(axis=0).astype(np.float64)).to(device),
        ])
        dist.all_reduce(packed)
        values = packed.tolist()
        stat_values = values[1 + self.num_tasks: 1 + self.num_tasks + len(stat_names)]
        values = values[:1 + self.num_tasks] + values[1 + self.num_tasks + len(stat_names):]
        t = 1 + self.num_tasks
        samples = int(values[t])
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        counters = {f"{name}_ids": values[t + 4 + i] for i, name in enumerate(COUNTER_NAMES)}
        counters["null_dense_values"] = values[t + 1]
        counters["negative_dense_values"] = values[t + 2]
        counters["dropped_rows"] = values[t + 3]
        self.reset()
        denom = max(samples, 1)
        return {"loss": values[0] / denom, "task_losses": [v / denom for v in values[1:t]], "samples": samples,
                "samples_per_sec": samples / elapsed, "counters": counters,
                "stats": {k: v / denom for k, v in zip(stat_names, stat_values)}}
