"""The GPU step loop: TorchRec's TrainPipelineSparseDist overlaps the input all-to-all of batch
i+1 with batch i's compute."""

from __future__ import annotations

import itertools
from collections import deque
from typing import Callable, Iterator

import torch

from data.batch import Batch
from trainer.train_module import train_stats


def pipelined_steps(model, optimizer, device: torch.device, batches: Iterator[Batch], step: int,
                    boundaries: list[int], stop_at: int,
                    before_step: Callable[[], object]) -> Iterator[tuple[Batch, torch.Tensor, dict]]:
    """(batch, task losses [T], the model's train stats) per optimizer step, from `step` on. Eval and checkpoints need
    the plain model, so the pipeline runs in segments that end at multiples of `boundaries`
    (and at `stop_at`); `execute_all_batches` drains each segment. `before_step` runs before
    every step (the LR schedule)."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    pending: deque[Batch] = deque()
    batches = iter(batches)
    while True:
        segment = _take_until_boundary(batches, step, boundaries, stop_at)
        first = next(segment, None)
        if first is None:
            return
        feed = _recording(itertools.chain([first], segment), pending)
        pipeline = TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True)
        while True:
            before_step()
            try:
                task_losses, outputs, _, _ = pipeline.progress(feed)
            except StopIteration:
                break
            step += 1
            yield pending.popleft(), task_losses, train_stats(outputs)
        if hasattr(pipeline, "detach"):
            pipeline.detach()


def _take_until_boundary(batches, step: int, boundaries: list[int], stop_at: int):
    """Batches up to the next eval/checkpoint/stop step."""
    while True:
        step += 1
        batch = next(batches, None)
        if batch is None:
            return
        yield batch
        if step == stop_at or any(step % b == 0 for b in boundaries):
            return


def _recording(batches, pending: deque):
    for batch in batches:
        pending.append(batch)
        yield batch
