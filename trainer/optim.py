"""Optimizers: FBGEMM's fused embedding optimizer (runs inside backward), a matching optimizer
for data-parallel tables, a dense optimizer with gradient clipping for the DDP part, and the
warmup/decay LR schedule over all of them."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.optim.clipping import GradientClipping, GradientClippingOptimizer
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from trainer.config import OptimizerConfig


def _embedding_optimizer(cfg: OptimizerConfig):
    """The unfused twin of the fused embedding optimizer, for data-parallel tables."""
    decay = cfg.embedding_weight_decay
    if cfg.embedding == "rowwise_adagrad":
        return lambda params: RowWiseAdagrad(params, lr=cfg.embedding_lr, eps=cfg.embedding_eps, weight_decay=decay)
    if cfg.embedding == "adam":
        return lambda params: torch.optim.Adam(params, lr=cfg.embedding_lr, eps=cfg.embedding_eps, weight_decay=decay)
    return lambda params: torch.optim.SGD(params, lr=cfg.embedding_lr, weight_decay=decay)


def _dense_optimizer(cfg: OptimizerConfig):
    if cfg.dense == "adam":
        return lambda params: torch.optim.Adam(params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)
    if cfg.dense == "adagrad":
        return lambda params: torch.optim.Adagrad(params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)
    return lambda params: torch.optim.SGD(params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> CombinedOptimizer:
    """One keyed optimizer over everything, so that its state_dict is keyed by parameter FQN
    (what DCP needs to reshard it across world sizes)."""
    parts: list[tuple[str, KeyedOptimizer]] = [("", model.fused_optimizer)]
    unfused = dict(in_backward_optimizer_filter(model.named_parameters(), include=False))
    table_params = {
        id(p) for m in model.modules() if isinstance(m, ShardedEmbeddingBagCollection) for p in m.parameters()
    }
    dp_tables = {n: p for n, p in unfused.items() if id(p) in table_params}
    dense = {n: p for n, p in unfused.items() if id(p) not in table_params}
    if dp_tables:
        parts.append(("data_parallel_tables", KeyedOptimizerWrapper(dp_tables, _embedding_optimizer(cfg))))
    if dense:
        dense_opt: KeyedOptimizer = KeyedOptimizerWrapper(dense, _dense_optimizer(cfg))
        if cfg.grad_clip_norm > 0:
            dense_opt = GradientClippingOptimizer(dense_opt, GradientClipping.NORM, cfg.grad_clip_norm)
        parts.append(("dense", dense_opt))
    return CombinedOptimizer(parts)


class LRSchedule:
    """Linear warmup from 0, then constant, linear or cosine decay to `min_lr_ratio` at
    `total_steps`. It is a pure function of the step, so resuming needs only the step."""

    def __init__(self, optimizer: CombinedOptimizer, fused: KeyedOptimizer, cfg: OptimizerConfig,
                 total_steps: int) -> None:
        self.optimizer = optimizer
        self.fused = fused
        self.cfg = cfg
        self.total_steps = max(1, total_steps)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    def factor(self, step: int) -> float:
        """LR multiplier for the update made at `step` (0-based)."""
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.decay == "none":
            return 1.0
        span = max(1, self.total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        shape = 1.0 - progress if cfg.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape

    def apply(self, step: int) -> float:
        """Set every group's LR for `step`; returns the multiplier."""
        f = self.factor(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f
        # The fused update happens inside backward with the kernel's LR; push it there now.
        self.fused.step()
        return f
