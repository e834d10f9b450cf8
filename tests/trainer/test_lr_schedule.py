"""trainer/optim.py LRSchedule: warmup then none/linear/cosine decay, as a function of step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from trainer.config import OptimizerConfig
from trainer.optim import LRSchedule


def _schedule(total_steps: int, **cfg_kw) -> tuple[LRSchedule, torch.optim.Optimizer]:
    torch.manual_seed(0)
    dense = nn.Linear(3, 2)
    inner: list[torch.optim.Optimizer] = []

    def sgd(params):
        opt = torch.optim.SGD(params, lr=0.2)
        inner.append(opt)
        return opt

    wrapped = KeyedOptimizerWrapper(dict(dense.named_parameters()), sgd)
    combined = CombinedOptimizer([("dense", wrapped)])
    fused = KeyedOptimizerWrapper(dict(nn.Linear(2, 2).named_parameters()), lambda p: torch.optim.SGD(p, lr=0.05))
    return LRSchedule(combined, fused, OptimizerConfig(**cfg_kw), total_steps), inner[0]


def test_warmup_linear_from_one_over_warmup_to_one():
    s, _ = _schedule(100, warmup_steps=4)
    assert [s.factor(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert s.factor(4) == 1.0
    assert s.factor(99) == 1.0  # decay "none": constant after warmup
    assert s.factor(500) == 1.0


def test_none_without_warmup_is_constant():
    s, _ = _schedule(10)
    assert {s.factor(i) for i in range(0, 30)} == {1.0}


@pytest.mark.parametrize("decay", ["linear", "cosine"])
@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_decay_hits_min_at_total_steps(decay, min_ratio):
    W, T = 10, 110
    s, _ = _schedule(T, warmup_steps=W, decay=decay, min_lr_ratio=min_ratio)
    assert s.factor(W - 1) == pytest.approx(1.0)
    assert s.factor(W) == pytest.approx(1.0)  # decay starts from the base LR
    assert s.factor(T) == pytest.approx(min_ratio)
    assert s.factor(T + 50) == pytest.approx(min_ratio)  # clamped after the horizon
    values = [s.factor(i) for i in range(W, T + 1)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))  # non-increasing
    assert min(values) >= min_ratio - 1e-12


@pytest.mark.parametrize("step", [10, 35, 60, 85, 109])
def test_decay_shapes(step):
    W, T, m = 10, 110, 0.1
    progress = (step - W) / (T - W)
    lin, _ = _schedule(T, warmup_steps=W, decay="linear", min_lr_ratio=m)
    cos, _ = _schedule(T, warmup_steps=W, decay="cosine", min_lr_ratio=m)
    assert lin.factor(step) == pytest.approx(m + (1 - m) * (1 - progress))
    assert cos.factor(step) == pytest.approx(m + (1 - m) * (1 + math.cos(math.pi * progress)) / 2)


def test_cosine_and_linear_midpoint_and_quarter():
    lin, _ = _schedule(110, warmup_steps=10, decay="linear", min_lr_ratio=0.1)
    cos, _ = _schedule(110, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lin.factor(60) == pytest.approx(0.55)
    assert cos.factor(60) == pytest.approx(0.55)
    assert lin.factor(35) == pytest.approx(0.775)
    assert cos.factor(35) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))


def test_decay_without_warmup():
    s, _ = _schedule(4, decay="linear")
    assert [s.factor(i) for i in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_zero_total_steps_is_safe():
    s, _ = _schedule(0, decay="linear", min_lr_ratio=0.2)
    assert s.total_steps == 1
    assert s.factor(0) == pytest.approx(1.0)
    assert s.factor(1) == pytest.approx(0.2)


def test_apply_sets_group_lrs_from_base():
    s, inner = _schedule(20, warmup_steps=5, decay="linear", min_lr_ratio=0.0)
    assert s.base_lrs == [0.2]
    f = s.apply(0)
    assert f == pytest.approx(0.2)
    assert inner.param_groups[0]["lr"] == pytest.approx(0.2 * 0.2)
    s.apply(12)  # progress 7/15 into the decay
    assert inner.param_groups[0]["lr"] == pytest.approx(0.2 * (1 - 7 / 15))
    # base LRs are not compounded by repeated application
    s.apply(4)
    assert inner.param_groups[0]["lr"] == pytest.approx(0.2)
