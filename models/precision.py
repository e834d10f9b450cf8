"""Where a model's pooled embeddings enter its dense part: the one place mixed precision
touches the models.

Every model passes each pooled-embedding tensor through :func:`dense_input` before its dense
arches use it. Under autocast (``precision.dense = "bf16"`` or ``"fp16"``) the tensor is cast
to the autocast dtype there, so the dense part receives it in its own dtype. With fp16 loss
scaling the same spot unscales the gradient on its way back into the tables: FBGEMM's fused
optimizer applies that gradient inside the backward kernel, where GradScaler never sees it, so
the tables must receive the true gradient (and a zero one when it overflowed), while the dense
parameters keep the scaled gradient that GradScaler unscales, checks and steps.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch.fx import _symbolic_trace

# Active only inside TrainModule's training forward under fp16 (see embedding_grad_unscale).
_unscaler: "_Boundary | None" = None


class _Boundary:
    def __init__(self, scale: Callable[[], torch.Tensor]) -> None:
        self.scale = scale  # the loss scale in use when backward runs
        self.calls = 0  # pooled tensors that passed through dense_input in this forward
        # [] float, 1.0 once a gradient into the tables held an Inf/NaN: the loss scale must back
        # off even when every dense gradient stayed finite (GradScaler only sees those).
        self.overflow: torch.Tensor | None = None

    def note(self, finite: torch.Tensor) -> None:
        bad = (~finite).float()
        self.overflow = bad if self.overflow is None else torch.maximum(self.overflow, bad)


class _UnscaleGrad(torch.autograd.Function):
    """Identity forward; backward divides the gradient by the loss scale, or zeroes it when it
    holds an Inf/NaN (the step GradScaler then skips), so no scaled or non-finite gradient
    reaches a fused embedding optimizer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, boundary: _Boundary) -> torch.Tensor:
        ctx.boundary = boundary
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.float()
        finite = torch.isfinite(grad).all()  # no host sync: the choice stays on the device
        ctx.boundary.note(finite)
        unscaled = grad / ctx.boundary.scale().to(grad.device, torch.float32)
        return torch.where(finite, unscaled, torch.zeros_like(unscaled)), None


def fx_tracing() -> bool:
    """True while torch.fx traces the model symbolically: TorchRec's TrainPipelineSparseDist does,
    only to find which lookups read the batch (the traced graph is never run), so steps with
    side effects or data-dependent checks step aside then."""
    check = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None) or _symbolic_trace.is_fx_tracing
    return check()


def dense_input(pooled: torch.Tensor) -> torch.Tensor:
    """Pooled embeddings -> the dense arches' input (the autocast dtype under autocast, with the
    fp16 gradient unscaling described above); unchanged in fp32 training and in evaluation."""
    if fx_tracing():
        return pooled
    if _unscaler is not None and pooled.requires_grad:
        _unscaler.calls += 1
        pooled = _UnscaleGrad.apply(pooled, _unscaler)
    device_type = pooled.device.type
    if torch.is_autocast_enabled(device_type):
        pooled = pooled.to(torch.get_autocast_dtype(device_type))
    return pooled


@contextlib.contextmanager
def embedding_grad_unscale(scale: Callable[[], torch.Tensor]) -> Iterator[_Boundary]:
    """Within: pooled embeddings passed to :func:`dense_input` get their gradient divided by
    `scale()` in backward. Yields a counter of how many passed (a model that bypasses
    dense_input would feed scaled gradients to the fused optimizer; the trainer checks)."""
    global _unscaler
    previous, _unscaler = _unscaler, _Boundary(scale)
    try:
        yield _unscaler
    finally:
        _unscaler = previous
