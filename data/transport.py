"""Batches from DataLoader workers to the main process through shared memory.

Why. A DataLoader worker hands each batch to the main process through a pipe: the worker
pickles the batch (0.75 MiB on the bench config) into the pipe 64 KiB at a time and the main
process reads it back and copies it out of the pickle: 0.75-0.87 ms of the main process's CPU
and 1.3-1.4 ms of wall time per batch (DataLoader overhead included), about what building the
batch costs. A worker that writes the bytes into a slot of memory both processes map, and sends
only the slot's number through the pipe, costs each side one copy: 0.27-0.30 ms of the main
process's CPU, 0.3-0.4 ms of wall time.

How. A `BatchRing` is made in the main process just before the DataLoader forks its workers
(one per DataLoader iterator, see trainer/loader.py), so every worker inherits the mapping. Each
worker owns `slots` slots and fills them in turn; a semaphore per worker counts its free slots.
The main process copies a batch out of its slot while unpickling the slot's handle and frees
the slot at once. A worker's handles reach the main process in the order it sent them, so its
slots free up in the order they were filled. A worker that finds no free slot, or a batch larger
than a slot (long id lists, passthrough columns), sends that batch inline as before: the ring
never blocks a worker. Under the spawn or forkserver start methods the mapping is not inherited
(the ring pickles as None) and every batch goes inline.
"""

from __future__ import annotations

import itertools
import mmap
import multiprocessing
import os
import weakref

import numpy as np
import torch

from data.batch import Batch, batch_tensors, rebuild_batch

_ALIGN = 64  # every tensor starts on a cache line (and on its element size)
_RINGS: "weakref.WeakValueDictionary[tuple[int, int], BatchRing]" = weakref.WeakValueDictionary()
_serial = itertools.count()


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class BatchRing:
    """`slots` shared slots of `slot_bytes` for each of `num_workers` DataLoader workers."""

    def __init__(self, num_workers: int, slots: int, slot_bytes: int) -> None:
        self.num_workers, self.slots, self.slot_bytes = num_workers, slots, _aligned(slot_bytes)
        self.token = (os.getpid(), next(_serial))
        self._memory = mmap.mmap(-1, max(1, num_workers * slots * self.slot_bytes))  # anonymous, shared
        self._bytes = np.frombuffer(self._memory, dtype=np.uint8)
        ctx = multiprocessing.get_context("fork")
        self._free = [ctx.Semaphore(slots) for _ in range(num_workers)]
        self._next = [0] * num_workers  # worker side: the slot each worker fills next
        _RINGS[self.token] = self

    @classmethod
    def for_batches(cls, num_workers: int, prefetch_factor: int, batch_size: int, num_dense: int, num_labels: int,
                    num_features: int, weighted: bool) -> "BatchRing":
        """A ring whose slots hold a batch of one id per feature, `prefetch_factor` + 1 slots a
        worker: the DataLoader hands out tasks to its workers in turn, so while all of them
        read, each has at most `prefetch_factor` batches on their way. (At the end of an epoch,
        a worker that outlives the others may be given more; those batches go inline.)"""
        per_row = 4 * (num_dense + num_labels + 1) + num_features * (8 + 4 + (4 if weighted else 0))
        return cls(num_workers, prefetch_factor + 1, batch_size * per_row + 16 * _ALIGN)

    def __reduce__(self):
        return _not_inherited, ()

    def put(self, worker: int, batch: Batch) -> "Batch | _InSlot":
        """In DataLoader worker `worker`: the batch copied into the worker's next slot, as the
        handle to send instead of it; or the batch itself (sent inline) when it does not fit or
        every slot is still in use."""
        parts = batch_tensors(batch)
        if parts is None:
            return batch
        tensors, skeleton = parts
        layout, at = [], 0
        for t in tensors:
            n = t.numel() * t.element_size()
            layout.append((t.dtype, tuple(t.shape), at, n))
            at += _aligned(n)
        if at > self.slot_bytes or not self._free[worker].acquire(block=False):
            return batch
        slot = self._next[worker]
        self._next[worker] = (slot + 1) % self.slots
        base = (worker * self.slots + slot) * self.slot_bytes
        for t, (_, _, offset, n) in zip(tensors, layout):
            if n:
                self._bytes[base + offset:base + offset + n] = t.reshape(-1).view(torch.uint8).numpy()
        return _InSlot(self.token, worker, slot, layout, skeleton)

    def take(self, worker: int, slot: int, layout: list, skeleton) -> Batch:
        """In the main process: the batch out of the slot (copied), and the slot freed."""
        base = (worker * self.slots + slot) * self.slot_bytes
        tensors = []
        for dtype, shape, offset, n in layout:
            raw = torch.empty(n, dtype=torch.uint8)
            if n:
                raw.numpy()[:] = self._bytes[base + offset:base + offset + n]
            tensors.append(raw.view(dtype).reshape(shape))
        self._free[worker].release()
        return rebuild_batch(tensors, skeleton)


class _InSlot:
    """What a worker sends for a batch in a slot; unpickled in the main process, it is the batch."""

    __slots__ = ("token", "worker", "slot", "layout", "skeleton")

    def __init__(self, token, worker, slot, layout, skeleton) -> None:
        self.token, self.worker, self.slot, self.layout, self.skeleton = token, worker, slot, layout, skeleton

    def __reduce__(self):
        return _take, (self.token, self.worker, self.slot, self.layout, self.skeleton)


def _take(token, worker: int, slot: int, layout: list, skeleton) -> Batch:
    ring = _RINGS.get(token)
    if ring is None:  # the iterator that made the ring is gone, and with it the batch's reader
        raise RuntimeError(f"a DataLoader worker sent a batch through shared-memory ring {token}, which this "
                           f"process no longer holds")
    return ring.take(worker, slot, layout, skeleton)


def _not_inherited() -> None:
    return None
